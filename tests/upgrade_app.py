"""The app of the upgrade tests: ``celery -A tests.upgrade_app worker``, at version ``UPGRADE_VERSION``.

Version 1 defines ``up_order`` as reserve, charge. Version 2 inserts a fraud
check between them (a new task) and gives charge a new parameter, with a
default. Both versions keep every task of version 1 registered, as
docs/upgrades.md says a deploy must until ``celery saga check`` shows no
running saga needs it. Version 3 drops ``up.charge``: a deploy that broke
that rule.

Each step appends ``[step, token]`` to ``<prefix>:ran``; ``up.reserve``
first waits on the gate ``<prefix>:gate:<token>`` while ``<prefix>:hold``
exists, so a test can keep sagas in flight.

=====================  ===========================================
UPGRADE_REDIS          Redis URL (broker and saga store)
UPGRADE_PREFIX         key prefix (kombu's keys too)
UPGRADE_QUEUE          the queue
UPGRADE_VERSION        1, 2 or 3
=====================  ===========================================
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis
from celery import Celery

from celery_saga import Saga, saga_step

REDIS = os.environ.get("UPGRADE_REDIS", "redis://127.0.0.1:6379/9")
PREFIX = os.environ.get("UPGRADE_PREFIX", "upgrade")
QUEUE = os.environ.get("UPGRADE_QUEUE", "upgrade")
VERSION = int(os.environ.get("UPGRADE_VERSION", "1"))

app = Celery("upgrade_app", broker=REDIS, set_as_current=False)
app.conf.update(
    task_default_queue=QUEUE,
    broker_transport_options={"global_keyprefix": f"{PREFIX}:kombu:"},
    broker_connection_retry_on_startup=True,
    saga_key_prefix=PREFIX,
    worker_hijack_root_logger=False,
)
# A gate waits up to 120 s: longer than redis-py 8's default socket timeout (5 s).
client = redis.Redis.from_url(REDIS, decode_responses=True, socket_timeout=180)


def ran(step: str, token: str, **extra: Any) -> None:
    client.rpush(f"{PREFIX}:ran", json.dumps([step, token, *extra.values()]))


@app.task(name="up.undo")
def undo(token: str, step_result: Any = None) -> None:
    ran("undo", token)


@saga_step(compensate=undo)
@app.task(name="up.reserve")
def reserve(token: str) -> dict[str, Any]:
    if client.exists(f"{PREFIX}:hold"):
        client.blpop([f"{PREFIX}:gate:{token}"], timeout=120)
    ran("reserve", token)
    return {"reservation": f"r-{token}"}


@saga_step(compensate=undo)
@app.task(name="up.check_fraud")
def check_fraud(token: str) -> dict[str, Any]:
    ran("check_fraud", token)
    return {"fraud_score": 1}


if VERSION < 3:

    @saga_step(compensate=undo)
    @app.task(name="up.charge")
    def charge(token: str, reservation: str, fraud_score: int = 0) -> dict[str, Any]:
        # fraud_score is version 2's new parameter: a saga of version 1 has no such data, hence its default.
        ran("charge", token, fraud_score=fraud_score)
        return {"payment": f"p-{token}"}


@saga_step(compensate=undo)
@app.task(name="up.charge_v3")
def charge_v3(token: str, reservation: str, fraud_score: int = 0) -> dict[str, Any]:
    ran("charge_v3", token)
    return {"payment": f"p3-{token}"}


if VERSION == 1:
    up_order = Saga("up_order", [reserve, charge])
elif VERSION == 2:
    up_order = Saga("up_order", [reserve, check_fraud, charge])
else:
    up_order = Saga("up_order", [reserve, check_fraud, charge_v3])
