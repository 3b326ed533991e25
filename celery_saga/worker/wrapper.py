"""The step wrapper: what runs around a step's or compensation's function, where the task runs.

In a prefork worker that is the pool child; in a solo or threads worker, the
worker's own process. An enabled app wraps each task's ``run``: a message
without saga headers runs the task exactly as before; one with them is
checked against the saga record first (may it run at all?), and its
outcome is recorded after. What follows each transition is `follow`'s to
decide.
"""

from __future__ import annotations

import functools
import logging
import time
import weakref
from collections.abc import Callable
from enum import IntEnum
from typing import Any

import redis
from celery import Task
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded, TimeLimitExceeded

from .. import codec
from ..context import StepContext, current_step, reset_current, set_current
from ..enqueue import data_of, enqueuer, next_parts
from ..errors import SagaError, SagaStoreMisconfigured, SagaStoreUnavailable, StepResultNotSerializable
from ..follow import Delivery, follow
from ..introspect import Params, params_of
from ..liveness import heartbeat, worker_token
from ..messages import Headers, MessageRejected, SagaHeaders, publish_stage, read_headers, resend, task_id
from ..plan import Plan
from ..redaction import ERROR_TEXT_MAX, NOTHING, Redaction, redacted_keys
from ..store import Op, Outcome, SagaStore, Transition
from ..stores import settings_of, store_for
from ..tracing import annotate_run
from ..views import command
from .claims import checked_plan, refuse

__all__ = ["CrashPoint", "error_text", "set_crash_hook", "set_fault_hook", "wrap", "wrapped"]

logger = logging.getLogger("celery_saga")

_WRAPPED: weakref.WeakSet[Task] = weakref.WeakSet()

# A message that cannot begin (the store cannot take the call) is re-sent
# after 1, 2, 4 ... up to 60 seconds.
_OUTAGE_RETRY_MAX = 60.0
# An outcome is written again for this long before the message is re-sent.
_OUTCOME_RETRY_FOR = 300.0


def wrapped(task: Task) -> bool:
    """True if ``task`` has the saga wrapper already."""
    return task in _WRAPPED


# Called with the step context right before a step or compensation function
# runs; what it raises counts as the function's own failure. Only
# celery_saga.testing sets it, to inject faults; it is None in production.
_fault_hook: Callable[[StepContext], None] | None = None


def set_fault_hook(hook: Callable[[StepContext], None] | None) -> None:
    """Install (or remove, with None) the fault-injection hook of ``celery_saga.testing``."""
    global _fault_hook
    _fault_hook = hook


def fault_hook() -> Callable[[StepContext], None] | None:
    """The fault-injection hook installed now, if any."""
    return _fault_hook


class CrashPoint(IntEnum):
    """The points where a worker can die while it handles a step or compensation message."""

    #: The message was received; the record does not say it runs yet.
    RECEIVED = 1
    #: The record says it runs; the function has not been called.
    RUNNING = 2
    #: The function returned or raised; its outcome is not recorded.
    RETURNED = 3
    #: The outcome is recorded; what follows it is not published.
    RECORDED = 4


# Called as (saga id, step, compensating, point) at each crash point. Only the
# workers of celery_saga.testing's crash-point explorer set it, to die there;
# it is None in production, where each point costs one global lookup.
_crash_hook: Callable[[str, str, bool, CrashPoint], None] | None = None


def set_crash_hook(hook: Callable[[str, str, bool, CrashPoint], None] | None) -> None:
    """Install (or remove, with None) the crash-point hook of ``celery_saga.testing``'s explorer workers."""
    global _crash_hook
    _crash_hook = hook


