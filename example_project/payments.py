"""The payments service: charge a card, refund it. One test card is always declined."""

from __future__ import annotations

from typing import Any

from celery_saga import saga_step

from . import ledger
from .app import app

DECLINED_CARD = "4000-0000-0000-0002"


class CardDeclined(Exception):
    """The card issuer said no."""


@app.task(name="payments.refund_card")
def refund_card(order_id: int, step_result: dict[str, Any] | None = None) -> None:
    ledger.revert("payments")


@saga_step(compensate=refund_card)
@app.task(name="payments.charge_card")
def charge_card(order_id: int, amount: int, card: str, reservation_id: str) -> dict[str, Any]:
    if card == DECLINED_CARD:
        raise CardDeclined(f"card {card} declined for order {order_id}")
    # A real payment API would get ledger's idempotency key as its Idempotency-Key header.
    ledger.apply("payments", {"order_id": order_id, "amount": amount})
    return {"charge_id": f"ch-{order_id}"}
