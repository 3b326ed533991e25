"""Telling the outside world about transitions: Celery signals, and ``task-saga-*`` events for Flower.

Events go out only from workers (a client that sent events would show up in
Flower as a worker), and only when ``saga_send_events`` is true; it defaults
to the worker's own ``worker_send_task_events`` (``celery worker -E``).
The one exception is ``task-saga-event``: an outside event is seldom
delivered by a worker, so any process sends it when ``saga_send_events`` is
set to True. Saga-level events carry the saga id as their ``uuid``, so Flower shows one
pseudo-task per saga whose state follows the saga; step-level events carry
the step's task id, so a skipped duplicate does not stay STARTED in Flower.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery

from . import signals
from .state import SagaState, SagaStatus
from .store import Transition

__all__ = ["configure_worker", "saga_event", "saga_transition", "step_event"]

logger = logging.getLogger("celery_saga")

_FORWARD = (SagaStatus.PENDING, SagaStatus.RUNNING)
_ROLLING_BACK = (SagaStatus.COMPENSATING, SagaStatus.COMPENSATED, SagaStatus.FAILED)


@dataclass
class _WorkerState:
    hostname: str | None = None
    events: bool = False


# Set by the worker bootstep in the worker's main process before the pool
# forks, so pool children inherit it. Stays empty in clients.
_WORKER = _WorkerState()


def configure_worker(app: Celery, hostname: str, task_events: bool) -> None:
    """Called by the worker bootstep: events on per ``saga_send_events``, else per ``-E``."""
    setting = app.conf.get("saga_send_events")
    _WORKER.hostname = hostname
    _WORKER.events = bool(task_events) if setting is None else bool(setting)


def _send(app: Celery, type_: str, uuid: str, **fields: Any) -> None:
    if _WORKER.events:
        _dispatch(app, type_, uuid, **fields)


def _dispatch(app: Celery, type_: str, uuid: str, **fields: Any) -> None:
    try:
        with app.events.default_dispatcher(hostname=_WORKER.hostname) as dispatcher:
            dispatcher.send(type_, uuid=uuid, **fields)
    except Exception:  # monitoring must never break a saga
        logger.warning("could not send %s event for %s", type_, uuid, exc_info=True)


def saga_event(app: Celery, kind: str, saga_id: str, name: str, **fields: Any) -> None:
    """A ``task-saga-<kind>`` event about the saga as a whole (uuid = saga id)."""
    # `name` makes Flower list the pseudo-task under the saga's name.
    _send(app, f"task-saga-{kind}", saga_id, name=name, saga_id=saga_id, saga_name=name, **fields)


def step_event(app: Celery, kind: str, task_id: str, saga_id: str, name: str, step: str, **fields: Any) -> None:
    """A ``task-saga-step-<kind>`` event about one message (uuid = its task id)."""
    _send(app, f"task-saga-step-{kind}", task_id, saga_id=saga_id, saga_name=name, step=step, **fields)


def saga_transition(app: Celery, t: Transition, load: Callable[[], dict[str, str]]) -> None:
    """Send the events and signals for a change of saga status made by this process.

    ``load`` reads the record; it is called only when a signal needs it.
    """
    old, new, saga_id, name = t.changed_from, t.status, t.saga_id, t.name
    if old is None or new is None or old is new:
        return
    if new is SagaStatus.RUNNING:
        saga_event(app, "started", saga_id, name)
        return
    if new in _ROLLING_BACK and old in _FORWARD:
        saga_event(app, "compensating", saga_id, name)
    if new is SagaStatus.COMPLETED:
        saga_event(app, "completed", saga_id, name)
        if signals.saga_completed.receivers:
            data = SagaState.from_record(saga_id, load()).data
            signals.saga_completed.send(
                sender=name, saga_id=saga_id, saga_name=name, dedup_id=f"{saga_id}:completed", data=data
            )
    elif new in (SagaStatus.COMPENSATED, SagaStatus.FAILED):
        raw = load()
        failed_step, error = raw.get("failed_step") or None, raw.get("error") or None
        # An operator retry of a FAILED saga ends it again: a new transition, a new id.
        kind = new.value.lower()
        dedup = f"{saga_id}:{kind}:{raw.get('rr', '0')}"
        saga_event(app, kind, saga_id, name, failed_step=failed_step, error=error)
        signal = signals.saga_compensated if new is SagaStatus.COMPENSATED else signals.saga_failed
        signal.send(sender=name, saga_id=saga_id, saga_name=name, dedup_id=dedup, failed_step=failed_step, error=error)


def saga_started(saga_id: str, name: str, data: dict[str, Any], gen: str) -> None:
    """The start created the saga: the client's signal (never an event)."""
    if not signals.saga_started.receivers:
        return
    signals.saga_started.send(
        sender=name, saga_id=saga_id, saga_name=name, dedup_id=f"{saga_id}:started:{gen}", kwargs=data
    )


def compensation_attempt_failed(
    saga_id: str, name: str, step: str, attempt: int, error: str, gave_up: bool, round: int = 1
) -> None:
    """One compensation attempt raised: the ``compensation_failed`` signal.

    Attempts are counted across operator retries, so ``attempt`` (with the
    round) keeps the id unique.
    """
    undo = "undo" if round == 1 else f"undo{round}"
    signals.compensation_failed.send(
        sender=name,
        saga_id=saga_id,
        saga_name=name,
        dedup_id=f"{saga_id}:{step}:{undo}:{attempt}",
        step=step,
        attempt=attempt,
        error=error,
        gave_up=gave_up,
    )


def forward_attempt_failed(
    saga_id: str, name: str, step: str, attempt: int, error: str, gave_up: bool, delay: float
) -> None:
    """A step past the pivot (or the pivot, its outcome lost) had no outcome to go on: a log line.

    There is no signal: the step's own ``task_failure`` has fired already
    where it raised, and a lost outcome has nothing more to tell.
    """
    if gave_up:
        logger.error(
            "saga %s: step %r gave up at forward attempt %d (%s); the saga is FAILED: retry it once the cause is fixed",
            saga_id,
            step,
            attempt,
            error or "no outcome",
        )
    else:
        logger.warning(
            "saga %s: step %r is past the pivot and had no outcome (%s): sending it again in %.2fs (retry %d)",
            saga_id,
            step,
            error or "no outcome",
            delay,
            attempt,
        )


def event_received(app: Celery, saga_id: str, name: str, event: str, data: Any) -> None:
    """An outside event was accepted: the ``saga_event_received`` signal and a ``task-saga-event`` event.

    The process delivering it is seldom a worker: the event goes out from a
    worker per ``saga_send_events`` / ``-E``, and from any other process
    only when ``saga_send_events`` is set to True.
    """
    signals.saga_event_received.send(
        sender=name, saga_id=saga_id, saga_name=name, dedup_id=f"{saga_id}:event:{event}", event=event, data=data
    )
    setting = app.conf.get("saga_send_events")
    if setting is True or (setting is None and _WORKER.events):
        _dispatch(app, "task-saga-event", saga_id, name=name, saga_id=saga_id, saga_name=name, event=event)
