"""Reading a compact record: how ``transitions.lua`` packs a finished saga's fields.

A finished record keeps a few fields as they are (``status``, ``name`` ...) and
the rest packed as ``<len>:<field><len>:<value>`` ..., lengths in UTF-8 bytes,
cut into the values of ``z1`` .. ``z<zn>`` (short values keep the hash in
Redis's compact listpack encoding). The script packs; readers unpack here.
"""

from __future__ import annotations

__all__ = ["unpack"]


def unpack(raw: dict[str, str]) -> dict[str, str]:
    """The record's fields, unpacked if it is compact (unchanged otherwise).

    Raises:
        ValueError: the packed fields are damaged.
    """
    count = raw.get("zn")
    if count is None:
        return raw
    parts = int(count)
    if not 0 <= parts <= len(raw):  # a damaged count must not make every reader loop for ever
        raise ValueError(f"zn is {count!r}, but the record has {len(raw)} fields")
    packed = "".join(raw.get(f"z{i}", "") for i in range(1, parts + 1)).encode()
    fields = {k: v for k, v in raw.items() if k != "zn" and not (k[:1] == "z" and k[1:].isdigit())}
    items: list[str] = []
    pos = 0
    while pos < len(packed):
        colon = packed.index(b":", pos)
        end = colon + 1 + int(packed[pos:colon])
        if end > len(packed):
            raise ValueError("packed fields cut short")
        items.append(packed[colon + 1 : end].decode())
        pos = end
    if len(items) % 2:
        raise ValueError("packed fields do not pair up")
    fields.update(zip(items[::2], items[1::2], strict=True))
    return fields
