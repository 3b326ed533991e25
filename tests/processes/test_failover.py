"""Sagas on `celery worker` subprocesses while their store fails over, and processes die at the worst moments.

The broker is the tests' shared Redis; the saga store is elsewhere: a
primary with a replica under Sentinel, or a Redis of the test's own.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from celery_saga import Saga, SagaStatus, SagaStoreUnavailable
from celery_saga.stores import store_for
from tests.deployments import SentinelGroup
from tests.helpers import patience, wait_for
from tests.subprocs import ROOT, Procs, proc_env

#: What a worker logs when it lets a message go without running it as asked.
DROPPED = ("record unusable", "no record for", "lost in the reset", "belongs to an earlier start")


@pytest.fixture
def sentinel() -> Iterator[SentinelGroup]:
    with SentinelGroup() as group:
        yield group


@pytest.fixture
def env(redis_url: str, ns: str, sentinel: SentinelGroup) -> SimpleNamespace:
    """The test's broker (the shared Redis), prefix and queue; the saga store under Sentinel, WAITing for a replica."""
    store = {
        "saga_redis_url": sentinel.url,
        "saga_redis_transport_options": sentinel.options,
        "saga_redis_wait_replicas": 1,
        "saga_redis_wait_timeout": 1.0,
    }
    return proc_env(redis_url, f"sagaproc-{ns}", f"q-{ns}", store)


def _start(saga: Saga, key: str, **kwargs: Any) -> Any:
    """Start a saga, retrying (with the same key) while the store cannot take it, as a careful client does."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return saga.apply_async(kwargs=kwargs, idempotency_key=key)
        except SagaStoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.timeout(240)
def test_a_forced_failover_loses_no_saga_and_no_effect(
    env: SimpleNamespace, procs: Procs, shop: SimpleNamespace, sentinel: SentinelGroup
) -> None:
    # Given two workers, and 300 sagas of two steps: one in three fails at its
    # last step, and half of those have compensations that fail twice first
    procs.worker()
    procs.worker()
    saga = Saga("failover", [shop.t_reserve, shop.t_last])
    rng = random.Random(7)
    plan: list[dict[str, Any]] = []
    for i in range(300):
        data: dict[str, Any] = {"qty": 1}
        if i % 3 == 0:
            data["fail"] = {"proc.t.last": "declined"}
            if rng.random() < 0.5:
                data["undo_fails"] = 2
        plan.append(data)

    # When a failover is forced a third of the way through
    results: list[Any] = []
    failover = threading.Thread(target=sentinel.failover)
    for i, data in enumerate(plan):
        if i == 100:
            failover.start()
        results.append(_start(saga, f"fo-{i}", **data))
    failover.join(patience(60))

    # Then, once the old primary follows the new one, every saga has ended,
    # COMPLETED or COMPENSATED, as its data says
    wait_for(sentinel.settled, 60, "the old primary to become a replica")
    store = store_for(shop.app)

    def ended() -> list[SagaStatus] | None:
        try:
            statuses = [store.status(res.id) for res in results]
        except SagaStoreUnavailable:  # this client's connection may meet the demoted primary once
            return None
        return statuses if all(s.finished for s in statuses) else None

    statuses = wait_for(ended, 120, "every saga to end")
    expected = [SagaStatus.COMPENSATED if "fail" in data else SagaStatus.COMPLETED for data in plan]
    assert statuses == expected
    # ... every effect of a compensated saga is undone, and those of a completed one stay, once each
    stock, effects = shop.left()
    kept = {
        f"{res.id}:{step}"
        for res, data in zip(results, plan, strict=True)
        if "fail" not in data
        for step in ("proc.t.reserve", "proc.t.last")
    }
    assert set(effects) == kept and stock == len(kept)
    # ... and no worker let a message go
    logs = procs.logs()
    assert not [line for line in logs.splitlines() if any(d in line for d in DROPPED)]


def test_a_start_killed_between_record_and_publish_completes_when_retried(
    env: SimpleNamespace, procs: Procs, shop: SimpleNamespace
) -> None:
    # Given a client that dies as it publishes its saga's first step, after writing the record
    code = (
        "import os, signal, sys\n"
        "from celery import signals\n"
        "from tests import proc_app\n"
        "shop = proc_app.create(*sys.argv[1:4], saga_conf=__import__('json').loads(sys.argv[4]))\n"
        "signals.before_task_publish.connect(lambda **_: os.kill(os.getpid(), signal.SIGKILL), weak=False)\n"
        "shop.sequential.apply_async(kwargs={'order_id': 6}, idempotency_key='crashed-start')\n"
    )
    args = [env.redis_url, env.prefix, env.queue, json.dumps(env.saga_conf)]
    died = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env.proc_env, timeout=60)
    assert died.returncode == -signal.SIGKILL
    res = shop.sequential.apply_async(kwargs={"order_id": 6}, idempotency_key="crashed-start")
    assert res.status is SagaStatus.PENDING  # the record is there, its first step was never sent

    # When it is started again with the same key, and a worker runs
    procs.worker()
    # Then it completes
    assert res.get(timeout=patience(30))["tracking"] == "t-6-p-6-r-6"


def test_a_callback_whose_sender_died_is_sent_by_a_sweeper(
    env: SimpleNamespace, procs: Procs, shop: SimpleNamespace, r: redis.Redis
) -> None:
    # Given a worker that dies as it sends a saga's on_complete, after recording the saga's end
    r.set(f"{env.prefix}:crash-on-callback", "1")
    first = procs.worker()
    res = shop.sequential.apply_async(kwargs={"order_id": 7}, on_complete=shop.notify.s())
    assert procs.wait_dead(first, timeout=30) == -signal.SIGKILL
    assert res.status is SagaStatus.COMPLETED
    assert ["callback", res.id] not in shop.entries("ledger")

    # When another worker (and its sweeper) runs
    procs.worker()
    # Then the callback is sent, once the grace for its sender has passed
    wait_for(lambda: ["callback", res.id] in shop.entries("ledger"), 30, "the callback")
