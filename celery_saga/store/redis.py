"""The saga store in Redis: one server, a Sentinel-managed primary, or a Redis Cluster.

Every transition is one script call on the saga's own key (one hash slot).
Index moves and deadline entries are one script call on the saga's index
shard (another slot). On one server (or a Sentinel primary) the calls that
belong together go in one pipelined round trip; on a cluster, nothing is
pipelined across slots.

Redis errors are sorted once, in `RedisSagaStore._call`: what may succeed
later (unreachable, READONLY, OOM, LOADING, BUSY, MASTERDOWN, TRYAGAIN,
CLUSTERDOWN, exhausted MOVED/ASK, a write short of its replicas, a wrong
password) is ``SagaStoreUnavailable``; what needs an operator to change the
ACL or a key (NOPERM, WRONGTYPE) is ``SagaStoreMisconfigured``, retried the
same way.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from typing import Any, TypeVar

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script

from ..errors import (
    SagaDefinitionError,
    SagaNotFound,
    SagaRecordCorrupt,
    SagaStoreMisconfigured,
    SagaStoreUnavailable,
)
from ..redis_server import PRIVATE_SERVER_KEY
from ..state import SagaStatus
from .base import LostWorker, SagaStore, StartRequest, WorkerInstance
from .cluster_locks import ClusterLocks
from .compact import unpack
from .connect import Target, connect, mask_url, parse
from .keys import DEFAULT_SHARDS, SEARCH_BUCKETS, Keys, search_bucket
from .protocol import EndNotice, Op, Transition

__all__ = ["RedisSagaStore", "mask_url"]

logger = logging.getLogger("celery_saga")

T = TypeVar("T")

# One saga's entries in its index shard, all under the shard's hash tag (a
# cluster's path; on one server the transition script moves them itself).
# KEYS: 1 old name index, 2 new name index, 3 the shard's names, 4 the
# shard's deadline index.
# ARGV: 1 saga id, 2 now (ms), 3 saga name, 4 "1" to move between status
# indexes, 5 trim finished entries older than this (ms, or ""), 6 look at it
# by then (ms, or ""; only ever earlier), 7 "1" to leave the deadline index.
# Idempotent (ZREM + ZADD), as it may be sent again. Finished entries outlive
# their records by at most the retention: writers trim them here, readers
# skip ids whose record is gone.
_SHARD_LUA = """
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  redis.call('SADD', KEYS[3], ARGV[3])
  if ARGV[5] ~= '' then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[5]) end
end
if ARGV[6] ~= '' then redis.call('ZADD', KEYS[4], 'LT', ARGV[6], ARGV[1]) end
if ARGV[7] == '1' then redis.call('ZREM', KEYS[4], ARGV[1]) end
for i = 6, #KEYS do
  local member, key = ARGV[8 + 2 * (i - 6) + 1], ARGV[8 + 2 * (i - 6) + 2]
  if ARGV[8] == '+' then
    redis.call('ZADD', KEYS[i], 0, member)
    redis.call('SADD', KEYS[5], key)
  else
    redis.call('ZREM', KEYS[i], member)
  end
end
return 1
"""

# Removes business key entries (KEYS[1]: one index set; ARGV[2..]: its
# members "<value>\0<saga id>") whose record a reader found gone, looking
# again first, atomically (one server only): a saga started anew under its id
# since keeps its entry. ARGV[1]: the key prefix. Reply: how many went.
_COLLECT_LUA = """
local n = 0
for i = 2, #ARGV do
  local at = string.find(ARGV[i], '\0', 1, true)
  if at and redis.call('EXISTS', ARGV[1] .. ':{' .. string.sub(ARGV[i], at + 1) .. '}') == 0 then
    n = n + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return n
"""

#: The transitions, by lifecycle, concatenated in this order into one script
#: (a function library on Redis 7): the op table and the saga lifecycle, the
#: lock queues, a saga's locks, then the dispatch of a call to its op.
TRANSITION_FILES = ("transitions.lua", "lockqueue.lua", "locks.lua", "dispatch.lua")
#: A cluster's lock script (store/cluster_locks.py): the same lock queues, then its ops.
LOCK_SLOT_FILES = ("lockqueue.lua", "lockslot.lua")


def _lua(files: Sequence[str]) -> str:
    return "".join(resources.files(__package__).joinpath(name).read_text() for name in files)


def transitions_source() -> str:
    """The source of the transitions script: `TRANSITION_FILES`, concatenated."""
    return _lua(TRANSITION_FILES)


# Sweepers lease due entries of deadline shards (KEYS: every shard on one
# server, in one call; one shard per call on a cluster, where they are in
# other slots): the claim moves each entry `lease` ms ahead (store clock)
# rather than removing it, so a sweeper that dies mid-way loses nothing: its
# claims come due again. ARGV: lease, entries per shard at most.
# Reply: {claim score, saga ids ...}.
_CLAIM_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ = string.format('%.0f', now + tonumber(ARGV[1]))
local reply = {until_}
for _, key in ipairs(KEYS) do
  local due = redis.call('ZRANGEBYSCORE', key, '-inf', string.format('%.0f', now), 'LIMIT', 0, tonumber(ARGV[2]))
  for _, id in ipairs(due) do
    redis.call('ZADD', key, until_, id)
    reply[#reply + 1] = id
  end
end
return reply
"""

# Settles a claim (ARGV: saga id, claim score, next deadline or ""). An entry
# still at the claim's score is this sweeper's to move; one that moved since
# was registered again (or claimed by another sweeper after the lease ran out),
# and keeps whichever time is earlier.
_RESCORE_LUA = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then
  if ARGV[3] ~= '' then redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1]) end
  return 1
end
if tonumber(score) == tonumber(ARGV[2]) then
  if ARGV[3] == '' then redis.call('ZREM', KEYS[1], ARGV[1]) else redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1]) end
