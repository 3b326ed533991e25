"""Worker liveness and step heartbeats on real `celery worker` prefork subprocesses (issue 21).

A worker SIGKILLed mid-step (main process and pool child, the step not
acks_late, its deadline 300 s) leaves no outcome and Celery says nothing:
the step must be declared lost within ``saga_worker_lost_after`` plus a
sweep, by the sweeper of another worker, or by the same node name started
again. A worker frozen (SIGSTOP) until declared lost, then resumed, reports a
late outcome, never a second completion. Steps with a heartbeat timeout are
lost when they stop heartbeating, and only then; and busy cores declare
nothing lost.

The workers write their liveness every 0.5 s and count as lost after 3 s
(``CONF``). The step tasks are tests/proc_app.py's ``proc.t.*``: their effect
is recorded under their idempotency key and their compensation undoes it, so
``left() == (0, {})`` means no forward effect is left. Subprocesses run in
their own session and are stopped by PID and process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from celery_saga import CompensationStatus, Saga, SagaResult, SagaStatus, StepStatus, step
from celery_saga.stores import store_for
from tests.helpers import drained, finished, patience, wait_for
from tests.subprocs import Popen, Procs, proc_env, worker_args

HEARTBEAT = 0.5
LOST_AFTER = 3.0
CONF = {"saga_worker_heartbeat": HEARTBEAT, "saga_worker_lost_after": LOST_AFTER}


@pytest.fixture
def env(redis_url: str, ns: str) -> SimpleNamespace:
    return proc_env(redis_url, f"sagaproc-{ns}", f"q-{ns}", saga_conf=CONF)


def start(procs: Procs, name: str) -> Popen:
    """A prefork worker (-c 2) on the test's queue with node name ``name`` (``%h`` is the host)."""
    args = worker_args(procs.env.queue, name, "--without-heartbeat")
    proc, _ = procs.celery(f"worker-{len(procs.procs)}", args, procs.env.proc_env)
    return proc


def live(shop: SimpleNamespace) -> list[str]:
    """Node names of the worker instances whose liveness is fresh."""
    now = time.time()
    workers = store_for(shop.app).workers().values()
    return sorted(w.hostname for w in workers if w.last_seen and now - w.last_seen < LOST_AFTER)


def undo_entry(res: SagaResult, name: str, round_: int, result: Any) -> list[Any]:
    key = f"{res.id}:{name}:undo" if round_ == 1 else f"{res.id}:{name}:undo:{round_}"
    return ["undo", name, round_, result is not None, result, key]


def do_entry(res: SagaResult, name: str) -> list[Any]:
    return ["do", name, f"{res.id}:{name}"]


def undone(shop: SimpleNamespace, name: str) -> bool:
    return any(e[0] == "undo" and e[1] == name for e in shop.entries("ledger"))


def hang_on_a_worker(shop: SimpleNamespace, env: SimpleNamespace, r: Any) -> tuple[SagaResult, int]:
    """Start a saga whose second step (not acks_late, deadline 300 s) blocks on a gate; the worker it runs on."""
    res = Saga("t_live", [shop.t_reserve, shop.t_hang]).delay(qty=5, gates=["proc.t.hang"])
    entry = wait_for(lambda: shop.entered("proc.t.hang"), 30, "the step to start")[0]
    wait_for(lambda: drained(r, env.prefix, env.queue), 15, "the step's message to be acknowledged")
    step_ = res.state().step("proc.t.hang")
    assert step_.status is StepStatus.RUNNING and step_.timeout == 300
    return res, int(entry[1])


