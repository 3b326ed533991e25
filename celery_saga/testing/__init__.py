"""Testing sagas against a real Redis and real workers: a pytest plugin and helpers.

Opt in with ``pytest_plugins = ["celery_saga.testing"]`` in a test module or the
root ``conftest.py``. Importing starts nothing; the fixtures configure, connect
and start what a test needs, and undo it after the test::

    pytest_plugins = ["celery_saga.testing"]

    @pytest.fixture
    def saga_app():
        from proj.orders import app  # the module that defines your sagas
        return app

    def test_a_declined_card_releases_the_stock(saga_worker, saga_faults):
        saga_faults.fail("payments.charge_card")
        result = place_order.delay(order_id=1, amount=30)
        assert_compensated(result, steps=["inventory.reserve_stock"])

Fixtures: ``saga_redis_url`` (session): ``REDIS_URL``, else the Redis on
127.0.0.1:6379 (db 0), else a private ``redis-server``; tests are kept apart by
key prefixes and nothing is flushed. ``saga_app``: override it to return your
app. ``saga_prefix``: a fresh key prefix per test. ``saga_config``: the
settings applied during the test (`isolated_settings`); override it to add
yours. ``saga_test_app``: the app with them applied (`configured`); its keys
are deleted after the test. ``saga_worker``: an in-process worker, threads
pool, consuming every queue of the app (`app_queues`); ``saga_worker_parameters``
overrides its ``start_worker`` arguments (see `thread_worker`). ``saga_faults``: a `SagaFaults`.
``saga_crash_points``: a `CrashExplorer`, which runs a saga with a worker killed
at each of its crash points; ``--saga-crash-points=quick|full`` sets its depth.

PYTEST_DONT_REWRITE: the helpers raise their own AssertionErrors, and a test
module may import this one before its ``pytest_plugins`` registers it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from ..redis_server import RedisServer, redis_answers
from ..worker import wrapper
from ..worker.wrapper import CrashPoint
from .asserts import assert_compensated, assert_completed, assert_failed, wait_for_saga
from .crash import DEPTHS, CrashExplorer, CrashReport, ExploredPoint, SkippedPoint
from .faults import SagaFaults
from .setup import app_queues, configured, delete_keys, isolated_settings, thread_worker

__all__ = [
    # Pointing an app at a test Redis, and workers
    "app_queues",
    "configured",
    "isolated_settings",
    "thread_worker",
    # Faults and assertions
    "SagaFaults",
    "assert_compensated",
    "assert_completed",
    "assert_failed",
    "wait_for_saga",
    # Crash points
    "CrashExplorer",
    "CrashPoint",
    "CrashReport",
    "ExploredPoint",
    "SkippedPoint",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--saga-crash-points",
        choices=sorted(DEPTHS),
        default="quick",
        help="crash points saga_crash_points explores: quick (points 2 and 3) or full (all four)",
    )


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def saga_redis_url() -> Iterator[str]:
    """``REDIS_URL``; else the Redis on 127.0.0.1:6379, database 0; else a private one for the session."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
    elif redis_answers("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/0"
    else:
        with RedisServer() as server:
            yield server.url


@pytest.fixture
def saga_app() -> Celery:
    """Your Celery app, with its sagas imported: override this fixture to return it."""
    pytest.fail(
        "celery_saga.testing: override the `saga_app` fixture to return your Celery app, e.g.\n\n"
        "    @pytest.fixture\n    def saga_app():\n        from proj.orders import app\n        return app\n",
        pytrace=False,
    )


@pytest.fixture
def saga_prefix() -> str:
    """A fresh key prefix for this test."""
    return f"sagatest-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def saga_config(saga_redis_url: str, saga_prefix: str) -> dict[str, Any]:
    """The settings applied to the app during the test; override it to add your own."""
    return isolated_settings(saga_redis_url, saga_prefix)


@pytest.fixture
def saga_test_app(
    saga_app: Celery, saga_config: dict[str, Any], saga_redis_url: str, saga_prefix: str
) -> Iterator[Celery]:
    """``saga_app`` configured with ``saga_config`` for the test; restored, and the test's keys deleted, after it."""
    with configured(saga_app, saga_config):
        yield saga_app
    delete_keys(saga_redis_url, saga_prefix)


@pytest.fixture
def saga_worker_parameters() -> dict[str, Any]:
    """``start_worker`` arguments over ours; override it, e.g. to return ``{"concurrency": 8}``."""
    return {}


@pytest.fixture
def saga_worker(saga_test_app: Celery, saga_worker_parameters: dict[str, Any]) -> Iterator[Any]:
    """An in-process worker (threads pool) consuming every queue of the app; stopped after the test."""
    params = {"queues": app_queues(saga_test_app), **saga_worker_parameters}
    with thread_worker(saga_test_app, **params) as worker:
        yield worker


@pytest.fixture
def saga_faults(saga_app: Celery) -> Iterator[SagaFaults]:
    """Fault injection for this test (`SagaFaults`) into the sagas of ``saga_app``, removed after it."""
    faults, previous = SagaFaults(saga_app), wrapper.fault_hook()
    wrapper.set_fault_hook(faults)
    yield faults
    wrapper.set_fault_hook(previous)


@pytest.fixture
def saga_crash_points(saga_redis_url: str, request: pytest.FixtureRequest, tmp_path: Path) -> CrashExplorer:
    """A `CrashExplorer` at the depth of ``--saga-crash-points`` (quick unless told), logging under ``tmp_path``.

    Its ``explore`` stops every worker it started before it returns.
    """
    depth = request.config.getoption("saga_crash_points", default=None) or "quick"
    return CrashExplorer(saga_redis_url, str(depth), tmp_path / "saga-crash-points")
