"""Deadlines, unknown outcomes and commutative compensation on real `celery worker` prefork subprocesses.

The same guarantees as test_timeouts.py, where an in-process worker cannot
show them: a whole worker SIGKILLed mid-step, a pool child killed, a queue
nobody consumes until a worker starts later, a compensation message lost
from the broker, and sweepers racing as separate processes.

Each test gets its own key prefix (saga records, ledger, gates and, through
kombu's ``global_keyprefix``, its queues and unacked hash). The step tasks
are the ``proc.t.*`` tasks of tests/proc_app.py: they record their effect
under their idempotency key, and their compensation undoes it by looking it
up, so ``left() == (0, {})`` means no forward effect is left. Steps wait on
gates in Redis; tests wait on conditions with a deadline, never on sleeps.
Subprocesses run in their own session and are killed by PID and process group.
"""

from __future__ import annotations

import json
import subprocess
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import pytest

from celery_saga import CompensationStatus, Saga, SagaCompensated, SagaResult, SagaStatus, StepStatus, step
from celery_saga.messages import task_id
from tests.helpers import drained, finished, patience, queue_key, store_now, unacked, wait_for

Popen = subprocess.Popen[bytes]


def undo_entry(res: SagaResult, name: str, round_: int, result: Any) -> list[Any]:
    """The ledger entry of a compensation: blind (result None, not known) or with its result."""
    key = f"{res.id}:{name}:undo" if round_ == 1 else f"{res.id}:{name}:undo:{round_}"
    return ["undo", name, round_, result is not None, result, key]


def do_entry(res: SagaResult, name: str) -> list[Any]:
    return ["do", name, f"{res.id}:{name}"]


def published(shop: SimpleNamespace, task_id: str) -> list[int]:
    """PIDs of the subprocesses that published a message with ``task_id``."""
    return [pid for tid, pid in shop.entries("published") if tid == task_id]


# -- 1. a step that hangs past its deadline ----------------------------------------------


def test_hung_step_is_compensated_blind_then_again_with_its_late_result(env, procs, shop, r) -> None:
    # Given a prefork worker, with its sweeper, and a saga whose second step
    # has a 2 s deadline
    procs.worker()
    saga = Saga("t_hung", [shop.t_reserve, step(shop.t_hang, timeout=2)])

    # When the second step blocks on a gate past its deadline
    res = saga.delay(qty=3, gates=["proc.t.hang"])
    wait_for(lambda: shop.entered("proc.t.hang"), 30, "the step to start")

    # Then the saga stops waiting: the step's outcome is unknown, so it is
    # compensated blind (step_result None, result not known), then the step
    # before it with its real result; the saga ends COMPENSATED by timeout
    with pytest.raises(SagaCompensated) as info:
        res.get(timeout=patience(30))
    assert info.value.reason == "timeout" and info.value.step == "proc.t.hang"
    assert "timeout: step proc.t.hang had no outcome 2s" in (info.value.error or "")
    state = res.state()
    hung = state.step("proc.t.hang")
    assert hung.status is StepStatus.UNKNOWN and hung.timed_out and hung.attempts == 1
    assert hung.compensation_status is CompensationStatus.COMPENSATED and hung.compensation_attempts == 1
    assert hung.late_status is None and hung.second_round is None
    assert shop.entries("ledger") == [
        do_entry(res, "proc.t.reserve"),
        undo_entry(res, "proc.t.hang", 1, None),
        undo_entry(res, "proc.t.reserve", 1, {"proc.t.reserve_qty": 3}),
    ]
    assert shop.left() == (0, {})

    # When the gate opens and the step succeeds late
    shop.open_gate("proc.t.hang")

    # Then its late success is compensated again, in a second round, with its
    # real result and its own idempotency key
    wait_for(
        lambda: (s := res.state().step("proc.t.hang").second_round) and s.status is CompensationStatus.COMPENSATED,
        30,
        "the second compensation round",
    )
    wait_for(lambda: drained(r, env.prefix, env.queue), 15, "the queue to drain")
    assert shop.entries("ledger")[3:] == [
        do_entry(res, "proc.t.hang"),
        undo_entry(res, "proc.t.hang", 2, {"proc.t.hang_qty": 3}),
    ]
    state = res.state()
    hung = state.step("proc.t.hang")
    assert hung.status is StepStatus.UNKNOWN  # the first outcome stays recorded
    assert hung.late_status is StepStatus.COMPLETED and hung.late_result == {"proc.t.hang_qty": 3}
    assert hung.second_round is not None and hung.second_round.attempts == 1
    assert state.status is SagaStatus.COMPENSATED and state.reason == "timeout"
    assert len(published(shop, task_id(res.id, "proc.t.hang", undo=True, round=2))) == 1
    # No forward effect is left.
    assert shop.left() == (0, {})


