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

What these return looks like to people and tools (JSON, tables) is
`celery_saga.views`.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery

from .errors import SagaError, SagaNotFound, SagaRecordCorrupt, SagaStateError
from .follow import follow
from .plan import Plan
from .registry import DefinedSaga, sagas_of
from .result import SagaResult
from .search import find, matches, where_pairs
from .state import SagaState, SagaStatus, StepStatus
from .store import Outcome, SagaStore, Transition
from .stores import settings_of, store_for
from .views import SagaStats, SagaSummary, WorkerSeen, iso, state_json, summary_of

__all__ = [
    "RegistrationReport",
    "RunningPlan",
    "running_plans",
    "Unregistered",
    "check_registration",
    "epoch_seconds",
    "SagaStats",
    "SagaSummary",
    "cancel_saga",
    "iso",
    "list_sagas",
    "parse_since",
    "ping",
    "purge_saga",
    "retry_saga",
    "saga_state",
    "saga_stats",
    "state_json",
]

# A time ago, as `--since` and the web view take it: 30s, 10m, 2h, 1d, 1w.
_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def list_sagas(
    app: Celery,
    status: SagaStatus | str | None = None,
    name: str | None = None,
    since: datetime | timedelta | None = None,
    limit: int = 50,
    where: Mapping[str, Any] | Iterable[str] | None = None,
) -> list[SagaSummary]:
    """Sagas newest first, by the time they entered their status.

    Args:
        app: The app whose saga store to read.
        status: Only sagas in this status; all statuses by default.
        name: Only sagas of this name.
        since: Only sagas that entered their status at or after this time
            (a naive datetime is UTC), or within this long ago.
        limit: At most this many.
        where: Only sagas with these business keys (``Saga(search_keys=...)``):
            ``{"order_id": 7}`` or ``["order_id=7"]``; 7 and "7" are one value.
            Read from the business key index, not the status indexes.

    Raises:
        ValueError: ``limit`` is below 1, or ``where`` is no set of business key values.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    store = store_for(app)
    statuses = [SagaStatus(status)] if status is not None else list(SagaStatus)
    cutoff = epoch_seconds(since)
    if where is not None:
        return _found(store, where_pairs(where), set(statuses), name, cutoff, limit)
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


def step_workers(app: Celery, state: SagaState) -> dict[str, WorkerSeen] | None:
    """The worker instances ``state``'s RUNNING steps run on, by token; None if none names one.

    Alive: not declared lost, and its last liveness write is within ``saga_worker_lost_after``.
    """
    if not any(s.worker and s.status is StepStatus.RUNNING for s in state.steps):
        return None
    lost_after = settings_of(app).worker_lost_after
    now = time.time()
    return {
        token: WorkerSeen(
            w.hostname,
            not w.lost and bool(w.last_seen) and now - (w.last_seen or 0) < lost_after,
            datetime.fromtimestamp(w.last_seen, UTC) if w.last_seen else None,
        )
        for token, w in store_for(app).workers().items()
    }


def child_states(app: Celery, state: SagaState) -> dict[str, SagaState]:
    """The states of the child sagas of ``state`` that have started, by id."""
    store, found = store_for(app), {}
    for s in state.steps:
        if s.child_id:
            with contextlib.suppress(SagaNotFound):  # not started yet
                found[s.child_id] = store.state(s.child_id)
    return found


def saga_stats(app: Celery) -> SagaStats:
    """Counts by status and by saga name, from the index sizes (no record is read)."""
    store = store_for(app)
    by_name = store.counts()
    by_status = {s.value: sum(counts.get(s.value, 0) for counts in by_name.values()) for s in SagaStatus}
    return SagaStats(by_status=by_status, by_name=by_name, lost_in_reset=store.lost_count())


def retry_saga(app: Celery, saga_id: str) -> SagaResult:
    """Re-drive what gave up in a FAILED saga: its compensations, or its steps past the pivot.

    A saga whose compensations gave up turns COMPENSATING and each such
    compensation is sent again with a fresh retry budget. A saga that gave up
    forward (reason ``"forward"``: a step past its pivot, or the pivot whose
    outcome was lost, ran out of ``saga_forward_max_retries``) turns RUNNING
    and that step is sent again with a fresh budget and the same idempotency
    key. The workers end it again and send its signals and callback for that
    new outcome.

    Raises:
        SagaNotFound: no such saga.
        SagaStateError: the saga is not FAILED, or nothing of it gave up.
    """
    store = store_for(app)
    t = store.retry(saga_id)
    _check(
        store,
        saga_id,
        t,
        "retry",
        "only a FAILED saga whose compensations, or whose steps past the pivot, gave up can be retried",
    )
    follow(app, store, t)
    return SagaResult(saga_id, app)


@dataclass(frozen=True)
class Unregistered:
    """A task a saga needs that no running worker has: ``saga``'s step ``step``, or its compensation."""

    saga: str
    step: str
    task: str
    compensation: bool

    def __str__(self) -> str:
        what = "compensation of step" if self.compensation else "step"
        return f"saga {self.saga!r}: {what} {self.step!r}: task {self.task!r}"


