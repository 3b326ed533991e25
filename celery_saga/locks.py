"""Semantic locks and running limits: ``Saga(lock=..., on_locked=..., lock_timeout=..., max_running=...)``.

A saga that names a lock (``lock="order:{order_id}"``) holds it from its
start until it ends COMPLETED or COMPENSATED; another saga, of any name, that
formats the same lock waits (or, ``on_locked="reject"``, is refused with
`SagaLocked`). ``max_running=N`` is a shared resource of N slots per saga
name. The resources live in the store and move with the saga's own
transitions (``store/locks.lua``): taken at its start, given back by the
transition that ends it, which also lets the next waiters start. (On a Redis
Cluster, by a lock script called beside those transitions, whose crash
points sweepers repair: ``store/cluster_locks.py``.)

This module turns a definition into the resources a start names, and reads
them back for operators: `lock_status`, `list_locks`, `unlock_saga`.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery

from .errors import SagaDataError, SagaDefinitionError, SagaNotFound, SagaStateError
from .follow import follow
from .state import SagaState
from .store import Outcome
from .stores import store_for

__all__ = [
    "LockQueue",
    "SagaLocks",
    "list_locks",
    "lock_resources",
    "lock_status",
    "lock_templates",
    "render_locks",
    "resource_name",
    "unlock_saga",
]

logger = logging.getLogger("celery_saga")

ON_LOCKED = ("queue", "reject")
#: The longest lock name, in characters.
MAX_LOCK_LENGTH = 200
_FORBIDDEN = set("{}\x00 \t\r\n")


def lock_templates(saga: str, lock: Any) -> tuple[str, ...]:
    """``Saga(lock=...)`` checked: format strings over start kwargs, by name only (``"order:{order_id}"``)."""
    if lock is None:
        return ()
    templates = (lock,) if isinstance(lock, str) else lock
    try:
        templates = tuple(templates)
    except TypeError:
        raise SagaDefinitionError(f"saga {saga!r}: lock must be a string or a list of strings, not {lock!r}") from None
    for t in templates:
        if not isinstance(t, str) or not t:
            raise SagaDefinitionError(f"saga {saga!r}: lock {t!r} is no lock name, such as 'order:{{order_id}}'")
        try:
            parsed = list(string.Formatter().parse(t))
        except ValueError as exc:
            raise SagaDefinitionError(f"saga {saga!r}: lock {t!r} is no format string: {exc}") from None
        for literal, field, spec, conversion in parsed:
            if _FORBIDDEN & set(literal):
                raise SagaDefinitionError(f"saga {saga!r}: lock {t!r} may hold no braces, spaces or NUL but fields")
            if field is not None and (not field.isidentifier() or spec or conversion):
                raise SagaDefinitionError(
                    f"saga {saga!r}: lock {t!r}: {{{field}}} must name a start kwarg, as in {{order_id}}"
                )
    if len(set(templates)) != len(templates):
        raise SagaDefinitionError(f"saga {saga!r}: lock {list(templates)!r} names a lock twice")
    return templates


def render_locks(saga: str, templates: Sequence[str], data: Mapping[str, Any]) -> tuple[str, ...]:
    """The locks a start with ``data`` takes.

    Raises:
        SagaDefinitionError: a lock names a kwarg the start does not have.
        SagaDataError: a kwarg a lock names is not a string or an integer, or makes no lock name.
    """
    locks = []
    for t in templates:
        values = {}
        for _, field, _, _ in string.Formatter().parse(t):
            if field is None:
                continue
            if field not in data:
                raise SagaDefinitionError(
                    f"saga {saga!r}: lock {t!r} needs the kwarg {field!r}, which this start does not have"
                )
            value = data[field]
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise SagaDataError(f"saga {saga!r}: lock {t!r}: {field} is {type(value).__name__}, not str or int")
            values[field] = value
        name = t.format(**values)
        if _FORBIDDEN & set(name) or len(name) > MAX_LOCK_LENGTH:
            raise SagaDataError(
                f"saga {saga!r}: lock {name[:60]!r} has braces, spaces or NUL, or is over {MAX_LOCK_LENGTH} characters"
            )
        locks.append(name)
    return tuple(dict.fromkeys(locks))  # two templates may format one lock: take it once


def lock_resources(locks: Sequence[str], name: str, max_running: int | None) -> tuple[tuple[str, int], ...]:
    """What a start takes (store/locks.lua): each lock (``l:<lock>``, one holder) and its running slot."""
    found = [(f"l:{lock}", 1) for lock in locks]
    if max_running is not None:
        found.append((f"n:{name}", max_running))
    return tuple(found)


def resource_name(resource: str) -> str:
    """A resource as people name it: ``order:7``, or ``max_running of place_order``."""
    kind, _, rest = resource.partition(":")
    return f"max_running of {rest}" if kind == "n" else rest


@dataclass(frozen=True)
class LockQueue:
    """One lock (or running limit): who holds it and who waits for it, first first."""

    lock: str
    holders: tuple[str, ...]
    waiters: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"lock": self.lock, "holders": list(self.holders), "waiters": list(self.waiters)}


@dataclass(frozen=True)
class SagaLocks:
    """A saga's locks: ``held`` or ``waiting`` (or None: it has none, or gave them back), and each lock's queue.

    ``position`` is the saga's place in the queue of each lock it waits for (1: next).
    """

    status: str | None
    locks: tuple[LockQueue, ...]
    position: Mapping[str, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "locks": [q.to_json() for q in self.locks],
            "position": dict(self.position),
        }

    def text(self) -> str:
        """One line for ``celery saga show``: what it holds, or waits for and behind whom."""
        names = ", ".join(q.lock for q in self.locks)
        if self.status == "held":
            return f"holds {names}"
        if self.status != "waiting":
            return f"gave back {names}"
        parts = []
        for q in self.locks:
            held = f"held by {', '.join(q.holders)}" if q.holders else "free"
            parts.append(f"{q.lock} ({held}; position {self.position.get(q.lock, '?')})")
        return "waiting for lock " + ", ".join(parts)


def lock_status(app: Celery, state: SagaState) -> SagaLocks | None:
    """The locks of a saga and their queues, read now; None if it names none."""
    if not state.locks:
        return None
    store = store_for(app)
    queues, position = [], {}
    for resource in state.locks:
        holders, waiters = store.lock_queue(resource)
        name = resource_name(resource)
        queues.append(LockQueue(name, tuple(holders), tuple(waiters)))
        if state.saga_id in waiters:
            position[name] = waiters.index(state.saga_id) + 1
    status = {"held": "held", "wait": "waiting"}.get(state.lock_status or "")
    return SagaLocks(status, tuple(queues), position)


def list_locks(app: Celery, lock: str | None = None) -> list[LockQueue]:
    """Every lock and running limit some saga holds or waits for (or only ``lock``), by name."""
    store = store_for(app)
    resources = [f"l:{lock}"] if lock is not None else store.locks_in_use()
    found = []
    for resource in sorted(resources):
        holders, waiters = store.lock_queue(resource)
        if holders or waiters:
            found.append(LockQueue(resource_name(resource), tuple(holders), tuple(waiters)))
    return found


def unlock_saga(app: Celery, saga_id: str) -> None:
    """Give back the locks of a FAILED saga, whose entity was repaired by hand; the next waiters start.

    Raises:
        SagaNotFound: no such saga.
        SagaStateError: it is not FAILED, or holds no lock.
    """
    store = store_for(app)
    t = store.unlock(saga_id)
    if t.outcome is Outcome.MISSING:
        raise SagaNotFound(saga_id, store.where())
    if t.outcome is Outcome.NOT_ALLOWED:
        raise SagaStateError(saga_id, t.status.value if t.status else "", "unlock", "only a FAILED saga is unlocked")
    if t.outcome is Outcome.DUPLICATE:
        raise SagaStateError(saga_id, t.status.value if t.status else "", "unlock", "it holds no lock")
    # An operator's decision that the entity is consistent again: on record, and counted (/metrics).
    logger.warning("saga %s: its locks were given back by an operator (unlock); the next waiters start", saga_id)
    follow(app, store, t)
