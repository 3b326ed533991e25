"""Operating on sagas: list, inspect, count, retry and purge them.

These are the functions behind ``celery saga ...``. Each takes the Celery app
whose saga store (``saga_redis_url``, ``saga_key_prefix``) it acts on, and
raises the errors of `celery_saga.errors`: ``SagaNotFound`` when there is no
record (never started, or expired), ``SagaStateError`` when the saga's status
does not allow the action, ``SagaStoreUnavailable`` when Redis cannot be
reached.

Listing reads the status indexes, newest first, never a SCAN: it costs a
round trip per index read plus one for the records. Index entries outlive
an expired record by up to the retention, so readers skip them.

``*_json`` give the documented, stable JSON shapes printed by ``--json``
(see `celery_saga.cli`). Times are ISO-8601 UTC with milliseconds and a
``Z``, like ``2026-11-27T03:25:09.640Z``, or null when unknown.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery

from .app import store_for
from .dispatch import react
from .errors import SagaNotFound, SagaRecordCorrupt, SagaStateError
from .result import SagaResult
from .state import SagaState, SagaStatus, StepRecord
from .store.base import SagaStore, Transition

__all__ = [
    "SagaStats",
    "SagaSummary",
    "cancel_saga",
    "iso",
    "list_sagas",
    "ping",
    "purge_saga",
    "retry_saga",
    "saga_state",
    "saga_stats",
    "state_json",
]


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
    """

    by_status: Mapping[str, int]
    by_name: Mapping[str, Mapping[str, int]]

    def to_json(self) -> dict[str, Any]:
        return {"by_status": dict(self.by_status), "by_name": {n: dict(c) for n, c in self.by_name.items()}}


def iso(when: datetime | None) -> str | None:
    """``2026-11-27T03:25:09.640Z``: ISO-8601, UTC, milliseconds (records keep no more)."""
    if when is None:
        return None
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def list_sagas(
    app: Celery,
    status: SagaStatus | str | None = None,
    name: str | None = None,
    since: datetime | timedelta | None = None,
    limit: int = 50,
) -> list[SagaSummary]:
    """Sagas newest first, by the time they entered their status.

    Args:
        app: The app whose saga store to read.
        status: Only sagas in this status; all statuses by default.
        name: Only sagas of this name.
        since: Only sagas that entered their status at or after this time
            (a naive datetime is UTC), or within this long ago.
        limit: At most this many.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    store = store_for(app)
    statuses = [SagaStatus(status)] if status is not None else list(SagaStatus)
    cutoff = _epoch(since)
    found: dict[str, SagaSummary] = {}
    for st in statuses:
        # With one status, a record that already moved on (its index entry
        # lags the transition by a moment) belongs to the other status.
        for summary in _read_index(store, st, name, limit, cutoff, strict=status is not None):
            found.setdefault(summary.saga_id, summary)
    newest_first = sorted(found.values(), key=lambda s: (s.status_at is not None, s.status_at, s.saga_id), reverse=True)
    return newest_first[:limit]


def saga_state(app: Celery, saga_id: str) -> SagaState:
    """The full record of one saga. Raises SagaNotFound, or SagaRecordCorrupt if it cannot be parsed."""
    return store_for(app).state(saga_id)


def saga_stats(app: Celery) -> SagaStats:
    """Counts by status and by saga name, from the index sizes (no record is read)."""
    by_name = store_for(app).counts()
    by_status = {s.value: sum(counts.get(s.value, 0) for counts in by_name.values()) for s in SagaStatus}
    return SagaStats(by_status=by_status, by_name=by_name)


def retry_saga(app: Celery, saga_id: str) -> SagaResult:
    """Re-drive the compensations that gave up in a FAILED saga.

    The saga turns COMPENSATING and each such compensation is sent again with
    a fresh retry budget. The workers end it again (COMPENSATED, or FAILED if
    a compensation gives up once more) and send its signals and on_failure
    callback for that new outcome.

    Raises:
        SagaNotFound: no such saga.
        SagaStateError: the saga is not FAILED, or no compensation of it gave up.
    """
    store = store_for(app)
    name = store.load(saga_id).get("name", "")
    t = store.retry(saga_id, name)
    _check(store, saga_id, t, "retry", "only a FAILED saga whose compensations gave up can be retried")
    react(app, store, saga_id, name, "*", t)
    return SagaResult(saga_id, app)


def ping(app: Celery) -> None:
    """Raise SagaStoreUnavailable unless ``app``'s saga store answers."""
    store_for(app).ping()


