"""The order saga: reserve stock, charge the card, then ship and send the receipt together."""

from __future__ import annotations

from celery_saga import Saga, parallel

from .app import app
from .inventory import reserve_stock
from .payments import charge_card
from .shipping import send_receipt, ship_order

__all__ = ["app", "place_order"]

place_order = Saga("place_order", [reserve_stock, charge_card, parallel(ship_order, send_receipt)])
