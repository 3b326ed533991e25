"""Which apps are enabled in this process, and installing the step wrapper on their tasks."""

from __future__ import annotations

import logging
import threading
import weakref

from celery import Celery

from ..errors import SagaDefinitionError
from ..registry import sagas_of
from .wrapper import wrap, wrapped

__all__ = ["install", "is_enabled", "mark_enabled"]

logger = logging.getLogger("celery_saga")

_ENABLED: weakref.WeakSet[Celery] = weakref.WeakSet()
_LOCK = threading.Lock()


def is_enabled(app: Celery) -> bool:
    """True once ``celery_saga.enable(app)`` ran."""
    return app in _ENABLED


def mark_enabled(app: Celery) -> bool:
    """Mark ``app`` enabled; False if it already was."""
    with _LOCK:
        if app in _ENABLED:
            return False
        _ENABLED.add(app)
        return True


def install(app: Celery) -> None:
    """Wrap every task of ``app`` and check the sagas defined on it.

    Celery swallows what a finalize callback raises, so definition errors
    found here are logged.
    """
    for name, task in list(app.tasks.items()):
        if name.startswith("celery.") or wrapped(task):
            continue
        wrap(task)
    for saga in sagas_of(app):
        try:
            saga.plan()
        except SagaDefinitionError as exc:
            logger.error("%s", exc)
