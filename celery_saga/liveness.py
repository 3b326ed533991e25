"""Worker liveness: a dead worker is noticed in seconds, not at its steps' deadlines; long steps heartbeat.

A worker SIGKILLed mid-step (main process and pool child, no ``acks_late``)
leaves no outcome, and Celery says nothing. So each worker instance has a
token, made in its main process before the pool forks (children inherit
it), which ``begin`` writes on the step it runs (``wk:<step>``). A thread of
the main process writes the instance's liveness every
``saga_worker_heartbeat`` seconds: one Redis call per worker, whatever it
runs. A sweeper pass claims the instances silent for
``saga_worker_lost_after`` seconds (each by exactly one sweeper) and applies
to each step still RUNNING on one the same ``lost`` transition a
WorkerLostError applies (its outcome is unknown: compensated blind before
the pivot, sent again after it), guarded by the token, so a step that
finished or began again elsewhere meanwhile is left alone. A compensation
attempt RUNNING on one counts as failed, and is retried with its backoff.

A worker cut off from Redis cannot write its liveness either, so its steps
are declared lost; when one finishes later, its outcome is a late outcome
(kept, and a success compensated again), never a second completion.

A step whose worker is alive may still hang. ``heartbeat_timeout`` on a step
makes ``current_step().heartbeat()`` its proof of progress: a step RUNNING
with no heartbeat for that long is lost too (the sweep transition checks it).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING

from celery import Celery

from .errors import SagaError, SagaStoreUnavailable
from .follow import follow
from .state import SagaStatus
from .store import Op, Outcome
from .stores import settings_of, store_for

if TYPE_CHECKING:
    from .context import StepContext
    from .store.base import LostWorker, SagaStore

__all__ = ["LivenessThread", "declare_lost_workers", "heartbeat", "start_instance", "worker_token"]

logger = logging.getLogger("celery_saga")

_token = ""

#: How long a sweeper holds a lost instance before another may take it over, seconds.
LEASE = 30.0
#: Records read per pipelined round trip while looking for a lost instance's steps.
BATCH = 200
#: At most this many RUNNING (and COMPENSATING) sagas are looked through per pass.
SCAN_LIMIT = 100_000


def start_instance() -> str:
    """Make this worker process's instance token (the bootstep calls it in the main process, before the pool forks)."""
    global _token
    _token = uuid.uuid4().hex[:12]
    return _token


def worker_token() -> str:
    """The instance token of the worker this process belongs to; "" outside a worker."""
    return _token


