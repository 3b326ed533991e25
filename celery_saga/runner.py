"""The step wrapper: what runs around a step's or compensation's function, in the pool.

An enabled app wraps each task's ``run``: a message without saga headers
runs the task exactly as before; one with them is checked against the saga
record first (may it run at all?), and its outcome is recorded after.
"""

from __future__ import annotations

import functools
import json
import logging
import weakref
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery, Task
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded, TimeLimitExceeded

from .announce import compensation_attempt_failed, saga_transition, step_event
from .app import store_for
from .dispatch import Headers, react, redrive, task_id
from .errors import SagaError, SagaStoreUnavailable, StepResultNotSerializable
from .settings import backoff_delay
from .step import Params, StepContext, current_step, params_of, reset_current, set_current
from .store.base import SagaStore

__all__ = ["error_text", "set_fault_hook", "wrap", "wrapped"]

logger = logging.getLogger("celery_saga")

_WRAPPED: weakref.WeakSet[Task] = weakref.WeakSet()


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
        if request.get(Headers.UNDO):
            return _compensate(task, original, params, request, kwargs)
        return _forward(task, original, params, request, kwargs)

    task.run = run
    _WRAPPED.add(task)


def error_text(exc: BaseException) -> str:
    """How an exception is recorded: its type and message, bounded."""
    return f"{type(exc).__name__}: {exc}"[:2000]


def _resend(task: Task, request: Any, kwargs: dict[str, Any], countdown: float, exc: BaseException) -> Retry:
    """Send this message again after ``countdown``, as a Celery retry of the same task id.

    Not ``task.retry()``: it would count against the task's own max_retries,
    and Celery type-checks its kwargs, which for a step hold the whole saga
    data (the participant filters on receipt). The caller raises the Retry.
    """
    # Route it where this copy came from, as Celery's own retry does.
    delivery = request.delivery_info or {}
    exchange, routing_key = delivery.get("exchange"), delivery.get("routing_key")
    route: dict[str, Any] = {}
    if exchange == "" and routing_key:
        route["queue"] = routing_key
    elif routing_key:
        route.update(exchange=exchange, routing_key=routing_key)
    task.app.send_task(
        task.name,
        args=(),
        kwargs=kwargs,
        task_id=request.id,
        countdown=countdown,
        headers=dict(request.headers or {}),
        retries=int(request.retries or 0) + 1,
        root_id=request.root_id,
        parent_id=request.parent_id,
        ignore_result=True,
        serializer="json",
        **route,
    )
    return Retry(f"saga retry in {countdown:.2f}s", exc=exc, when=countdown)


def _store_retry(task: Task, request: Any, kwargs: dict[str, Any], exc: SagaStoreUnavailable) -> Retry:
    """The store is down: retry the message with backoff; it never runs without a record."""
    delay = min(60.0, 2.0 ** min(int(request.retries or 0), 6))
    logger.warning("saga %s: %s; retrying %s in %.0fs", request.get(Headers.ID), exc, task.name, delay)
    return _resend(task, request, kwargs, delay, exc)


class _Ctx:
    """The saga headers of one message."""

    def __init__(self, request: Any) -> None:
        self.saga_id: str = request.get(Headers.ID)
        self.name: str = request.get(Headers.NAME) or ""
        self.step: str = request.get(Headers.STEP) or ""
        self.gen: str = request.get(Headers.GEN) or ""
        self.retries = str(int(request.retries or 0))
        delivery = request.delivery_info or {}
        self.redelivered = "1" if delivery.get("redelivered") else ""
        self.first = bool(request.get(Headers.FIRST))


