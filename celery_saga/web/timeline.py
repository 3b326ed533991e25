"""The timeline of one saga for the web view: bars on a shared time axis, and each step's details."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..messages import task_id
from ..state import SagaState
from ..views import state_json, timeline

__all__ = ["Bar", "StepDetail", "bars", "details"]

# Statuses drawn as "needs a look": outcomes the saga could not learn, and give-ups.
_MARKED = {"UNKNOWN": "unknown outcome", "CANCELLED": "fenced", "GAVE_UP": "gave up"}


@dataclass(frozen=True)
class Bar:
    """One row of the timeline: a step's run, a compensation round, or a late outcome."""

    step: str
    stage: int
    action: str
    status: str
    attempts: int
    task_id: str
    #: Left edge and width, percent of the axis; None for what has not started (planned).
    left: float | None
    width: float | None
    started: str
    ended: str
    error: str | None
    mark: str | None

    @property
    def css(self) -> str:
        return self.status.lower().replace("_", "-")


@dataclass(frozen=True)
class StepDetail:
    """What the saga page lists under the timeline for one step."""

    name: str
    stage: int
    status: str
    idempotency_key: str
    task_id: str
    compensation_task_id: str | None
    result: Any
    error: str | None
    json: dict[str, Any]


def _seconds(when: datetime | None, origin: datetime) -> str:
    return "" if when is None else f"+{(when - origin).total_seconds():.2f}s"


def bars(state: SagaState, now: datetime | None = None) -> tuple[list[Bar], float]:
    """Every row of ``views.timeline`` as a bar, and the axis length in seconds.

    The axis runs from the saga's start to its last recorded time (or now,
    while it runs). Rows that have not started are planned: no bar.
    """
    now = now or datetime.now(UTC)
    origin = state.created_at or now
    rows = timeline(state)
    stages = {s.name: s.stage for s in state.steps}
    times = [t for r in rows for t in (r.started_at, r.ended_at) if t is not None]
    end = max([*times, state.status_at or origin] + ([] if state.status.finished else [now]))
    span = max((end - origin).total_seconds(), 0.001)
    out = []
    for r in rows:
        start = r.started_at or (r.ended_at if r.action == "late outcome" else None)
        left = width = None
        if start is not None:
            stop = r.ended_at or (end if not state.status.finished else start)
            left = 100 * max(0.0, (start - origin).total_seconds()) / span
            width = max(0.6, 100 * (stop - start).total_seconds() / span)
            width = min(width, 100 - left) if left < 100 else 0.6
        compensation = r.action.startswith("compensation")
        round_ = 2 if r.action == "compensation 2" else 1
        status = r.status
        mark = _MARKED.get(r.status)
        if r.action == "late outcome":
            mark = "late outcome"
        elif round_ == 2:
            mark = "second round"
        out.append(
            Bar(
                step=r.step,
                stage=stages.get(r.step, 0),
                action=r.action,
                status=status,
                attempts=r.attempts,
                task_id=task_id(state.saga_id, r.step, undo=compensation, round=round_),
                left=left,
                width=width,
                started=_seconds(r.started_at, origin),
                ended=_seconds(r.ended_at, origin),
                error=r.error,
                mark=mark,
            )
        )
    return out, span


def details(state: SagaState, redact: tuple[str, ...] = ()) -> list[StepDetail]:
    """Each step in plan order, with its keys and task ids, and its result and errors as ``show --json`` has them."""
    shown = state_json(state, redact)["steps"]
    out = []
    for s, js in zip(state.steps, shown, strict=True):
        key = task_id(state.saga_id, s.name)
        out.append(
            StepDetail(
                name=s.name,
                stage=s.stage,
                status=s.status.value,
                idempotency_key=key,
                task_id=key,
                compensation_task_id=task_id(state.saga_id, s.name, undo=True) if s.compensation else None,
                result=js["result"],
                error=s.error,
                json=js,
            )
        )
    return out