elseif ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[1], 'LT', ARGV[3], ARGV[1])
end
return 1
"""

# Counts a saga met lost in a reset, once (KEYS: meta, lost set; ARGV: saga
# id, how long the set of ids is kept, ms). Reply: the count so far.
_LOST_LUA = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then redis.call('HINCRBY', KEYS[1], 'lost', 1) end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return tonumber(redis.call('HGET', KEYS[1], 'lost') or '0')
"""
# How long the ids of lost sagas are kept, to count each once.
_LOST_IDS_KEPT_MS = 7 * 24 * 3600 * 1000

# How long an instance declared lost is remembered once handled (with its name, for `show`).
_LOST_WORKERS_KEPT_MS = 24 * 3600 * 1000

# Stores a definition (plan and settings) once: it never changes under its digest.
_DEFINE_LUA = "redis.call('SET', KEYS[1], ARGV[1], 'NX') return 1"

# Worker liveness (celery_saga.liveness), all under the hash tag {workers},
# so one call on a cluster too. KEYS: 1 live instances (token -> last write,
# ms), 2 their node names, 3 instances declared lost (see keys.py).
#
# A liveness write. ARGV: 1 token, 2 node name, 3 "beat"; "start" (older
# live instances of the same node name are dead: a node name is unique, so
# they get score 0 and the next sweep claims them); or "stop" (score 0: the
# next sweep looks at whatever it still ran). A write from an instance that
# was declared lost (cut off from Redis for too long) puts it back among the
# live ones: what it ran meanwhile was declared lost, and is a late outcome.
# Reply: 1 if it had been declared lost, else 0.
_ALIVE_LUA = """
if ARGV[3] == 'stop' then
  if redis.call('ZSCORE', KEYS[1], ARGV[1]) then redis.call('ZADD', KEYS[1], 0, ARGV[1]) end
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local was_lost = redis.call('ZREM', KEYS[3], ARGV[1])
if ARGV[3] == 'start' then
  local names = redis.call('HGETALL', KEYS[2])
  for i = 1, #names, 2 do
    if names[i + 1] == ARGV[2] and names[i] ~= ARGV[1] and redis.call('ZSCORE', KEYS[1], names[i]) then
      redis.call('ZADD', KEYS[1], 0, names[i])
    end
  end
end
redis.call('ZADD', KEYS[1], string.format('%.0f', now), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return was_lost
"""

# Sweepers claim the instances whose last liveness write is older than
# ARGV[1] ms: each moves from the live set to the lost one under a lease of
# ARGV[2] ms, so exactly one sweeper handles it, and another takes it over
# if that one dies before it is done (its lease runs out). Handled entries
# (negative scores: minus when) older than ARGV[4] ms are forgotten, names
# too. ARGV[3]: at most this many. Reply: {token, name, last write ms (0: it
# stopped, or a lease taken over)} flattened.
_CLAIM_WORKERS_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = string.format('%.0f', now + tonumber(ARGV[2]))
local limit = tonumber(ARGV[3])
local reply = {}
local function take(token, last)
  redis.call('ZADD', KEYS[3], lease, token)
  reply[#reply + 1] = token
  reply[#reply + 1] = redis.call('HGET', KEYS[2], token) or ''
  reply[#reply + 1] = last
end
for _, token in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], 1, string.format('%.0f', now), 'LIMIT', 0, limit)) do
  take(token, '0')
end
local cut = string.format('%.0f', now - tonumber(ARGV[1]))
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cut, 'WITHSCORES', 'LIMIT', 0, limit)
for i = 1, #dead, 2 do
  redis.call('ZREM', KEYS[1], dead[i])
  take(dead[i], dead[i + 1])
end
local old = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. string.format('%.0f', tonumber(ARGV[4]) - now), '(0')
for _, token in ipairs(old) do
  redis.call('ZREM', KEYS[3], token)
  if not redis.call('ZSCORE', KEYS[1], token) then redis.call('HDEL', KEYS[2], token) end
