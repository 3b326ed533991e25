"""Sagas on the Celery apps people already have: shared tasks, pickle, kombu's JSON types, typos, callbacks."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from datetime import date, datetime, time
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery, signals
from celery.exceptions import TimeoutError as CeleryTimeoutError

from celery_saga import (
    CompensationStatus,
    Saga,
    SagaCompensated,
    SagaFailed,
    enable,
    saga_step,
    step,
)
from celery_saga.testing import thread_worker
from celery_saga.views import saga_text, state_json
from tests import shop
from tests.helpers import Ledger, patience, wait_for
from tests.subprocs import Subprocs, running, worker_args

ROOT = Path(__file__).resolve().parent.parent


# -- @shared_task, the Django way ------------------------------------------------------


@pytest.fixture
def django_env(redis_url: str, ns: str, r: redis.Redis) -> Iterator[dict[str, str]]:
    prefix = f"sagatest-{ns}"
    env = {**_clean_env(), "DJ_REDIS_URL": redis_url, "DJ_PREFIX": prefix, "DJ_QUEUE": f"q-{ns}"}
    yield env
    for key in r.scan_iter(match=f"{prefix}:*", count=500):
        r.unlink(key)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "REDIS_URL"))}


def test_a_saga_of_shared_tasks_in_a_module_autodiscovery_imports(
    django_env: dict[str, str], tmp_path: Path, r: redis.Redis, ns: str
) -> None:
    # Given a project whose tasks module only uses @shared_task and is
    # imported by the app's autodiscovery, and a worker of that app
    procs = Subprocs(tmp_path)
    with running(procs):
        args = worker_args(django_env["DJ_QUEUE"], f"dj-{ns}@%h")
        procs.celery("worker", args, django_env, app="tests.django_style.proj")
        # When a process that imported the project (as Django does at start) places orders
        client = textwrap.dedent(
            """
            import json
            import tests.django_style.proj  # noqa: F401 - makes the project's app the current one
            from celery_saga import SagaCompensated
            from tests.django_style.shop.tasks import place_order
            done = place_order.delay(order_id=1).get(timeout=60 * {scale})
            try:
                place_order.delay(order_id=2, fail=True).get(timeout=60 * {scale})
            except SagaCompensated as exc:
                print(json.dumps([done, exc.step, exc.reason]))
            """
        ).format(scale=patience(1))
        out = subprocess.run(
            [sys.executable, "-c", client],
            cwd=ROOT,
            env=django_env,
            capture_output=True,
            text=True,
            timeout=patience(120),
        )
        assert out.returncode == 0, out.stderr + procs.logs()
    done, failed_step, reason = json.loads(out.stdout.strip().splitlines()[-1])
    # Then the first completes, and the second is rolled back by its shared-task compensation
    assert done == {"order_id": 1, "reservation": "r-1", "tracking": "t-1"}
    assert (failed_step, reason) == ("tests.django_style.shop.tasks.ship", "failure")
    ledger = Ledger(r, f"{django_env['DJ_PREFIX']}:ledger")
    assert [e[:2] for e in ledger.entries()] == [
        ["do", "reserve"],
        ["do", "ship"],
        ["do", "reserve"],
        ["undo", "tests.django_style.shop.tasks.reserve"],
    ]
    assert ledger.entries()[-1][2] == {"reservation": "r-2"}


# -- serializers and types -----------------------------------------------------------------


def test_an_app_that_accepts_only_pickle_completes_and_compensates_sagas(
    app: Celery, r, prefix, ledger: Ledger, worker
) -> None:
    # Given an app whose workers accept pickle only: a JSON message would be refused
    app.conf.update(accept_content=["pickle"], task_serializer="pickle", result_serializer="pickle")
    s = shop.build(app, r, prefix)
    with worker():
        assert s.sequential.delay(order_id=1).get(timeout=patience(20))["tracking"] == "t-1"
        with pytest.raises(SagaCompensated):
            s.sequential.delay(order_id=2, fail={"ship": "no carrier"}).get(timeout=patience(20))
    assert [a for a in ledger.actions() if a.startswith("undo")] == ["undo:shop.charge", "undo:shop.reserve"]


def _type_names(value: dict[str, Any]) -> dict[str, str]:
    return {k: type(v).__name__ for k, v in value.items()}


@pytest.fixture
def typed(app: Celery, r: redis.Redis, prefix: str) -> SimpleNamespace:
    """Steps whose arguments and results are kombu's JSON types; each records the types it received."""
    seen = f"{prefix}:seen"

    def record(what: str, values: dict[str, Any]) -> None:
        r.rpush(seen, json.dumps([what, _type_names(values)]))

    @app.task(shared=False, name="types.unbook")
    def unbook(when: datetime, amount: Decimal, ref: uuid.UUID, step_result: Any = None) -> None:
        record("unbook", {"when": when, "amount": amount, "ref": ref})
        record("unbook.step_result", step_result)

    @saga_step(compensate=unbook)
    @app.task(shared=False, name="types.book")
    def book(when: datetime, amount: Decimal, ref: uuid.UUID) -> dict[str, Any]:
        record("book", {"when": when, "amount": amount, "ref": ref})
        return {"due": when.date(), "total": amount * 2, "at": time(9, 30)}

    @saga_step(compensate=None)
    @app.task(shared=False, name="types.bill")
    def bill(due: date, total: Decimal, at: time, fail: bool = False) -> None:
        record("bill", {"due": due, "total": total, "at": at})
        if fail:
            raise RuntimeError("billing is down")

    def seen_types() -> dict[str, dict[str, str]]:
        return {what: names for what, names in map(json.loads, r.lrange(seen, 0, -1))}

    return SimpleNamespace(saga=Saga("typed", [book, bill]), seen=seen_types)


