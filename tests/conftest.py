"""Fixtures: a real Redis, a fresh app and key prefix per test, real workers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from celery import Celery

from celery_saga.redis_server import RedisServer, redis_answers
from celery_saga.testing import thread_worker
from tests.deployments import Cluster
from tests.helpers import TIMEOUT_SCALE, Ledger, patience


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Per-test time limits (pytest-timeout) grow with SAGA_TEST_TIMEOUT_SCALE, like every wait."""
    if TIMEOUT_SCALE == 1:
        return
    default = float(config.getini("timeout") or 0)
    for item in items:
        mark = item.get_closest_marker("timeout")
        limit = float(mark.args[0]) if mark is not None and mark.args else default
        if limit:
            item.add_marker(pytest.mark.timeout(limit * TIMEOUT_SCALE), append=False)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """REDIS_URL if set; else the server on 127.0.0.1:6379 (database 9); else a private one."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    if redis_answers("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/9"
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def ns() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    # redis-py 8 defaults to a 5 s socket timeout, shorter than the gates block.
    client = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=patience(120))
    yield client
    client.close()


def configure(app: Celery, ns: str) -> None:
    app.conf.update(
        task_default_queue=f"q-{ns}",
        saga_key_prefix=f"sagatest-{ns}",
        saga_compensation_retry_backoff=0.05,
        saga_compensation_retry_backoff_max=0.5,
        task_allow_error_cb_on_chord_header=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        result_expires=600,
    )


@pytest.fixture
def app(redis_url: str, ns: str) -> Iterator[Celery]:
    application = Celery(f"test_{ns}", broker=redis_url, backend=redis_url, set_as_current=False)
    configure(application, ns)
    yield application
    application.close()
    # Only this test's keys: its saga records, indexes, ledger, gates, its
    # queues (all named q-<ns>...) and kombu's bindings of them.
    with redis.Redis.from_url(redis_url) as client:
        for pattern in (f"sagatest-{ns}:*", f"q-{ns}*", f"_kombu.binding*.q-{ns}*"):
            for key in client.scan_iter(match=pattern, count=500):
                client.unlink(key)


@contextmanager
def running_worker(app: Celery, concurrency: int = 4) -> Iterator[Any]:
    """An in-process worker (threads pool) consuming the app's default queue."""
    with thread_worker(app, concurrency=concurrency) as w:
        yield w


@pytest.fixture
def worker(app: Celery) -> Callable[..., Any]:
    return lambda concurrency=4: running_worker(app, concurrency)


@pytest.fixture
def prefix(app: Celery) -> str:
    return str(app.conf.saga_key_prefix)


@pytest.fixture
def ledger(r: redis.Redis, prefix: str) -> Ledger:
    return Ledger(r, f"{prefix}:ledger")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """A 3-master Redis Cluster of the tests' own, started once, when a test first asks for it."""
    with Cluster() as c:
        yield c
