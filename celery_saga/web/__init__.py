"""``celery saga web``: sagas in a browser, with ``/metrics`` and a JSON API (the ``web`` extra: Tornado).

Nothing here is imported by the core package: ``celery saga web`` imports it
when it runs, and says to install ``celery-saga-engine[web]`` when Tornado
is missing.
"""

from __future__ import annotations

from .app import PAGE_SIZE, WebSettings, make_app, serve

__all__ = ["PAGE_SIZE", "WebSettings", "make_app", "serve"]
