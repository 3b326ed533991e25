--[[ celery_saga transitions, part 3 of 4 (after transitions.lua and
lockqueue.lua, before dispatch.lua; store/redis.py TRANSITION_FILES): a
saga's semantic locks and running limit (Saga(lock=..., max_running=...),
celery_saga/locks.py), as its own transitions move them.

A saga names its RESOURCES in its record ("lk": JSON, a list of [resource,
capacity] pairs, lockqueue.lua). It takes all of them at its start, or none:
if one is full, or anyone waits for one already (first come, first served),
it waits ("lks" = "wait") in the queue of each, and nothing is dispatched.

A saga releases its resources when it ends COMPLETED or COMPENSATED (also a
waiting one, cancelled or out of lock_timeout), in that transition; a FAILED
one keeps its locks (the entity may be inconsistent) but not its running
slot, until a retry ends it, purge, or unlock. Each release lets the first
waiters of the resource start: their first stage is dispatched in their
record, and the reply names them ("admitted"), for the caller's follow() to
publish. Should the caller die first, a sweeper publishes it (ADMIT_LOOK_MS
later, see lock_sweep).

ONE SERVER (a Sentinel primary too): all of that happens inside the
transition, which also reads and writes the other sagas' records and the
{locks} keys. A saga whose record is gone, or that no longer holds what a
resource says, is removed from it when a saga finds the resource full
(prune), and a sweeper looks at each waiting saga every LOCK_RECHECK_MS.

A CLUSTER (ELSEWHERE): the {locks} keys and the other records are in other
hash slots, so the transition moves only its own record, and its caller
makes the other calls (store/cluster_locks.py): the start's lock call comes
first and its answer rides in as "!lkc" ("take" or "wait") with its time
"!lkat"; an ending transition names the resources to give back in its reply
("release"), and the caller releases them in the lock script, which names
the waiters to start, each then admitted by an "admit" transition of its own
record. A sweeper repairs whatever a crash left between two of those calls.

Record fields: lk, lks (above; both kept unpacked, TOP); while waiting,
lkt (since when, ms), lkto (its lock timeout, ms; absent: none), lkdl
(its lock deadline, ms) and, on one server, shb (its index shard, whose due
entry an admitting transition moves); adm (when it was admitted, ms) until a
sweeper has checked its first stage was published.
]]

-- How soon a sweeper checks that an admitted saga's first stage was published:
-- the process that admitted it is most likely still publishing it until then
-- (as for a callback: store/base.py CALLBACK_GRACE). Shorter, and a queue
-- that holds messages longer (a backlog) would get a second copy of each.
local ADMIT_LOOK_MS = 10000
-- How often a sweeper looks at a waiting saga (dead holders, its lock deadline).
local LOCK_RECHECK_MS = 30000
-- A cluster's start refuses the answer of its lock call ("relock") once it is
-- this old: a lock taken for a start that never wrote its record is given
-- back by a sweeper after twice as long (lockslot.lua MISSING_GRACE_MS), and
-- must not be held by a record written after that.
local LOCK_FENCE_MS = 30000

-- Where the resources live (lockqueue.lua), set by each call: on a cluster
-- (no index shard in the call: another slot) the lock script moves them.
local ELSEWHERE
local function lock_call()
  LOCKS = string.sub(K, 1, string.find(K, ':{', 1, true) - 1) .. ':{locks}'
  LOCK_NOW = num(NOW)
  ELSEWHERE = not SHARD
  LATER = {}
end

local function record_of(id) return string.sub(LOCKS, 1, -8) .. '{' .. id .. '}' end

-- The resources of the record at `key` (a list of [r, capacity] pairs), or nil.
local function resources(key)
  local text = redis.call('HGET', key, 'lk')
  if not text or text == '' then return nil end
  local ok, rs = pcall(cjson.decode, text)
  if not ok or type(rs) ~= 'table' or #rs == 0 then return nil end
  return rs
end

