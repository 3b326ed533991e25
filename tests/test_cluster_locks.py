"""Semantic locks on a real 3-master Redis Cluster, where the locks and the records are in different slots.

The scenarios of test_locks.py run here on the cluster (imported, with this
module's ``app``). Then each point where a crash can fall between a
cluster's lock calls (store/cluster_locks.py) is made by hand, by making
only the calls before it, and a sweeper must repair it.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery

from celery_saga import Saga, SagaLocked, SagaStatus, list_locks, retry_saga, saga_state
from celery_saga.store import Op, Outcome, RedisSagaStore, SagaStore
from celery_saga.stores import store_for
from celery_saga.sweeper import sweep
from tests.deployments import Cluster
from tests.helpers import finished, store_now
from tests.test_locks import (  # noqa: F401 - collected here, with this module's app
    build,
    test_a_compensated_saga_releases_its_lock_after_its_compensations,
    test_a_failed_saga_keeps_its_lock_until_unlocked_or_purged,
    test_a_saga_that_waits_past_its_lock_timeout_is_compensated_with_nothing_to_undo,
    test_max_running_never_lets_one_more_run,
    test_no_lock_outlives_its_holders_record_and_a_cancelled_waiter_leaves_the_queue,
    test_sagas_on_one_order_wait_their_turn_and_never_interleave,
    test_sagas_taking_two_locks_in_either_order_never_deadlock,
)
from tests.test_transitions import request


@pytest.fixture
def app(app: Celery, cluster: Cluster) -> Celery:
    """The test's app, with its saga store on the cluster (its broker stays the plain Redis)."""
    app.conf.update(cluster.saga_conf)
    return app


@pytest.fixture
def iso(app: Celery, r: redis.Redis, prefix: str) -> SimpleNamespace:
    return build(app, r, prefix)


@pytest.fixture
def store(app: Celery) -> RedisSagaStore:
    s = store_for(app)
    assert isinstance(s, RedisSagaStore) and s.cluster_locks is not None
    return s


def cluster_keys(cluster: Cluster, pattern: str) -> set[str]:
    return {k for c in cluster.clients() for k in c.scan_iter(match=pattern, count=1000)}


def locks_node(store: RedisSagaStore) -> Any:
    """A client of the master holding the {locks} slot."""
    return store.client.get_node_from_key(store.keys.locks()).redis_connection


def age_lock_call(store: RedisSagaStore, saga_id: str, seconds: float) -> None:
    """Set a saga's lock call back in time, as the clock would move (the lock script's record of it)."""
    w = store.keys.locks() + ":w"
    entry = json.loads(store.client.hget(w, saga_id))
    entry["at"] -= seconds * 1000
    store.client.hset(w, saga_id, json.dumps(entry))


def test_reject_names_the_holder_and_writes_no_record(
    app: Celery, iso: SimpleNamespace, cluster: Cluster, prefix: str, worker: Any
) -> None:
    holder = iso.cancel.delay(order_id=5)  # PENDING: no worker yet
    before = cluster_keys(cluster, f"{prefix}:{{*-*-*-*-*}}")
    with pytest.raises(SagaLocked) as refused:
        iso.strict.delay(order_id=5)
    assert (refused.value.lock, refused.value.holder) == ("order:5", holder.id)
    assert cluster_keys(cluster, f"{prefix}:{{*-*-*-*-*}}") == before
    with worker():
        assert finished(holder) is SagaStatus.COMPLETED
        assert finished(iso.strict.delay(order_id=5)) is SagaStatus.COMPLETED
    assert list_locks(app) == []


