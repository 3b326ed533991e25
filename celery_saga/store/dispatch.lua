--[[ celery_saga transitions, part 4 of 4 (after transitions.lua, lockqueue.lua and locks.lua,
loaded as one script: store/redis.py TRANSITION_FILES): the index moves every
transition makes, and the dispatch of a call to its op. ]]

-- -- dispatch ------------------------------------------------------------------

-- On one server KEYS[2] is the saga's index shard ("<prefix>:{s<n>}", see
-- store/keys.py) and the status move happens here, atomically with the
-- transition: the indexes cannot drift. (On a cluster the shard is in
-- another slot; the caller moves the entries after the call.)
-- How soon a sweeper looks at an ended saga whose end callback may be unsent:
-- store/base.py CALLBACK_GRACE + 1 s.
local LOOK_AFTER_END_MS = 11000

-- Upper bounds (s) of the duration histogram's buckets, the last one +Inf:
-- store/keys.py DURATION_BUCKETS.
local DURATION_BUCKETS = {0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 3600, 21600, 86400}

local function count_move(name, before, after)
  if op == 'start' and not before then count('started:' .. name) end
  if not (after and finished(after)) or (before and finished(before)) then return end
  count('finished:' .. name .. ':' .. after .. ':' .. (hget('reason') or ''))
  local took = num(NOW) - (num(hget('created')) or num(NOW))
  local i = #DURATION_BUCKETS + 1
  for b, le in ipairs(DURATION_BUCKETS) do
    if took <= le * 1000 then i = b; break end
  end
  count('dur:' .. name .. ':' .. after .. ':' .. i)
  count('dursum:' .. name .. ':' .. after, took)
end

local function move_index()
  local before, after = status, live
  if not SHARD or (before == after and not purged_name) then return end
  local name = purged_name or hget('name') or ''
  count_move(name, before, after)
  if before then redis.call('ZREM', SHARD .. ':name:' .. name .. ':' .. before, SAGA_ID) end
  if op == 'purge' or unindexed or not after then return end
  redis.call('ZADD', SHARD .. ':name:' .. name .. ':' .. after, NOW, SAGA_ID)
  redis.call('SADD', SHARD .. ':names', name)
  if after == 'COMPLETED' or after == 'COMPENSATED' then
    -- Finished entries outlive their records by at most the retention.
    local kept = num(hget('retention'))
    if kept then
      local cut = '(' .. string.format('%.0f', num(NOW) - kept * 1000)
      redis.call('ZREMRANGEBYSCORE', SHARD .. ':name:' .. name .. ':' .. after, '-inf', cut)
    end
  end
  if after == 'COMPLETED' and not pending_callback() then
    redis.call('ZREM', SHARD .. ':due', SAGA_ID)  -- no deadline left
  elseif finished(after) then
    -- A sweeper looks once the callback grace is over, in case the end
    -- callback was never sent (and for late outcomes of unknown steps).
    redis.call('ZADD', SHARD .. ':due', 'lt', num(NOW) + LOOK_AFTER_END_MS, SAGA_ID)
  end
end

local function compact_if_ended(reply)
  move_index()
  if (ending or expanded) and finished(live) and redis.call('EXISTS', K) == 1 then compact(live) end
  return reply
end

local KNOWN = {PENDING = true, RUNNING = true, COMPENSATING = true, COMPLETED = true, COMPENSATED = true,
  FAILED = true}

local function run(handler)
  if tx ~= '' then
    local prev = redis.call('HGET', K, slot())
    local id, at, stage, text = string.match(prev or '', '^(%S+) (%d+) (%S+) (.*)$')
    if id == tx and num(NOW) - num(at) <= window_ms() then
      -- "!": the store WAITs for replicas after the call; writing the entry
      -- again makes that WAIT cover the first write too.
      if string.sub(tx, 1, 1) == '!' then redis.call('HSET', K, slot(), prev) end
      if stage ~= '-' then return with_stage_data(text, num(stage)) end
      return text
    end
  end
  if op == 'start' then return handler() end
  if not status then return respond('missing') end
  if op ~= 'purge' then
    -- (A compact record, HEAD[6], has its stages packed: only callback_sent and rerun see one.)
    if not KNOWN[status] or HEAD[3] ~= '1' or not (HEAD[4] or HEAD[6]) or (not HEAD[5] and status == 'COMPENSATING') then
      return respond('corrupt')
    end
    -- Operators and sweepers act on whatever generation is current ("*").
    if gen ~= '*' and HEAD[2] ~= gen then return respond('stale') end
    -- A step or compensation message names the plan its task was checked
    -- against: one of another plan than the record's (forged, or of another
    -- saga) changes nothing.
    local plan = (op == 'begin' and AV[7]) or (op == 'comp_begin' and AV[8]) or ''
    if plan ~= '' and plan ~= hget('ph') then return respond('rejected') end
  end
  return handler()
end

-- One call: set the per-call state, apply the op, move the indexes, pack an ended record.
local function transition(keys, args)
  KS, AV = keys, args
  K, op, tx, gen = KS[1], AV[1], AV[2], AV[3]
  SAGA_ID = string.sub(K, string.find(K, '{', 1, true) + 1, -2)
  SHARD = KS[2]
  local clock = redis.call('TIME')
  NOW = string.format('%.0f', tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000))
  STAGES, expanded, ending, purged_name, unindexed = nil, false, false, nil, false
  ADMITTED = {}
  lock_call()
  CALLBACK_GRACE_MS = num(AV[4]) or 0
  take_enqueue()
  local handler = OPS[op]
  if not handler then return redis.error_reply('celery_saga: unknown op ' .. tostring(op)) end
  HEAD = redis.call('HMGET', K, unpack(HEAD_FIELDS))
  if HEAD[6] and op ~= 'callback_sent' and op ~= 'purge' and op ~= 'rerun' then
    expand()
    HEAD = redis.call('HMGET', K, unpack(HEAD_FIELDS))
  end
  status = HEAD[1]
  live = status
  return compact_if_ended(run(handler))
end

-- Loaded by FUNCTION LOAD (store/redis.py names the library and function by
-- this file's digest), or run by EVALSHA with the KEYS and ARGV of the call.
if redis.register_function then
  redis.register_function('@FUNCTION@', transition)
else
  return transition(KEYS, ARGV)
end
