"""A Redis Cluster store's locks: in the hash slot of ``{locks}``, moved by calls of their own.

On one server a saga's locks move inside its own transitions
(``store/locks.lua``). On a cluster its record and the ``{locks}`` keys are in
different hash slots, which no call spans, so the store makes the calls in
between (the lock script is ``store/lockslot.lua``), in an order where a
crash between any two leaves something a sweeper repairs:

A start
  1. ``acquire`` in the lock script: take, wait, or (``on_locked="reject"``)
     refuse with nothing written anywhere.
  2. the start transition, told the answer and its time. Written later than
     ``LOCK_FENCE_MS`` after step 1, it refuses the answer (``relock``):
     the store gives the lock back and starts again.
  Dead between 1 and 2: a lock held (or waited for) by a saga with no record,
  given back by a repair once the lock call is ``MISSING_GRACE_MS`` old.
  A start that found its saga already there gives back what step 1 took,
  unless the record holds it.

An end (or a purge, a cancelled waiter, an unlock)
  1. the transition that ends the saga names the resources it gives back.
  2. ``release`` in the lock script: gives them back, and moves the first
     waiters that may take theirs now to holding.
  3. ``admit``, a transition of each such waiter's record: its first stage
     is dispatched, and the caller's ``follow()`` publishes it.
  Dead between 1 and 2: a holder whose record has ended. Between 2 and 3: a
  holder whose record still waits. `ClusterLocks.repair` finds both: the
  sweep of a waiting saga (every 30 s) repairs the resources it waits for,
  and each worker's sweeper repairs every resource once a minute.

An operator's retry of a FAILED saga takes its running slot back first,
then retries: dead between, a FAILED saga holds a slot, which a repair gives back.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from redis.commands.core import Script

from ..errors import SagaStoreUnavailable
from .base import SagaStore, StartRequest
from .keys import Keys
from .protocol import Op, Outcome, Transition

__all__ = ["ClusterLocks"]

#: store/locks.lua: how often a sweeper looks at a waiting saga, and how
#: soon after its admission it checks the first stage went out (seconds).
LOCK_RECHECK = 30.0
ADMIT_LOOK = 10.0
#: How many waiters of one resource a repair looks at, first first.
REPAIR_WAITERS = 20


@dataclass(frozen=True)
class Acquired:
    """The lock script's answer to a start: ``take``, ``wait`` or ``locked``, and when (ms, its node's clock)."""

    how: str
    at: str
    lock: str = ""
    holder: str = ""
    queued: bool = False  # the holder named waits first (nobody holds the lock)


def holds(resource: str, status: str | None, lks: str | None) -> bool:
    """Does a record with this status and ``lks`` still hold ``resource``? (store/locks.lua ``holds``)."""
    if lks != "held" or status in ("COMPLETED", "COMPENSATED"):
        return False
    return not (status == "FAILED" and resource.startswith("n:"))


@dataclass(frozen=True)
class Seen:
    """What a repair saw in the lock slot: each resource's holders, and its first waiters in order."""

    holders: dict[str, list[str]]
    waiters: dict[str, list[str]]