def test_the_record_decoder_restores_kombu_types_and_reads_plain_json_alike() -> None:
    from kombu.utils.json import loads as kombu_loads

    from celery_saga import codec

    # Plain JSON takes the fast path; text with a kombu type object takes kombu's
    plain = {"order_id": 7, "items": [{"sku": "A", "qty": 1}], "note": "é \u2603", "ok": True, "none": None}
    typed = {**plain, "at": datetime(2026, 12, 6, 12, 0), "price": Decimal("12.99"), "id": uuid.UUID(int=7)}
    for value in (plain, typed, [plain, typed], "text", 3, None):
        text = codec.dumps(value)
        assert codec.loads(text) == kombu_loads(text) == value
    # A user's own key that merely contains the word is not mistaken for a type
    assert codec.loads(codec.dumps({"__type__": "mine"})) == {"__type__": "mine"}


@pytest.mark.parametrize("serializer", ["json", "pickle"])
def test_kombu_json_types_reach_steps_and_compensations_as_themselves(
    app: Celery, typed, worker, serializer: str
) -> None:
    # The record holds them as kombu's JSON whatever the messages use: with
    # pickle messages, nothing on the way would turn a stored marker back.
    app.conf.update(accept_content=[serializer], task_serializer=serializer)
    ref = uuid.uuid4()
    start = {"when": datetime(2026, 12, 1, 8, 0), "amount": Decimal("19.90"), "ref": ref}
    with worker():
        data = typed.saga.delay(**start).get(timeout=patience(20))
        assert (data["due"], data["total"], data["at"], data["ref"]) == (
            date(2026, 12, 1),
            Decimal("39.80"),
            time(9, 30),
            ref,
        )
        assert typed.seen()["bill"] == {"due": "date", "total": "Decimal", "at": "time"}
        with pytest.raises(SagaCompensated):
            typed.saga.delay(**start, fail=True).get(timeout=patience(20))
    seen = typed.seen()
    assert seen["book"] == seen["unbook"] == {"when": "datetime", "amount": "Decimal", "ref": "UUID"}
    assert seen["unbook.step_result"] == {"due": "date", "total": "Decimal", "at": "time"}


