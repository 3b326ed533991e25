"""The guarantees and limits of docs/guarantees.md that no other test module checks.

Behaviour runs on an in-process worker (threads pool) with the deadline
tasks of tests/timed_shop.py: a forward step records its effect under its
idempotency key, so ``shop.left()`` is what forward effect is left.

Soft time limits, lost pool children and killed workers run on real
``celery worker`` prefork subprocesses of tests/proc_app.py. A worker that
must die at one crash point is the crash-point explorer's own worker
(``python -m celery_saga.testing.crash_worker``): it SIGKILLs its whole
process group when the saga it is armed for reaches that point. Each test
gets its own key prefix and queue; subprocesses are stopped by PID and
process group. Tests wait on conditions and gates in Redis, never on sleeps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery, signals

from celery_saga import (
    CompensationStatus,
    Saga,
    SagaCompensated,
    SagaNotFound,
    SagaStatus,
    StepStatus,
    compensation_failed,
    current_step,
    parallel,
    saga_failed,
    step,
)
from celery_saga.messages import publish_compensation, task_id
from celery_saga.redis_server import RedisServer
from celery_saga.stores import store_for
from celery_saga.testing.crash_worker import CrashAt
from celery_saga.worker.wrapper import CrashPoint
from tests import proc_app, timed_shop
from tests.helpers import drained, finished, patience, queue_key, store_now, wait_for
from tests.subprocs import ROOT, Popen, Procs, proc_env, running, worker_args

# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def shop(app: Celery, r: redis.Redis, prefix: str) -> SimpleNamespace:
    return timed_shop.build(app, r, prefix)


@pytest.fixture
def published() -> Iterator[list[str]]:
    """Task ids of every message this process publishes (the in-process worker's included)."""
    ids: list[str] = []
    lock = threading.Lock()

    def record(headers: dict[str, Any] | None = None, **_: Any) -> None:
        with lock:
            ids.append(str((headers or {}).get("id")))

    signals.before_task_publish.connect(record, weak=False)
    yield ids
    signals.before_task_publish.disconnect(record)


@pytest.fixture
def handled() -> Iterator[list[tuple[str, str]]]:
    """``(task_id, state)`` of every task the in-process worker has finished with, in order."""
    done: list[tuple[str, str]] = []
    lock = threading.Lock()

    def record(task_id: str | None = None, state: str | None = None, **_: Any) -> None:
        with lock:
            done.append((str(task_id), str(state)))

    signals.task_postrun.connect(record, weak=False)
    yield done
    signals.task_postrun.disconnect(record)


Processes = Callable[..., tuple[SimpleNamespace, Procs, SimpleNamespace]]


@pytest.fixture
def processes(redis_url: str, ns: str, tmp_path: Path) -> Iterator[Processes]:
    """``processes(conf)``: the test's env, its subprocesses and its side of tests/proc_app.py.

    ``conf`` is given to the app on both sides (task annotations, say). The
    subprocesses are killed, then every key under the test's prefix deleted.
    """
    prefix = f"sagaproc-{ns}"
    with contextlib.ExitStack() as stack:

        def start(conf: dict[str, Any] | None = None) -> tuple[SimpleNamespace, Procs, SimpleNamespace]:
            env = proc_env(redis_url, prefix, f"q-{ns}", conf)
            s = proc_app.create(env.redis_url, env.prefix, env.queue, saga_conf=env.saga_conf)
            stack.callback(s.gate_client.close)
            stack.callback(s.client.close)
            stack.callback(s.app.close)
            procs = stack.enter_context(running(Procs(tmp_path, env, ns)))
            return env, procs, s

        yield start
    with redis.Redis.from_url(redis_url) as client:
        for key in client.scan_iter(match=f"{prefix}:*", count=500):
            client.unlink(key)


def crash_worker(procs: Procs, env: SimpleNamespace, at: CrashAt, queue: str | None = None) -> Popen:
    """A prefork worker of tests/proc_app.py that SIGKILLs its process group when ``at`` is reached.

    It is the crash-point explorer's worker; it pushes its PID to
    ``at.gate_key`` just before it dies.
    """
    n = len(procs.procs)
    label = f"crash-worker-{n}"
    log_path = procs.tmp_path / f"{label}.log"
    spec = json.dumps({"app": "tests.proc_app", "crash": at.to_json()})
    args = worker_args(queue or env.queue, f"crash{n}-{procs.ns}@%h", "--without-heartbeat")[1:]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery_saga.testing.crash_worker", spec, *args],
            env=env.proc_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            # It must lead its own process group, the one it kills.
            start_new_session=True,
            cwd=ROOT,
        )
    procs.procs.append((label, proc, log_path))
    return proc


