"""Acting on sets of sagas: ``bulk(app, action, **filters)``, behind ``celery saga cancel|retry|purge|rerun``.

A bulk action streams through the status indexes (never a SCAN), a page at a
time, oldest first: each page's records are read in one round trip, checked
against the filters, and acted on one saga at a time by the very function of
the single-saga command (`celery_saga.admin`). Memory is one page and the
report, whatever the count.

Each action is idempotent per saga, so a run that was interrupted (Ctrl-C, a
lost connection) is simply run again: what it did already is skipped, with
the reason. Ctrl-C (SIGINT, SIGTERM) stops it between two sagas, never inside
one; a second one stops it at once. A run only meets index entries from before it started (``until``
defaults to then), so a saga it moves on (a retry that fails again at once)
is not met twice.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from celery import Celery

from . import codec
from .admin import epoch_seconds, purge_saga, retry_saga
from .errors import SagaDefinitionError, SagaNotFound, SagaRecordCorrupt, SagaStateError
from .rerun import rerun_saga
from .result import SagaResult
from .search import parse_where
from .shutdown import stop_requested
from .state import SagaStatus
from .stores import store_for

__all__ = ["ACTIONS", "BulkReport", "bulk"]

#: What a bulk run can do to each saga it matches, and the statuses it looks in unless told.
ACTIONS: dict[str, tuple[SagaStatus, ...]] = {
    "cancel": (SagaStatus.PENDING, SagaStatus.RUNNING),
    "retry": (SagaStatus.FAILED,),
    "purge": (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED),
    "rerun": (SagaStatus.COMPENSATED, SagaStatus.FAILED),
}
#: Ids a report keeps to show (a dry run prints them), and errors it keeps in full.
SAMPLE = 20
ERRORS_KEPT = 100


@dataclass
class BulkReport:
    """What a bulk run matched and did; counts only, bounded whatever the number of sagas.

    Attributes:
        action: ``cancel``, ``retry``, ``purge`` or ``rerun``.
        dry_run: Nothing was changed: ``matched`` is what a run would act on.
        matched: Sagas the filters matched.
        acted: Sagas the action changed.
        skipped: Matched sagas left as they were, by reason (finished meanwhile, gone ...).
        errors: The first `ERRORS_KEPT` sagas the action failed on, with the error; ``error_count`` all.
        sample: The first `SAMPLE` matched ids, oldest first.
        interrupted: The run was stopped (Ctrl-C) before the end: run it again to finish.
    """

    action: str
    dry_run: bool = False
    matched: int = 0
    acted: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    errors: list[tuple[str, str]] = field(default_factory=list)
    error_count: int = 0
    sample: list[str] = field(default_factory=list)
    interrupted: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "dry_run": self.dry_run,
            "matched": self.matched,
            "acted": self.acted,
            "skipped": dict(self.skipped),
            "errors": [{"id": saga_id, "error": error} for saga_id, error in self.errors],
            "error_count": self.error_count,
            "sample": list(self.sample),
            "interrupted": self.interrupted,
        }


@dataclass(frozen=True)
class _Filter:
    name: str | None
    statuses: tuple[SagaStatus, ...]
    reason: str | None
    failed_step: str | None
    since: float | None
    until: float
    where: tuple[tuple[str, str], ...]

    @functools.cached_property
    def status_values(self) -> frozenset[str]:
        return frozenset(s.value for s in self.statuses)

    def matches(self, raw: Mapping[str, str]) -> bool:
        # The index may lag its record by a moment: the record decides.
        if raw.get("status") not in self.status_values:
            return False
        if self.name is not None and raw.get("name") != self.name:
            return False
        if self.reason is not None and (raw.get("reason") or "") != self.reason:
            return False
        if self.failed_step is not None and (raw.get("failed_step") or "") != self.failed_step:
            return False
        if self.where:
            try:
                kwargs = codec.loads(raw.get("kwargs") or "{}")
            except ValueError:
                return False
            if not isinstance(kwargs, dict) or not all(_same(kwargs.get(k, _ABSENT), v) for k, v in self.where):
                return False
        return True


_ABSENT = object()


def _same(value: Any, wanted: str) -> bool:
    """``--where order_id=7`` matches 7 and "7"; ``flag=true`` matches True."""
    if value is _ABSENT or isinstance(value, (dict, list)):
        return False
    if isinstance(value, bool):
        return wanted.lower() == str(value).lower()
    return str(value) == wanted


def bulk(
    app: Celery,
    action: str,
    *,
    name: str | None = None,
    status: SagaStatus | str | Iterable[SagaStatus | str] | None = None,
    reason: str | None = None,
    failed_step: str | None = None,
    since: datetime | timedelta | None = None,
    until: datetime | timedelta | None = None,
    where: Mapping[str, Any] | Iterable[str] | None = None,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
    page: int = 500,
) -> BulkReport:
    """Apply ``action`` (``cancel``, ``retry``, ``purge``, ``rerun``) to every saga the filters match.

    Args:
        app: The app whose saga store to act on.
        action: ``cancel`` (a running saga is stopped and compensated),
            ``retry`` (what gave up in a FAILED saga is sent again), ``purge``
            (a finished saga is removed): `celery_saga.admin`'s, one saga at a time.
        name: Only sagas of this name.
        status: Only sagas in this status (or these); by default the
            statuses the action applies to (`ACTIONS`).
        reason: Only sagas whose rollback had this reason ("failure",
            "timeout", "cancelled", "forward" ...).
        failed_step: Only sagas whose rollback this step started.
        since: Only sagas that entered their status at or after this time
            (a datetime, naive is UTC, or a time ago).
        until: Only sagas that entered their status at or before this time;
            by default, when the run starts.
        where: Only sagas whose start kwargs have these values:
            ``{"order_id": 7}`` or ``["order_id=7"]`` (compared as text).
        dry_run: Change nothing; count what would be acted on.
        progress: Called with the number of sagas matched so far, after each page.
        page: Index entries read per round trip.

    Returns:
        The counts; on Ctrl-C, what was done so far, with ``interrupted``.

    Raises:
        ValueError: an unknown action or status, or a ``where`` item that is not KEY=VALUE.
        SagaStoreUnavailable: the store could not be reached (run it again: what was done is skipped).
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {sorted(ACTIONS)}, not {action!r}")
    statuses = _statuses(status, action)
    if isinstance(where, Mapping):
        pairs = tuple((str(k), str(v).lower() if isinstance(v, bool) else str(v)) for k, v in where.items())
    else:
        pairs = parse_where(where or ())
    end = epoch_seconds(until)
    filt = _Filter(
        name, statuses, reason, failed_step, epoch_seconds(since), end if end is not None else time.time(), pairs
    )
    report = BulkReport(action, dry_run)
    act = _ACT[action]
    try:
        with stop_requested() as asked:
            for ids, records in _pages(app, filt, page):
                for saga_id, raw in zip(ids, records, strict=True):
                    if asked():
                        report.interrupted = True
                        return report
                    if raw is None or isinstance(raw, SagaRecordCorrupt) or not filt.matches(raw):
                        continue
                    report.matched += 1
                    if len(report.sample) < SAMPLE:
                        report.sample.append(saga_id)
                    if not dry_run:
                        _act_on(app, act, saga_id, report)
                if progress is not None:
                    progress(report.matched)
    except KeyboardInterrupt:  # a second Ctrl-C: at once, wherever it was
        report.interrupted = True
    return report


