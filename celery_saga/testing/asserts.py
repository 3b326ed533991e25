"""Waiting for a saga to finish and asserting how it ended.

PYTEST_DONT_REWRITE: these raise their own AssertionErrors.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime

from celery import states
from celery.backends.base import DisabledBackend
from celery.result import AsyncResult

from .. import codec
from ..result import SagaResult
from ..state import CompensationStatus, SagaState, SagaStatus, StepRecord
from ..stores import store_for
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


def _finished(result: SagaResult, status: SagaStatus, timeout: float, callbacks: bool) -> SagaState:
    deadline = time.monotonic() + timeout
    state = wait_for_saga(result, timeout)
    if state.status is not status:
        raise AssertionError(f"expected the saga to end {status.value}, but {_describe(state)}")
    if callbacks:
        _wait_for_callback(result, state, deadline)
    return state


def _wait_for_callback(result: SagaResult, state: SagaState, deadline: float) -> None:
    """Wait until the saga's end callback (``on_complete``/``on_failure``), if it has one, has run.

    Its task id is ``<saga id>:<on_complete|on_failure>``: it has run once the
    app's result backend has its outcome. With no result backend, or a
    callback task that ignores its result, there is nothing to read, and
    this waits until the callback was sent.
    """
    raw = store_for(result.app).load(result.id)
    which, field = ("on_complete", "cb_ok") if state.status is SagaStatus.COMPLETED else ("on_failure", "cb_fail")
    sig_json = raw.get(field) or ""
    if not sig_json:
        return
    task = result.app.tasks.get(str(codec.loads(sig_json).get("task")))
    readable = not isinstance(result.app.backend, DisabledBackend) and not (task is not None and task.ignore_result)
    callback = AsyncResult(f"{result.id}:{which}", app=result.app)
    pause = 0.005
    while not (callback.state in states.READY_STATES if readable else raw.get("cbs") == "1"):
        if time.monotonic() >= deadline:
            what = "run" if readable else "been sent"
            raise AssertionError(
                f"saga {result.id} ended {state.status.value}, but its {which} callback has not {what}"
            )
        time.sleep(pause)
        pause = min(0.1, pause * 2)
        if not readable:
            raw = store_for(result.app).load(result.id)


def _undo_order(s: StepRecord) -> tuple[datetime, int]:
    # Times are in ms; on a tie, the later stage was compensated first.
    return (s.compensation_started_at or datetime.max.replace(tzinfo=UTC), -s.stage)


def assert_completed(result: SagaResult, *, timeout: float = 30.0, callbacks: bool = True) -> SagaState:
    """Wait for the saga to finish, assert it COMPLETED, and return its final state.

    With ``callbacks`` (the default), also wait until its ``on_complete`` callback, if any, has run.
    """
    return _finished(result, SagaStatus.COMPLETED, timeout, callbacks)


def assert_compensated(
    result: SagaResult,
    steps: Sequence[str] | None = None,
    *,
    failed_step: str | None = None,
    timeout: float = 30.0,
    callbacks: bool = True,
) -> SagaState:
    """Wait for the saga to finish, assert it was rolled back (COMPENSATED), and return its final state.

    ``steps``, if given, must be exactly the steps whose compensation ran, in
    the order the compensations started. Compensations of one ``parallel``
    stage start together, and a retrying compensation does not hold back the
    earlier stages, so order only means something between stages that ran
    cleanly. ``failed_step``, if given, is the step whose failure started the rollback.
    With ``callbacks`` (the default), also wait until its ``on_failure`` callback, if any, has run.
    """
    state = _finished(result, SagaStatus.COMPENSATED, timeout, callbacks)
    if failed_step is not None and state.failed_step != failed_step:
        raise AssertionError(f"expected step {failed_step} to start the rollback, but {_describe(state)}")
    done = sorted((s for s in state.steps if s.compensation_status is CompensationStatus.COMPENSATED), key=_undo_order)
    if steps is not None and [s.name for s in done] != list(steps):
        actual = [s.name for s in done]
        raise AssertionError(f"expected compensations {list(steps)}, but ran {actual}: {_describe(state)}")
    return state


def assert_failed(
    result: SagaResult, gave_up: Sequence[str] | None = None, *, timeout: float = 30.0, callbacks: bool = True
) -> SagaState:
    """Wait for the saga to finish, assert it FAILED, and return its final state.

    ``gave_up``, if given, must be exactly the steps whose compensation gave up, in any order.
    With ``callbacks`` (the default), also wait until its ``on_failure`` callback, if any, has run.
    """
    state = _finished(result, SagaStatus.FAILED, timeout, callbacks)
    actual = sorted(s.name for s in state.steps if s.compensation_status is CompensationStatus.GAVE_UP)
    if gave_up is not None and actual != sorted(gave_up):
        raise AssertionError(f"expected {sorted(gave_up)} to give up, but {actual} did: {_describe(state)}")
    return state
