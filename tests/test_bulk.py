"""Bulk actions (`celery_saga.bulk_actions`, ``celery saga retry|purge|cancel`` with filters) on real Redis and workers.

Sagas are brought to their status by applying their transitions directly
(the test is their worker), which makes thousands in seconds; the actions
then run as a user runs them: the CLI as a subprocess, the compensations
they send on an in-process worker.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from celery_saga import BulkReport, SagaStatus, bulk
from celery_saga.store import Op, Outcome
from celery_saga.stores import store_for
from celery_saga.testing import thread_worker
from tests import cli_app
from tests.helpers import patience, wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def world(redis_url: str, ns: str) -> Iterator[SimpleNamespace]:
    prefix, queue = f"bulk-{ns}", f"q-bulk-{ns}"
    s = cli_app.create(redis_url, prefix, queue)
    # Recorded in each saga at its start: one failed compensation attempt makes it FAILED.
    s.app.conf.saga_compensation_max_retries = 0
    s.env = cli_app.cli_env(redis_url, prefix, queue)
    s.prefix, s.queue = prefix, queue
    yield s
    s.app.close()
    with redis.Redis.from_url(redis_url) as client:
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.unlink(key)


def failed(s: SimpleNamespace, n: int, token: str = "t", saga: Any = None, **kwargs: object) -> list[str]:
    """``n`` sagas (cli_order) that ended FAILED: reserve done, the next step failed, reserve's refund gave up."""
    saga = saga or s.order
    second = saga.plan().steps[1].name
    store, ids = store_for(s.app), []
    for i in range(n):
        res = saga.apply_async(kwargs={"token": f"{token}{i}", **kwargs})
        raw = store.load(res.id)
        gen, ph, name = raw["gen"], raw["ph"], saga.name
        steps = [
            (Op.BEGIN, ("cli.reserve", "0", "", ph, ""), {"first": True}),
            (Op.DONE, ("cli.reserve", json.dumps({"reservation": f"r-{token}{i}"})), {}),
            (Op.BEGIN, (second, "0", "", ph, ""), {}),
            (Op.FAIL, (second, "RuntimeError: declined"), {}),
            (Op.COMP_BEGIN, ("cli.reserve", "0", "", "1", ph, ""), {}),
            (Op.COMP_FAIL, ("cli.reserve", "RuntimeError: refund is down", "1"), {}),
        ]
        for op, args, extra in steps:
            t = store.apply(op, res.id, gen, name, *args, **extra)  # type: ignore[arg-type]
        assert t.outcome is Outcome.GAVE_UP and t.status is SagaStatus.FAILED, t
        ids.append(res.id)
    # The messages those transitions sent: no worker of this test is to run them.
    s.client.delete(f"{s.prefix}:kombu:{s.queue}")
    return ids


