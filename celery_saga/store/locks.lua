--[[ celery_saga transitions, part 2 of 3 (after transitions.lua, before
dispatch.lua; store/redis.py TRANSITION_FILES): semantic locks and running
limits (Saga(lock=..., max_running=...), celery_saga/locks.py).

A saga names RESOURCES in its record ("lk": JSON, a list of [resource, capacity] pairs):
"l:<lock>" for each lock (capacity 1), "n:<saga name>" for a running limit
(capacity max_running). It takes all of them at its start, or none: if one
is full, or anyone waits for one already (first come, first served), it
waits ("lks" = "wait") in the queue of each, and nothing is dispatched.
Per resource (store/keys.py):
  <prefix>:{res:<r>}:h   set of the saga ids holding it
  <prefix>:{res:<r>}:q   sorted set of the saga ids waiting for it, by arrival
Arrival is one sequence for every resource (<prefix>:{locks}:seq), so the
oldest waiter is first in every queue it is in: it can always start once
its resources are free, and no two waiters wait for each other (no
deadlock, whatever the order the sagas name their locks in).

A saga releases its resources when it ends COMPLETED or COMPENSATED (also a
waiting one, cancelled or out of lock_timeout), in that transition; a FAILED
one keeps its locks (the entity may be inconsistent) but not its running
slot, until a retry ends it, purge, or unlock. Each release lets the first
waiters of the resource start, in the same transition: their first stage is
dispatched in their record, and the reply names them ("admitted"), for the
caller's follow() to publish. Should the caller die first, a sweeper
publishes it (ADMIT_LOOK_MS later, see lock_sweep).

These calls touch other sagas' records and the resources' keys: one server
(or a Sentinel primary) only. A saga whose record is gone, or that no longer
holds what a resource says, is removed from it when a saga finds the
resource full (prune), and a sweeper looks at each waiting saga every
LOCK_RECHECK_MS, so no lock outlives its holder's record.

Record fields: lk, lks (above; both kept unpacked, TOP); while waiting,
lkt (since when, ms), lkto (its lock timeout, ms; absent: none), lkdl
(its lock deadline, ms) and shb (its index shard, whose due entry an
admitting transition moves); adm (when it was admitted, ms) until a sweeper
has checked its first stage was published.
]]

-- How soon a sweeper checks that an admitted saga's first stage was published:
-- the process that admitted it is most likely still publishing it until then
-- (as for a callback: store/base.py CALLBACK_GRACE). Shorter, and a queue
-- that holds messages longer (a backlog) would get a second copy of each.
local ADMIT_LOOK_MS = 10000
-- How often a sweeper looks at a waiting saga (dead holders, its lock deadline).
local LOCK_RECHECK_MS = 30000

-- The key prefix, from K ("<prefix>:{<saga id>}").
local function prefix() return string.sub(K, 1, string.find(K, ':{', 1, true) - 1) end

local function res(r, part) return prefix() .. ':{res:' .. r .. '}:' .. part end
local function lock_meta(part) return prefix() .. ':{locks}' .. part end
local function record_of(id) return prefix() .. ':{' .. id .. '}' end

-- The resources of the record at `key` (a list of [r, capacity] pairs), or nil.
local function resources(key)
  local text = redis.call('HGET', key, 'lk')
  if not text or text == '' then return nil end
  local ok, rs = pcall(cjson.decode, text)
  if not ok or type(rs) ~= 'table' or #rs == 0 then return nil end
  return rs
end

-- Does saga `id` still hold resource r, as its record says? A FAILED saga
-- holds its locks, not its running slot ("n:").
local function holds(r, id)
  local got = redis.call('HMGET', record_of(id), 'status', 'lks')
  if got[2] ~= 'held' then return false end
  if got[1] == 'COMPLETED' or got[1] == 'COMPENSATED' then return false end
  return not (got[1] == 'FAILED' and string.sub(r, 1, 2) == 'n:')
