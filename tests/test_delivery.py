"""Messages as they really arrive: duplicates, missing or corrupt records, store outages, other services."""

from __future__ import annotations

import json
import logging

import pytest
from celery import Celery

from celery_saga import SagaCompensated, SagaRecordCorrupt, SagaStatus, enable, step
from celery_saga.messages import publish_stage
from celery_saga.redis_server import RedisServer
from celery_saga.saga import Saga
from celery_saga.stores import store_for
from tests import shop
from tests.conftest import configure, running_worker
from tests.helpers import Ledger, patience, wait_for


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in rec.getMessage() for rec in caplog.records)


def test_duplicate_of_a_finished_step_does_not_run_again(
    app: Celery, r, prefix, ledger: Ledger, worker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="celery_saga")
    s = shop.build(app, r, prefix)
    with worker():
        res = s.sequential.apply_async(kwargs={"order_id": 1}, on_complete=s.notify.s(tag="done"))
        res.get(timeout=patience(20))
        wait_for(lambda: r.llen(f"{prefix}:callbacks"), what="on_complete")
        # When a copy of the charge message arrives after the saga ended
        raw = store_for(app).load(res.id)
        spec = s.sequential.plan().step("shop.charge")
        publish_stage(app, res.id, "order_seq", raw["gen"], [spec], {"order_id": 1, "reservation": "r-1"}, first=False)
        wait_for(lambda: _logged(caplog, "'shop.charge' skipped (duplicate)"), what="the copy to be skipped")
    # Then the function did not run again, and nothing was re-sent.
    assert ledger.actions().count("do:shop.charge") == 1
    assert res.status is SagaStatus.COMPLETED
    assert r.llen(f"{prefix}:callbacks") == 1


def test_duplicate_of_a_running_step_is_skipped(
    app: Celery, r, prefix, ledger: Ledger, worker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="celery_saga")
    s = shop.build(app, r, prefix)
    with worker():
        res = s.sequential.delay(order_id=2, gates=["reserve"])
        s.gates.wait_entered("reserve")
        raw = store_for(app).load(res.id)
        spec = s.sequential.plan().step("shop.reserve")
        publish_stage(app, res.id, "order_seq", raw["gen"], [spec], {"order_id": 2, "gates": ["reserve"]}, first=False)
        wait_for(lambda: _logged(caplog, "'shop.reserve' skipped (busy)"), what="the copy to be skipped")
        s.gates.open("reserve")
        res.get(timeout=patience(20))
    assert len(s.gates.entered("reserve")) == 1
    assert res.state().step("shop.reserve").attempts == 1


def test_step_message_without_a_record_is_not_executed_and_the_worker_goes_on(
    app: Celery, r, prefix, ledger: Ledger, worker, caplog: pytest.LogCaptureFixture
) -> None:
    s = shop.build(app, r, prefix)
    spec = s.sequential.plan().step("shop.reserve")
    with worker():
        publish_stage(app, "no-such-saga", "order_seq", "0123456789ab", [spec], {"order_id": 1}, first=False)
        wait_for(lambda: _logged(caplog, "saga no-such-saga: no record"), what="the error")
        assert s.sequential.delay(order_id=3).get(timeout=patience(20))["tracking"] == "t-3"
    message = next(rec.getMessage() for rec in caplog.records if "no-such-saga" in rec.getMessage())
    assert f"prefix {prefix!r}" in message and "saga_key_prefix" in message
    assert ledger.actions()[0] == "do:shop.validate"  # reserve of the missing saga never ran


@pytest.mark.parametrize("damage", ["bad_status", "not_a_hash"])
def test_step_message_with_a_corrupt_record_is_not_executed(
    app: Celery, r, prefix, ledger: Ledger, worker, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    s = shop.build(app, r, prefix)
    res = s.sequential.delay(order_id=1)
    key = f"{prefix}:{{{res.id}}}"
    if damage == "bad_status":
        r.hset(key, "status", "BANANA")
    else:
        r.delete(key)
        r.set(key, "not a hash")
    with worker():
        wait_for(lambda: _logged(caplog, f"saga {res.id}"), what="the error")
        assert s.sequential.delay(order_id=2).get(timeout=patience(20))["order_id"] == 2
    assert [e for e in ledger.entries() if e[2:3] == [1]] == []
    if damage == "bad_status":
        with pytest.raises(SagaRecordCorrupt):
            res.state()


def test_store_outage_in_a_worker_retries_the_step_until_the_store_is_back(
    app: Celery, r, prefix, ledger: Ledger, worker, caplog: pytest.LogCaptureFixture
) -> None:
    store_server = RedisServer(persist=True).start()
    try:
        app.conf.saga_redis_url = store_server.url
        s = shop.build(app, r, prefix)
        res = s.sequential.delay(order_id=5)
        # Given the store goes down before any worker runs the first step
        store_server.stop()
        with worker():
            wait_for(lambda: _logged(caplog, "is unreachable"), what="a retry for the outage")
            assert ledger.actions() == []  # never runs without a record
            # When the store comes back with its data, the saga finishes
            store_server = RedisServer(port=store_server.port, persist=True, dir=store_server.dir).start()
            assert res.get(timeout=patience(40))["tracking"] == "t-5"
        assert ledger.actions().count("do:shop.validate") == 1
    finally:
        store_server.stop()


def test_participant_service_runs_steps_named_by_another_codebase(
    app: Celery, redis_url: str, ns: str, r, prefix, ledger: Ledger, worker
) -> None:
    # The payments service knows nothing of the saga: plain tasks, enabled once.
    payments = Celery(f"payments_{ns}", broker=redis_url, backend=redis_url, set_as_current=False)
    configure(payments, ns)

    @payments.task(shared=False, name="pay.charge")
    def charge(amount: int) -> dict[str, str]:
        r.rpush(f"{prefix}:ledger", json.dumps(["do", "pay.charge", amount, 0]))
        return {"charge_id": "ch-1"}

    @payments.task(shared=False, name="pay.refund")
    def refund(amount: int, step_result: dict[str, str]) -> None:
        r.rpush(f"{prefix}:ledger", json.dumps(["undo", "pay.charge", amount, step_result, 0]))

    @payments.task(shared=False, name="pay.notify")
    def notify(**data: object) -> None:
        raise RuntimeError("mail server down")

    enable(payments)
    # The orchestrator names the steps; it has none of their code.
    saga = Saga(
        "checkout",
        [step("pay.charge", compensate="pay.refund"), step("pay.notify", compensate=None)],
        app=app,
    )
    res = saga.delay(amount=30, customer="c-9")
    with running_worker(payments), pytest.raises(SagaCompensated):
        res.get(timeout=patience(20))
    # Each function received only the data it declares.
    assert ledger.entries()[0][:3] == ["do", "pay.charge", 30]
    # The compensation sees the data of its step's stage, and what the step returned.
    assert ledger.entries()[1][:4] == ["undo", "pay.charge", 30, {"charge_id": "ch-1"}]
    payments.close()
