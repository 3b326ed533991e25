"""What a saga looks like to people and tools: the JSON shapes, the timeline, and the tables.

``celery saga ... --json`` prints `state_json` and `SagaSummary.to_json`,
whose schema `celery_saga.cli` documents; ``celery saga show``, the demo and
the test helpers print `render_timeline`. Times are ISO-8601 UTC with
milliseconds and a ``Z``, like ``2026-11-27T03:25:09.640Z``, or null when
unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from . import codec
from .state import SagaState, SagaStatus, StepRecord, StepStatus, ms_time

if TYPE_CHECKING:  # locks reads the store; what is shown here needs only its shape
    from .locks import SagaLocks

__all__ = [
    "SagaStats",
    "SagaSummary",
    "TimelineRow",
    "iso",
    "list_table",
    "command",
    "render_timeline",
    "saga_text",
    "state_json",
    "stats_tables",
    "summary_of",
    "table",
    "timeline",
]


def iso(when: datetime | None) -> str | None:
    """``2026-11-27T03:25:09.640Z``: ISO-8601, UTC, milliseconds (records keep no more)."""
    if when is None:
        return None
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def command(app_name: str | None, *words: str) -> str:
    """A ``celery saga`` command line to tell someone to run, with the app's ``-A``."""
    return " ".join(["celery", "-A", app_name or "<app>", "saga", *words])


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: a header, a rule, and left-aligned columns."""
    cells = [list(header), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- the saga list -------------------------------------------------------------


@dataclass(frozen=True)
class SagaSummary:
    """One line of a saga list: what its record says, without parsing its plan."""

    saga_id: str
    name: str
    status: SagaStatus
    status_at: datetime | None
    created_at: datetime | None
    failed_step: str | None
    error: str | None
    #: Why a saga was rolled back: failure, timeout, cancelled (None otherwise). Not in the
    #: JSON, whose shape scripts parsing ``celery saga list --json`` know.
    reason: str | None = None
    #: The record cannot be read: listed from its index entry (``status`` is that index's),
    #: with ``error`` saying what is wrong. Not in the JSON either.
    corrupt: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.saga_id,
            "name": self.name,
            "status": self.status.value,
            "status_at": iso(self.status_at),
            "created_at": iso(self.created_at),
            "failed_step": self.failed_step,
            "error": self.error,
        }


@dataclass(frozen=True)
class SagaStats:
    """Saga counts from the indexes; finished sagas only within this app's ``saga_retention``.

    Attributes:
        by_status: ``{status: count}``, every status present.
        by_name: ``{saga_name: {status: count}}``, every status present.
        lost_in_reset: Sagas met lost in a reset of the store (a restart
            without persistence, a flush, an eviction) since it was reset.
    """

    by_status: Mapping[str, int]
    by_name: Mapping[str, Mapping[str, int]]
    lost_in_reset: int = 0

    def to_json(self) -> dict[str, Any]:
        shape: dict[str, Any] = {
            "by_status": dict(self.by_status),
            "by_name": {n: dict(c) for n, c in self.by_name.items()},
        }
        if self.lost_in_reset:
            # Only then, so the shape stays what scripts parsing it know.
            shape["lost_in_reset"] = self.lost_in_reset
        return shape


def summary_of(saga_id: str, raw: dict[str, str] | None) -> SagaSummary | None:
    """Read leniently: a record whose plan is damaged still lists. None if it expired."""
    if not raw:
        return None
    try:
        status = SagaStatus(raw.get("status", ""))
    except ValueError:
        return None
    return SagaSummary(
        saga_id=saga_id,
        name=raw.get("name", ""),
        status=status,
        status_at=_lenient_time(raw.get("status_at")),
        created_at=_lenient_time(raw.get("created")),
        failed_step=raw.get("failed_step") or None,
        error=raw.get("error") or None,
        reason=raw.get("reason") or None,
    )


def _lenient_time(raw: str | None) -> datetime | None:
    try:
        return ms_time(raw)
    except (ValueError, OverflowError, OSError):
        return None


def list_table(sagas: Sequence[SagaSummary]) -> str:
    """``celery saga list``: one row per saga; a record that cannot be read is a "corrupt record" row."""
    rows = [
        (s.saga_id, s.name, s.status.value, iso(s.status_at) or "-", s.failed_step or "", (s.error or "")[:48])
        if not s.corrupt
        else (s.saga_id, s.name, "corrupt record", "-", "", _corrupt_detail(s)[:48])
        for s in sagas
    ]
    return table(("id", "name", "status", "since", "failed step", "error"), rows)


def _corrupt_detail(s: SagaSummary) -> str:
    """What is wrong with a corrupt record, without the id the row shows already."""
    return (s.error or "").removeprefix(f"saga record {s.saga_id} is corrupt: ")


def stats_tables(stats: SagaStats) -> str:
    """``celery saga stats``: counts by status, then by saga name."""
    statuses = [s.value for s in SagaStatus]
    text = table(("status", "sagas"), [(s, str(stats.by_status[s])) for s in statuses])
    if stats.by_name:
        rows = [(n, *(str(c.get(s, 0)) for s in statuses)) for n, c in stats.by_name.items()]
        text += "\n\n" + table(("name", *statuses), rows)
    if stats.lost_in_reset:
        text += (
            f"\n\n{stats.lost_in_reset} saga(s) were lost in a reset of the saga store; their completed steps "
            "were not compensated (see docs/deployments.md)"
        )
    return text


# -- one saga ------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSeen:
    """The worker instance a step runs on, as the liveness entries say (`celery_saga.admin.step_workers`)."""

    hostname: str
    alive: bool
    last_seen: datetime | None


def _running_on(s: StepRecord, workers: Mapping[str, WorkerSeen] | None) -> dict[str, Any] | None:
    """A RUNNING step's worker (node name, alive, last liveness write) and last heartbeat; None if not known."""
    if s.status is not StepStatus.RUNNING or not s.worker or workers is None:
        return None
    seen = workers.get(s.worker)
    doc: dict[str, Any] = {
        "instance": s.worker,
        "hostname": seen.hostname if seen else None,
        "alive": bool(seen and seen.alive),
        "last_seen": iso(seen.last_seen) if seen else None,
    }
    if s.heartbeat_timeout is not None and s.heartbeat_deadline is not None:
        doc["last_heartbeat"] = iso(s.heartbeat_deadline - timedelta(seconds=s.heartbeat_timeout))
    return doc