end

local function prune(r)
  for _, id in ipairs(redis.call('SMEMBERS', res(r, 'h'))) do
    if not holds(r, id) then redis.call('SREM', res(r, 'h'), id) end
  end
end

local function full(r, cap)
  if redis.call('SCARD', res(r, 'h')) < cap then return false end
  prune(r)
  return redis.call('SCARD', res(r, 'h')) >= cap
end

-- May saga `id` take all of rs now? Each has room, and it is first in each
-- queue (a waiter), or every queue is empty (a new start).
local function can_take(id, rs, waiting)
  for _, rc in ipairs(rs) do
    local r = rc[1]
    if full(r, tonumber(rc[2]) or 1) then return false end
    local head = redis.call('ZRANGE', res(r, 'q'), 0, 0)[1]
    if waiting and head ~= id then return false end
    if not waiting and head then return false end
  end
  return true
end

local function take(id, rs)
  for _, rc in ipairs(rs) do
    redis.call('SADD', res(rc[1], 'h'), id)
    redis.call('ZREM', res(rc[1], 'q'), id)
    redis.call('SADD', lock_meta(''), rc[1])
  end
end

-- Lock waits by duration, for /metrics: store/keys.py DURATION_BUCKETS (s).
local WAIT_BUCKETS = {0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 3600, 21600, 86400}

local function count_wait(name, since)
  local m = lock_meta(':m')
  redis.call('HINCRBY', m, 'waiting:' .. name, -1)
  local took = num(NOW) - (num(since) or num(NOW))
  local i = #WAIT_BUCKETS + 1
  for b, le in ipairs(WAIT_BUCKETS) do
    if took <= le * 1000 then i = b; break end
  end
  redis.call('HINCRBY', m, 'wait:' .. i, 1)
  redis.call('HINCRBY', m, 'waitsum', took)
end

