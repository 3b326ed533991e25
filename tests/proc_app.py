"""The app that `celery worker` subprocesses run in tests: ``celery -A tests.proc_app worker``.

Configured from environment variables, so each test gets its own Redis
prefix and queue:

=============================  ==============================================
CELERY_SAGA_TEST_BROKER        Redis URL (broker and saga store)
CELERY_SAGA_TEST_PREFIX        saga key prefix; ledger and gates live under it
CELERY_SAGA_TEST_QUEUE         the queue every task is sent to
CELERY_SAGA_TEST_VISIBILITY    optional Redis visibility timeout, seconds
CELERY_SAGA_TEST_SWEEPER       "0": no deadline sweeper thread in the worker
                               (``saga_sweeper = False``); default: one runs
=============================  ==============================================

Tests import ``create`` to get a client app with the same tasks and sagas;
only the worker (the env vars set) gets ``app`` and the crash hooks.

The step tasks write a ledger in Redis and misbehave when the saga data says
so: ``fail={"proc.three": "why"}`` raises, ``die_in="proc.die"`` SIGKILLs the
pool child, ``block_in="proc.slow"`` waits on a gate nobody opens, and
``crash_worker_before="proc.two"`` SIGKILLs the whole worker while the
message of that step is being published, and ``deep_result=480`` makes
``proc.one`` return, beside its reservation, a ``blob`` nested that deep.

The deadline tasks (``proc.t.*``, for tests/test_timeouts_process.py) are
modelled on tests/timed_shop.py: a forward step records its effect under
its idempotency key (``<prefix>:effects``) and adds its ``qty`` to
``<prefix>:stock``; its compensation (``proc.t.undo``, or
``proc.t.undo_elsewhere`` which is routed to the queue ``<queue>-undo``)
looks the effect up by ``current_step().forward_key`` and undoes it once, so
``stock == 0`` and no ``effects`` mean no forward effect is left. Ledger
entries: ``["do", step, forward_key]``, ``["dying", step]`` and
``["undo", step, round, result_known, step_result, idempotency_key]``. The
saga data steers them: ``gates=["proc.t.hang", "undo-proc.t.reserve"]``
makes that step (or compensation) push ``[pid, worker pid, redelivered]``
to ``<prefix>:entered:<name>`` and wait until the test pushes to
``<prefix>:gate:<name>``; ``fail={"proc.t.last": "why"}`` raises;
``die_in="proc.t.requeue"`` SIGKILLs the pool child, once per saga.
``proc.t.hang_acked`` and ``proc.t.requeue`` are acks_late, the second also
``reject_on_worker_lost``; the other forward steps are not acks_late.

Every subprocess (worker or ``saga sweep``) also records, under its prefix:
``published`` ``[task_id, pid]`` for each message it publishes, ``postrun``
``[task_id, state]`` for each task run, ``revoked`` ``[task_id, expired]``.
``drop_expires="proc.t.hang"`` in the saga data strips the ``expires`` header
from that step's message when a subprocess publishes it, as a worker whose
clock runs behind the publisher's would never see it expire.
"""

from __future__ import annotations

import json
import os
import signal
import time
from types import SimpleNamespace
from typing import Any

import redis
from celery import Celery, signals

from celery_saga import Saga, current_step, enable, saga_step, step
from tests.helpers import Gates, kombu_prefix, patience

ENV_BROKER = "CELERY_SAGA_TEST_BROKER"
ENV_PREFIX = "CELERY_SAGA_TEST_PREFIX"
ENV_QUEUE = "CELERY_SAGA_TEST_QUEUE"
ENV_VISIBILITY = "CELERY_SAGA_TEST_VISIBILITY"
ENV_SWEEPER = "CELERY_SAGA_TEST_SWEEPER"
ENV_SAGA_CONF = "CELERY_SAGA_TEST_SAGA_CONF"


def worker_env(redis_url: str, prefix: str, queue: str, saga_conf: dict[str, Any] | None = None) -> dict[str, str]:
    """The environment of a subprocess (worker, Flower) running this app; ``saga_conf`` adds settings."""
    env = {**os.environ, ENV_BROKER: redis_url, ENV_PREFIX: prefix, ENV_QUEUE: queue, "PYTHONUNBUFFERED": "1"}
    env[ENV_SAGA_CONF] = json.dumps(saga_conf or {})
    env.pop(ENV_VISIBILITY, None)
    env.pop(ENV_SWEEPER, None)
    env.pop("FLOWER_UNAUTHENTICATED_API", None)
    return env