def _statuses(status: SagaStatus | str | Iterable[SagaStatus | str] | None, action: str) -> tuple[SagaStatus, ...]:
    if status is None:
        return ACTIONS[action]
    if isinstance(status, (str, SagaStatus)):
        return (SagaStatus(str(status).upper()),)
    return tuple(SagaStatus(str(s).upper()) for s in status)


def _pages(app: Celery, filt: _Filter, page: int) -> Iterator[tuple[list[str], list[Any]]]:
    store = store_for(app)
    for status in filt.statuses:
        for ids in store.index_pages(status, filt.name, filt.since, filt.until, page):
            yield ids, list(store.load_many(ids)) if ids else []


def _act_on(app: Celery, act: Callable[[Celery, str], str | None], saga_id: str, report: BulkReport) -> None:
    try:
        skipped = act(app, saga_id)
    except SagaNotFound:
        skipped = "gone (expired or purged meanwhile)"
    except SagaStateError as exc:
        skipped = f"not allowed in its status ({exc.status})" if exc.status else "not allowed"
    except (SagaRecordCorrupt, SagaDefinitionError) as exc:
        # (A re-run of a saga whose name this process does not define.)
        report.error_count += 1
        if len(report.errors) < ERRORS_KEPT:
            report.errors.append((saga_id, str(exc)))
        return
    if skipped is None:
        report.acted += 1
    else:
        report.skipped[skipped] += 1


def _cancel(app: Celery, saga_id: str) -> str | None:
    return None if SagaResult(saga_id, app=app).cancel() else "finished, or past its pivot"


def _retry(app: Celery, saga_id: str) -> str | None:
    retry_saga(app, saga_id)
    return None


def _purge(app: Celery, saga_id: str) -> str | None:
    purge_saga(app, saga_id)
    return None


def _rerun(app: Celery, saga_id: str) -> str | None:
    try:
        rerun_saga(app, saga_id)
    except SagaStateError as exc:
        # Its status allows it: the refusal is a re-run made already (by an earlier run of this command).
        if exc.status in (SagaStatus.COMPENSATED.value, SagaStatus.FAILED.value):
            return "re-run already"
        raise
    return None


_ACT: dict[str, Callable[[Celery, str], str | None]] = {
    "cancel": _cancel,
    "retry": _retry,
    "purge": _purge,
    "rerun": _rerun,
}
