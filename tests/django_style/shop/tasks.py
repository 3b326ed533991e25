"""``@shared_task`` steps and a saga over them: no app is named anywhere in this module."""

from __future__ import annotations

import json
import os
from typing import Any

import redis
from celery import shared_task

from celery_saga import Saga, current_step, saga_step

# Where the test reads what took effect (a Django app would read its settings).
_client = redis.Redis.from_url(os.environ.get("DJ_REDIS_URL", "redis://127.0.0.1:6379/9"), decode_responses=True)
PREFIX = os.environ.get("DJ_PREFIX", "djtest")


def _log(*entry: Any) -> None:
    _client.rpush(f"{PREFIX}:ledger", json.dumps(list(entry)))


@shared_task
def release(order_id: int, step_result: Any = None) -> None:
    ctx = current_step()
    _log("undo", ctx.step if ctx else "-", step_result)


@saga_step(compensate=release)
@shared_task
def reserve(order_id: int) -> dict[str, Any]:
    _log("do", "reserve", order_id)
    return {"reservation": f"r-{order_id}"}


@saga_step(compensate=None)
@shared_task
def ship(order_id: int, reservation: str, fail: bool = False) -> dict[str, Any]:
    if fail:
        raise RuntimeError("no carrier")
    _log("do", "ship", reservation)
    return {"tracking": f"t-{order_id}"}


place_order = Saga("dj_place_order", [reserve, ship])