def at(env: SimpleNamespace, saga_id: str, name: str, point: CrashPoint) -> CrashAt:
    """Where a crash worker dies: step ``name`` of saga ``saga_id``, at ``point``."""
    return CrashAt(saga_id, name, False, point, env.redis_url, f"{env.prefix}:crashed-at")


def publishers(s: SimpleNamespace, tid: str) -> list[int]:
    """PIDs of the subprocesses that published a message with task id ``tid``, in order."""
    return [pid for t, pid in s.entries("published") if t == tid]


def do_entry(res: Any, name: str) -> list[Any]:
    return ["do", name, f"{res.id}:{name}"]


def undo_entry(res: Any, name: str, result: Any) -> list[Any]:
    """The ledger entry of a round-1 compensation: blind (result None) or with the step's result."""
    return ["undo", name, 1, result is not None, result, f"{res.id}:{name}:undo"]


# -- unknown outcomes: soft time limits and lost pool children -------------------------------


def test_a_soft_time_limit_the_step_lets_through_is_unknown_with_reason_timeout(
    processes: Processes, r: redis.Redis
) -> None:
    # Given a prefork worker, and a step with a 1 s soft time limit (and a 30 s
    # deadline, so the deadline is not what stops it) that blocks on a gate
    env, procs, s = processes({"task_annotations": {"proc.t.hang": {"soft_time_limit": 1}}})
    procs.worker()
    saga = Saga("g_soft", [s.t_reserve, step(s.t_hang, timeout=30)])
    res = saga.delay(qty=3, gates=["proc.t.hang"])
    wait_for(lambda: s.entered("proc.t.hang"), 30, "the step to start")

    # When the soft limit raises SoftTimeLimitExceeded, which the function lets through
    with pytest.raises(SagaCompensated) as info:
        res.get(timeout=patience(30))

    # Then the step is UNKNOWN with reason "timeout", compensated blind, then the step before it
    assert info.value.reason == "timeout" and info.value.step == "proc.t.hang"
    assert "SoftTimeLimitExceeded" in (info.value.error or "")
    state = res.state()
    hang = state.step("proc.t.hang")
    assert hang.status is StepStatus.UNKNOWN and hang.stopped_by == "timeout" and hang.timed_out
    assert hang.compensation_status is CompensationStatus.COMPENSATED and hang.compensation_attempts == 1
    hang_id = task_id(res.id, "proc.t.hang")
    # It was the function's own exception (a pool child's task_failure), not a hard limit.
    failures = wait_for(lambda: [f[:2] for f in s.entries("failures") if f[0] == hang_id], 15, "task_failure")
    assert failures == [[hang_id, "SoftTimeLimitExceeded"]]
    wait_for(lambda: drained(r, env.prefix, env.queue), 15, "the queue to drain")
    assert s.entries("ledger") == [
        do_entry(res, "proc.t.reserve"),
        undo_entry(res, "proc.t.hang", None),
        undo_entry(res, "proc.t.reserve", {"proc.t.reserve_qty": 3}),
    ]
    assert s.left() == (0, {})


