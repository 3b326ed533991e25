"""How a saga's step list becomes its stages: ``parallel``, Celery canvases, waits, child sagas, the pivot.

``Saga()`` hands its ``steps`` here and gets back stages of `StepRef`,
checked: every leaf a declared step, a ``wait_for`` or another saga; each
event named once; no saga inside itself; a pivot alone in its stage. A task
not created yet is a lazy proxy, whose type is never looked at here (that
would create it, and finalize its app).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from celery.canvas import Signature, _chain, _chord, group

from .errors import SagaDefinitionError
from .introspect import is_proxy, is_task, task_app, task_name
from .nested import CHILD_TASK, UNDO_CHILD_TASK
from .registry import DefinedSaga, step_meta
from .step import StepRef, check_step_name
from .wait import WaitRef

__all__ = ["check_events", "children_of", "flatten", "leaf", "parallel", "pivot_stage", "step_name"]


def _is_saga(item: Any) -> bool:
    return not is_proxy(item) and isinstance(item, DefinedSaga)


class parallel:  # noqa: N801 - named like Celery's own `group`
    """Steps that run together; the saga goes on once all have finished."""

    def __init__(self, *steps: Any) -> None:
        if len(steps) == 1 and not is_proxy(steps[0]) and isinstance(steps[0], (list, tuple)):
            steps = tuple(steps[0])
        if len(steps) < 2:
            raise SagaDefinitionError(
                f"parallel() needs at least two steps, got {len(steps)}; put a single step in the list on its own"
            )
        self.steps: tuple[Any, ...] = tuple(steps)

    def __repr__(self) -> str:
        return f"parallel({', '.join(map(repr, self.steps))})"


def flatten(item: Any) -> list[list[Any]]:
    """Flatten a step list or Celery canvas into stages of leaves."""
    if is_proxy(item) or isinstance(item, WaitRef) or _is_saga(item):
        return [[item]]
    if isinstance(item, (list, tuple)):
        return [stage for x in item for stage in flatten(x)]
    if isinstance(item, _chord):
        return [_members(item.tasks, "a chord header"), *flatten(item.body)]
    if isinstance(item, _chain):
        return [stage for x in item.tasks for stage in flatten(x)]
    if isinstance(item, group):
        return [_members(item.tasks, "a group")]
    if isinstance(item, parallel):
        return [_members(item.steps, "parallel()")]
    return [[item]]


def _members(items: Iterable[Any], what: str) -> list[Any]:
    members = list(items)
    if len(members) < 2:
        raise SagaDefinitionError(f"{what} needs at least two steps, got {len(members)}; use the step on its own")
    for m in members:
        if not is_proxy(m) and isinstance(m, (list, tuple, _chain, group, parallel)):
            raise SagaDefinitionError(
                f"{what} may only hold single steps, not {type(m).__name__}: split the branch into its own stages"
            )
    return members


def leaf(item: Any) -> StepRef:
    """Turn one step (task, signature or step()) into a StepRef, checking it is a declared step."""
    # (A task not created yet is a proxy: looking at its type would create it, and finalize its app.)
    if not is_proxy(item):
        if isinstance(item, StepRef):
            return item
        if isinstance(item, WaitRef):
            return StepRef(item.step_name, "", None, False, timeout=item.timeout, event=item.event, reject=item.reject)
        if _is_saga(item):
            # No deadline of its own: the child has its steps' (and the parent's timeout reaches into it).
            return StepRef(item.name, CHILD_TASK, UNDO_CHILD_TASK, False, timeout=None, child=item.name)
    if is_task(item) or isinstance(item, Signature):
        name = task_name(item)
        meta = step_meta(name)
        if meta is None:
            raise SagaDefinitionError(
                f"task {name!r} is not a saga step: decorate it with @saga_step(compensate=...) "
                f"(compensate=None if there is nothing to undo), or wrap it in step({name!r}, compensate=...)"
            )
        sig = item if not is_proxy(item) and isinstance(item, Signature) else None
        return StepRef(
            name=check_step_name(name),
            task=name,
            compensation=meta.compensation,
            compensate_on_failure=meta.compensate_on_failure,
            bound=dict(sig.kwargs or {}) if sig is not None else {},
            args=tuple(sig.args or ()) if sig is not None else (),
            options=dict(sig.options or {}) if sig is not None else {},
            app=task_app(item),
            timeout=meta.timeout,
            redact=meta.redact,
            heartbeat_timeout=meta.heartbeat_timeout,
        )
    raise SagaDefinitionError(
        f"{item!r} cannot be a saga step: use a task decorated with @saga_step, its signature, "
        f"step('task.name', compensate=...), wait_for(...), another Saga, parallel(...), or a Celery chain/group "
        f"of those"
    )


def children_of(name: str, steps: Any) -> dict[str, DefinedSaga]:
    """The sagas among ``steps``, by name; a saga that contains itself, at any depth, is refused."""
    found: dict[str, DefinedSaga] = {}
    for stage in flatten(steps):
        for item in stage:
            if _is_saga(item):
                found[item.name] = item
    pending = list(found.values())
    while pending:
        child = pending.pop()
        if child.name == name:
            raise SagaDefinitionError(
                f"saga {name!r} contains itself (through child saga {child.name!r}); a saga cannot be its own step"
            )
        pending.extend(child.children.values())
    return found


def check_events(saga: str, stages: list[list[StepRef]]) -> None:
    """Each event names one thing to do: one wait's arrival, or one wait's rejection."""
    seen: set[str] = set()
    for ref in (r for stage in stages for r in stage if r.event is not None):
        for event in (ref.event, ref.reject):
            if event is None:
                continue
            if event in seen:
                raise SagaDefinitionError(
                    f"saga {saga!r}: event {event!r} is awaited (or rejects a wait) twice; give each its own name"
                )
            seen.add(event)


def step_name(step: Any) -> Any:
    """The step name ``step`` stands for: a name, a task or signature (its task name), or a step()."""
    if step is None:
        return None
    if is_proxy(step):  # a task not created yet: its type is not looked at (that would finalize its app)
        return task_name(step)
    if isinstance(step, str):
        return step
    if isinstance(step, StepRef):
        return step.name
    if is_task(step) or isinstance(step, Signature):
        return task_name(step)
    return step  # refused, with the reason, by _pivot_stage


def pivot_stage(saga: str, stages: list[list[StepRef]], pivot: str | None) -> int | None:
    """The stage of the pivot (None: no pivot), which must be a step standing alone in its stage."""
    if pivot is None:
        return None
    if not isinstance(pivot, str):
        raise SagaDefinitionError(f"saga {saga!r}: pivot must be a step name (a string), not {pivot!r}")
    for k, stage in enumerate(stages):
        if any(ref.name == pivot for ref in stage):
            if len(stage) > 1:
                raise SagaDefinitionError(
                    f"saga {saga!r}: the pivot {pivot!r} is in a parallel stage; the point of no return must be "
                    f"a step of its own: move it out of parallel()"
                )
            return k
    names = ", ".join(repr(ref.name) for stage in stages for ref in stage)
    raise SagaDefinitionError(f"saga {saga!r}: pivot {pivot!r} is not one of its steps ({names})")