def deep_value(levels: int) -> Any:
    """A value of ``levels`` dicts, one inside the other: ``{"a": {"a": ... 1}}``."""
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


def _in_pool_child() -> bool:
    # The worker runs in its own session (start_new_session=True), so its main
    # process leads the process group and a pool child's parent is that
    # leader. Checked before any kill: a hook that fired anywhere else (say a
    # test process) must never signal its parent.
    return os.getpid() != os.getpgid(0) and os.getppid() == os.getpgid(0)


def create(
    broker_url: str,
    prefix: str,
    queue: str,
    visibility_timeout: float | None = None,
    saga_conf: dict[str, Any] | None = None,
) -> SimpleNamespace:
    """An app with the test tasks and sagas, for one prefix and queue; ``saga_conf`` adds settings."""
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
    app.conf.update(saga_conf or {})
    # Enable now rather than at finalize, so celery_saga's signal handlers
    # are connected before the worker hooks below.
    enable(app)
    client = redis.Redis.from_url(broker_url, decode_responses=True)
    # A client of its own for the gates: redis-py's default 5 s socket timeout
    # would end a BLPOP early.
    gate_client = redis.Redis.from_url(broker_url, decode_responses=True, socket_timeout=patience(120))
    gates = Gates(gate_client, prefix)
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
            # Nobody opens this gate: the hard time limit must end the step
            # long before the gate's own timeout does.
            gates.enter(name)
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
        result: dict[str, Any] = {"reservation": f"r-{order_id}"}
        if data.get("deep_result"):
            result["blob"] = deep_value(int(data["deep_result"]))
        return result

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

    # Takes a card number, which Flower and `celery saga show` must never show.
    @saga_step(compensate=undo, redact=["card_number"])
    @app.task(name="proc.pay", shared=False, acks_late=True)
    def pay(order_id: int, card_number: str, **data: Any) -> dict[str, Any]:
        log("paid", "proc.pay", card_number)
        behave("proc.pay", data)
        return {"payment": f"p-{order_id}"}

    @app.task(name="proc.notify", shared=False)
    def notify(saga_id: str) -> None:
        log("callback", saga_id)

    sequential = Saga("proc_seq", [one, two, three])
    secret = Saga("proc_secret", [one, pay, three])
    dies = Saga("proc_die", [one, two, die, three])
    limited = Saga("proc_limit", [one, two, slow, three])
    # Sagas of sagas: a child after a step, whose steps a worker dies in.
    nested = Saga("proc_nest", [one, Saga("proc_inner", [two, three])])
    nested_dies = Saga("proc_nest_die", [one, Saga("proc_inner_die", [two, die])])
    # Past its pivot (proc.two), a step whose worker is lost is sent again, not compensated.
    pivoted = Saga("proc_pivot", [one, two, die, three], pivot="proc.two")

    # -- deadline tasks (tests/test_timeouts_process.py) ------------------------------
    effects, stock = f"{prefix}:effects", f"{prefix}:stock"

    def t_gate(name: str, data: dict[str, Any]) -> None:
        if name not in (data.get("gates") or []):
            return
        request = app.current_task.request if app.current_task else None
        redelivered = bool(((request.delivery_info if request else None) or {}).get("redelivered"))
        gates.enter(name, json.dumps([os.getpid(), os.getpgid(0), redelivered]))

    def t_forward(name: str, qty: int, data: dict[str, Any]) -> dict[str, Any]:
        ctx = current_step()
        assert ctx is not None and not ctx.compensating
        if data.get("die_in") == name and client.set(f"{prefix}:died:{ctx.saga_id}:{name}", "1", nx=True):
            log("dying", ctx.step)
            if not _in_pool_child():
                raise RuntimeError("die_in only works in a prefork pool child")
            os.kill(os.getpid(), signal.SIGKILL)
        t_gate(name, data)
        fail = data.get("fail") or {}
        if name in fail:
            raise RuntimeError(fail[name])
        if client.hsetnx(effects, ctx.forward_key, qty):
            client.incrby(stock, qty)
        log("do", ctx.step, ctx.forward_key)
        return {f"{ctx.step}_qty": qty}

    def t_compensate(step_result: Any, data: dict[str, Any]) -> None:
        ctx = current_step()
        assert ctx is not None and ctx.compensating
        t_gate(f"undo-{ctx.step}", data)
        # undo_fails=N: every compensation of the saga fails N times first.
        if client.hincrby(f"{prefix}:undo-fails", ctx.idempotency_key, 1) <= int(data.get("undo_fails") or 0):
            raise RuntimeError(f"compensation of {ctx.step} is down")
        log("undo", ctx.step, ctx.round, ctx.result_known, step_result, ctx.idempotency_key)
        # Known or not, the effect is found by the forward step's key: undo it once.
        found = client.hget(effects, ctx.forward_key)
        if found is not None and client.hdel(effects, ctx.forward_key):
            client.decrby(stock, int(found))

    @app.task(name="proc.t.undo", shared=False, acks_late=True)
    def t_undo(step_result: Any = None, **data: Any) -> None:
        t_compensate(step_result, data)

    # Routed by task_routes (the `queue` task attribute is deprecated): every
    # process running this app sends it there, whoever publishes it.
    app.conf.task_routes = {"proc.t.undo_elsewhere": {"queue": f"{queue}-undo"}}

    @app.task(name="proc.t.undo_elsewhere", shared=False, acks_late=True)
    def t_undo_elsewhere(step_result: Any = None, **data: Any) -> None:
        t_compensate(step_result, data)

    @saga_step(compensate=t_undo)
    @app.task(name="proc.t.reserve", shared=False)
    def t_reserve(qty: int = 1, **data: Any) -> dict[str, Any]:
        return t_forward("proc.t.reserve", qty, data)

    @saga_step(compensate=t_undo)
    @app.task(name="proc.t.hang", shared=False)
    def t_hang(qty: int = 1, **data: Any) -> dict[str, Any]:
        return t_forward("proc.t.hang", qty, data)

    @saga_step(compensate=t_undo)
    @app.task(name="proc.t.hang_acked", shared=False, acks_late=True)
    def t_hang_acked(qty: int = 1, **data: Any) -> dict[str, Any]:
        return t_forward("proc.t.hang_acked", qty, data)

    @saga_step(compensate=t_undo)
    @app.task(name="proc.t.requeue", shared=False, acks_late=True, reject_on_worker_lost=True)
    def t_requeue(qty: int = 1, **data: Any) -> dict[str, Any]:
        return t_forward("proc.t.requeue", qty, data)

    @saga_step(compensate=t_undo)
    @app.task(name="proc.t.last", shared=False)
    def t_last(qty: int = 1, **data: Any) -> dict[str, Any]:
        return t_forward("proc.t.last", qty, data)

    # -- liveness tasks (tests/processes/test_liveness.py) ---------------------------------
    # ``sleep_for=S`` makes proc.t.sleep busy for S seconds. proc.t.beat runs
    # ``beat_for`` seconds, calling current_step().heartbeat() every
    # ``beat_every`` seconds until ``beat_until`` seconds in (default: all along).

    @saga_step(compensate=t_undo)
    @app.task(name="proc.t.sleep", shared=False)
    def t_sleep(qty: int = 1, **data: Any) -> dict[str, Any]:
        time.sleep(float(data.get("sleep_for") or 0))
        return t_forward("proc.t.sleep", qty, data)

    @saga_step(compensate=t_undo, heartbeat_timeout=1.5)
    @app.task(name="proc.t.beat", shared=False)
    def t_beat(qty: int = 1, **data: Any) -> dict[str, Any]:
        ctx = current_step()
        assert ctx is not None
        log("beating", ctx.step)
        started = time.monotonic()
        until = float(data.get("beat_until") or 1e9)
        while (elapsed := time.monotonic() - started) < float(data.get("beat_for") or 0):
            if elapsed < until:
                ctx.heartbeat()
            time.sleep(float(data.get("beat_every") or 0.5))
        return t_forward("proc.t.beat", qty, data)

    # Isolation (tests/processes/test_isolation.py): each step and compensation
    # of proc_iso_order writes [order_id, saga id, what] to <prefix>:iso as it
    # begins and ends; a step with fail=<its name> raises between the two.
    iso = f"{prefix}:iso"

    def iso_log(order_id: Any, what: str) -> None:
        ctx = current_step()
        assert ctx is not None
        client.rpush(iso, json.dumps([str(order_id), ctx.saga_id, what]))

    @app.task(name="proc.iso.undo", shared=False)
    def iso_undo(order_id: int, step_result: Any = None) -> None:
        ctx = current_step()
        assert ctx is not None
        iso_log(order_id, f"in:undo:{ctx.step}")
        iso_log(order_id, f"out:undo:{ctx.step}")

    def iso_step(name: str, order_id: int, fail: str | None) -> None:
        iso_log(order_id, f"in:{name}")
        if fail == name:
            raise RuntimeError(f"{name} declined")
        iso_log(order_id, f"out:{name}")

    @saga_step(compensate=iso_undo)
    @app.task(name="proc.iso.reserve", shared=False)
    def iso_reserve(order_id: int, fail: str | None = None) -> None:
        iso_step("reserve", order_id, fail)

    @saga_step(compensate=iso_undo)
    @app.task(name="proc.iso.charge", shared=False)
    def iso_charge(order_id: int, fail: str | None = None) -> None:
        iso_step("charge", order_id, fail)

    iso_order = Saga(
        "proc_iso_order", [step(iso_reserve, timeout=4), step(iso_charge, timeout=4)], lock="order:{order_id}"
    )

    def entered(name: str) -> list[list[Any]]:
        """Who entered gate ``name``: [pid, worker pid, redelivered] per entry."""
        return [json.loads(x) for x in gates.entered(name)]

    open_gate = gates.open

    def left() -> tuple[int, dict[str, str]]:
        """What forward effect is left: (stock, effects by forward key)."""
        return int(client.get(stock) or 0), client.hgetall(effects)  # type: ignore[return-value]

    def entries(key: str) -> list[list[Any]]:
        """The JSON entries of list ``<prefix>:<key>`` (ledger, published, postrun, revoked, failures)."""
        return [json.loads(x) for x in client.lrange(f"{prefix}:{key}", 0, -1)]

    return SimpleNamespace(**{k: v for k, v in locals().items() if not k.startswith("_")})


