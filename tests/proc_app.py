"""The app that `celery worker` subprocesses run in tests: ``celery -A tests.proc_app worker``.

Configured from environment variables, so each test gets its own Redis
prefix and queue:

=============================  ==============================================
CELERY_SAGA_TEST_BROKER        Redis URL (broker and saga store)
CELERY_SAGA_TEST_PREFIX        saga key prefix; ledger and gates live under it
CELERY_SAGA_TEST_QUEUE         the queue every task is sent to
CELERY_SAGA_TEST_VISIBILITY    optional Redis visibility timeout, seconds
=============================  ==============================================

Tests import ``create`` to get a client app with the same tasks and sagas;
only the worker (the env vars set) gets ``app`` and the crash hooks.

The step tasks write a ledger in Redis and misbehave when the saga data says
so: ``fail={"proc.three": "why"}`` raises, ``die_in="proc.die"`` SIGKILLs the
pool child, ``block_in="proc.slow"`` waits on a gate nobody opens, and
``crash_worker_before="proc.two"`` SIGKILLs the whole worker while the
message of that step is being published.
"""

from __future__ import annotations

import json
import os
import signal
from types import SimpleNamespace
from typing import Any

import redis
from celery import Celery, signals

from celery_saga import Saga, current_step, enable, saga_step

ENV_BROKER = "CELERY_SAGA_TEST_BROKER"
ENV_PREFIX = "CELERY_SAGA_TEST_PREFIX"
ENV_QUEUE = "CELERY_SAGA_TEST_QUEUE"
ENV_VISIBILITY = "CELERY_SAGA_TEST_VISIBILITY"


def worker_env(redis_url: str, prefix: str, queue: str) -> dict[str, str]:
    """The environment of a subprocess (worker, Flower) running this app."""
    env = {**os.environ, ENV_BROKER: redis_url, ENV_PREFIX: prefix, ENV_QUEUE: queue, "PYTHONUNBUFFERED": "1"}
    env.pop(ENV_VISIBILITY, None)
    env.pop("FLOWER_UNAUTHENTICATED_API", None)
    return env


def kombu_prefix(prefix: str) -> str:
    """Kombu's global key prefix: queues and the unacked hash are private to one test."""
    return f"{prefix}:kombu:"


def _in_pool_child() -> bool:
    # The worker runs in its own session (start_new_session=True), so its main
    # process leads the process group and a pool child's parent is that
    # leader. Checked before any kill: a hook that fired anywhere else (say a
    # test process) must never signal its parent.
    return os.getpid() != os.getpgid(0) and os.getppid() == os.getpgid(0)


