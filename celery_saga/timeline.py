"""A saga's timeline: one row per step and one per compensation, for people to read."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .state import SagaState, StepRecord, StepStatus

__all__ = ["TimelineRow", "render", "timeline"]


@dataclass(frozen=True)
class TimelineRow:
    """One action of a saga: a step's forward run, or its compensation."""

    step: str
    action: str  # "step", "compensation", "late outcome" or "compensation 2"
    task: str
    status: str
    attempts: int
    started_at: datetime | None
    ended_at: datetime | None
    error: str | None


def _step_error(s: StepRecord) -> str | None:
    if s.status is StepStatus.CANCELLED and s.stopped_by:
        return s.error or f"fenced before it started ({s.stopped_by})"
    if s.status is StepStatus.UNKNOWN:
        return s.error or f"outcome unknown ({s.stopped_by})"
    return s.error


def timeline(state: SagaState) -> list[TimelineRow]:
    """Rows in the order things happened.

    Steps in plan order, then compensations by start time, then any late
    outcome (a step that finished after it was compensated blind) and its
    second compensation round.
    """
    rows = [
        TimelineRow(s.name, "step", s.task, s.status.value, s.attempts, s.started_at, s.ended_at, _step_error(s))
        for s in state.steps
    ]
    undo = [
        TimelineRow(
            s.name,
            "compensation",
            s.compensation or "",
            s.compensation_status.value,
            s.compensation_attempts,
            s.compensation_started_at,
            s.compensation_ended_at,
            s.compensation_error,
        )
        for s in state.steps
        if s.compensation_status is not None
    ]
    undo.sort(key=lambda row: (row.started_at is None, row.started_at or datetime.min.replace(tzinfo=None)))
    late: list[TimelineRow] = []
    for s in state.steps:
        if s.late_status is not None:
            late.append(
                TimelineRow(s.name, "late outcome", s.task, s.late_status.value, 0, None, s.late_at, s.late_error)
            )
        if s.second_round is not None:
            r = s.second_round
            late.append(
                TimelineRow(
                    s.name,
                    "compensation 2",
                    s.compensation or "",
                    r.status.value,
                    r.attempts,
                    r.started_at,
                    r.ended_at,
                    r.error,
                )
            )
    return rows + undo + late


def _clock(when: datetime | None, origin: datetime | None) -> str:
    if when is None:
        return "-"
    stamp = when.strftime("%H:%M:%S.") + f"{when.microsecond // 1000:03d}"
    if origin is not None:
        stamp += f" (+{(when - origin).total_seconds():.2f}s)"
    return stamp


def render(state: SagaState, width: int = 48) -> str:
    """The timeline as a plain-text table."""
    rows = timeline(state)
    header = ("step", "action", "status", "tries", "started", "ended", "error")
    cells = [header] + [
        (
            r.step,
            r.action,
            r.status if r.status != StepStatus.WAITING.value else "-",
            str(r.attempts) if r.action != "late outcome" else "-",
            _clock(r.started_at, state.created_at),
            _clock(r.ended_at, state.created_at),
            (r.error or "")[:width],
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
