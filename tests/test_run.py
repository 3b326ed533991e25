"""Running sagas on a real in-process worker: data flow, failures, rollback order."""

from __future__ import annotations

import json
import time

import pytest
from celery import Celery
from celery.exceptions import Reject

from celery_saga import (
    CompensationStatus,
    Saga,
    SagaCompensated,
    SagaStatus,
    StepStatus,
    current_step,
    parallel,
    saga_step,
    step,
)
from celery_saga.stores import store_for
from tests import shop
from tests.helpers import Ledger, patience, saga_keys, wait_for


def test_sequential_happy_path_merges_dict_results_into_data(app: Celery, r, prefix, ledger: Ledger, worker) -> None:
    s = shop.build(app, r, prefix)
    with worker():
        res = s.sequential.delay(order_id=7)
        data = res.get(timeout=patience(20))
    assert data == {"order_id": 7, "reservation": "r-7", "payment": "p-7", "tracking": "t-7"}
    assert res.status is SagaStatus.COMPLETED and res.ready()
    # charge declared `reservation` and received what reserve returned.
    assert ledger.actions() == ["do:shop.validate", "do:shop.reserve", "do:shop.charge", "do:shop.ship"]
    assert ledger.entries()[2][2] == "r-7"
    state = res.state()
    assert [st.status for st in state.steps] == [StepStatus.COMPLETED] * 4
    assert all(st.attempts == 1 and st.started_at and st.ended_at for st in state.steps)
    assert state.step("shop.ship").result == {"tracking": "t-7"}


def test_parallel_steps_see_the_same_data_and_merge_in_declaration_order(app: Celery, r, prefix, worker) -> None:
    @saga_step(compensate=None)
    @app.task(shared=False, name="par.left")
    def left(n: int) -> dict[str, int]:
        return {"n": n + 1, "left": 1}

    @saga_step(compensate=None)
    @app.task(shared=False, name="par.right")
    def right(n: int) -> dict[str, int]:
        return {"n": n + 10, "right": 1}

    @saga_step(compensate=None)
    @app.task(shared=False, name="par.after")
    def after(**data: int) -> dict[str, int]:
        return {"seen": sorted(data.items())}  # type: ignore[dict-item]

    saga = Saga("par", [parallel(left, right), after])
    with worker():
        data = saga.delay(n=0).get(timeout=patience(20))
    # Both saw n=0; the later-declared step wins the merge.
    assert data["n"] == 10
    assert data["seen"] == [["left", 1], ["n", 10], ["right", 1]]


@pytest.mark.parametrize(
    ("failing", "undone"),
    [
        ("validate", []),
        ("reserve", []),
        ("charge", ["shop.reserve"]),
        ("ship", ["shop.charge", "shop.reserve"]),
    ],
)
def test_failure_at_each_position_compensates_completed_steps_in_reverse(
    app: Celery, r, prefix, ledger: Ledger, worker, failing: str, undone: list[str]
) -> None:
    s = shop.build(app, r, prefix)
    with worker():
        res = s.sequential.delay(order_id=1, fail={failing: "boom"})
        with pytest.raises(SagaCompensated) as info:
            res.get(timeout=patience(20))
    assert info.value.step == f"shop.{failing}"
    assert "boom" in (info.value.error or "")
    assert info.value.reason == "failure"
    undos = [a.split(":", 1)[1] for a in ledger.actions() if a.startswith("undo:")]
    assert undos == undone
    # Each compensation got its forward step's result and its own key.
    for entry in ledger.entries():
        if entry[0] == "undo":
            assert entry[2] == {"shop.reserve": {"reservation": "r-1"}, "shop.charge": {"payment": "p-1"}}[entry[1]]
            assert entry[3] == f"{res.id}:{entry[1]}:undo"
    state = res.state()
    assert state.status is SagaStatus.COMPENSATED
    assert state.step(f"shop.{failing}").status is StepStatus.FAILED
    assert state.step(f"shop.{failing}").compensation_status is None


