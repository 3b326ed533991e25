from __future__ import annotations

from celery import Celery

from tests import shop
from tests.conftest import Ledger


def test_happy_path(app: Celery, r, ns, worker) -> None:
    prefix = app.conf.saga_key_prefix
    s = shop.build(app, r, prefix)
    with worker():
        res = s.mixed.delay(order_id=1)
        data = res.get(timeout=20)
    assert data["tracking"] == "t-1"
    assert Ledger(r, f"{prefix}:ledger").actions()[:3] == ["do:shop.validate", "do:shop.reserve", "do:shop.charge"]