def test_a_start_that_died_after_its_lock_call_holds_the_lock_only_until_a_sweeper_repairs_it(
    app: Celery, iso: SimpleNamespace, store: RedisSagaStore, worker: Any
) -> None:
    # Given a start that took order 21's lock and died before writing its record
    dead = str(uuid.uuid4())
    assert store.cluster_locks is not None
    assert store.cluster_locks.acquire(dead, "", "iso_place", [("l:order:21", 1)]).how == "take"
    # Then a saga on order 21 waits for it
    waiter = iso.place.delay(order_id=21)
    assert saga_state(app, waiter.id).lock_status == "wait"
    # ... and a repair keeps the lock while the dead start may still write its record
    assert store.repair_locks() == []
    assert list_locks(app, "order:21")[0].holders == (dead,)
    # When its lock call is a minute old (lockslot.lua MISSING_GRACE_MS), a worker's sweeper gives it back
    age_lock_call(store, dead, 61)
    with worker():
        assert finished(waiter) is SagaStatus.COMPLETED
    assert iso.blocks(21) == [waiter.id]


def test_an_end_whose_release_was_never_sent_is_repaired_by_the_waiters_sweep(
    app: Celery, iso: SimpleNamespace, store: RedisSagaStore, worker: Any
) -> None:
    # Given a holder on order 22 and a saga waiting behind it (no worker yet: both PENDING)
    holder = iso.cancel.delay(order_id=22)
    waiter = iso.cancel.delay(order_id=22)
    # When the holder is cancelled by a process that dies before its lock calls
    # (the transition alone: the record ends, the lock script never hears)
    t = SagaStore.apply(store, Op.CANCEL, holder.id, "*", "", "cancelled by a test")
    assert t.status is SagaStatus.COMPENSATED and t.release == ("l:order:22",)
    assert list_locks(app, "order:22")[0].holders == (holder.id,)
    # ... then the waiter's own sweep, once due (every 30 s), gives the lock back and starts it
    shard = store.keys.due(store.keys.shard_of(waiter.id))
    now = store_now(store.client.get_node_from_key(shard).redis_connection)
    store.client.zadd(shard, {waiter.id: (now - 1) * 1000})
    assert sweep(app).claimed == 1
    assert saga_state(app, waiter.id).lock_status == "held"
    assert list_locks(app, "order:22")[0].holders == (waiter.id,)
    with worker():
        assert finished(waiter) is SagaStatus.COMPLETED
    assert list_locks(app) == []


def test_a_waiter_let_in_by_the_lock_script_but_never_admitted_is_started_by_a_sweeper(
    app: Celery, iso: SimpleNamespace, store: RedisSagaStore, worker: Any
) -> None:
    assert store.cluster_locks is not None
    # Given a holder on order 23 and a saga waiting behind it
    holder = iso.cancel.delay(order_id=23)
    waiter = iso.cancel.delay(order_id=23)
    # When the holder ends and its lock is released, and the process dies before admitting the waiter
    SagaStore.apply(store, Op.CANCEL, holder.id, "*", "", "cancelled by a test")
    assert store.cluster_locks.release(holder.id, ["l:order:23"]) == [waiter.id]
    assert saga_state(app, waiter.id).lock_status == "wait"  # its record never heard
    # Then a worker's sweeper (its lock repair runs at its first pass) starts it
    with worker():
        assert finished(waiter) is SagaStatus.COMPLETED
    assert finished(holder) is SagaStatus.COMPENSATED


def test_a_start_whose_record_comes_too_late_after_its_lock_call_takes_the_lock_again(
    app: Celery, store: RedisSagaStore
) -> None:
    assert store.cluster_locks is not None
    # (A start by hand, as test_transitions.py makes them: nothing of it is published.)
    req = dataclasses.replace(request(str(uuid.uuid4())), locks=(("l:order:24x", 1),))
    # A start transition told of a lock call older than locks.lua's LOCK_FENCE_MS writes nothing
    late = (store_now(locks_node(store)) - 31) * 1000
    t = SagaStore.start(store, dataclasses.replace(req, lock_answer=("take", f"{late:.0f}")))
    assert (t.outcome, t.status) == (Outcome.RELOCK, None)
    assert store.load_many([req.saga_id]) == [None]
    # The store, meeting that once (a stall between its two calls), gives the lock back and starts again
    stalls = []

    def stalled_once(r: Any) -> Any:
        if not stalls:
            stalls.append(r.lock_answer)
            r = dataclasses.replace(r, lock_answer=("take", f"{late:.0f}"))
        return SagaStore.start(store, r)

    t = store.cluster_locks.start(req, stalled_once)
    assert (t.outcome, len(stalls)) == (Outcome.CREATED, 1)
    assert list_locks(app, "order:24x")[0].holders == (req.saga_id,)


