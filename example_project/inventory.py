"""The inventory service: reserve stock, release it."""

from __future__ import annotations

from typing import Any

from celery_saga import saga_step

from . import ledger
from .app import app


@app.task(name="inventory.release_stock")
def release_stock(order_id: int, items: list[str], step_result: dict[str, Any] | None = None) -> None:
    # By the reservation's idempotency key, not step_result: blind-safe (see ledger.revert).
    ledger.revert("inventory")


@saga_step(compensate=release_stock)
@app.task(name="inventory.reserve_stock")
def reserve_stock(order_id: int, items: list[str]) -> dict[str, Any]:
    ledger.apply("inventory", {"order_id": order_id, "reserved": items})
    return {"reservation_id": f"res-{order_id}"}