@dataclass(frozen=True)
class RunningPlan:
    """Sagas still running on one plan (a definition, by digest), and the tasks of it no running worker has.

    A running saga keeps the plan it started with, so after a deploy that
    renamed or removed a task, the old plan's sagas still need it: this is
    what ``celery saga check`` shows until they drain.
    """

    saga: str
    digest: str
    count: int
    #: When the oldest of them started.
    since: datetime | None
    #: Whether this is the plan the saga's current definition starts.
    current: bool
    missing: tuple[Unregistered, ...]

    def __str__(self) -> str:
        since = f", since {iso(self.since)}" if self.since else ""
        which = "current plan" if self.current else "plan"
        text = f"{self.count} running saga(s) of {self.saga} ({which} {self.digest}{since})"
        if self.missing:
            needs = ", ".join(sorted({m.task for m in self.missing}))
            text += f" need {needs}, which no worker has"
        return text


@dataclass(frozen=True)
class RegistrationReport:
    """What ``celery saga check`` found: the workers that answered, the tasks none of them has, the running plans."""

    workers: tuple[str, ...]
    missing: tuple[Unregistered, ...]
    running: tuple[RunningPlan, ...] = ()

    @property
    def stranded(self) -> tuple[RunningPlan, ...]:
        """Running plans that need a task no worker has."""
        return tuple(p for p in self.running if p.missing)

    @property
    def ok(self) -> bool:
        return bool(self.workers) and not self.missing and not self.stranded


def check_registration(app: Celery, timeout: float = 1.0) -> RegistrationReport:
    """Ask the running workers (``inspect registered``) whether each saga's steps and compensations have a worker.

    Every saga defined on ``app`` is checked, after importing the app's task
    modules (``imports``, ``include``, autodiscovered ones) as a worker does.
    A message for a task no worker has fails its step (or attempt) at once,
    rolling the saga back: this finds the typo before a saga meets it.
    """
    app.loader.import_default_modules()
    app.finalize()
    replies = app.control.inspect(timeout=timeout).registered() or {}
    registered = {name.split(" ", 1)[0] for names in replies.values() for name in names or ()}
    missing: list[Unregistered] = []
    for saga in sorted(sagas_of(app), key=lambda s: s.name):
        missing += _unregistered(saga.name, saga.plan(), registered)
    return RegistrationReport(tuple(sorted(replies)), tuple(missing), running_plans(app, registered))


def _unregistered(name: str, plan: Plan, registered: set[str]) -> list[Unregistered]:
    found = []
    for spec in plan.steps:
        if spec.is_wait:
            continue  # no task: the outside world delivers its event
        if spec.task not in registered:
            found.append(Unregistered(name, spec.name, spec.task, False))
        if spec.compensation is not None and spec.compensation not in registered:
            found.append(Unregistered(name, spec.name, spec.compensation, True))
    return found


_RUNNING = (SagaStatus.PENDING, SagaStatus.RUNNING, SagaStatus.COMPENSATING)
_RUNNING_VALUES = frozenset(s.value for s in _RUNNING)


