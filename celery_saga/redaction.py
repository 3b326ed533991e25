"""Redaction beyond a message's kwargs: what a run returns and raises, a retried copy, and error texts.

Every saga message shows its kwargs with the redacted keys masked
(`messages`), and the record's data is masked where it is shown (`views`).
The record keeps the real values, and steps, compensations and callbacks
get them. But Celery shows more of a run than its ``kwargsrepr``: the INFO
line "Task ... succeeded in ...: <result>" and ``task-succeeded`` show what
the function returned; the ERROR line, ``task-failed`` (exception and
traceback), ``task-retried`` and a span's exception event show what it
raised; and the copy ``self.retry()`` sends is built from the request
without the original's ``kwargsrepr`` (``signature_from_request``), so its
events would show the raw kwargs. And an error text (``ValueError(f"card
{card} declined")``, a wait's reject event with its data) is recorded, then
shown by ``show``, the web view, ``SagaCompensated`` and the events. So:

- the step wrapper hands Celery `Redaction.value` of the return value. The
  record has stored the real one, saga messages ignore their result and
  carry no links, so nothing else needs it (``task_success`` and
  ``task_postrun`` receivers see the masked copy);
- it masks what the function raised in place (`Redaction.exception`)
  before Celery formats it, and records `Redaction.text` of its message;
- a ``before_task_publish`` handler (`connect_signals`) gives a copy of the
  running saga message (the same task id: ``self.retry()``) the masked
  ``kwargsrepr`` and ``argsrepr``;
- `rejection_text` is what a wait's reject event records, masked and capped.

Masked are the values of the keys the saga's plan redacts and the app's
``saga_redact_keys``; in texts, those keys' values as the message (or the
event) carried them (`codec.secret_values`).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any

from celery import Celery, signals
from celery._state import get_current_task
from celery.exceptions import Retry

from . import codec
from .messages import Headers, _shown
from .plan import Plan
from .settings import raw_conf, redact_keys
from .stores import store_for

__all__ = ["ERROR_TEXT_MAX", "Redaction", "connect_signals", "redacted_keys", "rejection_text"]

logger = logging.getLogger("celery_saga")

#: The longest error text the record keeps, in characters.
ERROR_TEXT_MAX = 2000

_connected = False
_SETTING = ("saga_redact_keys",)
_APP_KEYS: weakref.WeakKeyDictionary[Celery, tuple[tuple[Any, ...], frozenset[str]]] = weakref.WeakKeyDictionary()


def redacted_keys(app: Celery, plan: Plan | None) -> frozenset[str]:
    """The keys masked for a saga of ``plan`` handled by ``app``: the plan's, and the app's ``saga_redact_keys``.

    The plan holds the keys of the app that defined the saga; a participant
    service's own ``saga_redact_keys`` count too.
    """
    # Every message asks: read app.conf only when it changed.
    raw = raw_conf(app, _SETTING)
    cached = _APP_KEYS.get(app)
    if cached is None or cached[0] != raw:
        cached = (raw, frozenset(redact_keys(app)))
        _APP_KEYS[app] = cached
    return (cached[1] | plan.redacted_keys) if plan is not None else cached[1]


@dataclass(frozen=True)
class Redaction:
    """What to mask in what one run shows: the redacted keys, and their values as the run got them."""

    keys: frozenset[str]
    secrets: tuple[str, ...]

    @classmethod
    def of(cls, keys: frozenset[str], *data: Any) -> Redaction:
        """The redaction of ``keys``, whose values are looked for in ``data`` (a message's kwargs)."""
        if not keys:
            return NOTHING
        found: set[str] = set()
        for d in data:
            found.update(codec.secret_values(d, keys))
        return cls(keys, tuple(sorted(found, key=len, reverse=True)))

    def text(self, text: str) -> str:
        """``text`` with every secret value in it masked."""
        return codec.masked_text(text, self.secrets)

    def value(self, value: Any) -> Any:
        """A copy of ``value`` to show: redacted keys and secret values masked."""
        return codec.redacted(value, self.keys, self.secrets)

    def exception(self, exc: BaseException) -> BaseException:
        """``exc``, its message and its causes' masked in place: the exception for Celery to see.

        One whose ``__str__`` still shows a secret (it reads attributes, not
        ``args``) cannot be masked in place: a RuntimeError with its masked
        text is returned instead. A Retry is always masked in place only.
        """
        if not self.secrets:
            return exc
        chain: list[BaseException] = []
        todo = [exc]
        while todo:
            e = todo.pop()
            if any(e is seen for seen in chain):
                continue
            chain.append(e)
            self._mask(e)
            todo += [x for x in (e.__cause__, e.__context__, getattr(e, "exc", None)) if isinstance(x, BaseException)]
        if isinstance(exc, Retry) or not any(self._shows_secret(e) for e in chain):
            return exc
        replacement = RuntimeError(self.text(_described(exc)))
        replacement.__suppress_context__ = True
        return replacement

    def _mask(self, e: BaseException) -> None:
        try:
            e.args = tuple(self._arg(a) for a in e.args)
            notes = getattr(e, "__notes__", None)
            if isinstance(notes, list):
                e.__notes__ = [self._arg(n) for n in notes]
            if isinstance(e, Retry):
                # A Retry shows its message, or the repr of its exc taken when it was made.
                e.message = self._arg(e.message)
                e.excs = self._arg(e.excs)
        except Exception:  # a type that refuses new args: `exception` replaces it if it shows a secret
            logger.debug("celery_saga: could not mask the arguments of an exception", exc_info=True)

    def _arg(self, a: Any) -> Any:
        if isinstance(a, str):
            return self.text(a)
        if isinstance(a, (int, float, list, tuple, dict)) and not isinstance(a, bool):
            shown = repr(a)
            masked = self.text(shown)
            if masked != shown:
                return masked
        return a

    def _shows_secret(self, e: BaseException) -> bool:
        try:
            shown = f"{e!s} {e!r}"
        except Exception:
            return True
        return self.text(shown) != shown


#: Nothing to mask.
NOTHING = Redaction(frozenset(), ())


def _described(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:
        return type(exc).__name__


def rejection_text(event: str, data: Any, keys: frozenset[str], *known: Any) -> str:
    """What a wait rejected by ``event`` records as its error: its data masked, the text capped.

    Values of the redacted keys in ``data`` and in ``known`` (the saga's
    kwargs) are masked wherever they appear in it.
    """
    redaction = Redaction.of(keys, data, *known)
    try:
        shown = codec.dumps(codec.masked(data, keys))
    except (TypeError, ValueError):
        shown = repr(codec.masked(data, keys))
    return redaction.text(f"rejected: event {event} came with data {shown}")[:ERROR_TEXT_MAX]


def _on_before_publish(body: Any = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
    """A copy of the running saga message (``self.retry()``) shows its arguments masked, as the original did.

    Other saga messages were given their masked ``kwargsrepr`` when they were
    built (`messages`); only a copy Celery builds from the request lacks it.
    """
    if not headers or not headers.get(Headers.ID):
        return
    task = get_current_task()
    if task is None or task.request.id != headers.get("id") or not task.request.get(Headers.ID):
        return
    # Protocol 2 bodies are (args, kwargs, embed); protocol 1 has no repr headers.
    if not isinstance(body, (list, tuple)) or len(body) < 2:
        return
    args, kwargs = body[0], body[1]
    try:
        store = store_for(task.app)
        digest = headers.get(Headers.PLAN) or store.plan_digest(str(headers[Headers.ID]))
        keys = redacted_keys(task.app, store.plan(digest) if isinstance(digest, str) and digest else None)
    except Exception:
        # The plan cannot be read now: show what the original message showed.
        logger.debug("celery_saga: no plan for a retried copy's kwargsrepr; the original's is shown", exc_info=True)
        headers["kwargsrepr"] = getattr(task.request, "kwargsrepr", None) or "{...}"
        headers["argsrepr"] = getattr(task.request, "argsrepr", None) or "(...)"
        return
    if isinstance(kwargs, dict):
        headers["kwargsrepr"] = _shown(kwargs, keys)["kwargsrepr"]
    if isinstance(args, (list, tuple)) and args:
        headers["argsrepr"] = repr(tuple(codec.masked(list(args), keys)))[:1024]


def connect_signals() -> None:
    """Connect the ``before_task_publish`` handler once per process; ``enable`` calls it."""
    global _connected
    if _connected:
        return
    _connected = True
    signals.before_task_publish.connect(
        _on_before_publish, weak=False, dispatch_uid="celery_saga.redaction.before_task_publish"
    )
