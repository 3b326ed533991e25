"""The saga store contract.

A store keeps one record per saga and applies every transition to it
atomically. Backends implement the primitives (``_run``, ``_load``,
``_index`` ...); the typed operations, reply decoding and record parsing
live here, once. The ops and their replies are `celery_saga.store.protocol`.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .. import codec
from ..errors import SagaNotFound, SagaRecordCorrupt
from ..plan import Plan, cached_plan
from ..state import SagaState, SagaStatus, search_pairs
from .protocol import EndNotice, Op, Outcome, Transition

__all__ = ["LostWorker", "SagaStore", "StartRequest", "WorkerInstance", "definition_digest"]


@dataclass(frozen=True)
class LostWorker:
    """A worker instance a sweeper claimed as lost.

    ``last_seen`` is its last liveness write (epoch seconds; 0: it stopped).
    """

    token: str
    hostname: str
    last_seen: float


@dataclass(frozen=True)
class WorkerInstance:
    """What the store knows of one worker instance (`SagaStore.workers`)."""

    token: str
    hostname: str
    last_seen: float | None
    lost: bool


def definition_digest(plan_json: str, settings_json: str) -> str:
    """The digest a definition (plan and settings) is stored and named by."""
    return hashlib.sha1(f"{plan_json}\n{settings_json}".encode()).hexdigest()[:16]


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
    #: Retention of a COMPENSATED saga (None: ``retention``) and of a FAILED one (None: kept until purged).
    compensated_retention: float | None = None
    failed_retention: float | None = None
    #: saga_late_outcome_window and saga_dedup_window, seconds.
    late_outcome_window: float = 24 * 3600.0
    dedup_window: float = 600.0
    #: The pivot step ("": none); the forward retry settings are written only with one.
    pivot: str = ""
    #: A child saga's parent: (parent saga id, its generation, the step that is this saga).
    parent: tuple[str, str, str] | None = None
    #: Business keys and their values as text (``Saga(search_keys=...)``), indexed with the start.
    search: tuple[tuple[str, str], ...] = ()
    #: The saga this one re-runs (`celery_saga.rerun`), or "".
    rerun_of: str = ""
    #: Its locks and running limit (`celery_saga.locks.lock_resources`): (resource, capacity).
    locks: tuple[tuple[str, int], ...] = ()
    #: "queue" (wait for them) or "reject" (refused, nothing written); how long it waits (None: for ever).
    on_locked: str = "queue"
    lock_timeout: float | None = None
    #: A cluster: its lock call's answer ("take" or "wait") and when (ms), for the start to write (cluster_locks.py).
    lock_answer: tuple[str, str] | None = None

    def definition(self) -> str:
        """The plan and settings, stored once under ``plan_digest`` rather than in every record."""
        return f'{{"plan": {self.plan_json}, "settings": {self.settings_json or "{}"}}}'

    def fields(self) -> list[str]:
        """The new record's fields as flat field/value pairs (`celery_saga.store.keys` lists them)."""
        settings = _decoded(self.settings_json)
        backoff = (settings.get("compensation_retry_backoff"), settings.get("compensation_retry_backoff_max"))
        pairs = [
            ("name", self.name),
            ("fp", self.fingerprint),
            ("kwargs", self.kwargs_json),
            ("ph", self.plan_digest),
            ("stages", self.stages),
            ("retention", repr(self.retention)),
            ("bo", ",".join(repr(float(x or 0)) for x in backoff)),
            ("cret", "" if self.compensated_retention is None else repr(self.compensated_retention)),
            ("fret", "" if self.failed_retention is None else repr(self.failed_retention)),
            ("lw", f"{self.late_outcome_window * 1000:.0f}"),
            ("dw", f"{self.dedup_window * 1000:.0f}"),
            ("cb_ok", self.on_complete),
            ("cb_fail", self.on_failure),
            ("key", self.idempotency_key),
            ("maxr", "" if self.max_retries is None else str(self.max_retries)),
        ]
        if self.saga_timeout is not None:
            pairs.append(("sto", f"{self.saga_timeout * 1000:.0f}"))
        if self.search:
            pairs.append(("sk", json.dumps(dict(self.search), separators=(",", ":"))))
        if self.rerun_of:
            pairs.append(("rof", self.rerun_of))
        if self.locks:
            pairs.append(("lk", json.dumps([list(x) for x in self.locks], separators=(",", ":"))))
            # "!": read by the start only, not kept in the record.
            if self.on_locked == "reject":
                pairs.append(("!onl", "reject"))
            if self.lock_timeout is not None:
                pairs.append(("!lkto", f"{self.lock_timeout * 1000:.0f}"))
            if self.lock_answer is not None:
                pairs += [("!lkc", self.lock_answer[0]), ("!lkat", self.lock_answer[1])]
        if self.parent is not None:
            pairs += [("parent", self.parent[0]), ("pgen", self.parent[1]), ("pstep", self.parent[2])]
        if self.pivot:
            forward = (settings.get("forward_retry_backoff", 1.0), settings.get("forward_retry_backoff_max", 600.0))
            max_forward = settings.get("forward_max_retries")
            pairs.append(("pv", self.pivot))
            pairs.append(("fbo", ",".join(repr(float(x)) for x in forward)))
            pairs.append(("fmaxr", "" if max_forward is None else str(max_forward)))
        return [x for pair in (*pairs, *self.step_fields) for x in pair]