def _not_run(app: Celery, store: SagaStore, ctx: _Ctx, tag: str, what: str) -> Ignore:
    """Log why a message is skipped; the returned Ignore acks it without running anything."""
    if tag == "missing":
        logger.error(
            "saga %s: no record for %s %r in %s; it never existed there or expired. Every worker "
            "must use the same saga_redis_url and saga_key_prefix as the app that started the saga",
            ctx.saga_id,
            what,
            ctx.step,
            store.where(),
        )
    elif tag == "corrupt":
        logger.error(
            "saga %s: the record of %s %r in %s is corrupt; nothing was run. Inspect it with "
            "`celery saga show %s`, or purge it",
            ctx.saga_id,
            what,
            ctx.step,
            store.where(),
            ctx.saga_id,
        )
    elif tag == "stale":
        logger.warning("saga %s: %s %r belongs to an earlier start of this saga; skipped", ctx.saga_id, what, ctx.step)
    else:
        logger.info("saga %s: %s %r skipped (%s)", ctx.saga_id, what, ctx.step, tag)
    return Ignore()


def _forward(task: Task, original: Any, params: Params, request: Any, kwargs: dict[str, Any]) -> Any:
    app = task.app
    ctx = _Ctx(request)
    try:
        store = store_for(app)
        t = store.step("begin", ctx.saga_id, ctx.gen, ctx.name, ctx.step, ctx.retries, ctx.redelivered, first=ctx.first)
        if t.tag == "dup" and t.status:
            redrive(app, store, ctx.saga_id)
        elif t.tag == "fenced":
            # Fenced or timed out: this copy runs nothing. If finding it past
            # its deadline started the rollback, publish what that calls for.
            react(app, store, ctx.saga_id, ctx.name, ctx.gen, t)
    except SagaStoreUnavailable as exc:
        raise _store_retry(task, request, kwargs, exc) from exc
    except (SagaError, redis.RedisError, ValueError, KeyError) as exc:
        logger.error("saga %s: cannot start step %r, record unusable: %s", ctx.saga_id, ctx.step, error_text(exc))
        raise Ignore() from exc
    if t.tag != "run":
        step_event(app, "skipped", request.id, ctx.saga_id, ctx.name, ctx.step, reason=t.tag)
        raise _not_run(app, store, ctx, t.tag, "step")
    if t.changed_from:
        saga_transition(app, ctx.saga_id, ctx.name, t, lambda: store.load(ctx.saga_id))

    attempt = int(t.extra[0])
    call = params.pick({**kwargs, **(request.get(Headers.BOUND) or {})})
    # A retry (the task's own, or ours) re-sends request.kwargs, and Celery
    # checks them against the signature: send only what the function takes.
    request.kwargs = call
    key = f"{ctx.saga_id}:{ctx.step}"
    step_ctx = StepContext(ctx.saga_id, ctx.name, ctx.step, False, key, attempt, forward_key=key)
    token = set_current(step_ctx)
    try:
        result = original(**call)
    except Retry:
        raise
    except (TimeLimitExceeded, SoftTimeLimitExceeded) as exc:
        # Cut off mid-way: the effect is unknown, not absent.
        _record_unknown(app, store, ctx, task, request, kwargs, exc)
        raise
    except Reject as exc:
        if not exc.requeue:
            _record_failure(app, store, ctx, task, request, kwargs, exc)
        raise
    except Ignore:
        raise
    except Exception as exc:
        _record_failure(app, store, ctx, task, request, kwargs, exc)
        raise
    finally:
        reset_current(token)
    try:
        result_json = json.dumps(result)
    except (TypeError, ValueError) as exc:
        error = StepResultNotSerializable(ctx.step, exc)
        _record_failure(app, store, ctx, task, request, kwargs, error)
        raise error from exc
    try:
        t = store.step("done", ctx.saga_id, ctx.gen, ctx.name, ctx.step, result_json)
        if t.tag == "missing":
            logger.warning(
                "saga %s: step %r finished after its record expired (saga_retention) or was purged; "
                "its effect is not compensated",
                ctx.saga_id,
                ctx.step,
            )
        elif t.tag != "dup":
            step_event(app, "done", request.id, ctx.saga_id, ctx.name, ctx.step)
        react(app, store, ctx.saga_id, ctx.name, ctx.gen, t)
    except SagaStoreUnavailable as exc:
        # The effect happened but is not recorded; running again is what the
        # step's idempotency key is for.
        raise _store_retry(task, request, kwargs, exc) from exc
    return result


