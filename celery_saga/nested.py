"""Sagas made of sagas: a ``Saga`` used as a step of another.

The step that is a child saga (named after it) is an ordinary step whose
task, ``celery_saga.child``, starts the child with the id
``<parent_id>:<child_name>`` and the parent's data, then leaves the step
running. Its compensation, ``celery_saga.undo_child``, rolls the child back
as a unit (``unwind``): a completed child compensates its completed steps in
reverse order and ends COMPENSATED with reason ``"parent"``; a running one
is cancelled. Either way the compensation stays running too.

The parent learns of the child's end by a message, never by a script that
touches both records (so they may live in different slots of a Redis
Cluster): ``celery_saga.child_ended`` is the child's end callback, sent like
any ``on_complete``/``on_failure`` (and by a sweeper if the process that
ended the child died first). It records the child's outcome as the outcome
of the parent's step, or of its compensation.

These three tasks are registered on every enabled app, and go to its
default queue.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.exceptions import Ignore

from . import codec
from .context import current_step
from .errors import SagaDefinitionError, SagaError, SagaNotFound
from .follow import follow
from .messages import CHILD_ENDED_TASK, CHILD_TASK, UNDO_CHILD_TASK, MessageRejected
from .registry import DefinedSaga, sagas_of
from .state import CompensationStatus, SagaState, SagaStatus, StepStatus
from .store import Op, SagaStore
from .stores import store_for
from .worker.claims import refuse

__all__ = ["CHILD_ENDED_TASK", "CHILD_TASK", "UNDO_CHILD_TASK", "child_id", "register_tasks"]

logger = logging.getLogger("celery_saga")


_FORWARD = (StepStatus.DISPATCHED.value, StepStatus.RUNNING.value)
_UNDOING = tuple(
    s.value for s in (CompensationStatus.DISPATCHED, CompensationStatus.RUNNING, CompensationStatus.RETRYING)
)


def child_id(parent_id: str, step: str) -> str:
    """The id of the child saga that is step ``step`` of saga ``parent_id``."""
    return f"{parent_id}:{step}"


def register_tasks(app: Celery) -> None:
    """Register the three tasks of child sagas on ``app`` (once)."""
    if CHILD_TASK in app._tasks:  # (not app.tasks: that would finalize the app)
        return
    # ignore_result: the record holds their outcome (and a result-backend subscription per call would leak).
    app.task(name=CHILD_TASK, bind=True, shared=False, ignore_result=True)(_start_child)
    app.task(name=UNDO_CHILD_TASK, bind=True, shared=False, ignore_result=True)(_undo_child)
    app.task(name=CHILD_ENDED_TASK, bind=True, shared=False, ignore_result=True)(_child_ended)


def _saga_named(app: Celery, name: str) -> DefinedSaga:
    for saga in sagas_of(app):
        if saga.name == name:
            return saga
    raise SagaDefinitionError(
        f"child saga {name!r} is not defined in this worker: import the module that defines it "
        f"(the parent saga's module does, if it is imported)"
    )


def _start_child(task: Task, **data: Any) -> None:
    """A child saga's step: start the child (idempotent), and leave the step running until it ends."""
    ctx = current_step()
    if ctx is None:
        raise SagaError(f"{CHILD_TASK} runs only as a step of a saga")
    gen = task.request.get("saga_gen") or ""
    _saga_named(task.app, ctx.step).start_as_child(ctx.saga_id, gen, data)
    raise Ignore()  # the step's outcome comes with the child's end: celery_saga.child_ended