def test_a_pool_child_lost_with_retry_on_worker_lost_leaves_the_step_running_for_the_retried_copy(
    processes: Processes, r: redis.Redis
) -> None:
    # Given a step that Celery retries when its worker is lost
    # (retry_on_worker_lost, as task_retry_on_worker_lost sets it), whose pool
    # child SIGKILLs itself on its first run
    conf = {"task_annotations": {"proc.t.hang": {"retry_on_worker_lost": True, "default_retry_delay": 0.2}}}
    env, procs, s = processes(conf)
    worker = procs.worker()
    saga = Saga("g_retried", [s.t_reserve, step(s.t_hang, timeout=30)])
    hang_gate = "proc.t.hang"

    # When the step runs and its pool child dies
    res = saga.delay(qty=2, die_in="proc.t.hang", gates=[hang_gate])

    # Then Celery's main process sends the message again, and the copy begins
    # (held at a gate): the step stayed RUNNING, nothing was compensated
    wait_for(lambda: s.entered(hang_gate), 30, "the retried copy to start")
    hang_id = task_id(res.id, "proc.t.hang")
    first, again = publishers(s, hang_id)
    assert again == worker.pid and first != worker.pid
    state = res.state()
    hang = state.step("proc.t.hang")
    assert state.status is SagaStatus.RUNNING and hang.status is StepStatus.RUNNING
    assert hang.stopped_by is None and hang.compensation_status is None and hang.attempts == 2
    assert [f for f in s.entries("failures") if f[0] == hang_id] == []  # no WorkerLostError recorded

    # And the retried copy decides: it completes the step, and the saga
    s.open_gate(hang_gate)
    assert res.get(timeout=patience(30))["proc.t.hang_qty"] == 2
    hang = res.state().step("proc.t.hang")
    assert hang.status is StepStatus.COMPLETED and hang.attempts == 2 and hang.error is None
    wait_for(lambda: drained(r, env.prefix, env.queue), 15, "the queue to drain")
    assert s.entries("ledger") == [
        do_entry(res, "proc.t.reserve"),
        ["dying", "proc.t.hang"],
        do_entry(res, "proc.t.hang"),
    ]
    assert s.left() == (4, {f"{res.id}:proc.t.reserve": "2", f"{res.id}:proc.t.hang": "2"})


def test_a_redelivered_copy_that_comes_after_the_deadline_is_fenced(processes: Processes, r: redis.Redis) -> None:
    # Given an acks_late step with a 2 s deadline, below the workers' 4 s
    # visibility timeout, blocking on a gate. Its message has no `expires`
    # (drop_expires), so a worker never drops a late copy itself: only the
    # record can stop it.
    env, procs, s = processes()
    first = procs.worker(visibility=4)
    saga = Saga("g_late_copy", [s.t_reserve, step(s.t_hang_acked, timeout=2)])
    res = saga.delay(qty=6, gates=["proc.t.hang_acked"], drop_expires="proc.t.hang_acked")
    wait_for(lambda: s.entered("proc.t.hang_acked"), 30, "the step to start")

    # When the whole worker is SIGKILLed, and another one starts
    procs.kill(first)
    procs.worker(visibility=4)

    # Then the deadline comes first: the step is compensated blind
    assert finished(res) is SagaStatus.COMPENSATED
    hang = res.state().step("proc.t.hang_acked")
    assert hang.status is StepStatus.UNKNOWN and hang.timed_out and hang.attempts == 1
    assert hang.compensation_status is CompensationStatus.COMPENSATED

    # And the copy the broker redelivers later is fenced: the function never runs again
    hang_id = task_id(res.id, "proc.t.hang_acked")
    wait_for(lambda: [hang_id, "IGNORED"] in s.entries("postrun"), 30, "the redelivered copy to be handled")
    wait_for(lambda: drained(r, env.prefix, env.queue), 15, "the queue to drain")
    assert len(s.entered("proc.t.hang_acked")) == 1
    assert res.state().step("proc.t.hang_acked").attempts == 1
    assert s.entries("ledger") == [
        do_entry(res, "proc.t.reserve"),
        undo_entry(res, "proc.t.hang_acked", None),
        undo_entry(res, "proc.t.reserve", {"proc.t.reserve_qty": 6}),
    ]
    assert s.left() == (0, {})


# -- dispatching and joining stages (the explorer's crash points 4 and 1) ----------------------


def test_a_worker_killed_right_after_recording_a_step_leaves_the_next_stage_pushed_with_it(
    processes: Processes, r: redis.Redis
) -> None:
    # Given a saga whose first step (not acks_late) runs on a worker that dies
    # right after the step's outcome is recorded (crash point 4); its broker is
    # the store's Redis, so that transition pushed the next stage itself
    # (the next step on a queue of its own: the dying worker cannot take its message with it)
    env, procs, s = processes()
    later = f"{env.queue}-later"
    saga = Saga("g_pushed", [s.t_reserve, step(s.t_last.s().set(queue=later), timeout=30)])
    res = saga.delay(qty=3)
    dying = crash_worker(procs, env, at(env, res.id, "proc.t.reserve", CrashPoint.RECORDED))

    # When it dies there
    assert procs.wait_dead(dying, timeout=patience(30)) == -signal.SIGKILL
    assert r.llen(f"{env.prefix}:crashed-at") == 1

    # Then the next stage's message is queued already, built once (by the worker that died)
    state = res.state()
    assert state.step("proc.t.reserve").status is StepStatus.COMPLETED
    assert state.step("proc.t.last").status is StepStatus.DISPATCHED
    last_id = task_id(res.id, "proc.t.last")
    assert r.llen(queue_key(env.prefix, later)) == 1 and len(publishers(s, last_id)) == 1

    # And a worker of that queue runs it, once: the saga completes, nothing undone, nothing sent again
    procs.worker(queues=later)
    assert finished(res) is SagaStatus.COMPLETED
    assert s.entries("ledger") == [do_entry(res, "proc.t.reserve"), do_entry(res, "proc.t.last")]
    assert len(publishers(s, last_id)) == 1