# -- 2. a step nobody consumes until after its deadline -----------------------------------


@pytest.mark.parametrize("expires", ["kept", "dropped"])
def test_step_queued_past_its_deadline_never_runs_when_a_consumer_comes(env, procs, shop, r, expires) -> None:
    # Given a worker on the test's queue only, and a saga whose second step is
    # routed to a queue with no consumer. With "dropped", the step's message
    # has no `expires` (as when the consumer's clock runs behind), so only the
    # saga record can keep it from running.
    procs.worker()
    later = f"{env.queue}-later"
    saga = Saga("t_unconsumed", [shop.t_reserve, step(shop.t_hang.s().set(queue=later), timeout=2)])
    data: dict[str, Any] = {"qty": 2, "gates": ["undo-proc.t.reserve"]}
    if expires == "dropped":
        data["drop_expires"] = "proc.t.hang"
    res = saga.delay(**data)
    hang_id = f"{res.id}:proc.t.hang"

    # When its deadline passes, then it is fenced (CANCELLED: it never started)
    # and the saga rolls back; the first step's compensation waits on a gate,
    # so the saga is still COMPENSATING, and the step's message still queued
    wait_for(lambda: shop.entered("undo-proc.t.reserve"), 30, "the rollback to start")
    state = res.state()
    assert state.status is SagaStatus.COMPENSATING and state.reason == "timeout"
    hang = state.step("proc.t.hang")
    assert hang.status is StepStatus.CANCELLED and hang.timed_out and hang.attempts == 0
    assert r.llen(queue_key(env.prefix, later)) == 1

    # When a worker consuming that queue starts
    procs.worker(queues=later)

    # Then it takes the message and never calls the step's function: Celery
    # drops it as expired, or the wrapper finds the step fenced and skips it
    def taken() -> list[list[Any]]:
        return [e for e in shop.entries("revoked") + shop.entries("postrun") if e[0] == hang_id]

    assert wait_for(taken, 30, "the message to be taken") in ([[hang_id, True]], [[hang_id, "IGNORED"]])
    assert r.llen(queue_key(env.prefix, later)) == 0
    assert [e for e in shop.entries("ledger") if e[1] == "proc.t.hang"] == []

    # When the rollback ends
    shop.open_gate("undo-proc.t.reserve")

    # Then only the step that ran was compensated, and nothing is left
    assert finished(res) is SagaStatus.COMPENSATED
    assert shop.entries("ledger") == [
        do_entry(res, "proc.t.reserve"),
        undo_entry(res, "proc.t.reserve", 1, {"proc.t.reserve_qty": 2}),
    ]
    hang = res.state().step("proc.t.hang")
    assert hang.status is StepStatus.CANCELLED and hang.attempts == 0 and hang.compensation_status is None
    assert hang.late_status is None
    assert shop.left() == (0, {})


# -- 3. a whole worker SIGKILLed mid-step --------------------------------------------------


def test_worker_killed_mid_step_acks_late_is_redelivered_and_completes(env, procs, shop, r) -> None:
    # Given workers whose broker visibility timeout (2 s) is well below the
    # step's deadline (20 s), and an acks_late step blocking on a gate
    first = procs.worker(visibility=2)
    saga = Saga("t_redelivered", [shop.t_reserve, step(shop.t_hang_acked, timeout=20)])
    res = saga.delay(qty=2, gates=["proc.t.hang_acked"])
    wait_for(lambda: shop.entered("proc.t.hang_acked"), 30, "the step to start")

    # When the whole worker (main process and pool children) is SIGKILLed
    procs.kill(first)

    # Then the step is still RUNNING, and its message not acknowledged
    state = res.state()
    assert state.status is SagaStatus.RUNNING
    acked = state.step("proc.t.hang_acked")
    assert acked.status is StepStatus.RUNNING
    assert unacked(r, env.prefix) + r.llen(queue_key(env.prefix, env.queue)) == 1
    before, attempts = len(shop.entered("proc.t.hang_acked")), acked.attempts

    # When a worker starts again: kombu restores the message after the
    # visibility timeout, and the new worker gets it, marked redelivered
    second = procs.worker(visibility=2)
    wait_for(lambda: len(shop.entered("proc.t.hang_acked")) > before, 30, "the redelivered copy to start")
    gone, again = shop.entered("proc.t.hang_acked")[0], shop.entered("proc.t.hang_acked")[-1]
    assert gone[1:] == [first.pid, False] and again[1:] == [second.pid, True]
    shop.open_gate("proc.t.hang_acked")

    # Then the saga completes: the redelivered copy ran the step, once
    data = res.get(timeout=patience(30))
    assert data["proc.t.hang_acked_qty"] == 2
    state = res.state()
    acked = state.step("proc.t.hang_acked")
    # The redelivered copy began once more: it was not taken for a duplicate.
    assert acked.status is StepStatus.COMPLETED and acked.attempts == attempts + 1
    assert acked.stopped_by is None and acked.compensation_status is None
    assert shop.entries("ledger") == [do_entry(res, "proc.t.reserve"), do_entry(res, "proc.t.hang_acked")]
    assert shop.left() == (4, {f"{res.id}:proc.t.reserve": "2", f"{res.id}:proc.t.hang_acked": "2"})