def _undo_child(task: Task, **_: Any) -> None:
    """A child saga's compensation: roll the child back as a unit; its end records this compensation's outcome."""
    ctx = current_step()
    if ctx is None or not ctx.compensating:
        raise SagaError(f"{UNDO_CHILD_TASK} runs only as a compensation of a saga")
    app, store = task.app, store_for(task.app)
    cid, gen = child_id(ctx.saga_id, ctx.step), task.request.get("saga_gen") or ""
    t = store.unwind(cid, f"saga {ctx.saga_id} rolls back")
    if t.status is None:
        if not ctx.result_known:
            return None  # the child never started: nothing to undo
        # It completed, and its record is gone: what it did cannot be undone. Say so (FAILED), never "undone".
        error = (
            f"child saga {cid} completed, and its record expired (saga_retention) or was purged before its "
            f"parent rolled back: its effects cannot be compensated. Keep saga_retention above your sagas' "
            f"longest run"
        )
        parent = store.load(ctx.saga_id)
        t = store.apply(Op.COMP_FAIL, ctx.saga_id, gen, parent.get("name", ""), ctx.step, error, "1", "1")
        follow(app, store, t)
        raise Ignore()
    follow(app, store, t)
    if t.status.finished and t.status is not SagaStatus.COMPLETED:
        # It had ended already (compensated, or failed): its end was reported
        # when the parent did not wait for it yet. Report it again, for this compensation.
        _report(app, store, store.state(cid), ctx.saga_id, gen, ctx.step)
    raise Ignore()  # this compensation's outcome comes with the child's end


def _child_ended(task: Task, saga_id: str, parent: str, parent_gen: str) -> None:
    """The end callback of a child saga: record its outcome in the parent.

    It is a plain task anyone may send, so it acts only when the child's own
    record names that parent, at that generation, and the step it is of.
    """
    store = store_for(task.app)
    try:
        child = store.state(saga_id)
        raw = store.load(saga_id)
    except SagaNotFound:
        logger.warning("saga %s: child saga ended, but its record is gone; its parent %s waits for it", saga_id, parent)
        return
    step = raw.get("pstep", "")
    claimed = (raw.get("parent"), raw.get("pgen"), saga_id)
    if not step or not isinstance(parent_gen, str) or claimed != (parent, parent_gen, child_id(parent, step)):
        detail = (
            f"{CHILD_ENDED_TASK} for saga {saga_id!r} names parent {parent!r} at generation {parent_gen!r}, "
            f"which the child's record does not"
        )
        refuse(task.app, parent, CHILD_ENDED_TASK, MessageRejected("parent", detail))
        return
    _report(task.app, store, child, parent, parent_gen, step)


def _report(app: Celery, store: SagaStore, child: SagaState, parent: str, gen: str, step: str) -> None:
    """What the child's end means for the parent: its step's outcome, or its compensation's."""
    try:
        raw = store.load(parent)
    except SagaNotFound:
        logger.warning("saga %s: child saga ended, but its parent %s is gone", child.saga_id, parent)
        return
    # Never the record's own generation in place of the message's: a report
    # for an earlier start of the parent is stale, not current.
    name = raw.get("name", "")
    forward, undoing = raw.get(f"s:{step}") in _FORWARD, raw.get(f"cs:{step}") in _UNDOING
    what = f"child saga {child.saga_id} ended {child.status.value}"
    if child.reason and child.status is not SagaStatus.COMPLETED:
        what += f" ({child.reason}: {child.error})"
    if child.status is SagaStatus.COMPLETED:
        if forward:
            t = store.apply(Op.DONE, parent, gen, name, step, codec.dumps(child.data))
        elif undoing:
            t = store.unwind(child.saga_id, f"saga {parent} rolls back")  # it completed as it was being undone
        else:
            return
    elif child.status is SagaStatus.COMPENSATED:
        if forward:
            t = store.apply(Op.FAIL, parent, gen, name, step, what)
        elif undoing:
            t = store.apply(Op.COMP_DONE, parent, gen, name, step, "1")
        else:
            return
    elif child.status is SagaStatus.FAILED:
        # Its compensations gave up, so its effects may remain: the parent ends FAILED too.
        if forward:
            t = store.apply(Op.FAIL, parent, gen, name, step, what, "1")
        elif undoing:
            t = store.apply(Op.COMP_FAIL, parent, gen, name, step, what, "1", "1")
        else:
            return
    else:
        return
    follow(app, store, t)