# -- typos ---------------------------------------------------------------------------------


def test_a_misspelled_remote_step_fails_at_once_with_the_reason(app: Celery, r, prefix, ledger: Ledger, worker) -> None:
    # Given a saga whose second step names a task no worker has (a typo)
    s = shop.build(app, r, prefix)
    saga = Saga("typo", [s.reserve, step("m4.stmap", compensate=None)])
    with worker() as w:
        res = saga.delay(order_id=1)
        # Then it is rolled back within seconds, not at the step's 300 s deadline
        with pytest.raises(SagaCompensated) as info:
            res.get(timeout=patience(10))
    reason = f"task 'm4.stmap' is not registered on worker {w.hostname}"
    assert info.value.step == "m4.stmap" and reason in (info.value.error or "")
    assert reason in saga_text(res.state())  # what `celery saga show` prints
    assert ledger.actions() == ["do:shop.reserve", "undo:shop.reserve"]


def test_a_compensation_no_worker_has_counts_as_a_failed_attempt(app: Celery, ns: str) -> None:
    # Given a service whose worker has svc.charge and svc.ship, but not svc.refund
    queue = f"q-{ns}-svc"
    service = Celery(f"svc_{ns}", broker=app.conf.broker_url, set_as_current=False)
    service.conf.update(
        saga_key_prefix=app.conf.saga_key_prefix, worker_hijack_root_logger=False, task_default_queue=queue
    )

    @service.task(name="svc.charge", shared=False)
    def charge(order_id: int) -> dict[str, str]:
        return {"charge": f"c-{order_id}"}

    @service.task(name="svc.ship", shared=False)
    def ship(order_id: int) -> None:
        raise RuntimeError("no carrier")

    enable(service)
    app.conf.update(task_routes={"svc.*": {"queue": queue}}, saga_compensation_max_retries=1)
    saga = Saga(
        "remote_refund", [step("svc.charge", compensate="svc.refund"), step("svc.ship", compensate=None)], app=app
    )
    with thread_worker(service, hostname=f"svc-{ns}@test") as w:
        res = saga.delay(order_id=1)
        # Then each attempt fails at once, and the compensation gives up after its one retry
        with pytest.raises(SagaFailed) as info:
            res.get(timeout=patience(15))
    refund = res.state().step("svc.charge")
    assert (refund.compensation_status, refund.compensation_attempts) == (CompensationStatus.GAVE_UP, 2)
    assert f"task 'svc.refund' is not registered on worker {w.hostname}" in (refund.compensation_error or "")
    assert info.value.gave_up == {"svc.charge": refund.compensation_error}


# -- callbacks, waiting, warnings ----------------------------------------------------------


def test_callbacks_get_the_final_status_and_data_when_they_take_them(app: Celery, r, prefix, worker) -> None:
    s = shop.build(app, r, prefix)
    got = f"{prefix}:got"

    @app.task(shared=False, name="cb.full")
    def full(saga_id: str, status: str, data: dict[str, Any], tag: str = "") -> None:
        r.rpush(got, json.dumps([tag, saga_id, status, data]))

    @app.task(shared=False, name="cb.status_only")
    def status_only(saga_id: str, status: str) -> None:
        r.rpush(got, json.dumps(["status_only", saga_id, status, None]))

    with worker():
        ok = s.sequential.apply_async(kwargs={"order_id": 1}, on_complete=full.s(tag="ok"))
        bad = s.sequential.apply_async(
            kwargs={"order_id": 2, "fail": {"ship": "no"}}, on_failure=status_only.s(), on_complete=s.notify.s()
        )
        wait_for(lambda: r.llen(got) == 2, what="both callbacks")
    calls = {entry[0]: entry[1:] for entry in map(json.loads, r.lrange(got, 0, -1))}
    assert calls["ok"][:2] == [ok.id, "COMPLETED"] and calls["ok"][2]["tracking"] == "t-1"
    assert calls["status_only"][:2] == [bad.id, "COMPENSATED"]