def test_worker_killed_mid_step_without_acks_late_is_compensated_by_the_deadline(env, procs, shop, r) -> None:
    # Given a step that is not acks_late (its message is acknowledged when it
    # starts) with a 2 s deadline, blocking on a gate
    first = procs.worker()
    saga = Saga("t_lost", [shop.t_reserve, step(shop.t_hang, timeout=2)])
    res = saga.delay(qty=5, gates=["proc.t.hang"])
    wait_for(lambda: shop.entered("proc.t.hang"), 30, "the step to start")
    wait_for(lambda: drained(r, env.prefix, env.queue), 15, "the step's message to be acknowledged")

    # When the whole worker is SIGKILLed
    procs.kill(first)

    # Then the message is gone with it, and the step stays RUNNING
    assert res.state().step("proc.t.hang").status is StepStatus.RUNNING
    assert drained(r, env.prefix, env.queue)

    # When another worker starts, its sweeper acts on the passed deadline
    procs.worker()

    # Then the step's outcome is unknown: it is compensated blind, then the
    # step before it with its result, and the saga ends COMPENSATED by timeout
    assert finished(res) is SagaStatus.COMPENSATED
    state = res.state()
    assert state.reason == "timeout" and state.failed_step == "proc.t.hang"
    hang = state.step("proc.t.hang")
    assert hang.status is StepStatus.UNKNOWN and hang.timed_out and hang.attempts == 1
    assert hang.deadline is not None and hang.ended_at is not None and hang.ended_at >= hang.deadline
    assert hang.compensation_status is CompensationStatus.COMPENSATED and hang.compensation_attempts == 1
    wait_for(lambda: drained(r, env.prefix, env.queue), 15, "the queue to drain")
    assert shop.entries("ledger") == [
        do_entry(res, "proc.t.reserve"),
        undo_entry(res, "proc.t.hang", 1, None),
        undo_entry(res, "proc.t.reserve", 1, {"proc.t.reserve_qty": 5}),
    ]
    # The step's function never ran again.
    assert len(shop.entered("proc.t.hang")) == 1
    assert shop.left() == (0, {})


# -- 4. a pool child killed mid-step, with the message requeued ---------------------------------


def test_pool_child_killed_with_reject_on_worker_lost_reruns_the_step(env, procs, shop, r) -> None:
    # Given an acks_late step with reject_on_worker_lost=True and a deadline
    # of 20 s, whose pool child SIGKILLs itself on its first run
    procs.worker()
    saga = Saga("t_requeued", [shop.t_reserve, step(shop.t_requeue, timeout=20)])

    # When it runs
    res = saga.delay(qty=1, die_in="proc.t.requeue")

    # Then Celery requeues the message (WorkerLostError is not a failure here),
    # the step stays RUNNING, and the redelivered copy runs it to completion
    data = res.get(timeout=patience(30))
    assert data["proc.t.requeue_qty"] == 1
    state = res.state()
    requeued = state.step("proc.t.requeue")
    assert requeued.status is StepStatus.COMPLETED and requeued.attempts == 2
    assert requeued.stopped_by is None and requeued.error is None and requeued.compensation_status is None
    assert state.error is None
    assert shop.entries("ledger") == [
        do_entry(res, "proc.t.reserve"),
        ["dying", "proc.t.requeue"],
        do_entry(res, "proc.t.requeue"),
    ]
    assert [f for f in shop.entries("failures") if f[0] == f"{res.id}:proc.t.requeue"] == []
    assert shop.left() == (2, {f"{res.id}:proc.t.reserve": "1", f"{res.id}:proc.t.requeue": "1"})


# -- 5. a lost compensation message ----------------------------------------------------


