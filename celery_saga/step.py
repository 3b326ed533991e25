"""Declaring steps: ``saga_step``, ``step``, and ``current_step`` inside one."""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from celery import Celery
from celery._state import _get_active_apps, connect_on_app_finalize
from celery.canvas import Signature

from .errors import SagaDefinitionError
from .plan import FORBIDDEN_IN_STEP_NAMES
from .tasks import is_proxy, is_task, task_app, task_name

__all__ = ["StepContext", "StepMeta", "StepRef", "current_step", "registered", "saga_step", "step"]

T = TypeVar("T")


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()


@dataclass(frozen=True)
class StepMeta:
    """What ``saga_step`` recorded about a task."""

    compensation: str | None
    compensate_on_failure: bool
    #: Seconds, None for no deadline, or MISSING for the app's saga_default_step_timeout.
    timeout: Any = MISSING


# Step metadata by task name. Tasks stay untouched: a task called outside a
# saga behaves exactly as before.
_REGISTRY: dict[str, StepMeta] = {}
_finalize_hook_installed = False


def registered(name: str) -> StepMeta | None:
    """The ``saga_step`` metadata of a task name, or None if it is not a step."""
    return _REGISTRY.get(name)


def _compensation_name(compensate: Any, where: str) -> str | None:
    if is_task(compensate):
        return task_name(compensate)
    if compensate is MISSING:
        raise SagaDefinitionError(
            f"{where} needs compensate=: pass the compensating task, its name, or None if there is nothing to undo"
        )
    if compensate is None:
        return None
    if isinstance(compensate, str):
        if not compensate:
            raise SagaDefinitionError(f"{where}: compensate= is an empty task name")
        return compensate
    raise SagaDefinitionError(
        f"{where}: compensate= must be a Celery task, a task name or None, not {type(compensate).__name__}"
    )


def check_step_name(name: str) -> str:
    bad = sorted(set(name) & FORBIDDEN_IN_STEP_NAMES)
    if not name or bad:
        raise SagaDefinitionError(
            f"step name {name!r} cannot be used: step names must be non-empty and may not contain "
            f"whitespace, ':', ';' or ','; give the step a name with step(task, name=...)"
        )
    return name


def _enable_on_finalize(app: Celery | None) -> None:
    """Make apps that contain saga steps enable themselves when finalized."""
    global _finalize_hook_installed
    from .app import enable_if_has_steps, enable_when_finalized  # the app layer imports this module

    if not _finalize_hook_installed:
        _finalize_hook_installed = True
        # Celery calls these for every app it finalizes from now on; the
        # callback itself checks whether the app has saga steps.
        connect_on_app_finalize(enable_when_finalized)
    for active in [app] if app is not None else list(_get_active_apps()):
        if active is not None and active.finalized:
            enable_if_has_steps(active)


def saga_step(
    compensate: Any = MISSING, compensate_on_failure: bool = False, timeout: Any = MISSING
) -> Callable[[T], T]:
    """Mark an existing Celery task as a saga step.

    Use it on top of ``@app.task`` or ``@shared_task``. The task is returned
    unchanged: called outside a saga it behaves exactly as before.

    Args:
        compensate: The task that undoes this step, its name, or None when there
            is nothing to undo. Required, so that "nothing to undo" is a decision.
        compensate_on_failure: Also compensate this step when it failed itself.
        timeout: Seconds from the step's dispatch to its recorded outcome, also
            the deadline of each compensation attempt. Defaults to
            ``app.conf.saga_default_step_timeout`` (300); None means no deadline.
    """
    where = "@saga_step"
    comp = _compensation_name(compensate, where)
    step_timeout = _timeout(timeout, where)

    def decorate(task: T) -> T:
        if not is_task(task):
            raise SagaDefinitionError(
                f"@saga_step must decorate a Celery task, not {task!r}: put it above @app.task or @shared_task"
            )
        name = task_name(task)
        check_step_name(name)
        _REGISTRY[name] = StepMeta(comp, bool(compensate_on_failure), step_timeout)
        _enable_on_finalize(task_app(task))
        return task

    return decorate


