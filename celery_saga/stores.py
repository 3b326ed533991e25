"""The saga store and settings of each app: one store per (URL, prefix) and process.

Everything that reads or writes a saga record gets its store here. This
module knows nothing of workers or sagas, so every layer above may use it.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from celery import Celery

from .settings import SETTING_NAMES, SagaSettings, raw_conf
from .store import RedisSagaStore, SagaStore

__all__ = ["forget_store", "settings_of", "store_for"]

_STORE_SETTINGS = (
    "saga_redis_url",
    "saga_key_prefix",
    "saga_retention",
    "saga_compensated_retention",
    "saga_redis_transport_options",
    "saga_index_shards",
    "saga_redis_wait_replicas",
    "saga_redis_wait_timeout",
)
_STORE_KEYS = ("broker_url", *_STORE_SETTINGS)
_ALL_KEYS = (*_STORE_KEYS, *SETTING_NAMES, "broker_transport_options")
_SETTINGS: weakref.WeakKeyDictionary[Celery, tuple[tuple[Any, ...], SagaSettings]] = weakref.WeakKeyDictionary()
_STORES: dict[tuple[str, ...], SagaStore] = {}
_BY_APP: weakref.WeakKeyDictionary[Celery, tuple[tuple[Any, ...], SagaStore]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def settings_of(app: Celery) -> SagaSettings:
    """The validated ``saga_*`` settings of ``app``; validated again only when ``app.conf`` changed."""
    raw = raw_conf(app, _ALL_KEYS)
    cached = _SETTINGS.get(app)
    if cached is not None and cached[0] == raw:
        return cached[1]
    settings = SagaSettings.from_app(app)
    _SETTINGS[app] = (raw, settings)
    return settings


def store_for(app: Celery) -> SagaStore:
    """The saga store of ``app``, one per (URL, prefix) and process.

    redis-py pools notice a fork and reconnect, so prefork children reuse it.
    """
    # Steps call this on every message: skip validating the settings again
    # while the raw values they come from are unchanged.
    raw = raw_conf(app, _STORE_KEYS)
    cached = _BY_APP.get(app)
    if cached is not None and cached[0] == raw:
        return cached[1]
    store = _shared_store(settings_of(app))
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


def _shared_store(settings: SagaSettings) -> SagaStore:
    key = (
        settings.redis_url,
        settings.key_prefix,
        repr(sorted(settings.redis_options.items())),
        str(settings.index_shards),
        str(settings.wait_replicas),
        str(settings.wait_timeout),
        str(_index_retention(settings)),
    )
    store = _STORES.get(key)
    if store is None:
        with _LOCK:
            store = _STORES.get(key)
            if store is None:
                store = RedisSagaStore(
                    settings.redis_url,
                    settings.key_prefix,
                    retention=_index_retention(settings),
                    options=settings.redis_options,
                    shards=settings.index_shards,
                    wait_replicas=settings.wait_replicas,
                    wait_timeout=settings.wait_timeout,
                )
                _STORES[key] = store
    return store


def _index_retention(settings: SagaSettings) -> float:
    """How long finished (COMPLETED, COMPENSATED) index entries are kept and counted: the longer retention."""
    return max(settings.retention, settings.compensated_retention or 0.0)
