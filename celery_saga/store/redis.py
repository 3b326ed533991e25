"""Redis implementation of the saga store."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, TypeVar

import redis
from kombu.utils.url import maybe_sanitize_url
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from ..errors import SagaNotFound, SagaRecordCorrupt, SagaStoreUnavailable
from ..state import SagaStatus
from .base import SagaStore
from .keys import Keys
from .protocol import Op

__all__ = ["RedisSagaStore", "mask_url"]

T = TypeVar("T")

# Moves one saga between status indexes; all index keys share the {idx}
# tag. Runs after the transition, so it must be idempotent: ZREM + ZADD is.
# Finished entries outlive their records by at most the retention: writers
# trim them here, readers skip ids whose record is gone.
_INDEX_LUA = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[3])
if ARGV[4] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[4])
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[4])
end
return 1
"""


# Sweepers lease due entries of one deadline shard: the claim moves each
# entry `lease` ms ahead (store clock) rather than removing it, so a sweeper
# that dies mid-way loses nothing: its claims come due again.
# Reply: {claim score, saga ids ...}.
_CLAIM_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ = string.format('%.0f', now + tonumber(ARGV[1]))
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now), 'LIMIT', 0, tonumber(ARGV[2]))
local reply = {until_}
for _, id in ipairs(due) do
  redis.call('ZADD', KEYS[1], until_, id)
  reply[#reply + 1] = id
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


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``**``."""
    return str(maybe_sanitize_url(url))


class RedisSagaStore(SagaStore):
    """Saga records in Redis hashes, transitions in one Lua script."""

    def __init__(
        self, url: str, prefix: str = "saga", client: redis.Redis | None = None, retention: float = 0.0
    ) -> None:
        self.url = url
        self.retention = retention
        self.location = mask_url(url)
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.client: redis.Redis = client or redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=5,
            socket_timeout=30,
            health_check_interval=30,
            # Transitions are de-duplicated by id, so retrying them is safe.
            retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), 3),
        )
        source = resources.files(__package__).joinpath("transitions.lua").read_text()
        self._script = self.client.register_script(source)
        self._index_script = self.client.register_script(_INDEX_LUA)
        self._claim_script = self.client.register_script(_CLAIM_LUA)
        self._rescore_script = self.client.register_script(_RESCORE_LUA)

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise SagaStoreUnavailable(self.location, exc) from exc

    def _run(
        self,
        saga_id: str,
        op: Op,
        tx: str,
        gen: str,
        args: Sequence[str],
        index_first: tuple[str, str, str] | None = None,
        watch_at: float | None = None,
    ) -> str:
        keys, argv = [self.keys.record(saga_id)], [op.value, tx, gen, *args]
        if index_first is not None or watch_at is not None:
            move = self._index_call(saga_id, *index_first, 0.0) if index_first is not None else None
            reply: Any = self._call(lambda: self._pipelined(saga_id, watch_at, move, (keys, argv)))
        else:
            reply = self._call(lambda: self._script(keys=keys, args=argv))
        return str(reply)

    def _pipelined(
        self,
        saga_id: str,
        watch_at: float | None,
        move: tuple[list[str], list[str]] | None,
        transition: tuple[list[str], list[str]],
    ) -> Any:
        """A deadline registration and an index move, then a transition, in one round trip.

        Returns the transition's reply. redis-py's pipelines ask SCRIPT EXISTS
        before running scripts, which would cost the round trip this saves:
        send EVALSHA directly, and load the scripts only if Redis forgot them
        (a restart).
        """
        scripts = [(self._index_script.sha, move)] if move is not None else []
        scripts.append((self._script.sha, transition))
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            if watch_at is not None:
                # LT: a registration only ever moves the sweeper's look earlier.
                pipe.zadd(self.keys.deadline_shard(saga_id), {saga_id: round(watch_at * 1000)}, lt=True)
            for sha, (keys, args) in scripts:
                pipe.evalsha(sha, len(keys), *keys, *args)
            results: list[Any] = pipe.execute(raise_on_error=False)
            if attempt == 1 and any(isinstance(r, redis.exceptions.NoScriptError) for r in results):
                # Safe to send again: index moves are idempotent and the
                # transition is de-duplicated by its id.
                self.client.script_load(self._index_script.script)
                self.client.script_load(self._script.script)
                continue
            for r in results:
                if isinstance(r, Exception):
                    raise r
            return results[-1]
        raise AssertionError("unreachable")

    def _load(self, saga_id: str) -> dict[str, str] | None:
        try:
            raw: dict[str, str] = self._call(lambda: self.client.hgetall(self.keys.record(saga_id)))  # type: ignore[arg-type,return-value]
        except redis.ResponseError as exc:  # e.g. WRONGTYPE: the key is not a hash
            raise SagaRecordCorrupt(saga_id, str(exc)) from exc
        return raw or None

    def _index_call(self, saga_id: str, name: str, old: str, new: str, retention: float) -> tuple[list[str], list[str]]:
        now_ms = time.time() * 1000
        if not old:
            old = new
        trim = f"{now_ms - retention * 1000:.0f}" if retention > 0 else ""
        k = self.keys
        keys = [k.status_index(old), k.name_index(name, old), k.status_index(new), k.name_index(name, new), k.names()]
        return keys, [saga_id, f"{now_ms:.0f}", name, trim]

    def _index(self, saga_id: str, name: str, old: str, new: str, retention: float, unwatch: bool = False) -> None:
        keys, args = self._index_call(saga_id, name, old, new, retention)
        if not unwatch:
            self._call(lambda: self._index_script(keys=keys, args=args))
            return

        def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.evalsha(self._index_script.sha, len(keys), *keys, *args)
            pipe.zrem(self.keys.deadline_shard(saga_id), saga_id)
            results = pipe.execute(raise_on_error=False)
            if isinstance(results[0], redis.exceptions.NoScriptError):
                self._index_script(keys=keys, args=args)
            elif isinstance(results[0], Exception):
                raise results[0]

        self._call(run)

    def claim_due(self, limit: int, lease: float) -> list[tuple[str, str]]:
        shards = self.keys.deadline_shards()
        per_shard = max(1, limit // len(shards))
        lease_ms = f"{lease * 1000:.0f}"

        def run() -> list[Any]:
            for attempt in (1, 2):
                pipe = self.client.pipeline(transaction=False)
                for shard in shards:
                    pipe.evalsha(self._claim_script.sha, 1, shard, lease_ms, per_shard)
                results: list[Any] = pipe.execute(raise_on_error=False)
                if attempt == 1 and any(isinstance(r, redis.exceptions.NoScriptError) for r in results):
                    # Claims are leases, so claiming again is harmless.
                    self.client.script_load(self._claim_script.script)
                    continue
                return results
            raise AssertionError("unreachable")

        claimed: list[tuple[str, str]] = []
        for reply in self._call(run):
            if isinstance(reply, Exception):
                raise reply
            claim = str(reply[0])
            claimed.extend((str(saga_id), claim) for saga_id in reply[1:])
        return claimed

    def rescore(self, saga_id: str, claim: str, next_deadline: str) -> None:
        shard = self.keys.deadline_shard(saga_id)
        self._call(lambda: self._rescore_script(keys=[shard], args=[saga_id, claim, next_deadline]))

    def watched(self, saga_id: str) -> float | None:
        """When sweepers next look at ``saga_id`` (epoch seconds), or None if it is not in the deadline index."""
        score = self._call(lambda: self.client.zscore(self.keys.deadline_shard(saga_id), saga_id))
        return None if score is None else float(score) / 1000

    def status(self, saga_id: str) -> SagaStatus:
        # One field, not the whole record: SagaResult.get polls this.
        try:
            raw = self._call(lambda: self.client.hget(self.keys.record(saga_id), "status"))
        except redis.ResponseError as exc:  # e.g. WRONGTYPE: the key is not a hash
            raise SagaRecordCorrupt(saga_id, str(exc)) from exc
        if raw is None:
            raise SagaNotFound(saga_id, self.where())
        try:
            return SagaStatus(str(raw))
        except ValueError as exc:
            raise SagaRecordCorrupt(saga_id, f"unknown status {raw!r}") from exc

    def close(self) -> None:
        self.client.close()
        self.client.connection_pool.disconnect()

    def ping(self) -> None:
        self._call(self.client.ping)

    def _unindex(self, saga_id: str, name: str, status: str) -> None:
        def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(self.keys.status_index(status), saga_id)
            if name:
                pipe.zrem(self.keys.name_index(name, status), saga_id)
            pipe.execute()

        self._call(run)

    def list_ids(
        self, status: SagaStatus, name: str | None = None, limit: int = 100, since: float | None = None
    ) -> list[str]:
        key = self.keys.name_index(name, status.value) if name else self.keys.status_index(status.value)
        low = f"{since * 1000:.0f}" if since is not None else "-inf"
        ids: list[str] = self._call(
            lambda: self.client.zrevrangebyscore(key, "+inf", low, start=0, num=max(limit, 1))  # type: ignore[arg-type,return-value]
        )
        return ids

    def counts(self) -> dict[str, dict[str, int]]:
        members: set[str] = self._call(lambda: self.client.smembers(self.keys.names()))  # type: ignore[arg-type,return-value]
        names = sorted(members)
        low = f"{(time.time() - self.retention) * 1000:.0f}" if self.retention > 0 else "-inf"
        statuses = [s.value for s in SagaStatus]

        def run() -> list[int]:
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                for status in statuses:
                    expiring = status in ("COMPLETED", "COMPENSATED")
                    pipe.zcount(self.keys.name_index(name, status), low if expiring else "-inf", "+inf")
            return pipe.execute()

        sizes = iter(self._call(run))
        return {name: {status: int(next(sizes)) for status in statuses} for name in names}

    def load_many(self, saga_ids: Sequence[str]) -> list[dict[str, str] | None]:
        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for saga_id in saga_ids:
                pipe.hgetall(self.keys.record(saga_id))
            return pipe.execute(raise_on_error=False)

        # A key of the wrong type comes back as an error: report it as an empty record.
        return [raw if isinstance(raw, dict) and raw else None for raw in self._call(run)]

    def delete(self, saga_id: str) -> None:
        self._call(lambda: self.client.delete(self.keys.record(saga_id)))