def running_plans(app: Celery, registered: set[str]) -> tuple[RunningPlan, ...]:
    """The plans of the sagas running now, by saga name and digest, with what of each no worker in ``registered`` has.

    Streams through the running statuses' indexes a page at a time: memory
    grows with the number of plans, not of sagas.
    """
    store = store_for(app)
    seen: dict[tuple[str, str], list[Any]] = {}  # (name, digest) -> [count, oldest start]
    for status in _RUNNING:
        for ids in store.index_pages(status, None, None, None):
            for raw in store.load_many(ids):
                if not raw or raw.get("status") not in _RUNNING_VALUES or not raw.get("ph"):
                    continue
                entry = seen.setdefault((raw.get("name", ""), raw["ph"]), [0, None])
                entry[0] += 1
                created = _lenient_int(raw.get("created"))
                if created is not None and (entry[1] is None or created < entry[1]):
                    entry[1] = created
    current = {saga.name: _digest_or_none(saga) for saga in sagas_of(app)}
    plans = []
    for (name, digest), (count, oldest) in sorted(seen.items()):
        try:
            plan = store.plan(digest)
        except SagaError:
            continue  # a definition that cannot be read: `show` of one of its sagas says why
        since = datetime.fromtimestamp(oldest / 1000, UTC) if oldest is not None else None
        missing = tuple(_unregistered(name, plan, registered))
        plans.append(RunningPlan(name, digest, count, since, current.get(name) == digest, missing))
    return tuple(plans)


