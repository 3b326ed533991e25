"""The saga store contract.

A store keeps one record per saga and applies every transition to it
atomically. Backends implement the primitives (``_transition``, ``_load``,
``_index`` ...); the typed operations and record parsing live here, once.
"""

from __future__ import annotations

import abc
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import SagaNotFound
from ..state import SagaState, SagaStatus

__all__ = ["SagaStore", "StartRequest", "Transition"]


@dataclass(frozen=True)
class Transition:
    """What one transition did.

    Attributes:
        tag: What happened: ``run``, ``dup``, ``next``, ``completed``, ``compensate`` ...
        status: The saga status after the call ("" if there is no record).
        changed_from: The status before, when the call changed it, else "".
        extra: Values that depend on ``tag``.
    """

    tag: str
    status: str
    changed_from: str
    extra: tuple[str, ...]


@dataclass(frozen=True)
class StartRequest:
    """Everything written by a saga start."""

    saga_id: str
    gen: str
    name: str
    fingerprint: str
    kwargs_json: str
    plan_json: str
    plan_digest: str
    stages: str
    retention: float
    settings_json: str
    on_complete: str
    on_failure: str
    idempotency_key: str
    max_retries: int | None
    step_fields: tuple[tuple[str, str], ...]
    #: Forward deadline of the whole saga, seconds from start; None for none.
    saga_timeout: float | None = None
    #: When sweepers should first look at the saga (epoch seconds), None if it has no deadline.
    watch_at: float | None = None


