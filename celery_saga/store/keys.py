"""Every Redis key celery_saga writes, in one place.

All keys of one saga share the hash tag ``{<saga_id>}``, so a transition
script touches one hash slot and works on Redis Cluster.

The indexes are sharded: a saga belongs to index shard ``crc32(saga_id) %
saga_index_shards`` (16 by default), whose keys share the hash tag
``{s<n>}``, so on a cluster the index traffic spreads over the nodes and one
script call moves a saga in its shard's indexes. Every process must use the
same number of shards; the store records it in ``<prefix>:{meta}`` and refuses
another. A shard holds:

- ``name:<name>:<S>``: sorted sets of the ids of sagas named ``name`` by the
  time they entered status ``S``, for listing without a SCAN (a listing of
  every name reads each name of the shard; there is no index by status
  alone, one entry per saga less to store). On one server (or
  a Sentinel primary) the transition that changes the status moves the
  entries in the same script, atomically. On a cluster the shard is in
  another slot: the move is a separate call after the transition (before
  it for PENDING and RUNNING), and readers skip and remove entries whose
  record is gone or has another status.
- ``names``: the saga names indexed in the shard.
- ``k:<key>:<b>``: the business keys (``Saga(search_keys=...)``) of the
  shard's sagas: sorted sets whose members are ``<value>``, a NUL, ``<saga_id>``,
  all scored 0, so that the sagas of one value are one ``ZRANGEBYLEX``.
  A key's entries spread over `SEARCH_BUCKETS` sets by `search_bucket` of
  the value, so that each set stays small enough for Redis's compact
  listpack encoding (about 60 B an entry, against 150 in a skiplist). The
  start writes them (on one server in its own call; on a cluster in the
  index call it makes anyway), purge removes them, and sweepers remove the
  entries whose record expired (`celery_saga.search`).
- ``keys``: the business key names indexed in the shard.
- ``metrics``: a hash of counters the transitions keep, for ``/metrics`` (on
  one server or a Sentinel primary; a cluster keeps none), by saga name
  (which cannot hold ":"): ``started:<name>``;
  ``finished:<name>:<status>:<reason>``; ``compfail:<name>``, compensation
  attempts that failed; ``lost:worker`` and ``lost:heartbeat``, running
  steps lost with their worker or for want of a heartbeat; ``dur:<name>:<status>:<i>``, sagas that ended in
  that status after a duration (start to end) in bucket ``i`` of
  ``DURATION_BUCKETS`` (not cumulative), and ``dursum:<name>:<status>``, ms.
- ``due``: the deadline index, saga ids scored by when a sweeper should look
  (ms). Deadlines live in the record; a saga enters the index with its
  start, before the start transition, and leaves when it completes with no
  callback left to send, or, once rolled back, when a sweeper finds that
  nothing more can come (no attempt pending and no step whose outcome is
  unknown) or the record gone.

``<prefix>:{plan:<digest>}`` holds, once per digest, the JSON
``{"plan": ..., "settings": ...}`` that records name by their ``ph`` field: the
plan (the stages, their steps, tasks and compensations) and the settings in
force at start. It never changes and has no TTL (a few hundred bytes per saga
definition and settings).

``<prefix>:{meta}`` holds the store's ``epoch``, a token made when the store is
first used: a record missing under a new (or vanished) epoch was lost when
the store was reset, not expired. And the number of index ``shards``, and
``lost``: how many sagas workers, sweepers and readers have met lost in the
reset (their ids, counted once each, are the set ``<prefix>:{meta}:lost``).

Semantic locks and running limits (``store/lockqueue.lua`` draws them), all
under the hash tag ``{locks}``, so that a saga naming several takes them in one
call on a cluster too: each resource (``l:<lock>``, ``n:<saga name>``) has
``<prefix>:{locks}:h:<r>``, the set of the sagas holding it, and
``<prefix>:{locks}:q:<r>``, the sorted set of those waiting for it by arrival.
On a cluster, ``<prefix>:{locks}:w`` is a hash of what the lock script knows of
each saga holding or waiting (``store/lockslot.lua``). ``<prefix>:{locks}`` is
the set of resources in use, ``<prefix>:{locks}:seq`` the arrival sequence,
and ``<prefix>:{locks}:m`` a hash of their metrics: ``waiting:<name>`` (sagas waiting now),
``wait:<i>`` (waits that lasted up to ``DURATION_BUCKETS[i - 1]``),
``waitsum`` (ms) and ``unlocked`` (operator unlocks).

Worker liveness (`celery_saga.liveness`), under the hash tag ``{workers}``:
``<prefix>:{workers}`` is a sorted set of the instance tokens of running
workers by their last liveness write (ms, store clock; 0 once the worker
stopped), ``<prefix>:{workers}:names`` a hash of each token's worker node name,
and ``<prefix>:{workers}:lost`` a sorted set of the tokens sweepers declared
lost: a positive score is the lease of the sweeper handling it (ms), a
negative one minus the time it was handled, and handled ones are trimmed
after a day (their names with them).

The transition that ends a saga publishes its status on the channel
``<prefix>:{<saga_id>}:end``, which ``SagaResult.get()`` listens to.

Fields of the record hash ``<prefix>:{<saga_id>}``, every one the record
has (``transitions.lua`` draws how they move):

=================  ==========================================================
v, gen             schema version ("1"); start generation (a fresh one per start)
name, key, fp      saga name; idempotency key; fingerprint of the kwargs
kwargs, ph         start kwargs (JSON); digest of the plan and settings
                   (``<prefix>:{plan:<ph>}``)
stages             stage layout for Lua: members by ",", stages by ";"
bo                 compensation backoff and its cap, seconds: "<base>,<max>"
retention, maxr    TTL seconds once COMPLETED; compensation max retries ("": none)
cret, fret         TTL seconds once COMPENSATED ("": retention), FAILED ("": none)
lw, dw             saga_late_outcome_window, saga_dedup_window (ms)
cb_ok, cb_fail     on_complete / on_failure signatures (JSON, or "")
cbs                "1" once the end callback was sent
status, status_at  saga status (SagaStatus) and when it was entered (ms)
sto, sdl           saga timeout (ms); saga deadline (ms), for its forward progress
created            start time (ms)
stage, left        current forward stage (0-based); its steps still running
cstage, copen      compensation frontier (stage); compensations not yet ended
gaveup             compensations that gave up
failed_step, error, reason   what started the rollback; reason is failure,
                   timeout, cancelled, or publish (the start could not publish);
                   forward: a step past the pivot gave up (no rollback)
startfail          "1": the start could not publish; the next start with the
                   same idempotency key replaces the record
s:<step>           forward status (StepStatus; absent = WAITING)
a:/e:/r:<step>     attempts; error; result (JSON)
td:/t0:/t1:<step>  dispatched, first started, ended (ms)
to:/dl:<step>      step timeout (ms); deadline of the step (ms)
tos                a COMPLETED (packed) record's step timeouts, in step order, one field
wk:<step>          instance token of the worker running it (begin); hbt:/hbd:<step>
                   its heartbeat timeout (ms) and heartbeat deadline (ms)
w:<step>           why it ended without an outcome: timeout, cancelled, lost,
                   failure (of a sibling), unstorable (its result)
ls:/lr:/le:/lt:    a late outcome after a timeout: status, result, error, time
cs:<step>          compensation status (CompensationStatus); ca:/ce: attempts, error
ct0:/ct1:<step>    compensation first started, ended (ms)
cdl:<step>         deadline of the current compensation attempt (ms)
cwk:<step>         instance token of the worker running the compensation attempt
cs2:, ca2:, ...    the same for the second round (a late success)
rt:/crt:<step>     highest Celery retry count seen by a step / compensation
cb0:<step>         attempts before the last operator retry (retry budget base)
rr                 operator retries so far
comp:<step>        compensation task name; cof:<step> "1" = compensate on failure
                   (none for a step after the pivot: it is never compensated)
sk                 business keys and their values as text (JSON object), kept unpacked
rof, rrs           the saga this one re-runs (its id); the ids of its re-runs (JSON list)
lk, lks            its locks and running limit, JSON [[resource, capacity] ...]; "held" or
                   "wait" (absent: none, or given back). Both kept unpacked
lkt, lkto, lkdl    waiting: since when (ms); its lock timeout (ms); its lock deadline (ms)
shb, adm           waiting: its index shard; admitted: when (ms), until a sweeper looked
pv, past           the pivot step (a saga with one); "1" once it has completed
fbo, fmaxr         forward backoff "<base>,<max>" (s); forward max retries ("": none)
rj:<wait>          the event that rejects a wait ("wait:<event>", a step with no task)
ev:/evt:<event>    an outside event's data (JSON), first delivery only; when it came (ms)
evx:<event>        the error a wait's reject event records: its data masked and capped
fa:<step>          times a step past the pivot (or the pivot, its outcome lost)
                   was sent again; fb0:<step> the count before the last operator
                   retry; fg:<step> "1": it gave up (the saga is FAILED, "forward")
x:<op>[:<step>:<r>] the latest call of that op (for that step and round): its
                   transition id and reply, for de-duplication (transitions.lua)
zn, z1 .. z<zn>    a finished record, packed (store/compact.py)
=================  ==========================================================
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

__all__ = ["DEFAULT_SHARDS", "DURATION_BUCKETS", "SEARCH_BUCKETS", "Keys", "search_bucket"]

#: Upper bounds, seconds, of the buckets of the saga duration counters
#: (``dur:...`` in ``metrics``), then +Inf; transitions.lua has the same list.
DURATION_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 3600, 21600, 86400)

DEFAULT_SHARDS = 16

#: Sets per index shard that one business key's entries spread over; transitions.lua has the same number.
SEARCH_BUCKETS = 4


def search_bucket(value: str) -> int:
    """Which of a shard's `SEARCH_BUCKETS` sets holds a business key's ``value`` (transitions.lua: bucket)."""
    return int(hashlib.sha1(value.encode()).hexdigest()[:2], 16) % SEARCH_BUCKETS


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix, with ``shards`` index shards."""

    prefix: str
    shards: int = DEFAULT_SHARDS

    def record(self, saga_id: str) -> str:
        return f"{self.prefix}:{{{saga_id}}}"

    def definition(self, digest: str) -> str:
        """The plan and settings of every saga started with them (JSON), stored once per digest.

        Immutable, and in its own slot: workers read it outside scripts and cache it.
        """
        return f"{self.prefix}:{{plan:{digest}}}"

    def end_channel(self, saga_id: str) -> str:
        """The pub/sub channel the transition that ends a saga publishes its status on."""
        return f"{self.record(saga_id)}:end"

    def meta(self) -> str:
        """The store's epoch and shard count (a hash)."""
        return f"{self.prefix}:{{meta}}"

    def lost(self) -> str:
        """Set of the saga ids met lost in a reset of the store (its count is ``lost`` in `meta`)."""
        return f"{self.prefix}:{{meta}}:lost"

    def workers(self) -> str:
        """Sorted set of live worker instance tokens by their last liveness write (ms)."""
        return f"{self.prefix}:{{workers}}"

    def worker_names(self) -> str:
        """Hash of each worker instance token's node name."""
        return f"{self.prefix}:{{workers}}:names"

    def lost_workers(self) -> str:
        """Sorted set of the instance tokens declared lost: a sweeper's lease, or minus when it was handled."""
        return f"{self.prefix}:{{workers}}:lost"

    def shard_of(self, saga_id: str) -> int:
        """The index shard of ``saga_id`` (stable across processes)."""
        return zlib.crc32(saga_id.encode()) % self.shards

    def shard_base(self, shard: int) -> str:
        """The common start of the shard's keys; transitions on one server build them from it."""
        return f"{self.prefix}:{{s{shard}}}"

    def _shard(self, shard: int) -> str:
        return self.shard_base(shard)

    def name_index(self, shard: int, name: str, status: str) -> str:
        """Sorted set of the shard's sagas named ``name`` by the time they entered ``status``."""
        return f"{self._shard(shard)}:name:{name}:{status}"

    def names(self, shard: int) -> str:
        """Set of the saga names indexed in the shard."""
        return f"{self._shard(shard)}:names"

    def metrics(self, shard: int) -> str:
        """The shard's counters (see ``metrics`` above)."""
        return f"{self._shard(shard)}:metrics"

    def due(self, shard: int) -> str:
        """The shard of the deadline index: saga ids by when a sweeper should look (ms)."""
        return f"{self._shard(shard)}:due"

    def search_index(self, shard: int, key: str, bucket: int) -> str:
        """Sorted set of ``<value>``, NUL, ``<saga_id>`` of business key ``key``, for the values of ``bucket``."""
        return f"{self._shard(shard)}:k:{key}:{bucket}"

    def search_keys(self, shard: int) -> str:
        """Set of the business key names indexed in the shard."""
        return f"{self._shard(shard)}:keys"

    def resource(self, resource: str, part: str) -> str:
        """A lock's or running limit's holders (``part`` "h", a set) or waiters ("q", ids by arrival)."""
        return f"{self.locks()}:{part}:{resource}"

    def locks(self) -> str:
        """Set of the resources some saga holds or waits for; ``:m`` its metrics hash, ``:seq`` the arrival sequence."""
        return f"{self.prefix}:{{locks}}"

    def lock_metrics(self) -> str:
        """Hash of the locks' metrics (see above)."""
        return f"{self.locks()}:m"
