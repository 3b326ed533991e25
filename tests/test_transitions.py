"""Every op of ``transitions.lua``, called directly against Redis: no worker, no Celery message.

Each op runs from each state it accepts and from at least one it refuses,
and a replayed transition id gets the first reply back without applying
twice. Deadlines are made due by moving them into the past in the record.

The plan: stage 0 is ``a`` (compensated by ``t.undo_a``); stage 1 runs ``b``
(compensated by ``t.undo_b``) and ``c`` (nothing to undo) in parallel.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from celery_saga import CompensationStatus, SagaStatus, StepStatus
from celery_saga.plan import Plan, StepSpec
from celery_saga.store import Op, Outcome, RedisSagaStore, StartRequest, Transition
from celery_saga.store.base import definition_digest
from celery_saga.store.redis import transitions_source

PLAN = Plan(
    (
        (StepSpec("a", "t.a", "t.undo_a", timeout=60.0),),
        (StepSpec("b", "t.b", "t.undo_b", stage=1, timeout=60.0), StepSpec("c", "t.c", None, stage=1, timeout=60.0)),
    )
)
GEN = "g1"
# With a wait: "a", then a wait for event "ok" (rejected by "no"), then "c".
WAIT_PLAN = Plan(
    (
        (StepSpec("a", "t.a", "t.undo_a", timeout=60.0),),
        (StepSpec("wait:ok", "", None, stage=1, event="ok", reject="no"),),
        (StepSpec("c", "t.c", None, stage=2, timeout=60.0),),
    )
)


@pytest.fixture
def store(redis_url: str, ns: str) -> Iterator[RedisSagaStore]:
    s = RedisSagaStore(redis_url, f"sagatest-{ns}")
    yield s
    for key in s.client.scan_iter(match=f"sagatest-{ns}:*", count=500):
        s.client.unlink(key)
    s.close()


@dataclass
class Saga:
    """One record under test, and shortcuts to drive it."""

    store: RedisSagaStore
    saga_id: str

    def apply(self, op: Op, *args: str, gen: str = GEN, tx: str | None = None) -> Transition:
        return self.store.apply(op, self.saga_id, gen, "s", *args, tx=tx)

    def raw(self) -> dict[str, str]:
        return self.store.load(self.saga_id)

    def status(self) -> SagaStatus:
        return self.store.status(self.saga_id)

    def step(self, name: str) -> Any:
        return self.store.state(self.saga_id).step(name)

    def past(self, field: str) -> None:
        """Move a deadline field into the past (the sweeper's clock is Redis TIME)."""
        self.store.client.hset(self.store.keys.record(self.saga_id), field, "1")


def request(
    saga_id: str,
    gen: str = GEN,
    kwargs: dict[str, Any] | None = None,
    maxr: int | None = None,
    pivot: str = "",
    forward_maxr: int | None = None,
    plan: Plan = PLAN,
    parent: tuple[str, str, str] | None = None,
) -> StartRequest:
    # With a pivot, as Saga.apply_async does: the steps after it keep no compensation.
    retriable = {"b", "c"} if pivot == "a" else set()
    fields = [(f"comp:{s.name}", s.compensation) for s in plan.steps if s.compensation and s.name not in retriable]
    fields += [(f"to:{s.name}", "60000") for s in plan.steps if not s.is_wait]
    fields += [(f"rj:{s.name}", s.reject) for s in plan.steps if s.reject]
    kwargs_json = json.dumps(kwargs or {"order": 1})
    settings_json = json.dumps(
        {
            "compensation_retry_backoff": 0.0,
            "compensation_retry_backoff_max": 0.0,
            "forward_retry_backoff": 0.0,
            "forward_retry_backoff_max": 0.0,
            "forward_max_retries": forward_maxr,
        },
        sort_keys=True,
    )
    return StartRequest(
        saga_id=saga_id,
        gen=gen,
        name="s",
        fingerprint=kwargs_json,
        kwargs_json=kwargs_json,
        plan_json=plan.to_json(),
        # Named as Saga.apply_async names it: a stored definition must hash to its digest.
        plan_digest=definition_digest(plan.to_json(), settings_json),
        stages=plan.lua_stages(),
        retention=60.0,
        settings_json=settings_json,
        on_complete="",
        on_failure="",
        idempotency_key="",
        max_retries=maxr,
        step_fields=tuple(fields),
        pivot=pivot,
        parent=parent,
    )


# -- reaching each state -------------------------------------------------------------
#
# Each builder returns a saga in the state its name says, made by the same ops
# the workers apply.


def pending(store: RedisSagaStore, maxr: int | None = None) -> Saga:
    saga = Saga(store, str(uuid.uuid4()))
    assert store.start(request(saga.saga_id, maxr=maxr)).outcome is Outcome.CREATED
    return saga


def waiting_for_lock(store: RedisSagaStore) -> Saga:
    """A saga waiting for lock ``x``, which another holds."""
    lock = (("l:x-" + uuid.uuid4().hex[:8], 1),)
    assert store.start(dataclasses.replace(request(str(uuid.uuid4())), locks=lock)).outcome is Outcome.CREATED
    saga = Saga(store, str(uuid.uuid4()))
    assert store.start(dataclasses.replace(request(saga.saga_id), locks=lock)).waiting
    return saga


def running(store: RedisSagaStore, maxr: int | None = None) -> Saga:
    saga = pending(store, maxr)
    assert saga.apply(Op.BEGIN, "a", "0", "").outcome is Outcome.RUN
    return saga


def second_stage(store: RedisSagaStore, maxr: int | None = None) -> Saga:
    saga = running(store, maxr)
    assert saga.apply(Op.DONE, "a", '{"reservation": "r1"}').outcome is Outcome.NEXT_STAGE
    return saga


def completed(store: RedisSagaStore) -> Saga:
    saga = second_stage(store)
    for m in ("b", "c"):
        saga.apply(Op.BEGIN, m, "0", "")
        saga.apply(Op.DONE, m, "null")
    assert saga.status() is SagaStatus.COMPLETED
    return saga


def lost(store: RedisSagaStore) -> Saga:
    """a's worker was lost mid-step: its outcome is unknown, and it is compensated blind."""
    saga = running(store)
    assert saga.apply(Op.LOST, "a", "WorkerLostError", "lost").outcome is Outcome.ROLLBACK
    return saga


def running_on_w1(store: RedisSagaStore) -> Saga:
    """a runs on worker instance w1 (its begin named the worker's token)."""
    saga = pending(store)
    assert saga.apply(Op.BEGIN, "a", "0", "", "", "w1").outcome is Outcome.RUN
    assert saga.raw()["wk:a"] == "w1"
    return saga


def heartbeating(store: RedisSagaStore) -> Saga:
    """a, with a heartbeat timeout of 1 s, runs (attempt 1)."""
    saga = Saga(store, str(uuid.uuid4()))
    req = request(saga.saga_id)
    req = dataclasses.replace(req, step_fields=(*req.step_fields, ("hbt:a", "1000")))
    assert store.start(req).outcome is Outcome.CREATED
    assert saga.apply(Op.BEGIN, "a", "0", "").outcome is Outcome.RUN
    return saga


def compensating(store: RedisSagaStore, maxr: int | None = None) -> Saga:
    """b failed, c was still queued (fenced), a's compensation is dispatched."""
    saga = second_stage(store, maxr)
    saga.apply(Op.BEGIN, "b", "0", "")
    t = saga.apply(Op.FAIL, "b", "RuntimeError: declined")
    assert t.outcome is Outcome.ROLLBACK and [d.step for d in t.due] == ["a"]
    return saga


def last_step_running(store: RedisSagaStore) -> Saga:
    """b completed; c, the last step of the last stage, runs."""
    saga = second_stage(store)
    saga.apply(Op.BEGIN, "b", "0", "")
    saga.apply(Op.DONE, "b", "null")
    saga.apply(Op.BEGIN, "c", "0", "")
    return saga


def compensating_once(store: RedisSagaStore) -> Saga:
    """Like `compensating`, with no compensation retries allowed; a's compensation runs."""
    saga = compensating(store, maxr=0)
    saga.apply(Op.COMP_BEGIN, "a", "0", "", "1")
    return saga


def cancelled_and_compensated(store: RedisSagaStore) -> Saga:
    """Cancelled in the second stage: b and c fenced while queued (CANCELLED), a compensated."""
    saga = second_stage(store)
    saga.apply(Op.CANCEL, "cancelled", gen="*")
    saga.apply(Op.COMP_BEGIN, "a", "0", "", "1")
    assert saga.apply(Op.COMP_DONE, "a", "1").status is SagaStatus.COMPENSATED
    assert saga.step("b").status is StepStatus.CANCELLED
    return saga


def compensated(store: RedisSagaStore) -> Saga:
    saga = compensating(store)
    saga.apply(Op.COMP_BEGIN, "a", "0", "", "1")
    assert saga.apply(Op.COMP_DONE, "a", "1").status is SagaStatus.COMPENSATED
    return saga


def failed(store: RedisSagaStore) -> Saga:
    """a's compensation gave up (no retries allowed)."""
    saga = compensating(store, maxr=0)
    saga.apply(Op.COMP_BEGIN, "a", "0", "", "1")
    assert saga.apply(Op.COMP_FAIL, "a", "RuntimeError: refund down", "1").outcome is Outcome.GAVE_UP
    assert saga.status() is SagaStatus.FAILED
    return saga


# With a pivot: "a" is the point of no return; "b" and "c" come after it, retriable.


def pivot_running(store: RedisSagaStore, forward_maxr: int | None = None) -> Saga:
    saga = Saga(store, str(uuid.uuid4()))
    assert store.start(request(saga.saga_id, pivot="a", forward_maxr=forward_maxr)).outcome is Outcome.CREATED
    assert saga.apply(Op.BEGIN, "a", "0", "").outcome is Outcome.RUN
    return saga


def past_pivot(store: RedisSagaStore, forward_maxr: int | None = None) -> Saga:
    """The pivot completed; b (retriable) runs, c is queued."""
    saga = pivot_running(store, forward_maxr)
    assert saga.apply(Op.DONE, "a", '{"reservation": "r1"}').outcome is Outcome.NEXT_STAGE
    assert saga.apply(Op.BEGIN, "b", "0", "").outcome is Outcome.RUN
    return saga


def failed_forward(store: RedisSagaStore) -> Saga:
    """b failed past the pivot with no forward retries allowed: the saga gave up forward."""
    saga = past_pivot(store, forward_maxr=0)
    t = saga.apply(Op.FAIL, "b", "RuntimeError: mail down")
    assert (t.outcome, t.status) == (Outcome.RESEND, SagaStatus.FAILED) and t.due[0].gave_up
    return saga


def _sent_again(step: str, attempt: int) -> Callable[[Saga, Transition], None]:
    def check(saga: Saga, t: Transition) -> None:
        (d,) = t.due
        assert (d.step, d.forward, d.attempt, d.gave_up) == (step, True, attempt, False)
        assert saga.step(step).status is StepStatus.DISPATCHED
        assert saga.step(step).forward_retries == attempt

    return check


def before_wait(store: RedisSagaStore) -> Saga:
    """A saga of WAIT_PLAN whose first step runs: its wait is not reached yet."""
    saga = Saga(store, str(uuid.uuid4()))
    assert store.start(request(saga.saga_id, plan=WAIT_PLAN)).outcome is Outcome.CREATED
    assert saga.apply(Op.BEGIN, "a", "0", "").outcome is Outcome.RUN
    return saga


def waiting(store: RedisSagaStore) -> Saga:
    """A saga of WAIT_PLAN at its wait for "ok"."""
    saga = before_wait(store)
    t = saga.apply(Op.DONE, "a", '{"reservation": "r1"}')
    assert (t.outcome, t.stage) == (Outcome.NEXT_STAGE, 1)
    return saga


def _past_the_wait(saga: Saga, t: Transition) -> None:
    assert t.stage == 2 and t.data == {"order": 1, "reservation": "r1", "by": "ann"}
    assert saga.step("wait:ok").status is StepStatus.COMPLETED and saga.step("wait:ok").result == {"by": "ann"}


def completed_child(store: RedisSagaStore) -> Saga:
    """A child saga (of saga "p", its step "s") that completed: packed, but keeping what a rollback needs."""
    saga = Saga(store, f"p:{uuid.uuid4()}")
    assert store.start(request(saga.saga_id, parent=("p", "g0", "s"))).outcome is Outcome.CREATED
    saga.apply(Op.BEGIN, "a", "0", "")
    saga.apply(Op.DONE, "a", '{"reservation": "r1"}')
    for m in ("b", "c"):
        saga.apply(Op.BEGIN, m, "0", "")
        saga.apply(Op.DONE, m, "null")
    assert saga.status() is SagaStatus.COMPLETED
    return saga


def _unwound(saga: Saga, t: Transition) -> None:
    """A completed saga rolled back as a unit: its completed steps compensated in reverse, reason "parent"."""
    assert [d.step for d in t.due] == ["b"]  # c has nothing to undo; a waits for the stage after it
    state = saga.store.state(saga.saga_id)
    assert (state.reason, state.status) == ("parent", SagaStatus.COMPENSATING)


Build = Callable[[RedisSagaStore], Saga]


@dataclass(frozen=True)
class Case:
    """One op applied to a saga built by ``given``: the outcome and saga status expected."""

    op: Op
    given: Build
    args: tuple[str, ...]
    outcome: Outcome
    status: SagaStatus | None
    check: Callable[[Saga, Transition], None] | None = None
    prepare: Callable[[Saga], None] | None = None

    def __str__(self) -> str:
        return f"{self.op.value}-{self.given.__name__}-{self.outcome.value}"


def _step_is(name: str, status: StepStatus) -> Callable[[Saga, Transition], None]:
    def check(saga: Saga, t: Transition) -> None:
        assert saga.step(name).status is status

    return check


def _comp_is(name: str, status: CompensationStatus) -> Callable[[Saga, Transition], None]:
    def check(saga: Saga, t: Transition) -> None:
        assert saga.step(name).compensation_status is status

    return check


def _comp2_is(saga: Saga, name: str, status: CompensationStatus) -> None:
    second = saga.step(name).second_round
    assert second is not None and second.status is status


def _next_stage(saga: Saga, t: Transition) -> None:
    assert t.stage == 1 and t.plan_digest == request(saga.saga_id).plan_digest
    assert t.data == {"order": 1, "reservation": "r1"}


def _due(*steps: str) -> Callable[[Saga, Transition], None]:
    def check(saga: Saga, t: Transition) -> None:
        assert [d.step for d in t.due] == list(steps)

    return check


def _backoff(saga: Saga, t: Transition) -> None:
    (d,) = t.due
    assert (d.step, d.attempt, d.gave_up, d.delay) == ("a", 1, False, 0.0)
    assert saga.step("a").compensation_status is CompensationStatus.RETRYING


CASES = [
    # begin: a dispatched step runs; a copy of a running one is busy; others are refused
    Case(Op.BEGIN, pending, ("a", "0", ""), Outcome.RUN, SagaStatus.RUNNING, _step_is("a", StepStatus.RUNNING)),
    Case(Op.BEGIN, running, ("a", "0", ""), Outcome.BUSY, SagaStatus.RUNNING),
    Case(Op.BEGIN, running, ("a", "0", "1"), Outcome.RUN, SagaStatus.RUNNING),  # a redelivered copy
    Case(Op.BEGIN, second_stage, ("a", "0", ""), Outcome.DUPLICATE, SagaStatus.RUNNING),
    Case(Op.BEGIN, pending, ("b", "0", ""), Outcome.NOT_DISPATCHED, SagaStatus.PENDING),
    Case(Op.BEGIN, compensating, ("c", "0", ""), Outcome.FENCED, SagaStatus.COMPENSATING),
    Case(
        Op.BEGIN,
        pending,
        ("a", "0", ""),
        Outcome.FENCED,
        SagaStatus.COMPENSATED,  # nothing ran, so nothing to undo
        _step_is("a", StepStatus.CANCELLED),
        prepare=lambda saga: saga.past("dl:a"),
    ),
    # done: the join; the last step of the last stage completes the saga
    Case(Op.DONE, running, ("a", '{"reservation": "r1"}'), Outcome.NEXT_STAGE, SagaStatus.RUNNING, _next_stage),
    Case(
        Op.DONE,
        second_stage,
        ("b", "null"),
        Outcome.WAIT,
        SagaStatus.RUNNING,
        prepare=lambda saga: saga.apply(Op.BEGIN, "b", "0", "") and None,
    ),
    Case(Op.DONE, last_step_running, ("c", "null"), Outcome.COMPLETED, SagaStatus.COMPLETED),
    Case(Op.DONE, second_stage, ("a", "null"), Outcome.DUPLICATE, SagaStatus.RUNNING),
    Case(  # its begin was lost (a failover): it ran, so its outcome counts
        Op.DONE,
        pending,
        ("a", '{"reservation": "r1"}'),
        Outcome.NEXT_STAGE,
        SagaStatus.RUNNING,
        lambda saga, t: _next_stage(saga, t) or _step_is("a", StepStatus.COMPLETED)(saga, t),
    ),
    Case(  # fenced, but its begin was lost and it ran: a late success, compensated in a second round
        Op.DONE,
        cancelled_and_compensated,
        ("b", '{"charge": 1}'),
        Outcome.LATE,
        SagaStatus.COMPENSATED,
        lambda saga, t: _due("b")(saga, t) or _comp2_is(saga, "b", CompensationStatus.DISPATCHED),
    ),
    Case(Op.DONE, compensating, ("b", "null"), Outcome.DUPLICATE, SagaStatus.COMPENSATING),
    Case(  # a late success: kept, and compensated again once the first round ends
        Op.DONE,
        lost,
        ("a", '{"reservation": "r1"}'),
        Outcome.LATE,
        SagaStatus.COMPENSATING,
        lambda saga, t: _comp2_is(saga, "a", CompensationStatus.WAITING),
    ),
    Case(Op.FAIL, lost, ("a", "RuntimeError: late"), Outcome.LATE, SagaStatus.COMPENSATING),
    # fail and lost: a running step starts the rollback
    Case(Op.FAIL, running, ("a", "RuntimeError: no"), Outcome.ROLLBACK, SagaStatus.COMPENSATED),
    Case(Op.FAIL, second_stage, ("a", "RuntimeError: no"), Outcome.DUPLICATE, SagaStatus.RUNNING),
    Case(
        Op.LOST,
        running,
        ("a", "WorkerLostError", "lost"),
        Outcome.ROLLBACK,
        SagaStatus.COMPENSATING,
        lambda saga, t: _step_is("a", StepStatus.UNKNOWN)(saga, t) or _due("a")(saga, t),
    ),
    Case(Op.LOST, completed, ("a", "WorkerLostError", "lost"), Outcome.DUPLICATE, SagaStatus.COMPLETED),
    # lost, by a sweeper, for a worker instance declared lost: only a step RUNNING on that instance
    Case(
        Op.LOST,
        running_on_w1,
        ("a", "WorkerLostError: worker w stopped", "lost", "w1"),
        Outcome.ROLLBACK,
        SagaStatus.COMPENSATING,
        lambda saga, t: _step_is("a", StepStatus.UNKNOWN)(saga, t) or _due("a")(saga, t),
    ),
    Case(Op.LOST, running_on_w1, ("a", "WorkerLostError", "lost", "w2"), Outcome.DUPLICATE, SagaStatus.RUNNING),
    Case(Op.LOST, running, ("a", "WorkerLostError", "lost", "w1"), Outcome.DUPLICATE, SagaStatus.RUNNING),
    Case(
        Op.LOST,
        running_on_w1,
        ("a", "WorkerLostError", "lost", "w1"),
        Outcome.DUPLICATE,
        SagaStatus.RUNNING,
        prepare=lambda saga: saga.apply(Op.BEGIN, "a", "0", "1", "", "w2") and None,  # redelivered to w2
    ),
    # heartbeat: moves the heartbeat deadline of the attempt that still runs
    Case(
        Op.HEARTBEAT,
        heartbeating,
        ("a", "1"),
        Outcome.RECORDED,
        SagaStatus.RUNNING,
        lambda saga, t: _heartbeat_moved(saga, t),
    ),
    Case(Op.HEARTBEAT, running, ("a", "1"), Outcome.RECORDED, SagaStatus.RUNNING),  # no heartbeat timeout
    Case(Op.HEARTBEAT, heartbeating, ("a", "2"), Outcome.DUPLICATE, SagaStatus.RUNNING),  # another attempt
    Case(Op.HEARTBEAT, second_stage, ("a", "1"), Outcome.DUPLICATE, SagaStatus.RUNNING),
    # expire: only at the store clock's deadline
    Case(Op.EXPIRE, pending, ("a",), Outcome.EARLY, SagaStatus.PENDING),
    Case(
        Op.EXPIRE,
        pending,
        ("a",),
        Outcome.ROLLBACK,
        SagaStatus.COMPENSATED,
        _step_is("a", StepStatus.CANCELLED),
        prepare=lambda saga: saga.past("dl:a"),
    ),
    Case(Op.EXPIRE, running, ("a",), Outcome.DUPLICATE, SagaStatus.RUNNING),
    # sweep: acts on what is due, and says when to look next
    Case(Op.SWEEP, running, ("10000",), Outcome.SWEPT, SagaStatus.RUNNING, lambda saga, t: _no_change(t)),
    Case(
        Op.SWEEP,
        running,
        ("10000",),
        Outcome.SWEPT,
        SagaStatus.COMPENSATING,
        _due("a"),
        prepare=lambda saga: saga.past("dl:a"),
    ),
    # cancel
    Case(Op.CANCEL, second_stage, ("cancelled",), Outcome.ROLLBACK, SagaStatus.COMPENSATING, _due("a")),
    Case(Op.CANCEL, compensating, ("cancelled",), Outcome.ROLLBACK, SagaStatus.COMPENSATING),
    Case(Op.CANCEL, completed, ("cancelled",), Outcome.FINISHED, SagaStatus.COMPLETED),
    # compensations
    Case(Op.COMP_BEGIN, compensating, ("a", "0", "", "1"), Outcome.RUN, SagaStatus.COMPENSATING),
    Case(Op.COMP_BEGIN, compensating, ("b", "0", "", "1"), Outcome.NOT_DISPATCHED, SagaStatus.COMPENSATING),
    Case(Op.COMP_BEGIN, compensated, ("a", "0", "", "1"), Outcome.DUPLICATE, SagaStatus.COMPENSATED),
    Case(
        Op.COMP_DONE,
        compensating,
        ("a", "1"),
        Outcome.ROLLBACK,
        SagaStatus.COMPENSATED,
        _comp_is("a", CompensationStatus.COMPENSATED),
        prepare=lambda saga: saga.apply(Op.COMP_BEGIN, "a", "0", "", "1") and None,
    ),
    Case(Op.COMP_DONE, compensated, ("a", "1"), Outcome.DUPLICATE, SagaStatus.COMPENSATED),
    Case(  # its comp_begin was lost (a failover): it ran, so its outcome counts
        Op.COMP_DONE,
        compensating,
        ("a", "1"),
        Outcome.ROLLBACK,
        SagaStatus.COMPENSATED,
        lambda saga, t: _comp_is("a", CompensationStatus.COMPENSATED)(saga, t),
    ),
    Case(
        Op.COMP_FAIL,
        compensating,
        ("a", "RuntimeError: down", "1"),
        Outcome.BACKOFF,
        SagaStatus.COMPENSATING,
        _backoff,
        prepare=lambda saga: saga.apply(Op.COMP_BEGIN, "a", "0", "", "1") and None,
    ),
    Case(
        Op.COMP_FAIL,
        compensating_once,
        ("a", "RuntimeError: down", "1"),
        Outcome.GAVE_UP,
        SagaStatus.FAILED,
        _comp_is("a", CompensationStatus.GAVE_UP),
    ),
    Case(Op.COMP_FAIL, compensated, ("a", "RuntimeError: down", "1"), Outcome.DUPLICATE, SagaStatus.COMPENSATED),
    # comp_fail, by a sweeper, for a worker instance declared lost: only an attempt RUNNING on it
    Case(
        Op.COMP_FAIL,
        compensating,
        ("a", "lost: WorkerLostError", "1", "", "w1"),
        Outcome.BACKOFF,
        SagaStatus.COMPENSATING,
        _backoff,
        prepare=lambda saga: saga.apply(Op.COMP_BEGIN, "a", "0", "", "1", "", "w1") and None,
    ),
    Case(
        Op.COMP_FAIL,
        compensating,
        ("a", "lost: WorkerLostError", "1", "", "w2"),
        Outcome.DUPLICATE,
        SagaStatus.COMPENSATING,
        prepare=lambda saga: saga.apply(Op.COMP_BEGIN, "a", "0", "", "1", "", "w1") and None,
    ),
    # callbacks, and the operator's actions
    Case(Op.CALLBACK_SENT, completed, (), Outcome.RECORDED, SagaStatus.COMPLETED, lambda s, t: _flag(s, "cbs")),
    Case(Op.RETRY, failed, (), Outcome.ROLLBACK, SagaStatus.COMPENSATING, _due("a")),
    Case(Op.RETRY, completed, (), Outcome.NOT_ALLOWED, SagaStatus.COMPLETED),
    Case(
        Op.RERUN,
        compensated,
        ("new-id", ""),
        Outcome.RECORDED,
        SagaStatus.COMPENSATED,
        lambda s, t: _reruns(s, ["new-id"]),
    ),
    Case(Op.RERUN, failed, ("new-id", ""), Outcome.RECORDED, SagaStatus.FAILED, lambda s, t: _reruns(s, ["new-id"])),
    Case(
        Op.RERUN,
        compensated,
        ("second", ""),
        Outcome.EXISTS,
        SagaStatus.COMPENSATED,
        lambda s, t: _reruns(s, ["first"]),
        prepare=lambda saga: saga.apply(Op.RERUN, "first", "", gen="*") and None,
    ),
    Case(
        Op.RERUN,
        compensated,
        ("second", "1"),
        Outcome.RECORDED,
        SagaStatus.COMPENSATED,
        lambda s, t: _reruns(s, ["first", "second"]),
        prepare=lambda saga: saga.apply(Op.RERUN, "first", "", gen="*") and None,
    ),
    Case(Op.UNLOCK, failed, (), Outcome.DUPLICATE, SagaStatus.FAILED),  # it names no lock (tests/test_locks.py)
    Case(Op.UNLOCK, running, (), Outcome.NOT_ALLOWED, SagaStatus.RUNNING),
    # admit: a cluster's lock script let a waiting saga in (tests/test_cluster.py drives it whole)
    Case(Op.ADMIT, waiting_for_lock, (), Outcome.RECORDED, SagaStatus.PENDING, _step_is("a", StepStatus.DISPATCHED)),
    Case(Op.ADMIT, pending, (), Outcome.NOT_ALLOWED, SagaStatus.PENDING),  # it waits for nothing
    Case(
        Op.ADMIT,
        waiting_for_lock,
        (),
        Outcome.DUPLICATE,
        SagaStatus.PENDING,
        prepare=lambda saga: saga.apply(Op.ADMIT, gen="*") and None,
    ),
    Case(Op.RERUN, completed, ("new-id", ""), Outcome.NOT_ALLOWED, SagaStatus.COMPLETED),
    Case(Op.RERUN, running, ("new-id", ""), Outcome.NOT_ALLOWED, SagaStatus.RUNNING),
    Case(Op.PURGE, compensated, (), Outcome.PURGED, SagaStatus.COMPENSATED, lambda s, t: _gone(s)),
    Case(Op.PURGE, running, (), Outcome.NOT_ALLOWED, SagaStatus.RUNNING),
    # signal: an outside event for a wait
    Case(Op.SIGNAL, waiting, ("ok", '{"by": "ann"}'), Outcome.NEXT_STAGE, SagaStatus.RUNNING, _past_the_wait),
    Case(
        Op.SIGNAL,
        before_wait,
        ("ok", "null"),
        Outcome.RECORDED,
        SagaStatus.RUNNING,
        _step_is("wait:ok", StepStatus.WAITING),
    ),
    Case(Op.SIGNAL, waiting, ("no", '{"why": "x"}'), Outcome.ROLLBACK, SagaStatus.COMPENSATING, _due("a")),
    Case(
        Op.SIGNAL,
        waiting,
        ("ok", "null"),
        Outcome.DUPLICATE,
        SagaStatus.RUNNING,
        prepare=lambda saga: saga.apply(Op.SIGNAL, "ok", "null", gen="*") and None,
    ),
    Case(Op.SIGNAL, waiting, ("zzz", "null"), Outcome.NOT_ALLOWED, SagaStatus.RUNNING),
    Case(Op.SIGNAL, completed, ("ok", "null"), Outcome.FINISHED, SagaStatus.COMPLETED),
    # unwind: a parent rolls this child saga back as a unit
    Case(Op.UNWIND, completed_child, ("parent rolls back",), Outcome.ROLLBACK, SagaStatus.COMPENSATING, _unwound),
    Case(Op.UNWIND, second_stage, ("parent rolls back",), Outcome.ROLLBACK, SagaStatus.COMPENSATING, _due("a")),
    Case(Op.UNWIND, compensated, ("parent rolls back",), Outcome.FINISHED, SagaStatus.COMPENSATED),
    # a pivot: the steps after it are sent again; the saga no longer rolls back
    Case(Op.FAIL, past_pivot, ("b", "RuntimeError: down"), Outcome.RESEND, SagaStatus.RUNNING, _sent_again("b", 1)),
    Case(
        Op.LOST,
        pivot_running,
        ("a", "WorkerLostError", "lost"),
        Outcome.RESEND,
        SagaStatus.RUNNING,
        _sent_again("a", 1),
    ),
    Case(Op.FAIL, pivot_running, ("a", "RuntimeError: declined"), Outcome.ROLLBACK, SagaStatus.COMPENSATED),
    Case(
        Op.EXPIRE,
        past_pivot,
        ("c",),
        Outcome.RESEND,
        SagaStatus.RUNNING,
        _sent_again("c", 1),
        prepare=lambda saga: saga.past("dl:c"),
    ),
    Case(
        Op.SWEEP,
        past_pivot,
        ("10000",),
        Outcome.SWEPT,
        SagaStatus.RUNNING,
        _sent_again("b", 1),
        prepare=lambda saga: saga.past("dl:b"),
    ),
    Case(  # late, but before a sweeper sent it again: this copy runs, with a fresh deadline
        Op.BEGIN,
        past_pivot,
        ("c", "0", ""),
        Outcome.RUN,
        SagaStatus.RUNNING,
        _step_is("c", StepStatus.RUNNING),
        prepare=lambda saga: saga.past("dl:c"),
    ),
    Case(Op.CANCEL, past_pivot, ("cancelled",), Outcome.NOT_ALLOWED, SagaStatus.RUNNING),
    # (c, still queued, was refused by the FAILED saga: it is sent again too)
    Case(Op.RETRY, failed_forward, (), Outcome.RESEND, SagaStatus.RUNNING, _due("b", "c")),
    Case(  # a sibling finishing in a saga that gave up forward: counted for the retry
        Op.DONE,
        failed_forward,
        ("c", "null"),
        Outcome.LATE,
        SagaStatus.FAILED,
        _step_is("c", StepStatus.COMPLETED),
        prepare=lambda saga: saga.apply(Op.BEGIN, "c", "0", "") and None,
    ),
]


def _heartbeat_moved(saga: Saga, t: Transition) -> None:
    assert t.heartbeat_timeout == 1.0
    raw = saga.raw()
    assert int(raw["hbd:a"]) >= int(raw["t0:a"]) + 1000


def _no_change(t: Transition) -> None:
    assert t.changed_from is None and not t.due and t.next_deadline is not None


def _flag(saga: Saga, field: str) -> None:
    assert saga.raw().get(field) == "1"


def _reruns(saga: Saga, ids: list[str]) -> None:
    assert json.loads(saga.raw()["rrs"]) == ids


def _gone(saga: Saga) -> None:
    assert not saga.store.client.exists(saga.store.keys.record(saga.saga_id))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_op(store: RedisSagaStore, case: Case) -> None:
    saga = case.given(store)
    if case.prepare is not None:
        case.prepare(saga)
    operators = (Op.SWEEP, Op.CANCEL, Op.RETRY, Op.RERUN, Op.UNLOCK, Op.ADMIT, Op.PURGE, Op.SIGNAL, Op.UNWIND)
    gen = "*" if case.op in operators else GEN
    t = saga.apply(case.op, *case.args, gen=gen)
    assert (t.op, t.outcome, t.status) == (case.op, case.outcome, case.status)
    if case.check is not None:
        case.check(saga, t)


def test_every_op_and_outcome_is_covered() -> None:
    assert {c.op for c in CASES} | {Op.START, Op.ABORT} == set(Op)
    elsewhere = {Outcome.CREATED, Outcome.EXISTS, Outcome.CONFLICT, Outcome.ABORTED}  # start and abort, below
    elsewhere |= {Outcome.MISSING, Outcome.STALE, Outcome.CORRUPT}  # refusals every op shares, below
    elsewhere.add(Outcome.REJECTED)  # a message checked against another plan, below
    elsewhere.add(Outcome.LOCKED)  # a start refused by its lock: tests/test_locks.py
    elsewhere.add(Outcome.RELOCK)  # a cluster's start whose lock call is too old: tests/test_cluster_locks.py
    assert {c.outcome for c in CASES} | elsewhere == set(Outcome)


# -- start and abort -----------------------------------------------------------------


def test_start_creates_then_finds_the_same_saga_and_refuses_other_kwargs(store: RedisSagaStore) -> None:
    saga_id = str(uuid.uuid4())
    created = store.start(request(saga_id))
    assert (created.outcome, created.status, created.gen) == (Outcome.CREATED, SagaStatus.PENDING, GEN)
    assert Saga(store, saga_id).step("a").status is StepStatus.DISPATCHED
    # The same start again (its reply was lost): answered as the first time.
    assert store.start(request(saga_id)).outcome is Outcome.CREATED
    # Another start with the same id and kwargs finds it; other kwargs conflict.
    again = store.start(request(saga_id, gen="g2"))
    assert (again.outcome, again.gen) == (Outcome.EXISTS, GEN)
    assert store.start(request(saga_id, gen="g3", kwargs={"order": 2})).outcome is Outcome.CONFLICT


def test_abort_releases_a_pending_start_and_rolls_back_a_started_one(store: RedisSagaStore) -> None:
    saga = pending(store)
    t = store.abort_start(saga.saga_id, GEN, "s", "publish failed: boom", ["a"])
    assert (t.outcome, t.status, t.changed_from) == (Outcome.ABORTED, SagaStatus.FAILED, SagaStatus.PENDING)
    assert saga.raw()["reason"] == "publish"
    # The released key starts afresh.
    assert store.start(request(saga.saga_id, gen="g2")).outcome is Outcome.CREATED
    # A sibling already ran: the unpublished steps fail and the saga rolls back.
    two = Saga(store, str(uuid.uuid4()))
    store.start(request(two.saga_id))
    two.apply(Op.BEGIN, "a", "0", "")
    t = store.abort_start(two.saga_id, GEN, "s", "publish failed: boom", ["a"])
    assert (t.outcome, t.status) == (Outcome.ROLLBACK, SagaStatus.RUNNING)  # a ran: it decides


def test_a_message_checked_against_another_plan_changes_nothing(store: RedisSagaStore) -> None:
    # Given a saga whose step a is dispatched, and a's compensation of another saga due
    saga, undoing = pending(store), compensating(store)
    own = request(saga.saga_id).plan_digest
    before, undoing_before = saga.raw(), undoing.raw()

    # When a begin, and a compensation's begin, name another plan than the record's
    t = saga.apply(Op.BEGIN, "a", "0", "", "0123456789abcdef")
    u = undoing.apply(Op.COMP_BEGIN, "a", "0", "", "1", "0123456789abcdef")

    # Then both are rejected, and neither record changed
    assert (t.outcome, u.outcome) == (Outcome.REJECTED, Outcome.REJECTED)
    assert (saga.raw(), undoing.raw()) == (before, undoing_before)
    # While the record's own plan (or none named, from an older sender) runs it
    assert saga.apply(Op.BEGIN, "a", "0", "", own).outcome is Outcome.RUN
    assert undoing.apply(Op.COMP_BEGIN, "a", "0", "", "1", "").outcome is Outcome.RUN


def test_refusals_every_op_shares(store: RedisSagaStore) -> None:
    saga = running(store)
    for op in Op:
        if op in (Op.START, Op.PURGE):
            continue
        assert store.apply(op, "no-such-saga", "*", "s").outcome is Outcome.MISSING
        if op not in (Op.SWEEP, Op.CANCEL, Op.RETRY):
            assert saga.apply(op, "a", "0", "", gen="other").outcome is Outcome.STALE
    store.client.hset(store.keys.record(saga.saga_id), "v", "0")
    assert saga.apply(Op.BEGIN, "a", "0", "").outcome is Outcome.CORRUPT


# -- replay -----------------------------------------------------------------------------


REPLAYED = [
    (Op.BEGIN, pending, ("a", "0", "")),
    (Op.DONE, running, ("a", '{"reservation": "r1"}')),
    (Op.FAIL, running, ("a", "RuntimeError: no")),
    (Op.CANCEL, second_stage, ("cancelled",)),
    (Op.COMP_FAIL, compensating, ("a", "RuntimeError: down", "1")),
]


@pytest.mark.parametrize(("op", "given", "args"), REPLAYED, ids=lambda x: getattr(x, "__name__", str(x)))
def test_a_replayed_transition_id_gets_the_first_reply_and_changes_nothing(
    store: RedisSagaStore, op: Op, given: Build, args: tuple[str, ...]
) -> None:
    saga = given(store)
    if op is Op.COMP_FAIL:
        saga.apply(Op.COMP_BEGIN, "a", "0", "", "1")
    gen = "*" if op is Op.CANCEL else GEN
    first = saga.apply(op, *args, gen=gen, tx="tx-1")
    record = {k: v for k, v in saga.raw().items()}
    again = saga.apply(op, *args, gen=gen, tx="tx-1")
    assert again == first
    assert saga.raw() == record
    # A fresh id is a new call, which finds the first one applied.
    assert saga.apply(op, *args, gen=gen) != first


# -- the script speaks the enums' language --------------------------------------------


LUA = transitions_source()


def test_every_state_in_the_script_is_a_status_of_state_py() -> None:
    statuses = {s.value for enum in (SagaStatus, StepStatus, CompensationStatus) for s in enum}
    code = "\n".join(line.split("--", 1)[0] for line in LUA.splitlines() if not line.lstrip().startswith("--"))
    code = code[code.index("]]") :]  # after the header's drawing
    code = re.sub(r"redis\.p?call\('\w+'", "", code)  # Redis commands are not states
    found = set(re.findall(r"'([A-Z][A-Z_]+)'", code)) | set(re.findall(r"\b([A-Z][A-Z_]{3,}) = true", code))
    assert found, "no state found: the pattern no longer matches the script"
    assert found <= statuses, f"not a status in state.py: {sorted(found - statuses)}"


def test_the_script_handles_exactly_the_ops_and_replies_only_outcomes() -> None:
    handled = set(re.findall(r"^OPS\.(\w+) = ", LUA, re.M))
    assert handled == {op.value for op in Op}
    replied = set(re.findall(r"respond\('(\w+)'", LUA))
    assert replied == {o.value for o in Outcome}


# -- what a record keeps -------------------------------------------------------------------


def _tx_fields(saga: Saga) -> dict[str, str]:
    """The kept replies ("x:<op>..." slots)."""
    raw = saga.store.client.hgetall(saga.store.keys.record(saga.saga_id))
    return {k: v for k, v in raw.items() if k.startswith("x:")}


def test_a_replayed_next_stage_gets_its_data_rebuilt_and_no_reply_copies_data(store: RedisSagaStore) -> None:
    saga = running(store)
    first = saga.apply(Op.DONE, "a", '{"reservation": "r1"}', tx="tx-next")
    assert first.outcome is Outcome.NEXT_STAGE and first.data == {"order": 1, "reservation": "r1"}
    # The kept reply names the stage whose data to rebuild; it holds none of it.
    assert not any("reservation" in v or "order" in v for v in _tx_fields(saga).values())
    assert saga.apply(Op.DONE, "a", '{"reservation": "r1"}', tx="tx-next") == first


def test_a_replay_after_the_dedup_window_is_refused_safely(store: RedisSagaStore) -> None:
    saga = running(store)
    first = saga.apply(Op.DONE, "a", '{"reservation": "r1"}', tx="tx-old")
    assert first.outcome is Outcome.NEXT_STAGE
    # Age the kept reply past saga_dedup_window (its time is the second word).
    key = store.keys.record(saga.saga_id)
    kept = store.client.hget(key, "x:done:a:1")
    assert kept is not None and kept.startswith("tx-old ")
    tx_id, _, rest = kept.split(" ", 2)
    store.client.hset(key, "x:done:a:1", f"{tx_id} 1 {rest}")
    again = saga.apply(Op.DONE, "a", '{"reservation": "r1"}', tx="tx-old")
    # Applied afresh, the record refuses it: nothing published twice, nothing changed.
    assert (again.outcome, again.step_status) == (Outcome.DUPLICATE, StepStatus.COMPLETED)
    assert saga.step("b").status is StepStatus.DISPATCHED


def test_a_compensation_retried_200_times_grows_its_record_by_at_most_2_kb(store: RedisSagaStore) -> None:
    saga = compensating(store)
    key = store.keys.record(saga.saga_id)
    before = store.client.memory_usage(key, samples=0)  # exact: sampling depends on the hash seed
    for n in range(200):
        saga.apply(Op.COMP_BEGIN, "a", str(n), "", "1")
        assert saga.apply(Op.COMP_FAIL, "a", f"RuntimeError: refund down ({n})", "1").outcome is Outcome.BACKOFF
    after = store.client.memory_usage(key, samples=0)
    assert before is not None and after is not None
    assert after - before <= 2048, f"the record grew by {after - before} bytes"
    assert len(_tx_fields(saga)) <= 8
    assert saga.step("a").compensation_attempts == 200


def test_a_finished_record_is_compact_and_reads_the_same(store: RedisSagaStore) -> None:
    # Given a saga whose data has long values, non-ASCII text and the packing's own separators
    saga = Saga(store, str(uuid.uuid4()))
    kwargs = {"order": 1, "note": "Zürich: 12:30, 東京 " * 9}
    assert store.start(request(saga.saga_id, kwargs=kwargs)).outcome is Outcome.CREATED
    saga.apply(Op.BEGIN, "a", "0", "")
    saga.apply(Op.DONE, "a", json.dumps({"reservation": "r:1:" + "é" * 70}))
    for m in ("b", "c"):
        saga.apply(Op.BEGIN, m, "0", "")
        saga.apply(Op.DONE, m, json.dumps({m: m * 3}))
    # When it completes, its record is packed into short values: Redis's compact encoding
    key = store.keys.record(saga.saga_id)
    assert store.client.object("encoding", key) == "listpack"
    assert "zn" in store.client.hgetall(key)
    # Then it reads as before: statuses, results, data
    state = store.state(saga.saga_id)
    assert state.status is SagaStatus.COMPLETED and state.kwargs == kwargs
    assert state.step("a").result == {"reservation": "r:1:" + "é" * 70}
    assert [s.status for s in state.steps] == [StepStatus.COMPLETED] * 3
    assert state.data == {**kwargs, "reservation": "r:1:" + "é" * 70, "b": "bbb", "c": "ccc"}
    # And ops on it still work: a duplicate outcome is refused, and it stays compact
    assert saga.apply(Op.DONE, "c", "null").outcome is Outcome.DUPLICATE
    assert store.client.object("encoding", key) == "listpack"
    assert saga.apply(Op.CALLBACK_SENT, tx="").outcome is Outcome.RECORDED


def test_a_rolled_back_saga_with_an_unknown_step_leaves_the_deadline_index_after_the_window(
    store: RedisSagaStore,
) -> None:
    # Given a rolled-back saga whose step a has an unknown outcome
    saga = lost(store)
    saga.apply(Op.COMP_BEGIN, "a", "0", "", "1")
    assert saga.apply(Op.COMP_DONE, "a", "1").status is SagaStatus.COMPENSATED
    # Then sweepers keep looking for a late outcome, within saga_late_outcome_window
    assert store.sweep(saga.saga_id).next_deadline is not None
    # And once the rollback is older than the window, nothing is left to watch
    store.client.hset(store.keys.record(saga.saga_id), "status_at", "1")  # a compact record keeps it on top
    assert store.sweep(saga.saga_id).next_deadline is None


# -- indexes move with the transitions --------------------------------------------------


def _indexed_under(store: RedisSagaStore, saga_id: str) -> list[str]:
    """The statuses whose index (of saga name "s") holds ``saga_id``, and where listing finds it."""
    k, shard = store.keys, store.keys.shard_of(saga_id)
    indexed = [s.value for s in SagaStatus if store.client.zscore(k.name_index(shard, "s", s.value), saga_id)]
    listed = [s.value for s in SagaStatus if saga_id in store.list_ids(s, limit=1000)]
    assert listed == indexed
    return indexed


@pytest.mark.parametrize(
    "given",
    [pending, running, second_stage, completed, lost, compensating, compensated, failed, cancelled_and_compensated],
    ids=lambda b: b.__name__,
)
def test_a_saga_is_indexed_under_exactly_its_status_after_every_transition(store: RedisSagaStore, given: Build) -> None:
    saga = given(store)
    status = saga.status().value
    assert _indexed_under(store, saga.saga_id) == [status]
    assert store.counts()["s"][status] == 1 and sum(store.counts()["s"].values()) == 1


def test_a_message_for_a_missing_record_leaves_no_index_entry(store: RedisSagaStore) -> None:
    ghost = str(uuid.uuid4())
    t = store.apply(Op.BEGIN, ghost, GEN, "s", "a", "0", "", first=True)
    assert t.outcome is Outcome.MISSING
    assert _indexed_under(store, ghost) == []


def test_purge_and_an_aborted_start_leave_no_index_entry(store: RedisSagaStore) -> None:
    saga = compensated(store)
    assert store.purge(saga.saga_id).outcome is Outcome.PURGED
    assert _indexed_under(store, saga.saga_id) == []
    aborted = pending(store)
    store.abort_start(aborted.saga_id, GEN, "s", "publish failed: boom", ["a"])
    assert _indexed_under(store, aborted.saga_id) == []


def test_a_record_of_an_earlier_version_keeps_its_inline_backoff(store: RedisSagaStore) -> None:
    # Given a saga started before the backoff moved to "bo": its settings are inline JSON
    saga = compensating(store)
    key = store.keys.record(saga.saga_id)
    store.client.hdel(key, "bo")
    store.client.hset(
        key, "settings", json.dumps({"compensation_retry_backoff": 4.0, "compensation_retry_backoff_max": 8.0})
    )
    saga.apply(Op.COMP_BEGIN, "a", "0", "", "1")
    # Then a failed attempt is retried after that backoff (equal jitter: 2 to 4 s), not at once
    t = saga.apply(Op.COMP_FAIL, "a", "RuntimeError: down", "1")
    assert t.outcome is Outcome.BACKOFF and 2.0 <= t.due[0].delay <= 4.0


def test_an_early_event_is_consumed_when_the_saga_reaches_its_wait(store: RedisSagaStore) -> None:
    saga = before_wait(store)
    assert saga.apply(Op.SIGNAL, "ok", '{"by": "ann"}', gen="*").outcome is Outcome.RECORDED
    # The step before the wait completes: the wait is settled at once, and the stage after it is the one to publish
    t = saga.apply(Op.DONE, "a", '{"reservation": "r1"}')
    assert t.outcome is Outcome.NEXT_STAGE
    _past_the_wait(saga, t)


def test_an_early_reject_event_rolls_back_when_the_saga_reaches_its_wait(store: RedisSagaStore) -> None:
    saga = before_wait(store)
    assert saga.apply(Op.SIGNAL, "no", '{"why": "x"}', gen="*").outcome is Outcome.RECORDED
    t = saga.apply(Op.DONE, "a", '{"reservation": "r1"}')
    assert (t.outcome, t.status, [d.step for d in t.due]) == (Outcome.ROLLBACK, SagaStatus.COMPENSATING, ["a"])
    state = store.state(saga.saga_id)
    assert (state.reason, state.failed_step) == ("rejected", "wait:ok")


def test_an_unwound_child_is_back_in_the_deadline_index(store: RedisSagaStore) -> None:
    # Given a completed child saga, out of the deadline index (found by the fuzz test)
    saga = completed_child(store)
    due = store.keys.due(store.keys.shard_of(saga.saga_id))
    store.client.zrem(due, saga.saga_id)

    # When its parent rolls it back
    t = store.unwind(saga.saga_id, "parent rolls back")

    # Then its compensations' deadlines are watched: a sweeper will look
    assert t.outcome is Outcome.ROLLBACK and t.status is SagaStatus.COMPENSATING
    assert store.client.zscore(due, saga.saga_id) is not None


def test_a_step_that_completes_after_the_saga_ended_is_a_late_outcome(store: RedisSagaStore) -> None:
    # Given a saga past its pivot, with a wait and a step side by side (found by the fuzz test)
    plan = Plan(
        (
            (StepSpec("p", "t.p", None, timeout=60.0),),
            (StepSpec("wait:ok", "", None, stage=1, event="ok", reject="no"), StepSpec("c", "t.c", None, stage=1)),
        )
    )
    saga = Saga(store, str(uuid.uuid4()))
    assert store.start(request(saga.saga_id, plan=plan, pivot="p")).outcome is Outcome.CREATED
    saga.apply(Op.BEGIN, "p", "0", "")
    assert saga.apply(Op.DONE, "p", "null").outcome is Outcome.NEXT_STAGE
    saga.apply(Op.BEGIN, "c", "0", "")

    # When the wait is rejected (nothing can be undone past the pivot: the saga ends FAILED), then c completes
    assert store.signal(saga.saga_id, "no", "null").status is SagaStatus.FAILED
    t = saga.apply(Op.DONE, "c", '{"k": 1}')

    # Then c's success is kept apart as a late outcome: no step completes after the end
    assert (t.outcome, t.status) == (Outcome.LATE, SagaStatus.FAILED)
    step_c = saga.step("c")
    assert step_c.status is not StepStatus.COMPLETED and step_c.late_status is StepStatus.COMPLETED


# -- worker liveness and heartbeats ------------------------------------------------------


def test_a_step_that_misses_its_heartbeat_is_lost_at_the_next_sweep(store: RedisSagaStore) -> None:
    # Given a running with a heartbeat timeout of 1 s: begin set its heartbeat
    # deadline and (one server) moved the saga's index entry that early
    saga = heartbeating(store)
    hbd = int(saga.raw()["hbd:a"])
    due = store.keys.due(store.keys.shard_of(saga.saga_id))
    assert store.client.zscore(due, saga.saga_id) <= hbd
    # A sweep before it changes nothing, and says when to look again
    t = store.sweep(saga.saga_id)
    assert t.changed_from is None and t.next_deadline == hbd
    # When the heartbeat deadline passes
    saga.past("hbd:a")
    t = store.sweep(saga.saga_id)
    # Then the step is lost (unknown outcome, compensated blind), and counted
    assert (t.outcome, t.status) == (Outcome.SWEPT, SagaStatus.COMPENSATING)
    assert [d.step for d in t.due] == ["a"]
    step = saga.step("a")
    assert step.status is StepStatus.UNKNOWN and step.stopped_by == "lost"
    assert "sent no heartbeat for 1s" in (step.error or "")
    assert store.counters().get("lost:heartbeat") == 1
    # Its late outcome is a late outcome: kept, never a second completion
    late = saga.apply(Op.DONE, "a", '{"x": 1}')
    assert late.outcome is Outcome.LATE
    assert saga.step("a").late_status is StepStatus.COMPLETED


def test_a_lost_instance_is_claimed_once_and_a_restarted_node_name_claims_its_old_instances(
    store: RedisSagaStore,
) -> None:
    # Given two live instances, one of node name n1
    assert store.worker_alive("t-old", "n1@h", starting=True) is False
    store.worker_alive("t-other", "n2@h", starting=True)
    # Nobody is silent for an hour
    assert store.claim_lost_workers(3600, 30) == []
    # When n1 starts again: its older instance is dead (a node name is unique)
    store.worker_alive("t-new", "n1@h", starting=True)
    claimed = store.claim_lost_workers(3600, 30)
    # Then the next claim takes it, once, and nothing else
    assert [(w.token, w.hostname, w.last_seen) for w in claimed] == [("t-old", "n1@h", 0.0)]
    assert store.claim_lost_workers(3600, 30) == []
    # A claimer that dies leaves a lease that runs out: the next one takes it over
    store.client.zadd(store.keys.lost_workers(), {"t-old": 1})
    assert [w.token for w in store.claim_lost_workers(3600, 30)] == ["t-old"]
    store.lost_worker_handled("t-old")
    assert store.claim_lost_workers(3600, 30) == []
    workers = store.workers()
    assert workers["t-old"].lost and not workers["t-new"].lost and workers["t-new"].hostname == "n1@h"
    # A graceful stop makes it due at once (score 0), still with its name
    store.worker_stopped("t-other")
    assert [(w.token, w.hostname) for w in store.claim_lost_workers(3600, 30)] == [("t-other", "n2@h")]
    # An instance declared lost that writes again is back, and says it was lost
    assert store.worker_alive("t-other", "n2@h") is True
    assert not store.workers()["t-other"].lost