def test_get_on_a_saga_no_worker_picked_up_says_so_and_names_the_queue(app: Celery, r, prefix) -> None:
    s = shop.build(app, r, prefix)
    res = s.sequential.delay(order_id=1)
    with pytest.raises(CeleryTimeoutError, match="no worker has begun its first step") as info:
        res.get(timeout=patience(0.3))
    assert repr(app.conf.task_default_queue) in str(info.value)


def test_configuration_problems_are_one_warning_and_can_be_silenced(
    app: Celery, r, prefix, worker, caplog: pytest.LogCaptureFixture
) -> None:
    # Given two acks_late steps whose deadlines the broker's visibility timeout outlasts
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, "visibility_timeout": 600}
    s = shop.build(app, r, prefix)
    s.reserve.acks_late = s.charge.acks_late = True
    assert s.sequential.plan()  # sagas are found through their registry: keep it
    with caplog.at_level(logging.WARNING, logger="celery_saga"), worker():
        pass
    (warning,) = [rec.getMessage() for rec in caplog.records if rec.name == "celery_saga"]
    assert "saga_config_warnings = False" in warning
    assert "'shop.reserve'" in warning and "'shop.charge'" in warning
    caplog.clear()
    app.conf.saga_config_warnings = False
    with caplog.at_level(logging.WARNING, logger="celery_saga"), worker():
        pass
    assert [rec for rec in caplog.records if rec.name == "celery_saga"] == []


def test_step_and_setting_redact_keys_in_every_message_and_in_show(app: Celery, r, prefix, worker) -> None:
    # Given a key one step redacts (step(..., redact=)) and one the app redacts everywhere
    app.conf.saga_redact_keys = ["api_token"]
    s = shop.build(app, r, prefix)
    saga = Saga("secrets", [s.reserve, step(s.charge, redact=["card"])])
    shown: list[str] = []
    received = f"{prefix}:received"

    def on_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
        if (headers or {}).get("saga_id"):
            shown.append(str(headers.get("kwargsrepr")))

    @app.task(shared=False, name="secrets.undo")
    def undo(card: str, step_result: Any = None) -> None:
        r.rpush(received, card)

    signals.before_task_publish.connect(on_publish, weak=False)
    try:
        saga2 = Saga("secrets_undone", [step(s.validate, compensate=undo, redact=["card"]), s.ship])
        with worker():
            saga.delay(order_id=1, card="4111-1111", api_token="tok-1").get(timeout=patience(20))
            res = saga2.delay(order_id=2, card="4111-2222", api_token="tok-2", fail={"ship": "no"})
            with pytest.raises(SagaCompensated):
                res.get(timeout=patience(20))
    finally:
        signals.before_task_publish.disconnect(on_publish)
    # Then no message of either saga shows them, steps and compensations alike
    assert len(shown) >= 5
    for text in shown:
        assert "4111" not in text and "tok-" not in text and "'card': '***'" in text and "'api_token': '***'" in text
    # ... while the compensation got the real value, and show masks them too
    assert r.lrange(received, 0, -1) == ["4111-2222"]
    doc = json.dumps(state_json(res.state()))
    # (The card number itself: the saga id, a random UUID, may hold "4111".)
    assert "4111-2222" not in doc and "tok-" not in doc