def test_a_worker_killed_between_recording_a_step_without_acks_late_and_publishing_the_next_stage(
    processes: Processes, r: redis.Redis
) -> None:
    # Given a saga whose first step (not acks_late) runs on a worker that dies
    # right after the step's outcome is recorded, before the next stage is
    # published (crash point 4), and whose second step has a 2 s deadline; the
    # stage is published after the transition (as with RabbitMQ, or another Redis)
    env, procs, s = processes({"saga_enqueue_in_transition": False})
    saga = Saga("g_recorded", [s.t_reserve, step(s.t_last, timeout=2)])
    res = saga.delay(qty=3)
    dying = crash_worker(procs, env, at(env, res.id, "proc.t.reserve", CrashPoint.RECORDED))

    # When it dies there
    assert procs.wait_dead(dying, timeout=patience(30)) == -signal.SIGKILL
    assert r.llen(f"{env.prefix}:crashed-at") == 1

    # Then the step is recorded and the next one dispatched in the record, but
    # its message never went out, and nothing will send it again
    state = res.state()
    assert state.status is SagaStatus.RUNNING
    assert state.step("proc.t.reserve").status is StepStatus.COMPLETED
    assert state.step("proc.t.last").status is StepStatus.DISPATCHED
    last_id = task_id(res.id, "proc.t.last")
    assert r.llen(queue_key(env.prefix, env.queue)) == 0 and publishers(s, last_id) == []

    # When another worker starts, then the next stage's deadline rolls the saga back
    procs.worker()
    assert finished(res) is SagaStatus.COMPENSATED
    state = res.state()
    assert state.reason == "timeout" and state.failed_step == "proc.t.last"
    last = state.step("proc.t.last")
    assert last.status is StepStatus.CANCELLED and last.timed_out and last.attempts == 0
    assert last.compensation_status is None
    assert state.step("proc.t.reserve").compensation_status is CompensationStatus.COMPENSATED
    wait_for(lambda: r.llen(queue_key(env.prefix, env.queue)) == 0, 15, "the queue to drain")
    assert publishers(s, last_id) == []
    assert s.entries("ledger") == [
        do_entry(res, "proc.t.reserve"),
        undo_entry(res, "proc.t.reserve", {"proc.t.reserve_qty": 3}),
    ]
    assert s.left() == (0, {})


def test_a_lost_header_task_does_not_hang_the_join(processes: Processes, r: redis.Redis) -> None:
    # Given a saga whose second stage runs two steps side by side, the one on
    # its own queue (2 s deadline) taken by a worker that dies as it receives
    # it (crash point 1: the record does not say it runs yet)
    env, procs, s = processes()
    joined = f"{env.queue}-join"
    saga = Saga(
        "g_join",
        [
            s.t_reserve,
            parallel(s.t_last, step(s.t_hang.s().set(queue=joined), timeout=2)),
            step(s.t_reserve, name="after"),
        ],
    )
    res = saga.delay(qty=1)
    procs.worker()
    dying = crash_worker(procs, env, at(env, res.id, "proc.t.hang", CrashPoint.RECEIVED), queue=joined)

    # When that header task is lost with its worker
    assert procs.wait_dead(dying, timeout=patience(30)) == -signal.SIGKILL

    # Then its sibling completes, the join does not wait forever: the lost
    # step's deadline fences it, and the saga rolls back
    assert finished(res) is SagaStatus.COMPENSATED
    state = res.state()
    assert state.reason == "timeout" and state.failed_step == "proc.t.hang"
    hang = state.step("proc.t.hang")
    assert hang.status is StepStatus.CANCELLED and hang.timed_out and hang.attempts == 0
    assert hang.compensation_status is None
    assert state.step("proc.t.last").status is StepStatus.COMPLETED
    assert state.step("proc.t.last").compensation_status is CompensationStatus.COMPENSATED
    assert state.step("after").status is StepStatus.WAITING  # the next stage never ran
    wait_for(lambda: r.llen(queue_key(env.prefix, env.queue)) == 0, 15, "the queue to drain")
    assert s.entries("ledger") == [
        do_entry(res, "proc.t.reserve"),
        do_entry(res, "proc.t.last"),
        undo_entry(res, "proc.t.last", {"proc.t.last_qty": 1}),
        undo_entry(res, "proc.t.reserve", {"proc.t.reserve_qty": 1}),
    ]
    assert s.left() == (0, {})


