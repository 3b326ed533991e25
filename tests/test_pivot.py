"""A pivot, the saga's point of no return, and the retriable steps after it: real Redis, real workers.

The shop: ``reserve`` (compensated by ``undo``), then the pivot ``charge``
(compensated by ``undo``), then ``email`` and ``warehouse``, retriable.
Every step and compensation writes a ledger entry with its idempotency key;
a step fails as many times as its counter in ``<prefix>:fails`` says, and
waits at a gate when the saga data names it in ``gates``.
"""

from __future__ import annotations

import itertools
import json
import time
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery

from celery_saga import (
    Saga,
    SagaCompensated,
    SagaDefinitionError,
    SagaFailed,
    SagaStatus,
    StepStatus,
    current_step,
    parallel,
    retry_saga,
    saga_step,
)
from celery_saga.stores import store_for
from celery_saga.views import saga_text, state_json
from tests.helpers import Gates, patience, wait_for


def build(app: Celery, client: redis.Redis, prefix: str) -> SimpleNamespace:
    gates = Gates(client, prefix)

    def log(action: str) -> None:
        ctx = current_step()
        assert ctx is not None
        entry = [action, ctx.step, ctx.idempotency_key, ctx.attempt, time.time()]
        client.rpush(f"{prefix}:ledger", json.dumps(entry))

    def behave(name: str, gated: list[str] | None) -> None:
        ctx = current_step()
        assert ctx is not None
        if gated and f"{name}@{ctx.attempt}" in gated:
            gates.enter(f"{name}@{ctx.attempt}")
        if client.hincrby(f"{prefix}:fails", name, -1) >= 0:
            log("failed")
            raise RuntimeError(f"{name} is down")
        log("do")

    @app.task(shared=False, name="piv.undo")
    def undo(order_id: int, step_result: Any = None) -> None:
        log("undo")

    @saga_step(compensate=undo)
    @app.task(shared=False, name="piv.reserve")
    def reserve(order_id: int, gates: list[str] | None = None) -> dict[str, Any]:
        behave("reserve", gates)
        return {"reservation": f"r-{order_id}"}

    @saga_step(compensate=undo, timeout=2.0)
    @app.task(shared=False, name="piv.charge")
    def charge(order_id: int, gates: list[str] | None = None) -> dict[str, Any]:
        behave("charge", gates)
        return {"payment": f"p-{order_id}"}

    @saga_step(compensate=undo)
    @app.task(shared=False, name="piv.email")
    def email(order_id: int, payment: str, gates: list[str] | None = None) -> None:
        behave("email", gates)

    @saga_step(compensate=undo)
    @app.task(shared=False, name="piv.warehouse")
    def warehouse(order_id: int, gates: list[str] | None = None) -> dict[str, str]:
        behave("warehouse", gates)
        return {"picked": "yes"}

    order = Saga("piv_order", [reserve, charge, email, warehouse], pivot="piv.charge")
    fanout = Saga("piv_fanout", [reserve, charge, parallel(email, warehouse)], pivot="piv.charge")
    return SimpleNamespace(**{k: v for k, v in locals().items() if not k.startswith("_")})


@pytest.fixture
def shop(app: Celery, r: redis.Redis, prefix: str) -> SimpleNamespace:
    app.conf.saga_forward_retry_backoff = 0.2
    app.conf.saga_forward_retry_backoff_max = 5
    return build(app, r, prefix)


@pytest.fixture
def gates(r: redis.Redis, prefix: str) -> Gates:
    return Gates(r, prefix)


def entries(r: redis.Redis, prefix: str) -> list[list[Any]]:
    return [json.loads(x) for x in r.lrange(f"{prefix}:ledger", 0, -1)]


def effects(r: redis.Redis, prefix: str) -> list[tuple[str, str]]:
    """(action, step) in the order they happened."""
    return [(e[0], e[1]) for e in entries(r, prefix)]


