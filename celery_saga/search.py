"""Business keys: finding sagas by a start kwarg's value (``Saga(search_keys=...)``, ``where=``).

A saga declares which of its start kwargs identify the business entity it
works on (``search_keys=("order_id", "customer_id")``). Its start indexes
their values in the same call that writes its record (store/keys.py
``k:<key>:<b>``), so a start pays no round trip more; purge removes them, and
sweepers remove those of records that expired (`Collector`), so an entry lives
as long as its saga's record.

Values are strings or integers, indexed as text: ``order_id=7`` finds a saga
started with ``order_id=7`` or ``order_id="7"``, as the command line, which has
only text, must. A kwarg that is absent (or None) is not indexed.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .errors import SagaDataError, SagaDefinitionError
from .state import search_pairs
from .store import SagaStore

__all__ = [
    "MAX_SEARCH_KEYS",
    "Collector",
    "find",
    "matches",
    "parse_where",
    "search_keys_of",
    "search_values",
    "where_pairs",
]

logger = logging.getLogger("celery_saga")

#: At most this many business keys per saga: each costs an index entry per start.
MAX_SEARCH_KEYS = 8
#: The longest value indexed, in characters: an entry should cost about 100 bytes.
MAX_VALUE_LENGTH = 200
#: How often one process's sweeper removes the entries of expired records, seconds.
COLLECT_EVERY = 60.0

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def search_keys_of(saga: str, keys: Any) -> tuple[str, ...]:
    """``Saga(search_keys=...)`` checked: names of kwargs, at most `MAX_SEARCH_KEYS`, none twice."""
    if keys is None:
        return ()
    if isinstance(keys, str):
        keys = (keys,)
    try:
        names = tuple(keys)
    except TypeError:
        raise SagaDefinitionError(
            f"saga {saga!r}: search_keys must be kwarg names, such as ('order_id',), not {keys!r}"
        ) from None
    for name in names:
        if not isinstance(name, str) or not _KEY.fullmatch(name):
            raise SagaDefinitionError(
                f"saga {saga!r}: search key {name!r} is no kwarg name (letters, digits and _, at most 64)"
            )
    if len(set(names)) != len(names):
        raise SagaDefinitionError(f"saga {saga!r}: search_keys {names!r} names a key twice")
    if len(names) > MAX_SEARCH_KEYS:
        raise SagaDefinitionError(
            f"saga {saga!r} has {len(names)} search keys; at most {MAX_SEARCH_KEYS}: index the ones "
            f"support looks sagas up by"
        )
    return names


def search_values(saga: str, keys: Sequence[str], data: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The (key, text) pairs a start indexes: each search key's kwarg, if given.

    Raises:
        SagaDataError: a value is neither a string nor an integer, or cannot be indexed.
    """
    pairs = []
    for key in keys:
        value = data.get(key)
        if value is None:
            continue
        pairs.append((key, _text(value, f"saga {saga!r}: search key {key!r}")))
    return tuple(pairs)


def where_pairs(where: Mapping[str, Any] | Iterable[str]) -> tuple[tuple[str, str], ...]:
    """``where`` as (key, text) pairs: a mapping (``{"order_id": 7}``) or ``KEY=VALUE`` strings.

    Raises:
        ValueError: an item is not KEY=VALUE, or a value cannot be a business key's.
    """
    items = where.items() if isinstance(where, Mapping) else parse_where(where)
    pairs = []
    for key, value in items:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(f"{key!r} is no business key name (letters, digits and _)")
        try:
            pairs.append((key, _text(value, f"where {key}")))
        except SagaDataError as exc:
            raise ValueError(str(exc)) from None
    return tuple(pairs)


def parse_where(items: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """``["order_id=7", ...]`` as (key, value) pairs, the values as written.

    Raises:
        ValueError: an item is not KEY=VALUE.
    """
    pairs = []
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r} is not KEY=VALUE (as in order_id=7)")
        pairs.append((key, value))
    return tuple(pairs)


def find(store: SagaStore, where: Sequence[tuple[str, str]]) -> list[str]:
    """Ids of the sagas indexed with every (key, value) of ``where``; records may have expired since."""
    found: set[str] | None = None
    for key, value in where:
        ids = store.search(key, value)
        found = ids if found is None else found & ids
        if not found:
            return []
    return sorted(found or ())


def matches(raw: Mapping[str, str], where: Sequence[tuple[str, str]]) -> bool:
    """True if the record's business keys have every value of ``where`` (its index entries may be stale)."""
    keys = dict(search_pairs(raw.get("sk", "")))
    return all(keys.get(k) == v for k, v in where)


class Collector:
    """Removes the entries of expired records, at most every `COLLECT_EVERY` seconds per process."""

    def __init__(self) -> None:
        self._next = 0.0

    def __call__(self, store: SagaStore) -> int:
        now = time.monotonic()
        if now < self._next:
            return 0
        self._next = now + COLLECT_EVERY
        removed = store.collect_search()
        if removed:
            logger.debug("celery_saga: removed %d business key entries of expired sagas", removed)
        return removed


def _text(value: Any, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise SagaDataError(f"{what} is {type(value).__name__} {value!r}: a business key is a string or an integer")
    text = str(value)
    if "\x00" in text or len(text) > MAX_VALUE_LENGTH:
        raise SagaDataError(f"{what}: {text[:40]!r}... is not indexed: at most {MAX_VALUE_LENGTH} characters, no NUL")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise SagaDataError(f"{what} {text!r} has a lone surrogate: it is no text in UTF-8") from None
    return text
