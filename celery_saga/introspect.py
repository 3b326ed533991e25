"""Looking at Celery task objects and functions without running or evaluating them.

``@app.task`` returns a lazy proxy until the app is finalized, and touching
any attribute of it creates the task and loads the app's configuration.
Decorating and defining sagas happens at import time, where that must not
happen, so names and apps are read from the proxy's own arguments.

`params_of` reads which keyword arguments a function takes, so that steps,
compensations and callbacks get only the saga data they declare.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task, current_app
from celery.canvas import Signature
from celery.local import PromiseProxy, Proxy
from celery.utils.imports import gen_task_name

__all__ = ["Params", "is_proxy", "is_task", "params_of", "task_app", "task_name"]


def _promise_parts(obj: Proxy) -> tuple[Celery, Any, dict[str, Any]] | None:
    """(app, function, options) of an unevaluated ``app.task`` proxy, else None."""
    if not isinstance(obj, PromiseProxy) or obj.__evaluated__():
        return None
    local = object.__getattribute__(obj, "_Proxy__local")
    args = object.__getattribute__(obj, "_Proxy__args")
    kwargs = object.__getattribute__(obj, "_Proxy__kwargs")
    app = getattr(local, "__self__", None)
    if not isinstance(app, Celery) or not args:
        return None
    return app, args[0], dict(kwargs)


def _shared_parts(obj: Proxy) -> tuple[str | None, Any] | None:
    """(name option, function) of a ``@shared_task`` proxy, else None.

    ``@shared_task`` returns a proxy that looks its task up in the current
    app on every use; evaluating it would finalize that app, at import time.
    Its name option and function are the free variables of its lookup.
    """
    if isinstance(obj, PromiseProxy):
        return None
    local = object.__getattribute__(obj, "_Proxy__local")
    code = getattr(local, "__code__", None)
    if getattr(local, "__name__", "") != "task_by_cons" or code is None or local.__closure__ is None:
        return None
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in local.__closure__), strict=True))
    if "fun" not in cells:
        return None
    return cells.get("name"), cells["fun"]


def is_proxy(obj: Any) -> bool:
    """True for a Celery proxy. ``isinstance(proxy, X)`` for any other X would evaluate it."""
    return issubclass(type(obj), Proxy)


def is_task(obj: Any) -> bool:
    """True for a Celery task or a task proxy (checked without evaluating it)."""
    return is_proxy(obj) or isinstance(obj, Task)


def task_name(obj: Any) -> str:
    """The Celery name of a task, task proxy, signature or name."""
    if is_proxy(obj):
        parts = _promise_parts(obj)
        if parts is not None:
            app, fun, opts = parts
            return str(opts.get("name") or app.gen_task_name(fun.__name__, fun.__module__))
        shared = _shared_parts(obj)
        if shared is not None:
            name, fun = shared
            # Named as every app names it; only a task defined in __main__ takes the app's name.
            return str(name or gen_task_name(current_app, fun.__name__, fun.__module__))
        return str(obj.name)
    if isinstance(obj, str):
        return obj
    if isinstance(obj, Signature):
        return str(obj.task)
    return str(obj.name)


def task_app(obj: Any) -> Celery | None:
    """The app a task belongs to, if that is known without evaluating it."""
    if is_proxy(obj):
        parts = _promise_parts(obj)
        if parts is not None:
            return parts[0]
        if isinstance(obj, PromiseProxy) and obj.__evaluated__():
            return obj._app
        return None
    if isinstance(obj, Task):
        return obj._app
    if isinstance(obj, Signature):
        app = obj._app
        return app if isinstance(app, Celery) else None
    return None


@dataclass(frozen=True)
class Params:
    """Which keyword arguments a function accepts."""

    names: frozenset[str]
    takes_all: bool

    def pick(self, data: dict[str, Any]) -> dict[str, Any]:
        """The part of ``data`` the function accepts."""
        if self.takes_all:
            return dict(data)
        return {k: v for k, v in data.items() if k in self.names}


def params_of(fn: Callable[..., Any]) -> Params:
    """The keyword parameters of ``fn``; a signature that cannot be read takes everything."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return Params(frozenset(), True)
    names = frozenset(p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    takes_all = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    return Params(names, takes_all)