def test_parallel_failure_waits_for_the_slow_sibling_before_earlier_stages(
    app: Celery, r, prefix, ledger: Ledger, worker
) -> None:
    s = shop.build(app, r, prefix)
    with worker():
        # Given ship is held at its gate while receipt fails (receipt is held
        # too until ship runs: failing first would fence ship while queued)
        res = s.mixed.delay(order_id=3, fail={"receipt": "printer on fire"}, gates=["ship", "receipt"])
        s.gates.wait_entered("ship")
        s.gates.wait_entered("receipt")
        s.gates.open("receipt")
        wait_for(lambda: res.status is SagaStatus.COMPENSATING, what="rollback to start")
        # Then nothing earlier is compensated while ship may still take effect
        state = res.state()
        assert state.step("shop.ship").status is StepStatus.RUNNING
        assert state.step("shop.charge").compensation_status is None
        assert not [a for a in ledger.actions() if a.startswith("undo")]
        # When ship finishes, it is compensated first, then the earlier stages in reverse
        s.gates.open("ship")
        with pytest.raises(SagaCompensated):
            res.get(timeout=patience(20))
    undos = [a for a in ledger.actions() if a.startswith("undo")]
    assert undos == ["undo:shop.ship", "undo:shop.charge", "undo:shop.reserve"]


def test_queued_sibling_of_a_failed_step_never_runs(app: Celery, r, prefix, ledger: Ledger, worker) -> None:
    s = shop.build(app, r, prefix)
    saga = Saga("fence", [s.reserve, parallel(s.charge, s.ship)])
    with worker(concurrency=1):
        # One thread: charge runs and fails while ship is still queued behind it.
        res = saga.delay(order_id=4, fail={"charge": "declined"})
        with pytest.raises(SagaCompensated):
            res.get(timeout=patience(20))
        # A plain task queued after ship runs after it: once it ran, ship's message was consumed.
        s.notify.delay("sentinel", tag="sentinel")
        wait_for(lambda: r.llen(f"{prefix}:callbacks"), what="the sentinel")
    assert "do:shop.ship" not in ledger.actions()
    assert res.state().step("shop.ship").status is StepStatus.CANCELLED
    assert ledger.actions()[-1] == "undo:shop.reserve"


def test_compensate_on_failure_compensates_the_failed_step_itself(
    app: Celery, r, prefix, ledger: Ledger, worker
) -> None:
    s = shop.build(app, r, prefix)

    @app.task(shared=False, name="cof.release")
    def release(order_id: int, step_result: object = None) -> None:
        r.rpush(f"{prefix}:ledger", json.dumps(["undo", "cof.hold", step_result, 0]))

    @saga_step(compensate=release, compensate_on_failure=True)
    @app.task(shared=False, name="cof.hold")
    def hold(order_id: int) -> None:
        raise RuntimeError("half done")

    with worker(), pytest.raises(SagaCompensated):
        Saga("cof", [s.reserve, hold]).delay(order_id=1).get(timeout=patience(20))
    assert [a for a in ledger.actions() if a.startswith("undo")] == ["undo:cof.hold", "undo:shop.reserve"]
    assert ledger.entries()[1][2] is None  # step_result of a failed step


def test_signature_bound_kwargs_override_saga_data_for_that_step_only(app: Celery, r, prefix, worker) -> None:
    seen: dict[str, object] = {}

    @saga_step(compensate=None)
    @app.task(shared=False, name="sig.charge")
    def charge(amount: int, currency: str = "USD") -> None:
        seen["charge"] = (amount, currency)

    @saga_step(compensate=None)
    @app.task(shared=False, name="sig.audit")
    def audit(currency: str) -> None:
        seen["audit"] = currency

    saga = Saga("sig", [charge.s(currency="EUR"), audit])
    with worker():
        saga.delay(amount=5, currency="GBP").get(timeout=patience(20))
    assert seen == {"charge": (5, "EUR"), "audit": "GBP"}


def test_canvas_chain_and_group_become_stages(app: Celery, r, prefix, worker) -> None:
    from celery import chain, group

    s = shop.build(app, r, prefix)
    saga = Saga("canvas", chain(s.reserve.s(), s.charge.s(), group(s.ship.s(), s.receipt.s())))
    assert [[st.name for st in stage] for stage in saga.plan().stages] == [
        ["shop.reserve"],
        ["shop.charge"],
        ["shop.ship", "shop.receipt"],
    ]
    with worker():
        assert saga.delay(order_id=2).get(timeout=patience(20))["tracking"] == "t-2"
    # A group followed by a task is a chord: its header is one stage, its body the next.
    chorded = Saga("chord", [s.reserve, group(s.ship.s(), s.receipt.s()) | s.charge.s()])
    assert [[st.name for st in stage] for stage in chorded.plan().stages] == [
        ["shop.reserve"],
        ["shop.ship", "shop.receipt"],
        ["shop.charge"],
    ]


