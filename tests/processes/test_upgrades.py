"""Deploying a new version of a saga while sagas run (docs/upgrades.md), with real ``celery worker`` processes.

Each version of tests/upgrade_app.py runs in its own processes, as a deploy
runs it: workers, the process that starts sagas, ``celery saga check``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from celery_saga import SagaResult, SagaStatus
from tests.helpers import patience, wait_for
from tests.subprocs import Popen, Subprocs, running

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture
def up(redis_url: str, ns: str, tmp_path: Path) -> Iterator[SimpleNamespace]:
    prefix = f"upgrade-{ns}"
    env = {"UPGRADE_REDIS": redis_url, "UPGRADE_PREFIX": prefix, "UPGRADE_QUEUE": f"q-upgrade-{ns}"}
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with running(Subprocs(tmp_path)) as procs:
        yield SimpleNamespace(env=env, prefix=prefix, client=client, procs=procs, ns=ns)
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.unlink(key)
    client.close()


def version_env(up: SimpleNamespace, version: int) -> dict[str, str]:
    return {**os.environ, **up.env, "UPGRADE_VERSION": str(version), "PYTHONUNBUFFERED": "1"}


def worker(up: SimpleNamespace, version: int) -> Popen:
    args = ["worker", "-P", "prefork", "-c", "2", "-Q", up.env["UPGRADE_QUEUE"], "--without-gossip"]
    args += ["--without-mingle", "-l", "INFO", "-n", f"v{version}-{len(up.procs.procs)}-{up.ns}@%h"]
    label = f"worker-v{version}-{len(up.procs.procs)}"
    proc, _ = up.procs.celery(label, args, version_env(up, version), "tests.upgrade_app")
    return proc


def start(up: SimpleNamespace, version: int, tokens: list[str]) -> list[str]:
    """Start a saga per token with version ``version``'s definition, in a process of that version."""
    code = (
        "import json, sys\nfrom tests.upgrade_app import up_order\n"
        f"print(json.dumps([up_order.delay(token=t).id for t in {tokens!r}]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=version_env(up, version), cwd=ROOT, capture_output=True, text=True, check=True
    )
    return list(json.loads(out.stdout))


def check(up: SimpleNamespace, version: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.upgrade_app", "saga", "check", "--timeout", f"{patience(1.5):g}"],
        env=version_env(up, version),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=patience(60),
    )


def ran(up: SimpleNamespace) -> list[list[object]]:
    return [json.loads(x) for x in up.client.lrange(f"{up.prefix}:ran", 0, -1)]


def release(up: SimpleNamespace, tokens: list[str]) -> None:
    up.client.delete(f"{up.prefix}:hold")
    for token in tokens:
        up.client.rpush(f"{up.prefix}:gate:{token}", 1)


def app_of(up: SimpleNamespace) -> object:
    """A client of the store, any version: records say which plan they run."""
    from celery import Celery

    app = Celery(f"reader-{up.ns}", broker=up.env["UPGRADE_REDIS"], set_as_current=False)
    app.conf.update(saga_key_prefix=up.prefix)
    return app


def test_sagas_in_flight_finish_on_their_plan_while_new_ones_take_the_inserted_step(up: SimpleNamespace) -> None:
    # Given 20 sagas of version 1 (reserve, charge) in flight: two in their reserve, the rest queued
    up.client.set(f"{up.prefix}:hold", 1)
    v1 = worker(up, 1)
    old_tokens = [f"o{i}" for i in range(20)]
    old = start(up, 1, old_tokens)
    reader = app_of(up)
    states = lambda ids: [SagaResult(i, app=reader).state() for i in ids]  # noqa: E731
    wait_for(
        lambda: sum(s.step("up.reserve").status.value == "RUNNING" for s in states(old)) == 2,
        timeout=60,
        what="two reserves in flight",
    )
    # When that worker is stopped (warm: it finishes those two), and version 2, which inserts a fraud
    # check before the charge, is deployed: new sagas start, and a worker of version 2 comes up
    v1.send_signal(signal.SIGTERM)
    for token in old_tokens:  # the two in flight finish; the gates of the rest are taken back below
        up.client.rpush(f"{up.prefix}:gate:{token}", 1)
    assert v1.wait(patience(60)) == 0
    up.client.delete(*[f"{up.prefix}:gate:{t}" for t in old_tokens])
    up.client.set(f"{up.prefix}:hold", 1)
    new_tokens = [f"n{i}" for i in range(5)]
    new = start(up, 2, new_tokens)
    worker(up, 2)

    # Then check lists both plans: the old one with its sagas still running (those the old worker took
    # past their reserve as it stopped may have finished on the new one already), the current one with the 5 new
    wait_for(lambda: check(up, 2).returncode == 0, timeout=60, what="check to find the version 2 worker")
    listed = check(up, 2).stdout
    old_count = re.search(r"(\d+) running saga\(s\) of up_order \(plan \w+, since ", listed)
    assert old_count is not None and 10 <= int(old_count.group(1)) <= 20, listed
    assert "5 running saga(s) of up_order (current plan " in listed, listed

    # When they are let go
    release(up, old_tokens + new_tokens)
    wait_for(lambda: all(s.status is SagaStatus.COMPLETED for s in states(old + new)), timeout=120, what="all done")

    # Then each old saga ran its own plan (no fraud check; the charge's new parameter took its default),
    # and each new saga the new one
    steps = {}
    for entry in ran(up):
        steps.setdefault(entry[1], []).append(entry[0] if entry[0] != "charge" else f"charge:{entry[2]}")
    assert all(steps[t] == ["reserve", "charge:0"] for t in old_tokens), steps
    assert all(steps[t] == ["reserve", "check_fraud", "charge:1"] for t in new_tokens), steps
    # And check no longer lists the old plan: it has drained
    drained = check(up, 2)
    assert drained.returncode == 0 and "running saga(s)" not in drained.stdout


def test_check_fails_while_a_running_saga_needs_a_task_no_worker_has_and_that_step_fails_at_once(
    up: SimpleNamespace,
) -> None:
    # Given a saga of version 2 started, and version 3 (which dropped up.charge) deployed: its worker only
    up.client.set(f"{up.prefix}:hold", 1)
    (saga_id,) = start(up, 2, ["s0"])
    worker(up, 3)
    # Then check exits 1, naming the plan, its count and the task no worker has
    wait_for(lambda: check(up, 3).returncode != 69, timeout=60, what="check to find the version 3 worker")
    result = check(up, 3)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 running saga(s) of up_order (plan " in result.stdout
    assert "need up.charge, which no worker has" in result.stdout
    assert "1 running saga(s) need a task no worker has" in result.stderr
    # And when the saga reaches that step anyway, the step fails at once and the saga is rolled back
    release(up, ["s0"])
    res = SagaResult(saga_id, app=app_of(up))
    wait_for(lambda: res.status.finished, timeout=60, what="the saga to end")
    state = res.state()
    assert state.status is SagaStatus.COMPENSATED and state.failed_step == "up.charge"
    assert [e[0] for e in ran(up)] == ["reserve", "check_fraud", "undo", "undo"]
