"""Stages pushed by the transition that decides them (`celery_saga.enqueue`), against a real Redis broker.

Who pushed a message is read off MONITOR: a push by the transition is an
LPUSH inside a script (client type "lua"); a publish after it is the
client's own LPUSH. The suite's app has its broker on the store's server and
database, so every other test runs through the pushed path too; these check
the pushes themselves, the fallbacks, and that a pushed message is what
kombu would have sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Exchange, Queue

from celery_saga import Saga, SagaStatus, parallel, saga_step
from celery_saga.messages import publish_stage
from celery_saga.stores import store_for
from tests import shop
from tests.helpers import finished, monitored, patience, wait_for


@dataclass
class Pushes:
    """LPUSHes seen by MONITOR to keys holding ``tag``: by a script, or by a client itself."""

    in_script: list[str] = field(default_factory=list)
    by_client: list[str] = field(default_factory=list)


@contextmanager
def pushes(redis_url: str, tag: str) -> Iterator[Pushes]:
    seen = Pushes()
    with monitored(redis_url) as lines:
        yield seen
    for kind, command in lines:
        words = command.split(" ")
        if words[0].upper() == "LPUSH" and tag in words[1]:
            (seen.in_script if kind == "lua" else seen.by_client).append(words[1])


def queued(r: redis.Redis, key: str) -> list[dict[str, Any]]:
    return [json.loads(m) for m in reversed(r.lrange(key, 0, -1))]


def test_each_stage_is_pushed_by_the_transition_that_decides_it(app: Celery, r, prefix, ns, redis_url, worker) -> None:
    # Given a 4-step saga, its broker on the store's server and database (the default)
    s = shop.build(app, r, prefix)
    with worker(), pushes(redis_url, f"q-{ns}") as seen:
        # When it runs
        res = s.sequential.delay(order_id=7)
        assert finished(res) is SagaStatus.COMPLETED
    # Then the start and each step's done pushed the next stage: no publish after a transition
    assert seen.in_script == [f"q-{ns}"] * 4
    assert seen.by_client == []
    assert res.get(timeout=patience(5))["tracking"] == "t-7"


def test_a_stage_after_a_parallel_one_and_a_disabled_app_are_published_after_the_transition(
    app: Celery, r, prefix, ns, redis_url, worker
) -> None:
    # Given a saga whose last stage runs two steps side by side, then one more
    s = shop.build(app, r, prefix)
    saga = Saga("fan", [s.reserve, parallel(s.charge, s.ship), s.receipt])
    with worker(), pushes(redis_url, f"q-{ns}") as seen:
        res = saga.delay(order_id=1)
        assert finished(res) is SagaStatus.COMPLETED
    # Then the stages a lone step decided were pushed (the start: reserve; reserve's done: charge and ship);
    # the one after the join was published after it, with the data of both siblings
    assert len(seen.in_script) == 3 and len(seen.by_client) == 1
    assert {"payment", "tracking", "reservation"} <= set(res.get(timeout=patience(5)))

    # And with saga_enqueue_in_transition = False nothing is pushed by a transition
    app.conf.saga_enqueue_in_transition = False
    with worker(), pushes(redis_url, f"q-{ns}") as seen:
        res = s.sequential.delay(order_id=2)
        assert finished(res) is SagaStatus.COMPLETED
    assert seen.in_script == [] and len(seen.by_client) == 4


def _normalised(raw: str) -> tuple[str, dict[str, Any]]:
    """A message as kombu stored it, with what differs between two sends of it (its tag, its expiry) blanked."""
    msg = json.loads(raw)
    tag, expires = msg["properties"]["delivery_tag"], msg["headers"].get("expires")
    text = raw.replace(tag, "TAG")
    if expires:
        text = text.replace(expires, "EXPIRES")
    return text, msg


def test_a_pushed_message_is_byte_for_byte_what_kombu_sends(app: Celery, r, prefix, ns) -> None:
    # Given a saga whose first step goes out with priority 5, and no worker
    s = shop.build(app, r, prefix)
    saga = Saga("prio", [s.reserve.s().set(priority=5), s.charge])
    res = saga.delay(order_id=3, note="x" * 200)
    # Then the start pushed it where kombu's Redis transport puts priority 5: the queue's "3" bucket
    bucket = f"q-{ns}\x06\x163"
    assert r.llen(f"q-{ns}") == 0 and r.llen(bucket) == 1

    # When the same stage is published by kombu itself, as it was before the transition pushed it
    store = store_for(app)
    raw = store.load(res.id)
    plan = store.plan(raw["ph"])
    publish_stage(
        app, res.id, "prio", raw["gen"], plan.stages[0], {"order_id": 3, "note": "x" * 200}, True,
        plan.redacted_keys, store.epoch(), plan=raw["ph"],
    )  # fmt: skip
    # Then both are in the same list, and equal byte for byte but for the delivery tag and the expiry time
    pushed, sent = r.lrange(bucket, 0, -1)[::-1]
    (a, msg_a), (b, _) = _normalised(pushed), _normalised(sent)
    assert a == b
    assert msg_a["properties"]["priority"] == 5 and msg_a["headers"]["task"] == "shop.reserve"


def test_a_direct_exchange_routes_by_its_bindings_and_a_topic_exchange_is_published_after(
    app: Celery, r, prefix, ns, redis_url
) -> None:
    # Given queues bound to a direct exchange and a topic exchange of their own
    direct, topic = Exchange(f"x-{ns}", type="direct"), Exchange(f"t-{ns}", type="topic")
    app.conf.task_queues = [
        Queue(f"q-{ns}", routing_key=f"q-{ns}"),
        Queue(f"q-{ns}-d", direct, routing_key=f"rk-{ns}"),
        Queue(f"q-{ns}-t", topic, routing_key=f"orders.{ns}.#"),
    ]
    with app.connection_for_write() as conn:
        for queue in app.conf.task_queues:  # as a worker consuming them would
            queue.bind(conn.default_channel).declare()
    s = shop.build(app, r, prefix)
    to_direct = s.reserve.s().set(exchange=f"x-{ns}", routing_key=f"rk-{ns}")
    to_topic = s.reserve.s().set(queue=f"q-{ns}-t")  # Celery declares its exchange, as a topic, first
    with pushes(redis_url, f"q-{ns}") as seen:
        Saga("direct", [to_direct, s.charge]).delay(order_id=1)
        wait_for(lambda: r.llen(f"q-{ns}-d"), what="the direct exchange's message")
    # Then the start pushed it to the queue the binding names
    assert seen.in_script == [f"q-{ns}-d"] and seen.by_client == []

    with pushes(redis_url, f"q-{ns}") as seen:
        Saga("topic", [to_topic, s.charge]).delay(order_id=2)
        wait_for(lambda: r.llen(f"q-{ns}-t"), what="the topic exchange's message")
    # And a topic exchange's message was published after the start, by kombu
    assert seen.in_script == [] and seen.by_client == [f"q-{ns}-t"]


def test_a_broker_on_another_database_is_published_to_after_the_transition(redis_url: str, ns: str, r, worker) -> None:
    from tests.conftest import configure

    base = redis_url.rsplit("/", 1)[0]
    app = Celery(f"other_{ns}", broker=f"{base}/10", set_as_current=False)
    configure(app, ns)
    app.conf.saga_redis_url = redis_url
    other = redis.Redis.from_url(f"{base}/10")
    try:
        s = shop.build(app, r, str(app.conf.saga_key_prefix))
        with pushes(f"{base}/10", f"q-{ns}") as seen:
            s.sequential.delay(order_id=1)
            wait_for(lambda: other.llen(f"q-{ns}"), what="the first stage on the broker's database")
        assert seen.in_script == [] and seen.by_client == [f"q-{ns}"]
        from celery_saga.testing import thread_worker

        with thread_worker(app, concurrency=2):
            res = s.sequential.delay(order_id=2)
            assert finished(res) is SagaStatus.COMPLETED
    finally:
        for key in other.scan_iter(match=f"q-{ns}*"):
            other.unlink(key)
        other.close()
        app.close()
        with redis.Redis.from_url(redis_url) as client:
            for key in client.scan_iter(match=f"{app.conf.saga_key_prefix}:*"):
                client.unlink(key)


@pytest.mark.parametrize("wrong", ["nothing", "stage", "data"])
def test_messages_for_another_stage_or_other_data_are_not_pushed(app: Celery, r, prefix, ns, wrong: str) -> None:
    import hashlib

    from celery_saga.enqueue import Prebuilt
    from celery_saga.store import Op, Outcome

    # Given a started saga whose first step began (no worker: the test is the worker)
    s = shop.build(app, r, prefix)
    res = Saga("chk", [s.reserve, s.charge]).delay(order_id=1)
    r.delete(f"q-{ns}")
    store = store_for(app)
    raw = store.load(res.id)
    begun = store.apply(Op.BEGIN, res.id, raw["gen"], "chk", "shop.reserve", "0", "", raw["ph"], "", "1", first=True)
    assert begun.outcome is Outcome.RUN and begun.stage_data == '[{"order_id": 1}]'
    result = '{"reservation":"r-1"}'
    parts = '[{"order_id": 1},{"reservation":"forged"}]' if wrong == "data" else f'[{{"order_id": 1}},{result}]'
    stage = 2 if wrong == "stage" else 1
    built = Prebuilt(stage, hashlib.sha1(parts.encode()).hexdigest(), ("q", f"q-{ns}", "", "", "", '{"built": 1}'))
    # When its done carries messages for that stage with the record's data, or for another stage, or other data
    t = store.apply(Op.DONE, res.id, raw["gen"], "chk", "shop.reserve", result, messages=built.args)
    assert t.outcome is Outcome.NEXT_STAGE
    if wrong == "nothing":
        # Then the transition pushed them, and its reply needs no data
        assert t.enqueued and t.data is None
        assert r.lrange(f"q-{ns}", 0, -1) == ['{"built": 1}']
    else:
        # Then it pushed nothing: its caller publishes the stage, with the record's data
        assert not t.enqueued
        assert t.data == {"order_id": 1, "reservation": "r-1"}
        assert r.llen(f"q-{ns}") == 0


def test_a_refused_push_leaves_the_publish_to_the_caller(app: Celery, r, prefix, ns, worker) -> None:
    # Given a queue key that is not a list (LPUSH fails inside the script: WRONGTYPE)
    s = shop.build(app, r, prefix)
    r.set(f"q-{ns}-bad", "x")

    @saga_step(compensate=None)
    @app.task(shared=False, name="enq.first")
    def first(order_id: int) -> dict[str, Any]:
        return {"first": True}

    saga = Saga("refused", [first, s.charge.s().set(queue=f"q-{ns}-bad")])
    with worker():
        res = saga.delay(order_id=1, reservation="r")
        # Then the done recorded its outcome, and its publish after it failed as kombu's would
        wait_for(lambda: res.state().step("enq.first").status.value == "COMPLETED", what="the first step's done")
    assert r.get(f"q-{ns}-bad") == "x"
    assert res.state().step("shop.charge").status.value == "DISPATCHED"


def test_a_broker_that_did_not_answer_is_tried_again_later(ns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from celery_saga import enqueue
    from celery_saga.redis_server import RedisServer, free_port

    # Given an app whose broker (and store) is down when its first stage is to be built
    monkeypatch.setattr(enqueue, "RETRY_CONNECT_AFTER", 0.0)  # (30 s in production)
    port = free_port()
    app = Celery(f"late_{ns}", broker=f"redis://127.0.0.1:{port}/0", set_as_current=False)
    store = store_for(app)
    # Then there is no Enqueuer for now: its stages would be published after the transition
    assert enqueue.enqueuer(app, store) is None
    # When the broker comes up, once the retry delay has passed
    with RedisServer(port=port):
        # Then the next stage to build finds it, and stages are pushed by their transitions again
        assert wait_for(lambda: enqueue.enqueuer(app, store), timeout=15, what="an Enqueuer") is not None
    app.close()
