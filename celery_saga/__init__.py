"""celery_saga: sagas on Celery.

A saga is a business transaction made of steps, each an ordinary Celery task
paired with a compensating task. When a step fails, the steps already done
are compensated in reverse order. A record in Redis is the source of truth.
"""

from __future__ import annotations

from .admin import cancel_saga, list_sagas, purge_saga, retry_saga, saga_state, saga_stats, signal_saga
from .bulk_actions import BulkReport, bulk
from .context import StepContext, current_step
from .enable import enable
from .errors import (
    IdempotencyConflict,
    SagaCompensated,
    SagaDataError,
    SagaDefinitionError,
    SagaError,
    SagaFailed,
    SagaLocked,
    SagaNotFound,
    SagaRecordCorrupt,
    SagaStateError,
    SagaStoreMisconfigured,
    SagaStoreUnavailable,
    StepResultNotSerializable,
)
from .locks import list_locks, unlock_saga
from .rerun import rerun_saga
from .result import SagaResult
from .saga import Saga, parallel
from .signals import (
    compensation_failed,
    saga_compensated,
    saga_completed,
    saga_event_received,
    saga_failed,
    saga_started,
)
from .state import CompensationRound, CompensationStatus, SagaState, SagaStatus, StepRecord, StepStatus
from .step import saga_step, step
from .sweeper import SweepReport, sweep
from .views import SagaStats, SagaSummary
from .wait import wait_for

__version__ = "0.1.0"

__all__ = [
    # Defining sagas
    "Saga",
    "parallel",
    "saga_step",
    "step",
    "wait_for",
    # Inside a step
    "current_step",
    "StepContext",
    # Running and inspecting
    "SagaResult",
    "SagaState",
    "SagaStatus",
    "StepRecord",
    "StepStatus",
    "CompensationStatus",
    "CompensationRound",
    # Participant services
    "enable",
    # Operating
    "list_sagas",
    "saga_state",
    "saga_stats",
    "retry_saga",
    "rerun_saga",
    "purge_saga",
    "cancel_saga",
    "signal_saga",
    "list_locks",
    "unlock_saga",
    "bulk",
    "BulkReport",
    "sweep",
    "SweepReport",
    "SagaSummary",
    "SagaStats",
    "SagaStateError",
    # Signals
    "saga_started",
    "saga_completed",
    "saga_compensated",
    "saga_failed",
    "compensation_failed",
    "saga_event_received",
    # Errors
    "SagaError",
    "SagaDefinitionError",
    "SagaDataError",
    "SagaCompensated",
    "SagaFailed",
    "IdempotencyConflict",
    "SagaLocked",
    "SagaStoreUnavailable",
    "SagaStoreMisconfigured",
    "SagaNotFound",
    "SagaRecordCorrupt",
    "StepResultNotSerializable",
    "__version__",
]
