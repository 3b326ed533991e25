"""Waiting for an outside event: ``wait_for``, ``SagaResult.signal``, ``signal_saga``. Real Redis, real workers.

The shop: ``reserve`` (compensated by ``undo``), a wait, then ``pay``,
which records the saga data it got. Every step and compensation writes a
ledger entry; a step waits at a gate when the saga data names it in ``gates``.
"""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery

from celery_saga import (
    Saga,
    SagaCompensated,
    SagaDataError,
    SagaDefinitionError,
    SagaFailed,
    SagaNotFound,
    SagaResult,
    SagaStatus,
    StepStatus,
    current_step,
    parallel,
    saga_event_received,
    saga_step,
    signal_saga,
    wait_for,
)
from celery_saga.views import saga_text
from tests.helpers import Gates, patience
from tests.helpers import wait_for as wait_until


def build(app: Celery, client: redis.Redis, prefix: str) -> SimpleNamespace:
    gates = Gates(client, prefix)

    def log(action: str, *extra: Any) -> None:
        ctx = current_step()
        assert ctx is not None
        client.rpush(f"{prefix}:ledger", json.dumps([action, ctx.step, *extra]))

    @app.task(shared=False, name="w.undo")
    def undo(order_id: int, step_result: Any = None) -> None:
        log("undo")

    @saga_step(compensate=undo)
    @app.task(shared=False, name="w.reserve")
    def reserve(order_id: int, gates: list[str] | None = None) -> dict[str, Any]:
        if gates and "reserve" in gates:
            Gates(client, prefix).enter("reserve")
        log("do")
        return {"reservation": f"r-{order_id}"}

    @saga_step(compensate=undo)
    @app.task(shared=False, name="w.pay")
    def pay(order_id: int, approved_by: str | None = None) -> dict[str, Any]:
        log("do", approved_by)
        return {"paid": True}

    @saga_step(compensate=None)
    @app.task(shared=False, name="w.pack")
    def pack(order_id: int) -> None:
        log("do")

    refund = Saga("w_refund", [reserve, wait_for("approval", timeout=60, reject="denied"), pay])
    hasty = Saga("w_hasty", [reserve, wait_for("approval", timeout=1.0), pay])
    side = Saga("w_side", [reserve, parallel(pack, wait_for("confirm", timeout=60)), pay])
    late = Saga("w_late", [reserve, pay, wait_for("delivered", timeout=1.0)], pivot="w.pay")
    return SimpleNamespace(**{k: v for k, v in locals().items() if not k.startswith("_")})


@pytest.fixture
def shop(app: Celery, r: redis.Redis, prefix: str) -> SimpleNamespace:
    return build(app, r, prefix)


def effects(r: redis.Redis, prefix: str) -> list[list[Any]]:
    return [json.loads(x) for x in r.lrange(f"{prefix}:ledger", 0, -1)]


def waiting(res: SagaResult, event: str) -> bool:
    return res.state().step(f"wait:{event}").status is StepStatus.DISPATCHED


def test_an_event_delivered_during_the_wait_lets_the_saga_go_on_with_its_data(
    app: Celery, shop: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any
) -> None:
    received: list[dict[str, Any]] = []

    def on_event(sender: str, **kw: Any) -> None:
        received.append({"sender": sender, **kw})

    saga_event_received.connect(on_event, weak=False)
    try:
        with worker():
            res = shop.refund.delay(order_id=1)
            wait_until(lambda: waiting(res, "approval"), what="the saga to reach its wait")
            assert res.status is SagaStatus.RUNNING and [e[:2] for e in effects(r, prefix)] == [["do", "w.reserve"]]
            # When the approval arrives, with data
            assert res.signal("approval", {"approved_by": "ann"}) is True
            data = res.get(timeout=patience(30))
            # Then the saga went on: the data reached the next step and the saga data
            assert data["approved_by"] == "ann"
            assert effects(r, prefix) == [["do", "w.reserve"], ["do", "w.pay", "ann"]]
            # ... a second delivery (of either event) is too late or ignored
            assert res.signal("approval", {"approved_by": "bob"}) is False  # the saga has finished
            assert signal_saga(app, res.id, "denied") is False
    finally:
        saga_event_received.disconnect(on_event)
    assert [(e["sender"], e["saga_id"], e["event"], e["data"]) for e in received] == [
        ("w_refund", res.id, "approval", {"approved_by": "ann"})
    ]
    wait = res.state().step("wait:approval")
    assert (wait.status, wait.result) == (StepStatus.COMPLETED, {"approved_by": "ann"})
    assert "wait:approval" in saga_text(res.state())


def test_an_event_delivered_before_the_saga_reaches_its_wait_is_kept_until_it_does(
    shop: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any
) -> None:
    gates = Gates(r, prefix)
    with worker():
        # Given a saga held in its first step, before its wait
        res = shop.refund.delay(order_id=2, gates=["reserve"])
        gates.wait_entered("reserve")
        # When the approval arrives early (twice): it is accepted and kept
        assert res.signal("approval", {"approved_by": "cy"}) is True
        assert res.signal("approval", {"approved_by": "dan"}) is True
        assert res.state().step("wait:approval").status is StepStatus.WAITING
        # Then, once the first step finishes, the saga goes through its wait at once, with the first data
        gates.open("reserve")
        assert res.get(timeout=patience(30))["approved_by"] == "cy"
    assert effects(r, prefix) == [["do", "w.reserve"], ["do", "w.pay", "cy"]]


