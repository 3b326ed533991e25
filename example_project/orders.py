"""The order sagas.

``place_order``: reserve stock, charge the card, then ship and send the receipt together.

``big_order``: reserve stock, wait (holding no worker) for a manager to
approve the order, charge the card, then tell the warehouse. The payment is
the point of no return: before it, anything that fails rolls the order
back; after it, the warehouse request is sent again until it succeeds.
A manager approves with ``celery -A example_project.app saga signal ID
approval --data '{"approved_by": "ann"}'`` (or ``rejected``, which rolls it back).
"""

from __future__ import annotations

from celery_saga import Saga, parallel, wait_for

from .app import app
from .inventory import reserve_stock
from .payments import charge_card
from .shipping import notify_warehouse, send_receipt, ship_order

__all__ = ["APPROVAL_TIMEOUT", "app", "big_order", "place_order"]

#: Seconds a big order waits for a manager's approval before it is rolled back.
APPROVAL_TIMEOUT = 600.0

place_order = Saga("place_order", [reserve_stock, charge_card, parallel(ship_order, send_receipt)])
big_order = Saga(
    "big_order",
    [reserve_stock, wait_for("approval", timeout=APPROVAL_TIMEOUT, reject="rejected"), charge_card, notify_warehouse],
    pivot=charge_card,
)
