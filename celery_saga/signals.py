"""Celery signals sent on saga transitions, for alerts and metrics.

Each is sent at most once per transition, by the process that made it, and
exactly once when no process crashes in between. ``sender`` is the saga
name, so ``saga_failed.connect(handler, sender="place_order")`` works.
Every handler gets ``saga_id``, ``saga_name`` and ``dedup_id``, an id stable
for the transition, to de-duplicate on if a handler records to a store.

=====================  ==============================  =======================
signal                 sent when                       extra arguments
=====================  ==============================  =======================
saga_started           a start created the saga        kwargs
saga_completed         every step completed            data
saga_compensated       the rollback finished           failed_step, error
saga_failed            a compensation gave up          failed_step, error
compensation_failed    one compensation attempt        step, attempt, error,
                       raised                          gave_up
saga_event_received    an outside event was accepted   event, data
                       (by the process delivering it)
=====================  ==============================  =======================
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = [
    "compensation_failed",
    "saga_compensated",
    "saga_completed",
    "saga_event_received",
    "saga_failed",
    "saga_started",
]

saga_started = Signal(name="saga_started")
saga_completed = Signal(name="saga_completed")
saga_compensated = Signal(name="saga_compensated")
saga_failed = Signal(name="saga_failed")
compensation_failed = Signal(name="compensation_failed")
saga_event_received = Signal(name="saga_event_received")
