"""Pointing an app at a test Redis, and running a worker in the test's process."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.worker import state as worker_state

from ..registry import sagas_of
from ..stores import forget_store

__all__ = ["app_queues", "configured", "delete_keys", "isolated_settings", "thread_worker"]


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


def delete_keys(redis_url: str, prefix: str) -> None:
    """Delete every key under ``prefix``, by SCAN: never FLUSHDB a Redis the tests share."""
    with redis.Redis.from_url(redis_url) as client:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.unlink(*keys[i : i + 500])
