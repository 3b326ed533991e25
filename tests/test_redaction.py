"""Redacted keys are masked wherever a value can be shown, while the steps still get the real values.

A saga redacting ``card`` and ``token`` runs on a real ``celery worker -E -l
DEBUG`` subprocess (`tests.redact_app`): a step returns a token holding the
card, one calls ``self.retry()`` with the card in its kwargs, one raises
with the card in its message, a compensation gets the card and returns it,
and a wait is rejected with the card in its event data. A canary card
number, new for each run, is then looked for in every output.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import random
import string
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery.exceptions import Retry

from celery_saga import SagaCompensated, StepStatus
from celery_saga.redaction import Redaction
from celery_saga.settings import redact_keys
from celery_saga.views import state_json
from tests import redact_app
from tests.helpers import patience, wait_for
from tests.subprocs import ROOT, Subprocs, proc_env, running
from tests.test_web import get, web_server

TRACED = importlib.util.find_spec("opentelemetry.instrumentation.celery") is not None


@pytest.fixture
def env(redis_url: str, ns: str) -> Iterator[SimpleNamespace]:
    e = proc_env(redis_url, f"sagared-{ns}", f"q-red-{ns}")
    yield e
    with redis.Redis.from_url(redis_url) as client:
        for key in client.scan_iter(match=f"{e.prefix}:*", count=500):
            client.unlink(key)


@pytest.fixture
def shop(env: SimpleNamespace) -> Iterator[SimpleNamespace]:
    s = redact_app.create(env.redis_url, env.prefix, env.queue)
    yield s
    s.app.close()
    s.client.close()


class Events:
    """Every Celery event of the app, captured by a Receiver in a thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.got: list[dict[str, Any]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            receiver = self.app.events.Receiver(conn, handlers={"*": self.got.append})
            with receiver.consumer_context() as (connection, _, _):
                while not self.stopping.is_set():
                    with contextlib.suppress(TimeoutError):
                        connection.drain_events(timeout=0.1)

    def __enter__(self) -> Events:
        self.thread.start()

        # Events go by Redis pub/sub: the receiver hears them only once it has subscribed.
        def heard() -> bool:
            if not self.of("test-ping"):
                with self.app.events.default_dispatcher(hostname="redaction-test") as dispatcher:
                    dispatcher.send("test-ping", uuid="ping")
                self.stopping.wait(0.1)
            return bool(self.of("test-ping"))

        wait_for(heard, 15, "the event receiver to subscribe")
        return self

    def __exit__(self, *_: Any) -> None:
        self.stopping.set()
        self.thread.join(patience(5))

    def of(self, type_: str, uuid: str | None = None) -> list[dict[str, Any]]:
        return [e for e in list(self.got) if e["type"] == type_ and (uuid is None or e.get("uuid") == uuid)]


def _card() -> str:
    # 16 digits: random saga and task ids (hex) never hold it.
    return "4" + "".join(random.choices(string.digits, k=15))


def test_redacted_values_are_masked_in_every_output_while_steps_get_them(
    env: SimpleNamespace, shop: SimpleNamespace, tmp_path: Path, ns: str
) -> None:
    card = _card()
    worker_env = {**env.proc_env, redact_app.ENV_SPANS: "1" if TRACED else "0"}
    with Events(shop.app) as events, running(Subprocs(tmp_path)) as procs:
        # Given a saga whose wait is rejected before the saga gets there (no worker runs yet)
        early = shop.denied.delay(order_id=3, card=card)
        assert early.signal("denied", {"card": card, "pad": "x" * 10_000}) is True
        # ... and a real worker, -E, logging at DEBUG
        args = ["worker", "-E", "-P", "prefork", "-c", "2", "-Q", env.queue, "--without-gossip"]
        args += ["--without-mingle", "--without-heartbeat", "-l", "DEBUG", "-n", f"red-{ns}@%h"]
        _, log_path = procs.celery("worker", args, worker_env, app="tests.redact_app")

        # When a saga returns a token, retries once, and fails with the card in its exception text
        declined = shop.declined.delay(order_id=1, card=card)
        # ... and another's wait is rejected with the card in the event data
        denied = shop.denied.delay(order_id=2, card=card)
        wait_for(
            lambda: denied.state().step("wait:approval").status is StepStatus.DISPATCHED,
            20,
            "the saga to reach its wait",
        )
        assert denied.signal("denied", {"card": card, "pad": "x" * 10_000}) is True
        sagas = (declined, denied, early)
        raised: list[SagaCompensated] = []
        for res in sagas:
            with pytest.raises(SagaCompensated) as info:
                res.get(timeout=patience(30))
            raised.append(info.value)

        # ... and the compensations' runs are reported
        for res in sagas:
            undo = f"{res.id}:red.charge:undo"
            wait_for(lambda undo=undo: events.of("task-succeeded", undo), 15, f"task-succeeded of {undo}")
            wait_for(lambda res=res: events.of("task-saga-compensated", res.id), 15, "task-saga-compensated")
            wait_for(lambda undo=undo: f"Task red.refund[{undo}] succeeded" in log_path.read_text(), 15, "its log")
        # ... and so are the retried copy's, the failure's and the token's
        flaky = f"{declined.id}:red.flaky"
        wait_for(lambda: len(events.of("task-received", flaky)) == 2, 15, "the retried copy's task-received")
        for type_, step in [("task-retried", "flaky"), ("task-failed", "decline"), ("task-succeeded", "tokenize")]:
            wait_for(lambda t=type_, s=step: events.of(t, f"{declined.id}:red.{s}"), 15, f"{type_} of {step}")
        if TRACED:
            wait_for(lambda: sum('"run/red.refund"' in s for s in shop.spans()) >= 3, 15, "the refunds' spans")
        worker_log = log_path.read_text()

        # Then the steps and the compensations got the real card and token
        ledger = shop.ledger()
        assert [e for e in ledger if e[0] == "charge"] == [["charge", card]] * 3
        assert ["tokenize", card] in ledger and ["decline", card] in ledger
        assert [e for e in ledger if e[0] == "flaky"] == [["flaky", card, f"tok-{card}", n] for n in (0, 1)]
        assert sorted(e[:2] for e in ledger if e[0] == "refund") == [["refund", card]] * 3

        # ... the outputs were there to look at
        assert "TaskPool: Apply" in worker_log and "Task red.tokenize" in worker_log  # DEBUG and INFO
        # ... and none of them shows the card or the token
        outputs: dict[str, str] = {}
        # the worker's log, INFO and DEBUG
        outputs.update(_lines("log", worker_log))
        # Celery's events (task-received, -retried, -failed, -succeeded ...) and the task-saga-* events
        for n, e in enumerate(events.got):
            outputs[f"event {n} {e['type']} {e.get('uuid')}"] = json.dumps(e)
        # the exceptions get() raises
        for res, exc in zip(sagas, raised, strict=True):
            outputs[f"get() of {res.id}"] = f"{exc} {exc.error}"
        # the record's JSON
        for res in sagas:
            outputs[f"state_json {res.id}"] = json.dumps(state_json(res.state(), redact_keys(shop.app)))
        # `celery saga show`, as text and as JSON
        cli = [(res.id, *more) for res in sagas for more in ((), ("--json",))]
        with ThreadPoolExecutor(max_workers=3) as pool:
            for a, out in zip(cli, pool.map(lambda a: _show(env.proc_env, *a), cli), strict=True):
                outputs[f"show {' '.join(a)}"] = out
        # the web view's pages and its API
        with web_server(shop.app) as base:
            paths = ["/", "/api/sagas"]
            for res in sagas:
                paths += [f"/saga/{res.id}", f"/api/sagas/{res.id}"]
            for path in paths:
                status, body = get(base + path)
                assert status == 200, (path, body[:300])
                outputs[f"web {path}"] = body
        # every span's attributes, events and status
        spans = shop.spans()
        assert not TRACED or any("card *** declined" in s for s in spans)
        outputs.update(_lines("span", "\n".join(spans)))
        leaked = {k: text[max(0, text.index(card) - 80) :][:200] for k, text in outputs.items() if card in text}
        assert not leaked, "\n".join(f"{k}: ...{v}" for k, v in leaked.items())

        # And the errors shown are masked and capped, like a step's
        for exc in raised:
            assert exc.error is not None and len(exc.error) <= 2000 and "***" in exc.error
        assert "ValueError: card *** declined" in str(raised[0])
        assert '"card": "***"' in str(raised[1]) and '"card": "***"' in str(raised[2])
        assert "ValueError: card *** declined" in outputs[f"show {declined.id}"]
        assert '"card": "***"' in outputs[f"show {declined.id} --json"]


def _lines(what: str, text: str) -> dict[str, str]:
    return {f"{what} line {n}": line for n, line in enumerate(text.splitlines(), 1)}


def _show(env: dict[str, str], saga_id: str, *more: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.redact_app", "saga", "show", saga_id, *more],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=patience(60),
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_an_exception_is_masked_in_place_with_its_causes_or_replaced_if_its_text_is_not_its_args() -> None:
    card = _card()
    # Given the card at some depth of a message's data, under a redacted key, and a short value beside it
    redaction = Redaction.of(frozenset({"card"}), {"order": {"card": {"number": int(card), "cvv": "12"}}})
    assert redaction.secrets == (card,)

    # When a step raises with the card in its message, and in its cause's
    try:
        try:
            raise KeyError(card)
        except KeyError as cause:
            raise ValueError(f"card {card} declined") from cause
    except ValueError as exc:
        raised = exc
    # Then both are masked in place: the traceback Celery formats shows neither
    assert redaction.exception(raised) is raised
    shown = "".join(traceback.format_exception(raised))
    assert card not in shown and "ValueError: card *** declined" in shown and "KeyError: '***'" in shown

    # ... a Retry's message and exc are masked in place, never replaced
    retry = Retry(exc=ValueError(f"card {card}"), when=1)
    assert redaction.exception(retry) is retry and card not in f"{retry} {retry.exc!r}"

    # ... and one whose text is not its args is replaced by its masked text
    class Declined(Exception):
        def __init__(self, number: str) -> None:
            super().__init__("declined")
            self.number = number

        def __str__(self) -> str:
            return f"card {self.number} declined"

    replaced = redaction.exception(Declined(card))
    assert isinstance(replaced, RuntimeError) and str(replaced) == "Declined: card *** declined"
    # ... and a value shown for it has the keys and the values masked
    assert redaction.value({"card": card, "note": f"paid by {card}", "n": int(card), "ok": True}) == {
        "card": "***",
        "note": "paid by ***",
        "n": "***",
        "ok": True,
    }
