"""The shipping service: ship the parcel, cancel it; send the receipt; tell the warehouse to pick an order.

``ship_order`` has a deadline of ``SHIPPING_TIMEOUT`` seconds. Shipping to
``SLOW_ADDRESS`` makes the carrier book the parcel at once but hang before it
answers, for up to ``CARRIER_DELAY`` seconds (less if someone opens the
step's gate, see ``ledger.open_gate``): the step misses its deadline, a
sweeper stops waiting for it (UNKNOWN), and ``cancel_shipment`` runs blind,
finding the booking by the step's idempotency key. When the carrier answers
at last, the saga runs a second compensation round with the real result.
"""

from __future__ import annotations

from typing import Any

from celery_saga import current_step, saga_step

from . import ledger
from .app import app

#: Seconds from dispatching ship_order to its outcome, before the saga stops waiting.
SHIPPING_TIMEOUT = 3.0
SLOW_ADDRESS = "slow"
#: How long the slow carrier takes to answer, at most, seconds.
CARRIER_DELAY = 10.0


@app.task(name="shipping.cancel_shipment")
def cancel_shipment(order_id: int, step_result: dict[str, Any] | None = None) -> None:
    # step_result (the tracking number) is None when ship_order's outcome is
    # unknown: the booking, if the carrier made one, is found by ship_order's
    # idempotency key (current_step().forward_key). In the second round
    # (current_step().round == 2) step_result is the late result.
    ledger.revert("shipping")


@saga_step(compensate=cancel_shipment, timeout=SHIPPING_TIMEOUT)
@app.task(name="shipping.ship_order")
def ship_order(order_id: int, items: list[str], address: str) -> dict[str, Any]:
    if address == "nowhere":
        raise ValueError(f"cannot ship order {order_id} to {address!r}")
    ledger.apply("shipping", {"order_id": order_id, "to": address})
    if address == SLOW_ADDRESS:
        ledger.wait_at_gate(CARRIER_DELAY)  # the carrier booked it, and hangs before it says so
    return {"tracking": f"TRK-{order_id}"}


class WarehouseBusy(Exception):
    """The warehouse system did not take the request; it will later."""


@saga_step(compensate=None)  # after big_order's pivot: sent again until it succeeds, never undone
@app.task(name="shipping.notify_warehouse")
def notify_warehouse(order_id: int, items: list[str]) -> None:
    # The fake warehouse system is busy the first two times it is asked. Retrying
    # is safe: the ledger keeps one effect per idempotency key, as a real API would.
    ctx = current_step()
    if ctx is not None and ctx.attempt <= 2:
        ledger.note("shipping", f"warehouse busy (attempt {ctx.attempt})")
        raise WarehouseBusy(f"the warehouse did not take order {order_id}")
    ledger.apply("shipping", {"order_id": order_id, "pick": items})


@saga_step(compensate=None)  # an e-mail cannot be unsent
@app.task(name="shipping.send_receipt")
def send_receipt(order_id: int, amount: int) -> None:
    ledger.apply("shipping", {"order_id": order_id, "receipt": amount})
