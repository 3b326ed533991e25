"""Saga and step statuses, and the read-only view of a saga record."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from . import codec
from .errors import SagaRecordCorrupt
from .plan import Plan, cached_plan

__all__ = [
    "CompensationRound",
    "CompensationStatus",
    "SagaState",
    "SagaStatus",
    "StepRecord",
    "StepStatus",
    "data_before",
    "final_data",
    "fold",
    "ms_time",
    "search_pairs",
]


class SagaStatus(str, Enum):
    """Where a saga is. PENDING: started, no step begun yet."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"
    FAILED = "FAILED"

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    def __str__(self) -> str:
        return self.value


_FINISHED = frozenset({SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED})


class StepStatus(str, Enum):
    """The forward action of a step.

    WAITING: its stage has not been dispatched. CANCELLED: fenced before it
    started; its function will never run, and it is not compensated. UNKNOWN:
    it started, and the saga stopped waiting for its outcome (a timeout, a
    cancel, a lost worker); it is compensated blind, with ``step_result=None``.
    """

    WAITING = "WAITING"
    DISPATCHED = "DISPATCHED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"

    def __str__(self) -> str:
        return self.value


class CompensationStatus(str, Enum):
    """The compensation of a step. RETRYING: it failed at least once and will run again.

    WAITING: a second round waits for the first round to end.
    """

    WAITING = "WAITING"
    DISPATCHED = "DISPATCHED"
    RUNNING = "RUNNING"
    RETRYING = "RETRYING"
    COMPENSATED = "COMPENSATED"
    GAVE_UP = "GAVE_UP"

    def __str__(self) -> str:
        return self.value


#: What parsing a damaged record can raise: bad values and types, times out of
#: range, and JSON nested too deep to decode.
_UNREADABLE = (KeyError, ValueError, TypeError, OverflowError, OSError, RecursionError)


def ms_time(raw: str | None) -> datetime | None:
    """A record's time field (ms since the epoch) as a UTC datetime; None if unset."""
    if not raw:
        return None
    return datetime.fromtimestamp(int(raw) / 1000, tz=UTC)


def _int(raw: str | None) -> int:
    return int(raw) if raw else 0


def _seconds(raw: str | None) -> float | None:
    return int(raw) / 1000 if raw else None


def _nth(values: list[str] | None, i: int) -> str | None:
    return values[i] if values is not None and i < len(values) else None


@dataclass(frozen=True)
class CompensationRound:
    """The second compensation round of a step that succeeded after it was compensated blind."""

    status: CompensationStatus
    attempts: int
    error: str | None
    started_at: datetime | None
    ended_at: datetime | None
    deadline: datetime | None


@dataclass(frozen=True)
class StepRecord:
    """What the record says about one step and its compensation.

    ``timeout`` is the step's deadline in seconds (None: none) and
    ``deadline`` when the current dispatch runs out. ``stopped_by`` says why
    the saga stopped waiting for a CANCELLED or UNKNOWN step: ``"timeout"``,
    ``"cancelled"``, ``"lost"`` (its worker), ``"failure"`` (of a sibling) or
    ``"unstorable"`` (it returned a result the record cannot hold).
    ``late_status``/``late_result``/``late_error`` hold an outcome that
    arrived after that; ``second_round`` the compensation of a late success.
    ``retriable``: the step comes after the saga's pivot, so it is sent again
    rather than compensated; ``forward_retries`` counts those re-sends (also
    of a pivot whose outcome was lost), and ``attempts`` every run.
    """

    name: str
    task: str
    stage: int
    compensation: str | None
    status: StepStatus
    attempts: int
    result: Any
    error: str | None
    started_at: datetime | None
    ended_at: datetime | None
    compensation_status: CompensationStatus | None
    compensation_attempts: int
    compensation_error: str | None
    compensation_started_at: datetime | None
    compensation_ended_at: datetime | None
    timeout: float | None = None
    deadline: datetime | None = None
    stopped_by: str | None = None
    late_status: StepStatus | None = None
    late_result: Any = None
    late_error: str | None = None
    late_at: datetime | None = None
    compensation_deadline: datetime | None = None
    second_round: CompensationRound | None = None
    retriable: bool = False
    forward_retries: int = 0
    #: A step that is a child saga: that saga's id (``<saga_id>:<step>``).
    child_id: str | None = None
    #: The instance token of the worker its begin named (``celery_saga.liveness``), None if none.
    worker: str | None = None
    #: ``heartbeat_timeout`` in seconds, and when a RUNNING step's next heartbeat is due by.
    heartbeat_timeout: float | None = None
    heartbeat_deadline: datetime | None = None

    @property
    def timed_out(self) -> bool:
        """True if the step missed its deadline (or the saga's), or a time limit cut it off."""
        return self.stopped_by == "timeout"