def cli(s: SimpleNamespace, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``celery saga ...`` as a subprocess; it prints its peak RSS (KB) last, on stderr."""
    proc = subprocess.run(
        cli_app.measured_cli(*args),
        env=s.env,
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=patience(300),
    )
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    return proc


def peak_mb(proc: subprocess.CompletedProcess[str]) -> float:
    line = next(x for x in proc.stderr.splitlines() if x.startswith("peak-rss-kb"))
    return int(line.split()[1]) / 1024


def compensated(s: SimpleNamespace) -> int:
    return store_for(s.app).counts().get("cli_order", {}).get("COMPENSATED", 0)


def statuses(s: SimpleNamespace, ids: list[str]) -> dict[str, int]:
    store, counts = store_for(s.app), {}
    for i in range(0, len(ids), 500):
        for raw in store.load_many(ids[i : i + 500]):
            status = raw["status"] if raw else "gone"
            counts[status] = counts.get(status, 0) + 1
    return counts


def test_two_thousand_failed_sagas_are_retried_in_one_command_each_undone_once(world: SimpleNamespace) -> None:
    s = world
    # Given 2,000 FAILED sagas of one name (and a FAILED saga of another name, left alone)
    ids = failed(s, 2000)
    other = failed(s, 1, token="other", saga=s.refund)[0]

    # When the operator asks first with --dry-run
    dry = cli(s, "retry", "--name", "cli_order", "--dry-run")
    # Then it prints the exact count and the first 20 ids, and changes nothing
    assert dry.returncode == 0, dry.stderr
    assert "2,000 sagas match" in dry.stdout
    assert sum(1 for line in dry.stdout.splitlines() if line.startswith("  ") and line.strip() in ids) == 20
    assert statuses(s, ids) == {"FAILED": 2000}

    # When it runs without --yes and the answer is no, nothing changes either
    no = cli(s, "retry", "--name", "cli_order", stdin="n\n")
    assert no.returncode != 0 and "retry 2,000 sagas?" in no.stdout
    assert statuses(s, ids) == {"FAILED": 2000}

    # When it runs for real, the refunds work again, and a worker runs what it sent
    done = cli(s, "retry", "--name", "cli_order", "--yes")
    assert done.returncode == 0, done.stderr
    assert "retry: 2,000 matched, 2,000 done" in done.stdout
    with thread_worker(s.app, concurrency=8):
        # (The index counts: one cheap call a poll, while the worker shares this process.)
        wait_for(lambda: compensated(s) == 2000, timeout=240, what="every saga compensated")
    assert statuses(s, ids) == {"COMPENSATED": 2000}
    # Then every reservation was refunded exactly once: one run per idempotency key
    pipe = s.client.pipeline(transaction=False)
    for i in range(2000):
        pipe.lrange(f"{s.prefix}:undone:t{i}", 0, -1)
    assert all(undone == ["cli.reserve"] for undone in pipe.execute())
    assert store_for(s.app).status(other) is SagaStatus.FAILED

    # And running it again finds nothing left to retry
    again = cli(s, "retry", "--name", "cli_order", "--yes")
    assert again.returncode == 0 and "retry: 0 matched, 0 done" in again.stdout
    # And the run over 2,000 sagas peaked within 40 MB of the run that found none: its memory is
    # a page and the report, not the count (each peak alone depends on what the machine loaded)
    assert peak_mb(done) - peak_mb(again) < 40, (peak_mb(done), peak_mb(again))


def test_filters_select_by_reason_failed_step_time_and_start_kwargs(world: SimpleNamespace) -> None:
    s = world
    # Given FAILED sagas of two regions, and one cancelled saga
    eu = failed(s, 3, token="eu", fail="charge")
    us = failed(s, 2, token="us")
    cancelled = s.order.apply_async(kwargs={"token": "c"})
    assert cancelled.cancel()

    # Then where, failed_step, reason and until pick exactly the matching ones
    assert bulk(s.app, "retry", where={"fail": "charge"}, dry_run=True).matched == 3
    assert bulk(s.app, "retry", where=["token=us1"], dry_run=True).sample == [us[1]]
    assert bulk(s.app, "retry", failed_step="cli.charge", reason="failure", dry_run=True).matched == 5
    assert bulk(s.app, "retry", failed_step="cli.reserve", dry_run=True).matched == 0
    assert bulk(s.app, "retry", until=timedelta(hours=1), dry_run=True).matched == 0
    assert bulk(s.app, "purge", status="COMPENSATED", dry_run=True).sample == [cancelled.id]

    # When the eu ones are purged
    report = bulk(s.app, "purge", where={"fail": "charge"})
    # Then they are gone and the others are left
    assert (report.matched, report.acted, report.error_count) == (3, 3, 0)
    assert statuses(s, eu) == {"gone": 3} and statuses(s, us) == {"FAILED": 2}
    # And the same purge again matches nothing
    assert bulk(s.app, "purge", where={"fail": "charge"}).matched == 0


def test_a_bulk_cancel_of_sagas_in_flight_and_its_interruption(world: SimpleNamespace) -> None:
    s = world
    # Given 2,000 sagas waiting for a worker (PENDING): a few seconds of cancelling
    ids = [s.order.apply_async(kwargs={"token": f"p{i}"}).id for i in range(2000)]

    # When a bulk cancel runs, and is sent SIGINT once it has cancelled some
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.cli_app", "saga", "cancel", "--name", "cli_order", "--yes"],
        env=s.env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: statuses(s, ids).get("COMPENSATED", 0) >= 10, timeout=60, what="some sagas cancelled")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=patience(60))
    finally:
        if proc.poll() is None:
            proc.kill()
    # Then it stopped between two sagas, said so, and exited 130 (or it had just finished them all)
    counts = statuses(s, ids)
    if proc.returncode == 130:
        assert "interrupted: run the same command again to finish" in err
        assert out.startswith("cancel: ") and "matched" in out
        assert counts.get("PENDING", 0) > 0
    else:
        assert proc.returncode == 0, err
    assert set(counts) <= {"PENDING", "COMPENSATED"}
    # And running it again cancels the rest, and nothing twice
    report: BulkReport = bulk(s.app, "cancel", name="cli_order")
    assert report.acted == counts.get("PENDING", 0) and report.error_count == 0
    assert statuses(s, ids) == {"COMPENSATED": 2000}


def test_an_id_and_filters_together_or_neither_are_usage_errors(world: SimpleNamespace) -> None:
    s = world
    both = cli(s, "retry", "some-id", "--name", "cli_order")
    assert both.returncode == 2 and "not both" in both.stderr
    neither = cli(s, "purge")
    assert neither.returncode == 2 and "give a saga id, or filters" in neither.stderr
    bad = cli(s, "cancel", "--where", "order_id")
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
    with pytest.raises(ValueError, match="action must be one of"):
        bulk(s.app, "restart", dry_run=True)


def test_index_pages_meet_every_entry_once_across_ties_and_removals(world: SimpleNamespace) -> None:
    store = store_for(world.app)
    keys = store.keys
    # Given 40 index entries of one name, 25 of them in one millisecond (more than a page), scores fractional too
    ids = [f"tie-{i:02d}" for i in range(40)]
    for i, saga_id in enumerate(ids):
        score = 1_000.0 if i < 25 else 1_000.0 + (i - 24) + 0.6
        world.client.zadd(keys.name_index(keys.shard_of(saga_id), "tied", "FAILED"), {saga_id: score})
        world.client.sadd(keys.names(keys.shard_of(saga_id)), "tied")
    # Then pages of 3 meet each exactly once
    met = [saga_id for page in store.index_pages(SagaStatus.FAILED, "tied", None, None, page=3) for saga_id in page]
    assert sorted(met) == ids
    # And entries removed behind the cursor (as a purge does) change nothing of what is met
    seen: list[str] = []
    for page in store.index_pages(SagaStatus.FAILED, "tied", None, None, page=4):
        for saga_id in page:
            world.client.zrem(keys.name_index(keys.shard_of(saga_id), "tied", "FAILED"), saga_id)
        seen += page
    assert sorted(seen) == ids
