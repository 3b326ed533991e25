"""Compensation retries: backoff with equal jitter, giving up, and not blocking the others."""

from __future__ import annotations

import itertools

import pytest
from celery import Celery

from celery_saga import CompensationStatus, SagaCompensated, SagaFailed, SagaStatus
from tests import shop
from tests.helpers import Ledger, patience, wait_for


def test_compensation_failing_n_times_is_retried_with_growing_backoff(
    app: Celery, r, prefix, ledger: Ledger, worker
) -> None:
    app.conf.saga_compensation_retry_backoff = 0.2
    app.conf.saga_compensation_retry_backoff_max = 10
    s = shop.build(app, r, prefix)
    r.hset(f"{prefix}:undo_fail", "shop.reserve", 3)  # fails 3 times, then succeeds
    with worker():
        res = s.sequential.delay(order_id=1, fail={"charge": "declined"})
        with pytest.raises(SagaCompensated):
            res.get(timeout=patience(30))
    attempts = ledger.times("undo_failed:shop.reserve") + ledger.times("undo:shop.reserve")
    assert len(attempts) == 4
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    # Retry n waits in [d/2, d] with d = 0.2 * 2**(n-1); allow scheduling slack above.
    for n, gap in enumerate(gaps, start=1):
        d = 0.2 * 2 ** (n - 1)
        assert d / 2 - 0.02 <= gap <= d + 0.5, (n, gaps)
    assert gaps[2] > gaps[0]
    comp = res.state().step("shop.reserve")
    assert comp.compensation_attempts == 4
    assert comp.compensation_status is CompensationStatus.COMPENSATED
    # Every attempt carried the same idempotency key.
    keys = {e[2] for e in ledger.entries() if e[0] == "undo_failed"} | {
        e[3] for e in ledger.entries() if e[0] == "undo"
    }
    assert keys == {f"{res.id}:shop.reserve:undo"}


def test_max_retries_gives_up_and_the_saga_ends_failed(app: Celery, r, prefix, ledger: Ledger, worker) -> None:
    app.conf.saga_compensation_max_retries = 2
    s = shop.build(app, r, prefix)
    r.hset(f"{prefix}:undo_fail", "shop.charge", 100)  # never succeeds
    with worker():
        res = s.sequential.delay(order_id=1, fail={"ship": "lost truck"})
        with pytest.raises(SagaFailed) as info:
            res.get(timeout=patience(30))
    assert info.value.step == "shop.ship"
    assert list(info.value.gave_up) == ["shop.charge"]
    assert "compensation of shop.charge failed" in (info.value.gave_up["shop.charge"] or "")
    state = res.state()
    assert state.status is SagaStatus.FAILED
    assert state.step("shop.charge").compensation_attempts == 3  # 1 + 2 retries
    assert state.step("shop.charge").compensation_status is CompensationStatus.GAVE_UP
    # The compensation that gave up did not stop the earlier one.
    assert state.step("shop.reserve").compensation_status is CompensationStatus.COMPENSATED
    assert "undo:shop.reserve" in ledger.actions()


def test_a_failing_compensation_does_not_hold_back_earlier_stages(
    app: Celery, r, prefix, ledger: Ledger, worker
) -> None:
    s = shop.build(app, r, prefix)
    r.hset(f"{prefix}:undo_fail", "shop.charge", 10**6)  # keeps failing until we say so
    with worker():
        res = s.sequential.delay(order_id=1, fail={"ship": "x"})
        # Given charge's compensation keeps failing, reserve is still compensated
        wait_for(lambda: "undo:shop.reserve" in ledger.actions(), what="reserve's compensation")
        # and the saga stays COMPENSATING while charge's compensation retries.
        assert res.status is SagaStatus.COMPENSATING
        assert res.state().step("shop.charge").compensation_status in (
            CompensationStatus.RETRYING,
            CompensationStatus.RUNNING,
        )
        # When charge's compensation finally succeeds, the saga ends COMPENSATED.
        r.hset(f"{prefix}:undo_fail", "shop.charge", 0)
        with pytest.raises(SagaCompensated):
            res.get(timeout=patience(30))
    undone = [a for a in ledger.actions() if a.startswith("undo:")]
    assert undone == ["undo:shop.reserve", "undo:shop.charge"]


def test_settings_in_force_at_start_are_used_by_the_workers(app: Celery, r, prefix, worker) -> None:
    # Given a saga started while max retries was 0
    app.conf.saga_compensation_max_retries = 0
    s = shop.build(app, r, prefix)
    r.hset(f"{prefix}:undo_fail", "shop.reserve", 100)
    res = s.sequential.delay(order_id=1, fail={"charge": "x"})
    # When the setting changes before any worker runs it
    app.conf.saga_compensation_max_retries = None
    # Then the saga still gives up after one attempt, as its record says.
    with worker(), pytest.raises(SagaFailed):
        res.get(timeout=patience(30))
    assert res.state().step("shop.reserve").compensation_attempts == 1
    assert res.state().settings["compensation_max_retries"] == 0