def test_one_task_twice_under_a_second_step_name(app: Celery, r, prefix, ledger: Ledger, worker) -> None:
    s = shop.build(app, r, prefix)
    saga = Saga("twice", [s.reserve, step(s.reserve, name="reserve_again"), s.charge])
    with worker():
        res = saga.delay(order_id=5, fail={"charge": "no"})
        with pytest.raises(SagaCompensated):
            res.get(timeout=patience(20))
    undos = [a for a in ledger.actions() if a.startswith("undo")]
    assert undos == ["undo:reserve_again", "undo:shop.reserve"]


def test_current_step_and_idempotency_keys(app: Celery, r, prefix, worker) -> None:
    seen: list[object] = []

    @app.task(shared=False, name="ctx.undo")
    def undo() -> None:
        seen.append(current_step())

    @saga_step(compensate=undo)
    @app.task(shared=False, name="ctx.first", bind=True, max_retries=3, default_retry_delay=0)
    def first(self) -> None:  # type: ignore[no-untyped-def]
        seen.append(current_step())
        if self.request.retries < 1:
            raise self.retry()

    @saga_step(compensate=None)
    @app.task(shared=False, name="ctx.second")
    def second() -> None:
        raise RuntimeError("roll back")

    assert current_step() is None
    with worker():
        # Data the step does not take must not break its own retry.
        res = Saga("ctx", [first, second]).delay(unrelated="x")
        with pytest.raises(SagaCompensated):
            res.get(timeout=patience(20))
    try_1, try_2, comp = seen
    assert try_1 is not None and try_2 is not None and comp is not None
    assert try_1.idempotency_key == try_2.idempotency_key == f"{res.id}:ctx.first"  # type: ignore[attr-defined]
    assert (try_1.attempt, try_2.attempt) == (1, 2)  # type: ignore[attr-defined]
    assert comp.compensating and comp.idempotency_key != try_1.idempotency_key  # type: ignore[attr-defined]
    assert (comp.saga_id, comp.saga_name, comp.step) == (res.id, "ctx", "ctx.first")  # type: ignore[attr-defined]
    assert res.state().step("ctx.first").attempts == 2


def test_step_task_outside_a_saga_behaves_as_before(app: Celery, r, prefix, ledger: Ledger, worker) -> None:
    from celery import chain

    s = shop.build(app, r, prefix)
    assert s.reserve(order_id=1) == {"reservation": "r-1"}  # direct call
    with worker():
        assert s.reserve.delay(order_id=2).get(timeout=patience(10)) == {"reservation": "r-2"}
        assert chain(s.reserve.si(order_id=3), s.ship.si(order_id=3)).delay().get(timeout=patience(10)) == {
            "tracking": "t-3"
        }
        with pytest.raises(RuntimeError, match="nope"):
            s.reserve.delay(order_id=4, fail={"reserve": "nope"}).get(timeout=patience(10))
    # No saga context, no compensation, no record.
    assert ledger.actions() == ["do:-", "do:-", "do:-", "do:-"]
    assert not saga_keys(r, prefix)


def test_on_complete_and_on_failure_are_sent_once_with_the_saga_id(app: Celery, r, prefix, worker) -> None:
    s = shop.build(app, r, prefix)
    with worker():
        ok = s.sequential.apply_async(
            kwargs={"order_id": 1}, on_complete=s.notify.s(tag="done"), on_failure=s.notify.s(tag="failed")
        )
        bad = s.sequential.apply_async(
            kwargs={"order_id": 2, "fail": {"ship": "x"}},
            on_complete=s.notify.s(tag="done"),
            on_failure=s.notify.s(tag="failed"),
        )
        wait_for(lambda: r.llen(f"{prefix}:callbacks") >= 2, what="both callbacks")
        s.notify.delay("sentinel", tag="sentinel")
        wait_for(lambda: r.llen(f"{prefix}:callbacks") >= 3, what="the sentinel")
    calls = [json.loads(x) for x in r.lrange(f"{prefix}:callbacks", 0, -1)]
    assert sorted(calls[:2]) == sorted([["done", ok.id], ["failed", bad.id]])
    assert calls[2] == ["sentinel", "sentinel"]


def test_a_result_the_record_cannot_hold_is_an_unknown_outcome_compensated_blind(
    app: Celery, r, prefix, ledger: Ledger, worker
) -> None:
    s = shop.build(app, r, prefix)

    @saga_step(compensate=s.undo)
    @app.task(shared=False, name="bad.result")
    def weird(order_id: int) -> object:
        log_effect = s.log  # the function ran: its effect is there
        log_effect("do", order_id)
        return {"when": object()}

    with worker():
        res = Saga("badresult", [s.reserve, weird]).delay(order_id=1)
        with pytest.raises(SagaCompensated) as info:
            res.get(timeout=patience(20))
    # The error names the step, where in the result the value is, and its type.
    assert info.value.step == "bad.result" and info.value.reason == "failure"
    assert "step 'bad.result'" in (info.value.error or "") and "result.when is of type object" in info.value.error
    step = res.state().step("bad.result")
    assert (step.status, step.stopped_by) == (StepStatus.UNKNOWN, "unstorable")
    # Its effect may be there: it is compensated blind, before the step that completed.
    undos = [(e[1], e[2]) for e in ledger.entries() if e[0] == "undo"]
    assert undos == [("bad.result", None), ("shop.reserve", {"reservation": "r-1"})]


