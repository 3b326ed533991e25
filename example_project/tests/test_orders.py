"""The order saga of the example shop, tested with the ``celery_saga.testing`` plugin.

The fixtures point the shop's app at a test Redis under a fresh key prefix and
run one in-process worker for all three services' queues.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from celery_saga.testing import SagaFaults, assert_compensated, assert_completed
from example_project import ledger
from example_project.app import app
from example_project.orders import place_order
from example_project.payments import DECLINED_CARD

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
    client = redis.Redis.from_url(saga_redis_url, decode_responses=True)
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
    assert effects(result.id) == {
        "inventory": [{"order_id": 1, "reserved": ["book"]}],
        "payments": [{"order_id": 1, "amount": 30}],
        "shipping": [{"order_id": 1, "to": "1 Main"}, {"order_id": 1, "receipt": 30}],
    }


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
