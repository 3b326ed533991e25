"""Sagas on real `celery worker` prefork subprocesses: crashes, lost pool children, time limits.

Each test gets its own key prefix (saga records, ledger, gates and, through
kombu's ``global_keyprefix``, its queue and unacked hash) and its own queue.
Workers run in their own session and are stopped by PID and process group.
"""

from __future__ import annotations

import json
import signal
from typing import Any

import pytest
import redis

from celery_saga import SagaCompensated, SagaResult, SagaStatus
from tests.helpers import Ledger, drained, finished, kombu_prefix, patience, wait_for


def _failures(r: redis.Redis, prefix: str) -> list[list[Any]]:
    return [json.loads(x) for x in r.lrange(f"{prefix}:failures", 0, -1)]


def test_prefork_worker_happy_and_compensated(env, procs, shop, r) -> None:
    ledger = Ledger(r, f"{env.prefix}:ledger")
    procs.worker()

    # Happy path: the results of each stage flow into the next one.
    ok = shop.sequential.delay(order_id=7)
    data = ok.get(timeout=patience(30))
    assert data["reservation"] == "r-7"
    assert data["payment"] == "p-7-r-7"
    assert data["tracking"] == "t-7-p-7-r-7"
    assert ledger.actions() == ["do:proc.one", "do:proc.two", "do:proc.three"]

    # Failure of the last step: the earlier ones are undone, latest first.
    bad = shop.sequential.delay(order_id=8, fail={"proc.three": "out of stock"})
    with pytest.raises(SagaCompensated) as info:
        bad.get(timeout=patience(30))
    assert info.value.step == "proc.three"
    assert info.value.error == "RuntimeError: out of stock"
    entries = ledger.entries()[3:]
    assert [f"{e[0]}:{e[1]}" for e in entries] == ["do:proc.one", "do:proc.two", "undo:proc.two", "undo:proc.one"]
    # Each compensation got its own step's result.
    assert entries[2][2] == {"payment": "p-8-r-8"}
    assert entries[3][2] == {"reservation": "r-8"}
    state = bad.state()
    assert state.step("proc.three").compensation_status is None


@pytest.mark.timeout(90)
# The publish after the transition (RabbitMQ, another Redis): with the broker on the store's Redis,
# the transition pushes the stage itself (tests/test_guarantees.py, tests/test_enqueue.py).
@pytest.mark.saga_conf({"saga_enqueue_in_transition": False})
def test_worker_killed_between_record_and_publish(env, procs, shop, r) -> None:
    # Given workers with a visibility timeout of 2 s, so a dead worker's
    # acks_late message comes back quickly, and a hook that SIGKILLs the whole
    # worker while step 1's pool child publishes step 2, that is after step 1's
    # "done" was recorded.
    ledger = Ledger(r, f"{env.prefix}:ledger")
    kp = kombu_prefix(env.prefix)
    first = procs.worker(visibility=2)
    res = shop.sequential.delay(order_id=3, crash_worker_before="proc.two")

    # When the worker dies mid-publish
    assert procs.wait_dead(first, timeout=30) == -signal.SIGKILL
    # Then step 1's outcome is recorded, step 2 is marked dispatched but was
    # never published, and step 1's message is still unacknowledged.
    state = res.state()
    assert state.status is SagaStatus.RUNNING
    assert state.step("proc.one").status.value == "COMPLETED"
    assert state.step("proc.two").status.value == "DISPATCHED"
    assert ledger.actions() == ["do:proc.one", "crash:proc.two"]
    assert r.llen(f"{kp}{env.queue}") == 0
    assert r.hlen(f"{kp}unacked") == 1

    # When a new worker starts, kombu restores step 1's message after the
    # visibility timeout; its begin finds the outcome recorded and re-drives.
    procs.worker(visibility=2)
    data = res.get(timeout=patience(40))

    # Then the saga completes, and step 1's function ran exactly once.
    assert data["tracking"] == "t-3-p-3-r-3"
    assert ledger.actions() == ["do:proc.one", "crash:proc.two", "do:proc.two", "do:proc.three"]
    assert res.state().step("proc.one").attempts == 1


def test_saga_started_with_no_worker_completes_when_one_starts(env, procs, shop, r) -> None:
    kp = kombu_prefix(env.prefix)
    # Given a saga started while nothing consumes its queue
    res = shop.sequential.delay(order_id=5)

    # Then it waits, PENDING, with its first step's message in the queue
    assert res.state().status is SagaStatus.PENDING
    assert res.state().step("proc.one").status.value == "DISPATCHED"
    assert r.llen(f"{kp}{env.queue}") == 1
    assert not res.ready()

    # When a worker starts, it completes
    procs.worker()
    assert res.get(timeout=patience(30))["tracking"] == "t-5-p-5-r-5"
    assert Ledger(r, f"{env.prefix}:ledger").actions() == ["do:proc.one", "do:proc.two", "do:proc.three"]


def test_pool_child_killed_mid_step_compensates(env, procs, shop, r) -> None:
    ledger = Ledger(r, f"{env.prefix}:ledger")
    procs.worker()

    # When the third step's pool child is SIGKILLed mid-step
    res = shop.dies.delay(order_id=4, die_in="proc.die")

    # Then Celery reports WorkerLostError in the main process. The step may
    # have had its effect before it died, so it is compensated blind (with
    # step_result=None), then the steps before it, latest first
    assert finished(res) is SagaStatus.COMPENSATED
    state = res.state()
    assert state.failed_step == "proc.die"
    assert "WorkerLostError" in (state.error or "")
    assert ledger.entries() == [
        ["do", "proc.one"],
        ["do", "proc.two"],
        ["dying", "proc.die"],
        ["undo", "proc.die", None],
        ["undo", "proc.two", {"payment": "p-4-r-4"}],
        ["undo", "proc.one", {"reservation": "r-4"}],
    ]
    died = state.step("proc.die")
    assert died.status.value == "UNKNOWN" and died.stopped_by == "lost"
    assert died.compensation_status is not None and died.compensation_status.value == "COMPENSATED"
    # The last step never ran.
    assert state.step("proc.three").status.value == "WAITING"
    wait_for(
        lambda: [f[0] for f in _failures(r, env.prefix) if f[1] == "WorkerLostError"] == [f"{res.id}:proc.die"],
        10,
        "task_failure with WorkerLostError in the main process",
    )