def test_a_retriable_step_failing_three_times_is_sent_again_until_it_succeeds(
    shop: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any
) -> None:
    # Given an e-mail step after the pivot that fails three times
    r.hset(f"{prefix}:fails", "email", 3)
    with worker():
        # When the saga runs
        res = shop.order.delay(order_id=1)
        data = res.get(timeout=patience(60))
    # Then it completes: the e-mail went out on its fourth attempt, and nothing was undone
    assert data["picked"] == "yes"
    assert effects(r, prefix) == [
        ("do", "piv.reserve"),
        ("do", "piv.charge"),
        ("failed", "piv.email"),
        ("failed", "piv.email"),
        ("failed", "piv.email"),
        ("do", "piv.email"),
        ("do", "piv.warehouse"),
    ]
    mails = [e for e in entries(r, prefix) if e[1] == "piv.email"]
    # ... every attempt under the same idempotency key
    assert {e[2] for e in mails} == {f"{res.id}:piv.email"}
    assert [e[3] for e in mails] == [1, 2, 3, 4]
    # ... each retry after an equal-jitter backoff: [d/2, d], d = 0.2 * 2**(n-1)
    gaps = [b[4] - a[4] for a, b in itertools.pairwise(mails)]
    for n, gap in enumerate(gaps, start=1):
        d = 0.2 * 2 ** (n - 1)
        assert d / 2 - 0.02 <= gap <= d + 1.0, (n, gaps)
    state = res.state()
    assert state.pivot == "piv.charge" and state.passed_pivot
    email = state.step("piv.email")
    assert email.retriable and email.forward_retries == 3 and email.attempts == 4
    assert not state.step("piv.charge").retriable and not state.step("piv.reserve").retriable
    # ... and show says so
    text = saga_text(state)
    assert "pivot piv.charge: passed" in text and "forward retries: piv.email 3" in text
    shown = state_json(state)
    assert shown["passed_pivot"] is True
    assert [s["forward_retries"] for s in shown["steps"]] == [0, 0, 3, 0]


def test_a_retriable_step_that_gives_up_ends_the_saga_failed_and_retry_drives_it_forward(
    app: Celery, shop: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any
) -> None:
    # Given at most 2 forward retries, and an e-mail step that keeps failing
    app.conf.saga_forward_max_retries = 2
    r.hset(f"{prefix}:fails", "email", 100)
    with worker():
        res = shop.order.delay(order_id=2)
        # When it has failed 3 times (1 + 2 retries)
        with pytest.raises(SagaFailed) as info:
            res.get(timeout=patience(60))
        # Then the saga is FAILED, reason "forward", and nothing was compensated
        assert info.value.reason == "forward"
        assert info.value.step == "piv.email"
        assert effects(r, prefix) == [
            ("do", "piv.reserve"),
            ("do", "piv.charge"),
            ("failed", "piv.email"),
            ("failed", "piv.email"),
            ("failed", "piv.email"),
        ]
        state = res.state()
        assert state.status is SagaStatus.FAILED
        assert state.step("piv.email").status is StepStatus.FAILED
        assert state.step("piv.email").compensation_status is None
        # When the cause is fixed and an operator retries it
        r.hset(f"{prefix}:fails", "email", 0)
        retry_saga(app, res.id)
        # Then it goes on forward and completes, the e-mail under its one idempotency key
        assert res.get(timeout=patience(60))["picked"] == "yes"
    assert effects(r, prefix)[-2:] == [("do", "piv.email"), ("do", "piv.warehouse")]
    assert {e[2] for e in entries(r, prefix) if e[1] == "piv.email"} == {f"{res.id}:piv.email"}
    assert not [e for e in entries(r, prefix) if e[0] == "undo"]


def test_a_retriable_step_that_gives_up_again_after_a_retry_gets_a_fresh_budget(
    app: Celery, shop: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any
) -> None:
    app.conf.saga_forward_max_retries = 1
    r.hset(f"{prefix}:fails", "warehouse", 100)
    with worker():
        res = shop.order.delay(order_id=3)
        with pytest.raises(SagaFailed):
            res.get(timeout=patience(60))
        retry_saga(app, res.id)
        wait_for(lambda: res.state().status is SagaStatus.FAILED and res.state().step("piv.warehouse").attempts == 4)
    # Two attempts before the retry, two after it: the budget was fresh
    assert [a for a, s in effects(r, prefix) if s == "piv.warehouse"] == ["failed"] * 4


def test_a_failure_before_the_pivot_rolls_back_and_never_runs_a_retriable_step(
    shop: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any
) -> None:
    # Given a pivot that fails (a known failure, not a lost outcome)
    r.hset(f"{prefix}:fails", "charge", 1)
    with worker():
        res = shop.order.delay(order_id=4)
        with pytest.raises(SagaCompensated) as info:
            res.get(timeout=patience(60))
    # Then the saga rolled back as any saga does
    assert info.value.reason == "failure" and info.value.step == "piv.charge"
    assert effects(r, prefix) == [("do", "piv.reserve"), ("failed", "piv.charge"), ("undo", "piv.reserve")]
    assert not res.state().passed_pivot