@dataclass(frozen=True)
class SagaState:
    """A snapshot of one saga record.

    ``data`` is the saga data as of now: the start kwargs updated by the dict
    results of every completed stage. ``pivot`` names the saga's point of no
    return (None: it has none), and ``passed_pivot`` says the pivot has
    completed: the saga can no longer roll back. A child saga (a saga used
    as a step of another) has ``parent_id``; the parent's step that is a
    child has its ``child_id``.
    """

    saga_id: str
    name: str
    status: SagaStatus
    status_at: datetime | None
    created_at: datetime | None
    idempotency_key: str | None
    kwargs: dict[str, Any]
    data: dict[str, Any]
    steps: tuple[StepRecord, ...]
    failed_step: str | None
    error: str | None
    reason: str | None
    settings: dict[str, Any]
    timeout: float | None = None
    deadline: datetime | None = None
    #: Keys the saga's steps redact: masked wherever its data is shown.
    redact: frozenset[str] = frozenset()
    pivot: str | None = None
    passed_pivot: bool = False
    #: A child saga's parent saga, and the parent's step that it is.
    parent_id: str | None = None
    parent_step: str | None = None
    #: Its business keys (``Saga(search_keys=...)``) and their values, as text.
    search_keys: Mapping[str, str] = field(default_factory=dict)
    #: The saga this one re-runs, and the re-runs of this one (`celery_saga.rerun_saga`).
    rerun_of: str | None = None
    reruns: tuple[str, ...] = ()
    #: The resources it names (``l:<lock>``, ``n:<saga name>`` for max_running), and
    #: whether it holds them ("held") or waits for them ("wait"); None once given back.
    locks: tuple[str, ...] = ()
    lock_status: str | None = None

    def step(self, name: str) -> StepRecord:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    @classmethod
    def from_record(cls, saga_id: str, raw: dict[str, str]) -> SagaState:
        """Parse a raw record (a Redis hash). Never trusts it to name classes.

        Raises:
            SagaRecordCorrupt: any part of it cannot be read (a time out of
                range, JSON nested too deep to decode ...).
        """
        try:
            return cls._parse(saga_id, raw)
        except _UNREADABLE as exc:
            raise SagaRecordCorrupt(saga_id, f"{type(exc).__name__}: {exc}") from exc

    @classmethod
    def _parse(cls, saga_id: str, raw: dict[str, str]) -> SagaState:
        try:
            plan = _plan_of(raw)
            kwargs = codec.loads(raw["kwargs"])
            status = SagaStatus(raw["status"])
            settings = json.loads(raw.get("settings") or "{}")
            pivot = raw.get("pv") or None
            pivot_stage = plan.step(pivot).stage if pivot else None
            steps = []
            # A COMPLETED record keeps its steps' timeouts as one field, in step order.
            packed_timeouts = raw["tos"].split(",") if "tos" in raw else None
            for i, spec in enumerate(plan.steps):
                n = spec.name
                result_raw = raw.get(f"r:{n}")
                late_raw = raw.get(f"lr:{n}")
                comp_status = raw.get(f"cs:{n}")
                round2 = raw.get(f"cs2:{n}")
                steps.append(
                    StepRecord(
                        name=n,
                        task=spec.task,
                        stage=spec.stage,
                        compensation=spec.compensation,
                        status=StepStatus(raw.get(f"s:{n}") or "WAITING"),
                        attempts=_int(raw.get(f"a:{n}")),
                        result=codec.loads(result_raw) if result_raw is not None else None,
                        error=raw.get(f"e:{n}"),
                        started_at=ms_time(raw.get(f"t0:{n}")),
                        ended_at=ms_time(raw.get(f"t1:{n}")),
                        compensation_status=CompensationStatus(comp_status) if comp_status else None,
                        compensation_attempts=_int(raw.get(f"ca:{n}")),
                        compensation_error=raw.get(f"ce:{n}"),
                        compensation_started_at=ms_time(raw.get(f"ct0:{n}")),
                        compensation_ended_at=ms_time(raw.get(f"ct1:{n}")),
                        timeout=_seconds(raw.get(f"to:{n}") or _nth(packed_timeouts, i)),
                        deadline=ms_time(raw.get(f"dl:{n}")),
                        stopped_by=raw.get(f"w:{n}") or None,
                        worker=raw.get(f"wk:{n}") or None,
                        heartbeat_timeout=_seconds(raw.get(f"hbt:{n}")),
                        heartbeat_deadline=ms_time(raw.get(f"hbd:{n}")),
                        late_status=StepStatus(raw[f"ls:{n}"]) if raw.get(f"ls:{n}") else None,
                        late_result=codec.loads(late_raw) if late_raw is not None else None,
                        late_error=raw.get(f"le:{n}"),
                        late_at=ms_time(raw.get(f"lt:{n}")),
                        compensation_deadline=ms_time(raw.get(f"cdl:{n}")),
                        second_round=CompensationRound(
                            status=CompensationStatus(round2),
                            attempts=_int(raw.get(f"ca2:{n}")),
                            error=raw.get(f"ce2:{n}"),
                            started_at=ms_time(raw.get(f"ct02:{n}")),
                            ended_at=ms_time(raw.get(f"ct12:{n}")),
                            deadline=ms_time(raw.get(f"cdl2:{n}")),
                        )
                        if round2
                        else None,
                        retriable=pivot_stage is not None and spec.stage > pivot_stage,
                        forward_retries=_int(raw.get(f"fa:{n}")),
                        child_id=f"{saga_id}:{n}" if spec.child else None,
                    )
                )
        except _UNREADABLE as exc:
            raise SagaRecordCorrupt(saga_id, f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(kwargs, dict):
            raise SagaRecordCorrupt(saga_id, "kwargs is not a JSON object")
        return cls(
            saga_id=saga_id,
            name=raw.get("name", ""),
            status=status,
            status_at=ms_time(raw.get("status_at")),
            created_at=ms_time(raw.get("created")),
            idempotency_key=raw.get("key") or None,
            kwargs=kwargs,
            data=data_before(plan, raw, len(plan.stages), kwargs),
            steps=tuple(steps),
            failed_step=raw.get("failed_step") or None,
            error=raw.get("error") or None,
            reason=raw.get("reason") or None,
            settings=settings,
            timeout=_seconds(raw.get("sto")),
            deadline=ms_time(raw.get("sdl")),
            redact=plan.redacted_keys,
            pivot=pivot,
            passed_pivot=raw.get("past") == "1",
            parent_id=raw.get("parent") or None,
            parent_step=raw.get("pstep") or None,
            search_keys=dict(search_pairs(raw.get("sk", ""))),
            rerun_of=raw.get("rof") or None,
            reruns=_ids(raw.get("rrs")),
            locks=_resources(raw.get("lk")),
            lock_status=raw.get("lks") or None,
        )


def _ids(text: str | None) -> tuple[str, ...]:
    """A JSON list of saga ids (``rrs``); a damaged one reads as none rather than hiding the saga."""
    try:
        ids = json.loads(text or "[]")
    except ValueError:
        return ()
    return tuple(str(i) for i in ids) if isinstance(ids, list) else ()


def _resources(text: str | None) -> tuple[str, ...]:
    """The resources a record names (``lk``: ``[[resource, capacity], ...]``)."""
    try:
        found = json.loads(text or "[]")
    except ValueError:
        return ()
    if not isinstance(found, list):
        return ()
    return tuple(str(r[0]) for r in found if isinstance(r, list) and r)


def _plan_of(raw: dict[str, str]) -> Plan:
    digest = raw.get("ph")
    return cached_plan(digest, lambda: raw["plan"]) if digest else Plan.from_json(raw["plan"])


def final_data(saga_id: str, raw: dict[str, str]) -> dict[str, Any]:
    """A raw record's saga data, without parsing its steps: all a completed saga's ``get()`` returns.

    Raises:
        SagaRecordCorrupt: the record cannot be read.
    """
    try:
        plan = _plan_of(raw)
        kwargs = codec.loads(raw["kwargs"])
        if not isinstance(kwargs, dict):
            raise TypeError("kwargs is not a JSON object")
        return data_before(plan, raw, len(plan.stages), kwargs)
    except _UNREADABLE as exc:
        raise SagaRecordCorrupt(saga_id, f"{type(exc).__name__}: {exc}") from exc


def fold(kwargs: dict[str, Any], results: Iterable[Any]) -> dict[str, Any]:
    """Saga data: the start kwargs updated by each dict result, in order.

    Data only changes between stages, so it is never stored: it is folded
    from the start kwargs and the results of earlier stages, in declaration
    order, by whoever needs it.
    """
    data = dict(kwargs)
    for result in results:
        if isinstance(result, dict):
            data.update(result)
    return data


def data_before(plan: Plan, raw: dict[str, str], stage: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Saga data as seen by the steps of ``stage``, folded from a raw record."""
    results = (
        codec.loads(raw[f"r:{spec.name}"])
        for members in plan.stages[:stage]
        for spec in members
        if raw.get(f"s:{spec.name}") == StepStatus.COMPLETED.value and f"r:{spec.name}" in raw
    )
    return fold(kwargs, results)


def search_pairs(text: str) -> list[tuple[str, str]]:
    """A record's ``sk`` field as (key, value) pairs; none from a field that is no JSON object of text."""
    try:
        found = json.loads(text)
    except ValueError:
        return []
    if not isinstance(found, dict):
        return []
    return [(str(k), v) for k, v in found.items() if isinstance(v, str)]
