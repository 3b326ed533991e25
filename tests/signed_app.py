"""An app whose messages are all signed (Celery's ``auth`` serializer): ``celery -A tests.signed_app worker``.

Configured from environment variables, for a worker subprocess and a client
subprocess alike (``setup_security`` changes kombu's serializer registry for
the whole process, so the test process itself never calls it):

=========================  ==================================================
SIGNED_REDIS               Redis URL (broker and saga store)
SIGNED_PREFIX              saga key prefix; kombu's keys and the ledger live under it
SIGNED_CERTS               folder with ``key.pem``, ``cert.pem``, and the trusted ``store/cert.pem``
=========================  ==================================================

``order`` reserves, charges and ships; ``fail=True`` makes the shipping
fail, so the charge and the reservation are compensated. Every step and
compensation appends ``[action, step, order_id]`` to ``<prefix>:ledger``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis
from celery import Celery

from celery_saga import Saga, saga_step

_certs = os.environ["SIGNED_CERTS"]
_prefix = os.environ["SIGNED_PREFIX"]

app = Celery("signed", broker=os.environ["SIGNED_REDIS"], set_as_current=False)
app.conf.update(
    task_default_queue=f"{_prefix}-q",
    broker_transport_options={"global_keyprefix": f"{_prefix}:kombu:"},
    broker_connection_retry_on_startup=True,
    saga_key_prefix=_prefix,
    saga_compensation_retry_backoff=0.05,
    saga_compensation_retry_backoff_max=0.5,
    task_allow_error_cb_on_chord_header=False,
    worker_hijack_root_logger=False,
    # Every task message signed, and only signed ones accepted.
    task_serializer="auth",
    accept_content=["auth"],
    security_key=os.path.join(_certs, "key.pem"),
    security_certificate=os.path.join(_certs, "cert.pem"),
    security_cert_store=os.path.join(_certs, "store", "*.pem"),
    security_digest="sha256",
)
app.setup_security()

_ledger = redis.Redis.from_url(os.environ["SIGNED_REDIS"])


def _log(action: str, step: str, order_id: int) -> None:
    _ledger.rpush(f"{_prefix}:ledger", json.dumps([action, step, order_id]))


@app.task(name="signed.undo")
def undo(order_id: int, step_result: Any = None) -> None:
    from celery_saga import current_step

    ctx = current_step()
    _log("undo", ctx.step if ctx else "?", order_id)


@saga_step(compensate=undo)
@app.task(name="signed.reserve")
def reserve(order_id: int) -> dict[str, str]:
    _log("do", "signed.reserve", order_id)
    return {"reservation": f"r-{order_id}"}


@saga_step(compensate=undo)
@app.task(name="signed.charge")
def charge(order_id: int, reservation: str) -> dict[str, str]:
    _log("do", "signed.charge", order_id)
    return {"charge": f"c-{order_id}"}


@saga_step(compensate=None)
@app.task(name="signed.ship")
def ship(order_id: int, charge: str, fail: bool = False) -> dict[str, str]:
    if fail:
        raise RuntimeError("no carrier")
    _log("do", "signed.ship", order_id)
    return {"tracking": f"t-{order_id}"}


order = Saga("signed_order", [reserve, charge, ship], app=app)