def test_lost_compensation_message_is_sent_again_after_its_deadline(env, procs, shop, r) -> None:
    # Given a saga whose first step (2 s deadline) is compensated by a task
    # routed to a queue no worker consumes yet, and whose second step fails
    procs.worker()
    elsewhere = f"{env.queue}-undo"
    saga = Saga("t_lost_undo", [step(shop.t_reserve, compensate=shop.t_undo_elsewhere, timeout=2), shop.t_last])
    res = saga.delay(qty=4, fail={"proc.t.last": "declined"})
    undo_id = task_id(res.id, "proc.t.reserve", undo=True)
    wait_for(lambda: r.llen(queue_key(env.prefix, elsewhere)) == 1, 30, "the compensation to be sent")

    # When its message is lost from the broker before anyone consumes it
    assert r.delete(queue_key(env.prefix, elsewhere)) == 1
    state = res.state()
    assert state.status is SagaStatus.COMPENSATING
    assert state.step("proc.t.reserve").compensation_status is CompensationStatus.DISPATCHED
    assert state.step("proc.t.reserve").compensation_attempts == 0

    # and a worker for that queue starts
    procs.worker(queues=elsewhere)

    # Then after the attempt's deadline it counts as failed, is sent again,
    # and the second message compensates the step, once
    assert finished(res) is SagaStatus.COMPENSATED
    reserve = res.state().step("proc.t.reserve")
    assert reserve.compensation_status is CompensationStatus.COMPENSATED
    assert reserve.compensation_attempts == 2
    assert "timeout" in (reserve.compensation_error or "")
    assert len(published(shop, undo_id)) == 2
    assert shop.entries("ledger") == [
        do_entry(res, "proc.t.reserve"),
        undo_entry(res, "proc.t.reserve", 1, {"proc.t.reserve_qty": 4}),
    ]
    assert res.state().step("proc.t.last").status is StepStatus.FAILED
    assert shop.left() == (0, {})


# -- 6. sweeper processes racing -----------------------------------------------------------


def test_racing_sweeper_processes_send_each_compensation_once(env, procs, shop, r) -> None:
    # Given a worker without a sweeper, and three standalone sweeper processes
    # polling every 50 ms
    procs.worker(sweeper=False)
    sweepers = [procs.sweeper() for _ in range(3)]
    for _, log in sweepers:
        wait_for(lambda log=log: "sweeping saga deadlines" in log.read_text(errors="replace"), 30, "a sweeper to run")
    nobody = f"{env.queue}-nobody"
    saga = Saga("t_raced", [shop.t_reserve, step(shop.t_hang.s().set(queue=nobody), timeout=1)])

    # When 24 sagas' second steps sit in a queue nobody reads, and their
    # deadlines come due while the sweepers race
    results = [saga.delay(qty=1) for _ in range(24)]

    # Then every saga is rolled back: each compensation was published exactly
    # once, by one of the sweeper processes
    for res in results:
        assert finished(res) is SagaStatus.COMPENSATED
    wait_for(lambda: drained(r, env.prefix, env.queue), 15, "the queue to drain")
    sweeper_pids = {p.pid for p, _ in sweepers}
    publishers = set()
    for res in results:
        pids = published(shop, task_id(res.id, "proc.t.reserve", undo=True))
        assert len(pids) == 1 and pids[0] in sweeper_pids, pids
        publishers.add(pids[0])
        state = res.state()
        assert state.reason == "timeout"
        hang = state.step("proc.t.hang")
        assert hang.status is StepStatus.CANCELLED and hang.timed_out and hang.attempts == 0
        assert state.step("proc.t.reserve").compensation_attempts == 1
    print(f"compensations published by {len(publishers)} of 3 sweepers")
    undos = [e for e in shop.entries("ledger") if e[0] == "undo"]
    assert sorted(e[5] for e in undos) == sorted(f"{res.id}:proc.t.reserve:undo" for res in results)
    assert shop.left() == (0, {})


# -- 7. cancel -------------------------------------------------------------------------


