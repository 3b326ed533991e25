"""The Celery app of ``benchmarks/overhead.py``: its sagas, and the tasks its chains run.

Imported both by the benchmark script and by the ``celery worker`` subprocess
it starts, so everything that must match between the two comes from the
environment:

- ``BENCH_BROKER_URL``: broker, result backend and saga store (one Redis);
- ``BENCH_BACKEND_URL``: the result backend and saga store, if not the
  broker (a RabbitMQ broker; a Redis through a delay proxy);
- ``BENCH_QUEUE``: the queue every task of this run goes to;
- ``BENCH_PREFIX``: the saga key prefix of this run;
- ``BENCH_STORE_URL``: the saga store, if not the broker's Redis (a cluster);
- ``BENCH_WAIT_REPLICAS``: ``saga_redis_wait_replicas`` (default 0).

Called outside a saga the steps are plain tasks, so the same tasks make each
saga and its reference chain. Three workloads:

- ``noop``: three steps that take nothing, return None, compensate nothing;
- ``real``: shaped like a user's: start kwargs of about 200 bytes (an order
  id, 3 items, an address), three steps that take them and each return a dict
  of about 100 bytes, each with a compensation;
- ``data``: three steps that take ``**data`` (the kwargs and every earlier
  result) and return small dicts, each with a compensation.

And ``wide``, for memory only: 20 steps that each add a key of about 70 bytes.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from celery_saga import Saga, saga_step, step

BROKER_URL = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/9")
QUEUE = os.environ.get("BENCH_QUEUE", "bench")
PREFIX = os.environ.get("BENCH_PREFIX", "bench")
BACKEND_URL = os.environ.get("BENCH_BACKEND_URL") or BROKER_URL
STORE_URL = os.environ.get("BENCH_STORE_URL") or BACKEND_URL

app = Celery("bench", broker=BROKER_URL, backend=BACKEND_URL, set_as_current=False)
app.conf.update(
    task_default_queue=QUEUE,
    saga_redis_url=STORE_URL,
    saga_redis_wait_replicas=int(os.environ.get("BENCH_WAIT_REPLICAS") or 0),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # Chain results are deleted by the script; this only bounds a crashed run.
    result_expires=600,
    saga_key_prefix=PREFIX,
    saga_retention=600,
    # Events cost throughput; the comparison is of the sagas themselves.
    saga_send_events=False,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@saga_step(compensate=None)
@app.task(name="bench.step1")
def step1() -> None:
    return None


@saga_step(compensate=None)
@app.task(name="bench.step2")
def step2() -> None:
    return None


@saga_step(compensate=None)
@app.task(name="bench.step3")
def step3() -> None:
    return None


#: The realistic start kwargs: 200-odd bytes of JSON.
ORDER: dict[str, Any] = {
    "order_id": 7_300_184,
    "items": [
        {"sku": "BK-1984-PB", "qty": 1, "price": "12.99"},
        {"sku": "MUG-CL-02", "qty": 2, "price": "8.50"},
        {"sku": "TEE-M-BLK", "qty": 1, "price": "19.00"},
    ],
    "address": {"name": "Ada Lovelace", "street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH"},
}


@app.task(name="bench.release")
def release(order_id: int, items: list[Any], address: dict[str, Any], step_result: Any = None) -> None:
    return None


@saga_step(compensate=release)
@app.task(name="bench.reserve")
def reserve(order_id: int, items: list[Any], address: dict[str, Any]) -> dict[str, Any]:
    return {"reservation_id": f"res-{order_id}-8f3a2c", "warehouse": "eu-west-3", "hold_until": "2026-12-06T12:00Z"}


@app.task(name="bench.refund")
def refund(order_id: int, items: list[Any], address: dict[str, Any], step_result: Any = None) -> None:
    return None


@saga_step(compensate=refund)
@app.task(name="bench.charge")
def charge(order_id: int, items: list[Any], address: dict[str, Any]) -> dict[str, Any]:
    return {"payment_id": f"pay-{order_id}-b71e09", "amount": "48.99", "currency": "EUR", "auth": "A7731X"}


@app.task(name="bench.cancel_shipment")
def cancel_shipment(order_id: int, items: list[Any], address: dict[str, Any], step_result: Any = None) -> None:
    return None


@saga_step(compensate=cancel_shipment)
@app.task(name="bench.ship")
def ship(order_id: int, items: list[Any], address: dict[str, Any]) -> dict[str, Any]:
    return {"shipment_id": f"shp-{order_id}-44d1", "carrier": "DHL", "eta": "2026-12-09", "label": "L-99812"}


@app.task(name="bench.undo_any")
def undo_any(**data: Any) -> None:
    return None


@saga_step(compensate=undo_any)
@app.task(name="bench.d1")
def d1(**data: Any) -> dict[str, Any]:
    return {"reservation_id": f"res-{data['order_id']}", "warehouse": "eu-west-3"}


@saga_step(compensate=undo_any)
@app.task(name="bench.d2")
def d2(**data: Any) -> dict[str, Any]:
    return {"payment_id": f"pay-{data['reservation_id']}", "amount": "48.99"}


@saga_step(compensate=undo_any)
@app.task(name="bench.d3")
def d3(**data: Any) -> dict[str, Any]:
    return {"shipment_id": f"shp-{data['payment_id']}", "carrier": "DHL"}


@app.task(name="bench.add_key")
def add_key(k: int, **data: Any) -> dict[str, Any]:
    return {f"key{k:02d}": "v" * 64}


# Deadlines on, as by default: every step has saga_default_step_timeout (300 s).
bench_saga = Saga("bench", [step1, step2, step3])
# The same saga with no deadline at all, to show what deadlines cost.
bench_saga_nodl = Saga(
    "bench_nodl", [step(t, name=f"nodl{i}", timeout=None) for i, t in enumerate([step1, step2, step3])]
)

bench_real = Saga("bench_real", [reserve, charge, ship])
# The same with a lock on every saga, each its own ("n" is unique per start): the cost of a lock, no contention.
bench_locked = Saga("bench_locked", [reserve, charge, ship], lock="order:{n}")
bench_data = Saga("bench_data", [d1, d2, d3])
# 20 steps, each adding a 70-odd-byte key: memory must grow with the steps, not their square.
bench_wide = Saga("bench_wide", [step(add_key.s(k=k), name=f"add{k:02d}", compensate=undo_any) for k in range(20)])
