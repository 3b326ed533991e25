"""How saga data is written into the record (kombu's JSON), and shown to people and tools.

kombu's JSON serializer round-trips ``datetime``, ``date``, ``time``,
``Decimal``, ``UUID``, ``bytes`` and any type registered with
``kombu.utils.json.register_type``, as ``{"__type__": ..., "__value__": ...}``
objects. Saga kwargs, step results and bound arguments are stored that way,
whatever serializer the app's messages use, so steps and compensations get
the same Python types back. The Lua transitions never decode data. What JSON
would encode, but not as it is (data nested too deep for a worker to pickle,
keys it would merge, text with a lone surrogate), `check` refuses: `dumps`
runs it first when given ``max_depth``.

Where data is shown (message ``kwargsrepr`` for Flower, events and logs;
``celery saga show``), `masked` hides the keys a saga redacts, and
`jsonable` turns kombu's types into strings. Texts (errors, what a step
returns) are masked by value: `secret_values` are the redacted keys' values,
which `masked_text` and `redacted` replace.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from typing import Any

from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads

__all__ = [
    "MASK",
    "SECRET_MIN_LENGTH",
    "STORABLE",
    "Unstorable",
    "check",
    "dumps",
    "jsonable",
    "loads",
    "masked",
    "masked_text",
    "redacted",
    "secret_values",
    "unstorable",
    "why_unstorable",
]

#: What a redacted value is shown as.
MASK = "***"

#: What the record holds, for error messages.
STORABLE = (
    "JSON types (dict with str keys, list, str, int, float, bool, None), datetime, date, time, "
    "Decimal, UUID, bytes, or a type registered with kombu.utils.json.register_type"
)


class Unstorable(ValueError):
    """A part of a value the record cannot hold, found by `check`.

    Attributes:
        path: Where it is (``items[2].price``; ``root`` first, if given).
        what: What it is, starting with its type: ``dict nested deeper than 64 levels``.
    """

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self.what = what
        super().__init__(f"{path} is of type {what}")


def check(value: Any, max_depth: int, root: str = "") -> None:
    """Refuse what JSON would encode, but not as it is: too deep, keys that merge, text that is not UTF-8.

    - Containers (dicts, lists, tuples) more than ``max_depth`` deep: a
      prefork worker's main process pickles a message's data for its pool,
      and about 480 levels of nesting raised RecursionError there, which
      killed the worker (and the redelivered message the next one).
    - Keys that are the same once JSON makes them strings (``1`` and ``"1"``,
      ``True`` and ``"true"``): JSON keeps only one of them, silently.
    - Strings with a lone surrogate (U+D800 to U+DFFF unpaired): JSON escapes
      it, but it is no text in UTF-8, so Redis, logs and pages cannot hold it.

    Iterative, so data of any depth is refused without recursing into it.

    Raises:
        Unstorable: the first such part found.
    """
    # Containers to look into: (it, its path, its depth, and the path and type of the
    # top-level part it is in, which names a part too deep: its own path is as deep as it).
    todo: list[tuple[Any, str, int, tuple[str, str]]] = [(value, root, 1, (root, type(value).__name__))]
    while todo:
        item, path, depth, head = todo.pop()
        if depth > max_depth:
            raise Unstorable(head[0], f"{head[1]} nested deeper than {max_depth} levels (saga_max_data_depth)")
        if isinstance(item, dict):
            plain = True
            for key, sub in item.items():
                if isinstance(key, str):
                    if not key.isascii():
                        _check_text(key, f"{path}[{key!r}]", "as a key")
                    sub_path = f"{path}.{key}" if path else key
                else:
                    plain = False
                    sub_path = f"{path}[{key!r}]"
                if isinstance(sub, str):
                    if not sub.isascii():
                        _check_text(sub, sub_path)
                elif isinstance(sub, (dict, list, tuple)):
                    todo.append((sub, sub_path, depth + 1, head if depth > 1 else (sub_path, type(sub).__name__)))
            if not plain:
                _check_keys(item, path)
        elif isinstance(item, (list, tuple)):
            for i, sub in enumerate(item):
                if isinstance(sub, str):
                    if not sub.isascii():
                        _check_text(sub, f"{path}[{i}]")
                elif isinstance(sub, (dict, list, tuple)):
                    sub_path = f"{path}[{i}]"
                    todo.append((sub, sub_path, depth + 1, head if depth > 1 else (sub_path, type(sub).__name__)))
        elif isinstance(item, str) and not item.isascii():
            _check_text(item, path or "(the value itself)")


def _check_text(text: str, path: str, how: str = "") -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        lone = text[exc.start : exc.end]
        where = f" ({how})" if how else ""
        raise Unstorable(path, f"str{where} with a lone surrogate {lone!r}, which is no text in UTF-8") from None


def _check_keys(item: dict[Any, Any], path: str) -> None:
    """Refuse keys of one dict that JSON would make the same string (it keeps only the last)."""
    seen: dict[str, Any] = {}
    for key in item:
        text = _json_key(key)
        if text is None:
            continue  # a key JSON refuses outright: `dumps` says so
        if text in seen:
            raise Unstorable(
                path or "(the value itself)",
                f"dict with the keys {seen[text]!r} and {key!r}, which JSON makes the same string {text!r}: "
                f"one would be lost",
            )
        seen[text] = key


def _json_key(key: Any) -> str | None:
    """The string JSON makes of a dict key (as ``json.dumps`` does), or None for a key it refuses."""
    if isinstance(key, str):
        return key
    if key is True:
        return "true"
    if key is False:
        return "false"
    if key is None:
        return "null"
    if isinstance(key, int):
        return int.__repr__(key)
    if isinstance(key, float) and math.isfinite(key):
        return float.__repr__(key)
    return None


def dumps(value: Any, *, max_depth: int | None = None, **kwargs: Any) -> str:
    """Encode ``value`` for the record. Raises TypeError or ValueError for what it cannot hold.

    With ``max_depth`` (``saga_max_data_depth``), what `check` refuses
    raises `Unstorable` (a ValueError) first.
    """
    if max_depth is not None:
        check(value, max_depth)
    return str(kombu_dumps(value, allow_nan=False, **kwargs))  # type: ignore[no-untyped-call]


def loads(text: str) -> Any:
    """Decode what `dumps` wrote, with kombu's types restored."""
    if isinstance(text, str) and "__type__" not in text:
        # Nothing for kombu's object hook to restore (it only turns
        # {"__type__": ..., "__value__": ...} objects into types, and `dumps`
        # never escapes those letters): the plain decoder, without a Python
        # call per object, is about 40% faster on a step's data.
        return json.loads(text)
    return kombu_loads(text)  # type: ignore[no-untyped-call]


