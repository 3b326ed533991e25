"""The held isolation scenario: sagas on the same order never interleave, through failures and killed workers.

1,000 ``proc_iso_order`` sagas (``lock="order:{order_id}"``) over 10 order
ids, one in eight failing at random in a step, run on two prefork workers;
each worker is SIGKILLed once mid-run and replaced. Every step and
compensation writes ``[order, saga id, in:<what> | out:<what>]`` to a ledger
as it begins and ends. Then, per order: the entries come in one unbroken
block per saga (no two sagas of an order ever ran at once), the blocks are in
the order the sagas were submitted, and every saga ended.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from types import SimpleNamespace

import pytest
import redis

from celery_saga import SagaStatus, list_locks
from celery_saga.store import RedisSagaStore
from celery_saga.stores import store_for
from tests.helpers import wait_for
from tests.subprocs import Procs

SAGAS = int(os.environ.get("CELERY_SAGA_ISOLATION_SAGAS", "1000"))


@pytest.fixture
def sagas() -> int:
    """How many sagas the scenario submits (a module that imports it may run fewer)."""
    return SAGAS


ORDERS = 10
# Quick detection of the killed workers: their RUNNING steps are declared lost, not left to their deadline.
CONF = {"saga_worker_heartbeat": 0.5, "saga_worker_lost_after": 2.0}


@pytest.mark.saga_conf(CONF)
@pytest.mark.timeout(600)
def test_sagas_on_one_order_never_overlap_through_failures_and_killed_workers(
    env: SimpleNamespace, procs: Procs, shop: SimpleNamespace, r: redis.Redis, sagas: int
) -> None:
    rng = random.Random(7)
    # Given two workers
    workers = [procs.worker(), procs.worker()]
    # When 1,000 sagas (`sagas`) over 10 orders are submitted, one in eight set to fail in a step
    submitted: dict[str, list[str]] = defaultdict(list)
    ids = []
    for _ in range(sagas):
        order = rng.randrange(ORDERS)
        fail = rng.choice(["reserve", "charge"]) if rng.random() < 1 / 8 else None
        res = shop.iso_order.apply_async(kwargs={"order_id": order, "fail": fail})
        submitted[str(order)].append(res.id)
        ids.append(res.id)

    def ended() -> int:
        statuses = [s for s in _statuses(shop, ids) if s in _FINISHED]
        return len(statuses)

    # ... and each worker is SIGKILLed mid-run, and replaced
    at_kill: list[int] = []
    for share in (0.3, 0.6):
        wait_for(lambda s=share: ended() >= sagas * s, timeout=300, what=f"{share:.0%} of the sagas to end")
        at_kill.append(ended())
        procs.kill(workers.pop(0))
        workers.append(procs.worker())

    # Then every saga ends
    wait_for(lambda: ended() == sagas, timeout=300, what="every saga to end")
    statuses = _statuses(shop, ids)
    assert set(statuses) <= {SagaStatus.COMPLETED.value, SagaStatus.COMPENSATED.value}, set(statuses)
    assert all(n < sagas for n in at_kill)  # both workers were killed with sagas still to run

    # ... no two sagas of one order ever ran at once: one unbroken block of entries per saga
    by_order: dict[str, list[str]] = defaultdict(list)
    for order, saga_id, _what in map(json.loads, r.lrange(f"{env.prefix}:iso", 0, -1)):
        by_order[order].append(saga_id)
    for order, entries in by_order.items():
        blocks = [x for i, x in enumerate(entries) if i == 0 or entries[i - 1] != x]
        assert len(blocks) == len(set(blocks)), f"order {order}: sagas interleaved: {blocks}"
        # ... and each order's sagas started in the order they were submitted
        ran = set(blocks)
        assert blocks == [x for x in submitted[order] if x in ran], f"order {order}: not in submission order"
    # (a saga whose first step was lost with a killed worker ran no step, and left no entry)
    assert sum(len(set(e)) for e in by_order.values()) >= sagas * 0.95
    # ... and no lock is left held or waited for
    assert list_locks(shop.app) == []


_FINISHED = {SagaStatus.COMPLETED.value, SagaStatus.COMPENSATED.value, SagaStatus.FAILED.value}


def _statuses(shop: SimpleNamespace, ids: list[str]) -> list[str]:
    """Each saga's status, read from its store (one server or a cluster)."""
    store = store_for(shop.app)
    assert isinstance(store, RedisSagaStore)
    pipe = store.client.pipeline(transaction=False)
    for saga_id in ids:
        pipe.hget(store.keys.record(saga_id), "status")
    return [str(s) for s in pipe.execute()]