def assert_lost_and_compensated_blind(res: SagaResult, shop: SimpleNamespace) -> None:
    assert finished(res) is SagaStatus.COMPENSATED
    state = res.state()
    assert (state.failed_step, state.reason) == ("proc.t.hang", "failure")
    hang = state.step("proc.t.hang")
    assert hang.status is StepStatus.UNKNOWN and hang.stopped_by == "lost"
    assert "WorkerLostError: worker" in (hang.error or "") and "stopped" in (hang.error or "")
    assert hang.compensation_status is CompensationStatus.COMPENSATED
    assert shop.entries("ledger") == [
        do_entry(res, "proc.t.reserve"),
        undo_entry(res, "proc.t.hang", 1, None),
        undo_entry(res, "proc.t.reserve", 1, {"proc.t.reserve_qty": 5}),
    ]
    assert shop.left() == (0, {})


@pytest.mark.timeout(120)
def test_a_killed_worker_is_declared_lost_in_seconds_while_another_lives(env, procs, shop, r, ns) -> None:
    # Given two workers writing their liveness, and a step blocked mid-way on one of them
    workers = {p.pid: p for p in (start(procs, f"a-{ns}@%h"), start(procs, f"b-{ns}@%h"))}
    wait_for(lambda: len(live(shop)) == 2, 30, "both workers to write their liveness")
    res, pid = hang_on_a_worker(shop, env, r)

    # When that worker (main process and pool children) is SIGKILLed
    killed_at = time.monotonic()
    procs.kill(workers[pid])

    # Then the other worker's sweeper declares the step lost and its compensation
    # has run within saga_worker_lost_after + 5 s, not at the 300 s deadline
    wait_for(lambda: undone(shop, "proc.t.hang"), LOST_AFTER + 5, "the lost step's compensation")
    took = time.monotonic() - killed_at
    sys.stderr.write(f"killed worker: step compensated {took:.2f}s after the kill\n")
    assert_lost_and_compensated_blind(res, shop)
    assert len(shop.entered("proc.t.hang")) == 1  # it never ran again
    assert store_for(shop.app).counters().get("lost:worker") == 1


@pytest.mark.timeout(120)
def test_a_lone_worker_started_again_finds_what_its_dead_instance_ran(env, procs, shop, r, ns) -> None:
    # Given the only worker, running a step blocked mid-way
    name = f"solo-{ns}@%h"
    first = start(procs, name)
    wait_for(lambda: live(shop), 30, "the worker to write its liveness")
    res, _ = hang_on_a_worker(shop, env, r)

    # When it is SIGKILLed and nothing sweeps for a while, then started again under the same node name
    procs.kill(first)
    assert res.state().step("proc.t.hang").status is StepStatus.RUNNING
    restarted_at = time.monotonic()
    start(procs, name)

    # Then the new instance knows its node name's older instance is dead: within
    # 10 s of the restart the step is lost and compensated
    wait_for(lambda: undone(shop, "proc.t.hang"), 10, "the lost step's compensation")
    sys.stderr.write(f"restarted worker: step compensated {time.monotonic() - restarted_at:.2f}s after the restart\n")
    assert_lost_and_compensated_blind(res, shop)


@contextlib.contextmanager
def frozen(proc: Popen) -> Iterator[None]:
    """SIGSTOP a worker's whole process group; SIGCONT it on the way out."""
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)


