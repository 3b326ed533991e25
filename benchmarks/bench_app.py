"""The Celery app of ``benchmarks/overhead.py``: three no-op saga steps and their saga.

Imported both by the benchmark script and by the ``celery worker`` subprocess
it starts, so everything that must match between the two comes from the
environment:

- ``BENCH_BROKER_URL``: broker, result backend and saga store (one Redis);
- ``BENCH_QUEUE``: the queue every task of this run goes to;
- ``BENCH_PREFIX``: the saga key prefix of this run;
- ``BENCH_STORE_URL``: the saga store, if not the broker's Redis (a cluster);
- ``BENCH_WAIT_REPLICAS``: ``saga_redis_wait_replicas`` (default 0).

Called outside a saga the steps are plain tasks, so the same three tasks make
the sagas (with and without deadlines) and the reference chain.
"""

from __future__ import annotations

import os

from celery import Celery

from celery_saga import Saga, saga_step, step

BROKER_URL = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/9")
QUEUE = os.environ.get("BENCH_QUEUE", "bench")
PREFIX = os.environ.get("BENCH_PREFIX", "bench")
STORE_URL = os.environ.get("BENCH_STORE_URL") or BROKER_URL

app = Celery("bench", broker=BROKER_URL, backend=BROKER_URL, set_as_current=False)
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


# Deadlines on, as by default: every step has saga_default_step_timeout (300 s).
bench_saga = Saga("bench", [step1, step2, step3])
# The same saga with no deadline at all, to show what deadlines cost.
bench_saga_nodl = Saga(
    "bench_nodl", [step(t, name=f"nodl{i}", timeout=None) for i, t in enumerate([step1, step2, step3])]
)