def cancel_saga(app: Celery, saga_id: str) -> bool:
    """Cancel a saga: `SagaResult.cancel`. False if it had already finished.

    Raises:
        SagaNotFound: no such saga.
    """
    return SagaResult(saga_id, app).cancel()


def purge_saga(app: Celery, saga_id: str) -> None:
    """Remove a finished saga (COMPLETED, COMPENSATED or FAILED) and its index entries, even a corrupt one.

    Raises:
        SagaNotFound: no such saga.
        SagaStateError: the saga is still running.
    """
    store = store_for(app)
    t = store.purge(saga_id)
    _check(store, saga_id, t, "purge", "only a finished saga (COMPLETED, COMPENSATED or FAILED) can be purged")


def state_json(state: SagaState) -> dict[str, Any]:
    """The JSON shape of a saga record, as ``celery saga show --json`` prints it."""
    return {
        "id": state.saga_id,
        "name": state.name,
        "status": state.status.value,
        "status_at": iso(state.status_at),
        "created_at": iso(state.created_at),
        "idempotency_key": state.idempotency_key,
        "failed_step": state.failed_step,
        "error": state.error,
        "reason": state.reason,
        "kwargs": state.kwargs,
        "data": state.data,
        "settings": state.settings,
        "timeout": state.timeout,
        "deadline": iso(state.deadline),
        "steps": [_step_json(s) for s in state.steps],
    }


def _step_json(s: StepRecord) -> dict[str, Any]:
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
        "result": s.result,
        "timeout": s.timeout,
        "deadline": iso(s.deadline),
        "stopped_by": s.stopped_by,
        "late": None
        if s.late_status is None
        else {"status": s.late_status.value, "result": s.late_result, "error": s.late_error, "at": iso(s.late_at)},
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


def _epoch(since: datetime | timedelta | None) -> float | None:
    if since is None:
        return None
    if isinstance(since, timedelta):
        return (datetime.now(UTC) - since).timestamp()
    return (since if since.tzinfo else since.replace(tzinfo=UTC)).timestamp()


def _read_index(
    store: SagaStore, status: SagaStatus, name: str | None, limit: int, since: float | None, strict: bool
) -> list[SagaSummary]:
    """Up to ``limit`` live sagas from one index, reading further only past entries whose record expired."""
    want = limit
    while True:
        ids = store.list_ids(status, name, want, since)
        live = [
            s
            for s in (_summary(saga_id, raw) for saga_id, raw in zip(ids, store.load_many(ids), strict=True))
            if s is not None and (s.status is status or not strict)
        ]
        if len(live) >= limit or len(ids) < want:
            return live[:limit]
        want *= 2


def _summary(saga_id: str, raw: dict[str, str] | None) -> SagaSummary | None:
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
        status_at=_ms(raw.get("status_at")),
        created_at=_ms(raw.get("created")),
        failed_step=raw.get("failed_step") or None,
        error=raw.get("error") or None,
    )


def _ms(raw: str | None) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(raw) / 1000, tz=UTC) if raw else None
    except (ValueError, OverflowError, OSError):
        return None


def _check(store: SagaStore, saga_id: str, t: Transition, action: str, allowed: str) -> None:
    if t.tag == "missing":
        raise SagaNotFound(saga_id, store.where())
    if t.tag == "notallowed":
        raise SagaStateError(saga_id, t.status, action, allowed)
    if t.tag == "corrupt":
        raise SagaRecordCorrupt(saga_id, f"the store refused to {action} it")
