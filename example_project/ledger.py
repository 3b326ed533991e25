"""A fake service ledger in Redis, so the effect of every step and compensation is visible.

Each service keeps a hash of the effects it applied, keyed by the idempotency
key of the step that applied them. A compensation removes the effect of its
step: applying twice, or undoing twice, changes nothing.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from celery_saga import current_step

from .app import PREFIX, REDIS_URL

_client: redis.Redis | None = None


def client() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    return _client


def _key(service: str) -> str:
    return f"{PREFIX}:ledger:{service}"


def apply(service: str, effect: dict[str, Any]) -> None:
    """Record an effect under the current step's idempotency key."""
    ctx = current_step()
    key = ctx.idempotency_key if ctx else "outside-a-saga"
    client().hsetnx(_key(service), key, json.dumps(effect))


def revert(service: str) -> bool:
    """Remove the effect of the step being compensated; True if there was one."""
    ctx = current_step()
    assert ctx is not None and ctx.compensating
    # The forward step's key is the compensation's key without its ":undo" suffix.
    forward_key = ctx.idempotency_key.removesuffix(":undo")
    return bool(client().hdel(_key(service), forward_key))


def effects(service: str, saga_id: str | None = None) -> dict[str, Any]:
    """The effects a service still holds, optionally only those of one saga."""
    raw = client().hgetall(_key(service))
    return {k: json.loads(v) for k, v in raw.items() if saga_id is None or k.startswith(saga_id)}
