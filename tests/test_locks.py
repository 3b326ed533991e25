"""Semantic locks and running limits (``Saga(lock=..., max_running=...)``) on real Redis and a real worker.

Each step and compensation writes ``[key, saga id, step]`` to a ledger in
Redis as it runs (for a transfer, one entry per account). Isolation is then
a property of the ledger: the entries of one key, read in order, come in
one unbroken block per saga.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery

from celery_saga import (
    Saga,
    SagaCompensated,
    SagaDefinitionError,
    SagaLocked,
    SagaStatus,
    current_step,
    list_locks,
    purge_saga,
    retry_saga,
    saga_state,
    saga_step,
    unlock_saga,
)
from celery_saga.locks import lock_status
from celery_saga.metrics import metrics_text
from celery_saga.store.redis import RedisSagaStore
from celery_saga.stores import store_for
from celery_saga.testing import thread_worker
from tests.helpers import Gates, finished, monitored, patience, store_now, wait_for
from tests.test_business_keys import cli, world  # noqa: F401 - world is a fixture
from tests.test_web import get, web_server


def build(app: Celery, r: redis.Redis, prefix: str) -> SimpleNamespace:
    key = f"{prefix}:iso"
    gates = Gates(r, prefix)

    def log(*keys: Any) -> None:
        ctx = current_step()
        assert ctx is not None
        step = f"{ctx.step}:undo" if ctx.compensating else ctx.step
        for k in keys:
            r.rpush(key, json.dumps([str(k), ctx.saga_id, step]))

    def behave(name: str, hold: str | None, fail: str | None) -> None:
        if hold == name:
            gates.enter(name, current_step().saga_id)  # type: ignore[union-attr]
        if fail == name:
            raise RuntimeError(f"{name} declined")

    @app.task(shared=False, name="iso.undo")
    def undo(order_id: Any = None, src: Any = None, dst: Any = None, step_result: Any = None) -> None:
        if r.exists(f"{prefix}:undo-broken"):
            raise RuntimeError("the refund service is down")
        log(*(k for k in (order_id, src, dst) if k is not None))

    @saga_step(compensate=undo)
    @app.task(shared=False, name="iso.reserve")
    def reserve(order_id: int, hold: str | None = None, fail: str | None = None) -> None:
        log(order_id)
        behave("reserve", hold, fail)

    @saga_step(compensate=undo)
    @app.task(shared=False, name="iso.charge")
    def charge(order_id: int, hold: str | None = None, fail: str | None = None) -> None:
        log(order_id)
        behave("charge", hold, fail)

    @saga_step(compensate=undo)
    @app.task(shared=False, name="iso.debit")
    def debit(src: str, dst: str) -> None:
        log(src, dst)

    @saga_step(compensate=undo)
    @app.task(shared=False, name="iso.credit")
    def credit(src: str, dst: str) -> None:
        log(src, dst)

    place = Saga("iso_place", [reserve, charge], lock="order:{order_id}")
    cancel = Saga("iso_cancel", [charge], lock="order:{order_id}")
    strict = Saga("iso_strict", [reserve], lock="order:{order_id}", on_locked="reject")
    transfer = Saga("iso_transfer", [debit, credit], lock=["account:{src}", "account:{dst}"])

    def blocks(k: Any) -> list[str]:
        """The sagas whose steps touched ``k``, one per unbroken run of entries."""
        ids = [e[1] for e in map(json.loads, r.lrange(key, 0, -1)) if e[0] == str(k)]
        return [x for i, x in enumerate(ids) if i == 0 or ids[i - 1] != x]

    return SimpleNamespace(**{k: v for k, v in locals().items() if not k.startswith("_")})


@pytest.fixture
def iso(app: Celery, r: redis.Redis, prefix: str) -> SimpleNamespace:
    return build(app, r, prefix)


def records(r: redis.Redis, prefix: str) -> set[str]:
    return {k for k in r.scan_iter(match=f"{prefix}:{{*-*-*-*-*}}", count=1000)}


def test_sagas_on_one_order_wait_their_turn_and_never_interleave(
    app: Celery, iso: SimpleNamespace, worker: Any
) -> None:
    with worker():
        # Given a saga on order 7 held in its charge step
        first = iso.place.delay(order_id=7, hold="charge")
        iso.gates.wait_entered("charge")
        # When more sagas of either name start on order 7, and one on order 8
        queued = [iso.place.delay(order_id=7), iso.cancel.delay(order_id=7), iso.place.delay(order_id=7)]
        other = iso.place.delay(order_id=8)
        # Then the one on order 8 runs at once, and those on order 7 wait, accepted, in order
        assert finished(other) is SagaStatus.COMPLETED
        for n, res in enumerate(queued, 1):
            state = saga_state(app, res.id)
            assert (state.status, state.lock_status) == (SagaStatus.PENDING, "wait")
            held = lock_status(app, state)
            assert held is not None and held.position == {"order:7": n}
            assert held.text() == f"waiting for lock order:7 (held by {first.id}; position {n})"
        (queue,) = list_locks(app, "order:7")
        assert (queue.holders, queue.waiters) == ((first.id,), tuple(x.id for x in queued))
        assert 'celery_saga_waiting{name="iso_place"} 2' in metrics_text(app)

        # When the holder goes on, each waiter runs in turn, first come first served
        iso.gates.open("charge")
        assert [finished(x) for x in (first, *queued)] == [SagaStatus.COMPLETED] * 4
    assert iso.blocks(7) == [first.id, *(x.id for x in queued)]
    assert list_locks(app) == []
    text = metrics_text(app)
    assert 'celery_saga_waiting{name="iso_place"} 0' in text
    assert "celery_saga_lock_wait_seconds_count 3" in text


def test_a_compensated_saga_releases_its_lock_after_its_compensations(
    app: Celery, iso: SimpleNamespace, worker: Any
) -> None:
    with worker():
        failing = iso.place.delay(order_id=3, fail="charge", hold="reserve")
        iso.gates.wait_entered("reserve")
        after = iso.place.delay(order_id=3)
        iso.gates.open("reserve")
        with pytest.raises(SagaCompensated):
            failing.get(timeout=patience(30))
        assert finished(after) is SagaStatus.COMPLETED
    # The next saga's steps came after every compensation of the first
    assert iso.blocks(3) == [failing.id, after.id]


def test_reject_raises_in_one_call_naming_the_holder_and_writes_nothing(
    app: Celery, iso: SimpleNamespace, r: redis.Redis, prefix: str, redis_url: str, worker: Any
) -> None:
    # Given a saga holding order 5 (PENDING: no worker runs yet, so the start is the prefix's only client)
    holder = iso.cancel.delay(order_id=5)
    before = records(r, prefix)
    iso.strict.plan()  # (its definition is checked once per process, not in the measured call)
    with monitored(redis_url) as seen, pytest.raises(SagaLocked) as refused:
        iso.strict.delay(order_id=5)
    # Then one round trip, the start's own call, refused it, naming the holder
    assert [c.split(" ")[0] for kind, c in seen if kind != "lua" and prefix in c] == ["FCALL"], seen
    assert (refused.value.lock, refused.value.holder) == ("order:5", holder.id)
    assert holder.id in str(refused.value)
    assert records(r, prefix) == before  # nothing written
    # And once the lock is free, the same start goes through
    with worker():
        assert finished(holder) is SagaStatus.COMPLETED
        assert finished(iso.strict.delay(order_id=5)) is SagaStatus.COMPLETED


def test_sagas_taking_two_locks_in_either_order_never_deadlock(app: Celery, iso: SimpleNamespace, worker: Any) -> None:
    with worker(8):
        # Given transfers both ways between two accounts, and with a third
        runs = []
        for i in range(12):
            src, dst = [("a", "b"), ("b", "a"), ("b", "c"), ("c", "a")][i % 4]
            runs.append(iso.transfer.delay(src=src, dst=dst))
        # Then all complete, and no account saw two transfers at once
        assert {finished(x, timeout=60) for x in runs} == {SagaStatus.COMPLETED}
    for account in "abc":
        touched = iso.blocks(account)
        assert len(touched) == len(set(touched)), (account, touched)


def test_a_saga_that_waits_past_its_lock_timeout_is_compensated_with_nothing_to_undo(
    app: Celery, iso: SimpleNamespace, worker: Any
) -> None:
    impatient = Saga("iso_impatient", [iso.reserve], lock="order:{order_id}", lock_timeout=0.5)
    with worker():
        holder = iso.place.delay(order_id=9, hold="charge")
        iso.gates.wait_entered("charge")
        late = impatient.delay(order_id=9)
        with pytest.raises(SagaCompensated) as gave_up:
            late.get(timeout=patience(20))
        assert gave_up.value.reason == "lock_timeout"
        assert saga_state(app, late.id).lock_status is None
        iso.gates.open("charge")
        assert finished(holder) is SagaStatus.COMPLETED
    # Its step never ran, and nothing was undone
    assert iso.blocks(9) == [holder.id]


def test_max_running_never_lets_one_more_run(app: Celery, iso: SimpleNamespace, r: redis.Redis, worker: Any) -> None:
    limited = Saga("iso_limited", [iso.reserve], max_running=3)
    with worker(8):
        runs = [limited.delay(order_id=100 + i, hold="reserve") for i in range(7)]
        # Three run (held in their step); the others wait, however long we look
        iso.gates.wait_entered("reserve", 3)
        statuses = [saga_state(app, x.id).lock_status for x in runs]
        assert statuses == ["held"] * 3 + ["wait"] * 4
        assert len(iso.gates.entered("reserve")) == 3
        # Each one that ends lets exactly one more in
        for n in range(4, 8):
            iso.gates.open("reserve")
            iso.gates.wait_entered("reserve", n)
            running = [x for x in runs if saga_state(app, x.id).status is SagaStatus.RUNNING]
            assert len(running) <= 3
        for _ in range(3):
            iso.gates.open("reserve")
        assert {finished(x) for x in runs} == {SagaStatus.COMPLETED}
    (queue,) = [q for q in [*list_locks(app)] if q.lock == "max_running of iso_limited"] or [None]
    assert queue is None  # nobody holds or waits any more


def test_a_failed_saga_keeps_its_lock_until_unlocked_or_purged(
    app: Celery, iso: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any
) -> None:
    app.conf.saga_compensation_max_retries = 0
    r.set(f"{prefix}:undo-broken", 1)
    with worker():
        # Given a saga on order 4 whose refund gave up: FAILED, the order may be inconsistent
        broken = iso.place.delay(order_id=4, fail="charge")
        assert finished(broken) is SagaStatus.FAILED
        r.delete(f"{prefix}:undo-broken")
        # Then a saga on order 4 waits, though the first ended
        after = iso.place.delay(order_id=4)
        wait_for(lambda: saga_state(app, after.id).lock_status == "wait", what="the second saga to wait")
        assert saga_state(app, broken.id).lock_status == "held"
        # When an operator unlocks it (the order fixed by hand), the next saga runs
        unlock_saga(app, broken.id)
        assert finished(after) is SagaStatus.COMPLETED
        assert "celery_saga_unlocked_total 1" in metrics_text(app)
        # And a retry of the FAILED saga runs without the lock it gave back
        retry_saga(app, broken.id)
        assert finished(broken) is SagaStatus.COMPENSATED

        # A purge gives back the locks of a FAILED saga too
        r.set(f"{prefix}:undo-broken", 1)
        second = iso.place.delay(order_id=6, fail="charge")
        assert finished(second) is SagaStatus.FAILED
        r.delete(f"{prefix}:undo-broken")
        waiting = iso.place.delay(order_id=6)
        wait_for(lambda: saga_state(app, waiting.id).lock_status == "wait", what="a saga to wait")
        purge_saga(app, second.id)
        assert finished(waiting) is SagaStatus.COMPLETED


def test_a_lock_of_a_missing_kwarg_is_a_definition_error_and_bad_definitions_fail_early(
    app: Celery, iso: SimpleNamespace, r: redis.Redis, prefix: str
) -> None:
    before = records(r, prefix)
    with pytest.raises(SagaDefinitionError, match="needs the kwarg 'order_id'"):
        iso.place.delay(customer=1)
    assert records(r, prefix) == before
    for bad, match in (
        ({"lock": "order:{order_id!r}"}, "must name a start kwarg"),
        ({"lock": "order {order_id}"}, "no braces, spaces"),
        ({"lock": ["a", "a"]}, "twice"),
        ({"lock": "a", "on_locked": "wait"}, "on_locked"),
        ({"max_running": 0}, "max_running"),
    ):
        with pytest.raises(SagaDefinitionError, match=match):
            Saga("iso_bad", [iso.reserve], **bad)


def test_a_waiter_whose_starter_died_before_publishing_is_started_by_a_sweeper(
    app: Celery, iso: SimpleNamespace, r: redis.Redis, worker: Any
) -> None:
    store = store_for(app)
    assert isinstance(store, RedisSagaStore)
    # Given a saga waiting for order 2, behind one that is PENDING (no worker yet)
    holder = iso.cancel.delay(order_id=2)
    waiter = iso.cancel.delay(order_id=2)
    assert saga_state(app, waiter.id).lock_status == "wait"
    # When the holder is cancelled by a process that dies before publishing anything
    # (the transition alone, without follow()): the waiter is let in, its first stage unpublished
    t = store.cancel(holder.id, "cancelled by a test")
    assert t.admitted == (waiter.id,)
    # ... and the grace its starter had to publish is over (the admission set back 11 s, as the clock would move)
    now_ms = store_now(r) * 1000
    r.hset(store.keys.record(waiter.id), "adm", f"{now_ms - 11_000:.0f}")
    r.zadd(store.keys.due(store.keys.shard_of(waiter.id)), {waiter.id: now_ms - 1_000})
    # Then a sweeper publishes it, and it runs
    with worker():
        assert finished(waiter, timeout=30) is SagaStatus.COMPLETED
    assert finished(holder) is SagaStatus.COMPENSATED


def test_the_cli_lists_locks_shows_a_waiting_saga_and_unlocks_only_a_failed_one(world: SimpleNamespace) -> None:  # noqa: F811
    s = world
    with thread_worker(s.app):
        holder = s.locked.apply_async(kwargs={"token": "l-1", "order_id": 31, "hold": "charge"})
        s.gates.wait_entered("l-1")
        waiter = s.locked.apply_async(kwargs={"token": "l-2", "order_id": 31})
        wait_for(lambda: saga_state(s.app, waiter.id).lock_status == "wait", what="the second saga to wait")
        listed = cli(s, "locks")
        assert listed.returncode == 0, listed.stderr
        assert f"order:31: held by {holder.id}" in listed.stdout and f"1. {waiter.id}" in listed.stdout
        assert json.loads(cli(s, "locks", "order:31", "--json").stdout)["locks"] == [
            {"lock": "order:31", "holders": [holder.id], "waiters": [waiter.id]}
        ]
        shown = cli(s, "show", waiter.id)
        assert f"waiting for lock order:31 (held by {holder.id}; position 1)" in shown.stdout
        # (and the web page says the same, the holder linked)
        with web_server(s.app) as base:
            status, page = get(f"{base}/saga/{waiter.id}")
        assert status == 200 and 'id="locks"' in page and "position 1" in page, page
        assert f'href="/saga/{holder.id}"' in page
        doc = json.loads(cli(s, "show", waiter.id, "--json").stdout)
        assert doc["locks"]["status"] == "waiting" and doc["locks"]["position"] == {"order:31": 1}
        refused = cli(s, "unlock", holder.id)
        assert refused.returncode == 1 and "only a FAILED saga is unlocked" in refused.stderr
        s.gates.open("l-1")
        assert finished(holder) is finished(waiter) is SagaStatus.COMPLETED
    assert "no saga holds or waits for a lock" in cli(s, "locks").stdout


def test_no_lock_outlives_its_holders_record_and_a_cancelled_waiter_leaves_the_queue(
    app: Celery, iso: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any
) -> None:
    app.conf.update(saga_compensation_max_retries=0, saga_failed_retention=1)
    r.set(f"{prefix}:undo-broken", 1)
    with worker():
        # Given a FAILED saga holding order 12, kept a second (saga_failed_retention)
        broken = iso.place.delay(order_id=12, fail="charge")
        assert finished(broken) is SagaStatus.FAILED
        r.delete(f"{prefix}:undo-broken")
        assert saga_state(app, broken.id).lock_status == "held"
        # When its record expires, the next saga on order 12 takes the lock at once
        wait_for(lambda: store_for(app).load_many([broken.id]) == [None], what="the FAILED record to expire")
        app.conf.saga_failed_retention = None
        holder = iso.place.delay(order_id=12, hold="charge")
        iso.gates.wait_entered("charge")
        assert list_locks(app, "order:12")[0].holders == (holder.id,)
        # And a waiter that is cancelled leaves the queue, so the one behind it is first
        cancelled, behind = iso.place.delay(order_id=12), iso.place.delay(order_id=12)
        assert cancelled.cancel()
        assert finished(cancelled) is SagaStatus.COMPENSATED
        assert list_locks(app, "order:12")[0].waiters == (behind.id,)
        iso.gates.open("charge")
        assert finished(holder) is finished(behind) is SagaStatus.COMPLETED
    assert iso.blocks(12) == [broken.id, holder.id, behind.id]
