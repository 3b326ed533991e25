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

PYTEST_DONT_REWRITE: the helpers raise their own AssertionErrors, and a test
module may import this one before its ``pytest_plugins`` registers it.
"""

from __future__ import annotations

import copy
import os
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.exceptions import TimeLimitExceeded
from celery.worker import state as worker_state

from .context import StepContext
from .redis_server import RedisServer, redis_answers
from .registry import sagas_of
from .result import SagaResult
from .state import CompensationStatus, SagaState, SagaStatus, StepRecord
from .stores import forget_store
from .views import render_timeline
from .worker import wrapper

__all__ = [
    *("app_queues", "configured", "isolated_settings", "thread_worker"),
    *("SagaFaults", "assert_compensated", "assert_completed", "assert_failed", "wait_for_saga"),
]


# Celery reads these before app.conf, so they would win over the test settings.
_ENV = ("CELERY_BROKER_URL", "CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL", "CELERY_RESULT_BACKEND")


def isolated_settings(redis_url: str, prefix: str) -> dict[str, Any]:
    """Broker, result backend and saga store in ``redis_url``, with every key under ``prefix``.

    kombu's ``global_keyprefix`` gives each test its own queues, so a message
    left by one test never reaches the worker of another. A short BRPOP
    timeout lets workers stop fast, and compensations retry after 0.05 s, not 1 s.
    """
    return {
        "broker_url": redis_url,
        "broker_read_url": None,
        "broker_write_url": None,
        "result_backend": redis_url,
        "broker_transport_options": {"global_keyprefix": f"{prefix}:kombu:", "polling_interval": 0.1},
        "result_backend_transport_options": {"global_keyprefix": f"{prefix}:results:"},
        "saga_redis_url": redis_url,
        "saga_key_prefix": prefix,
        "saga_compensation_retry_backoff": 0.05,
        "saga_compensation_retry_backoff_max": 1.0,
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
    }


@contextmanager
def configured(app: Celery, settings: Mapping[str, Any]) -> Iterator[Celery]:
    """Apply ``settings`` to ``app`` inside the block, then undo every change made to ``app.conf``.

    Transport options are merged into the app's own. An app is usually a
    module-level object shared by every test, and Celery caches its broker
    pool, producers and result backend: they are dropped on the way in and out,
    so each use connects with the settings then in force.
    """
    conf = app.conf
    conf.get("broker_url")  # loads a pending configuration: only then is `changes` the app's own
    saved, env = dict(conf.changes), {k: os.environ.pop(k) for k in _ENV if k in os.environ}
    merged = dict(settings)
    for key in ("broker_transport_options", "result_backend_transport_options"):
        if key in merged:
            merged[key] = {**(conf.get(key) or {}), **merged[key]}
    conf.update(merged)
    _drop_connections(app, close=False)
    try:
        yield app
    finally:
        forget_store(app)
        _drop_connections(app, close=True)
        conf.changes.clear()
        conf.changes.update(saved)
        os.environ.update(env)


def _drop_connections(app: Celery, close: bool) -> None:
    pool, app._pool = app._pool, None
    if close and pool is not None:
        # kombu keys pools by URL and transport options, so this one holds only
        # the test's connections; close_pool=False leaves it usable.
        pool.force_close_all(close_pool=False)
    app._backend_cache = None
    app._local = threading.local()  # thread-local result backends
    for cached in ("amqp", "control"):  # producer pool, queue selection, mailbox
        app.__dict__.pop(cached, None)


def app_queues(app: Celery) -> list[str]:
    """The default queue, ``task_queues``, and every queue the app's tasks and saga steps are routed to.

    Routes are looked up with empty arguments: add a queue that a router picks
    from a task's arguments with ``saga_worker_parameters``.
    """
    names = [app.conf.task_default_queue, *(q.name for q in app.conf.task_queues or ())]
    for name, task in list(app.tasks.items()):
        if not name.startswith("celery."):
            names.append(getattr(app.amqp.router.route({}, name, (), {}, task).get("queue"), "name", None))
    names += [s.options.get("queue") for saga in sagas_of(app) for s in saga.plan().steps]
    return list(dict.fromkeys(n for n in names if isinstance(n, str) and n))


@contextmanager
def thread_worker(app: Celery, **params: Any) -> Iterator[Any]:
    """``start_worker`` (threads pool, 4 threads, no ping check), safe to fail.

    ``start_worker`` stops its thread by setting the process-wide
    ``celery.worker.state.should_terminate``, and when the thread outlives
    ``shutdown_timeout`` it raises before putting the flag back: every later
    in-process worker then stops as soon as it starts, and each later test
    hangs until its timeout. The flag is restored here whatever happens.
    Run one at a time: the flag that stops one in-process worker stops every
    other one running in the process too (start a ``celery worker`` process
    for a second worker).
    """
    options: dict[str, Any] = {
        **{"pool": "threads", "concurrency": 4, "perform_ping_check": False, "loglevel": "WARNING"},
        **{"shutdown_timeout": 30.0, **params},
    }
    try:
        with start_worker(app, **options) as worker:
            yield worker
    finally:
        worker_state.should_terminate = None


def _delete_keys(redis_url: str, prefix: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.unlink(*keys[i : i + 500])


# -- fault injection -------------------------------------------------------------------


@dataclass
class _Fault:
    step: str
    compensating: bool
    error: Exception | type[Exception]
    times: int | None
    saga: str | None
    fired: int = 0


class SagaFaults:
    """Faults injected into steps and compensations by step name: the ``saga_faults`` fixture.

    A fault is raised right before the step's (or compensation's) function
    runs, where the function's own exception would come from: the task's
    ``autoretry_for`` retries it like a real one. ``times=None``
    means every time; ``saga`` limits a fault to the sagas of that name.

    With ``app``, a step name that no saga of the app has (a typo would make
    a test pass for the wrong reason) raises ValueError naming the known steps.
    """

    def __init__(self, app: Celery | None = None) -> None:
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._app = app

    def fail(
        self,
        step: str,
        exc: Exception | type[Exception] | None = None,
        *,
        times: int | None = None,
        saga: str | None = None,
    ) -> None:
        """Make the step fail with ``exc``, by default a RuntimeError saying it was injected."""
        self._add(_Fault(step, False, exc or RuntimeError(f"injected failure of step {step}"), times, saga))

    def timeout(self, step: str, *, times: int | None = None, saga: str | None = None) -> None:
        """Make the step time out the way a hard time limit does: cut off mid-way.

        Its outcome is unknown, so the step is recorded UNKNOWN and
        compensated blind (``step_result=None``), and the saga's ``reason``
        is ``"timeout"``. To test a step that misses its deadline instead,
        give it a short ``timeout=`` and make it wait.
        """
        self._add(_Fault(step, False, TimeLimitExceeded(f"injected timeout of step {step}"), times, saga))

    def fail_compensation(
        self,
        step: str,
        times: int | None = None,
        *,
        exc: Exception | type[Exception] | None = None,
        saga: str | None = None,
    ) -> None:
        """Make the step's compensation fail ``times`` times (None: always); then it runs normally."""
        error = exc or RuntimeError(f"injected failure of the compensation of {step}")
        self._add(_Fault(step, True, error, times, saga))

    def fired(self, step: str, compensating: bool = False) -> int:
        """How many faults were injected into the step, or its compensation, so far."""
        with self._lock:
            return sum(f.fired for f in self._faults if f.step == step and f.compensating == compensating)

    def _add(self, fault: _Fault) -> None:
        if fault.times is not None and fault.times < 1:
            raise ValueError(f"times must be None (always) or at least 1, not {fault.times!r}")
        if self._app is not None:
            self._check(fault)
        with self._lock:
            self._faults.append(fault)

    def _check(self, fault: _Fault) -> None:
        assert self._app is not None
        app = self._app
        app.tasks  # noqa: B018 - finalizes the app: sagas of shared tasks belong to it from then on
        plans = {saga.name: saga.plan() for saga in sagas_of(app)}
        if fault.saga is not None:
            if fault.saga not in plans:
                raise ValueError(f"saga_faults: app {app.main!r} has no saga {fault.saga!r}; sagas: {sorted(plans)}")
            plans = {fault.saga: plans[fault.saga]}
        specs = [spec for plan in plans.values() for spec in plan.steps]
        named = [spec for spec in specs if spec.name == fault.step]
        if not named:
            where = f"saga {fault.saga!r}" if fault.saga else f"any saga of app {app.main!r}"
            known = sorted({spec.name for spec in specs}) or "none (is the module that defines the sagas imported?)"
            raise ValueError(
                f"saga_faults: {fault.step!r} is not a step of {where}, so nothing would be injected; steps: {known}"
            )
        if fault.compensating and all(spec.compensation is None for spec in named):
            raise ValueError(f"saga_faults: step {fault.step!r} has no compensation to fail (compensate=None)")

    def __call__(self, ctx: StepContext) -> None:
        """The worker's fault hook: raise the first fault that matches ``ctx`` and has not run out."""
        with self._lock:
            for f in self._faults:
                matches = (f.step, f.compensating) == (ctx.step, ctx.compensating) and f.saga in (None, ctx.saga_name)
                if matches and (f.times is None or f.fired < f.times):
                    f.fired += 1
                    break
            else:
                return
        # A copy each time: one exception raised in several threads would share a traceback.
        raise copy.copy(f.error) if isinstance(f.error, Exception) else f.error()