class LivenessThread(threading.Thread):
    """Writes a worker instance's liveness every ``saga_worker_heartbeat`` seconds until stopped."""

    def __init__(self, app: Celery, hostname: str, token: str) -> None:
        super().__init__(name=f"celery_saga-liveness@{hostname}", daemon=True)
        self.app = app
        self.hostname = hostname
        self.token = token
        self.interval = settings_of(app).worker_heartbeat
        self._stop_event = threading.Event()
        self._started_ok = False

    def announce(self) -> None:
        """The first write, before the sweeper's first pass: older instances of this node name are dead."""
        try:
            store_for(self.app).worker_alive(self.token, self.hostname, starting=True)
            self._started_ok = True
        except SagaError as exc:
            logger.warning("celery_saga: cannot write this worker's liveness yet: %s", exc)

    def run(self) -> None:
        failing = ""
        while not self._stop_event.wait(0 if not self._started_ok else self.interval):
            try:
                if store_for(self.app).worker_alive(self.token, self.hostname, starting=not self._started_ok):
                    logger.warning(
                        "celery_saga: this worker (%s, instance %s) could not write its liveness for too long "
                        "and was declared lost: the steps it ran meanwhile were compensated or sent again, and "
                        "their outcomes count as late",
                        self.hostname,
                        self.token,
                    )
                self._started_ok = True
                if failing:
                    logger.warning("celery_saga: writing this worker's liveness again")
                failing = ""
            except SagaError as exc:
                if failing != str(exc):
                    logger.warning("celery_saga: cannot write this worker's liveness: %s", exc)
                failing = str(exc)
                if not self._started_ok:
                    self._stop_event.wait(self.interval)
            except Exception as exc:  # the thread must outlive any one failure
                if failing != repr(exc):
                    logger.exception("celery_saga: writing this worker's liveness failed")
                failing = repr(exc)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop writing; sweepers then look at what this instance still ran at their next pass."""
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)
        try:
            store_for(self.app).worker_stopped(self.token)
        except SagaError as exc:
            logger.warning("celery_saga: cannot mark this worker stopped: %s", exc)


# -- declaring lost workers (a sweeper pass) -------------------------------------------


def declare_lost_workers(app: Celery) -> tuple[int, int]:
    """Claim the worker instances silent for ``saga_worker_lost_after``, and declare what they ran lost.

    Returns (instances claimed, transitions that changed a record).

    Raises:
        SagaStoreUnavailable: the saga store cannot be reached.
    """
    store = store_for(app)
    claimed = store.claim_lost_workers(settings_of(app).worker_lost_after, LEASE)
    if not claimed:
        return 0, 0
    now = time.time()
    for w in claimed:
        if w.last_seen > 0:
            logger.warning(
                "celery_saga: worker %s (instance %s) stopped heartbeating %.0fs ago: its running steps are lost",
                w.hostname,
                w.token,
                now - w.last_seen,
            )
        else:
            # It stopped, or was started again under its node name: a warm
            # shutdown left nothing running, and whatever was is warned of per step.
            logger.info(
                "celery_saga: worker %s (instance %s) stopped; checking what it left running", w.hostname, w.token
            )
    acted = _declare_steps_lost(app, store, {w.token: w for w in claimed}, now)
    for w in claimed:
        store.lost_worker_handled(w.token)
    return len(claimed), acted


def _declare_steps_lost(app: Celery, store: SagaStore, lost: dict[str, LostWorker], now: float) -> int:
    ids: list[str] = []
    for status in (SagaStatus.RUNNING, SagaStatus.COMPENSATING):
        ids += store.list_ids(status, limit=SCAN_LIMIT)
    acted = 0
    for i in range(0, len(ids), BATCH):
        batch = ids[i : i + BATCH]
        for saga_id, raw in zip(batch, store.load_many(batch), strict=True):
            if raw is None:
                continue
            for field, token in raw.items():
                if token not in lost:
                    continue
                try:
                    acted += _declare_one(app, store, saga_id, raw, field, lost[token], now)
                except SagaStoreUnavailable:
                    raise
                except Exception:
                    # One bad record must not keep the others RUNNING: log it and go on.
                    logger.exception("saga %s: declaring %s lost failed", saga_id, field)
    return acted


def _declare_one(
    app: Celery, store: SagaStore, saga_id: str, raw: dict[str, str], field: str, w: LostWorker, now: float
) -> int:
    kind, _, step = field.partition(":")
    name = raw.get("name", "")
    silent = f"stopped heartbeating {now - w.last_seen:.0f}s ago" if w.last_seen > 0 else "stopped"
    error = f"WorkerLostError: worker {w.hostname or '?'} (instance {w.token}) {silent}"
    if kind == "wk" and raw.get(f"s:{step}") == "RUNNING":
        t = store.apply(Op.LOST, saga_id, "*", name, step, error, "lost", w.token)
    elif kind in ("cwk", "cwk2") and raw.get(f"{'cs' if kind == 'cwk' else 'cs2'}:{step}") == "RUNNING":
        round_ = "1" if kind == "cwk" else "2"
        t = store.apply(Op.COMP_FAIL, saga_id, "*", name, step, f"lost: {error}", round_, "", w.token)
    else:
        return 0
    if t.outcome is Outcome.DUPLICATE:
        return 0  # it finished, or began again on another worker, since the record was read
    logger.warning(
        "saga %s: %s %r was running on a lost worker: %s",
        saga_id,
        "step" if kind == "wk" else "the compensation of",
        step,
        t.outcome.value,
    )
    follow(app, store, t)
    return 1


# -- heartbeats of long steps (current_step().heartbeat()) ---------------------------------

# Per running attempt (idempotency key, attempt): when it last wrote, and the
# least time between two writes (heartbeat_timeout / 3; None before the first).
_beats: OrderedDict[tuple[str, int], tuple[float, float]] = OrderedDict()
_beats_lock = threading.Lock()
_BEATS_KEPT = 1024


def heartbeat(app: Celery, ctx: StepContext) -> bool:
    """Tell the saga this step still makes progress; False if its attempt no longer runs.

    At most one Redis call per ``heartbeat_timeout / 3`` seconds per attempt:
    calling it often costs nothing. `StepContext.heartbeat` calls it, bound
    to the step's app by the step wrapper.
    """
    if ctx.compensating:
        return True
    key = (ctx.idempotency_key, ctx.attempt)
    now = time.monotonic()
    with _beats_lock:
        last = _beats.get(key)
    if last is not None and now - last[0] < last[1]:
        return True
    t = store_for(app).heartbeat(ctx.saga_id, ctx.step, ctx.attempt)
    # No heartbeat timeout: nothing to tell, ever again.
    gap = float("inf") if t.heartbeat_timeout is None else t.heartbeat_timeout / 3
    with _beats_lock:
        _beats[key] = (now, gap)
        _beats.move_to_end(key)
        while len(_beats) > _BEATS_KEPT:
            _beats.popitem(last=False)
    return t.outcome is Outcome.RECORDED