def test_hard_time_limit_compensates(env, procs, shop, r) -> None:
    ledger = Ledger(r, f"{env.prefix}:ledger")
    procs.worker()

    # When a step with time_limit=1 blocks on a gate that never opens
    res = shop.limited.delay(order_id=6, block_in="proc.slow")
    shop.gates.wait_entered("proc.slow", timeout=30)

    # Then the hard time limit kills it mid-way and the saga rolls back
    assert finished(res) is SagaStatus.COMPENSATED
    state = res.state()
    assert state.failed_step == "proc.slow"
    assert "TimeLimitExceeded" in (state.error or "")
    assert state.reason == "timeout"

    # Celery 5.7 fires task_failure twice for a hard time limit: wait for
    # both to be handled, and for any message they might have sent to be done.
    slow_id = f"{res.id}:proc.slow"
    wait_for(
        lambda: [f[0] for f in _failures(r, env.prefix) if f[1] == "TimeLimitExceeded"] == [slow_id, slow_id],
        15,
        "task_failure to fire twice for the hard time limit",
    )
    wait_for(lambda: drained(r, env.prefix, env.queue), 15, "the queue to drain")

    # Its outcome is unknown: it is compensated blind, once, then each
    # earlier step exactly once, latest first.
    assert ledger.actions() == ["do:proc.one", "do:proc.two", "undo:proc.slow", "undo:proc.two", "undo:proc.one"]
    assert ledger.entries()[2] == ["undo", "proc.slow", None]
    slow = res.state().step("proc.slow")
    assert slow.status.value == "UNKNOWN" and slow.timed_out
    assert slow.compensation_attempts == 1
    assert state.step("proc.one").compensation_attempts == 1
    assert state.step("proc.two").compensation_attempts == 1


@pytest.mark.timeout(90)
# The hook kills as a message is published: here, after the transition (see above).
@pytest.mark.saga_conf({"saga_enqueue_in_transition": False})
def test_a_worker_killed_while_a_child_saga_runs_leaves_the_trip_to_complete(env, procs, shop, r) -> None:
    # Given a saga whose second step is a child saga, and a worker that dies as the child publishes its last step
    ledger = Ledger(r, f"{env.prefix}:ledger")
    first = procs.worker(visibility=2)
    res = shop.nested.delay(order_id=9, crash_worker_before="proc.three")
    assert procs.wait_dead(first, timeout=30) == -signal.SIGKILL
    # When another worker takes over (the dead one's message comes back after its visibility timeout)
    procs.worker(visibility=2)
    # Then the child saga completes, and with it the parent, each step's function run once
    data = res.get(timeout=patience(40))
    assert data["tracking"] == "t-9-p-9-r-9"
    assert ledger.actions() == ["do:proc.one", "do:proc.two", "crash:proc.three", "do:proc.three"]
    inner = SagaResult(f"{res.id}:proc_inner", app=shop.app).state()
    assert (inner.status, inner.parent_id) == (SagaStatus.COMPLETED, res.id)


def test_a_pool_child_killed_in_a_child_saga_rolls_back_the_child_then_the_parent(env, procs, shop, r) -> None:
    ledger = Ledger(r, f"{env.prefix}:ledger")
    procs.worker()
    # When the child saga's second step's pool child is SIGKILLed mid-step
    res = shop.nested_dies.delay(order_id=10, die_in="proc.die")
    # Then the child rolls back (the lost step blind, then the one before it), and the parent undoes its own step
    with pytest.raises(SagaCompensated) as info:
        res.get(timeout=patience(40))
    assert info.value.step == "proc_inner_die" and "WorkerLostError" in (info.value.error or "")
    inner = SagaResult(f"{res.id}:proc_inner_die", app=shop.app).state()
    assert (inner.status, inner.failed_step) == (SagaStatus.COMPENSATED, "proc.die")
    assert [e[:2] for e in ledger.entries()] == [
        ["do", "proc.one"],
        ["do", "proc.two"],
        ["dying", "proc.die"],
        ["undo", "proc.die"],
        ["undo", "proc.two"],
        ["undo", "proc.one"],
    ]


def test_a_pool_child_killed_in_a_step_past_the_pivot_is_sent_again_not_compensated(env, procs, shop, r) -> None:
    ledger = Ledger(r, f"{env.prefix}:ledger")
    procs.worker()
    # When the pool child of a step after the pivot is SIGKILLed mid-step (once)
    res = shop.pivoted.delay(order_id=11, die_in="proc.die")
    # Then the step is sent again, runs, and the saga completes: nothing is undone
    data = res.get(timeout=patience(40))
    assert data["tracking"] == "t-11-p-11-r-11"
    assert [e[:2] for e in ledger.entries()] == [
        ["do", "proc.one"],
        ["do", "proc.two"],
        ["dying", "proc.die"],
        ["do", "proc.die"],
        ["do", "proc.three"],
    ]
    step = res.state().step("proc.die")
    assert (step.forward_retries, step.attempts) == (1, 2) and "WorkerLostError" in (step.error or "")
