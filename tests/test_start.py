"""Starting sagas: the ack, idempotency, bad input, an unreachable store, a failed publish."""

from __future__ import annotations

import threading

import pytest
import redis
from celery import Celery

from celery_saga import (
    IdempotencyConflict,
    SagaDataError,
    SagaNotFound,
    SagaResult,
    SagaStatus,
    SagaStoreUnavailable,
    StepStatus,
)
from celery_saga.redis_server import free_port
from celery_saga.store.redis import transitions_source
from celery_saga.stores import store_for
from tests import shop
from tests.conftest import configure
from tests.helpers import Ledger, patience, saga_keys, wait_for


def _saga_keys(r: redis.Redis, prefix: str) -> list[str]:
    return list(r.scan_iter(f"{prefix}:*"))


def test_start_returns_at_once_and_a_saga_waits_pending_for_a_worker(
    app: Celery, r, prefix, ledger: Ledger, worker
) -> None:
    s = shop.build(app, r, prefix)
    res = s.sequential.delay(order_id=1)
    # No worker runs: the saga is recorded, its first step queued, nothing begun.
    assert res.status is SagaStatus.PENDING
    assert not res.ready()
    state = res.state()
    assert [st.status for st in state.steps] == [StepStatus.DISPATCHED] + [StepStatus.WAITING] * 3
    assert r.pttl(f"{prefix}:{{{res.id}}}") == -1  # a running saga never expires
    assert ledger.actions() == []
    with worker():
        assert res.get(timeout=patience(20))["tracking"] == "t-1"
    # A handle made later, from the id alone, sees the same saga.
    assert SagaResult(res.id, app=app).status is SagaStatus.COMPLETED