# -- assertions ----------------------------------------------------------------------


def _describe(state: SagaState) -> str:
    text = f"saga {state.saga_id} ({state.name}) is {state.status.value}"
    if state.failed_step:
        text += f"; step {state.failed_step} failed: {state.error}"
    return f"{text}\n{render_timeline(state, width=80)}"


def wait_for_saga(result: SagaResult, timeout: float = 30.0) -> SagaState:
    """Poll until the saga has finished and return its final state; AssertionError after ``timeout`` seconds."""
    deadline, pause = time.monotonic() + timeout, 0.005
    while not (state := result.state()).status.finished:
        if time.monotonic() >= deadline:
            raise AssertionError(f"saga did not finish within {timeout}s: {_describe(state)}")
        time.sleep(pause)
        pause = min(0.1, pause * 2)
    return state


def _finished(result: SagaResult, status: SagaStatus, timeout: float) -> SagaState:
    state = wait_for_saga(result, timeout)
    if state.status is not status:
        raise AssertionError(f"expected the saga to end {status.value}, but {_describe(state)}")
    return state


def _undo_order(s: StepRecord) -> tuple[datetime, int]:
    # Times are in ms; on a tie, the later stage was compensated first.
    return (s.compensation_started_at or datetime.max.replace(tzinfo=UTC), -s.stage)