-- Let waiting saga `id` (record `key`) start: take its resources and
-- dispatch its first stage, as its start would have.
local function admit(key, id, rs)
  take(id, rs)
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
  count_wait(got[4] or '', got[5])
  ADMITTED[#ADMITTED + 1] = id
end

-- Start the first waiters of resource r, while the first can take all it needs.
local function grant(r)
  while true do
    local head = redis.call('ZRANGE', res(r, 'q'), 0, 0)[1]
    if not head then
      redis.call('SREM', lock_meta(''), r)  -- listed again by its next holder
      if redis.call('SCARD', res(r, 'h')) > 0 then redis.call('SADD', lock_meta(''), r) end
      return
    end
    local key = record_of(head)
    local got = redis.call('HMGET', key, 'status', 'lks')
    local rs = resources(key)
    if got[1] ~= 'PENDING' or got[2] ~= 'wait' or not rs then
      redis.call('ZREM', res(r, 'q'), head)  -- gone, or no longer waiting
    elseif can_take(head, rs, true) then
      admit(key, head, rs)
    else
      return
    end
  end
end

-- ARGV of a start (its fields f): "lk", and the pseudo-fields "!onl"
-- ("reject": refuse rather than wait) and "!lkto" (its lock timeout, ms).
-- Returns "take" or "wait" (nil: no resources), or a refusal reply.
lock_check = function(f)
  if not f.lk or f.lk == '' then return nil end
  local ok, rs = pcall(cjson.decode, f.lk)
  if not ok or type(rs) ~= 'table' then return nil, respond('corrupt') end
  if can_take(SAGA_ID, rs, false) then return 'take' end
  if f['!onl'] ~= 'reject' then return 'wait' end
  -- Name who holds it (or, a queue ahead, who waits first).
  for _, rc in ipairs(rs) do
    local holder = redis.call('SRANDMEMBER', res(rc[1], 'h'))
    local first = redis.call('ZRANGE', res(rc[1], 'q'), 0, 0)[1]
    if holder or first then
      return nil, respond('locked', nil, {lock = rc[1], holder = holder or first, queued = (not holder) or nil})
    end
  end
  return nil, respond('locked', nil, {lock = rs[1][1], holder = ''})
end

lock_enter = function(f, how)
  local rs = cjson.decode(f.lk)
  if how == 'take' then
    take(SAGA_ID, rs)
    redis.call('HSET', K, 'lks', 'held')
    return
  end
  local seq = redis.call('INCR', lock_meta(':seq'))
  for _, rc in ipairs(rs) do
    redis.call('ZADD', res(rc[1], 'q'), seq, SAGA_ID)
    redis.call('SADD', lock_meta(''), rc[1])
  end
  redis.call('HSET', K, 'lks', 'wait', 'lkt', NOW, 'left', '0')
  if SHARD then redis.call('HSET', K, 'shb', SHARD) end
  local look = num(NOW) + LOCK_RECHECK_MS
  local to = num(f['!lkto'])
  if to then
    redis.call('HSET', K, 'lkto', f['!lkto'], 'lkdl', NOW + to)
    look = math.min(look, NOW + to)
  end
  if SHARD then redis.call('ZADD', SHARD .. ':due', 'lt', look, SAGA_ID) end
  redis.call('HINCRBY', lock_meta(':m'), 'waiting:' .. (f.name or ''), 1)
end

-- When a saga ends in status `new` ("purged" for purge, "unlock" for unlock): leave the
-- queues it waits in, or give back what it holds (a FAILED one keeps its
-- locks), and let the next waiters start.
release_locks = function(new)
  local lks = hget('lks')
  if not lks then return end
  local rs = resources(K)
  if not rs then return end
  local freed = {}
  if lks == 'wait' then
    for _, rc in ipairs(rs) do
      redis.call('ZREM', res(rc[1], 'q'), SAGA_ID)
      freed[#freed + 1] = rc[1]  -- the first waiter may have been it
    end
    count_wait(hget('name') or '', hget('lkt'))
    redis.call('HDEL', K, 'lks', 'lkt', 'lkto', 'lkdl', 'shb')
  else
    -- A start whose publish failed ran nothing: it keeps nothing either.
    local keep = new == 'FAILED' and hget('startfail') ~= '1'
    for _, rc in ipairs(rs) do
      local slot_ = string.sub(rc[1], 1, 2) == 'n:'
      if (new == 'unlock' and not slot_) or (new ~= 'unlock' and (not keep or slot_)) then
        redis.call('SREM', res(rc[1], 'h'), SAGA_ID)
        freed[#freed + 1] = rc[1]
      end
    end
    if not keep then redis.call('HDEL', K, 'lks', 'adm') end
  end
  for _, r in ipairs(freed) do grant(r) end
end

-- An operator retries a FAILED saga: it runs again, in its running slot
-- again (taken even if the limit is reached meanwhile: it held one before).
retake_slots = function()
  if hget('lks') ~= 'held' then return end
  for _, rc in ipairs(resources(K) or {}) do
    if string.sub(rc[1], 1, 2) == 'n:' then redis.call('SADD', res(rc[1], 'h'), SAGA_ID) end
  end
end

-- A sweeper looks at the saga: "timeout" if it waited past its lock
-- deadline, "redrive" if it was admitted long enough ago and no step of its
-- first stage began (the first stage's publish may have died with the
-- process that admitted it), else nil. A waiting saga first repairs its
-- resources (holders gone) and may start.
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
  for _, rc in ipairs(resources(K) or {}) do
    prune(rc[1])
    grant(rc[1])
  end
  if hget('lks') ~= 'wait' then return nil end
  local dl = num(hget('lkdl'))
  if dl and num(NOW) >= dl then return 'timeout' end
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
  redis.call('HINCRBY', lock_meta(':m'), 'unlocked', 1)
  return respond('recorded')
end
