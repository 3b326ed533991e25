"""Waiting for a saga to finish and asserting how it ended.

PYTEST_DONT_REWRITE: these raise their own AssertionErrors.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime

from ..result import SagaResult
from ..state import CompensationStatus, SagaState, SagaStatus, StepRecord
from ..views import render_timeline

__all__ = ["assert_compensated", "assert_completed", "assert_failed", "wait_for_saga"]


def _describe(state: SagaState) -> str:
    text = f"saga {state.saga_id} ({state.name}) is {state.status.value}"
    if state.failed_step:
        text += f"; step {state.failed_step} failed: {state.error}"
    return f"{text}\n{render_timeline(state, width=80)}"


def wait_for_saga(result: SagaResult, timeout: float = 30.0) -> SagaState:
    """Poll until the saga has finished and return its final state; AssertionError after ``timeout`` seconds."""
    deadline, pause = time.monotonic() + timeout, 0.005
    while not (state := result.state()).status.finished:
        if time.monotonic() >= deadline:
            raise AssertionError(f"saga did not finish within {timeout}s: {_describe(state)}")
        time.sleep(pause)
        pause = min(0.1, pause * 2)
    return state


def _finished(result: SagaResult, status: SagaStatus, timeout: float) -> SagaState:
    state = wait_for_saga(result, timeout)
    if state.status is not status:
        raise AssertionError(f"expected the saga to end {status.value}, but {_describe(state)}")
    return state


def _undo_order(s: StepRecord) -> tuple[datetime, int]:
    # Times are in ms; on a tie, the later stage was compensated first.
    return (s.compensation_started_at or datetime.max.replace(tzinfo=UTC), -s.stage)


def assert_completed(result: SagaResult, *, timeout: float = 30.0) -> SagaState:
    """Wait for the saga to finish, assert it COMPLETED, and return its final state."""
    return _finished(result, SagaStatus.COMPLETED, timeout)


def assert_compensated(
    result: SagaResult, steps: Sequence[str] | None = None, *, failed_step: str | None = None, timeout: float = 30.0
) -> SagaState:
    """Wait for the saga to finish, assert it was rolled back (COMPENSATED), and return its final state.

    ``steps``, if given, must be exactly the steps whose compensation ran, in
    the order the compensations started. Compensations of one ``parallel``
    stage start together, and a retrying compensation does not hold back the
    earlier stages, so order only means something between stages that ran
    cleanly. ``failed_step``, if given, is the step whose failure started the rollback.
    """
    state = _finished(result, SagaStatus.COMPENSATED, timeout)
    if failed_step is not None and state.failed_step != failed_step:
        raise AssertionError(f"expected step {failed_step} to start the rollback, but {_describe(state)}")
    done = sorted((s for s in state.steps if s.compensation_status is CompensationStatus.COMPENSATED), key=_undo_order)
    if steps is not None and [s.name for s in done] != list(steps):
        actual = [s.name for s in done]
        raise AssertionError(f"expected compensations {list(steps)}, but ran {actual}: {_describe(state)}")
    return state


def assert_failed(result: SagaResult, gave_up: Sequence[str] | None = None, *, timeout: float = 30.0) -> SagaState:
    """Wait for the saga to finish, assert it FAILED, and return its final state.

    ``gave_up``, if given, must be exactly the steps whose compensation gave up, in any order.
    """
    state = _finished(result, SagaStatus.FAILED, timeout)
    actual = sorted(s.name for s in state.steps if s.compensation_status is CompensationStatus.GAVE_UP)
    if gave_up is not None and actual != sorted(gave_up):
        raise AssertionError(f"expected {sorted(gave_up)} to give up, but {actual} did: {_describe(state)}")
    return state
