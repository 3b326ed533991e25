"""What runs only inside workers: installing the step wrapper, the main-process handlers, and the bootstep.

The wrapper itself is `celery_saga.runner`; the deadline sweeper is
`celery_saga.sweeper`. Both start here, once per worker.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import Celery, Task, bootsteps, signals
from celery.exceptions import TimeLimitExceeded

from . import runner
from .announce import compensation_attempt_failed, configure_worker
from .app import is_enabled, settings_of, store_for
from .dispatch import Headers, cached_plan, parse_task_id, publish_compensation, react
from .errors import SagaError
from .settings import backoff_delay
from .sweeper import SweeperThread

__all__ = ["SagaWorker", "configuration_warnings", "connect_signals", "install"]

logger = logging.getLogger("celery_saga")

_connected = False


def install(app: Celery) -> None:
    """Wrap every task of ``app`` and check the sagas defined on it."""
    for name, task in list(app.tasks.items()):
        if name.startswith("celery.") or runner.wrapped(task):
            continue
        runner.wrap(task)
    from .saga import validate_sagas_of

    validate_sagas_of(app)


# -- failures the wrapper never sees ------------------------------------------------
#
# A lost pool child, a hard time limit, a revoke or an expired message end a
# task in the worker's main process, where no wrapper runs and Celery calls
# no errback for revokes. These handlers record the outcome there. A hard
# time limit fires task_failure twice in Celery 5.7; the transitions only
# apply to a step still running, so the second call changes nothing.
#
# Celery sends task_failure for a lost worker only when it neither requeues
# (acks_late + reject_on_worker_lost) nor retries (retry_on_worker_lost) the
# message: when the app asked for redelivery, the step stays running and the
# next copy (or the deadline) decides.


def _outcome_in_main_process(task: Task, task_id: str | None, gen: str | None, op: str, *args: str) -> None:
    app = task.app
    if not is_enabled(app):
        return
    parsed = parse_task_id(task_id)
    if parsed is None:
        return
    saga_id, step, round_ = parsed
    try:
        store = store_for(app)
        raw = store.load(saga_id)
        # The message's own generation, when known: a message from an aborted
        # start must not fail the step of a later start with the same key.
        name, gen = raw.get("name", ""), gen or raw.get("gen", "")
        if round_:
            t = store.step("cfail", saga_id, gen, name, step, args[0], str(round_))
            react(app, store, saga_id, name, gen, t)
            if t.tag in ("retry", "gaveup"):
                # The attempt that was lost began (and was counted) before this load.
                counted = raw.get(f"ca:{step}" if round_ == 1 else f"ca2:{step}") or "0"
                attempt = int(t.extra[0]) if t.tag == "retry" else int(counted)
                compensation_attempt_failed(saga_id, name, step, attempt, args[0], t.tag == "gaveup", round_)
            if t.tag == "retry":
                raw = store.load(saga_id)
                settings = json.loads(raw.get("settings") or "{}")
                publish_compensation(
                    app,
                    saga_id,
                    raw,
                    cached_plan(raw["ph"], lambda: raw["plan"]),
                    step,
                    countdown=backoff_delay(settings, int(t.extra[0])),
                    round=round_,
                )
        else:
            t = store.step(op, saga_id, gen, name, step, *args)
            react(app, store, saga_id, name, gen, t)
    except SagaError as exc:
        logger.error("saga %s: could not record %s of %r: %s", saga_id, args[0], step, exc)
    except Exception:
        logger.exception("saga %s: could not record %s of %r", saga_id, args[0], step)


def _on_task_failure(
    sender: Task | None = None, task_id: str | None = None, exception: BaseException | None = None, **_: Any
) -> None:
    # Failures raised inside the task were recorded by the wrapper already.
    if sender is None or not isinstance(exception, (WorkerLostError, TimeLimitExceeded)):
        return
    # For a lost worker Celery pushes the request before sending the signal;
    # for a hard time limit it does not, and the record's generation is used.
    request = sender.request
    gen = request.get(Headers.GEN) if request.id == task_id else None
    # The function was cut off mid-way: its effect is unknown, not absent.
    why = "timeout" if isinstance(exception, TimeLimitExceeded) else "lost"
    _outcome_in_main_process(sender, task_id, gen, "lost", runner.error_text(exception), why)


def _on_task_revoked(sender: Task | None = None, request: Any = None, expired: bool = False, **_: Any) -> None:
    if sender is None or request is None:
        return
    gen = (getattr(request, "request_dict", None) or {}).get(Headers.GEN)
    task_id = getattr(request, "id", None)
    if expired:
        # A step message expires at its deadline: a timeout of a step that
        # never started, not a failure.
        _outcome_in_main_process(sender, task_id, gen, "expire", "expired: the message expired before it ran")
    else:
        _outcome_in_main_process(sender, task_id, gen, "fail", "revoked: the message was revoked before it ran")


# -- configuration checks ------------------------------------------------------


def configuration_warnings(app: Celery) -> list[str]:
    """What the library can tell is wrong between the broker's visibility timeout and saga timing.

    With a Redis (or SQS) broker, a message not acknowledged within
    ``visibility_timeout`` is delivered again, even while its first copy
    still runs or waits for its countdown. Returns one line per problem found.
    """
    transport = str(app.conf.broker_url or "").split("://", 1)[0]
    if transport not in ("redis", "rediss", "sentinel", "sqs", "unix"):
        return []
    options = app.conf.broker_transport_options or {}
    vt = float(options.get("visibility_timeout", 3600))
    conf = app.conf
    warnings = []
    settings = settings_of(app)
    if settings.compensation_retry_backoff_max > vt:
        warnings.append(
            f"saga_compensation_retry_backoff_max ({settings.compensation_retry_backoff_max:g}s) exceeds the "
            f"broker's visibility_timeout ({vt:g}s): a compensation waiting for its retry countdown is "
            f"delivered again meanwhile. Raise visibility_timeout or lower the backoff cap"
        )
    from .step import registered

    for name, task in sorted(app.tasks.items()):
        if name.startswith("celery.") or registered(name) is None:
            continue
        limit = task.time_limit or conf.task_time_limit
        if task.acks_late and limit and float(limit) > vt:
            warnings.append(
                f"step {name!r}: time_limit ({float(limit):g}s) exceeds the broker's visibility_timeout ({vt:g}s) "
                f"and the task is acks_late: a run longer than {vt:g}s is delivered again while it still runs"
            )
    for spec in _step_specs(app):
        task = app.tasks.get(spec.task)
        if task is None or not task.acks_late:
            continue
        if spec.timeout is not None and spec.timeout <= vt:
            warnings.append(
                f"saga step {spec.name!r} ({spec.task}): its timeout ({spec.timeout:g}s) does not exceed the "
                f"broker's visibility_timeout ({vt:g}s), so after a worker crash its acks_late redelivery comes "
                f"after the deadline and the step is compensated, not completed"
            )
    return warnings


def _step_specs(app: Celery) -> list[Any]:
    from .saga import sagas_of

    specs: dict[str, Any] = {}
    for saga in sagas_of(app):
        try:
            for spec in saga.plan().steps:
                specs.setdefault(spec.name, spec)
        except SagaError:
            continue  # reported at finalize
    return list(specs.values())


class SagaWorker(bootsteps.StartStopStep):  # type: ignore[misc]
    """Runs in every worker of an enabled app, in its main process, before the pool starts.

    It also runs the deadline sweeper in a thread of the main process, so
    every worker with the saga hooks acts on deadlines without an extra
    process. A thread, not the worker's timer: a sweep does blocking Redis
    calls, which must not stall the consumer's event loop.
    """

    label = "celery_saga"
    # Started after the pool: the sweeper thread is not there when it forks.
    requires = ("celery.worker.components:Pool",)

    def __init__(self, w: Any, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        self.sweeper: SweeperThread | None = None
        if is_enabled(w.app):
            install(w.app)  # tasks registered after finalize
            configure_worker(w.app, w.hostname, bool(w.task_events))
            try:
                for line in configuration_warnings(w.app):
                    logger.warning("celery_saga: %s", line)
            except SagaError as exc:
                logger.error("celery_saga: %s", exc)

    def start(self, w: Any) -> None:
        if not is_enabled(w.app) or w.app.conf.get("saga_sweeper") is False:
            return
        try:
            self.sweeper = SweeperThread(w.app, name=f"celery_saga-sweeper@{w.hostname}")
        except SagaError as exc:
            logger.error("celery_saga: no deadline sweeper in this worker: %s", exc)
            return
        self.sweeper.start()

    def stop(self, w: Any) -> None:
        if self.sweeper is not None:
            self.sweeper.stop()
            self.sweeper = None

    # A cold shutdown (and the test worker's exit) sends "terminate", not "stop".
    terminate = stop


def connect_signals() -> None:
    """Connect the worker-side handlers once per process; they ignore apps that are not enabled."""
    global _connected
    if _connected:
        return
    _connected = True
    signals.task_failure.connect(_on_task_failure, weak=False, dispatch_uid="celery_saga.task_failure")
    signals.task_revoked.connect(_on_task_revoked, weak=False, dispatch_uid="celery_saga.task_revoked")
