"""A fake service ledger in Redis, so the effect of every step and compensation is visible.

Each service keeps a hash of the effects it applied, keyed by the idempotency
key of the step that applied them (``current_step().forward_key``). A
compensation removes the effect of its step by that same key, never by what
the step returned: so it also works blind, when the step's outcome is unknown
(it missed its deadline, or the saga was cancelled while it ran) and
``step_result`` is None. Applying twice, or undoing twice, changes nothing.

Every apply and undo is also written to a journal per saga, so the demo can
show what each service did, when, and in which compensation round.

The "slow" fake APIs block on a gate: ``wait_at_gate`` waits until someone
calls ``open_gate`` with the step's key, or until a bounded time has passed.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from celery_saga import current_step

from .app import PREFIX, REDIS_URL

#: How long journals and unused gate answers are kept, seconds.
KEEP = 24 * 3600

_client: redis.Redis | None = None


def client() -> redis.Redis:
    global _client
    if _client is None:
        # redis-py 8 defaults to a 5 s socket timeout, shorter than a gate may block.
        _client = redis.Redis.from_url(REDIS_URL, decode_responses=True, socket_timeout=120)
    return _client


def _key(service: str) -> str:
    return f"{PREFIX}:ledger:{service}"


def _journal_key(saga_id: str) -> str:
    return f"{PREFIX}:ledger-journal:{saga_id}"


def _gate_key(step_key: str) -> str:
    return f"{PREFIX}:gate:{step_key}"


def _note(service: str, what: str, key: str, effect: dict[str, Any] | None) -> None:
    ctx = current_step()
    if ctx is None:
        return
    entry = {
        "at": time.time(),
        "service": service,
        "step": ctx.step,
        "what": what,
        "key": key,
        "round": ctx.round if ctx.compensating else 0,
        "result_known": ctx.result_known,
        "effect": effect,
    }
    pipe = client().pipeline(transaction=False)
    pipe.rpush(_journal_key(ctx.saga_id), json.dumps(entry))
    pipe.expire(_journal_key(ctx.saga_id), KEEP)
    pipe.execute()


def apply(service: str, effect: dict[str, Any]) -> None:
    """Record an effect under the current step's idempotency key."""
    ctx = current_step()
    key = ctx.idempotency_key if ctx else "outside-a-saga"
    added = client().hsetnx(_key(service), key, json.dumps(effect))
    _note(service, "applied" if added else "already applied", key, effect)


def note(service: str, what: str) -> None:
    """Journal something the current step did that left no effect (a refused request)."""
    ctx = current_step()
    _note(service, what, ctx.idempotency_key if ctx else "outside-a-saga", None)


def find(service: str, forward_key: str) -> dict[str, Any] | None:
    """The effect a service holds under a forward step's idempotency key, if any."""
    raw = client().hget(_key(service), forward_key)
    return json.loads(raw) if raw is not None else None


def revert(service: str) -> dict[str, Any] | None:
    """Remove the effect of the step being compensated; return it, or None if there was none.

    Looked up by the forward step's idempotency key, so a blind compensation
    (``result_known`` False, ``step_result`` None) finds an effect the step
    had before its outcome got lost, and a second round finds one it had late.
    """
    ctx = current_step()
    assert ctx is not None and ctx.compensating
    pipe = client().pipeline(transaction=True)
    pipe.hget(_key(service), ctx.forward_key)
    pipe.hdel(_key(service), ctx.forward_key)
    raw, removed = pipe.execute()
    effect = json.loads(raw) if removed and raw is not None else None
    _note(service, "undone" if effect is not None else "nothing to undo", ctx.forward_key, effect)
    return effect


def effects(service: str, saga_id: str | None = None) -> dict[str, Any]:
    """The effects a service still holds, optionally only those of one saga."""
    raw = client().hgetall(_key(service))
    return {str(k): json.loads(v) for k, v in raw.items() if saga_id is None or str(k).startswith(f"{saga_id}:")}


def journal(saga_id: str) -> list[dict[str, Any]]:
    """What the services did for one saga, in order: every apply and undo, with its round."""
    return [json.loads(e) for e in client().lrange(_journal_key(saga_id), 0, -1)]


def wait_at_gate(seconds: float) -> str | None:
    """Block the current step until its gate opens; return the answer, or None after ``seconds``."""
    ctx = current_step()
    key = ctx.forward_key if ctx else "outside-a-saga"
    got = client().blpop([_gate_key(key)], timeout=seconds)
    return str(got[1]) if got else None


def open_gate(step_key: str, answer: str = "open") -> None:
    """Let the step waiting at the gate of ``step_key`` (``<saga id>:<step>``) go on, now or when it gets there."""
    pipe = client().pipeline(transaction=True)
    pipe.delete(_gate_key(step_key))
    pipe.rpush(_gate_key(step_key), answer)
    pipe.expire(_gate_key(step_key), KEEP)
    pipe.execute()
