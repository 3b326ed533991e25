--[[ celery_saga's lock script on a Redis Cluster (after lockqueue.lua:
store/redis.py LOCK_SLOT_FILES; called by store/cluster_locks.py).

On a cluster the {locks} keys share one hash slot, and each saga record is
in a slot of its own, so no call can move both. This script moves the
locks; the records move in their own transitions (locks.lua, ELSEWHERE),
and the caller makes the calls in between, in an order a crash between
any two of them leaves repairable (store/cluster_locks.py says how).

Beside the queues (lockqueue.lua), the script keeps what it cannot read
from a record in another slot: <prefix>:{locks}:w, a hash of each saga
holding or waiting for a resource to {at = ms of its lock call, name = its
saga name, rs = its resources} (JSON).

KEYS[1]  <prefix>:{locks}
ARGV[1]  the op; the op's own arguments follow.
  acquire  id, on_locked ("reject" or ""), saga name, resources (JSON)
           -> {how = "take" | "wait" | "locked", at, lock, holder, queued}
           (wait and locked name a resource and who holds it, or waits first)
           A saga already holding all its resources answers "take", one
           already waiting "wait", with the time of its first call: the
           call may be sent again, and a sweeper asks again (a relook).
  release  id, "missing" or "", "unlock" or "queued" or "", resources ...
           (none: all it has). Gives the resources back (holding or
           waiting), then lets their first waiters take them. "missing": the
           caller found no record, which a start writes after its lock call:
           only once that call is MISSING_GRACE_MS old, or the saga is known
           to have ended (kept). "unlock" counts an operator's unlock.
           "queued": leave the queues only: a repair that read a waiter's
           record after it was let in must not take what it now holds.
           -> {admitted = ids of the waiters that now hold their resources}
  kept     id: the saga ended FAILED, keeping its locks, so its record was
           written: once it is gone (expired), its locks go at once.
  retake   id, resources ...: the saga holds them again (an operator's retry).
]]

LOCKS = KEYS[1]
local clock = redis.call('TIME')
LOCK_NOW = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local W = LOCKS .. ':w'
-- A start writes its record within locks.lua's LOCK_FENCE_MS of its lock
-- call, or not at all: twice that, and a lock whose saga has no record is
-- given back. (Two clocks compare here, this node's and the record's node's:
-- the margin holds while they are less than 30 s apart.)
local MISSING_GRACE_MS = 60000
local ADMITTED = {}
local op, id = ARGV[1], ARGV[2]

local function who(saga_id)
  local text = redis.call('HGET', W, saga_id)
  if not text then return nil end
  local ok, w = pcall(cjson.decode, text)
  if not ok or type(w) ~= 'table' or type(w.rs) ~= 'table' then return nil end
  return w
end

-- The records are elsewhere: a holder gone is dropped by the caller (release).
local function full(r, cap) return redis.call('SCARD', res(r, 'h')) >= cap end

local function waiter(saga_id)
  local w = who(saga_id)
  return w and w.rs
end

local function admit(saga_id, rs)
  take(saga_id, rs)
  local w = who(saga_id)
  count_wait(w.name or '', w.at)
  ADMITTED[#ADMITTED + 1] = saga_id
end

-- "take" if the saga holds all of rs, "wait" if it waits for any, else nil.
local function where(saga_id, rs)
  local holds_all = true
  for _, rc in ipairs(rs) do
    if redis.call('ZSCORE', res(rc[1], 'q'), saga_id) then return 'wait' end
    if redis.call('SISMEMBER', res(rc[1], 'h'), saga_id) == 0 then holds_all = false end
  end
  if holds_all then return 'take' end
  return nil
end

if op == 'acquire' then
  local ok, rs = pcall(cjson.decode, ARGV[5])
  if not ok or type(rs) ~= 'table' or #rs == 0 then return redis.error_reply('celery_saga: bad resources') end
  local known, blocked = who(id), {}
  local how = where(id, rs)
  if how then return cjson.encode({how = how, at = known and known.at or LOCK_NOW}) end
  if can_take(id, rs, false, full) then
    how = 'take'
  else
    -- Who it waits for (its caller checks that saga still exists: this script cannot).
    local lock, holder, queued = blocker(rs)
    if ARGV[3] == 'reject' then
      return cjson.encode({how = 'locked', lock = lock, holder = holder, queued = queued})
    end
    how = 'wait'
    blocked = {lock = lock, holder = holder, queued = queued}
  end
  redis.call('HSET', W, id, cjson.encode({at = LOCK_NOW, name = ARGV[4], rs = rs}))
  if how == 'take' then
    take(id, rs)
  else
    enqueue(id, rs)
    redis.call('HINCRBY', LOCKS .. ':m', 'waiting:' .. ARGV[4], 1)
  end
  return cjson.encode({how = how, at = LOCK_NOW, lock = blocked.lock, holder = blocked.holder, queued = blocked.queued})
end

if op == 'release' then
  local w = who(id)
  if ARGV[3] == 'missing' and w and not w.ended and (tonumber(w.at) or 0) > LOCK_NOW - MISSING_GRACE_MS then
    return cjson.encode({admitted = {}, kept = true})
  end
  -- No resources named: all it has.
  local rs = {}
  for i = 5, #ARGV do rs[#rs + 1] = ARGV[i] end
  if #rs == 0 and w then
    for _, rc in ipairs(w.rs) do rs[#rs + 1] = rc[1] end
  end
  local waited = false
  for _, r in ipairs(rs) do
    if ARGV[4] ~= 'queued' then redis.call('SREM', res(r, 'h'), id) end
    if redis.call('ZREM', res(r, 'q'), id) == 1 then waited = true end
  end
  if waited and w then count_wait(w.name or '', w.at) end
  if ARGV[4] == 'unlock' then redis.call('HINCRBY', LOCKS .. ':m', 'unlocked', 1) end
  -- Forget it once it holds and waits for nothing (a FAILED saga keeps its locks).
  if w then
    local any = false
    for _, rc in ipairs(w.rs) do
      if redis.call('SISMEMBER', res(rc[1], 'h'), id) == 1 or redis.call('ZSCORE', res(rc[1], 'q'), id) then
        any = true
      end
    end
    if not any then redis.call('HDEL', W, id) end
  end
  for _, r in ipairs(rs) do grant(r, waiter, admit, full) end
  return cjson.encode({admitted = ADMITTED})
end

if op == 'kept' then
  local w = who(id)
  if w then
    w.ended = true
    redis.call('HSET', W, id, cjson.encode(w))
  end
  return 1
end

if op == 'retake' then
  for i = 3, #ARGV do
    redis.call('SADD', res(ARGV[i], 'h'), id)
    redis.call('SADD', LOCKS, ARGV[i])
  end
  return 1
end

return redis.error_reply('celery_saga: unknown lock op ' .. tostring(op))