def assert_completed(result: SagaResult, *, timeout: float = 30.0) -> SagaState:
    """Wait for the saga to finish, assert it COMPLETED, and return its final state."""
    return _finished(result, SagaStatus.COMPLETED, timeout)


def assert_compensated(
    result: SagaResult, steps: Sequence[str] | None = None, *, failed_step: str | None = None, timeout: float = 30.0
) -> SagaState:
    """Wait for the saga to finish, assert it was rolled back (COMPENSATED), and return its final state.

    ``steps``, if given, must be exactly the steps whose compensation ran, in
    the order the compensations started. Compensations of one ``parallel``
    stage start together, and a retrying compensation does not hold back the
    earlier stages, so order only means something between stages that ran
    cleanly. ``failed_step``, if given, is the step whose failure started the rollback.
    """
    state = _finished(result, SagaStatus.COMPENSATED, timeout)
    if failed_step is not None and state.failed_step != failed_step:
        raise AssertionError(f"expected step {failed_step} to start the rollback, but {_describe(state)}")
    done = sorted((s for s in state.steps if s.compensation_status is CompensationStatus.COMPENSATED), key=_undo_order)
    if steps is not None and [s.name for s in done] != list(steps):
        actual = [s.name for s in done]
        raise AssertionError(f"expected compensations {list(steps)}, but ran {actual}: {_describe(state)}")
    return state


def assert_failed(result: SagaResult, gave_up: Sequence[str] | None = None, *, timeout: float = 30.0) -> SagaState:
    """Wait for the saga to finish, assert it FAILED, and return its final state.

    ``gave_up``, if given, must be exactly the steps whose compensation gave up, in any order.
    """
    state = _finished(result, SagaStatus.FAILED, timeout)
    actual = sorted(s.name for s in state.steps if s.compensation_status is CompensationStatus.GAVE_UP)
    if gave_up is not None and actual != sorted(gave_up):
        raise AssertionError(f"expected {sorted(gave_up)} to give up, but {actual} did: {_describe(state)}")
    return state


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
    _delete_keys(saga_redis_url, saga_prefix)


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
