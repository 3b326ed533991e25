"""Bulk actions at scale: a dry run and a purge over N matching sagas, their time and peak memory.

``python benchmarks/bulk.py [--n 100000] [--also 10000]`` fills a Redis with
N finished sagas of one name (COMPENSATED), then runs, as an operator would,
``celery saga purge --name bench_bulk --dry-run`` and ``celery saga purge
--name bench_bulk --yes``, each a subprocess whose wall time and peak RSS
are printed. ``--also`` runs the same at a smaller count first, so that the
two peaks show whether memory grows with the count (it must not).

The sagas: one is started and cancelled for real (PENDING, cancelled:
COMPENSATED at once, its record packed); the others are copies of its record
(``DUMP``/``RESTORE`` under new ids) with their index entries, written in
pipelines: a hundred thousand real starts would take minutes and measure the
starts, not the bulk action.

Redis: ``REDIS_URL`` if set; else 127.0.0.1:6379 database 9 if it answers;
else a private server. Every run uses its own prefix and deletes only its keys.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.overhead import chosen_redis, delete_run_keys  # noqa: E402 - needs ROOT on sys.path
from tests import cli_app  # noqa: E402

NAME = "bench_bulk"


def fill(url: str, prefix: str, n: int) -> None:
    """``n`` COMPENSATED sagas named `NAME`: one real, the rest copies of its record with their index entries."""
    from celery_saga.stores import store_for

    s = cli_app.create(url, prefix, f"{prefix}-q")
    from celery_saga import Saga

    saga = Saga(NAME, [s.reserve, s.charge], app=s.app)
    first = saga.apply_async(kwargs={"token": "x" * 40, "order_id": 1})
    assert first.cancel()
    store = store_for(s.app)
    keys = store.keys
    client = redis.Redis.from_url(url)
    template = client.dump(keys.record(first.id))
    status_at = int(time.time() * 1000)  # the store clock's milliseconds, as the transitions write them
    batch = client.pipeline(transaction=False)
    for i in range(1, n):
        saga_id = str(uuid.uuid4())
        shard = keys.shard_of(saga_id)
        batch.restore(keys.record(saga_id), 0, template)
        batch.zadd(keys.name_index(shard, NAME, "COMPENSATED"), {saga_id: status_at + i % 1000})
        batch.sadd(keys.names(shard), NAME)
        if i % 2000 == 0:
            batch.execute()
    batch.execute()
    client.delete(f"{prefix}:kombu:{prefix}-q")
    client.close()
    s.app.close()


def run(url: str, prefix: str, *args: str) -> tuple[float, float, str]:
    """``celery saga ...`` on the bench's sagas: seconds, peak RSS (MB), its output."""
    env = {**os.environ, "CELERY_SAGA_CLI_REDIS": url, "CELERY_SAGA_CLI_PREFIX": prefix}
    env["CELERY_SAGA_CLI_QUEUE"] = f"{prefix}-q"
    started = time.perf_counter()
    proc = subprocess.run(cli_app.measured_cli(*args), env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"celery saga {' '.join(args)} failed:\n{proc.stderr}")
    peak = next(int(x.split()[1]) for x in proc.stderr.splitlines() if x.startswith("peak-rss-kb"))
    return seconds, peak / 1024, proc.stdout.strip().splitlines()[0]


def measure(url: str, n: int) -> None:
    prefix = f"bench-bulk-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(url)
    try:
        started = time.perf_counter()
        fill(url, prefix, n)
        print(f"\n{n:,} COMPENSATED sagas written in {time.perf_counter() - started:.1f}s")
        baseline_s, baseline_mb, _ = run(url, prefix, "list", "--limit", "1")
        print(f"  the CLI alone (saga list --limit 1): {baseline_s:5.1f}s, peak RSS {baseline_mb:6.1f} MB")
        for what, args in (("dry run", ("--dry-run",)), ("purge", ("--yes",))):
            seconds, mb, first_line = run(url, prefix, "purge", "--name", NAME, *args)
            rate = n / seconds
            print(f"  {what:7}: {seconds:5.1f}s ({rate:,.0f} sagas/s), peak RSS {mb:6.1f} MB   [{first_line}]")
        left = sum(1 for _ in client.scan_iter(match=f"{prefix}:{{*-*-*}}", count=1000))  # ids are uuids
        print(f"  records left after the purge: {left}")
    finally:
        delete_run_keys(client, [f"{prefix}:*"])
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=100_000, help="matching sagas (default 100,000)")
    parser.add_argument("--also", type=int, default=10_000, help="a smaller count run first, 0 for none")
    args = parser.parse_args(argv)
    with chosen_redis() as url:
        for n in (args.also, args.n):
            if n > 0:
                measure(url, n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
