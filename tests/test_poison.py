"""Poison is bounded (issue 20, item 5): what is not a saga record costs a log line, not a loop.

A deadline entry naming a key that is no readable saga record is removed,
and the sweep pass goes on past it; a step message naming one is dropped
after ``saga_store_error_max_retries``, while a refused ACL is retried until
it is fixed; the CLI lists and shows a corrupt record without a traceback.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery, signals

from celery_saga import SagaStatus
from celery_saga.redis_server import RedisServer
from celery_saga.store.keys import Keys
from celery_saga.stores import store_for
from celery_saga.sweeper import sweep
from tests import cli_app, shop
from tests.helpers import patience, store_now, wait_for
from tests.test_acl import saga_user
from tests.test_cli import cli_many


def errors_about(caplog: pytest.LogCaptureFixture, saga_id: str, text: str) -> list[str]:
    return [
        m for rec in caplog.records if rec.levelno >= logging.ERROR and saga_id in (m := rec.getMessage()) and text in m
    ]


# -- the sweeper ---------------------------------------------------------------------------


def _in_the_shard_of(keys: Keys, saga_id: str) -> str:
    """A fresh id in the same deadline-index shard as ``saga_id``: claimed in the same pass, in score order."""
    shard = keys.shard_of(saga_id)
    return next(p for i in itertools.count() if keys.shard_of(p := f"poison-{uuid.uuid4().hex[:6]}-{i}") == shard)


@pytest.mark.parametrize("damage", ["a string", "a list", "a hash of no saga", "a record with no plan"])
def test_a_sweep_pass_goes_on_past_a_deadline_entry_that_is_no_saga_record(
    app: Celery, r: redis.Redis, prefix: str, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    s = shop.build(app, r, prefix)
    store, keys = store_for(app), Keys(prefix)
    hasty = s.sequential.with_deadlines_at_most(0.1)
    # Given a saga (no worker runs) whose first step's deadline has passed
    res, other = hasty.delay(order_id=1), hasty.delay(order_id=2)
    latest = store.watched(other.id)
    assert latest is not None
    wait_for(lambda: store_now(r) > latest, what="the deadlines to pass")
    # ... and, due before it in the same shard, an entry whose key is no saga record
    if damage == "a record with no plan":
        bad = other.id  # a saga whose plan cannot be found once its deadline is acted on
        r.hset(keys.record(bad), "ph", "0" * 16)
    else:
        bad = _in_the_shard_of(keys, res.id)
        if damage == "a string":
            r.set(keys.record(bad), "another app's value")
        elif damage == "a list":
            r.rpush(keys.record(bad), "x")
        else:
            r.hset(keys.record(bad), mapping={"status": "BANANA", "name": "order_seq"})
    r.zadd(keys.due(keys.shard_of(bad)), {bad: 0})

    # When one sweep pass runs (before: it raised at the first, or the entry was kept and logged again and again)
    with caplog.at_level(logging.ERROR, logger="celery_saga"):
        report = sweep(app)
        # Then the real saga's deadline was acted on, in that same pass
        assert res.status in (SagaStatus.COMPENSATING, SagaStatus.COMPENSATED)
        assert res.state().step("shop.validate").stopped_by == "timeout"
        # ... and the entry is gone, logged once
        assert report.dropped == 1 and report.errors == 0
        assert r.zscore(keys.due(keys.shard_of(bad)), bad) is None
        sweep(app)
    assert len(errors_about(caplog, bad, "is removed")) == 1


# -- a step message ------------------------------------------------------------------------


@pytest.fixture
def published() -> Iterator[list[dict[str, Any]]]:
    """The headers of every message this process publishes (the in-process worker's included)."""
    found: list[dict[str, Any]] = []
    lock = threading.Lock()

    def record(headers: dict[str, Any] | None = None, **_: Any) -> None:
        with lock:
            found.append(dict(headers or {}))

    signals.before_task_publish.connect(record, weak=False)
    yield found
    signals.before_task_publish.disconnect(record)


def sent_again(published: list[dict[str, Any]], task_id: str) -> int:
    """The highest ``retries`` of the messages sent with ``task_id``: how many times it was sent again."""
    return max((int(h.get("retries") or 0) for h in list(published) if h.get("id") == task_id), default=0)


def test_a_step_message_whose_saga_key_is_no_record_is_dropped_after_its_retries(
    app: Celery,
    r: redis.Redis,
    prefix: str,
    worker: Any,
    caplog: pytest.LogCaptureFixture,
    published: list[dict[str, Any]],
) -> None:
    app.conf.saga_store_error_max_retries = 2
    s = shop.build(app, r, prefix)
    # Given a step message whose saga id names a key of another type (before: sent again for ever)
    res = s.sequential.delay(order_id=1)
    key = Keys(prefix).record(res.id)
    r.delete(key)
    r.set(key, "another app's value")
    with caplog.at_level(logging.ERROR, logger="celery_saga"), worker():
        # Then it is sent again twice (1 s, then 2 s later), and dropped with an ERROR
        wait_for(lambda: errors_about(caplog, res.id, "dropped after 2 retries"), timeout=8, what="the drop")
        assert sent_again(published, f"{res.id}:shop.validate") == 2
        # ... while the worker goes on with other sagas
        assert s.sequential.delay(order_id=2).get(timeout=patience(20))["tracking"] == "t-2"
    assert len(errors_about(caplog, res.id, "dropped")) == 1
    assert r.get(key) == "another app's value"  # not touched


def test_a_refused_acl_is_retried_past_the_limit_until_it_is_fixed(
    app: Celery, r: redis.Redis, prefix: str, worker: Any, published: list[dict[str, Any]]
) -> None:
    app.conf.saga_store_error_max_retries = 1
    with RedisServer() as server:
        # Given a saga store whose user loses TIME, which every transition needs, once the saga started
        app.conf.saga_redis_url = saga_user(server, prefix)
        s = shop.build(app, r, prefix)
        res = s.sequential.delay(order_id=1)
        saga_user(server, prefix, drop=("time",))
        with worker():
            # Then its first step is sent again past saga_store_error_max_retries (NOPERM is no poison)
            tid = f"{res.id}:shop.validate"
            wait_for(lambda: sent_again(published, tid) >= 2, timeout=8, what="a second retry")
            # ... and once the operator fixes the ACL, the saga finishes
            saga_user(server, prefix)
            assert res.get(timeout=patience(20))["tracking"] == "t-1"


# -- the command line ----------------------------------------------------------------------


@pytest.fixture
def idle(redis_url: str) -> Iterator[SimpleNamespace]:
    with cli_app.idle(redis_url, f"sagapoison-{uuid.uuid4().hex[:10]}") as w:
        yield w


CORRUPTIONS = {
    "packed fields cut short": {"zn": "1", "z1": "9:ab"},
    "a time that is no number": {"created": "yesterday"},
    "a time out of range": {"t0:cli.reserve": "9" * 30},
    "data nested too deep to decode": {"kwargs": "[" * 100_000 + "]" * 100_000},
}


def test_corrupt_records_are_listed_and_shown_without_a_traceback(idle: SimpleNamespace) -> None:
    keys = Keys(idle.prefix)
    good = idle.shop.order.delay(token="good").id
    bad = {}
    for what, fields in CORRUPTIONS.items():
        saga_id = idle.shop.order.delay(token=what).id
        idle.client.hset(keys.record(saga_id), mapping=fields)
        bad[saga_id] = what
    runs = cli_many(idle.env, [["list"], ["list", "--json"], *[["show", saga_id] for saga_id in bad]])
    listing, as_json, shown = runs[0], runs[1], runs[2:]
    # `list` (before: failed on the first) has a "corrupt record" line for the one it cannot read
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[2:] if line.strip()}
    assert "corrupt record" not in rows[good]
    unreadable = [saga_id for saga_id in bad if "corrupt record" in rows.get(saga_id, "")]
    assert unreadable == [next(i for i, w in bad.items() if w == "packed fields cut short")]
    assert "packed fields cannot be read" in rows[unreadable[0]]
    entries = {e["id"]: e for e in json.loads(as_json.stdout)["sagas"]}
    assert entries[unreadable[0]]["corrupt"] is True and "corrupt" not in entries[good]
    # `show` (before: a traceback for most) says in one line that the record is corrupt, and exits 1
    for proc, saga_id in zip(shown, bad, strict=True):
        assert proc.returncode == 1 and proc.stdout == "", (bad[saga_id], proc.stderr)
        assert f"saga record {saga_id} is corrupt" in proc.stderr, (bad[saga_id], proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
