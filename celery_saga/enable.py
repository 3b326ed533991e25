"""Enabling celery_saga on a Celery app: the step wrapper, the worker's handlers and its bootstep.

An app whose tasks include saga steps enables itself when Celery finalizes
it: ``@saga_step`` calls `enable_apps_with_steps`, which registers a finalize
callback with Celery; that is how decorating a step reaches this module. A
participant service, whose tasks are steps of sagas defined elsewhere,
calls `enable` itself.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery._state import _get_active_apps, connect_on_app_finalize

from . import redaction
from .nested import register_tasks
from .registry import has_steps
from .worker import main_process
from .worker.apps import install, mark_enabled
from .worker.bootstep import SagaWorker

__all__ = ["enable", "enable_apps_with_steps"]

_finalize_hook_installed = False


def enable(app: Celery) -> Celery:
    """Install the saga hooks on ``app``; idempotent, returns the app.

    Apps that define saga steps are enabled automatically when finalized. A
    participant service, whose tasks are steps of sagas defined elsewhere,
    calls this once; it needs only the same saga store URL and key prefix.
    """
    if not mark_enabled(app):
        return app
    main_process.connect_signals()
    redaction.connect_signals()
    app.steps["worker"].add(SagaWorker)
    register_tasks(app)
    if app.finalized:
        install(app)
    else:
        app.on_after_finalize.connect(_install_after_finalize, sender=app, weak=False)
    return app


def _install_after_finalize(sender: Celery, **_: Any) -> None:
    install(sender)


def enable_apps_with_steps(app: Celery | None) -> None:
    """Make apps that contain saga steps enable themselves; called by ``@saga_step``.

    From now on every app Celery finalizes is checked for steps; ``app`` (or,
    if None, every active app) is checked now if it is finalized already.
    """
    global _finalize_hook_installed
    if not _finalize_hook_installed:
        _finalize_hook_installed = True
        connect_on_app_finalize(_enable_when_finalized)
    for active in [app] if app is not None else list(_get_active_apps()):
        if active is not None and active.finalized and has_steps(active):
            enable(active)


def _enable_when_finalized(app: Celery) -> None:
    # Celery calls finalize callbacks before the app's pending tasks exist,
    # so the check waits for on_after_finalize, when every task is registered.
    app.on_after_finalize.connect(
        _enable_after_finalize, sender=app, weak=False, dispatch_uid=f"celery_saga.enable.{id(app)}"
    )


def _enable_after_finalize(sender: Celery, **_: Any) -> None:
    if has_steps(sender):
        enable(sender)