def state_json(
    state: SagaState,
    redact: Collection[str] = (),
    workers: Mapping[str, WorkerSeen] | None = None,
    locks: SagaLocks | None = None,
) -> dict[str, Any]:
    """The JSON shape of a saga record, as ``celery saga show --json`` prints it.

    Values of the keys the saga redacts, and of ``redact``, are ``"***"``;
    kombu's types (datetime, Decimal, UUID ...) are strings. Keys only where
    they apply, so other sagas keep the shape they had: a saga with a pivot
    has ``pivot`` and ``passed_pivot``, and its steps ``retriable`` and
    ``forward_retries``; a child saga has ``parent``; a step that is a child
    saga has ``child``; a RUNNING step, given the ``workers``, has
    ``worker``: ``{instance, hostname, alive, last_seen}``, with
    ``last_heartbeat`` for a step with a heartbeat timeout. A saga with
    locks, given ``locks`` (`celery_saga.locks.lock_status`), has ``locks``:
    ``{status, locks: [{lock, holders, waiters}], position}``.
    """
    secrets = state.redact | frozenset(redact)

    def shown(value: Any) -> Any:
        return codec.jsonable(codec.masked(value, secrets))

    doc = {
        "id": state.saga_id,
        "name": state.name,
        "status": state.status.value,
        "status_at": iso(state.status_at),
        "created_at": iso(state.created_at),
        "idempotency_key": state.idempotency_key,
        "failed_step": state.failed_step,
        "error": state.error,
        "reason": state.reason,
        "kwargs": shown(state.kwargs),
        "data": shown(state.data),
        "settings": state.settings,
        "timeout": state.timeout,
        "deadline": iso(state.deadline),
        "steps": [_step_json(s, shown) for s in state.steps],
        "search_keys": shown(dict(state.search_keys)),
        "rerun_of": state.rerun_of,
        "reruns": list(state.reruns),
    }
    if locks is not None:
        doc["locks"] = locks.to_json()
    if state.parent_id:
        doc["parent"] = {"id": state.parent_id, "step": state.parent_step}
    if any(s.child_id for s in state.steps):
        for step, s in zip(doc["steps"], state.steps, strict=True):
            if s.child_id:
                step["child"] = s.child_id
    for step, s in zip(doc["steps"], state.steps, strict=True):
        running_on = _running_on(s, workers)
        if running_on is not None:
            step["worker"] = running_on
    if state.pivot:
        doc["pivot"], doc["passed_pivot"] = state.pivot, state.passed_pivot
        for step, s in zip(doc["steps"], state.steps, strict=True):
            step["retriable"], step["forward_retries"] = s.retriable, s.forward_retries
    return doc