def _record_unknown(
    app: Celery, store: SagaStore, ctx: _Ctx, task: Task, request: Any, kwargs: dict[str, Any], exc: BaseException
) -> None:
    try:
        t = store.step("lost", ctx.saga_id, ctx.gen, ctx.name, ctx.step, error_text(exc), "timeout")
        react(app, store, ctx.saga_id, ctx.name, ctx.gen, t)
    except SagaStoreUnavailable as store_exc:
        raise _store_retry(task, request, kwargs, store_exc) from exc


def _record_failure(
    app: Celery, store: SagaStore, ctx: _Ctx, task: Task, request: Any, kwargs: dict[str, Any], exc: BaseException
) -> None:
    try:
        t = store.step("fail", ctx.saga_id, ctx.gen, ctx.name, ctx.step, error_text(exc))
        react(app, store, ctx.saga_id, ctx.name, ctx.gen, t)
    except SagaStoreUnavailable as store_exc:
        raise _store_retry(task, request, kwargs, store_exc) from exc


def _compensate(task: Task, original: Any, params: Params, request: Any, kwargs: dict[str, Any]) -> Any:
    app = task.app
    ctx = _Ctx(request)
    round_ = str(int(request.get(Headers.ROUND) or 1))
    try:
        store = store_for(app)
        t = store.step("cbegin", ctx.saga_id, ctx.gen, ctx.name, ctx.step, ctx.retries, ctx.redelivered, round_)
        if t.tag == "dup" and t.status:
            redrive(app, store, ctx.saga_id)
    except SagaStoreUnavailable as exc:
        raise _store_retry(task, request, kwargs, exc) from exc
    except (SagaError, redis.RedisError, ValueError, KeyError) as exc:
        logger.error("saga %s: cannot compensate %r, record unusable: %s", ctx.saga_id, ctx.step, error_text(exc))
        raise Ignore() from exc
    if t.tag != "run":
        step_event(app, "skipped", request.id, ctx.saga_id, ctx.name, ctx.step, reason=t.tag, compensation=True)
        raise _not_run(app, store, ctx, t.tag, "compensation of")

    attempt = int(t.extra[0])
    key = task_id(ctx.saga_id, ctx.step, undo=True, round=int(round_))
    known = request.get(Headers.KNOWN)
    step_ctx = StepContext(
        ctx.saga_id,
        ctx.name,
        ctx.step,
        True,
        key,
        attempt,
        round=int(round_),
        result_known=True if known is None else bool(known),
        forward_key=f"{ctx.saga_id}:{ctx.step}",
    )
    token = set_current(step_ctx)
    call = request.kwargs = params.pick(kwargs)
    try:
        result = original(**call)
    except Retry:
        raise
    except Exception as exc:
        try:
            t = store.step("cfail", ctx.saga_id, ctx.gen, ctx.name, ctx.step, error_text(exc), round_)
            react(app, store, ctx.saga_id, ctx.name, ctx.gen, t)
        except SagaStoreUnavailable as store_exc:
            raise _store_retry(task, request, kwargs, store_exc) from exc
        if t.tag in ("retry", "gaveup"):
            compensation_attempt_failed(
                ctx.saga_id, ctx.name, ctx.step, attempt, error_text(exc), gave_up=t.tag == "gaveup", round=int(round_)
            )
        if t.tag == "retry":
            base, cap = request.get(Headers.BACKOFF) or (1.0, 600.0)
            delay = backoff_delay(
                {"compensation_retry_backoff": base, "compensation_retry_backoff_max": cap}, int(t.extra[0])
            )
            logger.warning(
                "saga %s: compensation of %r failed (attempt %s): %s; retrying in %.2fs",
                ctx.saga_id,
                ctx.step,
                t.extra[0],
                error_text(exc),
                delay,
            )
            raise _resend(task, request, kwargs, delay, exc) from exc
        raise
    finally:
        reset_current(token)
    try:
        t = store.step("cdone", ctx.saga_id, ctx.gen, ctx.name, ctx.step, round_)
        react(app, store, ctx.saga_id, ctx.name, ctx.gen, t)
    except SagaStoreUnavailable as exc:
        raise _store_retry(task, request, kwargs, exc) from exc
    return result