def test_reject_without_requeue_is_a_failure(app: Celery, r, prefix, ledger: Ledger, worker) -> None:
    s = shop.build(app, r, prefix)

    @saga_step(compensate=None)
    @app.task(shared=False, name="bad.reject")
    def rejecting() -> None:
        raise Reject("poison", requeue=False)

    with worker(), pytest.raises(SagaCompensated) as info:
        Saga("reject", [s.reserve, rejecting]).delay(order_id=1).get(timeout=patience(20))
    assert info.value.step == "bad.reject"
    assert [a for a in ledger.actions() if a.startswith("undo")] == ["undo:shop.reserve"]


def test_revoked_step_is_a_failure(app: Celery, r, prefix, ledger: Ledger, worker) -> None:
    s = shop.build(app, r, prefix)
    with worker():
        res = s.sequential.delay(order_id=1, gates=["reserve"])
        s.gates.wait_entered("reserve")
        # Celery calls no errback for a revoked task: the worker's signal handler records it.
        app.control.revoke(f"{res.id}:shop.charge", reply=True, timeout=5)
        s.gates.open("reserve")
        with pytest.raises(SagaCompensated) as info:
            res.get(timeout=patience(20))
    assert info.value.step == "shop.charge"
    assert "revoked" in (info.value.error or "")
    assert [a for a in ledger.actions() if a.startswith("undo")] == ["undo:shop.reserve"]
    assert res.state().step("shop.reserve").compensation_status is CompensationStatus.COMPENSATED


def test_completed_sibling_is_compensated_at_once_while_another_still_runs(
    app: Celery, r, prefix, ledger: Ledger, worker
) -> None:
    s = shop.build(app, r, prefix)
    saga = Saga("p3", [s.reserve, parallel(s.ship, s.charge, s.receipt)])
    with worker():
        # Given ship completed, charge is held at its gate, and receipt fails
        res = saga.delay(order_id=8, fail={"receipt": "no paper"}, gates=["charge", "receipt"])
        wait_for(lambda: res.state().step("shop.ship").status is StepStatus.COMPLETED, what="ship to complete")
        s.gates.open("receipt")
        # Then ship is compensated without waiting for charge
        wait_for(lambda: "undo:shop.ship" in ledger.actions(), what="ship's compensation")
        assert res.state().step("shop.charge").status is StepStatus.RUNNING
        assert "undo:shop.reserve" not in ledger.actions()
        # And once charge finishes it is compensated, then the earlier stage
        s.gates.open("charge")
        with pytest.raises(SagaCompensated):
            res.get(timeout=patience(20))
    undone = [a for a in ledger.actions() if a.startswith("undo")]
    assert undone == ["undo:shop.ship", "undo:shop.charge", "undo:shop.reserve"]


def test_get_times_out_with_celerys_timeout_error(app: Celery, r, prefix) -> None:
    from celery.exceptions import TimeoutError as CeleryTimeoutError

    s = shop.build(app, r, prefix)
    res = s.sequential.delay(order_id=1)  # no worker runs
    with pytest.raises(CeleryTimeoutError, match="PENDING"):
        res.get(timeout=patience(0.3))


def test_get_is_woken_when_the_saga_ends_not_by_polling(app: Celery, r, prefix, worker) -> None:
    s = shop.build(app, r, prefix)
    with worker():
        # Given waiters that would read the status only every 60 s
        first = s.sequential.delay(order_id=1)
        started = time.monotonic()
        assert first.get(timeout=patience(30), interval=60)["tracking"] == "t-1"
        # Then each returns as its saga ends: the ending transition wakes it
        # (a poll every 60 s would return only at the 30 s timeout)
        assert time.monotonic() - started < 15
        # And again on the same thread, whose subscriber connection is reused
        second = s.sequential.delay(order_id=2)
        again = time.monotonic()
        assert second.get(timeout=patience(30), interval=60)["tracking"] == "t-2"
        assert time.monotonic() - again < 15
        # And a rolled-back saga wakes its waiter too
        failing = s.sequential.delay(order_id=3, fail={"ship": "no"})
        rolled = time.monotonic()
        with pytest.raises(SagaCompensated):
            failing.get(timeout=patience(30), interval=60)
        assert time.monotonic() - rolled < 15


