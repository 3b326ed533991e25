"""``celery saga web``: sagas in a browser, with ``/metrics`` and a JSON API (the ``web`` extra: Tornado).

Nothing here is imported by the core package: ``celery saga web`` imports it
when it runs, and says to install ``celery-saga-engine[web]`` when Tornado
is missing.
"""

from __future__ import annotations

from .app import make_app, serve
from .settings import AUTH_ENV, MAX_DEPTH, MAX_LIMIT, PAGE_SIZE, SettingError, WebSettings, credentials

__all__ = [
    # serving
    "make_app",
    "serve",
    # how it was started
    "WebSettings",
    "SettingError",
    "credentials",
    "AUTH_ENV",
    "PAGE_SIZE",
    "MAX_LIMIT",
    "MAX_DEPTH",
]