@functools.lru_cache(maxsize=64)
def _decoded(settings_json: str) -> dict[str, Any]:
    # The same few settings JSONs come with every start: decode each once (read only).
    decoded: dict[str, Any] = json.loads(settings_json or "{}")
    return decoded


class SagaStore(abc.ABC):
    """One record per saga; every state change is one atomic transition."""

    #: Where the store lives, safe to print (password masked).
    location: str
    prefix: str
    #: Retention of finished sagas in this process, for index trimming.
    retention: float = 0.0
    #: True if each transition moves its saga's index entries itself, atomically
    #: (one server); False if they are separate calls after it (a cluster,
    #: where the indexes are in other slots), repaired by readers.
    indexes_in_transition: bool = False

    # -- primitives ---------------------------------------------------------

    @abc.abstractmethod
    def _run(
        self,
        saga_id: str,
        op: Op,
        tx: str,
        gen: str,
        args: Sequence[str],
        index_first: tuple[str, str, str] | None = None,
        watch_at: float | None = None,
        define: tuple[str, str] | None = None,
        messages: Sequence[str] = (),
        search: Sequence[tuple[str, str]] = (),
    ) -> str:
        """Apply one transition atomically and return the script's JSON reply.

        A non-empty ``tx`` de-duplicates: a retried call returns the first
        reply. ``index_first`` is an index move ``(name, old, new)`` and
        ``watch_at`` a deadline-index entry (epoch seconds; it only ever moves
        earlier), both sent in the same round trip, before the transition: a
        deadline is in the index before the transition that starts it.
        ``define`` is a definition ``(digest, JSON)`` to store first if absent.
        ``messages`` go last, after everything else the call carries.
        ``search``: a start's business keys, for a store whose transitions do
        not index them themselves (a cluster) to index in its index call.
        """

    @abc.abstractmethod
    def _load(self, saga_id: str) -> dict[str, str] | None:
        """The raw record, or None."""

    @abc.abstractmethod
    def _read_definition(self, digest: str) -> str | None:
        """The stored plan and settings named ``digest`` (`StartRequest.definition`), or None."""

    def _complete(self, raw: dict[str, str] | None) -> dict[str, str] | None:
        """The record with its ``plan`` and ``settings``, which it names by digest (``ph``).

        Definitions never change under their digest, so each is read once per
        process. One that is missing, unreadable or not what its digest says
        is left out: parsing the record then says it is corrupt.
        """
        if not raw or "plan" in raw or not raw.get("ph"):
            return raw
        try:
            plan_json, settings_json = self._definition(raw["ph"])
        except SagaRecordCorrupt:
            return raw
        return {**raw, "plan": plan_json, "settings": settings_json}

    def _definition(self, digest: str) -> tuple[str, str]:
        """The plan and settings JSON stored under ``digest``, checked against it.

        Their task names are published (steps, compensations), so a
        definition is used only if its content hashes to the digest the
        record names: a definition key written by anyone but a saga start
        cannot make a worker send tasks its saga never named.

        Raises:
            SagaRecordCorrupt: it is missing, unreadable, or not what its digest says.
        """
        definition = _DEFINITIONS.get(digest)
        if definition is not None:
            return definition
        text = self._read_definition(digest)
        if text is None:
            raise SagaRecordCorrupt(f"plan:{digest}", f"no definition is stored under {digest}")
        try:
            decoded = json.loads(text)
            definition = (codec.dumps(decoded["plan"], sort_keys=True), json.dumps(decoded["settings"], sort_keys=True))
        except (ValueError, KeyError, TypeError) as exc:
            raise SagaRecordCorrupt(f"plan:{digest}", f"its definition cannot be read: {exc}") from exc
        if definition_digest(*definition) != digest:
            raise SagaRecordCorrupt(f"plan:{digest}", "its definition does not match its digest: it was altered")
        if len(_DEFINITIONS) < 1024:
            _DEFINITIONS[digest] = definition
        return definition

    def plan(self, digest: str) -> Plan:
        """The plan stored under ``digest``, checked against it (`_definition`); decoded once per process.

        Raises:
            SagaRecordCorrupt: it is missing, unreadable, or not what its digest says.
        """
        try:
            return cached_plan(digest, lambda: self._definition(digest)[0])
        except (ValueError, KeyError, TypeError) as exc:
            raise SagaRecordCorrupt(f"plan:{digest}", f"its plan cannot be read: {exc}") from exc

    @abc.abstractmethod
    def _index(
        self,
        saga_id: str,
        name: str,
        old: str,
        new: str,
        retention: float,
        unwatch: bool = False,
        watch_at: float | None = None,
    ) -> None:
        """Move ``saga_id`` between status indexes; drop its deadline entry (``unwatch``) or move it earlier.

        Idempotent.
        """

    @abc.abstractmethod
    def _watch(self, saga_id: str, at: float) -> None:
        """Make sweepers look at ``saga_id`` by ``at`` (epoch seconds): add it to the deadline index, or earlier."""

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

    def epoch(self) -> str:
        """The store's epoch: a token made when the store is first used, and made anew after a reset."""
        return ""

    def health_warnings(self) -> list[str]:
        """What about the store's servers can lose sagas (no persistence, eviction), said for a warning."""
        return []

    def was_reset(self, since: str | None = None) -> bool:
        """True if the store lost its data since epoch ``since`` (default: the one this process saw first)."""
        return False

    def lost_in_reset(self, saga_id: str, since: str | None = None) -> bool:
        """True if ``saga_id``, whose record is missing, was lost in a reset since ``since``; counts it once."""
        if not self.was_reset(since):
            return False
        self.count_lost(saga_id)
        return True

    def count_lost(self, saga_id: str) -> int:
        """Count ``saga_id`` as lost in a reset (once however often it is met); the count so far."""
        return 0

    def lost_count(self) -> int:
        """How many sagas have been met lost in resets of the store since its last reset."""
        return 0

    @abc.abstractmethod
    def count_rejected(self, reason: str) -> None:
        """Count a message rejected for ``reason`` (``/metrics``: celery_saga_rejected_messages_total)."""

    def plan_digest(self, saga_id: str) -> str:
        """The digest of the plan ``saga_id``'s record names; "" if there is no record."""
        try:
            return self.load(saga_id).get("ph", "")
        except SagaNotFound:
            return ""

    @contextlib.contextmanager
    def end_signal(self, saga_id: str) -> Iterator[Callable[[float], EndNotice | None]]:
        """A ``wait(seconds)`` that returns the saga's `EndNotice` when it ends, None after the seconds.

        Enter it before reading the status, so that an end in between is not
        missed. Here it just sleeps: callers re-read the status after each wait.
        """

        def wait(seconds: float) -> EndNotice | None:
            time.sleep(seconds)
            return None

        yield wait

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
    def index_pages(
        self, status: SagaStatus, name: str | None, since: float | None, until: float | None, page: int = 500
    ) -> Iterator[list[str]]:
        """Every id in ``status``'s indexes (entered in [``since``, ``until``], epoch seconds), a page at a time.

        Oldest first within each index, one round trip per page, so memory
        does not grow with the count. Entries moved or removed while it runs
        are not met twice; an expired record's entry may be met.
        """

    @abc.abstractmethod
    def lock_queue(self, resource: str) -> tuple[list[str], list[str]]:
        """Who holds ``resource`` (``l:<lock>``, ``n:<name>``), and who waits for it, first first."""

    @abc.abstractmethod
    def locks_in_use(self) -> list[str]:
        """The resources some saga holds or waits for."""

    @abc.abstractmethod
    def lock_counters(self) -> dict[str, int]:
        """The locks' metrics (store/keys.py ``{locks}:m``)."""

    def repair_locks(self) -> list[str]:
        """Repair what a crash left between a cluster's lock calls (store/cluster_locks.py); the sagas let start.

        A store whose transitions move the locks themselves has nothing to repair.
        """
        return []

    @abc.abstractmethod
    def search(self, key: str, value: str) -> set[str]:
        """Ids of the sagas indexed with business key ``key`` = ``value``; some records may have expired."""

    @abc.abstractmethod
    def _unindex_search(self, saga_id: str, pairs: Sequence[tuple[str, str]]) -> None:
        """Remove ``saga_id``'s business key entries (key, value)."""

    @abc.abstractmethod
    def collect_search(self, page: int = 500) -> int:
        """Remove the business key entries whose record is gone (expired); returns how many."""

    @abc.abstractmethod
    def counts(self) -> dict[str, dict[str, int]]:
        """Index sizes: ``{saga_name: {status: count}}``, finished sagas within retention only."""

    @abc.abstractmethod
    def counters(self) -> dict[str, int]:
        """The counters the transitions keep (store/keys.py ``metrics``), summed over the shards."""

    @abc.abstractmethod
    def load_many(self, saga_ids: Sequence[str]) -> list[dict[str, str] | None]:
        """Raw records of several sagas in one round trip; None where there is none."""

    @abc.abstractmethod
    def unwatch(self, saga_id: str) -> None:
        """Remove ``saga_id``'s deadline entry, at whatever time: for an entry naming no readable record."""

    @abc.abstractmethod
    def not_a_record(self, saga_id: str) -> bool:
        """True if the key of ``saga_id``'s record holds something else (a string, a list ...).

        What refuses a transition with a key of the wrong type: this key (a
        message or an index entry naming it is poison), or another one the
        transition touches (an index shard: the store's own problem).
        """

    # -- operations -----------------------------------------------------------

    def start(self, req: StartRequest, messages: Sequence[str] = ()) -> Transition:
        """Write a saga's record (``created``), or find the one its idempotency key names.

        ``messages``: its first stage, built to be pushed by the start itself
        (`celery_saga.enqueue.Prebuilt.args`).
        """
        # Index first, in the same round trip as the start: the index is only
        # a lookup aid, and the rare start that created nothing is fixed below.
        reply = self._run(
            req.saga_id,
            Op.START,
            "",
            req.gen,
            req.fields(),
            index_first=(req.name, "", SagaStatus.PENDING.value),
            watch_at=req.watch_at,
            define=(req.plan_digest, req.definition()),
            messages=messages,
            search=req.search,
        )
        t = Transition.from_reply(Op.START, req.saga_id, reply, req.name, req.gen)
        if self.indexes_in_transition:
            return t
        if t.outcome is not Outcome.CREATED and t.status is not SagaStatus.PENDING:
            self._unindex(req.saga_id, req.name, SagaStatus.PENDING.value)
        return t

    def abort_start(self, saga_id: str, gen: str, name: str, error: str, unpublished: Sequence[str]) -> Transition:
        """Mark a start whose publish failed; its key is released for the caller's retry.

        A start that failed before anything ran leaves no FAILED index entry: it
        is not a dead letter (nothing to compensate), its record expires, and
        the caller got the error.
        """
        t = self.apply(Op.ABORT, saga_id, gen, name, error, *unpublished, reindex=False)
        if self.indexes_in_transition:
            return t
        if t.outcome is Outcome.ABORTED:
            self._unindex(saga_id, name, SagaStatus.PENDING.value)
        elif t.changed_from:
            self.reindex(t)
        return t

    def apply(
        self,
        op: Op,
        saga_id: str,
        gen: str,
        name: str,
        *args: str,
        first: bool = False,
        watch_at: float | None = None,
        tx: str | None = None,
        reindex: bool = True,
        messages: Sequence[str] = (),
    ) -> Transition:
        """Apply transition ``op`` to a saga record, de-duplicated, and move its status index.

        ``args`` are the op's own arguments (``transitions.lua`` lists them).
        ``first`` marks the begin of a first-stage step, which is what takes a
        saga from PENDING to RUNNING. ``tx`` is the transition id: a call
        repeated with the same id gets the first reply back (default: a fresh id).
        ``messages``: a done's next stage, built to be pushed by the call
        itself (`celery_saga.enqueue.Prebuilt.args`).
        """
        at = _DRAW_AT.get(op)
        if at is not None:
            args = (*args[:at], _jitter(), *args[at:])
        # Every saga makes this move once: send it in the same round trip as
        # the begin, and put the entry right in the rare other cases.
        move = (name, SagaStatus.PENDING.value, SagaStatus.RUNNING.value) if first else None
        tx = self.new_tx() if tx is None else tx
        reply = self._run(saga_id, op, tx, gen, args, index_first=move, watch_at=watch_at, messages=messages)
        t = Transition.from_reply(op, saga_id, reply, name, gen)
        if t.outcome is Outcome.LATE and t.due:
            # A second round for a saga that may have left the deadline index
            # (saga_late_outcome_window): its attempts have deadlines to watch.
            self._watch(saga_id, time.time())
        if self.indexes_in_transition:
            return t
        if first:
            if t.status is not None and t.status is not SagaStatus.RUNNING:
                self._index(saga_id, t.name, SagaStatus.RUNNING.value, t.status.value, 0.0)
        elif reindex and t.changed_from:
            self.reindex(t)
        return t

    def drop_from_index(self, saga_id: str, status: SagaStatus, name: str = "") -> None:
        """Remove an index entry whose record is gone; ``name`` also from that saga name's index."""
        self._unindex(saga_id, name, status.value)

    def reindex(self, t: Transition) -> None:
        """Move the saga of ``t`` from the index of its old status to its new one."""
        assert t.changed_from is not None and t.status is not None
        # Trimming uses this process's retention, not the saga's own: it is
        # housekeeping only, since readers skip ids whose record expired.
        # FAILED sagas never expire, so their index is never trimmed.
        expiring = t.status in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED)
        # A completed saga has no deadline left, so its deadline entry goes
        # with this move, unless its callback is still to be sent: a sweeper
        # sends it if the process that completed the saga dies first.
        # Rolled-back sagas leave lazily: a step with an unknown outcome may
        # still report a late success whose second compensation round needs a
        # deadline, so a sweeper drops the entry once the record says nothing
        # more can come (or the record expired).
        done = t.status is SagaStatus.COMPLETED and not t.callback
        retention = self.retention if expiring else 0.0
        # A sweeper looks at an ended saga once the callback grace is over,
        # in case its callback was never sent.
        look = None if done or not t.status.finished else time.time() + CALLBACK_GRACE + 1
        self._index(t.saga_id, t.name, t.changed_from.value, t.status.value, retention, unwatch=done, watch_at=look)

    def purge(self, saga_id: str) -> Transition:
        """Remove a finished saga and its index entries (``purged``, or ``not_allowed``)."""
        # A cluster removes the business key entries after the record: read them first.
        keys = "" if self.indexes_in_transition else (self._load(saga_id) or {}).get("sk", "")
        t = self.apply(Op.PURGE, saga_id, "*", "", tx="", reindex=False)
        if t.outcome is Outcome.PURGED and t.status is not None and not self.indexes_in_transition:
            self._unindex(saga_id, t.name, t.status.value)
            if keys:
                self._unindex_search(saga_id, search_pairs(keys))
        return t

    def retry(self, saga_id: str) -> Transition:
        """Re-drive what gave up in a FAILED saga, compensations or steps past the pivot (``not_allowed`` otherwise)."""
        # Their new attempt deadlines need the saga back in the deadline
        # index; a sweeper looking now rescores it to the right time.
        return self.apply(Op.RETRY, saga_id, "*", "", watch_at=time.time())

    def link_rerun(self, saga_id: str, rerun_id: str, again: bool = False) -> Transition:
        """Record ``rerun_id`` as a re-run of saga ``saga_id`` (``recorded``).

        ``exists`` if it was re-run already (unless ``again``); ``not_allowed``
        unless it is COMPENSATED or FAILED.
        """
        return self.apply(Op.RERUN, saga_id, "*", "", rerun_id, "1" if again else "", tx="", reindex=False)

    def unlock(self, saga_id: str) -> Transition:
        """Give back the locks of a FAILED saga: ``recorded``; ``duplicate`` if it holds none; else ``not_allowed``."""
        return self.apply(Op.UNLOCK, saga_id, "*", "", tx="", reindex=False)

    def sweep(self, saga_id: str) -> Transition:
        """Act on the saga's due deadlines: ``swept``, or ``missing`` / ``corrupt``."""
        return self.apply(Op.SWEEP, saga_id, "*", "", f"{CALLBACK_GRACE * 1000:.0f}")

    def cancel(self, saga_id: str, error: str) -> Transition:
        """Stop forward progress and compensate (``finished`` if it ended, ``not_allowed`` past its pivot)."""
        return self.apply(Op.CANCEL, saga_id, "*", "", error)

    def unwind(self, saga_id: str, error: str) -> Transition:
        """Roll a child saga back as a unit, for its parent: cancel it, or compensate it if it completed."""
        # A completed child left the deadline index; its compensations'
        # deadlines need it back there (a sweeper looking now rescores it).
        return self.apply(Op.UNWIND, saga_id, "*", "", error, watch_at=time.time())

    def signal(self, saga_id: str, event: str, data_json: str, rejection: str = "") -> Transition:
        """Deliver an outside event to the saga's wait for it (``transitions.lua``: signal).

        ``rejection`` is the error recorded if the event rejects a wait: its
        data as it may be shown (masked, capped); without it, only the event's name.
        """
        return self.apply(Op.SIGNAL, saga_id, "*", "", event, data_json, rejection)

    def compensation_failed(self, saga_id: str, gen: str, name: str, step: str, error: str, round: int) -> Transition:
        """Record that an attempt of a compensation failed: ``backoff`` (it is sent again) or ``gave_up``."""
        return self.apply(Op.COMP_FAIL, saga_id, gen, name, step, error, str(round))

    def heartbeat(self, saga_id: str, step: str, attempt: int) -> Transition:
        """Move a running step's heartbeat deadline on (``recorded``) if ``attempt`` still runs, else ``duplicate``."""
        return self.apply(Op.HEARTBEAT, saga_id, "*", "", step, str(attempt), tx="", reindex=False)

    # -- worker liveness (celery_saga.liveness); a store without it keeps none ---------

    def worker_alive(self, token: str, hostname: str, starting: bool = False) -> bool:
        """Write worker instance ``token``'s liveness; True if it had been declared lost meanwhile.

        ``starting``: the instance just started, so older live instances
        with the same node name are dead (a node name is unique): they are
        made due for the sweepers' next look.
        """
        return False

    def worker_stopped(self, token: str) -> None:
        """Worker instance ``token`` stopped: sweepers look at what it still ran, at once."""
        return None

    def claim_lost_workers(self, lost_after: float, lease: float) -> list[LostWorker]:
        """Claim the worker instances silent for ``lost_after`` seconds, each by one sweeper, for ``lease`` seconds."""
        return []

    def lost_worker_handled(self, token: str) -> None:
        """A claimed instance's steps were all declared lost: no sweeper looks at it again."""
        return None

    def workers(self) -> dict[str, WorkerInstance]:
        """Every worker instance the store knows, by token: its node name, last liveness write, whether lost."""
        return {}

    def load(self, saga_id: str) -> dict[str, str]:
        raw = self._complete(self._load(saga_id))
        if not raw or "status" not in raw:
            raise SagaNotFound(saga_id, self.where())
        return raw

    def state(self, saga_id: str) -> SagaState:
        return SagaState.from_record(saga_id, self.load(saga_id))

    def status(self, saga_id: str) -> SagaStatus:
        return self.state(saga_id).status

    def where(self) -> str:
        return f"store {self.location} under prefix {self.prefix!r}"

    def new_tx(self) -> str:
        """A fresh transition id, for a caller that retries one transition itself."""
        return _new_tx()


# Definitions (plan JSON, settings JSON) by digest: immutable, so cached for good.
_DEFINITIONS: dict[str, tuple[str, str]] = {}

#: Seconds a finished saga's process has to send its callback before a
#: sweeper sends it (and the callback may then arrive twice).
CALLBACK_GRACE = 10.0

# Ops that may decide a retry (of a compensation, or of a step past the
# pivot) get a draw for its backoff's jitter, at this place among their
# arguments (scripts draw no random numbers; transitions.lua lists them).
_DRAW_AT = {Op.SWEEP: 1, Op.FAIL: 2, Op.LOST: 3, Op.COMP_FAIL: 3}


def _new_tx() -> str:
    return f"{random.getrandbits(64):016x}"


def _jitter() -> str:
    return repr(random.random())
