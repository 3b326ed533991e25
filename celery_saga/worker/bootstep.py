"""The bootstep every enabled worker runs, in its main process: configuration checks and the sweeper."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, bootsteps

from ..announce import configure_worker
from ..errors import SagaError
from ..liveness import LivenessThread, start_instance
from ..plan import StepSpec
from ..registry import sagas_of, step_meta
from ..stores import settings_of, store_for
from ..sweeper import SweeperThread
from .apps import install, is_enabled

__all__ = ["SagaWorker", "configuration_warnings"]

logger = logging.getLogger("celery_saga")


def configuration_warnings(app: Celery) -> list[str]:
    """What the library can tell is wrong between the broker's visibility timeout and saga timing.

    With a Redis (or SQS) broker, a message not acknowledged within
    ``visibility_timeout`` is delivered again, even while its first copy
    still runs or waits for its countdown. Returns one line per kind of
    problem, naming every step it affects.
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
    long_runs = []
    for name, task in sorted(app.tasks.items()):
        if name.startswith("celery.") or step_meta(name) is None:
            continue
        limit = task.time_limit or conf.task_time_limit
        if task.acks_late and limit and float(limit) > vt:
            long_runs.append(f"step {name!r}: time_limit ({float(limit):g}s)")
    if long_runs:
        warnings.append(
            f"acks_late steps whose time_limit exceeds the broker's visibility_timeout ({vt:g}s), so a run "
            f"longer than {vt:g}s is delivered again while it still runs: {'; '.join(long_runs)}"
        )
    short_deadlines = []
    for spec in _step_specs(app):
        task = app.tasks.get(spec.task)
        if task is not None and task.acks_late and spec.timeout is not None and spec.timeout <= vt:
            short_deadlines.append(f"saga step {spec.name!r} ({spec.task}): timeout ({spec.timeout:g}s)")
    if short_deadlines:
        warnings.append(
            f"acks_late saga steps whose timeout does not exceed the broker's visibility_timeout ({vt:g}s), so "
            f"after a worker crash their redelivery comes after the deadline and they are compensated, not "
            f"completed: {'; '.join(short_deadlines)}"
        )
    return warnings


def _step_specs(app: Celery) -> list[StepSpec]:
    specs: dict[str, StepSpec] = {}
    for saga in sagas_of(app):
        try:
            for spec in saga.plan().steps:
                specs.setdefault(spec.name, spec)
        except SagaError:
            continue  # reported at finalize
    return list(specs.values())


def _warn(app: Celery) -> None:
    """One WARNING per worker start, listing every configuration problem and the steps it affects."""
    try:
        lines = configuration_warnings(app)
        store = store_for(app)
        store.epoch()  # checks the server's version and the index shards, once
        lines += store.health_warnings()
    except SagaError as exc:
        logger.error("celery_saga: %s", exc)
        return
    if lines:
        logger.warning(
            "celery_saga: %d configuration warning(s); set saga_config_warnings = False to silence them:\n- %s",
            len(lines),
            "\n- ".join(lines),
        )


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
        self.liveness: LivenessThread | None = None
        self.token = ""
        if is_enabled(w.app):
            # Here, before the pool forks: its children inherit the token, and
            # the steps they begin name this instance (celery_saga.liveness).
            self.token = start_instance()
            install(w.app)  # tasks registered after finalize
            configure_worker(w.app, w.hostname, bool(w.task_events))
            if w.app.conf.get("saga_config_warnings") is not False:
                _warn(w.app)

    def start(self, w: Any) -> None:
        if not is_enabled(w.app):
            return
        # Liveness is written even without a sweeper here: others sweep.
        try:
            self.liveness = LivenessThread(w.app, w.hostname, self.token)
        except SagaError as exc:
            logger.error(
                "celery_saga: this worker writes no liveness, so its crash is noticed only at deadlines: %s", exc
            )
        else:
            self.liveness.announce()  # before the first sweep, which then finds older instances of this name
            self.liveness.start()
        if w.app.conf.get("saga_sweeper") is False:
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
        if self.liveness is not None:
            self.liveness.stop()
            self.liveness = None

    # A cold shutdown (and the test worker's exit) sends "terminate", not "stop".
    terminate = stop