def _lenient_int(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


def _digest_or_none(saga: DefinedSaga) -> str | None:
    try:
        return saga.plan_digest()
    except SagaError:
        return None


def ping(app: Celery) -> None:
    """Raise SagaStoreUnavailable unless ``app``'s saga store answers."""
    store_for(app).ping()


def cancel_saga(app: Celery, saga_id: str) -> bool:
    """Cancel a saga: `SagaResult.cancel`. False if it had already finished.

    Raises:
        SagaNotFound: no such saga.
    """
    return SagaResult(saga_id, app).cancel()


def signal_saga(app: Celery, saga_id: str, event: str, data: Any = None) -> bool:
    """Deliver an outside event to a saga's ``wait_for(event)``: `SagaResult.signal`.

    Raises:
        SagaNotFound: no such saga.
    """
    return SagaResult(saga_id, app).signal(event, data)


def purge_saga(app: Celery, saga_id: str) -> None:
    """Remove a finished saga (COMPLETED, COMPENSATED or FAILED) and its index entries, even a corrupt one.

    Raises:
        SagaNotFound: no such saga.
        SagaStateError: the saga is still running.
    """
    store = store_for(app)
    t = store.purge(saga_id)
    _check(store, saga_id, t, "purge", "only a finished saga (COMPLETED, COMPENSATED or FAILED) can be purged")
    if t.admitted:
        follow(app, store, t)  # a FAILED saga's locks went with it: the sagas waiting for them start


def parse_since(text: str) -> datetime | timedelta:
    """``10m``, ``2h``, ``1d`` ... as a time ago, else ISO-8601 (UTC unless it has an offset).

    Raises:
        ValueError: it is neither.
        OverflowError: a time ago before the year 1, which no datetime can hold.
    """
    text = text.strip()
    ago = _AGO.fullmatch(text)
    if ago:
        try:
            delta = timedelta(seconds=float(ago.group(1)) * _UNITS[ago.group(2)])
            datetime.now(UTC) - delta  # what a filter computes from it
        except OverflowError as exc:
            raise OverflowError(f"{text!r} is too far back") from exc
        return delta
    when = datetime.fromisoformat(text)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def epoch_seconds(since: datetime | timedelta | None) -> float | None:
    """A `parse_since` value (or a datetime, naive is UTC) as epoch seconds; None for None."""
    if since is None:
        return None
    if isinstance(since, timedelta):
        return (datetime.now(UTC) - since).timestamp()
    return (since if since.tzinfo else since.replace(tzinfo=UTC)).timestamp()


def _read_index(
    store: SagaStore, status: SagaStatus, name: str | None, limit: int, since: float | None, strict: bool
) -> list[SagaSummary]:
    """Up to ``limit`` live sagas from one index, reading further only past entries whose record is gone.

    Entries whose record is gone (expired, purged, lost in a reset of the
    store) are removed as they are met, so no reader meets them twice.
    """
    want = limit
    while True:
        ids = store.list_ids(status, name, want, since)
        records = _load_each(store, ids)
        gone = [saga_id for saga_id, raw in zip(ids, records, strict=True) if raw is None]
        # Records expire (saga_retention) all the time: ask once per batch whether these were lost in a reset.
        reset = bool(gone) and store.was_reset()
        for saga_id in gone:
            if reset:
                store.count_lost(saga_id)
            store.drop_from_index(saga_id, status, name or "")
        live = [
            s
            for s in (_summary(saga_id, raw, status, name) for saga_id, raw in zip(ids, records, strict=True))
            if s is not None and (s.status is status or not strict)
        ]
        if len(live) >= limit or len(ids) < want:
            return live[:limit]
        want *= 2


def _found(
    store: SagaStore,
    where: tuple[tuple[str, str], ...],
    statuses: set[SagaStatus],
    name: str | None,
    since: float | None,
    limit: int,
) -> list[SagaSummary]:
    """The sagas the business key index has for ``where``, filtered like a listing, newest first."""
    ids = find(store, where)
    found = []
    for saga_id, raw in zip(ids, _load_each(store, ids), strict=True):
        # A record gone (its entries go with the next collection) or started
        # anew under its id with other values (a failed start) is no match.
        if not isinstance(raw, dict) or not matches(raw, where):
            continue
        summary = summary_of(saga_id, raw)
        if summary is None or summary.status not in statuses or (name and summary.name != name):
            continue
        if since is not None and (summary.status_at is None or summary.status_at.timestamp() < since):
            continue
        found.append(summary)
    found.sort(key=lambda s: (s.status_at is not None, s.status_at, s.saga_id), reverse=True)
    return found[:limit]


def _load_each(store: SagaStore, ids: list[str]) -> list[dict[str, str] | SagaRecordCorrupt | None]:
    """``store.load_many``, where one record that cannot be read is its error, not the whole batch's."""
    try:
        return list(store.load_many(ids))
    except SagaRecordCorrupt:
        pass
    out: list[dict[str, str] | SagaRecordCorrupt | None] = []
    for saga_id in ids:  # a round trip each, only while a corrupt record is in the batch
        try:
            out += store.load_many([saga_id])
        except SagaRecordCorrupt as exc:
            out.append(exc)
    return out


def _summary(
    saga_id: str, raw: dict[str, str] | SagaRecordCorrupt | None, status: SagaStatus, name: str | None
) -> SagaSummary | None:
    """The list's line for a record, None for one that is gone; a corrupt one's says so, under its index's status."""
    if isinstance(raw, SagaRecordCorrupt):
        corrupt, known = raw, {}
    else:
        summary = summary_of(saga_id, raw)
        if summary is not None or not raw:
            return summary
        # summary_of reads leniently, but without a status there is no line to show.
        corrupt, known = SagaRecordCorrupt(saga_id, f"its status {raw.get('status')!r} is not a saga status"), raw
    return SagaSummary(
        saga_id=saga_id,
        name=known.get("name") or name or "",
        status=status,
        status_at=None,
        created_at=None,
        failed_step=None,
        error=str(corrupt),
        corrupt=True,
    )


def _check(store: SagaStore, saga_id: str, t: Transition, action: str, allowed: str) -> None:
    if t.outcome is Outcome.MISSING:
        raise SagaNotFound(saga_id, store.where())
    if t.outcome is Outcome.NOT_ALLOWED:
        raise SagaStateError(saga_id, t.status.value if t.status else "", action, allowed)
    if t.outcome is Outcome.CORRUPT:
        raise SagaRecordCorrupt(saga_id, f"the store refused to {action} it")