class ClusterLocks:
    """The lock calls of a cluster store (see the module docstring)."""

    def __init__(
        self, store: SagaStore, call: Callable[[Callable[[], Any]], Any], client: Any, keys: Keys, script: Script
    ) -> None:
        self.store = store
        # The store's way to call Redis: its errors become the store's (SagaStoreUnavailable ...).
        self.call = call
        self.client = client
        self.keys = keys
        self.script = script

    # -- the lock script -----------------------------------------------------

    def _lock(self, *args: str) -> Any:
        return self.call(lambda: self.script(keys=[self.keys.locks()], args=list(args)))

    def acquire(self, saga_id: str, on_locked: str, name: str, resources: Sequence[tuple[str, int]]) -> Acquired:
        """Take a saga's resources, queue it for them, or refuse (``on_locked="reject"``)."""
        raw = json.loads(self._lock("acquire", saga_id, on_locked, name, _resources_json(resources)))
        return Acquired(
            str(raw["how"]),
            f"{float(raw.get('at') or 0):.0f}",
            str(raw.get("lock") or ""),
            str(raw.get("holder") or ""),
            raw.get("queued") is True,
        )

    def release(
        self, saga_id: str, resources: Iterable[str], missing: bool = False, unlock: bool = False, queued: bool = False
    ) -> list[str]:
        """Give ``resources`` back (``queued``: leave their queues only); the waiters that now hold theirs.

        Those waiters' records are still to admit.
        """
        how = "unlock" if unlock else "queued" if queued else ""
        raw = json.loads(self._lock("release", saga_id, "missing" if missing else "", how, *resources))
        admitted = raw.get("admitted")
        return [str(x) for x in admitted] if isinstance(admitted, list) else []

    # -- around the transitions -----------------------------------------------

    def start(self, req: StartRequest, run: Callable[[StartRequest], Transition]) -> Transition:
        """Start a saga with locks: its lock call, then its start transition (``run``)."""
        for _ in range(2):
            got = self.acquire(req.saga_id, req.on_locked, req.name, req.locks)
            # The lock script cannot read the records: a saga in the way may be gone
            # (one server prunes those in the start itself, store/locks.lua).
            if got.how != "take" and got.holder not in ("", req.saga_id) and self._gone(got):
                got = self.acquire(req.saga_id, req.on_locked, req.name, req.locks)
            if got.how == "locked":
                return Transition(
                    Op.START,
                    Outcome.LOCKED,
                    req.saga_id,
                    None,
                    name=req.name,
                    gen=req.gen,
                    lock=got.lock,
                    holder=got.holder,
                )
            watch_at = req.watch_at
            if got.how == "wait":
                # Nothing of it runs yet: only its locks have a deadline.
                watch_at = time.time() + min(LOCK_RECHECK, math.inf if req.lock_timeout is None else req.lock_timeout)
            t = run(replace(req, lock_answer=(got.how, got.at), watch_at=watch_at))
            if t.outcome is Outcome.RELOCK:
                self.release(req.saga_id, [r for r, _ in req.locks])
                continue
            if t.outcome is not Outcome.CREATED:
                self._settle(req.saga_id, [r for r, _ in req.locks])
            return t
        raise SagaStoreUnavailable(
            self.store.where(),
            reachable=True,
            detail="a start's record was written too long after its lock call, twice: the saga store is too slow to "
            "answer; start it again",
        )

    def after(self, t: Transition) -> Transition:
        """Make the lock calls transition ``t`` left to its caller; its ``admitted`` names who may start now."""
        ids: list[str] = []
        if t.release:
            ids += self.release(t.saga_id, t.release, unlock=t.op is Op.UNLOCK)
        if t.kept:
            self._lock("kept", t.saga_id)
        started = self.admit(ids)
        if t.relook:
            started += self.relook(t.saga_id)
        return replace(t, admitted=(*t.admitted, *started)) if started else t

    def retry(self, saga_id: str, run: Callable[[], Transition]) -> Transition:
        """An operator's retry of a FAILED saga (``run``), which runs again in its running slot.

        The slot is taken back before the transition, not after: a crash
        between leaves a FAILED saga holding a slot, which a repair gives
        back, rather than a running saga without one, which nothing would
        notice.
        """
        slots = [r for r, _ in _resources_of(self.store._load(saga_id)) if r.startswith("n:")]
        if not slots or self._records([saga_id])[0] != ("FAILED", "held"):
            return run()
        self._lock("retake", saga_id, *slots)
        t = run()
        if t.outcome not in (Outcome.ROLLBACK, Outcome.RESEND):
            self._settle(saga_id, slots)  # refused: it runs nothing, so it takes no slot
        return t

    def admit(self, ids: Iterable[str]) -> list[str]:
        """Admit each waiter the lock script let take its resources; those that started.

        One that no longer waits gives them back, which may let others in.
        """
        todo, started = list(ids), []
        while todo:
            saga_id = todo.pop(0)
            t = self.store.apply(Op.ADMIT, saga_id, "*", "", reindex=False)
            if t.outcome is Outcome.RECORDED:
                started.append(saga_id)
                # Its step deadlines, and the check that its first stage went out.
                self.store._watch(saga_id, time.time() + ADMIT_LOOK)
            elif t.outcome is not Outcome.DUPLICATE:
                todo += self.release(saga_id, (), missing=t.outcome is Outcome.MISSING)
        return started

    def relook(self, saga_id: str) -> list[str]:
        """A sweep of a waiting saga: take its resources if they are free, and repair those it waits for.

        The lock call is sent again: it answers as before for a saga it
        knows, and queues one it lost.
        """
        raw = self.store._load(saga_id)
        resources = _resources_of(raw)
        if raw is None or not resources:
            return []
        got = self.acquire(saga_id, "", raw.get("name", ""), resources)
        if got.how == "take":
            return self.admit([saga_id])
        return self.repair([r for r, _ in resources])

    # -- repairs ---------------------------------------------------------------

    def _records(self, ids: Sequence[str]) -> list[tuple[str | None, str | None] | None]:
        """Each saga's status and ``lks`` (None: no record), in one pipelined read (both are kept unpacked)."""
        if not ids:
            return []

        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for saga_id in ids:
                pipe.hmget(self.keys.record(saga_id), "status", "lks")
            return list(pipe.execute())

        return [None if got[0] is None else (got[0], got[1]) for got in self.call(read)]

    def _settle(self, saga_id: str, resources: Sequence[str]) -> None:
        """Give back what a saga's lock call took, unless its record holds or waits for it."""
        status, lks = self._records([saga_id])[0] or (None, None)
        if lks == "wait" and status == "PENDING":
            return
        if any(holds(r, status, lks) for r in resources):
            return
        self.admit(self.release(saga_id, resources))

    def _gone(self, blocked: Acquired) -> bool:
        """The saga a start waits for (or is refused by) is gone: it lets go (True), or it is there (False)."""
        got = self._records([blocked.holder])[0]
        if got is not None and (holds(blocked.lock, *got) or got == ("PENDING", "wait")):
            return False  # (waiting, or let in by the lock script and still to admit: it does hold it)
        self.admit(self.release(blocked.holder, [blocked.lock], missing=got is None, queued=blocked.queued))
        return True

    def repair(self, resources: Sequence[str]) -> list[str]:
        """Give back resources whose holders are gone, drop waiters that are, admit who may start; those started."""
        return self.repair_seen(self.look(resources)) if resources else []

    def look(self, resources: Sequence[str]) -> Seen:
        """Who holds each resource, and who waits for it first, in one pipelined read of the lock slot."""

        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for r in resources:
                pipe.smembers(self.keys.resource(r, "h"))
                pipe.zrange(self.keys.resource(r, "q"), 0, REPAIR_WAITERS - 1)
            return list(pipe.execute())

        found = self.call(read)
        return Seen(
            {r: sorted(str(x) for x in found[2 * i]) for i, r in enumerate(resources)},
            {r: [str(x) for x in found[2 * i + 1]] for i, r in enumerate(resources)},
        )

    def repair_seen(self, seen: Seen) -> list[str]:
        """Repair what `look` saw, judged by the records read now: the lock script may have moved on since."""
        ids = sorted({x for v in seen.holders.values() for x in v} | {x for v in seen.waiters.values() for x in v})
        records = dict(zip(ids, self._records(ids), strict=True))
        admit: list[str] = []
        for r, holders in seen.holders.items():
            for h in holders:
                got = records[h]
                if got == ("PENDING", "wait"):
                    admit.append(h)  # the lock script let it in; its record never heard
                elif got is None or not holds(r, *got):
                    admit += self.release(h, [r], missing=got is None)
        for waiters in seen.waiters.values():
            for w in waiters:
                got = records[w]
                if got == ("PENDING", "wait"):
                    break  # the first live waiter: the queue moves when it starts
                # Out of the queues only: its record may have moved on because it was let in since.
                admit += self.release(w, (), missing=got is None, queued=True)
        return self.admit(dict.fromkeys(admit))

    def repair_all(self) -> list[str]:
        """Repair every resource in use (a sweeper, once a minute); the sagas this let start."""
        resources = sorted(str(r) for r in self.call(lambda: self.client.smembers(self.keys.locks())))
        started: list[str] = []
        for i in range(0, len(resources), 100):
            started += self.repair(resources[i : i + 100])
        return started


def _resources_json(resources: Sequence[tuple[str, int]]) -> str:
    return json.dumps([list(x) for x in resources], separators=(",", ":"))


def _resources_of(raw: dict[str, str] | None) -> list[tuple[str, int]]:
    """A record's resources (its ``lk`` field), or none if it has none or they cannot be read."""
    try:
        found = json.loads((raw or {}).get("lk") or "[]")
        return [(str(r), int(c)) for r, c in found]
    except (ValueError, TypeError):
        return []
