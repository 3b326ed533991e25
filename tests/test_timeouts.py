"""Deadlines, unknown outcomes and commutative compensation, on an in-process worker.

The worker runs the saga sweeper in a thread, as every worker does. Steps
that must miss their deadline wait on a gate in Redis; tests wait on
conditions, never on fixed sleeps. Crashes, lost workers and prefork time
limits are in test_timeouts_process.py.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery, signals

from celery_saga import (
    CompensationStatus,
    Saga,
    SagaCompensated,
    SagaDefinitionError,
    SagaStatus,
    StepStatus,
    compensation_failed,
    saga_step,
    step,
    sweep,
)
from celery_saga.stores import store_for
from celery_saga.worker.bootstep import configuration_warnings
from tests import timed_shop
from tests.helpers import finished, patience, store_now, wait_for


@pytest.fixture
def shop(app: Celery, r: redis.Redis, prefix: str) -> Any:
    return timed_shop.build(app, r, prefix)


@pytest.fixture
def published(app: Celery) -> Iterator[list[str]]:
    """Task ids of every message this process publishes."""
    ids: list[str] = []
    lock = threading.Lock()

    def record(headers: dict[str, Any] | None = None, **_: Any) -> None:
        with lock:
            ids.append(str((headers or {}).get("id")))

    signals.before_task_publish.connect(record, weak=False)
    yield ids
    signals.before_task_publish.disconnect(record)


# -- declaring deadlines -------------------------------------------------------------


def test_every_step_has_a_deadline_unless_none_is_explicit(app: Celery, shop: Any) -> None:
    plan = Saga("defaults", [shop.reserve, step(shop.hang, timeout=2.5), step(shop.last, timeout=None)]).plan()
    assert [s.timeout for s in plan.steps] == [300.0, 2.5, None]

    # saga_step(timeout=...) sets a task's own default, which step() can override.
    @saga_step(compensate=None, timeout=7)
    @app.task(shared=False, name="timed.own")
    def own() -> None: ...

    plan = Saga("own", [own, step(own, name="again", timeout=1)]).plan()
    assert [s.timeout for s in plan.steps] == [7.0, 1.0]

    # The app default may be changed, or set to None explicitly.
    app.conf.saga_default_step_timeout = 30
    assert Saga("thirty", [shop.reserve]).plan().steps[0].timeout == 30.0
    app.conf.saga_default_step_timeout = None
    assert Saga("none", [shop.reserve]).plan().steps[0].timeout is None


@pytest.mark.parametrize("bad", [0, -1, "5", True, float("nan"), float("inf")])
def test_a_bad_timeout_says_what_to_give(shop: Any, bad: Any) -> None:
    with pytest.raises(SagaDefinitionError, match="timeout"):
        step(shop.reserve, timeout=bad)
    with pytest.raises(SagaDefinitionError, match="timeout"):
        Saga("bad", [shop.reserve], timeout=bad)
    with pytest.raises(SagaDefinitionError, match="timeout"):
        saga_step(compensate=None, timeout=bad)
    with pytest.raises(SagaDefinitionError, match="timeout"):
        Saga("bad2", [shop.reserve]).apply_async(kwargs={}, timeout=bad)


def test_deadlines_are_in_the_record_and_the_saga_in_the_deadline_index(app: Celery, shop: Any, r) -> None:
    # Given no worker runs
    saga = Saga("indexed", [step(shop.reserve, timeout=60), shop.last], timeout=90)

    res = saga.delay(qty=1)

    # Then the first step's deadline counts from its dispatch, on the store clock
    state = res.state()
    first = state.step("timed.reserve")
    assert first.timeout == 60.0 and first.deadline is not None and state.created_at is not None
    assert (first.deadline - state.created_at).total_seconds() == pytest.approx(60.0, abs=0.01)
    assert state.timeout == 90.0 and state.deadline is not None
    assert (state.deadline - state.created_at).total_seconds() == pytest.approx(90.0, abs=0.01)
    assert state.step("timed.last").deadline is None  # not dispatched yet
    # And sweepers will look at it no later than its first deadline
    watched = store_for(app).watched(res.id)  # type: ignore[attr-defined]
    assert watched is not None and watched <= first.deadline.timestamp() + 0.05

    # A saga with no deadline at all is not in the index.
    bare = Saga("bare", [step(shop.reserve, timeout=None)]).delay()
    assert store_for(app).watched(bare.id) is None  # type: ignore[attr-defined]


def test_a_completed_saga_leaves_the_deadline_index(app: Celery, shop: Any, worker) -> None:
    with worker():
        res = Saga("quick", [shop.reserve, shop.last]).delay(qty=1)
        assert res.get(timeout=patience(10))["timed.last_qty"] == 1
    assert store_for(app).watched(res.id) is None  # type: ignore[attr-defined]


# -- timeouts ---------------------------------------------------------------------


def test_hung_step_is_compensated_blind_then_again_with_its_late_result(app: Celery, shop: Any, r, worker) -> None:
    saga = Saga("hung", [shop.reserve, step(shop.hang, timeout=1)])
    with worker():
        # When the second step hangs past its deadline
        res = saga.apply_async(kwargs={"qty": 3, "gates": ["hang"]}, on_failure=shop.notify.s(tag="failed"))
        wait_for(lambda: shop.entered("hang"), 10, "the step to start")

        # Then it is timed out with an unknown outcome, and compensated blind
        # (step_result=None, result not known), then the step before it
        with pytest.raises(SagaCompensated) as info:
            res.get(timeout=patience(15))
        assert info.value.reason == "timeout" and info.value.step == "timed.hang"
        state = res.state()
        hung = state.step("timed.hang")
        assert hung.status is StepStatus.UNKNOWN and hung.timed_out
        assert hung.compensation_status is CompensationStatus.COMPENSATED
        key = f"{res.id}:timed.hang"
        assert shop.ledger_entries() == [
            ["do", "timed.reserve"],
            ["undo", "timed.hang", 1, False, None, f"{key}:undo"],
            ["undo", "timed.reserve", 1, True, {"timed.reserve_qty": 3}, f"{res.id}:timed.reserve:undo"],
        ]

        # When the gate opens and the step succeeds late
        shop.open_gate("hang")

        # Then its late result is recorded and compensated in a second round,
        # with its own idempotency key and the real result
        wait_for(
            lambda: (s := res.state().step("timed.hang").second_round) and s.status is CompensationStatus.COMPENSATED,
            15,
            "the second compensation round",
        )
    assert shop.ledger_entries()[3:] == [
        ["do", "timed.hang"],
        ["undo", "timed.hang", 2, True, {"timed.hang_qty": 3}, f"{key}:undo:2"],
    ]
    state = res.state()
    hung = state.step("timed.hang")
    assert hung.late_status is StepStatus.COMPLETED and hung.late_result == {"timed.hang_qty": 3}
    assert hung.status is StepStatus.UNKNOWN  # the first outcome stays recorded
    # The saga stays COMPENSATED, on_failure was sent once, no forward effect is left.
    assert state.status is SagaStatus.COMPENSATED
    assert r.lrange(f"{app.conf.saga_key_prefix}:callbacks", 0, -1) == [json.dumps(["failed", res.id])]
    assert shop.left() == (0, {})


def test_late_failure_changes_only_the_record(app: Celery, shop: Any, worker) -> None:
    saga = Saga("late_fail", [shop.reserve, step(shop.hang, timeout=1)])
    with worker():
        res = saga.delay(qty=1, gates=["hang"], fail_late=True)
        assert finished(res) is SagaStatus.COMPENSATED
        shop.open_gate("hang")
        wait_for(lambda: res.state().step("timed.hang").late_status, 10, "the late failure")
        before = shop.ledger_entries()
    state = res.state()
    hung = state.step("timed.hang")
    assert hung.late_status is StepStatus.FAILED and "failed after its deadline" in (hung.late_error or "")
    assert hung.second_round is None
    assert state.status is SagaStatus.COMPENSATED
    assert [e[0] for e in before] == ["do", "undo", "undo", "fail"]
    assert shop.left() == (0, {})


def test_saga_timeout_times_out_everything_in_flight(app: Celery, shop: Any, worker) -> None:
    # Steps with long deadlines, but a saga that must finish within 1 s
    saga = Saga("bounded", [shop.reserve, shop.hang, shop.last], timeout=1)
    with worker():
        res = saga.delay(qty=2, gates=["hang"])
        with pytest.raises(SagaCompensated) as info:
            res.get(timeout=patience(15))
        assert info.value.reason == "timeout" and info.value.step == "timed.hang"
        assert "saga did not finish within 1s" in (info.value.error or "")
        shop.open_gate("hang")  # the late success gets its second round
        wait_for(lambda: res.state().step("timed.hang").second_round is not None, 10, "the second round")
        wait_for(lambda: shop.left() == (0, {}), 10, "every effect to be undone")
    state = res.state()
    assert state.step("timed.hang").status is StepStatus.UNKNOWN
    assert state.step("timed.last").status is StepStatus.WAITING


def test_apply_async_timeout_overrides_the_sagas_and_is_not_part_of_the_key(app: Celery, shop: Any) -> None:
    saga = Saga("override", [shop.reserve], timeout=5)
    res = saga.apply_async(kwargs={"qty": 1}, idempotency_key="k1", timeout=50)
    assert res.state().timeout == 50.0
    # Same key and kwargs, another timeout: the same saga (kwargs only are compared)
    again = saga.apply_async(kwargs={"qty": 1}, idempotency_key="k1", timeout=7)
    assert again == res and again.state().timeout == 50.0
    # None: no saga deadline for this start
    none = saga.apply_async(kwargs={"qty": 1}, idempotency_key="k2", timeout=None)
    assert none.state().timeout is None and none.state().deadline is None


def test_retry_countdown_past_the_deadline_times_out(app: Celery, shop: Any, worker) -> None:
    saga = Saga("retry_late", [shop.reserve, step(shop.retrying, timeout=1)])
    with worker():
        res = saga.delay(qty=1, countdown=5)
        with pytest.raises(SagaCompensated) as info:
            res.get(timeout=patience(15))
    assert info.value.reason == "timeout"
    # It ran once and then waited for its retry: its outcome is unknown.
    assert [e for e in shop.ledger_entries() if e[0] == "try"] == [["try", "timed.retrying"]]
    assert res.state().step("timed.retrying").status is StepStatus.UNKNOWN


def test_a_step_whose_message_expired_never_ran_and_timed_out(
    app: Celery, shop: Any, r, worker, caplog: pytest.LogCaptureFixture
) -> None:
    # Given the worker's own sweeper is off, and the deadline passes while no worker runs
    app.conf.saga_sweeper = False
    dropped: list[str] = []

    def on_revoked(request: Any = None, expired: bool = False, **_: Any) -> None:
        if expired:
            dropped.append(request.id)

    signals.task_revoked.connect(on_revoked, weak=False)
    res = Saga("expired", [step(shop.reserve, timeout=0.5)]).delay(qty=1)
    deadline = res.state().step("timed.reserve").deadline
    assert deadline is not None
    wait_for(lambda: store_now(r) > deadline.timestamp() + 0.1, 5, "the deadline to pass")

    # When a worker receives the expired message,
    # then the step never runs: it is a timeout, not a failure
    with worker(), pytest.raises(SagaCompensated) as info, caplog.at_level(logging.WARNING, logger="celery_saga"):
        res.get(timeout=patience(15))
    signals.task_revoked.disconnect(on_revoked)
    assert info.value.reason == "timeout"
    assert dropped == [f"{res.id}:timed.reserve"]  # Celery dropped it as expired
    # celery_saga says what happened (Celery says only "Discarding revoked task"): the saga, the step, the deadline
    (said,) = [m for m in caplog.messages if "expired in the queue" in m]
    assert res.id in said and "'timed.reserve'" in said and "its deadline (" in said and "(?)" not in said
    first = res.state().step("timed.reserve")
    assert first.status is StepStatus.CANCELLED and first.timed_out and first.attempts == 0
    assert first.compensation_status is None
    assert shop.ledger_entries() == []


def test_a_fenced_step_never_runs_even_if_its_message_arrives_later(app: Celery, shop: Any, r, worker, ns: str) -> None:
    # Given a step queued where nobody reads, while the compensation of the
    # step before it is held, so the saga stays COMPENSATING after the timeout
    app.conf.task_routes = {"timed.hang": {"queue": f"q-{ns}-nobody"}}
    saga = Saga("fenced", [shop.reserve, step(shop.hang, timeout=0.5)])
    with worker():
        res = saga.delay(qty=1, gates=["undo-timed.reserve"])
        wait_for(lambda: shop.entered("undo-timed.reserve"), 10, "the rollback to start")
        assert res.state().step("timed.hang").status is StepStatus.CANCELLED

        # When its message reaches a worker after all, without an `expires`
        # (say its clock runs behind) so that only the record can stop it
        raw = r.rpop(f"q-{ns}-nobody")
        message = json.loads(raw)
        message["headers"]["expires"] = None
        handled: list[str] = []

        def on_postrun(task_id: str | None = None, **_: Any) -> None:
            handled.append(str(task_id))

        signals.task_postrun.connect(on_postrun, weak=False)
        r.lpush(f"q-{ns}", json.dumps(message))
        wait_for(lambda: f"{res.id}:timed.hang" in handled, 10, "the worker to handle the message")
        signals.task_postrun.disconnect(on_postrun)
        assert res.status is SagaStatus.COMPENSATING  # only the fence was there to stop it

        # Then the fence stops it: the function never runs
        shop.open_gate("undo-timed.reserve")
        assert finished(res) is SagaStatus.COMPENSATED
    assert [e for e in shop.ledger_entries() if e[:2] == ["do", "timed.hang"]] == []
    hung = res.state().step("timed.hang")
    assert hung.status is StepStatus.CANCELLED and hung.attempts == 0
    assert hung.compensation_status is None


# -- cancel ----------------------------------------------------------------------


def test_cancel_a_running_saga_and_a_finished_one(app: Celery, shop: Any, worker) -> None:
    with worker():
        res = Saga("cancelled", [shop.reserve, shop.hang, shop.last]).delay(qty=1, gates=["hang"])
        wait_for(lambda: shop.entered("hang"), 10, "the second step to start")

        assert res.cancel() is True

        with pytest.raises(SagaCompensated) as info:
            res.get(timeout=patience(15))
        assert info.value.reason == "cancelled" and info.value.step == "timed.hang"
        state = res.state()
        assert state.step("timed.hang").status is StepStatus.UNKNOWN
        assert state.step("timed.hang").stopped_by == "cancelled"
        assert state.step("timed.last").status is StepStatus.WAITING
        assert res.cancel() is False  # finished

        done = Saga("done", [shop.reserve]).delay(qty=1)
        done.get(timeout=patience(10))
        assert done.cancel() is False
        assert done.status is SagaStatus.COMPLETED
        shop.open_gate("hang")
        wait_for(lambda: res.state().step("timed.hang").second_round, 10, "the late success's second round")
        wait_for(lambda: not [k for k in shop.left()[1] if k.startswith(res.id)], 10, "its effects to be undone")


def test_cancel_fences_a_step_still_queued(app: Celery, shop: Any) -> None:
    # No worker: the first step is still queued
    res = Saga("queued", [shop.reserve]).delay(qty=1)

    assert res.cancel() is True

    # Nothing ran, so nothing is compensated, and it ends at once
    assert res.status is SagaStatus.COMPENSATED
    first = res.state().step("timed.reserve")
    assert first.status is StepStatus.CANCELLED and first.stopped_by == "cancelled"
    assert first.compensation_status is None


# -- compensation attempts ----------------------------------------------------------


def test_compensation_attempt_past_its_deadline_counts_as_failed(app: Celery, shop: Any, worker) -> None:
    app.conf.saga_compensation_max_retries = 1
    saga = Saga("slow_undo", [step(shop.reserve, timeout=0.5), step(shop.hang, timeout=5)])
    announced: list[tuple[str, int, bool, str]] = []

    def on_failed(sender: Any = None, **kw: Any) -> None:
        announced.append((kw["step"], kw["attempt"], kw["gave_up"], kw["error"]))

    compensation_failed.connect(on_failed, weak=False)
    with worker():
        # The second step fails; the first step's compensation hangs past its 0.5 s deadline, twice
        res = saga.delay(qty=1, gates=["undo-timed.reserve"], fail_late=True)
        with pytest.raises(Exception, match="gave up"):
            res.get(timeout=patience(20))
        for _ in range(2):
            shop.open_gate("undo-timed.reserve")
    state = res.state()
    first = state.step("timed.reserve")
    assert state.status is SagaStatus.FAILED
    assert first.compensation_status is CompensationStatus.GAVE_UP
    assert first.compensation_attempts == 2
    assert "timeout" in (first.compensation_error or "")
    # Each missed attempt is announced like one that raised.
    compensation_failed.disconnect(on_failed)
    assert [a[:3] for a in announced] == [("timed.reserve", 1, False), ("timed.reserve", 2, True)]
    assert all(a[3].startswith("timeout: compensation attempt had no outcome 0.5s") for a in announced)


def test_lost_compensation_message_is_sent_again_after_its_deadline(
    app: Celery, shop: Any, r, worker, published: list[str], ns: str
) -> None:
    # Given the first compensation message of a step is lost: routed to a queue nobody reads
    blackhole = f"q-{ns}-blackhole"
    lost: list[str] = []

    def route(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any) -> Any:
        if name == "timed.release" and not lost:
            lost.append(name)
            return {"queue": blackhole}
        return None

    app.conf.task_routes = (route,)
    saga = Saga("lost_undo", [step(shop.reserve, timeout=1), shop.hang])
    with worker():
        res = saga.delay(qty=1, fail_late=True)
        # Then its deadline passes, the attempt counts as failed, and it is sent again
        with pytest.raises(SagaCompensated):
            res.get(timeout=patience(20))
    first = res.state().step("timed.reserve")
    assert first.compensation_status is CompensationStatus.COMPENSATED
    assert first.compensation_attempts == 2
    assert "timeout" in (first.compensation_error or "")
    assert published.count(f"{res.id}:timed.reserve:undo") == 2
    assert [e[:2] for e in shop.ledger_entries() if e[0] == "undo"] == [["undo", "timed.reserve"]]


# -- sweepers ---------------------------------------------------------------------


def test_racing_sweepers_send_each_compensation_once(
    app: Celery, shop: Any, worker, published: list[str], ns: str
) -> None:
    # Given 20 sagas whose second step sits in a queue nobody reads, and no sweeper in the worker
    app.conf.saga_sweeper = False
    app.conf.task_routes = {"timed.hang": {"queue": f"q-{ns}-nobody"}}
    saga = Saga("raced", [shop.reserve, step(shop.hang, timeout=0.5)])
    with worker():
        results = [saga.delay(qty=1) for _ in range(20)]
        wait_for(
            lambda: all(res.state().step("timed.reserve").status is StepStatus.COMPLETED for res in results),
            15,
            "every first step",
        )
        # When eight sweepers race over the same due deadlines
        stop = threading.Event()
        errors: list[BaseException] = []

        def race() -> None:
            while not stop.is_set():
                try:
                    sweep(app)
                except BaseException as exc:  # pragma: no cover - reported below
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=race) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            for res in results:
                assert finished(res) is SagaStatus.COMPENSATED
        finally:
            stop.set()
            for t in threads:
                t.join(patience(10))
    # Then each compensation was sent exactly once
    assert not errors
    for res in results:
        assert published.count(f"{res.id}:timed.reserve:undo") == 1
        assert res.state().step("timed.hang").status is StepStatus.CANCELLED
    assert shop.left() == (0, {})


def test_deadline_is_acted_on_within_a_second(app: Celery, shop: Any, worker, ns: str) -> None:
    # Steps routed to a queue nobody reads; the worker's sweeper runs every 0.5 s
    app.conf.task_routes = {"timed.reserve": {"queue": f"q-{ns}-nobody"}}
    # Deadlines spread over more than one sweep interval, so the measure covers its phases
    sagas = [Saga(f"latency{i}", [step(shop.reserve, timeout=0.3 + 0.07 * i)]) for i in range(12)]
    with worker():
        results = [saga.delay(qty=1) for saga in sagas]
        for res in results:
            assert finished(res) is SagaStatus.COMPENSATED
    latencies = []
    for res in results:
        first = res.state().step("timed.reserve")
        assert first.deadline is not None and first.ended_at is not None
        latencies.append((first.ended_at - first.deadline).total_seconds())
    latencies.sort()
    print(f"deadline latency: min {latencies[0]:.3f}s median {latencies[6]:.3f}s max {latencies[-1]:.3f}s")
    assert all(0 <= x < 1.5 for x in latencies), latencies


def test_sweep_drops_index_entries_of_sagas_gone_or_finished(app: Celery, shop: Any, r, prefix: str) -> None:
    store = store_for(app)
    res = Saga("gone", [step(shop.reserve, timeout=0.2)]).delay(qty=1)
    assert store.watched(res.id) is not None  # type: ignore[attr-defined]
    # The record disappears (as after its retention)
    r.delete(f"{prefix}:{{{res.id}}}")
    deadline = time.monotonic() + 5
    while store.watched(res.id) is not None and time.monotonic() < deadline:  # type: ignore[attr-defined]
        sweep(app)
    assert store.watched(res.id) is None  # type: ignore[attr-defined]


# -- configuration ----------------------------------------------------------------


def test_worker_start_warns_about_the_visibility_timeout(app: Celery, shop: Any, worker, caplog) -> None:
    app.conf.broker_transport_options = {"visibility_timeout": 10}
    app.conf.saga_compensation_retry_backoff_max = 60

    @saga_step(compensate=None, timeout=5)
    @app.task(shared=False, name="timed.acked", acks_late=True, time_limit=30)
    def acked() -> None: ...

    saga = Saga("acked", [acked])  # sagas are found through their (weak) registry: keep it
    lines = configuration_warnings(app)
    assert saga.plan().steps[0].timeout == 5.0
    assert any("saga_compensation_retry_backoff_max (60s)" in x and "visibility_timeout (10s)" in x for x in lines)
    assert any("'timed.acked': time_limit (30s)" in x for x in lines)
    assert any("saga step 'timed.acked'" in x and "timeout (5s)" in x for x in lines)

    with caplog.at_level(logging.WARNING, logger="celery_saga"), worker():
        pass
    assert any("visibility_timeout" in rec.getMessage() for rec in caplog.records)


def test_a_dead_sweepers_claim_comes_back_after_its_lease(app: Celery, shop: Any, r) -> None:
    # Given a due deadline claimed by a sweeper that dies before acting on it
    store = store_for(app)
    res = Saga("orphaned", [step(shop.reserve, timeout=0.2)]).delay(qty=1)
    deadline = res.state().step("timed.reserve").deadline
    assert deadline is not None
    wait_for(lambda: store_now(r) > deadline.timestamp(), 5, "the deadline to pass")
    claimed = store.claim_due(100, lease=0.5)
    assert res.id in [saga_id for saga_id, _ in claimed]

    # Then no other sweeper takes it while the lease lasts
    assert sweep(app).claimed == 0
    assert res.status is SagaStatus.PENDING

    # And once the lease runs out, another sweeper acts on it
    wait_for(lambda: sweep(app).acted, 5, "the claim to come back")
    assert res.status is SagaStatus.COMPENSATED
    assert res.state().step("timed.reserve").status is StepStatus.CANCELLED


def test_the_worker_sweeper_runs_while_the_worker_does(app: Celery, shop: Any, worker) -> None:
    def sweepers() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("celery_saga-sweeper@") and t.is_alive()]

    before = sweepers()
    with worker():
        assert len(sweepers()) == len(before) + 1
    wait_for(lambda: sweepers() == before, 10, "the sweeper to stop with its worker")
