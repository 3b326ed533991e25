"""The deadline sweeper: acts on step, saga and compensation deadlines that have passed.

Celery cannot do this itself: ``expires`` and time limits act only when a
worker picks a message up, and a countdown "watchdog" task is delivered
again and again by the Redis broker's visibility timeout. So deadlines live
in the saga record, and sweepers look at the records a deadline index says
are due:

- every worker with the saga hooks runs one in a thread (`SweeperThread`,
  started by the worker bootstep), every ``saga_sweep_interval`` seconds;
- ``celery -A app saga sweep`` runs one standalone;
- `sweep` runs one pass from any process.

Any number of sweepers may run. A claim is a lease on an index entry, which
only keeps sweepers from doing the same work twice; exactly-once handling
comes from the record's ``sweep`` transition, which acts only on deadlines
that are due and not yet handled.

An entry is poison if its key is no saga record a sweeper can read (a key
of another type, a hash the transitions refuse, a record whose plan is
gone): it is removed and logged once, and the pass goes on past it, so one
bad entry never holds up the deadlines of every saga behind it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from celery import Celery

from .errors import SagaError, SagaRecordCorrupt, SagaStoreMisconfigured, SagaStoreUnavailable
from .follow import follow, redrive
from .liveness import declare_lost_workers
from .search import Collector
from .store import Outcome, SagaStore
from .stores import settings_of, store_for
from .views import command

__all__ = ["SweepReport", "SweeperThread", "sweep"]

logger = logging.getLogger("celery_saga")

#: How long a claim keeps other sweepers off an entry, seconds. A sweeper
#: that dies mid-sweep delays that saga's deadlines by at most this much.
LEASE = 15.0
#: How often each worker's sweeper repairs a cluster store's locks, seconds
#: (store/cluster_locks.py: a waiting saga's own sweep repairs its locks sooner).
LOCK_REPAIR_EVERY = 60.0


@dataclass(frozen=True)
class SweepReport:
    """What one sweep pass did.

    Attributes:
        claimed: Index entries this pass claimed.
        acted: Sagas whose record changed: a deadline was acted on.
        errors: Sagas that could not be swept; their claims come due again.
        dropped: Entries removed, logged once: their key is no saga record
            the transitions can read (another type, unknown fields, no plan).
        lost_workers: Worker instances this pass declared lost (silent for
            ``saga_worker_lost_after``); what they ran counts in ``acted``.
    """

    claimed: int
    acted: int
    errors: int
    dropped: int = 0
    lost_workers: int = 0


def sweep(app: Celery, limit: int = 1000, lost_workers: bool = True) -> SweepReport:
    """Act once on every due deadline of ``app``'s sagas (up to ``limit`` sagas).

    ``lost_workers``: also claim worker instances that stopped writing their
    liveness, and declare what they ran lost (one Redis call when none did).

    Raises:
        SagaStoreUnavailable: the saga store cannot be reached.
    """
    store = store_for(app)
    lost, acted, errors = 0, 0, 0
    try:
        if lost_workers:
            lost, acted = declare_lost_workers(app)
    except SagaStoreUnavailable:
        raise
    except Exception:
        # Its lease runs out and another pass takes the instances over.
        errors += 1
        logger.exception("celery_saga: declaring lost workers failed; retried in %.0fs", LEASE)
    claimed = store.claim_due(limit, LEASE)
    dropped = 0
    for saga_id, claim in claimed:
        try:
            acted += _sweep_one(app, store, saga_id, claim)
            continue
        except SagaStoreMisconfigured as exc:
            # A key of the wrong type refuses the transition: if it is this
            # entry's own key, the entry is poison, and the pass goes on past
            # it; any other (an index shard, an ACL) is the store's problem.
            if not (exc.wrong_type and store.not_a_record(saga_id)):
                raise
            why = "its key holds something other than a saga record (a hash)"
        except SagaStoreUnavailable:
            raise
        except (_Unreadable, SagaRecordCorrupt) as exc:
            # The record, or what following its transition needs (its plan,
            # its data), cannot be read: looking again will not read it either.
            why = str(exc)
        except Exception:
            # The claim runs out and another pass tries again (a broker that failed to publish, say).
            errors += 1
            logger.exception("saga %s: sweeping its deadlines failed; it is retried in %.0fs", saga_id, LEASE)
            continue
        _drop(app, store, saga_id, why)
        dropped += 1
    return SweepReport(len(claimed), acted, errors, dropped, lost)


class _Unreadable(Exception):
    """The sweep transition could not read the record (`Outcome.CORRUPT`)."""


def _drop(app: Celery, store: SagaStore, saga_id: str, why: str) -> None:
    """Remove a deadline entry whose key is no readable saga record, logging it: once, since it is gone.

    Whatever its time: the transition may have registered it again (a saga
    it ended is looked at again later), and no later look would read more.
    """
    logger.error(
        "saga %s: its deadline entry in %s names no readable saga record (%s), so its deadlines cannot be "
        "checked; the entry is removed. Inspect it with `%s`, or purge it",
        saga_id,
        store.where(),
        why,
        command(app.main, "show", saga_id),
    )
    store.unwatch(saga_id)


def _sweep_one(app: Celery, store: SagaStore, saga_id: str, claim: str) -> int:
    t = store.sweep(saga_id)
    if t.outcome is Outcome.MISSING:
        # Expired after its retention, purged, or lost in a reset of the
        # store: nothing can be due any more, so the entry goes.
        if store.lost_in_reset(saga_id):
            logger.warning("saga %s: lost in the reset of the saga store; its deadlines are dropped", saga_id)
        store.rescore(saga_id, claim, "")
        return 0
    if t.outcome is not Outcome.SWEPT:
        # A hash, but not one the transitions can read (its status, its stages).
        raise _Unreadable(f"the sweep transition found it {t.outcome.value}")
    follow(app, store, t)
    # Rescored only after publishing: if this process dies before, the
    # claim comes due again, and anything whose message was lost is caught
    # by its own deadline.
    store.rescore(saga_id, claim, "" if t.next_deadline is None else str(t.next_deadline))
    return int(t.changed_from is not None or bool(t.due))


class SweeperThread(threading.Thread):
    """Sweeps every ``saga_sweep_interval`` seconds until stopped."""

    def __init__(self, app: Celery, name: str = "celery_saga-sweeper") -> None:
        super().__init__(name=name, daemon=True)
        self.app = app
        settings = settings_of(app)
        self.interval = settings.sweep_interval
        # Liveness changes once per heartbeat: looking for lost workers twice
        # a heartbeat keeps detection within saga_worker_lost_after plus half
        # a heartbeat, without a Redis call on every (0.5 s) pass of every worker.
        self.lost_worker_interval = settings.worker_heartbeat / 2
        self._stop_event = threading.Event()
        # Business key entries of expired records, once a minute (celery_saga.search).
        self._collect = Collector()
        self._next_lock_repair = 0.0

    def run(self) -> None:
        # Each distinct problem is logged once, not every interval.
        failing = ""
        looked_for_lost = -float("inf")
        while not self._stop_event.is_set():
            started = time.monotonic()
            try:
                look = started - looked_for_lost >= self.lost_worker_interval
                report = sweep(self.app, lost_workers=look)
                if look:
                    looked_for_lost = started
                self._collect(store_for(self.app))
                self._repair_locks(store_for(self.app))
                if failing:
                    logger.warning("celery_saga sweeper: sweeping again")
                failing = ""
                if report.claimed:
                    continue  # more may be due: look again before pausing
            except SagaStoreUnavailable as exc:
                if failing != str(exc):
                    logger.warning("celery_saga sweeper: %s; deadlines wait until it answers", exc)
                failing = str(exc)
            except SagaError as exc:
                if failing != str(exc):
                    logger.error("celery_saga sweeper: %s", exc)
                failing = str(exc)
            except Exception as exc:
                if failing != repr(exc):
                    logger.exception("celery_saga sweeper: unexpected error")
                failing = repr(exc)
            self._stop_event.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def _repair_locks(self, store: SagaStore) -> None:
        now = time.monotonic()
        if now < self._next_lock_repair:
            return
        self._next_lock_repair = now + LOCK_REPAIR_EVERY
        for saga_id in store.repair_locks():
            try:
                redrive(self.app, store, saga_id)
            except Exception:
                # Its record has the stage dispatched: a sweep publishes it (store/locks.lua adm).
                logger.exception("saga %s: its locks are free, but its first stage could not be published yet", saga_id)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)