end
return reply
"""

# Redis errors that mean "try again later", by the message's code (a script
# error carries the code of the command that failed inside it).
_TRANSIENT = ("OOM", "READONLY", "BUSY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS")
_MISCONFIGURED = ("NOPERM", "WRONGTYPE")
_TRANSIENT_TYPES: tuple[type[Exception], ...] = (
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.MasterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterError,
    redis.exceptions.MovedError,
    redis.exceptions.AskError,
)

# Redis reports a command an ACL forbids inside a script with this text and
# the script's line, not the command: read the command off that line.
_ACL_IN_SCRIPT = "can't run this command"
# Redis 7: "script: <sha>, on @user_script:<line>."; 6.2: "(call to f_<sha>): @user_script:<line>:". A
# function (FCALL) is named, not hashed: "script: <function>, on @user_function:<line>.", its line counted
# in the library, whose first line is the "#!lua" shebang.
_SCRIPT_LINE = re.compile(
    r"(?:script: |f_)(?P<sha>[0-9a-f]{40}).*?@user_script:(?P<line>\d+)"
    r"|script: (?P<function>[\w.-]+), on @user_function:(?P<fline>\d+)"
)
_REDIS_CALL = re.compile(r"redis\.call\('(\w+)'")

Call = tuple[Script, list[str], list[str]]
ShardCall = tuple[list[str], list[str]]


def _sleep(seconds: float) -> EndNotice | None:
    time.sleep(seconds)
    return None


def _forgotten(reply: Any) -> bool:
    """The server does not have the script or function a call named (a restart, a flush)."""
    return isinstance(reply, redis.exceptions.NoScriptError) or (
        isinstance(reply, redis.ResponseError) and "Function not found" in str(reply)
    )


def _unpacked(saga_id: str, raw: dict[str, str]) -> dict[str, str]:
    try:
        return unpack(raw)
    except ValueError as exc:
        raise SagaRecordCorrupt(saga_id, f"its packed fields cannot be read: {exc}") from exc


def _codes(exc: BaseException) -> set[str]:
    return {word.strip("-:.") for word in str(exc).split()}


class RedisSagaStore(SagaStore):
    """Saga records in Redis hashes, transitions in one Lua script.

    Args:
        url: ``saga_redis_url`` (`celery_saga.store.connect` lists the forms).
        prefix: ``saga_key_prefix``.
        client: A redis-py client to use instead of one made from ``url``.
        retention: ``saga_retention``, for trimming finished index entries.
        options: ``saga_redis_transport_options`` (Sentinel's ``master_name`` ...).
        shards: ``saga_index_shards``.
        wait_replicas: ``saga_redis_wait_replicas``: each transition waits
            until this many replicas have it (``WAIT``); a shortfall counts as
            the store being unavailable.
        wait_timeout: ``saga_redis_wait_timeout``, seconds.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "saga",
        client: redis.Redis | RedisCluster | None = None,
        retention: float = 0.0,
        *,
        options: dict[str, Any] | None = None,
        shards: int = DEFAULT_SHARDS,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
    ) -> None:
        self.target: Target = parse(url, options)
        self.url = url
        self.retention = retention
        self.location = self.target.location
        self.prefix = prefix
        self.keys = Keys(prefix, shards)
        self.cluster = self.target.kind == "cluster"
        # One server: a script may touch the index shard's keys too (a
        # cluster allows only the keys of one slot).
        self.indexes_in_transition = not self.cluster
        if wait_replicas and self.cluster:
            raise SagaDefinitionError(
                "saga_redis_wait_replicas is not supported on a Redis Cluster store; use a primary with "
                "replicas under Sentinel, or set it to 0"
            )
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = max(1, round(wait_timeout * 1000))
        self.client: Any = client or connect(self.target)
        source = transitions_source()
        self._script: Script = self.client.register_script(source)
        # On Redis 7+ the transitions run as a function library, loaded once:
        # run by EVALSHA, the 1,000-line script defines all its functions again
        # on every call (about 35 us of the server's time, per call). Named by
        # the script's digest, so that versions side by side do not collide.
        self._function = f"celery_saga_{self._script.sha[:16]}"
        self._library = f"#!lua name={self._function}\n" + source.replace("@FUNCTION@", self._function)
        # None: not tried yet; False: EVALSHA (a cluster, Redis 6.2, or an ACL without FUNCTION LOAD).
        self._functions: bool | None = False if self.cluster else None
        self._shard_script: Script = self.client.register_script(_SHARD_LUA)
        self._claim_script: Script = self.client.register_script(_CLAIM_LUA)
        self._collect_script: Script = self.client.register_script(_COLLECT_LUA)
        self._rescore_script: Script = self.client.register_script(_RESCORE_LUA)
        self._lost_script: Script = self.client.register_script(_LOST_LUA)
        self._define_script: Script = self.client.register_script(_DEFINE_LUA)
        self._alive_script: Script = self.client.register_script(_ALIVE_LUA)
        self._claim_workers_script: Script = self.client.register_script(_CLAIM_WORKERS_LUA)
        self._lock_script: Script = self.client.register_script(_lua(LOCK_SLOT_FILES))
        # A cluster: the locks move in calls of their own, beside the transitions.
        self.cluster_locks = (
            ClusterLocks(self, self._call, self.client, self.keys, self._lock_script) if self.cluster else None
        )
        self._subscribers = threading.local()
        self._defined: set[str] = set()
        self._epoch: str | None = None
        self._reset_logged: set[str] = set()

    # -- a cluster's locks (store/cluster_locks.py) ----------------------------

    def start(self, req: StartRequest, messages: Sequence[str] = ()) -> Transition:
        if self.cluster_locks is None or not req.locks:
            return super().start(req, messages)
        return self.cluster_locks.start(req, lambda r: super(RedisSagaStore, self).start(r, messages))

    def apply(self, op: Op, saga_id: str, gen: str, name: str, *args: str, **options: Any) -> Transition:
        t = super().apply(op, saga_id, gen, name, *args, **options)
        if self.cluster_locks is None or not (t.release or t.relook or t.kept):
            return t
        return self.cluster_locks.after(t)

    def retry(self, saga_id: str) -> Transition:
        if self.cluster_locks is None:
            return super().retry(saga_id)
        return self.cluster_locks.retry(saga_id, lambda: super(RedisSagaStore, self).retry(saga_id))

    def repair_locks(self) -> list[str]:
        return [] if self.cluster_locks is None else self.cluster_locks.repair_all()

    # -- calling Redis -------------------------------------------------------

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn``, turning Redis's errors into the store's (see the module docstring)."""
        try:
            return fn()
        except redis.exceptions.NoPermissionError as exc:
            raise SagaStoreMisconfigured(self.location, exc) from exc
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise SagaStoreUnavailable(self.location, exc) from exc
        except _TRANSIENT_TYPES as exc:
            raise SagaStoreUnavailable(self.location, exc, reachable=True) from exc
        except redis.ResponseError as exc:
            codes = _codes(exc)
            if codes & set(_MISCONFIGURED) or _ACL_IN_SCRIPT in str(exc):
                wrong_type = "WRONGTYPE" in codes and "NOPERM" not in codes and _ACL_IN_SCRIPT not in str(exc)
                cause = exc if wrong_type else self._explained(exc)  # which command a refused ACL lacks
                raise SagaStoreMisconfigured(self.location, cause, wrong_type=wrong_type) from exc
            if codes & set(_TRANSIENT) or "MOVED" in codes or "ASK" in codes:
                raise SagaStoreUnavailable(self.location, exc, reachable=True) from exc
            raise

    def _explained(self, exc: redis.ResponseError) -> Exception:
        """The error, naming the command a script could not run: Redis names only the script's line."""
        found = _SCRIPT_LINE.search(str(exc))
        scripts = [self._script, self._shard_script, self._claim_script, self._rescore_script, self._lost_script]
        scripts += [self._define_script, self._alive_script, self._claim_workers_script, self._collect_script]
        scripts.append(self._lock_script)
        sources = {s.sha: str(s.script) for s in scripts}
        sources[self._function] = self._library
        name = None if found is None else found["sha"] or found["function"]
        if found is None or name not in sources:
            return exc
        lines = sources[name].splitlines()
        line = int(found["line"] or found["fline"])
        command = _REDIS_CALL.search(lines[line - 1]) if 0 < line <= len(lines) else None
        if command is None:
            return exc
        return redis.exceptions.NoPermissionError(
            f"NOPERM the saga user may not run the {command[1].lower()!r} command (script line {line}): {exc}"
        )

    def _shard_call(
        self,
        saga_id: str,
        name: str = "",
        move: tuple[str, str] | None = None,
        retention: float = 0.0,
        watch_at: float | None = None,
        unwatch: bool = False,
        search: tuple[bool, Sequence[tuple[str, str]]] = (True, ()),
    ) -> ShardCall:
        """KEYS and ARGV of `_SHARD_LUA` for one saga: a status move ``(old, new)``, a deadline entry, or both.

        ``search``: business key entries to add (True) or remove, as (key, value) pairs.
        """
        k, shard = self.keys, self.keys.shard_of(saga_id)
        now_ms = time.time() * 1000
        old, new = move if move is not None else ("", "")
        old = old or new
        trim = f"{now_ms - retention * 1000:.0f}" if retention > 0 else ""
        keys = [k.name_index(shard, name, old), k.name_index(shard, name, new), k.names(shard), k.due(shard)]
        watch = "" if watch_at is None else f"{watch_at * 1000:.0f}"
        args = [saga_id, f"{now_ms:.0f}", name, "1" if move else "", trim, watch, "1" if unwatch else ""]
        add, pairs = search
        args.append("+" if add else "-")
        keys.append(k.search_keys(shard))
        for key, value in pairs:
            keys.append(k.search_index(shard, key, search_bucket(value)))
            args += [f"{value}\x00{saga_id}", key]
        return keys, args

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
        keys = [self.keys.record(saga_id)]
        if self.indexes_in_transition:
            keys.append(self.keys.shard_base(self.keys.shard_of(saga_id)))
            index_first = None  # the transition moves its index entries itself
            if op is Op.START:
                # One server: the start stores the definition and its first
                # deadline itself, in one call (see OPS.start).
                if define is not None:
                    keys.append(self.keys.definition(define[0]))
                    args = [*args, "!def", define[1]]
                if watch_at is not None:
                    args = [*args, "!watch", f"{watch_at * 1000:.0f}"]
                define = watch_at = None
        transition: Call = (self._script, keys, [op.value, tx, gen, *args, *messages])
        calls: list[Call] = []
        if define is not None and define[0] not in self._defined:
            # A cluster (one server stores it in the start itself): the
            # definition is in another slot, its own call, once per process.
            calls.append((self._define_script, [self.keys.definition(define[0])], [define[1]]))
        if index_first is not None or watch_at is not None:
            name, old, new = index_first if index_first is not None else ("", "", "")
            move = (old, new) if index_first is not None else None
            # A cluster's start indexes its business keys in this call too: no round trip more.
            shard_call = self._shard_call(saga_id, name, move, watch_at=watch_at, search=(True, search))
            calls.append((self._shard_script, *shard_call))
        calls.append(transition)
        reply = str(self._call(lambda: self._execute(calls, wait=True)))
        if define is not None:
            self._defined.add(define[0])
        return reply

    def _execute(self, calls: list[Call], wait: bool = False) -> Any:
        """Run script calls in order and return the last one's reply.

        On one server, in one pipelined round trip, with a ``WAIT`` after
        them when replicas must have the writes (WAIT covers the writes of
        its own connection, which the pipeline shares). On a cluster, one
        call at a time: they are in different hash slots.
        """
        waits = wait and self.wait_replicas > 0
        if self.cluster or (len(calls) == 1 and not waits):
            # One call needs no pipeline (whose own cost is not small), and a
            # cluster takes no pipeline of scripts.
            reply: Any = None
            for script, keys, args in calls:
                reply = self._invoke(script, keys, args)
            return reply
        results = self._pipelined(calls, waits)
        if waits and int(results[-1]) < self.wait_replicas:
            raise SagaStoreUnavailable(
                self.location,
                reachable=True,
                detail=f"the write reached {results[-1]} of the {self.wait_replicas} replica(s) "
                f"saga_redis_wait_replicas asks for within {self.wait_timeout_ms} ms",
            )
        return results[len(calls) - 1]

    def _pipelined(self, calls: list[Call], waits: bool = False) -> list[Any]:
        """Every call's reply, from one pipelined round trip (one server only), with a ``WAIT`` last if ``waits``.

        redis-py's pipelines ask SCRIPT EXISTS before running scripts, which
        would cost the round trip this saves: send EVALSHA directly, and load
        the scripts only if Redis forgot them (a restart). Sending the calls
        again is safe: index moves are idempotent, a transition is
        de-duplicated by its id, and claims are leases.
        """
        functions = self._use_functions()
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            for script, keys, args in calls:
                if functions and script is self._script:
                    pipe.execute_command("FCALL", self._function, len(keys), *keys, *args)
                else:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
            if waits:
                pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            results: list[Any] = pipe.execute(raise_on_error=False)
            if attempt == 1 and any(_forgotten(r) for r in results):
                for script in {script.sha: script for script, _, _ in calls}.values():
                    self.client.script_load(script.script)
                if functions:
                    self._load_functions()
                continue
            for r in results:
                if isinstance(r, Exception):
                    raise r
            return results
        raise AssertionError("unreachable")

    def _invoke(self, script: Script, keys: list[str], args: list[str]) -> Any:
        """One script call: the transitions by FCALL where the server has them as functions."""
        if script is not self._script or not self._use_functions():
            return script(keys=keys, args=args)
        try:
            return self.client.fcall(self._function, len(keys), *keys, *args)
        except redis.ResponseError as exc:
            if not _forgotten(exc):
                raise
        # A restart without persistence (or FUNCTION FLUSH) forgot the library.
        self._load_functions()
        return self.client.fcall(self._function, len(keys), *keys, *args)

    def _use_functions(self) -> bool:
        if self._functions is None:
            self._load_functions()
        return bool(self._functions)

    def _load_functions(self) -> None:
        """Load the transitions as a function library; fall back to EVALSHA where the server will not."""
        try:
            self.client.function_load(self._library)
            self._functions = True
        except redis.ResponseError as exc:
            if "already exists" in str(exc):
                self._functions = True
            elif isinstance(exc, redis.exceptions.NoPermissionError) or "unknown command" in str(exc).lower():
                logger.debug("celery_saga: transitions run by EVALSHA (%s)", exc)
                self._functions = False
            else:
                raise

    def new_tx(self) -> str:
        # "!": a replay writes its reply again, so that the WAIT after it
        # covers the first write (see transitions.lua).
        tx = super().new_tx()
        return f"!{tx}" if self.wait_replicas else tx

    # -- the store's meta data: epoch and shards -------------------------------

    def epoch(self) -> str:
        """The store's epoch, made when the store is first used; checks the shard count against the store's."""
        if self._epoch is None:
            self.check_server()
            self._epoch = self._read_meta(create=True)
        return self._epoch

    def _read_meta(self, create: bool) -> str:
        key = self.keys.meta()

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            if create:
                pipe.hsetnx(key, "epoch", uuid.uuid4().hex[:12])
                pipe.hsetnx(key, "shards", str(self.keys.shards))
            pipe.hmget(key, "epoch", "shards")
            return list(pipe.execute())

        epoch, shards = self._call(run)[-1]
        if shards is not None and int(shards) != self.keys.shards:
            raise SagaDefinitionError(
                f"saga_index_shards is {self.keys.shards} here, but the saga store {self.where()} was set up "
                f"with {shards}: every process must use the same number; set saga_index_shards = {shards}"
            )
        return str(epoch or "")

    def was_reset(self, since: str | None = None) -> bool:
        """True if the store lost its data since epoch ``since`` (default: the one this process saw first).

        Logs an ERROR the first time a reset is seen, once per epoch.
        """
        known = since or self._epoch
        if not known:
            return False
        current = self._read_meta(create=False)
        if current == known:
            return False
        if current not in self._reset_logged:
            self._reset_logged.add(current)
            logger.error(
                "the saga store %s was reset (its epoch %s is %s): it restarted without persistence, was "
                "flushed, or evicted keys. Sagas started before are lost and their completed steps are not "
                "compensated; see docs/deployments.md",
                self.where(),
                known,
                current or "gone",
            )
        if not current:
            self._epoch = None
        self._defined.clear()  # the definitions went with the rest
        return True

    def count_lost(self, saga_id: str) -> int:
        keys = [self.keys.meta(), self.keys.lost()]
        return int(self._call(lambda: self._lost_script(keys=keys, args=[saga_id, _LOST_IDS_KEPT_MS])))

    def lost_count(self) -> int:
        return int(self._call(lambda: self.client.hget(self.keys.meta(), "lost")) or 0)

    def count_rejected(self, reason: str) -> None:
        # Rare (a forged or malformed message), so one shard's counters do.
        self._call(lambda: self.client.hincrby(self.keys.metrics(0), f"rejected:{reason}", 1))

    # -- what the server is -----------------------------------------------------

    def servers(self) -> list[redis.Redis]:
        """A client for each server holding saga data: the primaries of a cluster, or the one server."""
        if self.cluster:
            return [node.redis_connection for node in self.client.get_primaries()]
        return [self.client]

    def check_server(self) -> None:
        """Raise SagaStoreMisconfigured if a server is older than the store needs (Redis 6.2, Valkey 7.2).

        Needs INFO; a user without it is not checked here (a command the old
        server lacks then fails when it is first used).
        """
        for server in self.servers():
            try:
                info = self._call(functools.partial(server.info, "server"))
            except SagaStoreMisconfigured:
                return
            version = str(info.get("redis_version", "0"))
            if tuple(int(x) for x in version.split(".")[:2] if x.isdigit()) < (6, 2):
                raise SagaStoreMisconfigured(
                    self.location,
                    RuntimeError(f"Redis {version} is too old: the saga store needs Redis 6.2 or Valkey 7.2 or later"),
                )

    def health_warnings(self) -> list[str]:
        """What about the store's servers can lose sagas: no persistence, or eviction of keys without a TTL.

        Needs CONFIG GET; a user without it is not warned (see the least
        privilege section of docs/deployments.md).
        """
        warnings: list[str] = []
        for server in self.servers():
            try:
                config = {**server.config_get("maxmemory-policy"), **server.config_get("appendonly")}
                config.update(server.config_get("save"))
            except redis.RedisError as exc:
                logger.debug("celery_saga: cannot read the saga store's configuration: %s", exc)
                continue
            where = f"the saga store's server {server.get_connection_kwargs().get('host', '?')}"
            found: list[str] = []
            policy = str(config.get("maxmemory-policy", ""))
            if policy.startswith("allkeys-"):
                found.append(
                    f"{where} has maxmemory-policy {policy}: when full it evicts keys without a TTL, such as "
                    f"running sagas' records, which are then lost. Use noeviction (or volatile-*)"
                )
            if config.get("appendonly") != "yes" and not str(config.get("save", "")).strip():
                found.append(
                    f"{where} keeps nothing on disk (no AOF, no RDB save points): a restart loses every saga "
                    f"record. Set appendonly yes"
                )
            if found and not self._private(server):
                warnings += found
        return warnings

    def _private(self, server: redis.Redis) -> bool:
        """True on celery_saga's own private server (the demo's, the tests'), whose data is throwaway.

        Its mark is a key outside the saga prefix: a least-privilege user
        (``~<prefix>:{*``) may not read it, and is on a server an operator
        set up. Read only when there is something to warn about, so that a
        well-kept server's ``ACL LOG`` shows no refusal.
        """
        try:
            return bool(server.exists(PRIVATE_SERVER_KEY))
        except redis.RedisError as exc:  # NOPERM under a least-privilege key pattern
            logger.debug("celery_saga: cannot read the private server's mark, so warning: %s", exc)
            return False

    # -- records -------------------------------------------------------------

    def _load(self, saga_id: str) -> dict[str, str] | None:
        raw: dict[str, str] = self._call(lambda: self.client.hgetall(self.keys.record(saga_id)))
        return _unpacked(saga_id, raw) if raw else None

    def status(self, saga_id: str) -> SagaStatus:
        # One field, not the whole record: SagaResult.get and ready() read this.
        raw = self._call(lambda: self.client.hget(self.keys.record(saga_id), "status"))
        if raw is None:
            raise SagaNotFound(saga_id, self.where())
        try:
            return SagaStatus(str(raw))
        except ValueError as exc:
            raise SagaRecordCorrupt(saga_id, f"unknown status {raw!r}") from exc

    def load_many(self, saga_ids: Sequence[str]) -> list[dict[str, str] | None]:
        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for saga_id in saga_ids:
                pipe.hgetall(self.keys.record(saga_id))
            return list(pipe.execute(raise_on_error=False))

        # A key of the wrong type comes back as an error: report it as an empty record.
        return [
            self._complete(_unpacked(saga_id, raw)) if isinstance(raw, dict) and raw else None
            for saga_id, raw in zip(saga_ids, self._call(run), strict=True)
        ]

    def not_a_record(self, saga_id: str) -> bool:
        # HGET, which the saga user has, where TYPE needs one more grant.
        try:
            self._call(lambda: self.client.hget(self.keys.record(saga_id), "status"))
        except SagaStoreMisconfigured as exc:
            if exc.wrong_type:
                return True
            raise
        return False

    def _read_definition(self, digest: str) -> str | None:
        text = self._call(lambda: self.client.get(self.keys.definition(digest)))
        return None if text is None else str(text)

    def delete(self, saga_id: str) -> None:
        self._call(lambda: self.client.delete(self.keys.record(saga_id)))

    # -- indexes ---------------------------------------------------------------

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
        keys, args = self._shard_call(saga_id, name, (old, new), retention, watch_at=watch_at, unwatch=unwatch)
        self._call(lambda: self._execute([(self._shard_script, keys, args)]))

    def _watch(self, saga_id: str, at: float) -> None:
        keys, args = self._shard_call(saga_id, watch_at=at)
        self._call(lambda: self._execute([(self._shard_script, keys, args)]))

    def _unindex(self, saga_id: str, name: str, status: str) -> None:
        k, shard = self.keys, self.keys.shard_of(saga_id)
        # No name (a reader of every name met a gone record): each name of the shard.
        names = [name] if name else sorted(self._call(lambda: self.client.smembers(k.names(shard))))

        def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            for each in names:
                pipe.zrem(k.name_index(shard, each, status), saga_id)
            pipe.execute()

        if names:
            self._call(run)

    def lock_queue(self, resource: str) -> tuple[list[str], list[str]]:
        k = self.keys

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            pipe.smembers(k.resource(resource, "h"))
            pipe.zrange(k.resource(resource, "q"), 0, -1)
            return list(pipe.execute())

        holders, waiters = self._call(run)
        return sorted(str(h) for h in holders), [str(w) for w in waiters]

    def locks_in_use(self) -> list[str]:
        return sorted(str(r) for r in self._call(lambda: self.client.smembers(self.keys.locks())))

    def lock_counters(self) -> dict[str, int]:
        raw = self._call(lambda: self.client.hgetall(self.keys.lock_metrics()))
        return {str(k): int(v) for k, v in raw.items()}

    def search(self, key: str, value: str) -> set[str]:
        k, bucket = self.keys, search_bucket(value)
        # Members are "<value>\x00<saga id>": every id of the value sorts between these two.
        low, high = f"[{value}\x00", f"({value}\x01"

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for shard in range(k.shards):
                pipe.zrangebylex(k.search_index(shard, key, bucket), low, high)
            return list(pipe.execute())

        return {str(m)[len(value) + 1 :] for found in self._call(run) for m in found}

    def _unindex_search(self, saga_id: str, pairs: Sequence[tuple[str, str]]) -> None:
        keys, args = self._shard_call(saga_id, search=(False, pairs))
        self._call(lambda: self._execute([(self._shard_script, keys, args)]))

    def collect_search(self, page: int = 500) -> int:
        k, removed = self.keys, 0
        names = self._call(lambda: self._each_shard(lambda pipe, shard: pipe.smembers(k.search_keys(shard))))
        for shard, shard_keys in enumerate(names):
            for key in sorted(shard_keys):
                for bucket in range(SEARCH_BUCKETS):
                    removed += self._collect(k.search_index(shard, str(key), bucket), page)
        return removed

    def _collect(self, index: str, page: int) -> int:
        """Remove one index set's entries whose record is gone, a page at a time (a lexical cursor)."""
        removed, low = 0, "-"
        while True:
            members = [str(m) for m in self._call(functools.partial(self.client.zrangebylex, index, low, "+", 0, page))]
            if not members:
                return removed
            records = [self.keys.record(m.split("\x00", 1)[-1]) for m in members]
            alive = self._call(functools.partial(self._pipe_each, "exists", records))
            dead = [m for m, n in zip(members, alive, strict=True) if not n]
            if dead and self.cluster:
                # The records are in other slots: no script can look again (a
                # saga started anew under its id in between loses its entry).
                removed += int(self._call(functools.partial(self.client.zrem, index, *dead)))
            elif dead:
                look_again = functools.partial(self._collect_script, keys=[index], args=[self.keys.prefix, *dead])
                removed += int(self._call(look_again))
            if len(members) < page:
                return removed
            low = f"({members[-1]}"

    def _each_shard(self, command: Callable[[Any, int], Any]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.keys.shards):
            command(pipe, shard)
        return list(pipe.execute())

    def _pipe_each(self, command: str, keys: Sequence[str]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            getattr(pipe, command)(key)
        return list(pipe.execute())

    def list_ids(
        self, status: SagaStatus, name: str | None = None, limit: int = 100, since: float | None = None
    ) -> list[str]:
        low = f"{since * 1000:.0f}" if since is not None else "-inf"
        k, want = self.keys, max(limit, 1)

        # The indexes are by name: every name of a shard, when no name is given.
        by_shard = [[name] for _ in range(k.shards)] if name else [sorted(m) for m in self._shard_names()]

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for shard, shard_names in enumerate(by_shard):
                for each in shard_names:
                    key = k.name_index(shard, each, status.value)
                    pipe.zrevrangebyscore(key, "+inf", low, start=0, num=want, withscores=True)
            return list(pipe.execute())

        # Newest first across the shards: each shard's newest, merged.
        entries = sorted((e for shard in self._call(run) for e in shard), key=lambda e: (e[1], e[0]), reverse=True)
        return [str(saga_id) for saga_id, _ in entries[:want]]

    def index_pages(
        self, status: SagaStatus, name: str | None, since: float | None, until: float | None, page: int = 500
    ) -> Iterator[list[str]]:
        k = self.keys
        high = f"{until * 1000:.0f}" if until is not None else "+inf"
        by_shard = [[name] for _ in range(k.shards)] if name else [sorted(m) for m in self._shard_names()]
        for shard, shard_names in enumerate(by_shard):
            for each in shard_names:
                yield from self._index_pages(k.name_index(shard, each, status.value), since, high, page)

    def _index_pages(self, key: str, since: float | None, high: str, page: int) -> Iterator[list[str]]:
        # A cursor on the score, inclusive and exact: the entries at the last
        # score were met already (the ids of one millisecond), and are skipped.
        low: float | None = since * 1000 if since is not None else None
        at_low: set[str] = set()
        want = page
        while True:

            def read(lo: str = "-inf" if low is None else repr(low), n: int = want) -> list[Any]:
                return list(self.client.zrangebyscore(key, lo, high, start=0, num=n, withscores=True))

            entries = [(str(m), float(sc)) for m, sc in self._call(read)]
            fresh = [(m, sc) for m, sc in entries if not (sc == low and m in at_low)]
            if not fresh:
                if len(entries) < want:
                    return
                want *= 2  # a page of nothing but the last millisecond's ids: read past them
                continue
            yield [m for m, _ in fresh]
            if len(entries) < want:
                return
            last = fresh[-1][1]
            if last != low:
                low, at_low = last, set()
            at_low.update(m for m, sc in fresh if sc == last)
            want = page

    def counts(self) -> dict[str, dict[str, int]]:
        k = self.keys
        by_shard = [sorted(members) for members in self._shard_names()]
        low = f"{(time.time() - self.retention) * 1000:.0f}" if self.retention > 0 else "-inf"
        statuses = [s.value for s in SagaStatus]
        finished = (SagaStatus.COMPLETED.value, SagaStatus.COMPENSATED.value)

        def sizes() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for shard, shard_names in enumerate(by_shard):
                for name in shard_names:
                    for status in statuses:
                        pipe.zcount(k.name_index(shard, name, status), low if status in finished else "-inf", "+inf")
            return list(pipe.execute())

        counted = iter(self._call(sizes))
        totals: dict[str, dict[str, int]] = {}
        for shard_names in by_shard:
            for name in shard_names:
                row = totals.setdefault(name, dict.fromkeys(statuses, 0))
                for status in statuses:
                    row[status] += int(next(counted))
        return dict(sorted(totals.items()))

    def _per_shard(self, key: Callable[[int], str], command: str) -> list[Any]:
        """``command`` on one key of every shard, in one pipelined round trip."""

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for shard in range(self.keys.shards):
                pipe.execute_command(command, key(shard))
            return list(pipe.execute())

        return self._call(run)

    def _shard_names(self) -> list[Any]:
        return self._per_shard(self.keys.names, "SMEMBERS")

    def counters(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for shard in self._per_shard(self.keys.metrics, "HGETALL"):
            for field, value in shard.items():
                totals[str(field)] = totals.get(str(field), 0) + int(value)
        return totals

    # -- the deadline index ----------------------------------------------------

    def claim_due(self, limit: int, lease: float) -> list[tuple[str, str]]:
        k = self.keys
        per_shard = max(1, limit // k.shards)
        lease_ms = f"{lease * 1000:.0f}"
        shards = list(range(k.shards))
        if self.cluster:
            # One script call per shard is a round trip per slot: look first,
            # with plain reads the cluster pipeline groups by node, and claim
            # only where something is due (the claim checks the store clock).
            def peek() -> list[Any]:
                pipe = self.client.pipeline(transaction=False)
                for shard in shards:
                    pipe.zrangebyscore(k.due(shard), "-inf", f"{time.time() * 1000 + 1000:.0f}", start=0, num=1)
                return list(pipe.execute())

            shards = [shard for shard, due in zip(shards, self._call(peek), strict=True) if due]
        if self.cluster:
            calls: list[Call] = [(self._claim_script, [k.due(shard)], [lease_ms, str(per_shard)]) for shard in shards]
        else:
            # One server: every shard in one call, the cheapest pass of an idle worker's sweeper.
            calls = [(self._claim_script, [k.due(shard) for shard in shards], [lease_ms, str(per_shard)])]
        claimed: list[tuple[str, str]] = []
        for reply in self._call(lambda: self._claim_all(calls)):
            claim = str(reply[0])
            claimed.extend((str(saga_id), claim) for saga_id in reply[1:])
        return claimed

    def _claim_all(self, calls: list[Call]) -> list[Any]:
        if self.cluster:
            return [script(keys=keys, args=args) for script, keys, args in calls]
        return self._pipelined(calls) if calls else []

    def rescore(self, saga_id: str, claim: str, next_deadline: str) -> None:
        due = self.keys.due(self.keys.shard_of(saga_id))
        self._call(lambda: self._rescore_script(keys=[due], args=[saga_id, claim, next_deadline]))

    def unwatch(self, saga_id: str) -> None:
        due = self.keys.due(self.keys.shard_of(saga_id))
        self._call(lambda: self.client.zrem(due, saga_id))

    def watched(self, saga_id: str) -> float | None:
        """When sweepers next look at ``saga_id`` (epoch seconds), or None if it is not in the deadline index."""
        due = self.keys.due(self.keys.shard_of(saga_id))
        score = self._call(lambda: self.client.zscore(due, saga_id))
        return None if score is None else float(score) / 1000

    # -- worker liveness -------------------------------------------------------

    def _worker_keys(self) -> list[str]:
        return [self.keys.workers(), self.keys.worker_names(), self.keys.lost_workers()]

    def worker_alive(self, token: str, hostname: str, starting: bool = False) -> bool:
        args = [token, hostname, "start" if starting else "beat"]
        return bool(self._call(lambda: self._alive_script(keys=self._worker_keys(), args=args)))

    def worker_stopped(self, token: str) -> None:
        self._call(lambda: self._alive_script(keys=self._worker_keys(), args=[token, "", "stop"]))

    def claim_lost_workers(self, lost_after: float, lease: float) -> list[LostWorker]:
        args = [f"{lost_after * 1000:.0f}", f"{lease * 1000:.0f}", "100", f"{_LOST_WORKERS_KEPT_MS}"]
        reply = self._call(lambda: self._claim_workers_script(keys=self._worker_keys(), args=args))
        return [
            LostWorker(str(reply[i]), str(reply[i + 1]), float(reply[i + 2]) / 1000) for i in range(0, len(reply), 3)
        ]

    def lost_worker_handled(self, token: str) -> None:
        # XX: an instance that wrote its liveness again meanwhile is live, not lost.
        at = -time.time() * 1000
        self._call(lambda: self.client.zadd(self.keys.lost_workers(), {token: f"{at:.0f}"}, xx=True))

    def workers(self) -> dict[str, WorkerInstance]:
        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrange(self.keys.workers(), 0, -1, withscores=True)
            pipe.hgetall(self.keys.worker_names())
            pipe.zrange(self.keys.lost_workers(), 0, -1)
            return list(pipe.execute())

        live, names, lost = self._call(run)
        found = {
            str(token): WorkerInstance(str(token), str(names.get(token, "")), float(score) / 1000, False)
            for token, score in live
        }
        for token in lost:
            found.setdefault(str(token), WorkerInstance(str(token), str(names.get(token, "")), None, True))
        return found

    # -- waiting for an end -------------------------------------------------------

    @contextlib.contextmanager
    def end_signal(self, saga_id: str) -> Iterator[Callable[[float], EndNotice | None]]:
        """Subscribes to the saga's end channel; ``wait`` returns its message's `EndNotice`, None after the seconds.

        A user whose ACL has no channel access (or a failing subscribe) gets
        the plain sleep: callers poll the status after each wait anyway.
        """
        channel = self.keys.end_channel(saga_id)
        # One subscriber connection per thread, kept between calls (as
        # Celery's result backend keeps one): no connect per get().
        pubsub = getattr(self._subscribers, "pubsub", None)
        if getattr(self._subscribers, "pid", None) != os.getpid():
            pubsub = None  # made before a fork: its socket is the parent's
        try:
            if pubsub is None:
                pubsub = self._subscribers.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                self._subscribers.pid = os.getpid()
            pubsub.subscribe(channel)
        except redis.RedisError as exc:
            logger.debug("celery_saga: cannot subscribe to the end of saga %s (%s); polling", saga_id, exc)
            self._drop_subscriber()
            yield _sleep
            return

        def wait(seconds: float) -> EndNotice | None:
            deadline = time.monotonic() + seconds
            try:
                while (left := deadline - time.monotonic()) > 0:
                    message = pubsub.get_message(timeout=left)
                    if message is not None and message.get("channel") in (channel, channel.encode()):
                        data = message.get("data") or ""
                        return EndNotice.from_message(data.decode() if isinstance(data, bytes) else str(data))
            except redis.RedisError:
                self._drop_subscriber()
                time.sleep(max(0.0, deadline - time.monotonic()))
            return None

        try:
            yield wait
        finally:
            try:
                pubsub.unsubscribe(channel)
            except redis.RedisError:
                self._drop_subscriber()

    def _drop_subscriber(self) -> None:
        pubsub = getattr(self._subscribers, "pubsub", None)
        self._subscribers.pubsub = None
        if pubsub is not None:
            with contextlib.suppress(redis.RedisError):
                pubsub.close()

    # -- the connection ----------------------------------------------------------

    def close(self) -> None:
        self.client.close()
        if not self.cluster:
            self.client.connection_pool.disconnect()

    def ping(self) -> None:
        self._call(self.client.ping)