def _connect_worker_hooks(ns: SimpleNamespace) -> None:
    """Hooks for the worker process only: never connected in the test process."""
    client: redis.Redis = ns.client
    prefix: str = ns.prefix

    def crash_before_publish(body: Any = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
        # The test arms "<prefix>:crash-on-callback": the worker dies as it
        # sends an on_complete callback, once, after recording the saga's end.
        tid = str((headers or {}).get("id") or "")
        if tid.endswith(":on_complete") and _in_pool_child() and client.delete(f"{prefix}:crash-on-callback"):
            client.rpush(ns.ledger, json.dumps(["crash", "on_complete"]))
            os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
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

    def record_publish(body: Any = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
        headers = headers if headers is not None else {}
        kwargs = body[1] if isinstance(body, (list, tuple)) and len(body) > 1 else {}
        drop = kwargs.get("drop_expires") if isinstance(kwargs, dict) else None
        if drop and headers.get("saga_step") == drop and not headers.get("saga_undo"):
            headers["expires"] = None  # the very dict Celery publishes
        client.rpush(f"{prefix}:published", json.dumps([headers.get("id"), os.getpid()]))

    def record_postrun(task_id: str | None = None, state: str | None = None, **_: Any) -> None:
        client.rpush(f"{prefix}:postrun", json.dumps([task_id, state]))

    def record_revoked(request: Any = None, expired: bool = False, **_: Any) -> None:
        # Connected after celery_saga's own handler: it has recorded the outcome.
        client.rpush(f"{prefix}:revoked", json.dumps([getattr(request, "id", None), bool(expired)]))

    signals.before_task_publish.connect(crash_before_publish, weak=False)
    signals.before_task_publish.connect(record_publish, weak=False)
    signals.task_failure.connect(record_failure, weak=False)
    signals.task_postrun.connect(record_postrun, weak=False)
    signals.task_revoked.connect(record_revoked, weak=False)


if os.environ.get(ENV_BROKER):
    _visibility = os.environ.get(ENV_VISIBILITY)
    worker_ns = create(
        os.environ[ENV_BROKER],
        os.environ[ENV_PREFIX],
        os.environ[ENV_QUEUE],
        float(_visibility) if _visibility else None,
        json.loads(os.environ.get(ENV_SAGA_CONF) or "{}"),
    )
    app = worker_ns.app
    if os.environ.get(ENV_SWEEPER) == "0":
        app.conf.saga_sweeper = False
    _connect_worker_hooks(worker_ns)