def _with_fault_hook(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if _fault_hook is not None:
            ctx = current_step()
            if ctx is not None:
                _fault_hook(ctx)
        return fn(*args, **kwargs)

    return call


def wrap(task: Task) -> None:
    """Wrap ``task.run``; messages without saga headers run it exactly as before."""
    # Injected faults must go where a real exception would come from: inside
    # Celery's autoretry wrapper, when the task has one, so they are retried.
    if hasattr(task, "_orig_run"):
        task._orig_run = _with_fault_hook(task._orig_run)
        original = task.run
    else:
        original = _with_fault_hook(task.run)
    params = params_of(original)

    @functools.wraps(original)
    def run(*args: Any, **kwargs: Any) -> Any:
        request = task.request
        saga_id = request.get(Headers.ID)
        if not saga_id or request.called_directly:
            return original(*args, **kwargs)
        try:
            # Checked before any transition: a malformed header changes nothing.
            message = _Message(task, request, kwargs, read_headers(request.get))
        except MessageRejected as exc:
            refuse(task.app, saga_id, task.name, exc)
            raise Ignore() from exc
        if message.headers.compensation:
            return _compensate(message, original, params)
        return _forward(message, original, params)

    task.run = run
    _WRAPPED.add(task)


def error_text(exc: BaseException, redaction: Redaction = NOTHING) -> str:
    """How an exception is recorded: its type and message, redacted values masked, bounded."""
    # Masked before it is cut: a cut could leave part of a secret unmatched.
    return redaction.text(f"{type(exc).__name__}: {exc}")[:ERROR_TEXT_MAX]


class _Message:
    """One saga message being handled: its task, request, kwargs and checked saga headers."""

    def __init__(self, task: Task, request: Any, kwargs: dict[str, Any], headers: SagaHeaders) -> None:
        self.task = task
        self.request = request
        self.kwargs = kwargs
        self.headers = headers
        self.saga_id = headers.saga_id
        self.name = headers.name
        self.step = headers.step
        self.gen = headers.gen
        self.round = headers.round
        self.retries = str(int(request.retries or 0))
        delivery = request.delivery_info or {}
        self.redelivered = "1" if delivery.get("redelivered") else ""
        self.first = headers.first
        self.delivery = Delivery(request.id, self.step, compensation=headers.compensation)
        #: The keys the saga redacts (its plan's and the app's), once `_begin` has read the plan.
        self.redact: frozenset[str] = frozenset()

    def apply(self, store: SagaStore, op: Op, *args: str, first: bool = False) -> Transition:
        """Apply ``op`` before the function runs, and follow it; if the store cannot take it, re-send the message.

        The function never runs without its record saying so.
        """
        try:
            t = store.apply(op, self.saga_id, self.gen, self.name, *args, first=first)
            follow(self.task.app, store, t, self.delivery)
        except SagaStoreUnavailable as exc:
            raise self.retry_later(exc) from exc
        return t

    def record(self, store: SagaStore, op: Op, *args: str, messages: tuple[str, ...] = ()) -> Transition:
        """Record the outcome of a function that ran, until the store takes it, then follow it.

        The effect is there: writing the outcome again (the same transition
        id, so it applies once) beats running the function again. Only after
        ``_OUTCOME_RETRY_FOR`` seconds is the message re-sent, to run again
        under its idempotency key.
        """
        if _crash_hook is not None:
            _crash_hook(self.saga_id, self.step, self.delivery.compensation, CrashPoint.RETURNED)
        tx, pause = store.new_tx(), 0.05
        give_up = time.monotonic() + _OUTCOME_RETRY_FOR
        while True:
            try:
                t = store.apply(op, self.saga_id, self.gen, self.name, *args, tx=tx, messages=messages)
                break
            except SagaStoreUnavailable as exc:
                # No record to write to will appear by waiting: the message goes (again) at once.
                if time.monotonic() + pause > give_up or self.poisoned(exc):
                    raise self.retry_later(exc) from exc
                _log_store_problem(self.saga_id, exc, f"recording the outcome of {self.what()} again")
                time.sleep(pause)
                pause = min(2.0, pause * 2)
        if _crash_hook is not None:
            _crash_hook(self.saga_id, self.step, self.delivery.compensation, CrashPoint.RECORDED)
        if t.outcome is Outcome.DUPLICATE and op in (Op.DONE, Op.FAIL, Op.LOST):
            logger.warning(
                "saga %s: %s ended, but the record already has its outcome (%s): this run's outcome is dropped. "
                "It ran more than once; its idempotency key %s is what keeps that harmless",
                self.saga_id,
                self.what(),
                t.step_status.value if t.step_status else "?",
                task_id(self.saga_id, self.step),
            )
        try:
            follow(self.task.app, store, t, self.delivery)
        except SagaStoreUnavailable as exc:
            # The outcome is written: a re-sent copy finds it and re-publishes what follows.
            raise self.retry_later(exc) from exc
        return t

    def retry_later(self, exc: SagaStoreUnavailable) -> Retry | Ignore:
        """The store cannot take the call: send this message again with backoff, never ack it away.

        Except poison: a message whose saga id names a key that is no saga
        record (WRONGTYPE) is dropped (Ignore: acked) after
        ``saga_store_error_max_retries``. A refused ACL (NOPERM) is retried
        until the operator fixes it.
        """
        retries = int(self.request.retries or 0)
        limit = _store_error_max_retries(self.task.app)
        if limit is not None and retries >= limit and self.poisoned(exc):
            logger.error(
                "saga %s: %s; %s dropped after %d retries: its saga id names a key that is no saga record. "
                "Remove that key if it is not another app's (saga_store_error_max_retries)",
                self.saga_id,
                exc,
                self.what(),
                retries,
            )
            return Ignore()
        delay = min(_OUTAGE_RETRY_MAX, 2.0 ** min(retries, 6))
        _log_store_problem(self.saga_id, exc, f"retrying {self.task.name} in {delay:.0f}s")
        return resend(self.task, self.request, self.kwargs, delay, exc)

    def poisoned(self, exc: SagaStoreUnavailable) -> bool:
        """True if ``exc`` is this message's own saga key being of the wrong type: no saga record."""
        if not (isinstance(exc, SagaStoreMisconfigured) and exc.wrong_type):
            return False
        try:
            # Another key of the wrong type (an index shard) is the store's problem, not this message's.
            return store_for(self.task.app).not_a_record(self.saga_id)
        except SagaError:
            return False  # cannot tell: keep the message

    def what(self) -> str:
        return f"compensation of {self.step!r}" if self.delivery.compensation else f"step {self.step!r}"


def _store_error_max_retries(app: Any) -> int | None:
    try:
        return settings_of(app).store_error_max_retries
    except SagaError:
        return None  # settings that cannot be read: keep the message


_logged_problems: set[str] = set()


def _log_store_problem(saga_id: str, exc: SagaStoreUnavailable, then: str) -> None:
    """A store that cannot take a call: WARNING; one that refuses it (ACL, key type): ERROR, once per problem."""
    if isinstance(exc, SagaStoreMisconfigured):
        if str(exc) not in _logged_problems and len(_logged_problems) < 100:
            _logged_problems.add(str(exc))
            logger.error("saga %s: %s; %s until it is fixed", saga_id, exc, then)
        return
    logger.warning("saga %s: %s; %s", saga_id, exc, then)


def _begin(message: _Message, op: Op, *args: str) -> tuple[SagaStore, Transition]:
    """Ask the record whether this copy may run; raise Ignore (acking it) if not.

    The message's task is checked against the plan first, and the
    transition checks that plan against the record's (`claims`).
    """
    if _crash_hook is not None:
        _crash_hook(message.saga_id, message.step, message.delivery.compensation, CrashPoint.RECEIVED)
    app = message.task.app
    try:
        store = store_for(app)
        try:
            digest = checked_plan(store, message.headers, message.task.name)
        except SagaStoreUnavailable as exc:
            raise message.retry_later(exc) from exc
        plan = store.plan(digest) if digest else None
        message.redact = redacted_keys(app, plan)
        # The worker's instance token names who runs it (celery_saga.liveness).
        extra = [digest, worker_token()]
        if op is Op.BEGIN and plan is not None and _builds_next(app, store, plan, message.step):
            extra.append("1")  # the stage's data back, to build the next stage from
        t = message.apply(store, op, *args, *extra, first=message.first and op is Op.BEGIN)
    except Retry:
        raise
    except MessageRejected as exc:
        refuse(app, message.saga_id, message.task.name, exc)
        raise Ignore() from exc
    except (SagaError, redis.RedisError, ValueError, KeyError) as exc:
        logger.error("saga %s: cannot run %s, record unusable: %s", message.saga_id, message.what(), error_text(exc))
        raise Ignore() from exc
    if t.outcome is Outcome.REJECTED:
        rejected = MessageRejected("plan", f"it was sent for another plan ({digest}) than the record's")
        refuse(app, message.saga_id, message.task.name, rejected)
        raise Ignore()
    if t.outcome is not Outcome.RUN:
        _log_not_run(store, message, t)
        raise Ignore()
    if _crash_hook is not None:
        _crash_hook(message.saga_id, message.step, message.delivery.compensation, CrashPoint.RUNNING)
    annotate_run(message.saga_id, message.name, message.step, message.delivery.compensation, message.round)
    return store, t


def _log_not_run(store: SagaStore, message: _Message, t: Transition) -> None:
    saga_id, what = message.saga_id, message.what()
    if t.outcome is Outcome.MISSING and store.lost_in_reset(saga_id, message.headers.epoch or None):
        logger.error("saga %s: lost in the reset of the saga store; %s is not run", saga_id, what)
    elif t.outcome is Outcome.MISSING:
        logger.error(
            "saga %s: no record for %s in %s; it never existed there or expired. Every worker "
            "must use the same saga_redis_url and saga_key_prefix as the app that started the saga",
            saga_id,
            what,
            store.where(),
        )
    elif t.outcome is Outcome.CORRUPT:
        logger.error(
            "saga %s: the record of %s in %s is corrupt; nothing was run. Inspect it with `%s`, or purge it",
            saga_id,
            what,
            store.where(),
            command(message.task.app.main, "show", saga_id),
        )
    elif t.outcome is Outcome.STALE:
        logger.warning("saga %s: %s belongs to an earlier start of this saga; skipped", saga_id, what)
    else:
        logger.info("saga %s: %s skipped (%s)", saga_id, what, t.outcome.value)


def _forward(message: _Message, original: Any, params: Params) -> Any:
    store, t = _begin(message, Op.BEGIN, message.step, message.retries, message.redelivered)
    request = message.request
    call = params.pick({**message.kwargs, **message.headers.bound})
    # A retry (the task's own, or ours) re-sends request.kwargs, and Celery
    # checks them against the signature: send only what the function takes.
    request.kwargs = call
    key = task_id(message.saga_id, message.step)
    token = set_current(
        StepContext(
            message.saga_id,
            message.name,
            message.step,
            False,
            key,
            t.attempt,
            forward_key=key,
            beat=functools.partial(heartbeat, message.task.app),
        )
    )
    redaction = Redaction.of(message.redact, message.kwargs, message.headers.bound)
    try:
        result = original(**call)
    except Retry as exc:
        redaction.exception(exc)
        raise
    except (TimeLimitExceeded, SoftTimeLimitExceeded) as exc:
        # Cut off mid-way: the effect is unknown, not absent.
        message.record(store, Op.LOST, message.step, error_text(exc), "timeout")
        raise
    except Reject as exc:
        if not exc.requeue:
            message.record(store, Op.FAIL, message.step, error_text(exc, redaction))
        redaction.exception(exc)
        raise
    except Ignore:
        raise
    except Exception as exc:
        message.record(store, Op.FAIL, message.step, error_text(exc, redaction))
        # Celery logs it, and sends it in task-failed: masked from here on.
        shown = redaction.exception(exc)
        if shown is not exc:
            raise shown from None
        raise
    finally:
        reset_current(token)
    try:
        # Bounded in depth too: the next stage's messages carry it, and too deep for a prefork
        # worker to pickle, they would kill it (and, redelivered, the next one).
        result_json = codec.dumps(result, max_depth=settings_of(message.task.app).max_data_depth)
    except (TypeError, ValueError) as exc:
        # The function ran: its effect may be there, so the outcome is
        # unknown and the step is compensated blind, not left as a failure.
        found = codec.unstorable(result, "result", settings_of(message.task.app).max_data_depth)
        path, type_name = found or ("result", type(result).__name__)
        error = StepResultNotSerializable(message.step, path, type_name, codec.STORABLE)
        message.record(store, Op.LOST, message.step, error_text(error), "unstorable")
        raise error from exc
    # The effect happened: if the store is down now, the message is sent
    # again, and running again is what the step's idempotency key is for.
    t = message.record(store, Op.DONE, message.step, result_json, messages=_next_stage(message, store, t, result_json))
    if t.outcome is Outcome.MISSING:
        lost = store.lost_in_reset(message.saga_id, message.headers.epoch or None)
        logger.warning(
            "saga %s: step %r finished after its record %s; its effect is not compensated",
            message.saga_id,
            message.step,
            "was lost in a reset of the saga store" if lost else "expired (saga_retention) or was purged",
        )
    # The record has the real result; Celery only shows this one (logs, task-succeeded).
    return redaction.value(result)


def _builds_next(app: Any, store: SagaStore, plan: Plan, step: str) -> bool:
    """True if the done of ``step`` may push the next stage itself: it is alone in its stage, and one follows."""
    try:
        k = plan.step(step).stage
    except KeyError:
        return False  # the begin rejects it
    if len(plan.stages[k]) != 1 or k + 1 >= len(plan.stages):
        return False
    return any(not spec.is_wait for spec in plan.stages[k + 1]) and enqueuer(app, store) is not None


def _next_stage(message: _Message, store: SagaStore, begun: Transition, result_json: str) -> tuple[str, ...]:
    """The next stage's messages, for the done to push itself (`celery_saga.enqueue`); () to publish after it."""
    app = message.task.app
    builder = enqueuer(app, store) if begun.stage_data else None
    if builder is None:
        return ()
    digest = message.headers.plan
    plan = store.plan(digest)
    k = plan.step(message.step).stage + 1
    specs = [spec for spec in plan.stages[k] if not spec.is_wait]
    parts = next_parts(begun.stage_data, result_json)
    try:
        data = data_of(parts)
    except (ValueError, TypeError, IndexError):
        return ()  # the transition's own reply carries the data then
    epoch, secrets = store.epoch(), plan.redacted_keys
    built = builder.build(
        k,
        parts,
        lambda producer: publish_stage(
            app,
            message.saga_id,
            message.name,
            message.gen,
            specs,
            data,
            False,
            secrets,
            epoch,
            plan=digest,
            producer=producer,
        ),
    )
    return () if built is None else built.args


def _compensate(message: _Message, original: Any, params: Params) -> Any:
    round_ = str(message.round)
    store, t = _begin(message, Op.COMP_BEGIN, message.step, message.retries, message.redelivered, round_)
    request = message.request
    known = message.headers.known
    ctx = StepContext(
        message.saga_id,
        message.name,
        message.step,
        True,
        task_id(message.saga_id, message.step, undo=True, round=message.round),
        t.attempt,
        round=message.round,
        result_known=True if known is None else bool(known),
        forward_key=task_id(message.saga_id, message.step),
    )
    token = set_current(ctx)
    call = request.kwargs = params.pick(message.kwargs)
    redaction = Redaction.of(message.redact, message.kwargs)
    try:
        result = original(**call)
    except (Retry, Ignore) as exc:
        # Ignore: the outcome comes later, by another message (a child saga's end).
        redaction.exception(exc)
        raise
    except Exception as exc:
        t = message.record(store, Op.COMP_FAIL, message.step, error_text(exc, redaction), round_)
        shown = redaction.exception(exc)
        if t.outcome is Outcome.BACKOFF:
            # follow() has sent the next attempt; Retry only tells Celery so.
            delay = next(d.delay for d in t.due if d.step == message.step and d.attempt)
            logger.warning(
                "saga %s: compensation of %r failed (attempt %s): %s; retrying in %.2fs",
                message.saga_id,
                message.step,
                t.attempt,
                error_text(exc, redaction),
                delay,
            )
            raise Retry(f"saga retry in {delay:.2f}s", exc=shown, when=delay) from shown
        if shown is not exc:
            raise shown from None
        raise
    finally:
        reset_current(token)
    message.record(store, Op.COMP_DONE, message.step, round_)
    return redaction.value(result)
