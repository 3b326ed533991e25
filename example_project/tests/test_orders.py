"""The order saga of the example shop, tested with the ``celery_saga.testing`` plugin.

The fixtures point the shop's app at a test Redis under a fresh key prefix and
run one in-process worker for all three services' queues.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from celery_saga import CompensationStatus, SagaResult, SagaState, StepStatus
from celery_saga.testing import CrashExplorer, CrashPoint, SagaFaults, assert_compensated, assert_completed
from celery_saga.testing.crash import DEPTHS
from example_project import ledger
from example_project.app import app
from example_project.orders import place_order
from example_project.payments import CONFIRM_CARD, DECLINED_CARD
from example_project.shipping import SHIPPING_TIMEOUT, SLOW_ADDRESS
from tests.helpers import patience

pytest_plugins = ["celery_saga.testing"]

SERVICES = ("inventory", "payments", "shipping")


def order(order_id: int, **changes: Any) -> dict[str, Any]:
    base = {"order_id": order_id, "items": ["book"], "amount": 30, "card": "4242-4242-4242-4242", "address": "1 Main"}
    return {**base, **changes}


@pytest.fixture
def saga_app() -> Celery:
    return app


@pytest.fixture(autouse=True)
def shop_ledger(saga_redis_url: str, saga_prefix: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The ledger reads REDIS_URL and the demo prefix once, at import: point it
    # at the test Redis and this test's prefix, where saga_test_app cleans up.
    client = redis.Redis.from_url(saga_redis_url, decode_responses=True, socket_timeout=patience(120))
    monkeypatch.setattr(ledger, "_client", client)
    monkeypatch.setattr(ledger, "PREFIX", saga_prefix)
    yield
    client.close()


def effects(saga_id: str) -> dict[str, list[Any]]:
    return {service: list(ledger.effects(service, saga_id).values()) for service in SERVICES}


def test_a_happy_order_completes_with_every_effect(saga_worker: Any) -> None:
    result = place_order.delay(**order(1))

    state = assert_completed(result)

    assert state.data["tracking"] == "TRK-1"
    left = effects(result.id)
    assert left["inventory"] == [{"order_id": 1, "reserved": ["book"]}]
    assert left["payments"] == [{"order_id": 1, "amount": 30}]
    # Shipping and the receipt run in parallel: in either order.
    assert sorted(left["shipping"], key=str) == [{"order_id": 1, "receipt": 30}, {"order_id": 1, "to": "1 Main"}]


def test_a_declined_card_releases_the_stock(saga_worker: Any) -> None:
    result = place_order.delay(**order(2, card=DECLINED_CARD))

    state = assert_compensated(result, steps=["inventory.reserve_stock"], failed_step="payments.charge_card")

    assert state.error is not None and "CardDeclined" in state.error
    assert effects(result.id) == {"inventory": [], "payments": [], "shipping": []}


def test_a_failed_shipment_refunds_then_releases(saga_worker: Any, saga_faults: SagaFaults) -> None:
    # Given shipping is down
    saga_faults.fail("shipping.ship_order", ConnectionError("carrier API unreachable"))

    # When an order is placed
    result = place_order.delay(**order(3))

    # Then the charge is refunded, then the stock released, and neither effect remains
    assert_compensated(
        result, steps=["payments.charge_card", "inventory.reserve_stock"], failed_step="shipping.ship_order"
    )
    left = effects(result.id)
    assert left["inventory"] == [] and left["payments"] == []
    assert {"order_id": 3, "to": "1 Main"} not in left["shipping"]


def test_a_compensation_that_fails_twice_is_retried_until_it_succeeds(
    saga_worker: Any, saga_faults: SagaFaults
) -> None:
    # Given releasing stock fails twice
    saga_faults.fail_compensation("inventory.reserve_stock", times=2)

    # When a declined card rolls the order back
    result = place_order.delay(**order(4, card=DECLINED_CARD))

    # Then the third attempt releases the stock
    state = assert_compensated(result, steps=["inventory.reserve_stock"])
    assert state.step("inventory.reserve_stock").compensation_attempts == 3
    assert saga_faults.fired("inventory.reserve_stock", compensating=True) == 2
    assert effects(result.id)["inventory"] == []


def wait_until(result: SagaResult, condition: Any, timeout: float = 15.0) -> SagaState:
    deadline = time.monotonic() + timeout
    while not condition(state := result.state()):
        assert time.monotonic() < deadline, f"condition not met within {timeout}s: {state}"
        time.sleep(0.05)
    return state


def journal(saga_id: str, step: str) -> list[tuple[str, int, bool]]:
    """(what, round, result_known) of every apply and undo of one step, in order."""
    return [(e["what"], e["round"], e["result_known"]) for e in ledger.journal(saga_id) if e["step"] == step]


def test_a_shipment_past_its_deadline_is_cancelled_blind_and_again_when_the_carrier_answers(
    saga_worker: Any,
) -> None:
    # Given a carrier that books the parcel, then hangs past the shipping deadline
    result = place_order.delay(**order(5, address=SLOW_ADDRESS))

    # Then a sweeper stops waiting for it: the shipment is cancelled blind, found by its key
    state = assert_compensated(result, failed_step="shipping.ship_order", timeout=SHIPPING_TIMEOUT + 15)
    assert state.reason == "timeout"
    ship = state.step("shipping.ship_order")
    assert ship.status is StepStatus.UNKNOWN and ship.stopped_by == "timeout" and ship.late_status is None
    assert ship.compensation_status is CompensationStatus.COMPENSATED
    assert journal(result.id, "shipping.ship_order") == [("applied", 0, True), ("undone", 1, False)]
    left = effects(result.id)
    assert left["inventory"] == [] and left["payments"] == []
    assert left["shipping"] == [{"order_id": 5, "receipt": 30}]  # an e-mail cannot be unsent

    # When the carrier answers at last
    ledger.open_gate(f"{result.id}:shipping.ship_order")

    # Then its late success is compensated again, with its result; nothing was left to cancel
    def second_round_ended(s: SagaState) -> bool:
        r2 = s.step("shipping.ship_order").second_round
        return r2 is not None and r2.status is CompensationStatus.COMPENSATED

    state = wait_until(result, second_round_ended)
    ship = state.step("shipping.ship_order")
    assert ship.late_status is StepStatus.COMPLETED and ship.late_result == {"tracking": "TRK-5"}
    assert state.status.value == "COMPENSATED" and state.reason == "timeout"
    assert journal(result.id, "shipping.ship_order")[-1] == ("nothing to undo", 2, True)
    assert effects(result.id)["shipping"] == [{"order_id": 5, "receipt": 30}]


def test_a_cancelled_order_refunds_blind_and_refunds_a_late_charge_again(saga_worker: Any) -> None:
    # Given an order whose payment waits for the customer to confirm it
    result = place_order.delay(**order(6, card=CONFIRM_CARD))
    wait_until(result, lambda s: s.step("payments.charge_card").status is StepStatus.RUNNING)

    # When the shop cancels it
    assert result.cancel() is True

    # Then the charge is refunded blind (there is none yet) and the stock released; shipping never starts
    state = assert_compensated(result, steps=["payments.charge_card", "inventory.reserve_stock"])
    assert state.reason == "cancelled"
    charge = state.step("payments.charge_card")
    assert charge.status is StepStatus.UNKNOWN and charge.stopped_by == "cancelled"
    assert state.step("shipping.ship_order").status is StepStatus.WAITING
    assert journal(result.id, "payments.charge_card") == [("nothing to undo", 1, False)]
    assert effects(result.id) == {"inventory": [], "payments": [], "shipping": []}
    assert result.cancel() is False  # it has finished

    # When the customer confirms the payment after all
    ledger.open_gate(f"{result.id}:payments.charge_card", "confirmed")

    # Then the late charge is refunded by a second round
    state = wait_until(
        result,
        lambda s: (
            (r2 := s.step("payments.charge_card").second_round) is not None
            and r2.status is CompensationStatus.COMPENSATED
        ),
    )
    assert state.step("payments.charge_card").late_result == {"charge_id": "ch-6"}
    assert journal(result.id, "payments.charge_card")[-2:] == [("applied", 0, True), ("undone", 2, True)]
    assert effects(result.id) == {"inventory": [], "payments": [], "shipping": []}


def test_a_payment_nobody_confirms_is_declined(saga_worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("example_project.payments.CONFIRM_WAIT", 0.2)

    result = place_order.delay(**order(7, card=CONFIRM_CARD))

    state = assert_compensated(result, steps=["inventory.reserve_stock"], failed_step="payments.charge_card")
    assert state.reason == "failure" and state.error is not None and "did not confirm" in state.error


def check_ledger(result: SagaResult) -> None:
    """The crash runs' invariant: a completed order holds each effect once, an undone one none but the receipt."""
    state, left = result.state(), effects(result.id)
    if state.status.value == "COMPLETED":
        assert left["inventory"] == [{"order_id": 8, "reserved": ["book"]}], left
        assert left["payments"] == [{"order_id": 8, "amount": 30}], left
        assert sorted(left["shipping"], key=str) == [
            {"order_id": 8, "receipt": 30},
            {"order_id": 8, "to": "1 Main"},
        ]
    else:
        assert state.status.value == "COMPENSATED", f"the order ended {state.status.value}: {state.error}"
        # Everything is undone but the receipt, an e-mail that cannot be unsent.
        assert left["inventory"] == [] and left["payments"] == [], left
        assert left["shipping"] in ([], [{"order_id": 8, "receipt": 30}]), left