class SagaStore(abc.ABC):
    """One record per saga; every state change is one atomic transition."""

    #: Where the store lives, safe to print (password masked).
    location: str
    prefix: str
    #: Retention of finished sagas in this process, for index trimming.
    retention: float = 0.0

    # -- primitives ---------------------------------------------------------

    @abc.abstractmethod
    def _transition(
        self,
        saga_id: str,
        op: str,
        gen: str,
        args: Sequence[str],
        dedupe: bool,
        index_first: tuple[str, str, str] | None = None,
        watch_at: float | None = None,
    ) -> Transition:
        """Apply one transition atomically; with ``dedupe``, a retried call returns the first reply.

        ``index_first`` is an index move ``(name, old, new)`` and ``watch_at``
        a deadline-index entry (epoch seconds; it only ever moves earlier), both
        sent in the same round trip, before the transition: a deadline is in
        the index before the transition that starts it.
        """

    @abc.abstractmethod
    def _load(self, saga_id: str) -> dict[str, str] | None:
        """The raw record, or None."""

    @abc.abstractmethod
    def _index(self, saga_id: str, name: str, old: str, new: str, retention: float, unwatch: bool = False) -> None:
        """Move ``saga_id`` between status indexes, and with ``unwatch`` drop its deadline entry. Idempotent."""

    @abc.abstractmethod
    def claim_due(self, limit: int, lease: float) -> list[tuple[str, str]]:
        """Lease up to ``limit`` due deadline entries for ``lease`` seconds: ``[(saga_id, claim)]``.

        A claim moves the entry ``lease`` seconds into the future instead of
        removing it, so the claim of a sweeper that dies comes due again.
        """

    @abc.abstractmethod
    def rescore(self, saga_id: str, claim: str, next_deadline: str) -> None:
        """Settle a claim: the entry waits for ``next_deadline`` (ms, store clock), or goes if that is "".

        An entry moved earlier since the claim (a new registration) keeps the earlier time.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release the store's connections."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise SagaStoreUnavailable if the store cannot be reached."""

    @abc.abstractmethod
    def _unindex(self, saga_id: str, name: str, status: str) -> None:
        """Remove ``saga_id`` from the indexes of ``status``."""

    @abc.abstractmethod
    def list_ids(
        self, status: SagaStatus, name: str | None = None, limit: int = 100, since: float | None = None
    ) -> list[str]:
        """Ids of sagas in ``status`` (entered at or after ``since``, epoch seconds), newest first.

        Read from the indexes: entries whose record expired may be returned.
        """

    @abc.abstractmethod
    def counts(self) -> dict[str, dict[str, int]]:
        """Index sizes: ``{saga_name: {status: count}}``, finished sagas within retention only."""

    @abc.abstractmethod
    def load_many(self, saga_ids: Sequence[str]) -> list[dict[str, str] | None]:
        """Raw records of several sagas in one round trip; None where there is none."""

    # -- operations -----------------------------------------------------------

    def start(self, req: StartRequest) -> Transition:
        args = [
            req.name,
            req.fingerprint,
            req.kwargs_json,
            req.plan_json,
            req.plan_digest,
            req.stages,
            repr(req.retention),
            req.settings_json,
            req.on_complete,
            req.on_failure,
            req.idempotency_key,
            "" if req.max_retries is None else str(req.max_retries),
        ]
        # Index first, in the same round trip as the start: the index is only
        # a lookup aid, and the rare start that created nothing is fixed below.
        args.append("" if req.saga_timeout is None else f"{req.saga_timeout * 1000:.0f}")
        for field, value in req.step_fields:
            args += [field, value]
        t = self._transition(
            req.saga_id,
            "start",
            req.gen,
            args,
            dedupe=False,
            index_first=(req.name, "", SagaStatus.PENDING.value),
            watch_at=req.watch_at,
        )
        if t.tag != "created" and t.status != SagaStatus.PENDING.value:
            self._unindex(req.saga_id, req.name, SagaStatus.PENDING.value)
        return t

    def abort_start(self, saga_id: str, gen: str, name: str, error: str, unpublished: Sequence[str]) -> Transition:
        """Mark a start whose publish failed; its key is released for the caller's retry.

        A start that failed before anything ran leaves no FAILED index entry: it
        is not a dead letter (nothing to compensate), its record expires, and
        the caller got the error.
        """
        t = self._transition(saga_id, "abort", gen, [error, *unpublished], dedupe=True)
        if t.tag == "aborted":
            self._unindex(saga_id, name, SagaStatus.PENDING.value)
        elif t.changed_from:
            self.reindex(saga_id, name, t)
        return t

    def step(
        self,
        op: str,
        saga_id: str,
        gen: str,
        name: str,
        *args: str,
        first: bool = False,
        watch_at: float | None = None,
    ) -> Transition:
        """Apply a step transition (``begin``, ``done``, ``fail``, ``cbegin`` ...) and index it.

        ``first`` marks the begin of a first-stage step, which is what takes a
        saga from PENDING to RUNNING.
        """
        # Every saga makes this move once: send it in the same round trip as
        # the begin, and put the entry right in the rare other cases.
        move = (name, "PENDING", "RUNNING") if first else None
        t = self._transition(saga_id, op, gen, args, dedupe=True, index_first=move, watch_at=watch_at)
        if first:
            if t.status and t.status != "RUNNING":
                self._index(saga_id, name, "RUNNING", t.status, 0.0)
        elif t.changed_from:
            self.reindex(saga_id, name, t)
        return t

    def reindex(self, saga_id: str, name: str, t: Transition) -> None:
        # Trimming uses this process's retention, not the saga's own: it is
        # housekeeping only, since readers skip ids whose record expired.
        # FAILED sagas never expire, so their index is never trimmed.
        expiring = t.status in ("COMPLETED", "COMPENSATED")
        # A completed saga has no deadline left, so its deadline entry goes
        # with this move. Rolled-back sagas leave lazily: a step with an
        # unknown outcome may still report a late success whose second
        # compensation round needs a deadline, so a sweeper drops the entry
        # once the record says nothing more can come (or the record expired).
        done = t.status == "COMPLETED"
        self._index(saga_id, name, t.changed_from, t.status, self.retention if expiring else 0.0, unwatch=done)

    def purge(self, saga_id: str) -> Transition:
        """Remove a finished saga and its index entries (``tag`` is ``purged`` or ``notallowed``)."""
        t = self._transition(saga_id, "purge", "*", [], dedupe=False)
        if t.tag == "purged":
            self._unindex(saga_id, t.extra[0] if t.extra else "", t.status)
        return t

    def retry(self, saga_id: str, name: str) -> Transition:
        """Re-drive the compensations that gave up in a FAILED saga (``tag`` ``notallowed`` otherwise)."""
        # Their new attempt deadlines need the saga back in the deadline
        # index; a sweeper looking now rescores it to the right time.
        return self.step("retry", saga_id, "*", name, watch_at=time.time())

    def sweep(self, saga_id: str) -> Transition:
        """Act on the saga's due deadlines.

        ``tag`` is ``swept``, ``extra`` is (next deadline in ms or "", saga
        name, what to publish ...); or ``missing`` / ``corrupt``.
        """
        t = self._transition(saga_id, "sweep", "*", [], dedupe=True)
        if t.tag == "swept" and t.changed_from:
            self.reindex(saga_id, t.extra[1], t)
        return t

    def cancel(self, saga_id: str, name: str, error: str) -> Transition:
        """Stop the saga's forward progress and compensate (``tag`` ``finished`` if it had ended)."""
        return self.step("cancel", saga_id, "*", name, error)

    def load(self, saga_id: str) -> dict[str, str]:
        raw = self._load(saga_id)
        if not raw or "status" not in raw:
            raise SagaNotFound(saga_id, self.where())
        return raw

    def state(self, saga_id: str) -> SagaState:
        return SagaState.from_record(saga_id, self.load(saga_id))

    def status(self, saga_id: str) -> SagaStatus:
        return self.state(saga_id).status

    def where(self) -> str:
        return f"store {self.location} under prefix {self.prefix!r}"

    @staticmethod
    def new_tx() -> str:
        return uuid.uuid4().hex
