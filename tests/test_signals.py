"""Signals on saga transitions: each sent once, by the process that made the transition."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_saga import SagaCompensated, SagaFailed, signals
from celery_saga import saga_started as top_level_saga_started
from tests import shop
from tests.helpers import patience


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def handler(self, name: str) -> Any:
        def receive(sender: Any = None, signal: Any = None, **kwargs: Any) -> None:
            with self.lock:
                self.calls.append((name, {"sender": sender, **kwargs}))

        return receive

    def of(self, name: str, saga_id: str) -> list[dict[str, Any]]:
        return [kw for n, kw in self.calls if n == name and kw["saga_id"] == saga_id]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    handlers = {name: rec.handler(name) for name in signals.__all__}
    for name, handler in handlers.items():
        getattr(signals, name).connect(handler, weak=False)
    yield rec
    for name, handler in handlers.items():
        getattr(signals, name).disconnect(handler)


def test_the_signals_are_public_names() -> None:
    assert top_level_saga_started is signals.saga_started


def test_started_and_completed_are_sent_once(app: Celery, r, prefix, worker, recorder: Recorder) -> None:
    s = shop.build(app, r, prefix)
    with worker():
        res = s.sequential.delay(order_id=1)
        res.get(timeout=patience(20))
    (started,) = recorder.of("saga_started", res.id)
    assert started["sender"] == "order_seq" and started["kwargs"] == {"order_id": 1}
    (completed,) = recorder.of("saga_completed", res.id)
    assert completed["data"]["tracking"] == "t-1"
    assert completed["dedup_id"] == f"{res.id}:completed"
    assert not recorder.of("saga_compensated", res.id) and not recorder.of("saga_failed", res.id)
    # A second start with the same key starts nothing, and signals nothing.
    again = s.sequential.apply_async(kwargs={"order_id": 2}, idempotency_key="once")
    s.sequential.apply_async(kwargs={"order_id": 2}, idempotency_key="once")
    assert len(recorder.of("saga_started", again.id)) == 1


def test_compensated_is_sent_once_with_the_failed_step(app: Celery, r, prefix, worker, recorder: Recorder) -> None:
    s = shop.build(app, r, prefix)
    r.hset(f"{prefix}:undo_fail", "shop.reserve", 1)  # one failed compensation attempt
    with worker():
        res = s.sequential.delay(order_id=1, fail={"charge": "declined"})
        with pytest.raises(SagaCompensated):
            res.get(timeout=patience(20))
    (done,) = recorder.of("saga_compensated", res.id)
    assert done["failed_step"] == "shop.charge" and "declined" in done["error"]
    (attempt,) = recorder.of("compensation_failed", res.id)
    assert (attempt["step"], attempt["attempt"], attempt["gave_up"]) == ("shop.reserve", 1, False)
    assert not recorder.of("saga_completed", res.id) and not recorder.of("saga_failed", res.id)


def test_failed_and_each_failed_compensation_attempt(app: Celery, r, prefix, worker, recorder: Recorder) -> None:
    app.conf.saga_compensation_max_retries = 1
    s = shop.build(app, r, prefix)
    r.hset(f"{prefix}:undo_fail", "shop.reserve", 100)
    with worker():
        res = s.sequential.delay(order_id=1, fail={"charge": "declined"})
        with pytest.raises(SagaFailed):
            res.get(timeout=patience(20))
    attempts = recorder.of("compensation_failed", res.id)
    assert [(a["attempt"], a["gave_up"]) for a in attempts] == [(1, False), (2, True)]
    assert len({a["dedup_id"] for a in attempts}) == 2
    (failed,) = recorder.of("saga_failed", res.id)
    assert failed["failed_step"] == "shop.charge"
    assert not recorder.of("saga_compensated", res.id)
