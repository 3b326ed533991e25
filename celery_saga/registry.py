"""What this process knows of saga definitions: which tasks are steps, and which sagas exist.

``@saga_step`` and ``Saga()`` write here; enabling an app, checking its
configuration and the test plugin read here. Tasks themselves stay untouched:
a task called outside a saga behaves exactly as before.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from celery import Celery

from .plan import Plan

__all__ = ["MISSING", "DefinedSaga", "StepMeta", "has_steps", "register_saga", "register_step", "sagas_of", "step_meta"]


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


#: An argument that was not given, where None means something (``timeout=None``: no deadline).
MISSING: Any = _Missing()


@dataclass(frozen=True)
class StepMeta:
    """What ``saga_step`` recorded about a task."""

    compensation: str | None
    compensate_on_failure: bool
    #: Seconds, None for no deadline, or MISSING for the app's saga_default_step_timeout.
    timeout: Any = MISSING
    #: Keys masked where the step's arguments are shown.
    redact: tuple[str, ...] = ()
    #: Seconds a running step may go without a heartbeat; None for no heartbeat timeout.
    heartbeat_timeout: float | None = None


@runtime_checkable
class DefinedSaga(Protocol):
    """What the registry, and a saga that uses another as a step, need of a saga definition (`celery_saga.Saga`)."""

    name: str
    children: dict[str, DefinedSaga]
    search_keys: tuple[str, ...]

    def plan(self) -> Plan: ...

    def plan_digest(self) -> str: ...

    def belongs_to(self, app: Celery) -> bool: ...

    def start_as_child(self, parent_id: str, parent_gen: str, data: dict[str, Any]) -> Any: ...

    def start_rerun(self, of: str, saga_id: str, data: dict[str, Any], callbacks: tuple[str, str]) -> Any: ...


_STEPS: dict[str, StepMeta] = {}
_SAGAS: weakref.WeakSet[DefinedSaga] = weakref.WeakSet()


def register_step(task_name: str, meta: StepMeta) -> None:
    """Record that ``task_name`` is a saga step (``@saga_step``)."""
    _STEPS[task_name] = meta


def step_meta(task_name: str) -> StepMeta | None:
    """The ``saga_step`` metadata of a task name, or None if it is not a step."""
    return _STEPS.get(task_name)


def has_steps(app: Celery) -> bool:
    """True if any task of ``app`` is a saga step, or a saga is defined on it.

    A saga may be made only of undecorated tasks (``step(task, compensate=...)``):
    its app's workers need the step wrapper all the same.
    """
    tasks = app._tasks
    return any(name in tasks for name in list(_STEPS)) or any(saga.belongs_to(app) for saga in list(_SAGAS))


def register_saga(saga: DefinedSaga) -> None:
    """Record a saga definition, to be checked when its app is finalized."""
    _SAGAS.add(saga)


def sagas_of(app: Celery) -> list[DefinedSaga]:
    """The sagas defined on ``app`` in this process."""
    return [saga for saga in list(_SAGAS) if saga.belongs_to(app)]