def test_idempotent_start_with_ten_threads_racing_for_one_key(app: Celery, r, prefix, ledger: Ledger, worker) -> None:
    s = shop.build(app, r, prefix)
    barrier = threading.Barrier(10)
    ids: list[str] = []

    def start() -> None:
        barrier.wait()
        ids.append(s.sequential.apply_async(kwargs={"order_id": 9}, idempotency_key="order-9").id)

    threads = [threading.Thread(target=start) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 10 and len(set(ids)) == 1
    with worker():
        SagaResult(ids[0], app=app).get(timeout=patience(20))
        # The same key and kwargs after the end still give the same saga, whatever its status.
        again = s.sequential.apply_async(kwargs={"order_id": 9}, idempotency_key="order-9")
        assert again.id == ids[0] and again.status is SagaStatus.COMPLETED
        s.notify.delay("sentinel", tag="sentinel")
        wait_for(lambda: r.llen(f"{prefix}:callbacks"), what="the sentinel")
    assert ledger.actions() == ["do:shop.validate", "do:shop.reserve", "do:shop.charge", "do:shop.ship"]


def test_same_key_with_different_kwargs_conflicts(app: Celery, r, prefix) -> None:
    s = shop.build(app, r, prefix)
    first = s.sequential.apply_async(kwargs={"order_id": 1}, idempotency_key="k")
    with pytest.raises(IdempotencyConflict) as info:
        s.sequential.apply_async(kwargs={"order_id": 2}, idempotency_key="k")
    assert info.value.saga_id == first.id
    # Keys are scoped per saga name.
    other = s.mixed.apply_async(kwargs={"order_id": 2}, idempotency_key="k")
    assert other.id != first.id


def test_an_idempotency_key_compares_numbers_by_value(app: Celery, r, prefix) -> None:
    from decimal import Decimal

    # Given a saga started with an amount of Decimal("50")
    s = shop.build(app, r, prefix)
    first = s.sequential.apply_async(kwargs={"order_id": 1, "amount": Decimal("50"), "rate": 0.1}, idempotency_key="n")
    # Then the same amount written otherwise is the same start, the same saga
    for amount, rate in ((Decimal("50.00"), Decimal("0.1")), (50, 0.1), (50.0, Decimal("0.10"))):
        again = s.sequential.apply_async(kwargs={"order_id": 1, "amount": amount, "rate": rate}, idempotency_key="n")
        assert again.id == first.id
    # And another amount is another start, which the key refuses
    with pytest.raises(IdempotencyConflict):
        s.sequential.apply_async(kwargs={"order_id": 1, "amount": Decimal("50.01"), "rate": 0.1}, idempotency_key="n")
    with pytest.raises(IdempotencyConflict):
        s.sequential.apply_async(kwargs={"order_id": 1, "amount": 50, "rate": 0.1000001}, idempotency_key="n")


def test_a_finished_saga_keeps_each_steps_configured_timeout(app: Celery, r, prefix, worker) -> None:
    from celery_saga import Saga, step
    from celery_saga.views import state_json

    # Given a completed saga of a step with its own timeout and steps with the default (300 s)
    s = shop.build(app, r, prefix)
    saga = Saga("timeouts_kept", [step(s.reserve, timeout=12.5), s.charge])
    with worker():
        res = saga.delay(order_id=1)
        res.get(timeout=patience(20))
    # Then show and its JSON still have each step's timeout, after the record was packed
    state = res.state()
    assert [x.timeout for x in state.steps] == [12.5, 300.0]
    assert [x["timeout"] for x in state_json(state)["steps"]] == [12.5, 300.0]


def test_kwargs_the_record_cannot_hold_fail_before_anything_is_written(app: Celery, r, prefix) -> None:
    s = shop.build(app, r, prefix)
    with pytest.raises(SagaDataError, match="order_id is of type object") as info:
        s.sequential.delay(order_id=object())
    assert isinstance(info.value, TypeError) and "JSON types" in str(info.value)
    # The error says where: the key path into nested data, and the type.
    with pytest.raises(SagaDataError, match=r"items\[1\]\.price is of type complex"):
        s.sequential.delay(order_id=1, items=[{"price": 1}, {"price": 2j}])
    with pytest.raises(SagaDataError, match="order_id is of type float nan"):
        s.sequential.delay(order_id=float("nan"))
    assert _saga_keys(r, prefix) == []
    assert r.llen(app.conf.task_default_queue) == 0


def test_unreachable_store_raises_with_the_password_masked_and_publishes_nothing(app: Celery, r, prefix) -> None:
    s = shop.build(app, r, prefix)
    app.conf.saga_redis_url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    with pytest.raises(SagaStoreUnavailable) as info:
        s.sequential.delay(order_id=1)
    assert "s3cret" not in str(info.value) and "**" in str(info.value)
    assert r.llen(app.conf.task_default_queue) == 0


def test_failed_publish_marks_the_saga_failed_and_releases_its_key(
    app: Celery, redis_url: str, ns: str, r, prefix, worker
) -> None:
    # Given an app whose broker is down but whose saga store is up
    broken = Celery(f"broken_{ns}", broker=f"redis://127.0.0.1:{free_port()}/0", set_as_current=False)
    configure(broken, ns)
    broken.conf.update(saga_redis_url=redis_url, task_publish_retry=False, broker_connection_max_retries=1)
    b = shop.build(broken, r, prefix)
    with pytest.raises(Exception) as info:
        b.sequential.apply_async(kwargs={"order_id": 1}, idempotency_key="retry-me")
    assert not isinstance(info.value, SagaStoreUnavailable)
    # Not index shards, not the stored definition
    (record,) = [k for k in saga_keys(r, prefix) if not k.startswith((f"{prefix}:{{s", f"{prefix}:{{plan:"))]
    saga_id = record[len(prefix) + 2 : -1]
    state = store_for(broken).state(saga_id)
    assert state.status is SagaStatus.FAILED and "publish failed" in (state.error or "")
    # Nothing ran, so it is no dead letter: it expires and is listed nowhere.
    assert r.pttl(record) > 0
    assert all(saga_id not in store_for(broken).list_ids(status) for status in SagaStatus)
    broken.close()
    # When the caller retries with the same key on a working broker, a fresh saga runs.
    s = shop.build(app, r, prefix)
    with worker():
        res = s.sequential.apply_async(kwargs={"order_id": 1}, idempotency_key="retry-me")
        assert res.id == saga_id
        assert res.get(timeout=patience(20))["tracking"] == "t-1"


def test_unknown_saga_id_raises_not_found(app: Celery) -> None:
    res = SagaResult("no-such-saga", app=app)
    with pytest.raises(SagaNotFound, match="not found or expired"):
        _ = res.status
    with pytest.raises(SagaNotFound):
        res.state()
    with pytest.raises(SagaNotFound):
        res.get(timeout=patience(1))


def test_finished_sagas_expire_after_retention_and_are_indexed(app: Celery, r, prefix, worker) -> None:
    app.conf.saga_retention = 2
    s = shop.build(app, r, prefix)
    with worker():
        res = s.sequential.delay(order_id=1)
        res.get(timeout=patience(20))
    store = store_for(app)
    assert res.id in store.list_ids(SagaStatus.COMPLETED, name="order_seq")
    assert res.id not in store.list_ids(SagaStatus.RUNNING)
    assert res.id not in store.list_ids(SagaStatus.PENDING)
    assert 0 < r.pttl(f"{prefix}:{{{res.id}}}") <= 2000
    wait_for(lambda: not r.exists(f"{prefix}:{{{res.id}}}"), timeout=10, what="the record to expire")
    with pytest.raises(SagaNotFound):
        _ = res.status


def test_status_indexes_follow_the_saga_without_a_scan(app: Celery, r, prefix, worker) -> None:
    s = shop.build(app, r, prefix)
    store = store_for(app)
    res = s.sequential.delay(order_id=1, gates=["validate"])
    assert store.list_ids(SagaStatus.PENDING, name="order_seq") == [res.id]
    with worker():
        s.gates.wait_entered("validate")
        # The first step is still running: the saga is listed as RUNNING, not PENDING.
        assert store.list_ids(SagaStatus.RUNNING) == [res.id]
        assert store.list_ids(SagaStatus.PENDING) == []
        s.gates.open("validate")
        res.get(timeout=patience(20))
    assert store.list_ids(SagaStatus.RUNNING) == []
    assert store.list_ids(SagaStatus.COMPLETED, name="order_seq") == [res.id]
    assert store.counts()["order_seq"]["COMPLETED"] == 1


def test_scripts_forgotten_by_redis_are_loaded_again(app: Celery, r, prefix, worker) -> None:

    from celery_saga.redis_server import RedisServer

    with RedisServer() as store_server:
        app.conf.saga_redis_url = store_server.url
        s = shop.build(app, r, prefix)
        private = redis.Redis.from_url(store_server.url)
        with worker():
            s.sequential.delay(order_id=1).get(timeout=patience(20))
            # Given Redis forgot its scripts (a restart), then learnt only the
            # transitions again, so a pipelined start finds one of two missing
            private.script_flush()
            private.script_load(transitions_source())
            # Then starts and steps still work, and nothing runs twice
            res = s.sequential.delay(order_id=2)
            assert res.get(timeout=patience(20))["tracking"] == "t-2"
        assert res.state().step("shop.validate").attempts == 1
        private.close()


def test_a_step_that_never_ran_has_one_name_everywhere(app: Celery, r, prefix) -> None:
    from celery_saga.views import render_timeline, state_json
    from celery_saga.web.timeline import bars, details

    # Given a saga no worker picked up: its later steps never ran
    s = shop.build(app, r, prefix)
    state = s.sequential.delay(order_id=1).state()
    # Then JSON, the CLI's timeline, the web's timeline bars and its step table all call them WAITING
    assert [x["status"] for x in state_json(state)["steps"]][1:] == ["WAITING"] * 3
    text_rows = [line.split() for line in render_timeline(state).splitlines()[2:]]
    assert [row[2] for row in text_rows][1:] == ["WAITING"] * 3
    assert [b.status for b in bars(state)[0]][1:] == ["WAITING"] * 3
    assert [d.status for d in details(state)][1:] == ["WAITING"] * 3
