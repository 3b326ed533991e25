"""A shop with planted bugs, for the crash-point explorer's tests: ``celery -A tests.crash_shop worker``.

Its services keep their books in Redis under ``CRASH_SHOP_PREFIX`` in
``CRASH_SHOP_REDIS``, read at each call, so the explorer's workers (which
inherit the test's environment) and the test's invariant see the same books.
The explorer gives the workers everything else (broker, saga store, prefix).

Per saga, ``<prefix>:stock:<saga id>`` and ``<prefix>:charged:<saga id>``
count what is held; an undone saga has both at 0, a completed one -1 stock
and 1 charge. The correct tasks apply an effect once per idempotency key
(``SET NX`` on ``<prefix>:done:<key>``) and undo it once, whoever asks how
often. The planted bugs:

- ``release_unchecked`` gives the stock back every time it runs;
- ``charge_unkeyed`` charges every time it runs, ignoring its key;
- ``refund_by_result`` refunds by ``step_result["charge_id"]``, which is
  None when the charge's outcome is unknown.

``release_*`` and ``charge_*`` are ``acks_late`` (a killed message comes
back); ``charge_once`` and ``refund_by_result`` are not, so a killed charge
is settled by its deadline, as unknown.
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery

from celery_saga import Saga, current_step, saga_step

app = Celery("crash_shop")
# A compensation that cannot succeed ends the saga FAILED soon, not never.
app.conf.saga_compensation_max_retries = 2


def books() -> tuple[redis.Redis, str]:
    client = redis.Redis.from_url(os.environ["CRASH_SHOP_REDIS"], decode_responses=True)
    return client, os.environ["CRASH_SHOP_PREFIX"]


def _once(key: str) -> bool:
    """True the first time ``key`` is claimed: an effect under an idempotency key applies once."""
    client, prefix = books()
    with client:
        return bool(client.set(f"{prefix}:done:{key}", 1, nx=True, ex=3600))


def _add(what: str, saga_id: str, n: int) -> None:
    client, prefix = books()
    with client:
        client.incrby(f"{prefix}:{what}:{saga_id}", n)


def held(saga_id: str) -> dict[str, int]:
    """What the shop holds for a saga: stock taken (negative) and money charged."""
    client, prefix = books()
    with client:
        return {w: int(client.get(f"{prefix}:{w}:{saga_id}") or 0) for w in ("stock", "charged")}


def _ctx() -> Any:
    ctx = current_step()
    assert ctx is not None
    return ctx


# -- compensations ------------------------------------------------------------------------


@app.task(name="crash.release_checked", acks_late=True)
def release_checked(order_id: int) -> None:
    ctx = _ctx()
    if _once(f"undo:{ctx.forward_key}") and not _once(ctx.forward_key):
        _add("stock", ctx.saga_id, +1)


@app.task(name="crash.release_unchecked", acks_late=True)
def release_unchecked(order_id: int) -> None:
    _add("stock", _ctx().saga_id, +1)  # the bug: gives the stock back again on every run


@app.task(name="crash.refund_checked", acks_late=True)
def refund_checked(order_id: int) -> None:
    ctx = _ctx()
    if _once(f"undo:{ctx.forward_key}") and not _once(ctx.forward_key):
        _add("charged", ctx.saga_id, -1)


@app.task(name="crash.refund_by_result")
def refund_by_result(order_id: int, step_result: dict[str, Any] | None = None) -> None:
    charge_id = step_result["charge_id"]  # type: ignore[index]  # the bug: None when the outcome is unknown
    ctx = _ctx()
    if charge_id and _once(f"undo:{ctx.forward_key}"):
        _add("charged", ctx.saga_id, -1)


# -- steps --------------------------------------------------------------------------------


def _reserve() -> dict[str, Any]:
    ctx = _ctx()
    if _once(ctx.idempotency_key):
        _add("stock", ctx.saga_id, -1)
    return {"reservation": ctx.idempotency_key}


def _charge(order_id: int) -> dict[str, Any]:
    ctx = _ctx()
    if _once(ctx.idempotency_key):
        _add("charged", ctx.saga_id, +1)
    return {"charge_id": f"ch-{order_id}"}


@saga_step(compensate=release_checked)
@app.task(name="crash.reserve", acks_late=True)
def reserve(order_id: int) -> dict[str, Any]:
    return _reserve()


@saga_step(compensate=release_unchecked)
@app.task(name="crash.reserve_then_release_unchecked", acks_late=True)
def reserve_then_release_unchecked(order_id: int) -> dict[str, Any]:
    return _reserve()


@saga_step(compensate=refund_checked)
@app.task(name="crash.charge", acks_late=True)
def charge(order_id: int) -> dict[str, Any]:
    return _charge(order_id)


@saga_step(compensate=refund_checked)
@app.task(name="crash.charge_unkeyed", acks_late=True)
def charge_unkeyed(order_id: int) -> dict[str, Any]:
    _add("charged", _ctx().saga_id, +1)  # the bug: no idempotency key, so a second run charges again
    return {"charge_id": f"ch-{order_id}"}


@saga_step(compensate=refund_by_result)
@app.task(name="crash.charge_once")
def charge_once(order_id: int) -> dict[str, Any]:
    return _charge(order_id)


@saga_step(compensate=None)
@app.task(name="crash.decline", acks_late=True)
def decline(order_id: int) -> None:
    raise RuntimeError(f"card declined for order {order_id}")


#: No bug: every step and compensation applies once, even blind.
# Locked: every run of the explorer takes the same order's lock, so a run that left it held
# (or a waiter stuck) would keep the next run from starting.
sound = Saga("crash_sound", [reserve, charge, decline], lock="order:{order_id}")
#: Gives the stock back twice when its compensation runs twice.
double_release = Saga("crash_double_release", [reserve_then_release_unchecked, decline])
#: Charges twice when the charge runs twice.
double_charge = Saga("crash_double_charge", [reserve, charge_unkeyed])
#: Cannot refund a charge whose outcome is unknown.
blind_refund = Saga("crash_blind_refund", [reserve, charge_once])


def balanced(result: Any) -> None:
    """The shop's invariant: a completed order holds one reservation and one charge, an undone one nothing."""
    state = result.state()
    left = held(result.id)
    if state.status.value == "COMPLETED":
        assert left == {"stock": -1, "charged": 1}, f"completed, but the shop holds {left}"
    else:
        assert state.status.value == "COMPENSATED", f"the saga ended {state.status.value}: {state.error}"
        assert left == {"stock": 0, "charged": 0}, f"undone, but the shop holds {left}"
