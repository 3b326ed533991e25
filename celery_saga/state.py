"""Saga and step statuses, and the read-only view of a saga record."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from .errors import SagaRecordCorrupt
from .plan import Plan

__all__ = ["CompensationStatus", "SagaState", "SagaStatus", "StepRecord", "StepStatus"]


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
    """The forward action of a step. WAITING: its stage has not been dispatched."""

    WAITING = "WAITING"
    DISPATCHED = "DISPATCHED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    def __str__(self) -> str:
        return self.value


class CompensationStatus(str, Enum):
    """The compensation of a step. RETRYING: it failed at least once and will run again."""

    DISPATCHED = "DISPATCHED"
    RUNNING = "RUNNING"
    RETRYING = "RETRYING"
    COMPENSATED = "COMPENSATED"
    GAVE_UP = "GAVE_UP"

    def __str__(self) -> str:
        return self.value


def _time(raw: str | None) -> datetime | None:
    if not raw:
        return None
    return datetime.fromtimestamp(int(raw) / 1000, tz=UTC)


def _int(raw: str | None) -> int:
    return int(raw) if raw else 0


@dataclass(frozen=True)
class StepRecord:
    """What the record says about one step and its compensation."""

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


@dataclass(frozen=True)
class SagaState:
    """A snapshot of one saga record.

    ``data`` is the saga data as of now: the start kwargs updated by the dict
    results of every completed stage.
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

    def step(self, name: str) -> StepRecord:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    @classmethod
    def from_record(cls, saga_id: str, raw: dict[str, str]) -> SagaState:
        """Parse a raw record (a Redis hash). Never trusts it to name classes."""
        try:
            plan = Plan.from_json(raw["plan"])
            kwargs = json.loads(raw["kwargs"])
            status = SagaStatus(raw["status"])
            settings = json.loads(raw.get("settings") or "{}")
            steps = []
            for spec in plan.steps:
                n = spec.name
                result_raw = raw.get(f"r:{n}")
                comp_status = raw.get(f"cs:{n}")
                steps.append(
                    StepRecord(
                        name=n,
                        task=spec.task,
                        stage=spec.stage,
                        compensation=spec.compensation,
                        status=StepStatus(raw.get(f"s:{n}") or "WAITING"),
                        attempts=_int(raw.get(f"a:{n}")),
                        result=json.loads(result_raw) if result_raw is not None else None,
                        error=raw.get(f"e:{n}"),
                        started_at=_time(raw.get(f"t0:{n}")),
                        ended_at=_time(raw.get(f"t1:{n}")),
                        compensation_status=CompensationStatus(comp_status) if comp_status else None,
                        compensation_attempts=_int(raw.get(f"ca:{n}")),
                        compensation_error=raw.get(f"ce:{n}"),
                        compensation_started_at=_time(raw.get(f"ct0:{n}")),
                        compensation_ended_at=_time(raw.get(f"ct1:{n}")),
                    )
                )
        except (KeyError, ValueError, TypeError) as exc:
            raise SagaRecordCorrupt(saga_id, f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(kwargs, dict):
            raise SagaRecordCorrupt(saga_id, "kwargs is not a JSON object")
        return cls(
            saga_id=saga_id,
            name=raw.get("name", ""),
            status=status,
            status_at=_time(raw.get("status_at")),
            created_at=_time(raw.get("created")),
            idempotency_key=raw.get("key") or None,
            kwargs=kwargs,
            data=data_before(plan, raw, len(plan.stages), kwargs),
            steps=tuple(steps),
            failed_step=raw.get("failed_step") or None,
            error=raw.get("error") or None,
            reason=raw.get("reason") or None,
            settings=settings,
        )


def data_before(plan: Plan, raw: dict[str, str], stage: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Saga data as seen by the steps of ``stage``.

    Data only changes between stages, so it is never stored: it is the start
    kwargs folded with the dict results of earlier stages, in declaration order.
    """
    data = dict(kwargs)
    for members in plan.stages[:stage]:
        for spec in members:
            if raw.get(f"s:{spec.name}") != "COMPLETED":
                continue
            result_raw = raw.get(f"r:{spec.name}")
            if result_raw is None:
                continue
            result = json.loads(result_raw)
            if isinstance(result, dict):
                data.update(result)
    return data
