"""Declaring steps: ``saga_step`` on an existing task, and ``step`` to name one explicitly."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from celery import Celery
from celery.canvas import Signature

from .enable import enable_apps_with_steps
from .errors import SagaDefinitionError
from .introspect import is_proxy, is_task, task_app, task_name
from .plan import FORBIDDEN_IN_STEP_NAMES
from .registry import MISSING, StepMeta, register_step, step_meta
from .settings import keys_to_redact, timeout_seconds

__all__ = ["StepRef", "check_step_name", "saga_step", "step"]

T = TypeVar("T")


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
    """``name``, if it can name a step (it ends up in task ids and the Lua stage list)."""
    bad = sorted(set(name) & FORBIDDEN_IN_STEP_NAMES)
    if not name or bad:
        raise SagaDefinitionError(
            f"step name {name!r} cannot be used: step names must be non-empty and may not contain "
            f"whitespace, ':', ';' or ','; give the step a name with step(task, name=...)"
        )
    return name


def saga_step(
    compensate: Any = MISSING,
    compensate_on_failure: bool = False,
    timeout: Any = MISSING,
    redact: Iterable[str] = (),
    heartbeat_timeout: float | None = None,
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
        redact: Keys whose values are shown as ``***`` wherever the saga's
            messages and records are shown (Flower, events, logs, ``celery
            saga show``); the task itself gets the real values.
        heartbeat_timeout: Seconds a running step may go without calling
            ``current_step().heartbeat()`` before it is declared lost (its
            outcome unknown), even though its worker is alive. None (the
            default): no heartbeat timeout; its worker's liveness and its
            ``timeout`` still apply.
    """
    where = "@saga_step"
    comp = _compensation_name(compensate, where)
    step_timeout = _timeout(timeout, where)
    secret = keys_to_redact(redact, f"{where}: redact")
    beat = _heartbeat_timeout(heartbeat_timeout, where)

    def decorate(task: T) -> T:
        if not is_task(task):
            raise SagaDefinitionError(
                f"@saga_step must decorate a Celery task, not {task!r}: put it above @app.task or @shared_task"
            )
        name = task_name(task)
        check_step_name(name)
        register_step(name, StepMeta(comp, bool(compensate_on_failure), step_timeout, secret, beat))
        # The link to enabling the app is Celery's finalize callback: the app
        # enables itself once finalized, with every task registered.
        enable_apps_with_steps(task_app(task))
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
    #: Keys masked where the step's arguments are shown.
    redact: tuple[str, ...] = ()
    #: A wait (``wait_for``): the event it waits for, and the one that rejects it. No task.
    event: str | None = None
    reject: str | None = None
    #: A child saga (a ``Saga`` used as a step): its name, which is the step's name.
    child: str | None = None
    #: Seconds a running step may go without a heartbeat; None for none.
    heartbeat_timeout: float | None = None


def _timeout(value: Any, where: str) -> Any:
    if value is MISSING:
        return MISSING
    return timeout_seconds(f"{where}: timeout", value)


def _heartbeat_timeout(value: Any, where: str) -> float | None:
    return timeout_seconds(f"{where}: heartbeat_timeout", value)


def step(
    task_or_name: Any,
    compensate: Any = MISSING,
    name: str | None = None,
    compensate_on_failure: bool | None = None,
    timeout: Any = MISSING,
    redact: Iterable[str] | None = None,
    heartbeat_timeout: Any = MISSING,
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
        redact: Keys shown as ``***`` (see `saga_step`); defaults to the ones
            given to ``saga_step``.
        heartbeat_timeout: Seconds a running step may go without a heartbeat
            (see `saga_step`); defaults to the one given to ``saga_step``.
    """
    step_timeout = _timeout(timeout, f"step({task_or_name!r})")
    secret = None if redact is None else keys_to_redact(redact, f"step({task_or_name!r}): redact")
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
    meta = step_meta(tname)
    if compensate is MISSING and meta is not None:
        comp = meta.compensation
        cof = meta.compensate_on_failure if compensate_on_failure is None else compensate_on_failure
    else:
        comp = _compensation_name(compensate, f"step({tname!r})")
        cof = bool(compensate_on_failure)
    if step_timeout is MISSING and meta is not None:
        step_timeout = meta.timeout
    if secret is None:
        secret = meta.redact if meta is not None else ()
    if heartbeat_timeout is MISSING:
        beat = meta.heartbeat_timeout if meta is not None else None
    else:
        beat = _heartbeat_timeout(heartbeat_timeout, f"step({tname!r})")
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
        redact=secret,
        heartbeat_timeout=beat,
    )