# -- copies of compensations ----------------------------------------------------------------


def test_a_copy_of_a_compensation_after_its_outcome_was_recorded_does_not_run_again(
    app: Celery, shop: SimpleNamespace, worker: Any, handled: list[tuple[str, str]]
) -> None:
    saga = Saga("g_undo_copy", [shop.reserve, shop.hang])
    undo_id = ""
    with worker():
        # Given a saga rolled back: its first step compensated once
        res = saga.delay(qty=2, fail_late=True)
        with pytest.raises(SagaCompensated):
            res.get(timeout=patience(15))
        undo_id = task_id(res.id, "timed.reserve", undo=True)
        wait_for(lambda: (undo_id, "SUCCESS") in handled, 10, "the compensation to be handled")

        # When a copy of that compensation's message arrives (a redelivery, a duplicate publish)
        publish_compensation(app, res.id, store_for(app).load(res.id), saga.plan(), "timed.reserve")

        # Then the worker takes it and does not run it
        wait_for(lambda: (undo_id, "IGNORED") in handled, 10, "the copy to be handled")
    undos = [e for e in shop.ledger_entries() if e[0] == "undo"]
    assert undos == [["undo", "timed.reserve", 1, True, {"timed.reserve_qty": 2}, undo_id]]
    assert res.state().step("timed.reserve").compensation_attempts == 1
    assert shop.left() == (0, {})


# -- limits -----------------------------------------------------------------------------


def test_a_late_success_of_a_step_with_nothing_to_undo_is_only_recorded(
    app: Celery, shop: SimpleNamespace, worker: Any, published: list[str], handled: list[tuple[str, str]]
) -> None:
    # Given a step with compensate=None and a 1 s deadline, held at a gate
    saga = Saga("g_nothing_to_undo", [shop.reserve, step(shop.hang, compensate=None, timeout=1)])
    with worker():
        res = saga.delay(qty=2, gates=["hang"])
        wait_for(lambda: shop.entered("hang"), 10, "the step to start")
        # When its deadline passes, the saga rolls back (the step has nothing to undo)
        assert finished(res) is SagaStatus.COMPENSATED

        # And then the step succeeds late
        shop.open_gate("hang")
        hang_id = task_id(res.id, "timed.hang")
        wait_for(lambda: (hang_id, "SUCCESS") in handled, 10, "the late success to be handled")

    # Then its late success is recorded, and nothing is compensated: its effect stays
    state = res.state()
    hang = state.step("timed.hang")
    assert hang.status is StepStatus.UNKNOWN
    assert hang.late_status is StepStatus.COMPLETED and hang.late_result == {"timed.hang_qty": 2}
    assert hang.compensation_status is None and hang.second_round is None
    assert state.status is SagaStatus.COMPENSATED
    assert [t for t in published if t.startswith(f"{hang_id}:undo")] == []
    assert [e[:2] for e in shop.ledger_entries()] == [
        ["do", "timed.reserve"],
        ["undo", "timed.reserve"],
        ["do", "timed.hang"],
    ]
    assert shop.left() == (2, {hang_id: "2"})