@dataclass(frozen=True)
class StepRef:
    """A step named by ``step()``: a task by name, or a task under a second step name."""

    name: str
    task: str
    compensation: str | None
    compensate_on_failure: bool
    bound: dict[str, Any] = field(default_factory=dict)
    args: tuple[Any, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    app: Celery | None = None
    #: Seconds, None for no deadline, or MISSING for the app's default.
    timeout: Any = MISSING


def _timeout(value: Any, where: str) -> Any:
    from .settings import timeout_seconds

    if value is MISSING:
        return MISSING
    return timeout_seconds(f"{where}: timeout", value)


def step(
    task_or_name: Any,
    compensate: Any = MISSING,
    name: str | None = None,
    compensate_on_failure: bool | None = None,
    timeout: Any = MISSING,
) -> StepRef:
    """Name a step explicitly.

    Use it for a task that lives in another service's codebase (by task name),
    or to give one task a second step name so it can appear twice in a saga.

    Args:
        task_or_name: A task, a signature, or a Celery task name.
        compensate: The compensating task or its name, or None. Defaults to the
            one given to ``saga_step`` when the task is decorated.
        name: The step name; defaults to the task name.
        compensate_on_failure: Also compensate the step when it failed itself.
        timeout: Seconds from the step's dispatch to its recorded outcome (and
            for each compensation attempt); None for no deadline. Defaults to
            the one given to ``saga_step``, else ``saga_default_step_timeout``.
    """
    step_timeout = _timeout(timeout, f"step({task_or_name!r})")
    bound: dict[str, Any] = {}
    args: tuple[Any, ...] = ()
    options: dict[str, Any] = {}
    if is_proxy(task_or_name):
        pass
    elif isinstance(task_or_name, Signature):
        bound = dict(task_or_name.kwargs or {})
        args = tuple(task_or_name.args or ())
        options = dict(task_or_name.options or {})
    elif not (isinstance(task_or_name, str) or is_task(task_or_name)):
        raise SagaDefinitionError(f"step() takes a task, a signature or a task name, not {task_or_name!r}")
    tname = task_name(task_or_name)
    if not tname:
        raise SagaDefinitionError("step() got an empty task name")
    meta = registered(tname)
    if compensate is MISSING and meta is not None:
        comp = meta.compensation
        cof = meta.compensate_on_failure if compensate_on_failure is None else compensate_on_failure
    else:
        comp = _compensation_name(compensate, f"step({tname!r})")
        cof = bool(compensate_on_failure)
    if step_timeout is MISSING and meta is not None:
        step_timeout = meta.timeout
    return StepRef(
        name=check_step_name(name or tname),
        task=tname,
        compensation=comp,
        compensate_on_failure=cof,
        bound=bound,
        args=args,
        options=options,
        app=task_app(task_or_name),
        timeout=step_timeout,
    )


@dataclass(frozen=True)
class StepContext:
    """Where the running code is, inside a saga.

    Attributes:
        saga_id: The saga.
        saga_name: Its name.
        step: The step name.
        compensating: True inside the step's compensation.
        idempotency_key: Stable across retries and redeliveries of this step or
            compensation, and different between the two. Pass it to external
            services, e.g. as a payment API's idempotency header.
        attempt: 1 for the first execution, counting retries and redeliveries.
        round: The compensation round: 1 for the rollback, 2 for a step that
            succeeded after it had been compensated blind. 1 in a forward step.
        result_known: False when ``step_result`` says nothing: in a blind
            compensation (the step's outcome was unknown: it timed out, was
            cancelled, or its worker was lost), and for a failed step
            compensated under ``compensate_on_failure``. Look the effect up,
            e.g. by ``forward_key``.
        forward_key: The idempotency key the forward step ran with.
    """

    saga_id: str
    saga_name: str
    step: str
    compensating: bool
    idempotency_key: str
    attempt: int
    round: int = 1
    result_known: bool = True
    forward_key: str = ""


_CURRENT: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar("celery_saga_step", default=None)


def current_step() -> StepContext | None:
    """The saga step being executed, or None outside a saga step or compensation."""
    return _CURRENT.get()


def set_current(ctx: StepContext | None) -> contextvars.Token[StepContext | None]:
    return _CURRENT.set(ctx)


def reset_current(token: contextvars.Token[StepContext | None]) -> None:
    _CURRENT.reset(token)


@dataclass(frozen=True)
class Params:
    """Which keyword arguments a function accepts."""

    names: frozenset[str]
    takes_all: bool

    def pick(self, data: dict[str, Any]) -> dict[str, Any]:
        if self.takes_all:
            return dict(data)
        return {k: v for k, v in data.items() if k in self.names}


def params_of(fn: Callable[..., Any]) -> Params:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return Params(frozenset(), True)
    names = frozenset(p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    takes_all = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    return Params(names, takes_all)
