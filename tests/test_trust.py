"""A message is a claim; the record decides. Forged messages, published to a real worker, change no saga.

Anyone who can publish to the broker can call any registered task with any
headers. These tests publish what such a publisher would (through kombu,
with Celery's ``send_task``, and one raw kombu message) and check that the
victim saga is exactly as it was, the forged task's function never ran,
and each rejection was logged and counted by reason.
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery

import celery_saga
from celery_saga import Saga, SagaRecordCorrupt, SagaResult, SagaStatus, StepStatus, current_step, saga_step
from celery_saga import plan as plan_module
from celery_saga.messages import Headers, MessageRejected, read_headers
from celery_saga.metrics import metrics_text
from celery_saga.store import base as store_base
from celery_saga.stores import store_for
from tests import test_nested
from tests.helpers import Gates, patience, wait_for

WAIT = "wait:approval"


def build(app: Celery, client: redis.Redis, prefix: str) -> SimpleNamespace:
    def log(*entry: Any) -> None:
        client.rpush(f"{prefix}:ledger", json.dumps(list(entry)))

    @app.task(shared=False, name="t.echo")
    def echo(**kwargs: Any) -> dict[str, Any]:
        # An ordinary task, not a step of any saga.
        log("echo", current_step() is not None, kwargs)
        return {"approved": "by echo"}

    @app.task(shared=False, name="t.release")
    def release(order_id: int, step_result: Any = None) -> None:
        log("release", order_id)

    @saga_step(compensate=release)
    @app.task(shared=False, name="t.reserve")
    def reserve(order_id: int) -> dict[str, Any]:
        log("reserve", order_id)
        return {"reservation": f"r-{order_id}"}

    @saga_step(compensate=None)
    @app.task(shared=False, name="t.ship")
    def ship(order_id: int, reservation: str, approved: str = "") -> dict[str, Any]:
        log("ship", order_id, approved)
        return {"tracking": f"t-{order_id}"}

    approval = Saga("t_approval", [reserve, celery_saga.wait_for("approval", timeout=None), ship])

    def ledger() -> list[list[Any]]:
        return [json.loads(x) for x in client.lrange(f"{prefix}:ledger", 0, -1)]

    return SimpleNamespace(app=app, approval=approval, ledger=ledger, echo=echo)


@pytest.fixture
def shop(app: Celery, r: redis.Redis, prefix: str) -> SimpleNamespace:
    return build(app, r, prefix)


def _rejected(app: Celery) -> dict[str, int]:
    counters = store_for(app).counters()
    return {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("rejected:")}


def _waiting(res: SagaResult) -> dict[str, Any]:
    """The saga's record once it waits for its approval: the victim as forged messages find it."""
    wait_for(lambda: res.state().step(WAIT).status is StepStatus.DISPATCHED, 20, "the saga to wait for its approval")
    return store_for(res.app).load(res.id)


def _unchanged(app: Celery, res: SagaResult, before: dict[str, str]) -> None:
    after = store_for(app).load(res.id)
    assert after == before, {
        k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)
    }


