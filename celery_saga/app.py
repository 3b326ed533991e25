"""Enabling celery_saga on a Celery app, and the app's saga store."""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from celery import Celery

from .settings import SagaSettings
from .store import RedisSagaStore, SagaStore

__all__ = [
    "enable",
    "enable_if_has_steps",
    "enable_when_finalized",
    "forget_store",
    "is_enabled",
    "settings_of",
    "store_for",
]

logger = logging.getLogger("celery_saga")

_ENABLED: weakref.WeakSet[Celery] = weakref.WeakSet()
_STORES: dict[tuple[str, str], SagaStore] = {}
_BY_APP: weakref.WeakKeyDictionary[Celery, tuple[tuple[Any, ...], SagaStore]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def settings_of(app: Celery) -> SagaSettings:
    """The validated ``saga_*`` settings of ``app``."""
    return SagaSettings.from_app(app)


def store_for(app: Celery) -> SagaStore:
    """The saga store of ``app``, one per (URL, prefix) and process.

    redis-py pools notice a fork and reconnect, so prefork children reuse it.
    """
    # Steps call this on every message: skip validating the settings again
    # while the raw values they come from are unchanged.
    conf = app.conf
    raw = (conf.get("saga_redis_url"), conf.get("saga_key_prefix"), conf.get("saga_retention"), conf.broker_url)
    cached = _BY_APP.get(app)
    if cached is not None and cached[0] == raw:
        return cached[1]
    store = _store_for(app)
    _BY_APP[app] = (raw, store)
    return store


def forget_store(app: Celery) -> None:
    """Close and drop the store ``app`` uses now, e.g. before pointing the app elsewhere."""
    cached = _BY_APP.pop(app, None)
    if cached is None:
        return
    store = cached[1]
    with _LOCK:
        for key in [k for k, v in _STORES.items() if v is store]:
            del _STORES[key]
    store.close()  # another app sharing it reconnects on its next command


def _store_for(app: Celery) -> SagaStore:
    settings = settings_of(app)
    key = (settings.redis_url, settings.key_prefix)
    store = _STORES.get(key)
    if store is None:
        with _LOCK:
            store = _STORES.get(key)
            if store is None:
                store = RedisSagaStore(settings.redis_url, settings.key_prefix, retention=settings.retention)
                _STORES[key] = store
    return store


def is_enabled(app: Celery) -> bool:
    """True once ``enable(app)`` ran."""
    return app in _ENABLED


def enable(app: Celery) -> Celery:
    """Install the saga hooks on ``app``; idempotent, returns the app.

    Apps that define saga steps are enabled automatically when finalized. A
    participant service, whose tasks are steps of sagas defined elsewhere,
    calls this once; it needs only the same saga store URL and key prefix.
    """
    from . import worker  # worker-side hooks are imported only when enabling

    with _LOCK:
        if app in _ENABLED:
            return app
        _ENABLED.add(app)
    worker.connect_signals()
    app.steps["worker"].add(worker.SagaWorker)
    _warn_about_pickle(app)
    if app.finalized:
        worker.install(app)
    else:
        app.on_after_finalize.connect(_installer, sender=app, weak=False)
    return app


def _installer(sender: Celery, **_: Any) -> None:
    from . import worker

    worker.install(sender)


def enable_if_has_steps(app: Celery) -> None:
    """Enable a finalized ``app`` now if any of its tasks is a saga step."""
    if _has_steps(app):
        enable(app)


def enable_when_finalized(app: Celery) -> None:
    """Celery's app-finalize callback.

    Celery calls it before the app's pending tasks exist, so the check waits
    for ``on_after_finalize``, when every task is registered.
    """
    app.on_after_finalize.connect(
        _enable_after_finalize, sender=app, weak=False, dispatch_uid=f"celery_saga.enable.{id(app)}"
    )


def _enable_after_finalize(sender: Celery, **_: Any) -> None:
    if _has_steps(sender):
        enable(sender)


def _has_steps(app: Celery) -> bool:
    from .step import _REGISTRY

    tasks = app._tasks
    return any(name in tasks for name in list(_REGISTRY))


def _warn_about_pickle(app: Celery) -> None:
    accepted = {str(c).lower() for c in (app.conf.accept_content or ())}
    if accepted & {"pickle", "application/x-python-serialize"}:
        logger.warning(
            "celery_saga sends JSON only, but app.conf.accept_content includes pickle: "
            "a pickled message can run arbitrary code; remove it from accept_content"
        )
