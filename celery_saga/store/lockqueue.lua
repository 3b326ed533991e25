--[[ celery_saga lock queues: the first-come-first-served core of semantic
locks and running limits (celery_saga/locks.py). One copy of it runs in two
places (store/redis.py TRANSITION_FILES and LOCK_SLOT_FILES):
  - on one server, inside the transitions (after transitions.lua, before
    locks.lua): a saga's locks move in the very call that starts or ends it;
  - on a Redis Cluster, in the lock script (before lockslot.lua), called
    beside the transitions: the records are in other hash slots.

A RESOURCE is "l:<lock>" (capacity 1) or "n:<saga name>" (capacity
max_running). Every key is under the hash tag {locks}, so that a saga naming
several locks takes them all, or none, in one call on a cluster too:
  <prefix>:{locks}:h:<r>   set of the saga ids holding r
  <prefix>:{locks}:q:<r>   sorted set of the saga ids waiting for r, by arrival
  <prefix>:{locks}         set of the resources in use
  <prefix>:{locks}:seq     the arrival sequence, one for every resource
  <prefix>:{locks}:m       metrics (store/keys.py)
One sequence for every queue means the oldest waiter is first in each queue
it is in: it can start once its resources are free, and no two waiters wait
for each other (no deadlock, whatever order two sagas name their locks in).
]]

local LOCKS    -- "<prefix>:{locks}", set by each call
local LOCK_NOW -- store clock, ms (number), set by each call

local function res(r, part) return LOCKS .. ':' .. part .. ':' .. r end

-- May saga `id` take all of rs (a list of [r, capacity]) now? Each has room
-- (full(r, capacity) is the caller's test), and it is first in each queue
-- (`waiting`: a waiter), or every queue is empty (a new start: no cutting in).
local function can_take(id, rs, waiting, full)
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
    redis.call('SADD', LOCKS, rc[1])
  end
end

local function enqueue(id, rs)
  local seq = redis.call('INCR', LOCKS .. ':seq')
  for _, rc in ipairs(rs) do
    redis.call('ZADD', res(rc[1], 'q'), seq, id)
    redis.call('SADD', LOCKS, rc[1])
  end
end

-- Who holds rs[i] first (or, with nobody holding, who waits first), for a
-- refusal: (resource, saga id, queued).
local function blocker(rs)
  for _, rc in ipairs(rs) do
    local holder = redis.call('SRANDMEMBER', res(rc[1], 'h'))
    local first = redis.call('ZRANGE', res(rc[1], 'q'), 0, 0)[1]
    if holder or first then return rc[1], holder or first, not holder end
  end
  return rs[1][1], '', false
end

-- Lock waits by duration, for /metrics: store/keys.py DURATION_BUCKETS (s).
local WAIT_BUCKETS = {0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 3600, 21600, 86400}

-- A wait of a saga named `name` since `since` (ms) ends.
local function count_wait(name, since)
  local m = LOCKS .. ':m'
  redis.call('HINCRBY', m, 'waiting:' .. name, -1)
  local took = LOCK_NOW - (tonumber(since) or LOCK_NOW)
  local i = #WAIT_BUCKETS + 1
  for b, le in ipairs(WAIT_BUCKETS) do
    if took <= le * 1000 then i = b; break end
  end
  redis.call('HINCRBY', m, 'wait:' .. i, 1)
  redis.call('HINCRBY', m, 'waitsum', took)
end

-- Start the first waiters of resource r while the first can take all it
-- needs. waiter(id): its resources if it still waits, else nil (it leaves
-- the queue); admit(id, rs): it takes them and starts.
local function grant(r, waiter, admit, full)
  while true do
    local head = redis.call('ZRANGE', res(r, 'q'), 0, 0)[1]
    if not head then
      redis.call('SREM', LOCKS, r)  -- listed again by its next holder
      if redis.call('SCARD', res(r, 'h')) > 0 then redis.call('SADD', LOCKS, r) end
      return
    end
    local rs = waiter(head)
    if not rs then
      redis.call('ZREM', res(r, 'q'), head)  -- gone, or no longer waiting
    elseif can_take(head, rs, true, full) then
      admit(head, rs)
    else
      return
    end
  end
end