def test_a_second_round_compensation_that_gives_up_leaves_the_saga_status_as_it_was(
    app: Celery, shop: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any
) -> None:
    # Given compensations that give up after 2 attempts, and a step whose
    # compensation works blind (round 1) but is down when it gets a real result (round 2)
    app.conf.saga_compensation_max_retries = 1

    @app.task(shared=False, name="g.cancel_hang")
    def cancel_hang(step_result: Any = None) -> None:
        ctx = current_step()
        assert ctx is not None and ctx.compensating
        r.rpush(f"{prefix}:ledger", json.dumps(["undo", ctx.step, ctx.round, step_result]))
        if ctx.round == 2:
            raise RuntimeError("the cancellation service is down")

    announced: list[tuple[str, int, bool]] = []
    ended_failed: list[str] = []

    def on_compensation_failed(sender: Any = None, **kw: Any) -> None:
        announced.append((kw["step"], kw["attempt"], kw["gave_up"]))

    def on_saga_failed(sender: Any = None, **kw: Any) -> None:
        ended_failed.append(kw["saga_id"])

    compensation_failed.connect(on_compensation_failed, weak=False)
    saga_failed.connect(on_saga_failed, weak=False)
    saga = Saga("g_second_round", [shop.reserve, step(shop.hang, compensate=cancel_hang, timeout=1)])
    try:
        with worker():
            res = saga.delay(qty=5, gates=["hang"])
            wait_for(lambda: shop.entered("hang"), 10, "the step to start")
            # When the step is compensated blind after its deadline, the saga ends COMPENSATED
            assert finished(res) is SagaStatus.COMPENSATED

            # And then the step succeeds late, and its second round gives up
            shop.open_gate("hang")
            wait_for(
                lambda: (s := res.state().step("timed.hang").second_round) and s.status is CompensationStatus.GAVE_UP,
                15,
                "the second round to give up",
            )
    finally:
        compensation_failed.disconnect(on_compensation_failed)
        saga_failed.disconnect(on_saga_failed)

    # Then the saga stays COMPENSATED (not FAILED): the compensation_failed
    # signal and StepRecord.second_round say what is left
    state = res.state()
    assert state.status is SagaStatus.COMPENSATED
    assert res.id not in store_for(app).list_ids(SagaStatus.FAILED)
    hang = state.step("timed.hang")
    assert hang.compensation_status is CompensationStatus.COMPENSATED
    assert hang.second_round is not None and hang.second_round.attempts == 2
    assert "the cancellation service is down" in (hang.second_round.error or "")
    assert announced == [("timed.hang", 1, False), ("timed.hang", 2, True)]
    assert ended_failed == []
    # And the compensation's effect is not undone: the step's effect stays
    assert [e[:3] for e in shop.ledger_entries() if e[1] == "timed.hang"] == [
        ["undo", "timed.hang", 1],
        ["do", "timed.hang"],
        ["undo", "timed.hang", 2],
        ["undo", "timed.hang", 2],
    ]
    assert shop.left() == (5, {task_id(res.id, "timed.hang"): "5"})


def test_an_effect_that_lands_after_the_blind_compensation_from_a_step_never_recorded_is_not_undone(
    processes: Processes, r: redis.Redis
) -> None:
    # Given a step with a 2 s deadline held at a gate, on a worker that dies
    # when the step returns, before its outcome is recorded (crash point 3)
    env, procs, s = processes()
    saga = Saga("g_after_blind", [s.t_reserve, step(s.t_hang, timeout=2)])
    res = saga.delay(qty=5, gates=["proc.t.hang"])
    dying = crash_worker(procs, env, at(env, res.id, "proc.t.hang", CrashPoint.RETURNED))
    wait_for(lambda: s.entered("proc.t.hang"), 30, "the step to start")

    # When its deadline passes: it is compensated blind, and there is nothing to undo yet
    assert finished(res) is SagaStatus.COMPENSATED
    assert s.left() == (0, {})

    # And then its effect lands, and its worker dies before recording it
    s.open_gate("proc.t.hang")
    assert procs.wait_dead(dying, timeout=patience(30)) == -signal.SIGKILL

    # Then nothing knows of the effect: it is not undone
    state = res.state()
    hang = state.step("proc.t.hang")
    assert state.status is SagaStatus.COMPENSATED
    assert hang.status is StepStatus.UNKNOWN and hang.late_status is None and hang.second_round is None
    assert s.entries("ledger") == [
        do_entry(res, "proc.t.reserve"),
        undo_entry(res, "proc.t.hang", None),
        undo_entry(res, "proc.t.reserve", {"proc.t.reserve_qty": 5}),
        do_entry(res, "proc.t.hang"),
    ]
    assert s.left() == (5, {f"{res.id}:proc.t.hang": "5"})


