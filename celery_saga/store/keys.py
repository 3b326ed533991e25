"""Every Redis key celery_saga writes, in one place.

All keys of one saga share the hash tag ``{<saga_id>}``, so a transition
script touches one hash slot and works on Redis Cluster. The status indexes
share the tag ``{idx}`` among themselves and are updated by a separate,
idempotent command after the transition (see ``RedisSagaStore._index``).

Deadlines live in the record. The deadline index only tells sweepers which
records to look at: sorted sets ``<prefix>:{dl<n>}:due`` of saga ids scored by
when to look (ms), in ``DEADLINE_SHARDS`` shards, each its own hash slot, so
that on a cluster the sweeping spreads over the nodes. A saga enters it in
the round trip of its start, before the start transition; it leaves when it
completes (with its status-index move), or, once rolled back, when a sweeper
finds that nothing more can come: no attempt pending and no step whose
outcome is unknown (a late success would need a deadline), or the record gone.

Fields of the record hash ``<prefix>:{<saga_id>}``, every one the record
has (``transitions.lua`` draws how they move):

=================  ==========================================================
v, gen             schema version ("1"); start generation (a fresh one per start)
name, key, fp      saga name; idempotency key; fingerprint of the kwargs
kwargs, plan, ph   start kwargs (JSON); plan (JSON); plan digest
stages             stage layout for Lua: members by ",", stages by ";"
settings           saga_* settings in force at start (JSON): the compensation
                   backoff, which the script draws retries from
retention, maxr    TTL seconds once finished; compensation max retries ("": none)
cb_ok, cb_fail     on_complete / on_failure signatures (JSON, or "")
cbs                "1" once the end callback was sent
status, status_at  saga status (SagaStatus) and when it was entered (ms)
sto, sdl           saga timeout (ms); saga deadline (ms), for its forward progress
created            start time (ms)
stage, left        current forward stage (0-based); its steps still running
cstage, copen      compensation frontier (stage); compensations not yet ended
gaveup             compensations that gave up
failed_step, error, reason   what started the rollback; reason is failure,
                   timeout, cancelled, or publish (the start could not publish)
startfail          "1": the start could not publish; the next start with the
                   same idempotency key replaces the record
s:<step>           forward status (StepStatus; absent = WAITING)
a:/e:/r:<step>     attempts; error; result (JSON)
td:/t0:/t1:<step>  dispatched, first started, ended (ms)
to:/dl:<step>      step timeout (ms); deadline of the step (ms)
w:<step>           why it ended without an outcome: timeout, cancelled, lost,
                   failure (of a sibling), unstorable (its result)
ls:/lr:/le:/lt:    a late outcome after a timeout: status, result, error, time
cs:<step>          compensation status (CompensationStatus); ca:/ce: attempts, error
ct0:/ct1:<step>    compensation first started, ended (ms)
cdl:<step>         deadline of the current compensation attempt (ms)
cs2:, ca2:, ...    the same for the second round (a late success)
rt:/crt:<step>     highest Celery retry count seen by a step / compensation
cb0:<step>         attempts before the last operator retry (retry budget base)
rr                 operator retries so far
comp:<step>        compensation task name; cof:<step> "1" = compensate on failure
tx:<id>            reply of an applied transition, for de-duplication
=================  ==========================================================
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

__all__ = ["DEADLINE_SHARDS", "Keys"]

DEADLINE_SHARDS = 8


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix."""

    prefix: str

    def record(self, saga_id: str) -> str:
        return f"{self.prefix}:{{{saga_id}}}"

    def status_index(self, status: str) -> str:
        """Sorted set of saga ids by the time they entered ``status``."""
        return f"{self.prefix}:{{idx}}:status:{status}"

    def name_index(self, name: str, status: str) -> str:
        """Like ``status_index``, for one saga name."""
        return f"{self.prefix}:{{idx}}:name:{name}:{status}"

    def names(self) -> str:
        """Set of saga names that have ever been indexed."""
        return f"{self.prefix}:{{idx}}:names"

    def deadline_shard(self, saga_id: str) -> str:
        """The deadline index shard that holds ``saga_id`` (stable across processes)."""
        return self.deadline_shards()[zlib.crc32(saga_id.encode()) % DEADLINE_SHARDS]

    def deadline_shards(self) -> list[str]:
        """Every shard of the deadline index."""
        return [f"{self.prefix}:{{dl{n}}}:due" for n in range(DEADLINE_SHARDS)]
