"""The payments service: charge a card, refund it.

Two test cards behave specially. ``DECLINED_CARD`` is always declined.
``CONFIRM_CARD`` needs the customer to confirm the payment in their bank's
app (3-D Secure): the charge waits up to ``CONFIRM_WAIT`` seconds for that,
at the gate of ``ledger.wait_at_gate``, and is declined if it does not come.
Meanwhile the saga can be cancelled (``celery saga cancel ID``): the charge's
outcome is then unknown and it is refunded blind; if the customer confirms
afterwards, the late charge is refunded by a second compensation round.
"""

from __future__ import annotations

from typing import Any

from celery_saga import saga_step

from . import ledger
from .app import app

DECLINED_CARD = "4000-0000-0000-0002"
CONFIRM_CARD = "4000-0027-6000-3184"
#: How long a charge waits for the customer to confirm it, seconds.
CONFIRM_WAIT = 30.0


class CardDeclined(Exception):
    """The card issuer said no."""


@app.task(name="payments.refund_card")
def refund_card(order_id: int, step_result: dict[str, Any] | None = None) -> None:
    # step_result is None when the charge's outcome is unknown (it timed out, or
    # the saga was cancelled while it ran). A real payment API is asked for the
    # charge made with the charge's idempotency key (current_step().forward_key),
    # and refunds it if there is one; so does the ledger.
    ledger.revert("payments")


@saga_step(compensate=refund_card, redact=["card"])  # Flower and `saga show` see card="***"
@app.task(name="payments.charge_card")
def charge_card(order_id: int, amount: int, card: str, reservation_id: str) -> dict[str, Any]:
    if card == DECLINED_CARD:
        raise CardDeclined(f"card {card} declined for order {order_id}")
    if card == CONFIRM_CARD and ledger.wait_at_gate(CONFIRM_WAIT) != "confirmed":
        raise CardDeclined(f"the customer did not confirm the payment of order {order_id}")
    # A real payment API would get the step's idempotency key as its Idempotency-Key header.
    ledger.apply("payments", {"order_id": order_id, "amount": amount})
    return {"charge_id": f"ch-{order_id}"}
