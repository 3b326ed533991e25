"""``/metrics``: counters kept by the transitions, parsed as Prometheus parses them."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from celery_saga import SagaCompensated, SagaFailed
from celery_saga.metrics import metrics_text
from celery_saga.stores import forget_store
from tests import shop
from tests.helpers import Gates, patience, wait_for


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed: dict[Any, float], metric: str, **labels: str) -> float:
    return parsed.get((metric, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_the_sagas_run_exactly(app: Celery, r, prefix, worker) -> None:
    s = shop.build(app, r, prefix)
    r.hset(f"{prefix}:undo_fail", "shop.reserve", 2)  # the release fails twice, then runs
    gates = Gates(r, prefix)
    with worker():
        # Given 3 completed orders, 1 rolled back with 2 failed compensation attempts, and 1 still running
        for order_id in (1, 2, 3):
            s.sequential.delay(order_id=order_id).get(timeout=patience(30))
        with pytest.raises(SagaCompensated):
            s.sequential.delay(order_id=4, fail={"charge": "declined"}).get(timeout=patience(30))
        held = s.mixed.delay(order_id=5, gates=["ship"])
        gates.wait_entered("ship")

        # When /metrics is read (by a process that has not seen any of it: a fresh store)
        forget_store(app)
        parsed = samples(metrics_text(app))

        # Then the counters match what ran
        assert value(parsed, "celery_saga_started_total", name="order_seq") == 4
        assert value(parsed, "celery_saga_started_total", name="order") == 1
        assert value(parsed, "celery_saga_finished_total", name="order_seq", status="COMPLETED", reason="") == 3
        assert (
            value(parsed, "celery_saga_finished_total", name="order_seq", status="COMPENSATED", reason="failure") == 1
        )
        assert value(parsed, "celery_saga_compensation_failures_total", name="order_seq") == 2
        assert value(parsed, "celery_saga_in_flight", status="RUNNING") == 1
        assert value(parsed, "celery_saga_in_flight", status="COMPENSATING") == 0
        assert value(parsed, "celery_saga_failed", name="order_seq") == 0
        # And the duration histogram counts each end once, in cumulative buckets
        completed = {"name": "order_seq", "status": "COMPLETED"}
        assert value(parsed, "celery_saga_duration_seconds_count", **completed) == 3
        assert value(parsed, "celery_saga_duration_seconds_bucket", le="+Inf", **completed) == 3
        assert value(parsed, "celery_saga_duration_seconds_bucket", le="0.1", **completed) <= 3
        assert 0 < value(parsed, "celery_saga_duration_seconds_sum", **completed) < 3 * 30

        gates.open("ship")
        held.get(timeout=patience(30))
    parsed = samples(metrics_text(app))
    assert value(parsed, "celery_saga_finished_total", name="order", status="COMPLETED", reason="") == 1
    assert value(parsed, "celery_saga_in_flight", status="RUNNING") == 0


def test_a_replayed_transition_is_not_counted_twice(app: Celery, r, prefix, worker) -> None:
    # Given a saga started twice with one idempotency key (the second start is a replay)
    s = shop.build(app, r, prefix)
    with worker():
        first = s.sequential.apply_async(kwargs={"order_id": 6}, idempotency_key="k-6")
        again = s.sequential.apply_async(kwargs={"order_id": 6}, idempotency_key="k-6")
        assert first.id == again.id
        first.get(timeout=patience(30))
        wait_for(lambda: samples(metrics_text(app)), what="metrics")
    parsed = samples(metrics_text(app))
    assert value(parsed, "celery_saga_started_total", name="order_seq") == 1
    assert value(parsed, "celery_saga_finished_total", name="order_seq", status="COMPLETED", reason="") == 1


def test_a_rollback_that_gives_up_shows_in_the_failed_gauge(app: Celery, r, prefix, worker) -> None:
    app.conf.saga_compensation_max_retries = 1
    s = shop.build(app, r, prefix)
    r.hset(f"{prefix}:undo_fail", "shop.reserve", 100)  # the release never works
    with worker():
        res = s.sequential.delay(order_id=7, fail={"charge": "declined"})
        with pytest.raises(SagaFailed):
            res.get(timeout=patience(30))
    parsed = samples(metrics_text(app))
    assert value(parsed, "celery_saga_failed", name="order_seq") == 1
    assert value(parsed, "celery_saga_finished_total", name="order_seq", status="FAILED", reason="failure") == 1
    assert value(parsed, "celery_saga_compensation_failures_total", name="order_seq") == 2