def test_a_stage_of_250_steps_passes_every_result_on_and_to_get(app: Celery, r, prefix, worker) -> None:
    """The next stage's data and the end message each read hundreds of fields (in batches of 200)."""

    @app.task(shared=False, name="wide.add")
    def add(k: int) -> dict[str, int]:
        return {f"key{k:03d}": k}

    @app.task(shared=False, name="wide.total")
    def total(**data: int) -> dict[str, int]:
        return {"total": sum(v for key, v in data.items() if key.startswith("key"))}

    # Given a parallel stage of 250 steps, each adding a key, then a step that takes them all
    n = 250
    wide = parallel(*[step(add.s(k=i), name=f"add{i:03d}", compensate=None) for i in range(n)])
    saga = Saga("wide", [wide, step(total, compensate=None)])
    with worker():
        data = saga.delay(start=1).get(timeout=patience(60))
    # Then the last step got every result, and get() returns them all
    assert data["total"] == sum(range(n))
    assert len([key for key in data if key.startswith("key")]) == n and data["start"] == 1


def test_the_end_message_carries_a_completed_sagas_data_unless_it_is_large(app: Celery, r, prefix, worker) -> None:
    """So a woken get() returns without reading the record; large data is read from the record instead."""
    s = shop.build(app, r, prefix)
    store = store_for(app)
    with worker():
        # Given a waiter subscribed to a saga's end before it starts (its id is derived from its key)
        with store.end_signal(s.sequential.id_for("k1")) as wait:
            res = s.sequential.apply_async(kwargs={"order_id": 1, "note": "é"}, idempotency_key="k1")
            notice = wait(30)
        # Then the message that woke it holds the saga's final data, as the record has it
        assert notice is not None and notice.status is SagaStatus.COMPLETED
        assert notice.data == res.state().data == res.get(timeout=patience(5))
        assert notice.data["tracking"] == "t-1" and notice.data["note"] == "é"

        # Given a saga whose data is over the 64 KB the message carries
        big_id = s.sequential.id_for("k2")
        with store.end_signal(big_id) as wait:
            big = s.sequential.apply_async(kwargs={"order_id": 2, "blob": "x" * 70_000}, idempotency_key="k2")
            notice = wait(30)
        # Then the message only says it completed, and get() reads the data from the record
        assert notice is not None and notice.status is SagaStatus.COMPLETED and notice.data is None
        assert big.get(timeout=patience(5))["blob"] == "x" * 70_000

        # And a rolled-back saga's message carries its status only
        undone_id = s.sequential.id_for("k3")
        with store.end_signal(undone_id) as wait:
            undone = s.sequential.apply_async(kwargs={"order_id": 3, "fail": {"ship": "no"}}, idempotency_key="k3")
            notice = wait(30)
        assert notice is not None and notice.status is SagaStatus.COMPENSATED and notice.data is None
        with pytest.raises(SagaCompensated):
            undone.get(timeout=patience(5))


def test_steps_and_compensations_keep_their_own_queues(app: Celery, r, prefix, ns: str) -> None:
    from celery_saga.testing import thread_worker

    routes: dict[str, str] = {}

    app.conf.task_routes = {"q.refund": {"queue": f"q-{ns}-refunds"}}

    @app.task(shared=False, name="q.refund", bind=True)
    def refund(self) -> None:  # type: ignore[no-untyped-def]
        routes["refund"] = self.request.delivery_info["routing_key"]

    @saga_step(compensate=refund)
    @app.task(shared=False, name="q.pay", bind=True)
    def pay(self) -> None:  # type: ignore[no-untyped-def]
        routes["pay"] = self.request.delivery_info["routing_key"]

    @saga_step(compensate=None)
    @app.task(shared=False, name="q.boom")
    def boom() -> None:
        raise RuntimeError("no")

    queues = [app.conf.task_default_queue, f"q-{ns}-payments", f"q-{ns}-refunds"]
    # The step's queue comes from its signature, the compensation's from task_routes.
    saga = Saga("queues", [pay.s().set(queue=f"q-{ns}-payments"), boom])
    with (
        thread_worker(app, queues=queues),
        pytest.raises(SagaCompensated),
    ):
        saga.delay().get(timeout=patience(20))
    assert routes == {"pay": f"q-{ns}-payments", "refund": f"q-{ns}-refunds"}
