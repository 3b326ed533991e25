"""Fixtures of the tests that run ``celery worker`` (and Flower, and ``celery saga sweep``) as subprocesses.

Each test gets its own key prefix (saga records, ledger, gates and, through
kombu's ``global_keyprefix``, its queues and unacked hash) and its own queue.
Subprocesses run in their own sessions and are stopped by PID and process
group, never by name.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from tests import proc_app
from tests.subprocs import Procs, proc_env, running


@pytest.fixture
def env(redis_url: str, ns: str, request: pytest.FixtureRequest) -> SimpleNamespace:
    """The test's Redis, key prefix, queue, and its subprocesses' environment (``@pytest.mark.saga_conf``)."""
    mark = request.node.get_closest_marker("saga_conf")
    return proc_env(redis_url, f"sagaproc-{ns}", f"q-{ns}", mark.args[0] if mark else None)


@pytest.fixture
def r(redis_url: str, env: SimpleNamespace) -> Iterator[redis.Redis]:
    """A client; afterwards it deletes only the keys under the test's prefix."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    for key in client.scan_iter(match=f"{env.prefix}:*", count=500):
        client.unlink(key)
    client.close()


@pytest.fixture
def procs(env: SimpleNamespace, tmp_path: Path, ns: str, r: redis.Redis) -> Iterator[Procs]:
    # Takes `r` so the subprocesses are gone before `r` deletes the test's keys.
    with running(Procs(tmp_path, env, ns)) as p:
        yield p


@pytest.fixture
def shop(env: SimpleNamespace) -> Iterator[SimpleNamespace]:
    """The test's side: the same tasks and sagas as the workers, to start sagas and read their records."""
    s = proc_app.create(env.redis_url, env.prefix, env.queue, saga_conf=env.saga_conf)
    yield s
    s.app.close()
    s.client.close()
    s.gate_client.close()