def test_cancel_a_running_saga_and_a_finished_one(env, procs, shop, r) -> None:
    procs.worker()
    saga = Saga("t_cancel", [shop.t_reserve, shop.t_hang, shop.t_last])

    # Given a saga whose second step is running (blocked on a gate)
    res = saga.delay(qty=1, gates=["proc.t.hang"])
    wait_for(lambda: shop.entered("proc.t.hang"), 30, "the second step to start")

    # When it is cancelled
    assert res.cancel() is True

    # Then the running step's outcome is unknown: it is compensated blind, the
    # first step with its result, and the last step never runs
    with pytest.raises(SagaCompensated) as info:
        res.get(timeout=patience(30))
    assert info.value.reason == "cancelled" and info.value.step == "proc.t.hang"
    state = res.state()
    hang = state.step("proc.t.hang")
    assert hang.status is StepStatus.UNKNOWN and hang.stopped_by == "cancelled" and not hang.timed_out
    assert state.step("proc.t.last").status is StepStatus.WAITING
    assert shop.entries("ledger") == [
        do_entry(res, "proc.t.reserve"),
        undo_entry(res, "proc.t.hang", 1, None),
        undo_entry(res, "proc.t.reserve", 1, {"proc.t.reserve_qty": 1}),
    ]
    # A finished saga cannot be cancelled.
    assert res.cancel() is False

    # Given a saga that completed
    done = Saga("t_done", [shop.t_reserve, shop.t_last]).delay(qty=5)
    assert done.get(timeout=patience(30))["proc.t.last_qty"] == 5

    # When it is cancelled, then nothing happens
    assert done.cancel() is False
    assert done.status is SagaStatus.COMPLETED

    # When the cancelled saga's step succeeds late, then its effect is undone too
    shop.open_gate("proc.t.hang")
    wait_for(
        lambda: (s := res.state().step("proc.t.hang").second_round) and s.status is CompensationStatus.COMPENSATED,
        30,
        "the late success's second round",
    )
    wait_for(lambda: drained(r, env.prefix, env.queue), 15, "the queue to drain")
    assert res.status is SagaStatus.COMPENSATED
    assert done.status is SagaStatus.COMPLETED
    # Only the completed saga's effects are left.
    assert shop.left() == (10, {f"{done.id}:proc.t.reserve": "5", f"{done.id}:proc.t.last": "5"})
    assert [e for e in shop.entries("ledger") if e[0] == "undo" and done.id in e[5]] == []


# -- 8. sagas started while no worker runs -----------------------------------------------------


def test_sagas_started_with_no_worker_complete_or_time_out_when_one_starts(env, procs, shop, r) -> None:
    # Given two sagas started while no worker runs: one with 30 s deadlines,
    # one whose first step has a 1 s deadline
    waits = Saga("t_waits", [step(shop.t_reserve, timeout=30), step(shop.t_last, timeout=30)]).delay(qty=1)
    expires = Saga("t_expires", [step(shop.t_reserve, timeout=1), step(shop.t_last, timeout=30)]).delay(qty=7)

    # When the second one's deadline passes, with no worker and no sweeper,
    # then nothing acts on it: both wait, PENDING, their messages queued
    deadline = expires.state().step("proc.t.reserve").deadline
    assert deadline is not None
    wait_for(lambda: store_now(r) > deadline.timestamp() + 0.2, 10, "the deadline to pass")
    assert waits.status is SagaStatus.PENDING and expires.status is SagaStatus.PENDING
    assert r.llen(queue_key(env.prefix, env.queue)) == 2

    # When a worker starts
    procs.worker()

    # Then the first completes, and the second is rolled back by the deadline
    # (its step never ran, so nothing is compensated)
    assert waits.get(timeout=patience(30))["proc.t.last_qty"] == 1
    assert finished(expires) is SagaStatus.COMPENSATED
    state = expires.state()
    assert state.reason == "timeout" and state.failed_step == "proc.t.reserve"
    first = state.step("proc.t.reserve")
    assert first.status is StepStatus.CANCELLED and first.timed_out and first.attempts == 0
    assert first.compensation_status is None
    assert state.step("proc.t.last").status is StepStatus.WAITING
    wait_for(lambda: drained(r, env.prefix, env.queue), 15, "the queue to drain")
    assert shop.entries("ledger") == [do_entry(waits, "proc.t.reserve"), do_entry(waits, "proc.t.last")]
    assert shop.left() == (2, {f"{waits.id}:proc.t.reserve": "1", f"{waits.id}:proc.t.last": "1"})


def test_a_step_message_expires_at_its_deadline(env, shop, r) -> None:
    # Given no worker runs, a saga whose first step has a 2 s deadline
    res = Saga("t_expiry", [step(shop.t_reserve, timeout=2)]).delay(qty=1)

    # Then its queued message expires when the step's deadline passes
    message = json.loads(r.lindex(queue_key(env.prefix, env.queue), 0) or "{}")
    expires = datetime.fromisoformat(message["headers"]["expires"])
    deadline = res.state().step("proc.t.reserve").deadline
    assert deadline is not None
    assert abs((expires - deadline).total_seconds()) < 1.0, (expires, deadline)