def _step_json(s: StepRecord, shown: Callable[[Any], Any]) -> dict[str, Any]:
    second = s.second_round
    return {
        "name": s.name,
        "task": s.task,
        "stage": s.stage,
        "status": s.status.value,
        "attempts": s.attempts,
        "started_at": iso(s.started_at),
        "ended_at": iso(s.ended_at),
        "error": s.error,
        "result": shown(s.result),
        "timeout": s.timeout,
        "deadline": iso(s.deadline),
        "stopped_by": s.stopped_by,
        "late": None
        if s.late_status is None
        else {
            "status": s.late_status.value,
            "result": shown(s.late_result),
            "error": s.late_error,
            "at": iso(s.late_at),
        },
        "compensation": None
        if s.compensation is None
        else {
            "task": s.compensation,
            "status": s.compensation_status.value if s.compensation_status else None,
            "attempts": s.compensation_attempts,
            "started_at": iso(s.compensation_started_at),
            "ended_at": iso(s.compensation_ended_at),
            "error": s.compensation_error,
            "deadline": iso(s.compensation_deadline),
            "round2": None
            if second is None
            else {
                "status": second.status.value,
                "attempts": second.attempts,
                "started_at": iso(second.started_at),
                "ended_at": iso(second.ended_at),
                "error": second.error,
            },
        },
    }


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


def render_timeline(state: SagaState, width: int = 48) -> str:
    """The timeline as a plain-text table."""
    header = ("step", "action", "status", "tries", "started", "ended", "error")
    rows = [
        (
            r.step,
            r.action,
            r.status,
            str(r.attempts) if r.action != "late outcome" else "-",
            _clock(r.started_at, state.created_at),
            _clock(r.ended_at, state.created_at),
            (r.error or "")[:width],
        )
        for r in timeline(state)
    ]
    return table(header, rows)


def saga_text(
    state: SagaState,
    children: dict[str, SagaState] | None = None,
    workers: Mapping[str, WorkerSeen] | None = None,
    locks: SagaLocks | None = None,
) -> str:
    """``celery saga show``: the saga's status, then its timeline.

    ``children`` are its child sagas' states by id; ``workers``, the worker
    instances its RUNNING steps run on, by token.
    """
    lines = [
        f"saga {state.saga_id} ({state.name}): {state.status.value} since {iso(state.status_at)}",
        f"created {iso(state.created_at)}",
    ]
    if state.search_keys:
        keys = codec.masked(dict(state.search_keys), state.redact)
        lines.append("business keys: " + ", ".join(f"{k}={v}" for k, v in keys.items()))
    if locks is not None:
        lines.append(locks.text())
    if state.rerun_of:
        lines.append(f"a re-run of {state.rerun_of}")
    if state.reruns:
        lines.append(f"re-run as {', '.join(state.reruns)}")
    if state.parent_id:
        lines.append(f"child saga of {state.parent_id} (its step {state.parent_step})")
    for s in state.steps:
        if s.child_id:
            child = (children or {}).get(s.child_id)
            if child is None:
                lines.append(f"child saga {s.child_id}: not started")
            else:
                why = f" ({child.reason})" if child.reason and child.status is not SagaStatus.COMPLETED else ""
                lines.append(f"child saga {s.child_id}: {child.status.value}{why}")
    for s in state.steps:
        on = _running_on(s, workers)
        if on is not None:
            alive = "alive" if on["alive"] else "NOT alive"
            line = f"step {s.name} runs on {on['hostname'] or '?'} (instance {on['instance']}, {alive}"
            line += f", last seen {on['last_seen'] or 'never'}"
            if "last_heartbeat" in on:
                line += f"; last heartbeat {on['last_heartbeat']}"
            lines.append(line + ")")
    if state.failed_step:
        lines.append(f"failed step {state.failed_step}: {state.error}")
    if state.pivot:
        passed = "passed: it finishes forward" if state.passed_pivot else "not passed yet: it can still roll back"
        lines.append(f"pivot {state.pivot}: {passed}")
        resent = [f"{s.name} {s.forward_retries}" for s in state.steps if s.forward_retries]
        if resent:
            lines.append(f"forward retries: {', '.join(resent)}")
    return "\n".join([*lines, "", render_timeline(state)])
