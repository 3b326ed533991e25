"""Outcomes Celery reports only in the worker's main process, where no step wrapper runs.

A lost pool child, a hard time limit, a revoke, an expired message or a
message for a task the worker does not have end a task in the worker's main
process, and Celery calls no errback for revokes.
These handlers record the outcome there. A hard time limit fires
task_failure twice in Celery 5.7; the transitions only apply to a step still
running, so the second call changes nothing.

Celery sends task_failure for a lost worker only when it neither requeues
(acks_late + reject_on_worker_lost) nor retries (retry_on_worker_lost) the
message: when the app asked for redelivery, the step stays running and the
next copy (or the deadline) decides.
"""

from __future__ import annotations

import logging
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import Task, signals
from celery.exceptions import TimeLimitExceeded

from ..errors import SagaError
from ..follow import follow
from ..messages import Headers, MessageRejected, SagaHeaders, parse_task_id, read_headers
from ..store import Op, Outcome
from ..stores import store_for
from .apps import is_enabled
from .claims import checked_plan, refuse
from .wrapper import error_text

__all__ = ["connect_signals"]

logger = logging.getLogger("celery_saga")

_connected = False


def _record(task: Task, task_id: str | None, headers: SagaHeaders | None, op: Op, error: str, why: str = "") -> None:
    """Apply ``op`` (or, for a compensation, ``comp_fail``) for the message ``task_id`` and follow it.

    ``headers`` are the message's, when Celery still has them; the message
    is checked against its record and plan first (`claims`), like any other.
    """
    app = task.app
    if not is_enabled(app):
        return
    parsed = parse_task_id(task_id)
    if parsed is None:
        return
    saga_id, step, round_ = parsed
    try:
        if headers is not None and (headers.saga_id, headers.step) != (saga_id, step):
            raise MessageRejected("header", f"its task id {task_id!r} names another saga or step than its headers")
        store = store_for(app)
        raw = store.load(saga_id)
        name = raw.get("name", "")
        if headers is None:
            # A hard time limit: Celery has the task id only. The function ran,
            # so its begin was checked, generation included; the task still is.
            headers = SagaHeaders(
                saga_id, name, step, raw.get("gen", ""), bool(round_), round_ or 1, {}, False, None, "", ""
            )
        checked_plan(store, headers, task.name)
        if round_:
            t = store.compensation_failed(saga_id, headers.gen, name, step, error, round_)
        else:
            t = store.apply(op, saga_id, headers.gen, name, step, error, *([why] if why else []))
        follow(app, store, t)
    except MessageRejected as exc:
        refuse(app, saga_id, task.name, exc)
    except SagaError as exc:
        logger.error("saga %s: could not record %s of %r: %s", saga_id, error, step, exc)
    except Exception:
        logger.exception("saga %s: could not record %s of %r", saga_id, error, step)


def _headers(get: Any) -> SagaHeaders | MessageRejected | None:
    """The message's checked saga headers; None if it has none; the rejection if they are malformed."""
    if get is None or not get(Headers.ID):
        return None
    try:
        return read_headers(get)
    except MessageRejected as exc:
        return exc


def _on_task_failure(
    sender: Task | None = None, task_id: str | None = None, exception: BaseException | None = None, **_: Any
) -> None:
    # Failures raised inside the task were recorded by the wrapper already.
    if sender is None or not isinstance(exception, (WorkerLostError, TimeLimitExceeded)):
        return
    # For a lost worker Celery pushes the request before sending the signal;
    # for a hard time limit it does not, and the record's generation is used.
    request = sender.request
    headers = _headers(request.get) if request.id == task_id else None
    if isinstance(headers, MessageRejected):
        refuse(sender.app, request.get(Headers.ID), sender.name, headers)
        return
    # The function was cut off mid-way: its effect is unknown, not absent.
    why = "timeout" if isinstance(exception, TimeLimitExceeded) else "lost"
    _record(sender, task_id, headers, Op.LOST, error_text(exception), why)


def _on_task_revoked(sender: Task | None = None, request: Any = None, expired: bool = False, **_: Any) -> None:
    if sender is None or request is None:
        return
    # Celery passes the request's Context: its headers are its attributes.
    get = getattr(request, "get", None)
    headers = _headers(get)
    if headers is None:
        return
    if isinstance(headers, MessageRejected):
        refuse(sender.app, get(Headers.ID) if get else None, sender.name, headers)
        return
    task_id = getattr(request, "id", None)
    if expired:
        # A step message expires at its deadline: a timeout of a step that
        # never started, not a failure. Said at WARNING: the queue was slower
        # than the step's deadline, which an operator should hear about.
        logger.warning(
            "saga %s: the message of %s %r expired in the queue: its deadline (%s) passed before any "
            "worker took it, so it never runs",
            headers.saga_id,
            "the compensation of" if headers.compensation else "step",
            headers.step,
            getattr(request, "expires", None) or "?",
        )
        _record(sender, task_id, headers, Op.EXPIRE, "expired: the message expired before it ran")
    else:
        _record(sender, task_id, headers, Op.FAIL, "revoked: the message was revoked before it ran")


def _on_task_unknown(sender: Any = None, message: Any = None, name: str | None = None, **_: Any) -> None:
    """A saga message for a task this worker does not have: fail it now, not at its deadline.

    Celery rejects the message (it is not delivered again); without this the
    saga would wait for the step's deadline and record only "timeout". Only
    when the plan names that very task for the step: a message of any other
    task that carries a saga's headers changes nothing.
    """
    headers_in = getattr(message, "headers", None) or {}
    app = getattr(sender, "app", None)
    if app is None or not is_enabled(app):
        return
    headers = _headers(headers_in.get)
    if headers is None:
        return
    task_name = str(name)
    if isinstance(headers, MessageRejected):
        refuse(app, headers_in.get(Headers.ID), task_name, headers)
        return
    saga_id, step = headers.saga_id, headers.step
    error = f"NotRegistered: task {name!r} is not registered on worker {getattr(sender, 'hostname', '?')}"
    try:
        store = store_for(app)
        digest = checked_plan(store, headers, task_name)
        if headers.compensation:
            # An attempt that cannot even begin counts as a failed attempt.
            round_ = str(headers.round)
            t = store.apply(Op.COMP_BEGIN, saga_id, headers.gen, headers.name, step, "0", "", round_, digest)
            if t.outcome is Outcome.RUN:
                t = store.apply(Op.COMP_FAIL, saga_id, headers.gen, t.name, step, error, round_)
        else:
            t = store.apply(Op.FAIL, saga_id, headers.gen, headers.name, step, error)
        logger.error("saga %s: %s", saga_id, error)
        follow(app, store, t)
    except MessageRejected as exc:
        refuse(app, saga_id, task_name, exc)
    except SagaError as exc:
        logger.error("saga %s: could not record that task %r is not registered: %s", saga_id, name, exc)
    except Exception:
        logger.exception("saga %s: could not record that task %r is not registered", saga_id, name)


def connect_signals() -> None:
    """Connect the main-process handlers once per process; they ignore apps that are not enabled."""
    global _connected
    if _connected:
        return
    _connected = True
    signals.task_failure.connect(_on_task_failure, weak=False, dispatch_uid="celery_saga.task_failure")
    signals.task_revoked.connect(_on_task_revoked, weak=False, dispatch_uid="celery_saga.task_revoked")
    signals.task_unknown.connect(_on_task_unknown, weak=False, dispatch_uid="celery_saga.task_unknown")