def test_a_result_that_arrives_after_the_record_expired_is_lost_and_not_compensated(
    app: Celery,
    shop: SimpleNamespace,
    r: redis.Redis,
    prefix: str,
    worker: Any,
    published: list[str],
    handled: list[tuple[str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given finished sagas are kept 1 s, and a step with a 1 s deadline held at a gate
    app.conf.saga_retention = 1
    caplog.set_level(logging.WARNING, logger="celery_saga")
    saga = Saga("g_expired", [shop.reserve, step(shop.hang, timeout=1)])
    with worker():
        res = saga.delay(qty=4, gates=["hang"])
        wait_for(lambda: shop.entered("hang"), 10, "the step to start")
        # When the saga rolls back (the step compensated blind: nothing to undo yet)
        assert finished(res) is SagaStatus.COMPENSATED
        # and its record expires
        wait_for(lambda: not r.exists(f"{prefix}:{{{res.id}}}"), 10, "the record to expire")

        # And then the step succeeds
        shop.open_gate("hang")
        hang_id = task_id(res.id, "timed.hang")
        wait_for(lambda: (hang_id, "SUCCESS") in handled, 10, "the late result to be handled")

    # Then its result is lost: no second round was sent, and its effect stays
    assert [t for t in published if t.startswith(f"{hang_id}:undo")] == [f"{hang_id}:undo"]  # round 1 only
    assert shop.ledger_entries()[-1] == ["do", "timed.hang"]
    assert shop.left() == (4, {hang_id: "4"})
    with pytest.raises(SagaNotFound):
        res.state()
    assert any("finished after its record expired" in rec.getMessage() for rec in caplog.records)


def test_a_step_without_a_deadline_waits_forever_unless_the_saga_has_a_timeout(
    app: Celery, shop: SimpleNamespace, worker: Any, ns: str
) -> None:
    # Given two sagas whose only step has no deadline and whose messages are
    # lost (routed to a queue nobody reads); only the second has a 1 s timeout
    app.conf.task_routes = {"timed.reserve": {"queue": f"q-{ns}-nobody"}}
    with worker():
        waits = Saga("g_forever", [step(shop.reserve, timeout=None)]).delay(qty=1)
        bounded = Saga("g_bounded", [step(shop.reserve, timeout=None)], timeout=1).delay(qty=1)

        # Then the saga's timeout rolls the second back (its step never started: fenced)
        assert finished(bounded) is SagaStatus.COMPENSATED
        assert bounded.state().reason == "timeout"
        assert bounded.state().step("timed.reserve").status is StepStatus.CANCELLED

        # While the first, with no deadline anywhere, still waits: no sweeper will ever look at it
        assert waits.status is SagaStatus.PENDING
        assert waits.state().step("timed.reserve").status is StepStatus.DISPATCHED
        assert waits.state().step("timed.reserve").deadline is None
        assert store_for(app).watched(waits.id) is None  # type: ignore[attr-defined]
    assert shop.ledger_entries() == []


def test_a_deadline_waits_for_the_store_and_is_acted_on_once_it_is_back(
    app: Celery, shop: SimpleNamespace, r: redis.Redis, worker: Any, ns: str
) -> None:
    # Given a saga store of its own (kept on disk), and a step whose message
    # is lost (routed to a queue nobody reads), with a 1 s deadline
    store_server = RedisServer(persist=True).start()
    try:
        app.conf.saga_redis_url = store_server.url
        app.conf.task_routes = {"timed.reserve": {"queue": f"q-{ns}-nobody"}}
        with worker():
            res = Saga("g_store_down", [step(shop.reserve, timeout=1)]).delay(qty=1)
            deadline = res.state().step("timed.reserve").deadline
            assert deadline is not None

            # When the store goes down, and the deadline passes while it is
            # down (the broker's Redis, on the same clock, tells the time)
            store_server.stop()
            wait_for(lambda: store_now(r) > deadline.timestamp() + 1.0, 10, "the deadline to pass")

            # Then the deadline waits: once the store is back, a sweeper acts on it
            store_server = RedisServer(port=store_server.port, persist=True, dir=store_server.dir).start()
            assert finished(res) is SagaStatus.COMPENSATED
        first = res.state().step("timed.reserve")
        assert first.status is StepStatus.CANCELLED and first.timed_out
        assert first.ended_at is not None
        assert (first.ended_at - deadline).total_seconds() >= 1.0  # not before the store was back
    finally:
        store_server.stop()
    assert shop.ledger_entries() == []