def test_a_forged_message_for_an_ordinary_task_cannot_end_a_wait(
    app: Celery, shop: SimpleNamespace, worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with worker(), caplog.at_level(logging.WARNING, logger="celery_saga"):
        # Given a saga waiting for its approval
        res = shop.approval.delay(order_id=7)
        before = _waiting(res)
        victim = {Headers.ID: res.id, Headers.STEP: WAIT, Headers.UNDO: 0, Headers.NAME: "t_approval"}

        # When an ordinary task is sent with the saga's headers: "any generation", then the real one
        shop.app.send_task("t.echo", kwargs={"approved": "forged"}, headers={**victim, Headers.GEN: "*"})
        shop.app.send_task("t.echo", kwargs={"approved": "forged"}, headers={**victim, Headers.GEN: before["gen"]})
        wait_for(lambda: _rejected(app) == {"generation": 1, "task": 1}, 20, "both messages to be rejected")

        # Then the saga is exactly as it was, and the task's function never ran
        _unchanged(app, res, before)
        assert [e for e in shop.ledger() if e[0] == "echo"] == []
        # And each rejection was logged once, naming its reason
        rejections = [m for m in caplog.messages if "was rejected" in m and res.id in m]
        assert len(rejections) == 2 and "(generation)" in rejections[0] and "(task)" in rejections[1]

        # The real approval still completes it, with none of the forged data
        assert res.signal("approval", {"approved": "by the manager"})
        data = res.get(timeout=patience(20))
    assert data["approved"] == "by the manager" and data["tracking"] == "t-7"
    text = metrics_text(app)
    assert 'celery_saga_rejected_messages_total{reason="generation"} 1' in text
    assert 'celery_saga_rejected_messages_total{reason="task"} 1' in text


def test_an_unregistered_task_with_a_sagas_headers_never_fails_it(
    app: Celery, shop: SimpleNamespace, worker: Any
) -> None:
    with worker():
        # Given a saga waiting for its approval
        res = shop.approval.delay(order_id=8)
        before = _waiting(res)

        # When a task no worker has arrives with the saga's own headers, generation included
        headers = {Headers.ID: res.id, Headers.STEP: WAIT, Headers.GEN: before["gen"], Headers.UNDO: 0}
        shop.app.send_task("no.such.task", kwargs={}, headers=headers)
        wait_for(lambda: _rejected(app) == {"task": 1}, 20, "the message to be rejected")

        # Then the saga is not rolled back: its plan names no such task
        _unchanged(app, res, before)
        assert res.signal("approval")
        assert res.get(timeout=patience(20))["tracking"] == "t-8"


def test_a_compensation_message_of_another_task_changes_nothing(
    app: Celery, shop: SimpleNamespace, worker: Any
) -> None:
    with worker():
        # Given a saga waiting for its approval, its reservation made
        res = shop.approval.delay(order_id=9)
        before = _waiting(res)

        # When the reservation's compensation is claimed by the wrong task, in round 1 and in a round it has not
        claim = {Headers.ID: res.id, Headers.STEP: "t.reserve", Headers.GEN: before["gen"], Headers.UNDO: 1}
        shop.app.send_task("t.echo", kwargs={}, headers={**claim, Headers.ROUND: 1})
        shop.app.send_task("t.release", kwargs={"order_id": 9}, headers={**claim, Headers.ROUND: 7})
        wait_for(lambda: _rejected(app) == {"task": 1, "header": 1}, 20, "both messages to be rejected")

        # Then nothing was undone
        _unchanged(app, res, before)
        assert [e for e in shop.ledger() if e[0] in ("echo", "release")] == []


def test_a_malformed_header_never_leaves_a_step_running_without_an_outcome(
    app: Celery, shop: SimpleNamespace, worker: Any
) -> None:
    # Given a saga whose first step is queued, and a copy of its message with a malformed bound-arguments header
    res = shop.approval.delay(order_id=10)
    gen = store_for(app).load(res.id)["gen"]
    headers = {Headers.ID: res.id, Headers.STEP: "t.reserve", Headers.GEN: gen, Headers.UNDO: 0}
    shop.app.send_task("t.reserve", kwargs={"order_id": 10}, headers={**headers, Headers.BOUND: "order_id=1"})

    with worker():
        # When a worker takes both
        wait_for(lambda: _rejected(app) == {"header": 1}, 20, "the malformed copy to be rejected")
        # Then the real message runs the step, once, and the saga goes on to its wait
        wait_for(lambda: res.state().step(WAIT).status is StepStatus.DISPATCHED, 20, "the saga to reach its wait")
    assert [e for e in shop.ledger() if e[0] == "reserve"] == [["reserve", 10]]
    assert res.state().step("t.reserve").status is StepStatus.COMPLETED


def test_a_forged_child_end_cannot_complete_another_parents_step(
    app: Celery, r: redis.Redis, prefix: str, worker: Any
) -> None:
    nested = test_nested.build(app, r, prefix)
    gates = Gates(r, prefix)
    with worker():
        # Given a trip that completed (T2), and a trip whose flight child still runs (T1)
        done = nested.trip.delay(trip="t2")
        done.get(timeout=patience(60))
        victim = nested.trip.delay(trip="t1", gates=["seat"])
        gates.wait_entered("seat")
        store = store_for(app)
        before = store.load(victim.id)

        # When T2's hotel child "ends" for T1, with no generation, and with T1's real one
        for gen in ("", before["gen"]):
            kwargs = {"saga_id": f"{done.id}:hotel", "parent": victim.id, "parent_gen": gen}
            app.send_task("celery_saga.child_ended", kwargs=kwargs)
        wait_for(lambda: _rejected(app) == {"parent": 2}, 20, "both child ends to be rejected")

        # Then T1 is exactly as it was: its flight child still runs
        assert store.load(victim.id) == before
        assert victim.state().step("flight").status is StepStatus.RUNNING
        # And once its own child ends, it completes with its own data, not T2's
        gates.open("seat")
        data = victim.get(timeout=patience(60))
    assert (data["flight"], data["hotel"], data["trip"]) == ("FL-t1", "HO-t1", "t1")
    assert victim.status is SagaStatus.COMPLETED


def test_a_raw_kombu_message_with_headers_of_the_wrong_types_changes_nothing(
    app: Celery, shop: SimpleNamespace, worker: Any
) -> None:
    with worker():
        res = shop.approval.delay(order_id=11)
        before = _waiting(res)
        # When kombu itself publishes Celery's message format with a list for the saga id and a number for the step
        with app.connection_for_write() as conn:
            producer = conn.Producer()
            producer.publish(
                [[], {"approved": "forged"}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
                routing_key=app.conf.task_default_queue,
                headers={
                    "lang": "py",
                    "task": "t.echo",
                    "id": "forged-1",
                    "root_id": "forged-1",
                    "parent_id": None,
                    "group": None,
                    "argsrepr": "()",
                    "kwargsrepr": "{}",
                    "origin": "attacker",
                    Headers.ID: [res.id],
                    Headers.STEP: 3,
                    Headers.GEN: before["gen"],
                },
                serializer="json",
                declare=[app.amqp.queues[app.conf.task_default_queue]],
            )
        wait_for(lambda: _rejected(app) == {"header": 1}, 20, "the message to be rejected")
        _unchanged(app, res, before)
        assert [e for e in shop.ledger() if e[0] == "echo"] == []


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({Headers.GEN: "*"}, "generation"),
        ({Headers.GEN: ""}, "generation"),
        ({Headers.GEN: "0123456789AB"}, "generation"),
        ({Headers.GEN: 123456789012}, "generation"),
        ({Headers.STEP: ""}, "header"),
        ({Headers.STEP: None}, "header"),
        ({Headers.ROUND: 3}, "header"),
        ({Headers.ROUND: True}, "header"),
        ({Headers.UNDO: "yes"}, "header"),
        ({Headers.UNDO: 1.0}, "header"),
        ({Headers.BOUND: ["x"]}, "header"),
        ({Headers.BOUND: {1: "x"}}, "header"),
        ({Headers.PLAN: "../../etc"}, "header"),
        ({Headers.EPOCH: 5}, "header"),
    ],
)
def test_headers_of_the_wrong_type_or_form_are_rejected(headers: dict[str, Any], reason: str) -> None:
    good: dict[str, Any] = {
        Headers.ID: "s-1",
        Headers.STEP: "t.reserve",
        Headers.GEN: "0123456789ab",
        Headers.UNDO: 0,
        Headers.PLAN: "0123456789abcdef",
    }
    assert read_headers(good.get).gen == "0123456789ab"
    with pytest.raises(MessageRejected) as info:
        read_headers({**good, **headers}.get)
    assert info.value.reason == reason