@pytest.mark.timeout(120)
def test_a_frozen_worker_declared_lost_reports_a_late_outcome_never_a_second_completion(
    env, procs, shop, r, ns
) -> None:
    # Given two workers, and a step blocked mid-way on one of them
    workers = {p.pid: p for p in (start(procs, f"a-{ns}@%h"), start(procs, f"b-{ns}@%h"))}
    wait_for(lambda: len(live(shop)) == 2, 30, "both workers to write their liveness")
    res, pid = hang_on_a_worker(shop, env, r)

    # When that worker is frozen (cut off: it writes no liveness) until its step is declared lost
    with frozen(workers[pid]):
        frozen_at = time.monotonic()
        wait_for(
            lambda: res.state().step("proc.t.hang").status is StepStatus.UNKNOWN,
            LOST_AFTER + 5,
            "the frozen worker's step to be declared lost",
        )
        sys.stderr.write(f"frozen worker: step lost {time.monotonic() - frozen_at:.2f}s after SIGSTOP\n")
        # and the step's function goes on once it thaws
        shop.open_gate("proc.t.hang")

    # Then its success arrives late: kept, and compensated again with its result; never a completion
    assert finished(res) is SagaStatus.COMPENSATED

    def second_round_done() -> bool:
        second = res.state().step("proc.t.hang").second_round
        return second is not None and second.status is CompensationStatus.COMPENSATED

    wait_for(second_round_done, 30, "the late success to be compensated again")
    hang = res.state().step("proc.t.hang")
    assert hang.status is StepStatus.UNKNOWN and hang.stopped_by == "lost"
    assert hang.late_status is StepStatus.COMPLETED and hang.late_result == {"proc.t.hang_qty": 5}
    assert res.status is SagaStatus.COMPENSATED
    ledger = shop.entries("ledger")
    assert ledger.count(do_entry(res, "proc.t.hang")) == 1
    assert undo_entry(res, "proc.t.hang", 2, {"proc.t.hang_qty": 5}) in ledger
    assert shop.left() == (0, {})


@pytest.mark.timeout(120)
def test_a_heartbeating_step_completes_and_a_silent_one_is_lost(env, procs, shop, r, ns) -> None:
    # Given a worker, and a step with heartbeat_timeout=1.5 that heartbeats every 0.5 s for 5 s
    start(procs, f"a-{ns}@%h")
    beating = Saga("t_beat", [shop.t_reserve, shop.t_beat])
    ok = beating.delay(qty=2, beat_for=5, beat_every=0.5)
    # Then it completes normally: its heartbeats kept it alive past three heartbeat timeouts
    assert finished(ok, 40) is SagaStatus.COMPLETED
    assert ok.state().step("proc.t.beat").attempts == 1

    # When the same step stops heartbeating 1 s in, and runs 8 s
    silent = beating.delay(qty=3, beat_for=8, beat_every=0.5, beat_until=1)
    wait_for(lambda: ["beating", "proc.t.beat"] in shop.entries("ledger")[-2:], 30, "the silent step to start")
    started = time.monotonic()
    # Then it is declared lost within about heartbeat_timeout + one sweep of its last heartbeat, its worker alive
    wait_for(
        lambda: silent.state().step("proc.t.beat").status is StepStatus.UNKNOWN,
        1 + 1.5 + 3,
        "the silent step to be declared lost",
    )
    sys.stderr.write(f"silent step: lost {time.monotonic() - started:.2f}s after it began (1 s of heartbeats)\n")
    state = silent.state()
    assert "sent no heartbeat for 1.5s" in (state.step("proc.t.beat").error or "")
    assert finished(silent) is SagaStatus.COMPENSATED
    # and its success, when it comes, is a late outcome
    wait_for(lambda: silent.state().step("proc.t.beat").late_status is StepStatus.COMPLETED, 30, "its late outcome")
    assert store_for(shop.app).counters().get("lost:heartbeat") == 1


@contextlib.contextmanager
def busy_cores(n: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``n`` CPU hogs, killed by their PIDs on the way out."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(n)]
    try:
        yield hogs
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait(patience(15))


@pytest.mark.timeout(180)
def test_busy_cores_declare_no_step_lost(env, procs, shop, r, ns) -> None:
    # Given both cores busy with CPU hogs, and a worker running sagas whose steps take 2 s
    with busy_cores(2):
        start(procs, f"a-{ns}@%h")
        slow = Saga("t_slow", [shop.t_reserve, shop.t_sleep, step(shop.t_sleep, name="again")])
        results = [slow.delay(qty=1, sleep_for=2) for _ in range(4)]
        # Then every saga completes: no step was declared lost
        for res in results:
            assert finished(res, 90) is SagaStatus.COMPLETED
    assert not store_for(shop.app).counters().get("lost:worker")
    assert [w.lost for w in store_for(shop.app).workers().values()] == [False]
