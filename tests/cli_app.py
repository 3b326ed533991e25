"""The app of ``celery -A tests.cli_app saga ...`` in the CLI tests, and the sagas the admin tests run.

Configured from environment variables, so each test points the CLI at its
own Redis and prefix:

=========================  ====================================================
CELERY_SAGA_CLI_REDIS      Redis URL (broker and saga store)
CELERY_SAGA_CLI_PREFIX     saga key prefix; kombu's keys and the gates live under it
CELERY_SAGA_CLI_QUEUE      default queue, where ``saga retry`` sends compensations
CELERY_SAGA_CLI_STORE      optional saga store URL (a cluster's), with 8 index shards
=========================  ====================================================

Tests call ``create`` for the same app on their side, and ``every_state`` to
get one saga in each status with an in-process worker running.

The sagas' data says how their steps behave, per saga: ``fail="charge"``
raises in that step, ``hold="charge"`` waits in it on the gate
``<prefix>:gate:<token>``, and while ``<prefix>:broken:<token>`` exists every
compensation of the saga raises. Each compensation that runs appends its step
to ``<prefix>:undone:<token>``, and ``[step, round, result_known,
step_result]`` to ``<prefix>:undo-log:<token>``.

``cli_hasty`` is ``cli_order`` with a first step whose deadline is
``HASTY_TIMEOUT`` seconds: with no worker, it times out almost at once.
``cli_remote`` has a step of another service, named ``svc.charge``, whose
compensation ``svc.refund`` that service does not have.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from types import SimpleNamespace
from typing import Any

import redis
from celery import Celery

import celery_saga
from celery_saga import Saga, SagaResult, SagaStatus, current_step, saga_step, step
from tests.helpers import Gates, patience, wait_for

ENV_REDIS = "CELERY_SAGA_CLI_REDIS"
ENV_PREFIX = "CELERY_SAGA_CLI_PREFIX"
ENV_QUEUE = "CELERY_SAGA_CLI_QUEUE"
ENV_STORE = "CELERY_SAGA_CLI_STORE"
HASTY_TIMEOUT = 0.5


def measured_cli(*args: str) -> list[str]:
    """``celery -A tests.cli_app saga <args>``, printing its peak RSS (``peak-rss-kb N``) last, on stderr."""
    code = (
        "import resource, sys\n"
        "from celery.__main__ import main\n"
        f"sys.argv = ['celery', '-A', 'tests.cli_app', 'saga', *{list(args)!r}]\n"
        "try:\n    main()\n"
        "finally:\n    print('peak-rss-kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    )
    return [sys.executable, "-c", code]


def cli_env(redis_url: str, prefix: str, queue: str) -> dict[str, str]:
    """The environment of a CLI subprocess acting on this Redis and prefix."""
    return {**os.environ, ENV_REDIS: redis_url, ENV_PREFIX: prefix, ENV_QUEUE: queue, "PYTHONUNBUFFERED": "1"}


def create(redis_url: str, prefix: str, queue: str) -> SimpleNamespace:
    """An app with the test tasks and sagas, its saga store and queues under ``prefix``."""
    # shared=False on every task: a shared task would be registered, with this
    # call's closures, in every app created after it.
    app = Celery(f"cli-{prefix}-{queue}", broker=redis_url, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        broker_transport_options={"global_keyprefix": f"{prefix}:kombu:"},
        broker_connection_retry_on_startup=True,
        saga_key_prefix=prefix,
        saga_compensation_retry_backoff=0.05,
        saga_compensation_retry_backoff_max=0.5,
        task_allow_error_cb_on_chord_header=False,
        worker_hijack_root_logger=False,
    )
    if os.environ.get(ENV_STORE):  # a saga store elsewhere (a cluster), with 8 index shards
        app.conf.update(saga_redis_url=os.environ[ENV_STORE], saga_index_shards=8)
    # redis-py 8 defaults to a 5 s socket timeout, shorter than the gates block.
    client = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=patience(120))

    gates = Gates(client, prefix)

    def behave(name: str, token: str, fail: str | None, hold: str | None) -> None:
        if hold == name:
            gates.enter(token, name)
        if fail == name:
            raise RuntimeError(f"{name} declined")

    @app.task(shared=False, name="cli.undo")
    def undo(token: str, step_result: Any = None) -> None:
        ctx = current_step()
        assert ctx is not None and ctx.compensating
        if client.exists(f"{prefix}:broken:{token}"):
            raise RuntimeError(f"refund of {ctx.step} is down")
        client.rpush(f"{prefix}:undone:{token}", ctx.step)
        client.rpush(f"{prefix}:undo-log:{token}", json.dumps([ctx.step, ctx.round, ctx.result_known, step_result]))

    @saga_step(compensate=undo)
    @app.task(shared=False, name="cli.reserve")
    def reserve(token: str, fail: str | None = None, hold: str | None = None) -> dict[str, Any]:
        behave("reserve", token, fail, hold)
        return {"reservation": f"r-{token}"}

    @saga_step(compensate=undo)
    @app.task(shared=False, name="cli.charge")
    def charge(token: str, reservation: str, fail: str | None = None, hold: str | None = None) -> dict[str, Any]:
        behave("charge", token, fail, hold)
        return {"payment": f"p-{reservation}"}

    @saga_step(compensate=None)
    @app.task(shared=False, name="cli.ship")
    def ship(token: str, fail: str | None = None, hold: str | None = None) -> str:
        behave("ship", token, fail, hold)
        return "shipped"

    @app.task(shared=False, name="cli.notify")
    def notify(saga_id: str, tag: str = "") -> None:
        client.rpush(f"{prefix}:callbacks", json.dumps([tag, saga_id]))

    order = Saga("cli_order", [reserve, charge, ship], search_keys=("token", "order_id"))
    refund = Saga("cli_refund", [reserve, ship])
    locked = Saga("cli_locked", [reserve, charge], lock="order:{order_id}")
    hasty = Saga("cli_hasty", [step(reserve, timeout=HASTY_TIMEOUT), charge, ship])
    # Waits for an outside event first: with no worker, it still takes one.
    approval = Saga("cli_approval", [celery_saga.wait_for("approval", timeout=None, reject="denied"), ship])
    # A step of another service, by name, whose refund task that service lacks.
    remote = Saga("cli_remote", [reserve, step("svc.charge", compensate="svc.refund")])

    def callbacks(saga_id: str) -> list[str]:
        return [tag for tag, sid in map(json.loads, client.lrange(f"{prefix}:callbacks", 0, -1)) if sid == saga_id]

    def undo_log(token: str) -> list[list[Any]]:
        return [json.loads(x) for x in client.lrange(f"{prefix}:undo-log:{token}", 0, -1)]

    return SimpleNamespace(**{k: v for k, v in locals().items() if not k.startswith("_")})


STATES = ("PENDING", "RUNNING", "COMPENSATING", "COMPLETED", "COMPENSATED", "FAILED")


def world_fixtures(name: str) -> tuple[Any, Any]:
    """The ``fresh`` and ``world`` fixtures of a test module, building worlds under prefixes ``<name>-<random>``.

    ``fresh`` builds a world of only some statuses: ``with fresh("FAILED") as w``;
    ``world`` is a world of every status. Use: ``fresh, world = world_fixtures("x")``.
    """
    import pytest  # only the tests need it, not the CLI subprocess

    @pytest.fixture
    def fresh(redis_url: str) -> Callable[..., AbstractContextManager[SimpleNamespace]]:
        return lambda *only: every_state(redis_url, f"{name}-{uuid.uuid4().hex[:10]}", only or STATES)

    @pytest.fixture
    def world(fresh: Callable[..., AbstractContextManager[SimpleNamespace]]) -> Iterator[SimpleNamespace]:
        with fresh() as w:
            yield w

    return fresh, world


@contextmanager
def every_state(redis_url: str, prefix: str, only: tuple[str, ...] = STATES) -> Iterator[SimpleNamespace]:
    """One ``cli_order`` saga in each status of ``only`` (and one ``cli_refund``, COMPLETED), a worker running.

    Yields ``ids`` by status, ``tokens`` by status, ``shop`` (the app side)
    and ``env`` (for a CLI subprocess). On the way out every gate opens and
    every compensation is fixed before the worker stops; then the prefix's
    keys are deleted.
    """
    from celery_saga.testing import thread_worker

    queue = f"{prefix}-q"
    shop = create(redis_url, prefix, queue)
    # Nothing consumes this app's queue: its saga stays PENDING.
    parked = create(redis_url, prefix, f"{prefix}-parked")
    client = shop.client
    tokens = {status: f"{status.lower()}-{uuid.uuid4().hex[:6]}" for status in only}
    results: dict[str, SagaResult] = {}

    def status_of(status: str) -> SagaStatus:
        return results[status].state().status

    try:
        with thread_worker(shop.app):
            on_failure = shop.notify.s("failed")
            for status in only:
                token = tokens[status]
                data: dict[str, Any] = {"token": token}
                if status == "PENDING":
                    results[status] = parked.order.apply_async(kwargs=data)
                    continue
                if status == "RUNNING":
                    data["hold"] = "charge"
                elif status == "COMPENSATING":
                    # Compensations retry forever (no max retries) while broken.
                    client.set(f"{prefix}:broken:{token}", "1")
                    data["fail"] = "ship"
                elif status == "COMPENSATED":
                    data["fail"] = "charge"
                elif status == "FAILED":
                    client.set(f"{prefix}:broken:{token}", "1")
                    data["fail"] = "charge"
                # The record keeps the max retries in force at start.
                shop.app.conf.saga_compensation_max_retries = 0 if status == "FAILED" else None
                results[status] = shop.order.apply_async(kwargs=data, on_failure=on_failure)
            shop.app.conf.saga_compensation_max_retries = None
            refund = shop.refund.apply_async(kwargs={"token": f"refund-{uuid.uuid4().hex[:6]}"})

            for status in only:
                if status == "PENDING":
                    continue
                if status == "RUNNING":
                    shop.gates.wait_entered(tokens["RUNNING"])
                elif status == "COMPENSATING":
                    # Both compensations failed at least once and are retrying.
                    wait_for(
                        lambda: all(s.compensation_attempts >= 2 for s in results["COMPENSATING"].state().steps[:2]),
                        what="compensations to retry",
                    )
                wait_for(lambda s=status: status_of(s).value == s, what=f"a saga {status}")
            wait_for(lambda: refund.state().status is SagaStatus.COMPLETED, what="the refund saga")
            if "FAILED" in only:
                wait_for(lambda: shop.callbacks(results["FAILED"].id), what="on_failure of the FAILED saga")
            try:
                yield SimpleNamespace(
                    ids={s: r.id for s, r in results.items()},
                    results=results,
                    tokens=tokens,
                    refund=refund,
                    shop=shop,
                    prefix=prefix,
                    queue=queue,
                    client=client,
                    env=cli_env(redis_url, prefix, queue),
                )
            finally:
                for token in tokens.values():
                    client.delete(f"{prefix}:broken:{token}")
                    shop.gates.open(token)
                if "RUNNING" in only:
                    wait_for(lambda: status_of("RUNNING").finished, what="the held saga to finish")
                if "COMPENSATING" in only:
                    wait_for(lambda: status_of("COMPENSATING").finished, what="the compensating saga to finish")
    finally:
        for app_ns in (shop, parked):
            app_ns.app.close()
        for key in client.scan_iter(match=f"{prefix}:*", count=500):
            client.unlink(key)
        client.close()
        parked.client.close()


@contextmanager
def idle(redis_url: str, prefix: str) -> Iterator[SimpleNamespace]:
    """The app side with no worker running (nothing consumes its queue, nothing sweeps), for a CLI subprocess.

    Yields ``shop``, ``client``, ``prefix``, ``queue`` and ``env``; on the way
    out the prefix's keys are deleted.
    """
    queue = f"{prefix}-q"
    shop = create(redis_url, prefix, queue)
    try:
        yield SimpleNamespace(
            shop=shop, client=shop.client, prefix=prefix, queue=queue, env=cli_env(redis_url, prefix, queue)
        )
    finally:
        shop.app.close()
        for key in shop.client.scan_iter(match=f"{prefix}:*", count=500):
            shop.client.unlink(key)
        shop.client.close()


if os.environ.get(ENV_REDIS):
    # The whole namespace stays referenced: sagas are found through a weak registry, as module globals are.
    shop = create(os.environ[ENV_REDIS], os.environ[ENV_PREFIX], os.environ[ENV_QUEUE])
    app = shop.app
