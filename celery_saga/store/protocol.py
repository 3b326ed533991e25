"""The language Python and ``transitions.lua`` speak: ops, outcomes, and the typed reply.

An op is what a caller asks of a saga record (``Op``); the script answers
with one JSON object, decoded here into a `Transition`, whose ``outcome``
(``Outcome``) says what happened. The two vocabularies are distinct strings:
an op is a verb (``done``), an outcome what came of it (``completed``).
Statuses inside the script are exactly the values of the enums in
`celery_saga.state`; ``tests/test_transitions.py`` checks both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .. import codec
from ..state import SagaStatus, StepStatus, fold

__all__ = ["Due", "EndNotice", "Op", "Outcome", "Transition"]


class Op(str, Enum):
    """The transitions of a saga record, in lifecycle order (the order of ``transitions.lua``)."""

    START = "start"
    ABORT = "abort"
    BEGIN = "begin"
    DONE = "done"
    FAIL = "fail"
    LOST = "lost"
    EXPIRE = "expire"
    HEARTBEAT = "heartbeat"
    SWEEP = "sweep"
    CANCEL = "cancel"
    COMP_BEGIN = "comp_begin"
    COMP_DONE = "comp_done"
    COMP_FAIL = "comp_fail"
    SIGNAL = "signal"
    UNWIND = "unwind"
    CALLBACK_SENT = "callback_sent"
    RETRY = "retry"
    RERUN = "rerun"
    UNLOCK = "unlock"
    ADMIT = "admit"
    PURGE = "purge"

    def __str__(self) -> str:
        return self.value


class Outcome(str, Enum):
    """What a transition did; ``transitions.lua``'s header says which op replies which."""

    # start
    CREATED = "created"  # the record was written: publish the first stage
    EXISTS = "exists"  # same idempotency key and kwargs: the existing saga
    CONFLICT = "conflict"  # same idempotency key, other kwargs
    ABORTED = "aborted"  # a start whose publish failed is FAILED and released its key
    # before a function runs
    RUN = "run"  # marked running: call the function
    BUSY = "busy"  # another copy of the same message is running it
    NOT_DISPATCHED = "not_dispatched"  # the record never dispatched this step or compensation
    DUPLICATE = "duplicate"  # its outcome is recorded already
    FENCED = "fenced"  # fenced or past its deadline: it never runs
    # after a function ran, or a deadline
    WAIT = "wait"  # other steps of the stage still run
    NEXT_STAGE = "next_stage"  # the stage is complete: publish the next one
    COMPLETED = "completed"  # the last stage is complete
    ROLLBACK = "rollback"  # rolling back: publish the compensations in ``due``
    BACKOFF = "backoff"  # a compensation attempt failed and is sent again after a delay
    RESEND = "resend"  # a step after the pivot (or the pivot, its outcome lost) is sent again, or gave up
    GAVE_UP = "gave_up"  # a compensation attempt failed for the last time
    LATE = "late"  # an outcome after the saga stopped waiting for it
    EARLY = "early"  # an expired message, before the store clock's deadline
    SWEPT = "swept"  # a sweep looked at every deadline
    RECORDED = "recorded"  # written; nothing follows
    # refusals
    FINISHED = "finished"  # the saga has ended: nothing to cancel
    NOT_ALLOWED = "not_allowed"  # an operator action its status does not allow
    PURGED = "purged"  # removed
    MISSING = "missing"  # no record
    CORRUPT = "corrupt"  # a record that cannot be read
    STALE = "stale"  # a message of an earlier start of this saga
    REJECTED = "rejected"  # a message whose task was checked against another plan than the record's
    LOCKED = "locked"  # start, on_locked="reject": a lock is held (or waited for); nothing was written
    RELOCK = "relock"  # start on a cluster: its lock call's answer came too late to trust; nothing was written

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Due:
    """A compensation a transition calls for, or (``forward``) a step it sends again.

    Attributes:
        step: The step whose compensation it is (or, ``forward``, the step).
        round: 1 for the rollback, 2 for a late success compensated again.
        attempt: 0 to send it now; else attempt ``attempt`` failed (or
            missed its deadline), and it is sent after ``delay``, or, when it
            ``gave_up``, not at all.
        delay: Seconds to wait before sending it: the retry backoff, drawn by
            the transition (the saga's backoff settings live in its record).
        gave_up: The compensation gave up after attempt ``attempt``.
        forward: The step itself is sent again (a retriable step, or the
            pivot whose outcome was lost), after ``delay``; ``attempt`` is
            the forward retry it is (0: an operator's retry).
    """

    step: str
    round: int = 1
    attempt: int = 0
    delay: float = 0.0
    gave_up: bool = False
    forward: bool = False

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Due:
        return cls(
            step=str(raw["step"]),
            round=int(raw.get("round", 1)),
            attempt=int(raw.get("attempt", 0)),
            delay=float(raw.get("delay", 0.0)),
            gave_up=bool(raw.get("gave_up", False)),
            forward=bool(raw.get("forward", False)),
        )


