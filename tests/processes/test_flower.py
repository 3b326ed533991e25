"""Flower sees sagas: a real `flower` process and a `celery worker -E` subprocess.

Both run ``tests.proc_app`` with the same environment, so they read the same
conf: the same Redis, and the same kombu ``global_keyprefix``, which decides
where the ``celeryev`` fanout exchange that carries the events lives. Only
Flower gets ``FLOWER_UNAUTHENTICATED_API=true``, so its HTTP API answers
without auth; it listens on 127.0.0.1 only, on a port it picks itself.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from celery_saga import SagaCompensated
from tests import subprocs
from tests.helpers import patience
from tests.subprocs import ROOT, Subprocs

# Flower 2.2 logs "Visit me at http://127.0.0.1:<port>" once it listens.
_LISTENING = re.compile(r"Visit me at http://127\.0\.0\.1:(\d+)")
# prometheus_client's text format: flower_events_total{worker="w",type="t",task="n"} 1.0
_EVENT_METRIC = re.compile(r"^flower_events_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def poll(fetch: Callable[[], Any], done: Callable[[Any], bool], timeout: float, what: str) -> Any:
    """Call ``fetch`` until ``done`` accepts its value; on timeout, fail showing the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {value!r}"[:4000])
        time.sleep(0.05)


