"""The shipping service: ship the parcel, cancel it; send the receipt."""

from __future__ import annotations

from typing import Any

from celery_saga import saga_step

from . import ledger
from .app import app


@app.task(name="shipping.cancel_shipment")
def cancel_shipment(order_id: int, step_result: dict[str, Any] | None = None) -> None:
    ledger.revert("shipping")


@saga_step(compensate=cancel_shipment)
@app.task(name="shipping.ship_order")
def ship_order(order_id: int, items: list[str], address: str) -> dict[str, Any]:
    if address == "nowhere":
        raise ValueError(f"cannot ship order {order_id} to {address!r}")
    ledger.apply("shipping", {"order_id": order_id, "to": address})
    return {"tracking": f"TRK-{order_id}"}


@saga_step(compensate=None)  # an e-mail cannot be unsent
@app.task(name="shipping.send_receipt")
def send_receipt(order_id: int, amount: int) -> None:
    ledger.apply("shipping", {"order_id": order_id, "receipt": amount})