def _status(raw: Any) -> SagaStatus | None:
    return SagaStatus(raw) if raw else None


@dataclass(frozen=True)
class Transition:
    """What one transition did, decoded from the script's reply.

    Attributes:
        op: The op applied.
        outcome: What happened.
        saga_id: The saga.
        status: Its status after the call; None if there is no record.
        changed_from: Its status before, when this call changed it.
        name: The saga name (from the caller, or from the record for ops
            applied to whatever generation is current).
        gen: The start generation acted for.
        attempt: ``RUN``: the attempt that begins; ``BACKOFF``/``GAVE_UP``:
            the attempt that failed.
        due: Compensations to publish or announce.
        stage: ``NEXT_STAGE``/``CREATED``: the stage to publish.
        data: ``NEXT_STAGE``/``CREATED``: the saga data that stage sees.
        plan_digest: ``NEXT_STAGE``/``CREATED``: the plan, by digest.
        callback: ``COMPLETED``: the ``on_complete`` signature (JSON), or "".
        next_deadline: ``SWEPT``: when the record's next deadline is due
            (ms, store clock), or None if it has none.
        step_status: ``DUPLICATE``: the status the record already has.
        heartbeat_timeout: ``HEARTBEAT``: the step's heartbeat timeout
            (seconds), None if it has none.
        enqueued: ``CREATED``/``NEXT_STAGE``: the transition pushed the
            stage's messages itself (`celery_saga.enqueue`); nothing is left to publish.
        stage_data: ``RUN``, when asked for: the data of the step's stage, as
            the JSON array of parts the record holds (`celery_saga.enqueue`).
        waiting: ``CREATED``/``EXISTS``: the saga waits for its locks; its
            first stage is not dispatched (nothing to publish).
        admitted: Waiting sagas this call let start (their first stage is
            dispatched in their record): publish each (`follow`).
        redrive: ``SWEPT``: an admitted saga whose first stage may never have
            been published: publish what its record dispatched.
        lock, holder: ``LOCKED``: the resource (``l:<lock>``, ``n:<saga name>``)
            and the saga holding it (or the first waiting for it).
        release, relook, kept: On a cluster, the lock calls the transition
            left to its caller (store/cluster_locks.py): resources to give
            back, a waiting saga to look at, a FAILED saga keeping its locks.
    """

    op: Op
    outcome: Outcome
    saga_id: str
    status: SagaStatus | None
    changed_from: SagaStatus | None = None
    name: str = ""
    gen: str = ""
    attempt: int = 0
    due: tuple[Due, ...] = ()
    stage: int | None = None
    data: dict[str, Any] | None = None
    plan_digest: str = ""
    callback: str = ""
    next_deadline: int | None = None
    step_status: StepStatus | None = None
    heartbeat_timeout: float | None = None
    enqueued: bool = False
    stage_data: str = ""
    waiting: bool = False
    admitted: tuple[str, ...] = ()
    redrive: bool = False
    lock: str = ""
    holder: str = ""
    release: tuple[str, ...] = ()
    relook: bool = False
    kept: bool = False

    @property
    def ended(self) -> bool:
        """True if the call finished the saga (COMPLETED, COMPENSATED or FAILED)."""
        return self.changed_from is not None and self.status is not None and self.status.finished

    @classmethod
    def from_reply(cls, op: Op, saga_id: str, reply: str, name: str = "", gen: str = "") -> Transition:
        """Decode the script's JSON reply; ``name`` and ``gen`` are the caller's when the reply has none."""
        # Only saga data holds kombu's types: decode the rest as plain JSON (faster).
        raw: dict[str, Any] = codec.loads(reply) if '"data":' in reply else json.loads(reply)
        data = None
        if "data" in raw:
            # The start kwargs and, in order, the results of every completed
            # step of earlier stages: folded here, never stored.
            data = fold(raw["data"][0], raw["data"][1:])
        deadline = raw.get("next_deadline")
        step_status = raw.get("step_status")
        outcome = Outcome(raw["outcome"])
        later = raw.get("later") or {}
        return cls(
            op=op,
            outcome=outcome,
            saga_id=saga_id,
            # A corrupt record's status is whatever its hash holds, maybe no status at all.
            status=None if outcome is Outcome.CORRUPT else _status(raw.get("status")),
            changed_from=_status(raw.get("from")),
            name=raw.get("name") or name,
            gen=raw.get("gen") or gen,
            attempt=int(raw.get("attempt", 0)),
            due=tuple(Due.from_json(d) for d in raw.get("due", ())),
            stage=int(raw["stage"]) if "stage" in raw else None,
            data=data,
            plan_digest=raw.get("plan_digest", ""),
            callback=raw.get("callback", ""),
            next_deadline=int(deadline) if deadline else None,
            step_status=StepStatus(step_status) if step_status else None,
            heartbeat_timeout=float(raw["heartbeat_timeout"]) / 1000 if raw.get("heartbeat_timeout") else None,
            enqueued=raw.get("enq") is True,
            stage_data=raw.get("pt") or "",
            waiting=raw.get("waiting") is True,
            admitted=tuple(str(x) for x in raw.get("admitted") or ()),
            redrive=raw.get("redrive") is True,
            lock=str(raw.get("lock") or ""),
            holder=str(raw.get("holder") or ""),
            release=tuple(str(x) for x in later.get("release") or ()),
            relook=later.get("relook") is True,
            kept=later.get("kept") is True,
        )


@dataclass(frozen=True)
class EndNotice:
    """What the transition that ended a saga told its waiters (`SagaStore.end_signal`).

    ``data`` is a completed saga's final data when the notice carried it
    (all but very large data), else None: the waiter reads the record.
    """

    status: SagaStatus | None
    data: dict[str, Any] | None = None

    @classmethod
    def from_message(cls, text: str) -> EndNotice:
        """Decode the script's end message: the status, and after a newline a completed saga's data parts.

        The parts are ``[<kwargs>, <result>, ...]``, as a next_stage reply's, folded here.

        Anything it cannot read is a notice without data: the waiter then reads the record.
        """
        status_text, _, parts_json = text.partition("\n")
        try:
            status: SagaStatus | None = SagaStatus(status_text)
        except ValueError:
            return cls(None)
        if status is not SagaStatus.COMPLETED or not parts_json:
            return cls(status)
        try:
            parts = codec.loads(parts_json)
        except ValueError:
            return cls(status)
        if not isinstance(parts, list) or not parts or not isinstance(parts[0], dict):
            return cls(status)
        return cls(status, fold(parts[0], parts[1:]))