class FlowerAPI:
    """Flower's HTTP API on 127.0.0.1."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: Any) -> tuple[int, bytes]:
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=patience(5)) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read()
        except (urllib.error.URLError, ConnectionError):
            return 0, b""

    def json(self, path: str, **params: Any) -> Any:
        status, body = self.get(path, **params)
        assert status == 200, f"GET {path} {params}: HTTP {status} {body[:500]!r}"
        return json.loads(body)

    def event_counts(self) -> dict[tuple[str, str], float]:
        """``flower_events_total`` from /metrics, summed over workers, by (event type, task name)."""
        status, body = self.get("/metrics")
        assert status == 200, f"GET /metrics: HTTP {status}"
        counts: dict[tuple[str, str], float] = {}
        for m in _EVENT_METRIC.finditer(body.decode()):
            labels = dict(_LABEL.findall(m["labels"]))
            key = (labels["type"], labels["task"])
            counts[key] = counts.get(key, 0.0) + float(m["value"])
        return counts


def _start_flower(procs: Subprocs, env: SimpleNamespace) -> FlowerAPI:
    flower_env = {**env.proc_env, "FLOWER_UNAUTHENTICATED_API": "true"}
    proc, log_path = procs.celery("flower", ["flower", "--port=0", "--address=127.0.0.1"], flower_env)

    def port() -> int | None:
        assert proc.poll() is None, f"flower exited with {proc.returncode}"
        m = _LISTENING.search(log_path.read_text(errors="replace"))
        return int(m[1]) if m else None

    api = FlowerAPI(poll(port, bool, 30, "flower to listen"))
    poll(lambda: api.get("/healthcheck"), lambda v: v == (200, b"OK"), 10, "flower's /healthcheck")
    return api


def _start_worker(procs: Subprocs, env: SimpleNamespace, name: str) -> None:
    # -E for task events (and so, by default, saga events). The heartbeat
    # stays on: Flower learns about workers from worker-online/heartbeat.
    procs.celery("worker", subprocs.worker_args(env.queue, name, "-E"), env.proc_env)


def test_flower_finds_saga_steps_and_compensations_by_saga_id(env, procs, shop, ns) -> None:
    # Given Flower, then a worker with -E, and Flower has seen the worker
    # online, so its event receiver is bound before the saga sends anything.
    api = _start_flower(procs, env)
    _start_worker(procs, env, f"flower-{ns}@%h")
    workers = poll(
        lambda: api.json("/api/workers", status="true"),
        lambda v: any(k.startswith(f"flower-{ns}@") and alive for k, alive in v.items()),
        30,
        "flower to see the worker online",
    )
    hostname = next(k for k in workers if k.startswith(f"flower-{ns}@"))

    # When a saga's last step fails, so the two before it are compensated
    res = shop.sequential.delay(order_id=11, fail={"proc.three": "out of stock"})
    with pytest.raises(SagaCompensated):
        res.get(timeout=patience(30))
    saga_id = res.id

    # Then a search for the saga id finds every step and compensation, with
    # their task names and final states, and the saga's own pseudo-task.
    expected = {
        f"{saga_id}:proc.one": ("proc.one", "SUCCESS"),
        f"{saga_id}:proc.two": ("proc.two", "SUCCESS"),
        f"{saga_id}:proc.three": ("proc.three", "FAILURE"),
        f"{saga_id}:proc.two:undo": ("proc.undo", "SUCCESS"),
        f"{saga_id}:proc.one:undo": ("proc.undo", "SUCCESS"),
    }

    def settled(tasks: dict[str, Any]) -> bool:
        return all(tasks.get(tid, {}).get("state") == state for tid, (_, state) in expected.items()) and (
            tasks.get(saga_id, {}).get("state") == "SAGA-COMPENSATED"
        )

    tasks = poll(lambda: api.json("/api/tasks", search=saga_id), settled, 20, f"flower to know saga {saga_id}")
    # /api/tasks answers a dict keyed by task uuid; each value has "uuid" too.
    assert set(tasks) == {*expected, saga_id}
    for tid, (name, state) in expected.items():
        task = tasks[tid]
        assert (task["uuid"], task["name"], task["state"], task["worker"]) == (tid, name, state, hostname)
        # root_id is the saga id, so Flower's task page links every message to it.
        assert task["root_id"] == saga_id
    assert "out of stock" in tasks[f"{saga_id}:proc.three"]["exception"]

    # The pseudo-task: uuid = saga id, state from the last task-saga-* event.
    info = api.json(f"/api/task/info/{saga_id}")
    # (Flower 2.2 answers as_dict() here: "uuid", not the "task-id" its docs show.)
    assert info["uuid"] == saga_id
    assert info["name"] == "proc_seq"  # listed under the saga's name
    assert info["state"] == "SAGA-COMPENSATED"
    assert info["worker"] == hostname

    # And /metrics counts the task-saga-* events: saga-level ones under the
    # saga's name, step-level ones under the step's task name.
    want = {
        ("task-saga-started", "proc_seq"): 1.0,
        ("task-saga-compensating", "proc_seq"): 1.0,
        ("task-saga-compensated", "proc_seq"): 1.0,
        ("task-saga-step-done", "proc.one"): 1.0,
        ("task-saga-step-done", "proc.two"): 1.0,
    }
    counts = poll(
        api.event_counts,
        lambda c: all(c.get(k) == v for k, v in want.items()),
        10,
        "flower's /metrics to count the task-saga-* events",
    )
    saga_types = {t for t, _ in counts if t.startswith("task-saga-")}
    assert saga_types == {t for t, _ in want}


def test_redacted_keys_never_reach_flower_or_show_while_the_task_gets_them(env, procs, shop, r, ns) -> None:
    # Given Flower watching a worker, and a saga whose payment step redacts card_number
    api = _start_flower(procs, env)
    _start_worker(procs, env, f"secret-{ns}@%h")
    poll(
        lambda: api.json("/api/workers", status="true"),
        lambda v: any(k.startswith(f"secret-{ns}@") and alive for k, alive in v.items()),
        30,
        "flower to see the worker online",
    )
    card = "4111-1111-1111-1111"

    # When the saga runs, and is rolled back after the payment (its compensation gets it too)
    res = shop.secret.delay(order_id=5, card_number=card, fail={"proc.three": "no stock"})
    with pytest.raises(SagaCompensated):
        res.get(timeout=patience(30))

    # Then the payment step received the real number
    assert ["paid", "proc.pay", card] in shop.entries("ledger")
    # ... Flower shows every message of the saga with the number masked, in every field
    expected = {f"{res.id}:{name}" for name in ("proc.one", "proc.pay", "proc.three", "proc.pay:undo", "proc.one:undo")}
    tasks = poll(lambda: api.json("/api/tasks", search=res.id), lambda t: expected <= set(t), 20, "flower's tasks")
    assert card not in json.dumps(tasks)
    for tid in expected:
        assert "'card_number': '***'" in tasks[tid]["kwargs"], tasks[tid]
    # ... and so does `celery saga show --json`
    show = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.proc_app", "saga", "show", res.id, "--json"],
        env=env.proc_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert show.returncode == 0, show.stderr
    assert card not in show.stdout
    record = json.loads(show.stdout)
    assert record["kwargs"]["card_number"] == "***" and record["data"]["card_number"] == "***"
