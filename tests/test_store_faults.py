"""What the saga store's Redis does to sagas: full memory, a read-only primary, lost writes, resets, warnings.

Each test runs its saga store on a ``redis-server`` of its own (the broker
stays the shared Redis), so it can fill, demote or restart it. The
least-privilege ACL is tested in ``test_acl.py``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from celery_saga import (
    Saga,
    SagaDefinitionError,
    SagaNotFound,
    SagaStatus,
    SagaStoreUnavailable,
    StepStatus,
    saga_stats,
    step,
)
from celery_saga.redis_server import PRIVATE_SERVER_KEY, RedisServer, free_port
from celery_saga.store.keys import Keys
from celery_saga.store.redis import RedisSagaStore
from celery_saga.stores import store_for
from tests import shop as shop_module
from tests import timed_shop
from tests.deployments import SentinelGroup
from tests.helpers import Ledger, finished, wait_for


@pytest.fixture
def store_server(app: Celery) -> Iterator[RedisServer]:
    """A private Redis for the test's saga store."""
    with RedisServer() as server:
        app.conf.saga_redis_url = server.url
        yield server


def _client(server: RedisServer) -> redis.Redis:
    return redis.Redis(port=server.port, password=server.password, decode_responses=True)


def _refused(client: redis.Redis) -> int:
    """Calls the server has answered with an error so far (inside scripts too)."""
    return int(client.info("stats").get("total_error_replies", 0))


def _fill_memory(admin: redis.Redis) -> None:
    # One byte: every write is refused. A limit just under used_memory is
    # passed again as soon as client buffers drain (CI saw it let a start through).
    admin.config_set("maxmemory", 1)


def _lift_memory(admin: redis.Redis) -> None:
    admin.config_set("maxmemory", 0)


def _demote(admin: redis.Redis) -> None:
    # A replica of a primary that is not there keeps its data and refuses writes.
    admin.replicaof("127.0.0.1", free_port())


def _promote(admin: redis.Redis) -> None:
    admin.replicaof("NO", "ONE")


@pytest.mark.parametrize(
    ("fault", "repair", "named"),
    [(_fill_memory, _lift_memory, "maxmemory"), (_demote, _promote, "read only")],
    ids=["full-memory", "read-only-primary"],
)
def test_sagas_finish_through_a_store_that_refuses_writes(
    app: Celery,
    store_server: RedisServer,
    r: redis.Redis,
    prefix: str,
    ledger: Ledger,
    worker: Any,
    fault: Callable[[redis.Redis], None],
    repair: Callable[[redis.Redis], None],
    named: str,
) -> None:
    s = shop_module.build(app, r, prefix)
    admin = _client(store_server)
    with worker(concurrency=4):
        results = [s.sequential.delay(order_id=i) for i in range(10)]
        # When the store starts refusing writes mid-run
        fault(admin)
        # Then a start is refused as the store being unavailable, naming why
        with pytest.raises(SagaStoreUnavailable, match=named):
            s.sequential.delay(order_id=99)
        t0 = time.monotonic()
        wait_for(lambda: _refused(admin) >= 5 or time.monotonic() - t0 > 5, 10, "writes refused")
        # When the store takes writes again
        repair(admin)
        # Then every saga finishes, and each step ran once
        assert all(finished(res) is SagaStatus.COMPLETED for res in results)
    assert ledger.actions().count("do:shop.ship") == len(results)


def test_a_lost_begin_never_loses_the_steps_effect(
    app: Celery, store_server: RedisServer, r: redis.Redis, prefix: str, ns: str, worker: Any
) -> None:
    shop = timed_shop.build(app, r, prefix)
    keys = Keys(prefix)
    with worker():
        # Given a step running, whose RUNNING mark a failover then drops (back to DISPATCHED)
        recorded = Saga("lost_begin", [shop.reserve, shop.hang]).delay(qty=1, gates=["hang"])
        wait_for(lambda: shop.entered("hang"), 10, "the step to run")
        r_store = _client(store_server)
        r_store.hset(keys.record(recorded.id), "s:timed.hang", "DISPATCHED")
        # When it finishes, its outcome is recorded as if it had begun
        shop.open_gate("hang")
        assert finished(recorded) is SagaStatus.COMPLETED
        assert recorded.state().step("timed.hang").status is StepStatus.COMPLETED

        # Given the same, but its deadline passes first: it is fenced as if it never ran
        fenced = Saga("lost_begin_fenced", [shop.reserve, step(shop.hang, timeout=1)]).delay(qty=1, gates=["hang"])
        wait_for(lambda: shop.entered("hang") == 2, 10, "the step to run")
        r_store.hset(keys.record(fenced.id), "s:timed.hang", "DISPATCHED")
        assert finished(fenced) is SagaStatus.COMPENSATED
        assert fenced.state().step("timed.hang").status is StepStatus.CANCELLED
        # When it finishes after all, its success is late, and compensated in a second round
        shop.open_gate("hang")
        wait_for(
            lambda: (second := fenced.state().step("timed.hang").second_round) and second.status.value == "COMPENSATED",
            10,
            "the late success's second round",
        )
    assert shop.left() == (1 + 1, {f"{recorded.id}:timed.reserve": "1", f"{recorded.id}:timed.hang": "1"})