-- Does saga `id` still hold resource r, as its record says? A FAILED saga
-- holds its locks, not its running slot ("n:"). (store/cluster_locks.py
-- `holds` asks the same of the records a cluster's lock script cannot read.)
local function holds(r, id)
  local got = redis.call('HMGET', record_of(id), 'status', 'lks')
  if got[2] ~= 'held' then return false end
  if got[1] == 'COMPLETED' or got[1] == 'COMPENSATED' then return false end
  return not (got[1] == 'FAILED' and string.sub(r, 1, 2) == 'n:')
end

-- One server: a full resource first drops holders whose records no longer hold it.
local function full(r, cap)
  if redis.call('SCARD', res(r, 'h')) < cap then return false end
  for _, id in ipairs(redis.call('SMEMBERS', res(r, 'h'))) do
    if not holds(r, id) then redis.call('SREM', res(r, 'h'), id) end
  end
  return redis.call('SCARD', res(r, 'h')) >= cap
end

-- Let the waiting saga of record `key` start: dispatch its first stage, as
-- its start would have. Returns its name and since when it waited.
local function admit_record(key, id)
  local got = redis.call('HMGET', key, 'stages', 'sto', 'shb', 'name', 'lkt')
  local first = split(split(got[1], ';')[1], ',')
  for _, m in ipairs(first) do
    redis.call('HSET', key, 's:' .. m, 'DISPATCHED', 'td:' .. m, NOW)
    local to = num(redis.call('HGET', key, 'to:' .. m))
    if to then redis.call('HSET', key, 'dl:' .. m, NOW + to) end
  end
  redis.call('HSET', key, 'left', #first, 'lks', 'held', 'adm', NOW)
  if num(got[2]) then redis.call('HSET', key, 'sdl', NOW + num(got[2])) end
  redis.call('HDEL', key, 'lkt', 'lkto', 'lkdl', 'shb')
  -- A sweeper checks its first stage went out; it then finds its step deadlines.
  if got[3] then redis.call('ZADD', got[3] .. ':due', 'lt', NOW + ADMIT_LOOK_MS, id) end
  ADMITTED[#ADMITTED + 1] = id
  return got[4] or '', got[5]
end

-- One server: the waiters of a resource, read from their records.
local function waiter(id)
  local key = record_of(id)
  local got = redis.call('HMGET', key, 'status', 'lks')
  if got[1] ~= 'PENDING' or got[2] ~= 'wait' then return nil end
  return resources(key)
end

local function admit(id, rs)
  take(id, rs)
  count_wait(admit_record(record_of(id), id))
end

-- ARGV of a start (its fields f): "lk", and the pseudo-fields "!onl"
-- ("reject": refuse rather than wait) and "!lkto" (its lock timeout, ms);
-- on a cluster "!lkc" and "!lkat", its lock call's answer and time.
-- Returns "take" or "wait" (nil: no resources), or a refusal reply.
lock_check = function(f)
  if not f.lk or f.lk == '' then return nil end
  local ok, rs = pcall(cjson.decode, f.lk)
  if not ok or type(rs) ~= 'table' then return nil, respond('corrupt') end
  if ELSEWHERE then
    if f['!lkc'] ~= 'take' and f['!lkc'] ~= 'wait' then return nil, respond('corrupt') end
    -- Too late to trust: a sweeper may be giving that lock back (see LOCK_FENCE_MS).
    if not num(f['!lkat']) or num(NOW) - num(f['!lkat']) > LOCK_FENCE_MS then return nil, respond('relock') end
    return f['!lkc']
  end
  if can_take(SAGA_ID, rs, false, full) then return 'take' end
  if f['!onl'] ~= 'reject' then return 'wait' end
  local lock, holder, queued = blocker(rs)
  return nil, respond('locked', nil, {lock = lock, holder = holder, queued = queued or nil})
end

lock_enter = function(f, how)
  if how == 'take' then
    if not ELSEWHERE then take(SAGA_ID, cjson.decode(f.lk)) end
    redis.call('HSET', K, 'lks', 'held')
    return
  end
  redis.call('HSET', K, 'lks', 'wait', 'lkt', NOW, 'left', '0')
  local to = num(f['!lkto'])
  if to then redis.call('HSET', K, 'lkto', f['!lkto'], 'lkdl', NOW + to) end
  -- (On a cluster the lock script queued it, and its caller watches it.)
  if ELSEWHERE then return end
  enqueue(SAGA_ID, cjson.decode(f.lk))
  redis.call('HSET', K, 'shb', SHARD)
  local look = num(NOW) + LOCK_RECHECK_MS
  if to then look = math.min(look, NOW + to) end
  redis.call('ZADD', SHARD .. ':due', 'lt', look, SAGA_ID)
  redis.call('HINCRBY', LOCKS .. ':m', 'waiting:' .. (f.name or ''), 1)
end

-- When a saga ends in status `new` ("purged" for purge, "unlock" for unlock): leave the
-- queues it waits in, or give back what it holds (a FAILED one keeps its
-- locks), and let the next waiters start.
release_locks = function(new)
  local lks = hget('lks')
  if not lks then return end
  local rs = resources(K)
  if not rs then return end
  local freed, keep = {}, false
  if lks == 'wait' then
    for _, rc in ipairs(rs) do
      if not ELSEWHERE then redis.call('ZREM', res(rc[1], 'q'), SAGA_ID) end
      freed[#freed + 1] = rc[1]  -- the first waiter may have been it
    end
    if not ELSEWHERE then count_wait(hget('name') or '', hget('lkt')) end
    redis.call('HDEL', K, 'lks', 'lkt', 'lkto', 'lkdl', 'shb')
  else
    -- A start whose publish failed ran nothing: it keeps nothing either.
    keep = new == 'FAILED' and hget('startfail') ~= '1'
    for _, rc in ipairs(rs) do
      local slot_ = string.sub(rc[1], 1, 2) == 'n:'
      if (new == 'unlock' and not slot_) or (new ~= 'unlock' and (not keep or slot_)) then
        if not ELSEWHERE then redis.call('SREM', res(rc[1], 'h'), SAGA_ID) end
        freed[#freed + 1] = rc[1]
      end
    end
    if not keep then redis.call('HDEL', K, 'lks', 'adm') end
  end
  if ELSEWHERE then
    if #freed > 0 then LATER.release = freed end
    if keep then LATER.kept = true end
    return
  end
  for _, r in ipairs(freed) do grant(r, waiter, admit, full) end
end

-- An operator retries a FAILED saga: it runs again, in its running slot
-- again (taken even if the limit is reached meanwhile: it held one before).
-- On a cluster its caller took it back before this call (store/cluster_locks.py).
retake_slots = function()
  if ELSEWHERE or hget('lks') ~= 'held' then return end
  for _, rc in ipairs(resources(K) or {}) do
    if string.sub(rc[1], 1, 2) == 'n:' then redis.call('SADD', res(rc[1], 'h'), SAGA_ID) end
  end
end

-- A sweeper looks at the saga: "timeout" if it waited past its lock
-- deadline, "redrive" if it was admitted long enough ago and no step of its
-- first stage began (the first stage's publish may have died with the
-- process that admitted it), else nil. A waiting saga first repairs its
-- resources (holders gone) and may start; on a cluster its caller does
-- ("relook": store/cluster_locks.py).
lock_sweep = function()
  local lks = hget('lks')
  if lks == 'held' then
    local adm = num(hget('adm'))
    if not adm or num(NOW) < adm + ADMIT_LOOK_MS then return nil end
    redis.call('HDEL', K, 'adm')
    if live ~= 'PENDING' then return nil end
    for _, m in ipairs(stages()[1]) do
      if hget('s:' .. m) ~= 'DISPATCHED' then return nil end
    end
    return 'redrive'
  end
  if lks ~= 'wait' or live ~= 'PENDING' then return nil end
  if not ELSEWHERE then
    for _, rc in ipairs(resources(K) or {}) do grant(rc[1], waiter, admit, full) end
    if hget('lks') ~= 'wait' then return nil end
  end
  local dl = num(hget('lkdl'))
  if dl and num(NOW) >= dl then return 'timeout' end
  if ELSEWHERE then LATER.relook = true end
  return nil
end

-- The next time a sweeper should look at the saga for its locks (nil if
-- never), and whether it waits for them.
lock_deadline = function()
  local lks = hget('lks')
  if lks == 'wait' then
    local look = num(NOW) + LOCK_RECHECK_MS
    local dl = num(hget('lkdl'))
    if dl and dl < look then look = dl end
    return look, true
  end
  if lks ~= 'held' then return nil, false end
  local adm = num(hget('adm'))
  return adm and adm + ADMIT_LOOK_MS, false
end

-- ARGV: none. An operator gives back the locks of a FAILED saga (the
-- entity was repaired by hand); the next waiters start.
OPS.unlock = function()
  if status ~= 'FAILED' then return respond('not_allowed') end
  if hget('lks') ~= 'held' then return respond('duplicate') end
  release_locks('unlock')
  redis.call('HDEL', K, 'lks')
  if not ELSEWHERE then redis.call('HINCRBY', LOCKS .. ':m', 'unlocked', 1) end
  return respond('recorded')
end

-- ARGV: none. A cluster only: the lock script let this waiting saga take
-- its resources (store/cluster_locks.py); start it. "duplicate" if it was
-- started already, "not_allowed" if it no longer waits (its caller gives
-- the resources back).
OPS.admit = function()
  local lks = hget('lks')
  if lks == 'held' and status ~= 'COMPLETED' and status ~= 'COMPENSATED' then return respond('duplicate') end
  if status ~= 'PENDING' or lks ~= 'wait' then return respond('not_allowed') end
  admit_record(K, SAGA_ID)
  return respond('recorded')
end