def test_a_saga_of_undecorated_tasks_only_runs_and_rolls_back(app: Celery, r, ledger: Ledger, worker) -> None:
    # Given an app whose tasks carry no @saga_step: the saga names each compensation itself
    @app.task(shared=False, name="plain.book")
    def book(trip: str) -> dict[str, str]:
        r.rpush(ledger.key, json.dumps(["book", trip]))
        return {"booking": f"b-{trip}"}

    @app.task(shared=False, name="plain.unbook")
    def unbook(trip: str, booking: str | None = None, step_result: Any = None) -> None:
        r.rpush(ledger.key, json.dumps(["unbook", step_result]))

    @app.task(shared=False, name="plain.pay")
    def pay(trip: str, booking: str, fail: bool = False) -> None:
        if fail:
            raise RuntimeError("card declined")
        r.rpush(ledger.key, json.dumps(["pay", booking]))

    saga = Saga("plain_trip", [step(book, compensate=unbook), step(pay, compensate=None)])
    with worker():
        # Then its app enabled the saga hooks itself: steps get only their own kwargs ...
        assert saga.delay(trip="rome", note="x").get(timeout=patience(20)) == {
            "trip": "rome",
            "note": "x",
            "booking": "b-rome",
        }
        # ... and a failure rolls back with the compensation the saga named
        with pytest.raises(SagaCompensated):
            saga.delay(trip="oslo", fail=True).get(timeout=patience(20))
    assert [e[0] for e in ledger.entries()] == ["book", "pay", "book", "unbook"]
    assert ledger.entries()[-1][1] == {"booking": "b-oslo"}


def test_saga_messages_show_their_kwargs_cut_at_celerys_limit(app: Celery, r, prefix, worker) -> None:
    # Given a saga started with short data, and one with data far over Celery's 1024-character repr limit
    s = shop.build(app, r, prefix)
    saga = Saga("shown", [s.reserve, s.charge])
    shown: dict[str, tuple[str, str]] = {}

    def on_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
        if (headers or {}).get("saga_id"):
            shown[headers["id"]] = (str(headers.get("argsrepr")), str(headers.get("kwargsrepr")))

    signals.before_task_publish.connect(on_publish, weak=False)
    try:
        with worker():
            short = saga.delay(order_id=1, note="it's")
            long = saga.delay(order_id=2, note="x" * 5000)
            short.get(timeout=patience(20))
            long.get(timeout=patience(20))
    finally:
        signals.before_task_publish.disconnect(on_publish)
    # Then each step message shows its kwargs as Python shows them (what Flower and the logs print) ...
    args, kwargs = shown[f"{short.id}:shop.reserve"]
    assert args == "()" and kwargs == repr({"order_id": 1, "note": "it's"})
    charge = shown[f"{short.id}:shop.charge"][1]
    assert charge.startswith("{'order_id': 1, 'note': \"it's\"") and "'reservation': 'r-1'" in charge
    # ... and a long one is cut at Celery's limit
    kwargs = shown[f"{long.id}:shop.reserve"][1]
    assert len(kwargs) == 1024 and kwargs.startswith("{'order_id': 2, 'note': 'xxx") and kwargs.endswith("x...")


def test_django_settings_reach_the_saga_settings_under_the_celery_namespace(redis_url: str) -> None:
    from types import SimpleNamespace

    from celery_saga.settings import SagaSettings

    # Given settings as a Django settings module holds them, read with namespace="CELERY" (README: Settings)
    django_settings = SimpleNamespace(
        CELERY_BROKER_URL=redis_url,
        CELERY_SAGA_RETENTION=123,
        CELERY_SAGA_KEY_PREFIX="djangoshop",
        CELERY_SAGA_COMPENSATION_MAX_RETRIES=4,
        CELERY_SAGA_ENQUEUE_IN_TRANSITION=False,
    )
    app = Celery("django_names", set_as_current=False)
    app.config_from_object(django_settings, namespace="CELERY")
    # Then each CELERY_SAGA_<NAME> is saga_<name>
    settings = SagaSettings.from_app(app)
    assert (settings.redis_url, settings.retention, settings.key_prefix) == (redis_url, 123.0, "djangoshop")
    assert settings.compensation_max_retries == 4 and settings.enqueue_in_transition is False
