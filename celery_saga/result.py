"""``SagaResult``: the handle of a started saga, usable from any process."""

from __future__ import annotations

import time
from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError

from . import announce, codec
from .errors import SagaCompensated, SagaDataError, SagaFailed, SagaNotFound, SagaRecordCorrupt
from .follow import follow
from .messages import queue_of
from .plan import cached_plan
from .redaction import redacted_keys, rejection_text
from .state import CompensationStatus, SagaState, SagaStatus, final_data
from .store import Outcome, SagaStore
from .stores import settings_of, store_for
from .wait import check_event_name

__all__ = ["SagaResult"]


class SagaResult:
    """A saga, by id. ``SagaResult(saga_id, app=app)`` looks one up later, from any process.

    ``epoch`` is the saga store's epoch when the saga started, which
    ``apply_async`` knows: if the record is gone under a newer epoch, the
    saga was lost in a reset of the store, and `SagaNotFound` says so.
    """

    def __init__(self, saga_id: str, app: Celery, epoch: str | None = None) -> None:
        self.id = saga_id
        self.app = app
        self.epoch = epoch

    def __repr__(self) -> str:
        return f"<SagaResult {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SagaResult) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def _store(self) -> SagaStore:
        return store_for(self.app)

    def state(self) -> SagaState:
        """A snapshot of the saga record. Raises SagaNotFound if there is none."""
        store = self._store()
        try:
            return store.state(self.id)
        except SagaNotFound as exc:
            raise self._not_found(store, exc) from exc

    @property
    def status(self) -> SagaStatus:
        """The saga status. Raises SagaNotFound if there is no record."""
        store = self._store()
        try:
            return store.status(self.id)
        except SagaNotFound as exc:
            raise self._not_found(store, exc) from exc

    def _not_found(self, store: SagaStore, exc: SagaNotFound) -> SagaNotFound:
        """``exc``, or one that says the saga was lost in a reset of the store."""
        if store.lost_in_reset(self.id, self.epoch):
            return SagaNotFound(self.id, store.where(), reset=True)
        return exc

    def ready(self) -> bool:
        """True once the saga has finished: COMPLETED, COMPENSATED or FAILED."""
        return self.status.finished

    def signal(self, event: str, data: Any = None) -> bool:
        """Deliver the outside event ``event`` to the saga's ``wait_for(event)``.

        A dict ``data`` is merged into the saga data like a step's result.
        The first delivery wins: an event delivered before the saga reaches
        its wait is kept and consumed when it does, and a later delivery of
        the same event changes nothing. Delivering a wait's ``reject`` event
        rolls the saga back (reason ``"rejected"``).

        Returns:
            True if the event was accepted, now or by an earlier delivery;
            False if the saga has finished, has no wait for the event, or
            its wait is over (it timed out, or the saga is rolling back).

        Raises:
            SagaNotFound: there is no such saga.
            SagaDataError: ``data`` cannot be stored as JSON.
            SagaRecordCorrupt: its record cannot be read.
            SagaStoreUnavailable: the saga store cannot be reached; nothing changed.
        """
        check_event_name(event)
        depth = settings_of(self.app).max_data_depth
        try:
            data_json = codec.dumps(data, max_depth=depth)
        except (TypeError, ValueError) as exc:
            raise SagaDataError(
                f"saga {self.id}: the data of event {event!r} cannot be stored in the saga record: "
                f"{codec.why_unstorable(data, max_depth=depth)}. Pass {codec.STORABLE}"
            ) from exc
        store = self._store()
        t = store.signal(self.id, event, data_json, self._rejection(store, event, data))
        if t.outcome is Outcome.MISSING:
            raise SagaNotFound(self.id, store.where())
        if t.outcome is Outcome.CORRUPT:
            raise SagaRecordCorrupt(self.id, f"the store refused the event {event!r}")
        if t.outcome in (Outcome.FINISHED, Outcome.NOT_ALLOWED):
            return False
        if t.outcome is not Outcome.DUPLICATE:
            announce.event_received(self.app, self.id, t.name, event, data)
            follow(self.app, store, t)
        return True

    def _rejection(self, store: SagaStore, event: str, data: Any) -> str:
        """The error ``event`` records if it rejects a wait: its data masked and capped; "" if it rejects none.

        Built here, not by the transition from the data: the record never
        holds the event's redacted values as an error text.
        """
        try:
            raw = store.load(self.id)
        except SagaNotFound:
            return ""  # the transition says so
        digest = raw.get("ph", "")
        if not digest:
            return ""
        plan = store.plan(digest)
        if not any(spec.reject == event for spec in plan.steps):
            return ""
        try:
            kwargs = codec.loads(raw["kwargs"])
        except (KeyError, ValueError):
            kwargs = None
        return rejection_text(event, data, redacted_keys(self.app, plan), kwargs)

    def cancel(self) -> bool:
        """Stop the saga and roll it back, as a saga timeout would.

        Steps still queued are fenced (they never run); steps running now get
        an unknown outcome and are compensated blind, with the completed ones.
        ``get()`` then raises ``SagaCompensated`` with ``reason="cancelled"``.
        Returns True if the saga was cancelled (or was already rolling back),
        False if it had already finished, or is past its pivot (it then
        finishes forward) and nothing changed.

        Raises:
            SagaNotFound: there is no such saga.
            SagaRecordCorrupt: its record cannot be read.
            SagaStoreUnavailable: the saga store cannot be reached; nothing changed.
        """
        store = self._store()
        t = store.cancel(self.id, "cancelled on request")
        if t.outcome in (Outcome.FINISHED, Outcome.NOT_ALLOWED):
            return False
        if t.outcome is Outcome.MISSING:
            raise SagaNotFound(self.id, store.where())
        if t.outcome is not Outcome.ROLLBACK:
            raise SagaRecordCorrupt(self.id, f"the store refused to cancel it ({t.outcome.value})")
        follow(self.app, store, t)
        return True

    def get(self, timeout: float | None = None, interval: float = 1.0) -> dict[str, Any]:
        """Wait for the saga to finish and return its final data.

        The transition that ends the saga wakes the waiter (Redis pub/sub, as
        Celery's Redis result backend does); the status is also read again
        every ``interval`` seconds, in case that message is missed.

        Raises:
            SagaCompensated: it was rolled back.
            SagaFailed: compensation gave up.
            celery.exceptions.TimeoutError: it did not finish within ``timeout`` seconds.
            SagaNotFound: there is no such saga.
            SagaRecordCorrupt: its record cannot be read.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        store = self._store()
        # A saga that has finished already (most get() calls on a batch of
        # handles) costs one read, and no subscription.
        raw = self._read(store)
        if _status(self.id, raw).finished:
            return _outcome(self.id, raw)
        with store.end_signal(self.id) as wait:
            while True:
                # Once subscribed, read again (the status only): an end since the last read is not missed.
                status = self.status
                if status.finished:
                    return _outcome(self.id, self._read(store))
                if deadline is not None and time.monotonic() >= deadline:
                    why = self._why(store, status)
                    raise CeleryTimeoutError(f"saga {self.id} did not finish within {timeout}s: {why}")
                notice = wait(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))
                if notice is not None and notice.data is not None:
                    # The end message carried a completed saga's data: no read.
                    return notice.data

    def _read(self, store: SagaStore) -> dict[str, str]:
        try:
            return store.load(self.id)
        except SagaNotFound as exc:
            raise self._not_found(store, exc) from exc

    def _why(self, store: SagaStore, status: SagaStatus) -> str:
        if status is not SagaStatus.PENDING:
            return f"it is {status.value}"
        raw = store.load(self.id)
        plan = cached_plan(raw["ph"], lambda: raw["plan"])
        specs = [spec for spec in plan.stages[0] if not spec.is_wait]
        if not specs:
            waits = ", ".join(spec.event or "" for spec in plan.stages[0])
            return f"it is PENDING, waiting for event(s) {waits} (deliver one with SagaResult.signal())"
        queues = ", ".join(sorted({repr(queue_of(self.app, spec)) for spec in specs}))
        return (
            f"it is PENDING: no worker has begun its first step. Is a worker of app {self.app.main!r} "
            f"consuming queue {queues}?"
        )


def _status(saga_id: str, raw: dict[str, str]) -> SagaStatus:
    try:
        return SagaStatus(raw["status"])
    except ValueError as exc:
        raise SagaRecordCorrupt(saga_id, f"unknown status {raw['status']!r}") from exc


def _outcome(saga_id: str, raw: dict[str, str]) -> dict[str, Any]:
    """What ``get()`` returns or raises for a finished saga's raw record."""
    if raw["status"] == SagaStatus.COMPLETED.value:
        # The common case, and the cheap one: the data, not every step parsed.
        return final_data(saga_id, raw)
    state = SagaState.from_record(saga_id, raw)
    if state.status is SagaStatus.COMPENSATED:
        raise SagaCompensated(state.saga_id, state.failed_step, state.error, state.reason or "failure")
    gave_up = {s.name: s.compensation_error for s in state.steps if s.compensation_status is CompensationStatus.GAVE_UP}
    raise SagaFailed(state.saga_id, state.failed_step, state.error, gave_up, state.reason or "failure")