def test_the_reject_event_rolls_the_saga_back_with_its_data_in_the_error(
    shop: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any
) -> None:
    with worker():
        res = shop.refund.delay(order_id=3)
        wait_until(lambda: waiting(res, "approval"), what="the saga to reach its wait")
        assert res.signal("denied", {"why": "over budget"}) is True
        with pytest.raises(SagaCompensated) as info:
            res.get(timeout=patience(30))
        # ... and the approval, arriving after, is refused
        assert res.signal("approval") is False
    assert info.value.reason == "rejected" and info.value.step == "wait:approval"
    assert "over budget" in (info.value.error or "")
    assert effects(r, prefix) == [["do", "w.reserve"], ["undo", "w.reserve"]]


def test_a_wait_whose_deadline_passes_rolls_back_as_a_step_would(
    shop: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any
) -> None:
    with worker():
        res = shop.hasty.delay(order_id=4)
        with pytest.raises(SagaCompensated) as info:
            res.get(timeout=patience(30))
        assert res.signal("approval") is False
    assert info.value.reason == "timeout" and info.value.step == "wait:approval"
    assert info.value.error == "timeout: event approval did not come within 1s"
    assert effects(r, prefix) == [["do", "w.reserve"], ["undo", "w.reserve"]]


def test_a_wait_holds_no_worker(shop: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any) -> None:
    # Given one worker thread, and five sagas waiting for their approval
    with worker(concurrency=1):
        waiting_sagas = [shop.refund.delay(order_id=10 + i) for i in range(5)]
        for res in waiting_sagas:
            wait_until(lambda res=res: waiting(res, "approval"), what="every saga to reach its wait")
        # When another saga runs on that same thread, then it finishes while they wait
        other = shop.side.delay(order_id=20)
        wait_until(lambda: waiting(other, "confirm"), what="the parallel wait")
        assert other.signal("confirm") is True
        assert other.get(timeout=patience(30))["paid"] is True
        assert all(res.status is SagaStatus.RUNNING for res in waiting_sagas)
        for res in waiting_sagas:
            res.signal("approval", {"approved_by": "eve"})
        assert all(res.get(timeout=patience(30))["approved_by"] == "eve" for res in waiting_sagas)


def test_a_wait_after_the_pivot_that_times_out_ends_the_saga_failed(
    shop: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any
) -> None:
    with worker():
        res = shop.late.delay(order_id=5)
        with pytest.raises(SagaFailed) as info:
            res.get(timeout=patience(30))
    assert info.value.reason == "timeout" and info.value.step == "wait:delivered"
    # Nothing was rolled back: the saga was past its point of no return
    assert [e[0] for e in effects(r, prefix)] == ["do", "do"]


def test_signals_refuse_unknown_sagas_and_data_that_cannot_be_stored(app: Celery, shop: SimpleNamespace) -> None:
    with pytest.raises(SagaNotFound):
        signal_saga(app, "no-such-saga", "approval")
    res = shop.refund.delay(order_id=6)
    with pytest.raises(SagaDataError, match="cannot be stored"):
        res.signal("approval", {"when": object()})
    assert res.signal("nothing-waits-for-this") is False
    # Nothing was kept by the refused calls
    assert res.state().step("wait:approval").status is StepStatus.WAITING


def test_a_wait_needs_a_timeout_and_unique_event_names(shop: SimpleNamespace) -> None:
    with pytest.raises(SagaDefinitionError, match="timeout=None to wait forever"):
        wait_for("approval")
    with pytest.raises(SagaDefinitionError, match="event name"):
        wait_for("bad name", timeout=None)
    with pytest.raises(SagaDefinitionError, match="twice"):
        Saga("w_twice", [shop.reserve, wait_for("a", timeout=None), wait_for("b", timeout=None, reject="a")])


def test_an_accepted_event_is_a_task_saga_event_where_events_are_on(app: Celery, shop: SimpleNamespace) -> None:
    # Given events turned on for this process (it is no worker: only an explicit True sends them)
    app.conf.saga_send_events = True
    res = shop.refund.delay(order_id=7)
    got: list[dict[str, Any]] = []
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"task-saga-event": got.append})
        with receiver.consumer_context() as (connection, _, _):
            # (Events go by Redis pub/sub: the receiver subscribes when it first polls.)
            _drained(connection)
            # When the event is delivered (early: the saga has not reached its wait)
            assert res.signal("approval", {"approved_by": "fay"}) is True
            # Then a task-saga-event names the saga and the event
            wait_until(lambda: _drained(connection) or got, 10, "the task-saga-event")
            # ... and a second delivery, which changes nothing, sends none
            assert res.signal("approval") is True
            _drained(connection)
    assert [(e["uuid"], e["saga_name"], e["event"]) for e in got] == [(res.id, "w_refund", "approval")]


def _drained(connection: Any) -> bool:
    """Handle the events that came within 0.2 s; False, so a wait_for keeps polling."""
    with contextlib.suppress(TimeoutError):
        connection.drain_events(timeout=patience(0.2))
    return False