def unstorable(value: Any, root: str = "", max_depth: int | None = None) -> tuple[str, str] | None:
    """The first part of ``value`` the record cannot hold: (its key path, its type name), or None.

    Paths read like ``items[2].price``; a dict key JSON cannot make a string
    is itself reported. With ``max_depth``, what `check` refuses comes first
    (its type name then says why: ``dict nested deeper than 64 levels``).
    """
    if max_depth is not None:
        try:
            check(value, max_depth, root)
        except Unstorable as exc:
            return exc.path, exc.what
    if isinstance(value, dict):
        for key, item in value.items():
            if _json_key(key) is None:
                return (f"{root}[{key!r}]" if root else f"[{key!r}]"), f"{type(key).__name__} (as a key)"
            found = unstorable(item, f"{root}.{key}" if root else key)
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = unstorable(item, f"{root}[{i}]")
            if found:
                return found
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return root or "(the value itself)", f"float {value!r}"
    try:
        dumps(value)
    except (TypeError, ValueError):
        return root or "(the value itself)", type(value).__name__
    return None


def why_unstorable(value: Any, root: str = "", max_depth: int | None = None) -> str:
    """Which part of ``value`` the record cannot hold, said for an error message."""
    found = unstorable(value, root, max_depth)
    if found is None:
        return "it cannot be encoded"
    path, type_name = found
    return f"{path} is of type {type_name}"


def masked(value: Any, keys: Collection[str]) -> Any:
    """``value`` with the value of every dict key in ``keys`` replaced by ``***``, at any depth."""
    if not keys:
        return value
    if isinstance(value, dict):
        return {k: MASK if k in keys else masked(v, keys) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [masked(v, keys) for v in value]
    return value


#: Shorter values are not looked for in texts: masking every "12" would garble a text and hide little.
SECRET_MIN_LENGTH = 3


def secret_values(value: Any, keys: Collection[str]) -> tuple[str, ...]:
    """The values of the dict keys in ``keys`` (at any depth) as a text may hold them: longest first.

    A redacted dict or list gives each value in it. Each value comes as its
    ``str`` and, for a string, as it reads in a ``repr`` too; booleans, None
    and values shorter than `SECRET_MIN_LENGTH` are left out.
    """
    found: set[str] = set()

    def leaves(v: Any) -> None:
        if isinstance(v, dict):
            for item in v.values():
                leaves(item)
        elif isinstance(v, (list, tuple, set, frozenset)):
            for item in v:
                leaves(item)
        elif v is not None and not isinstance(v, bool):
            text = v if isinstance(v, str) else str(v)
            found.add(text)
            if isinstance(v, str):
                found.add(repr(v)[1:-1])

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for k, item in v.items():
                (leaves if k in keys else walk)(item)
        elif isinstance(v, (list, tuple)):
            for item in v:
                walk(item)

    if keys:
        walk(value)
    return tuple(sorted((s for s in found if len(s) >= SECRET_MIN_LENGTH), key=len, reverse=True))


def masked_text(text: str, secrets: Collection[str]) -> str:
    """``text`` with every one of ``secrets`` (`secret_values`, longest first) replaced by ``***``."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redacted(value: Any, keys: Collection[str], secrets: Collection[str]) -> Any:
    """``value`` as it may be shown: `masked` by ``keys``, and any of ``secrets`` in it masked too.

    A string with a secret in it has the secret replaced; a number that is
    one is ``***``. ``value`` itself is never changed.
    """
    if not keys and not secrets:
        return value
    if isinstance(value, dict):
        return {k: MASK if k in keys else redacted(v, keys, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted(v, keys, secrets) for v in value]
    if isinstance(value, str):
        return masked_text(value, secrets)
    if value is not None and not isinstance(value, bool) and secrets and str(value) in secrets:
        return MASK
    return value


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types, for people and tools: kombu's types become strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
