"""Test tasks: a small shop whose steps write a ledger in Redis.

Steps fail when the saga data says so (``fail={"charge": "card declined"}``),
and wait on gates in Redis when told to (``gates=["ship"]``), so tests can
hold a step mid-flight without sleeping.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import redis
from celery import Celery

from celery_saga import Saga, current_step, parallel, saga_step
from tests.helpers import Gates


def build(app: Celery, client: redis.Redis, prefix: str) -> SimpleNamespace:
    ledger = f"{prefix}:ledger"

    def log(action: str, *extra: Any) -> None:
        ctx = current_step()
        step = ctx.step if ctx else "-"
        client.rpush(ledger, json.dumps([action, step, *extra, time.time()]))

    gates = Gates(client, prefix)

    def behave(name: str, fail: dict[str, str] | None, held: list[str] | None) -> None:
        if held and name in held:
            gates.enter(name)
        if fail and name in fail:
            raise RuntimeError(fail[name])

    @app.task(shared=False, name="shop.undo")
    def undo(order_id: int, step_result: Any = None) -> None:
        ctx = current_step()
        assert ctx is not None and ctx.compensating
        fails = client.hincrby(f"{prefix}:undo_fail", ctx.step, -1)
        if fails >= 0:
            log("undo_failed", ctx.idempotency_key)
            raise RuntimeError(f"compensation of {ctx.step} failed")
        log("undo", step_result, ctx.idempotency_key)

    @saga_step(compensate=undo)
    @app.task(shared=False, name="shop.reserve")
    def reserve(order_id: int, fail: dict[str, str] | None = None, gates: list[str] | None = None) -> dict[str, Any]:
        behave("reserve", fail, gates)
        log("do", order_id)
        return {"reservation": f"r-{order_id}"}

    @saga_step(compensate="shop.undo")
    @app.task(shared=False, name="shop.charge")
    def charge(
        order_id: int, reservation: str, fail: dict[str, str] | None = None, gates: list[str] | None = None
    ) -> dict[str, Any]:
        behave("charge", fail, gates)
        log("do", reservation)
        return {"payment": f"p-{order_id}"}

    @saga_step(compensate=undo)
    @app.task(shared=False, name="shop.ship")
    def ship(order_id: int, fail: dict[str, str] | None = None, gates: list[str] | None = None) -> dict[str, Any]:
        behave("ship", fail, gates)
        log("do")
        return {"tracking": f"t-{order_id}"}

    @saga_step(compensate=undo)
    @app.task(shared=False, name="shop.receipt")
    def receipt(order_id: int, fail: dict[str, str] | None = None, gates: list[str] | None = None) -> str:
        behave("receipt", fail, gates)
        log("do")
        return "sent"

    @saga_step(compensate=None)
    @app.task(shared=False, name="shop.validate")
    def validate(order_id: int, fail: dict[str, str] | None = None, gates: list[str] | None = None) -> None:
        behave("validate", fail, gates)
        log("do")

    @app.task(shared=False, name="shop.notify")
    def notify(saga_id: str, tag: str = "") -> None:
        client.rpush(f"{prefix}:callbacks", json.dumps([tag, saga_id]))

    sequential = Saga("order_seq", [validate, reserve, charge, ship])
    mixed = Saga("order", [validate, reserve, charge, parallel(ship, receipt)])
    return SimpleNamespace(**{k: v for k, v in locals().items() if not k.startswith("_")})