def test_cancel_before_the_pivot_rolls_back_and_after_it_changes_nothing(
    shop: SimpleNamespace, r: redis.Redis, prefix: str, gates: Gates, worker: Any
) -> None:
    with worker():
        # Given a saga held before its pivot: a cancel rolls it back
        before = shop.order.delay(order_id=5, gates=["reserve@1"])
        gates.wait_entered("reserve@1")
        assert before.cancel() is True
        gates.open("reserve@1")
        with pytest.raises(SagaCompensated) as info:
            before.get(timeout=patience(60))
        assert info.value.reason == "cancelled"
        # Given a saga held after its pivot
        after = shop.order.delay(order_id=6, gates=["email@1"])
        gates.wait_entered("email@1")
        state = after.state()
        assert state.passed_pivot and state.status is SagaStatus.RUNNING
        # When it is cancelled, then cancel() says no and nothing changes
        assert after.cancel() is False
        assert after.state() == state
        gates.open("email@1")
        assert after.get(timeout=patience(60))["picked"] == "yes"
    assert [e for e in entries(r, prefix) if e[0] == "undo" and e[2].startswith(after.id)] == []


def test_a_pivot_that_times_out_is_sent_again_and_its_outcome_decides(
    shop: SimpleNamespace, r: redis.Redis, prefix: str, gates: Gates, worker: Any
) -> None:
    # Given a pivot (deadline 2 s) whose first attempt hangs past its deadline
    with worker(concurrency=4):
        res = shop.order.delay(order_id=7, gates=["charge@1"])
        gates.wait_entered("charge@1")
        # When its deadline passes, then it is sent again (not compensated) and the second attempt completes it
        assert res.get(timeout=patience(60))["picked"] == "yes"
        # ... and the first attempt, ending late, changes nothing
        gates.open("charge@1")
        wait_for(lambda: len([e for e in entries(r, prefix) if e[1] == "piv.charge"]) == 2, 30, "the first attempt")
    charges = [e for e in entries(r, prefix) if e[1] == "piv.charge"]
    assert [(e[0], e[3]) for e in charges] == [("do", 2), ("do", 1)]
    assert {e[2] for e in charges} == {f"{res.id}:piv.charge"}
    assert not [e for e in entries(r, prefix) if e[0] == "undo"]
    state = res.state()
    assert state.status is SagaStatus.COMPLETED and state.step("piv.charge").forward_retries == 1


def test_the_saga_timeout_stops_applying_once_the_pivot_completed(
    app: Celery, shop: SimpleNamespace, r: redis.Redis, prefix: str, gates: Gates, worker: Any
) -> None:
    with worker():
        # Given a saga with a 1.5 s timeout, held after its pivot
        res = shop.order.apply_async(kwargs={"order_id": 8, "gates": ["email@1"]}, timeout=1.5)
        gates.wait_entered("email@1")
        assert res.state().deadline is None  # the pivot took the saga deadline away
        # When the saga timeout has long passed and a sweep looks at it
        started = res.state().created_at
        assert started is not None
        wait_for(lambda: time.time() > started.timestamp() + 2.0, 10, "the saga timeout to pass")
        store_for(app).sweep(res.id)
        # Then it still runs, and completes
        assert res.state().status is SagaStatus.RUNNING
        gates.open("email@1")
        assert res.get(timeout=patience(60))["picked"] == "yes"


def test_parallel_retriable_steps_after_the_pivot_both_finish(
    shop: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any
) -> None:
    r.hset(f"{prefix}:fails", mapping={"email": 2, "warehouse": 1})
    with worker():
        res = shop.fanout.delay(order_id=9)
        assert res.get(timeout=patience(60))["picked"] == "yes"
    state = res.state()
    assert state.step("piv.email").forward_retries == 2 and state.step("piv.warehouse").forward_retries == 1


def test_a_pivot_inside_a_parallel_stage_or_not_a_step_is_a_definition_error(shop: SimpleNamespace) -> None:
    with pytest.raises(SagaDefinitionError, match="parallel stage"):
        Saga("bad_pivot", [shop.reserve, parallel(shop.charge, shop.email)], pivot="piv.charge")
    with pytest.raises(SagaDefinitionError, match="not one of its steps"):
        Saga("bad_pivot2", [shop.reserve, shop.charge], pivot="piv.nope")


def test_compensations_of_retriable_steps_are_not_in_the_record(
    app: Celery, shop: SimpleNamespace, r: redis.Redis, prefix: str
) -> None:
    res = shop.order.delay(order_id=10)
    raw = store_for(app).load(res.id)
    assert "comp:piv.reserve" in raw and "comp:piv.charge" in raw
    assert "comp:piv.email" not in raw and "comp:piv.warehouse" not in raw