def test_the_lock_timings_python_uses_are_the_scripts() -> None:
    # cluster_locks.py schedules a waiter's sweep and an admitted saga's check on the times locks.lua uses
    import re
    from importlib import resources

    from celery_saga.store import cluster_locks

    source = resources.files("celery_saga.store").joinpath("locks.lua").read_text()
    found = {m[0]: int(m[1]) / 1000 for m in re.findall(r"^local (\w+_MS) = (\d+)$", source, re.M)}
    assert (found["LOCK_RECHECK_MS"], found["ADMIT_LOOK_MS"]) == (cluster_locks.LOCK_RECHECK, cluster_locks.ADMIT_LOOK)


def test_a_repair_that_saw_a_waiter_before_it_was_let_in_leaves_it_its_lock(
    app: Celery, iso: SimpleNamespace, store: RedisSagaStore
) -> None:
    assert store.cluster_locks is not None
    # Given a holder on order 25 and a saga waiting behind it, and a repair that saw the queue then
    holder = iso.cancel.delay(order_id=25)
    waiter = iso.cancel.delay(order_id=25)
    seen = store.cluster_locks.look(["l:order:25"])
    assert seen.waiters == {"l:order:25": [waiter.id]}
    # When the holder ends, and its lock goes to the waiter, before the repair reads the records
    assert store.cancel(holder.id, "cancelled by a test").admitted == (waiter.id,)
    assert saga_state(app, waiter.id).lock_status == "held"
    # Then the repair, finding the waiter's record no longer waiting, leaves it holding its lock
    store.cluster_locks.repair_seen(seen)
    assert list_locks(app, "order:25")[0].holders == (waiter.id,)
    # ... and a saga on order 25 now waits for it
    after = iso.cancel.delay(order_id=25)
    assert saga_state(app, after.id).lock_status == "wait"


def test_a_retry_takes_its_running_slot_back_before_it_runs_so_a_crash_between_costs_nothing_lasting(
    app: Celery, iso: SimpleNamespace, r: redis.Redis, prefix: str, store: RedisSagaStore, worker: Any
) -> None:
    assert store.cluster_locks is not None
    app.conf.saga_compensation_max_retries = 0
    one = Saga("iso_one", [iso.reserve, iso.charge], max_running=1)
    r.set(f"{prefix}:undo-broken", 1)
    with worker():
        broken = one.delay(order_id=30, fail="charge")
        assert finished(broken) is SagaStatus.FAILED
    r.delete(f"{prefix}:undo-broken")
    slot = "n:iso_one"
    assert store.lock_queue(slot) == ([], [])  # a FAILED saga keeps its locks, not its running slot
    # Given a retry that took the slot back and died before its transition: a repair gives it back
    store.cluster_locks._lock("retake", broken.id, slot)
    assert store.lock_queue(slot) == ([broken.id], [])
    assert store.repair_locks() == []
    assert store.lock_queue(slot) == ([], [])
    # When the retry runs whole (no worker yet: it stays COMPENSATING), it holds its slot while it compensates
    retry_saga(app, broken.id)
    assert store.lock_queue(slot) == ([broken.id], [])
    with worker():
        assert finished(broken) is SagaStatus.COMPENSATED
    assert store.lock_queue(slot) == ([], [])