def test_a_record_naming_another_compensation_sends_nothing(
    app: Celery, shop: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any
) -> None:
    with worker():
        # Given a waiting saga whose record was altered to name another task as its reservation's compensation
        res = shop.approval.delay(order_id=12)
        _waiting(res)
        r.hset(f"{prefix}:{{{res.id}}}", "comp:t.reserve", "t.echo")

        # When it is rolled back
        with pytest.raises(SagaRecordCorrupt, match="does not"):
            res.cancel()

    # Then neither that task nor the real compensation was sent
    assert [e for e in shop.ledger() if e[0] in ("echo", "release")] == []


def test_a_definition_that_does_not_hash_to_its_digest_is_not_used(
    app: Celery, shop: SimpleNamespace, r: redis.Redis, prefix: str
) -> None:
    # Given a saga's stored definition, altered to name another compensation
    res = shop.approval.delay(order_id=13)
    store = store_for(app)
    digest = store.load(res.id)["ph"]
    key = f"{prefix}:{{plan:{digest}}}"
    r.set(key, r.get(key).replace('"t.release"', '"t.echo"'))
    # (as a worker that never started such a saga finds it: nothing cached)
    plan_module._PLANS.clear()
    store_base._DEFINITIONS.clear()

    # Then it is refused wherever it would be read
    with pytest.raises(SagaRecordCorrupt, match="does not match its digest"):
        store.plan(digest)
    with pytest.raises(SagaRecordCorrupt):
        res.state()