def create(broker_url: str, prefix: str, queue: str, visibility_timeout: float | None = None) -> SimpleNamespace:
    """An app with the test tasks and sagas, for one prefix and queue."""
    # shared=False on every task: a shared task would also be registered, with
    # this call's closures, in every app created after it.
    app = Celery(f"proc-{prefix}", broker=broker_url, set_as_current=False)
    transport: dict[str, Any] = {"global_keyprefix": kombu_prefix(prefix)}
    if visibility_timeout is not None:
        # kombu sweeps for expired unacked messages every
        # unacked_restore_interval * unacked_restore_throttle seconds (100 by
        # default); 1 * 1 makes a dead worker's message come back within ~1 s
        # of its visibility timeout.
        transport.update(visibility_timeout=visibility_timeout, unacked_restore_interval=1, unacked_restore_throttle=1)
    app.conf.update(
        task_default_queue=queue,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        saga_key_prefix=prefix,
        saga_compensation_retry_backoff=0.05,
        saga_compensation_retry_backoff_max=0.5,
        task_allow_error_cb_on_chord_header=False,
        worker_enable_remote_control=False,
        worker_prefetch_multiplier=1,
    )
    # Enable now rather than at finalize, so celery_saga's signal handlers
    # are connected before the worker hooks below.
    enable(app)
    client = redis.Redis.from_url(broker_url, decode_responses=True)
    ledger = f"{prefix}:ledger"

    def log(action: str, step: str, *extra: Any) -> None:
        client.rpush(ledger, json.dumps([action, step, *extra]))

    def behave(name: str, data: dict[str, Any]) -> None:
        ctx = current_step()
        saga_id = ctx.saga_id if ctx else "-"
        if data.get("die_in") == name and client.set(f"{prefix}:died:{saga_id}", "1", nx=True):
            log("dying", name)
            if not _in_pool_child():
                raise RuntimeError("die_in only works in a prefork pool child")
            os.kill(os.getpid(), signal.SIGKILL)
        if data.get("block_in") == name:
            client.rpush(f"{prefix}:entered:{name}", "1")
            # Nobody opens this gate: the hard time limit must end the step
            # long before the timeout does.
            if client.blpop([f"{prefix}:gate:{name}"], timeout=90) is None:
                raise TimeoutError(f"gate {name} never opened")
        fail = data.get("fail") or {}
        if name in fail:
            raise RuntimeError(fail[name])
        log("do", name)

    @app.task(name="proc.undo", shared=False, acks_late=True)
    def undo(order_id: int, step_result: Any = None) -> None:
        ctx = current_step()
        assert ctx is not None and ctx.compensating
        log("undo", ctx.step, step_result)

    @saga_step(compensate=undo)
    @app.task(name="proc.one", shared=False, acks_late=True)
    def one(order_id: int, **data: Any) -> dict[str, Any]:
        behave("proc.one", data)
        return {"reservation": f"r-{order_id}"}

    @saga_step(compensate=undo)
    @app.task(name="proc.two", shared=False, acks_late=True)
    def two(order_id: int, reservation: str, **data: Any) -> dict[str, Any]:
        behave("proc.two", data)
        return {"payment": f"p-{order_id}-{reservation}"}

    @saga_step(compensate=undo)
    @app.task(name="proc.three", shared=False, acks_late=True)
    def three(order_id: int, payment: str, **data: Any) -> dict[str, Any]:
        behave("proc.three", data)
        return {"tracking": f"t-{order_id}-{payment}"}

    # Not acks_late: a lost pool child acks the message, so nothing requeues it.
    @saga_step(compensate=undo)
    @app.task(name="proc.die", shared=False)
    def die(order_id: int, **data: Any) -> None:
        behave("proc.die", data)

    @saga_step(compensate=undo)
    @app.task(name="proc.slow", shared=False, time_limit=1)
    def slow(order_id: int, **data: Any) -> None:
        behave("proc.slow", data)

    sequential = Saga("proc_seq", [one, two, three])
    dies = Saga("proc_die", [one, two, die, three])
    limited = Saga("proc_limit", [one, two, slow, three])
    return SimpleNamespace(**{k: v for k, v in locals().items() if not k.startswith("_")})


def _connect_worker_hooks(ns: SimpleNamespace) -> None:
    """Hooks for the worker process only: never connected in the test process."""
    client: redis.Redis = ns.client
    prefix: str = ns.prefix

    def crash_before_publish(body: Any = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
        # Protocol 2 bodies are (args, kwargs, embed).
        kwargs = body[1] if isinstance(body, (list, tuple)) and len(body) > 1 else {}
        target = kwargs.get("crash_worker_before") if isinstance(kwargs, dict) else None
        if not target or (headers or {}).get("saga_step") != target:
            return
        saga_id = (headers or {}).get("saga_id")
        # Once per saga: the re-published copy of the step must go out.
        if not client.set(f"{prefix}:crashed:{saga_id}", "1", nx=True):
            return
        if not _in_pool_child():
            return
        client.rpush(ns.ledger, json.dumps(["crash", target]))
        os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    def record_failure(task_id: str | None = None, exception: BaseException | None = None, **_: Any) -> None:
        # Connected after celery_saga's own handler, so an entry here means
        # that handler has finished with this call.
        client.rpush(f"{prefix}:failures", json.dumps([task_id, type(exception).__name__, os.getpid()]))

    signals.before_task_publish.connect(crash_before_publish, weak=False)
    signals.task_failure.connect(record_failure, weak=False)


if os.environ.get(ENV_BROKER):
    _visibility = os.environ.get(ENV_VISIBILITY)
    worker_ns = create(
        os.environ[ENV_BROKER],
        os.environ[ENV_PREFIX],
        os.environ[ENV_QUEUE],
        float(_visibility) if _visibility else None,
    )
    app = worker_ns.app
    _connect_worker_hooks(worker_ns)