@pytest.fixture
def crash_workers_env(saga_redis_url: str, saga_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The explorer's workers are processes of their own: their ledger reads
    # REDIS_URL and SAGA_DEMO_PREFIX at import, like the demo's services.
    monkeypatch.setenv("REDIS_URL", saga_redis_url)
    monkeypatch.setenv("SAGA_DEMO_PREFIX", saga_prefix)


STEPS = {"inventory.reserve_stock", "payments.charge_card", "shipping.ship_order", "shipping.send_receipt"}


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("crash_workers_env")
def test_an_order_survives_a_worker_killed_at_every_crash_point(
    saga_test_app: Celery, saga_crash_points: CrashExplorer
) -> None:
    report = saga_crash_points.explore(place_order, order(8), check_ledger, timeout=60)

    assert report.ok, report.summary()
    assert report.skipped == ()
    assert {p.step for p in report.points} == STEPS
    assert len(report.points) == 4 * len(DEPTHS[saga_crash_points.depth])


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("crash_workers_env")
def test_an_order_survives_its_only_worker_killed_and_restarted_at_every_crash_point(
    saga_test_app: Celery, saga_crash_points: CrashExplorer
) -> None:
    # Given one worker, killed whole at each point with no other alive, then
    # started again under its node name (as systemd or Kubernetes would)
    report = saga_crash_points.explore(place_order, order(8), check_ledger, timeout=60, restart="same-name")

    # Then every run ends correctly
    assert report.ok, report.summary()
    assert report.skipped == ()
    assert {p.step for p in report.points} == STEPS
    assert len(report.points) == 4 * len(DEPTHS[saga_crash_points.depth])
    # and a step killed while it ran was found by the restarted worker, not at its (capped) deadline
    running = [p for p in report.points if p.number in (CrashPoint.RUNNING, CrashPoint.RETURNED)]
    assert {p.stopped_by for p in running} == {"lost"}, report.summary()
