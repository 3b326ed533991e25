"""Test tasks for deadlines: steps with a real effect in Redis, and compensations that find it.

Each forward step records its effect under its idempotency key
(``effects`` hash) and adds its quantity to ``stock``. A compensation with
a known result undoes exactly that; a blind one (outcome unknown) looks the
effect up by the forward step's key, and undoes it only if it is there. So
``stock == 0`` and an empty ``effects`` hash mean no forward effect is left,
whichever order the step and its compensations ran in.

Steps wait on gates in Redis when the saga data says so (``gates=["hang"]``).
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import redis
from celery import Celery

from celery_saga import current_step, saga_step
from tests.helpers import Gates


def build(app: Celery, client: redis.Redis, prefix: str) -> SimpleNamespace:
    ledger = f"{prefix}:ledger"
    effects, stock = f"{prefix}:effects", f"{prefix}:stock"

    def log(*entry: Any) -> None:
        client.rpush(ledger, json.dumps(list(entry)))

    gates = Gates(client, prefix)

    def gate(name: str, held: list[str] | None) -> None:
        if held and name in held:
            gates.enter(name)

    def apply(qty: int) -> dict[str, Any]:
        ctx = current_step()
        assert ctx is not None
        if client.hsetnx(effects, ctx.forward_key, qty):
            client.incrby(stock, qty)
        log("do", ctx.step)
        return {f"{ctx.step}_qty": qty}

    @app.task(shared=False, name="timed.release")
    def release(step_result: Any = None, gates: list[str] | None = None) -> None:
        ctx = current_step()
        assert ctx is not None and ctx.compensating
        gate(f"undo-{ctx.step}", gates)
        log("undo", ctx.step, ctx.round, ctx.result_known, step_result, ctx.idempotency_key)
        # Known or not, the effect is found by the forward step's key: undo it once.
        qty = client.hget(effects, ctx.forward_key)
        if qty is not None and client.hdel(effects, ctx.forward_key):
            client.decrby(stock, int(qty))

    @saga_step(compensate=release)
    @app.task(shared=False, name="timed.reserve")
    def reserve(qty: int = 1, gates: list[str] | None = None) -> dict[str, Any]:
        gate("reserve", gates)
        return apply(qty)

    @saga_step(compensate=release)
    @app.task(shared=False, name="timed.hang")
    def hang(qty: int = 1, gates: list[str] | None = None, fail_late: bool = False) -> dict[str, Any]:
        gate("hang", gates)
        if fail_late:
            log("fail", "timed.hang")
            raise RuntimeError("failed after its deadline")
        return apply(qty)

    @saga_step(compensate=release)
    @app.task(shared=False, name="timed.last")
    def last(qty: int = 1) -> dict[str, Any]:
        return apply(qty)

    @saga_step(compensate=release)
    @app.task(shared=False, name="timed.retrying", bind=True, max_retries=5)
    def retrying(self: Any, qty: int = 1, countdown: float = 5.0) -> dict[str, Any]:
        log("try", "timed.retrying")
        raise self.retry(countdown=countdown)

    @app.task(shared=False, name="timed.notify")
    def notify(saga_id: str, tag: str = "") -> None:
        client.rpush(f"{prefix}:callbacks", json.dumps([tag, saga_id]))

    def ledger_entries() -> list[list[Any]]:
        return [json.loads(x) for x in client.lrange(ledger, 0, -1)]

    def left() -> tuple[int, dict[str, str]]:
        """What forward effect is left: (stock, effects)."""
        return int(client.get(stock) or 0), client.hgetall(effects)  # type: ignore[return-value]

    open_gate = gates.open

    def entered(name: str) -> int:
        return len(gates.entered(name))

    return SimpleNamespace(**{k: v for k, v in locals().items() if not k.startswith("_")})