def test_a_store_reset_is_logged_once_and_get_says_so(
    app: Celery,
    store_server: RedisServer,
    r: redis.Redis,
    prefix: str,
    worker: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    shop = timed_shop.build(app, r, prefix)
    keys = Keys(prefix)
    r_store = _client(store_server)
    with caplog.at_level(logging.INFO, logger="celery_saga"), worker():
        # Given sagas running, held in their first step
        held = [Saga("reset", [step(shop.reserve, timeout=5)]).delay(qty=i, gates=["reserve"]) for i in range(3)]
        wait_for(lambda: shop.entered("reserve") == 3, 10, "the steps to run")
        # When the store loses every record and its epoch, as a restart
        # without persistence does, but keeps the index entries (eviction)
        for res in held:
            r_store.delete(keys.record(res.id))
        r_store.delete(keys.meta())
        for _ in held:
            shop.open_gate("reserve")
        # Then the reset is logged once, each lost saga is reported, get() says so
        wait_for(
            lambda: sum("lost in the reset" in m or "was lost in a reset" in m for m in caplog.messages) >= 3,
            15,
            "every lost saga reported",
        )
        for res in held:
            with pytest.raises(SagaNotFound, match="the saga store was reset") as info:
                res.get(timeout=5)
            assert info.value.reset
        # ... and no sweeper goes on looking at the leftovers: their deadline entries are removed
        wait_for(
            lambda: not any(r_store.zcard(keys.due(n)) for n in range(keys.shards)), 15, "the deadline entries to go"
        )
        # ... and stats counts each lost saga once, though workers, get() and sweepers all met it
        stats = saga_stats(app)
        assert stats.lost_in_reset == len(held) == stats.to_json()["lost_in_reset"]
    assert sum("was reset" in m for m in caplog.messages) == 1


def test_workers_warn_about_a_store_that_can_lose_sagas(
    app: Celery, store_server: RedisServer, r: redis.Redis, prefix: str, worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a store (not celery_saga's own private one) that evicts any key and keeps nothing on disk
    admin = _client(store_server)
    admin.delete(PRIVATE_SERVER_KEY)
    admin.config_set("maxmemory-policy", "allkeys-lru")
    shop_module.build(app, r, prefix)
    with caplog.at_level(logging.WARNING, logger="celery_saga"), worker():
        pass
    # Then the worker says so at start, in its one warning
    (warning,) = [m for m in caplog.messages if "configuration warning" in m]
    assert "maxmemory-policy allkeys-lru" in warning and "keeps nothing on disk" in warning


def test_a_sentinel_broker_is_the_default_store(app: Celery, r: redis.Redis, prefix: str) -> None:
    # Given an app whose broker is Redis under Sentinel, with no saga_redis_url
    with SentinelGroup() as group:
        app.conf.update(saga_redis_url=None, broker_url=group.url, broker_transport_options=group.options)
        s = shop_module.build(app, r, prefix)
        # Then its sagas are kept on the primary Sentinel names
        res = s.sequential.delay(order_id=1)
        with redis.Redis(port=group.primary_port(), decode_responses=True) as primary:
            assert primary.hget(Keys(prefix).record(res.id), "status") == "PENDING"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("amqp://guest:hunter2@127.0.0.1//", "redis://, rediss://, unix://, sentinel://, redis+cluster://"),
        ("sentinel://:hunter2@127.0.0.1:26379", "master_name"),
        ("redis+cluster://:hunter2@", "names no cluster node"),
    ],
)
def test_a_store_url_it_cannot_use_says_which_work_and_masks_the_password(
    app: Celery, r: redis.Redis, prefix: str, url: str, message: str
) -> None:
    app.conf.saga_redis_url = url
    s = shop_module.build(app, r, prefix)
    with pytest.raises(SagaDefinitionError, match=re.escape(message)) as info:
        s.sequential.delay(order_id=1)
    assert "hunter2" not in str(info.value)


def test_transitions_run_as_functions_and_survive_a_server_that_forgot_them(
    app: Celery, store_server: RedisServer, r: redis.Redis, prefix: str, worker: Any
) -> None:
    # Given a saga store on Redis 7, where the transitions load as a function library
    s = shop_module.build(app, r, prefix)
    with worker():
        assert s.sequential.delay(order_id=1).get(timeout=20)["tracking"] == "t-1"
        store = store_for(app)
        assert isinstance(store, RedisSagaStore) and store._functions is True
        with _client(store_server) as admin:
            assert [lib[1] for lib in admin.function_list()] == [store._function]  # [library_name, name, ...]
            # When the server forgets them (a restart without persistence, a FUNCTION FLUSH)
            admin.function_flush()
        # Then the next transitions load them again, and sagas run on
        assert s.sequential.delay(order_id=2).get(timeout=20)["tracking"] == "t-2"
    with _client(store_server) as admin:
        assert [lib[1] for lib in admin.function_list()] == [store._function]  # [library_name, name, ...]
