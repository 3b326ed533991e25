-- Every state transition of a saga, run atomically inside Redis.
--
-- KEYS[1]  the saga record, a hash (see store/keys.py for its fields)
-- ARGV[1]  the operation
-- ARGV[2]  transition id, "" for none. redis-py retries a command after a
--          timeout, so a transition may arrive twice: the first reply is
--          kept under "tx:<id>" and returned again instead of re-applying.
-- ARGV[3]  the start generation the caller acts for: a message from a
--          start whose publish failed must not act on a later start.
--
-- Replies are flat arrays of strings: {tag, status, changed_from, ...}.
-- changed_from is the saga status before this call when the call changed
-- it, else "". Scripts have no rollback, so each validates before writing.
-- Nothing here decodes JSON: results and data stay opaque strings.

local K = KEYS[1]
local op = ARGV[1]
local tx = ARGV[2]
local gen = ARGV[3]

if tx ~= '' then
  local prev = redis.call('HGET', K, 'tx:' .. tx)
  if prev then return cjson.decode(prev) end
end

local clock = redis.call('TIME')
local NOW = string.format('%.0f', tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000))

local function hget(f) return redis.call('HGET', K, f) end

local function split(s, sep)
  local out = {}
  if not s or s == '' then return out end
  for piece in string.gmatch(s, '([^' .. sep .. ']+)') do out[#out + 1] = piece end
  return out
end

-- The fields every operation reads, in one call.
local HEAD = redis.call('HMGET', K, 'status', 'gen', 'v', 'stages', 'cstage')

local STAGES = nil
local function stages()
  if not STAGES then
    STAGES = {}
    for _, part in ipairs(split(HEAD[4], ';')) do STAGES[#STAGES + 1] = split(part, ',') end
  end
  return STAGES
end

local function set_status(new)
  local old = hget('status')
  redis.call('HSET', K, 'status', new, 'status_at', NOW)
  return old
end

local function expire_after_retention()
  local ttl = tonumber(hget('retention') or '0')
  if ttl and ttl > 0 then redis.call('PEXPIRE', K, math.floor(ttl * 1000)) end
end

-- A finished saga expires after its retention; a running one never does.
-- FAILED sagas are the dead-letter list: kept until an operator retries or
-- purges them.
local function finish(new)
  local old = set_status(new)
  if new == 'FAILED' then
    redis.call('PERSIST', K)
  else
    expire_after_retention()
  end
  return old
end

local function remember(reply)
  if tx ~= '' then redis.call('HSET', K, 'tx:' .. tx, cjson.encode(reply)) end
  return reply
end

-- Walk the compensation frontier back from the stage that failed.
-- A stage holds back earlier stages until each of its steps has been
-- compensated, has ended without effect, or has had its compensation fail
-- once (a failing compensation keeps retrying, but must not block others).
-- Appends the steps whose compensation must be dispatched now to `out`, and
-- returns the status before the saga ended, or false if it did not end.
local function advance(out)
  local st = stages()
  local c = tonumber(hget('cstage'))
  while c >= 0 do
    local settled = true
    for _, m in ipairs(st[c + 1]) do
      local s = hget('s:' .. m)
      if s == 'RUNNING' or s == 'DISPATCHED' then
        settled = false
      elseif s == 'COMPLETED' or (s == 'FAILED' and hget('cof:' .. m) == '1') then
        if hget('comp:' .. m) then
          local cs = hget('cs:' .. m)
          if not cs then
            redis.call('HSET', K, 'cs:' .. m, 'DISPATCHED')
            redis.call('HINCRBY', K, 'copen', 1)
            out[#out + 1] = m
            settled = false
          elseif cs == 'DISPATCHED' or cs == 'RUNNING' then
            settled = false
          end
        end
      end
    end
    if not settled then break end
    c = c - 1
    redis.call('HSET', K, 'cstage', c)
  end
  if c < 0 and tonumber(hget('copen')) == 0 then
    if tonumber(hget('gaveup')) > 0 then return finish('FAILED') end
    return finish('COMPENSATED')
  end
  return false
end

-- Start rolling back from the current stage after `m` failed.
local function begin_rollback(m, err)
  local old = set_status('COMPENSATING')
  local stage = tonumber(hget('stage'))
  redis.call('HSET', K, 'failed_step', m, 'error', err, 'reason', 'failure', 'cstage', stage)
  -- Siblings still queued never start: fence them now, so that a queued
  -- message cannot hold the rollback back, and cannot run later.
  for _, s in ipairs(stages()[stage + 1]) do
    if hget('s:' .. s) == 'DISPATCHED' then
      redis.call('HSET', K, 's:' .. s, 'CANCELLED', 't1:' .. s, NOW)
    end
  end
  return old
end

local function rollback_reply(tag, changed, out)
  local reply = {tag, hget('status'), changed or ''}
  for _, m in ipairs(out) do reply[#reply + 1] = m end
  return reply
end

-- A copy that finds its step running is another copy of the same message,
-- unless it is a Celery retry (more retries than seen) or the broker
-- redelivered it after its first copy's worker died (ARGV[6] = "1").
-- Only those may run the function again: a plain duplicate must not.
local function busy(seen_field)
  if ARGV[6] == '1' then return false end
  return (tonumber(ARGV[5]) or 0) <= (tonumber(hget(seen_field)) or -1)
end

local status = HEAD[1]

if op == 'start' then
  -- ARGV: 4 name, 5 fingerprint, 6 kwargs, 7 plan, 8 plan digest, 9 stages,
  --       10 retention, 11 settings, 12 on_complete, 13 on_failure,
  --       14 idempotency key, 15 max compensation retries, 16.. field/value pairs
  if status then
    if hget('startfail') == '1' then
      -- A start whose publish failed released its key: start afresh.
      redis.call('DEL', K)
    elseif hget('gen') == gen then
      -- This very start, sent again after its reply was lost: the caller
      -- has not published yet, so answer as the first time.
      return {'created', status, 'NEW', gen}
    elseif hget('fp') == ARGV[5] then
      return {'exists', status, '', hget('gen')}
    else
      return {'conflict', status, ''}
    end
  end
  redis.call('HSET', K, 'v', '1', 'gen', gen, 'name', ARGV[4], 'fp', ARGV[5], 'kwargs', ARGV[6],
    'plan', ARGV[7], 'ph', ARGV[8], 'stages', ARGV[9], 'retention', ARGV[10], 'settings', ARGV[11],
    'cb_ok', ARGV[12], 'cb_fail', ARGV[13], 'key', ARGV[14], 'maxr', ARGV[15],
    'created', NOW, 'status', 'PENDING', 'status_at', NOW, 'stage', '0', 'copen', '0', 'gaveup', '0')
  for i = 16, #ARGV, 2 do redis.call('HSET', K, ARGV[i], ARGV[i + 1]) end
  HEAD[4] = ARGV[9]
  local first = stages()[1]
  for _, m in ipairs(first) do redis.call('HSET', K, 's:' .. m, 'DISPATCHED', 'td:' .. m, NOW) end
  redis.call('HSET', K, 'left', #first)
  return {'created', 'PENDING', 'NEW', gen}
end

if not status then return {'missing', '', ''} end

if op == 'purge' then
  -- Operators may remove any finished saga, even one whose record is damaged.
  if status ~= 'COMPLETED' and status ~= 'COMPENSATED' and status ~= 'FAILED' then
    return {'notallowed', status, ''}
  end
  local name = hget('name') or ''
  redis.call('DEL', K)
  return {'purged', status, '', name}
end

local KNOWN = {PENDING = true, RUNNING = true, COMPENSATING = true, COMPLETED = true, COMPENSATED = true, FAILED = true}
if not KNOWN[status] or HEAD[3] ~= '1' or not HEAD[4] or (not HEAD[5] and status == 'COMPENSATING') then
  return {'corrupt', status, ''}
end
-- Operators act on whatever generation is current ("*").
if gen ~= '*' and HEAD[2] ~= gen then return {'stale', status, ''} end

if op == 'abort' then
  -- ARGV: 4 error, 5.. steps whose message was never published
  if status == 'PENDING' then
    for _, m in ipairs(stages()[1]) do
      redis.call('HSET', K, 's:' .. m, 'CANCELLED', 't1:' .. m, NOW)
    end
    redis.call('HSET', K, 'startfail', '1', 'error', ARGV[4], 'reason', 'publish')
    local changed = finish('FAILED')
    -- Nothing ran, so there is nothing for an operator to retry: expire it.
    expire_after_retention()
    return remember({'aborted', 'FAILED', changed})
  end
  -- A published sibling already began: fail the unpublished ones instead,
  -- so the saga rolls back rather than waiting for them forever.
  local out, changed = {}, false
  for i = 5, #ARGV do
    local m = ARGV[i]
    if hget('s:' .. m) == 'DISPATCHED' then
      redis.call('HSET', K, 's:' .. m, 'FAILED', 'e:' .. m, ARGV[4], 't1:' .. m, NOW)
      if hget('status') == 'RUNNING' then changed = begin_rollback(m, ARGV[4]) end
    end
  end
  if hget('status') == 'COMPENSATING' then
    local fin = advance(out)
    changed = changed or fin
  end
  return remember(rollback_reply('compensate', changed, out))
end

if op == 'begin' then
  -- ARGV: 4 step, 5 Celery retries of this message, 6 "1" if redelivered
  local m = ARGV[4]
  local s = hget('s:' .. m)
  if s == 'DISPATCHED' and status == 'COMPENSATING' then
    -- Defensive: queued steps are fenced when the rollback starts.
    redis.call('HSET', K, 's:' .. m, 'CANCELLED', 't1:' .. m, NOW)
    local out = {}
    return remember(rollback_reply('fenced', advance(out), out))
  end
  if s == 'DISPATCHED' or s == 'RUNNING' then
    if status == 'PENDING' or status == 'RUNNING' or status == 'COMPENSATING' then
      if s == 'RUNNING' and busy('rt:' .. m) then return {'busy', status, ''} end
      local changed = ''
      if status == 'PENDING' then changed = set_status('RUNNING') end
      local n = redis.call('HINCRBY', K, 'a:' .. m, 1)
      redis.call('HSET', K, 's:' .. m, 'RUNNING', 'rt:' .. m, ARGV[5])
      redis.call('HSETNX', K, 't0:' .. m, NOW)
      return remember({'run', hget('status'), changed, tostring(n)})
    end
  end
  if not s then return {'skip', status, ''} end
  -- The outcome is recorded already: a duplicate or a redelivered copy.
  return {'dup', status, '', s}
end

if op == 'done' then
  -- ARGV: 4 step, 5 result (JSON)
  local m = ARGV[4]
  local s = hget('s:' .. m)
  if s ~= 'RUNNING' then return {'dup', status, '', s or ''} end
  redis.call('HSET', K, 's:' .. m, 'COMPLETED', 'r:' .. m, ARGV[5], 't1:' .. m, NOW)
  if status == 'RUNNING' then
    local left = redis.call('HINCRBY', K, 'left', -1)
    if left > 0 then return remember({'wait', status, ''}) end
    -- The last step of the stage to finish dispatches the next stage: the
    -- join lives here, not in a chord, so a lost header task cannot hang it.
    local k = tonumber(hget('stage')) + 1
    local st = stages()
    if k >= #st then
      return remember({'completed', 'COMPLETED', finish('COMPLETED'), hget('cb_ok') or ''})
    end
    redis.call('HSET', K, 'stage', k, 'left', #st[k + 1])
    for _, n in ipairs(st[k + 1]) do redis.call('HSET', K, 's:' .. n, 'DISPATCHED', 'td:' .. n, NOW) end
    -- Data is never stored: the caller folds the start kwargs with the
    -- results of every finished stage, in declaration order.
    local reply = {'next', status, '', hget('ph'), tostring(k), hget('kwargs')}
    for j = 1, k do
      for _, n in ipairs(st[j]) do reply[#reply + 1] = hget('r:' .. n) end
    end
    return remember(reply)
  end
  if status == 'COMPENSATING' then
    -- A sibling that was still running when another failed: undo it now.
    local out = {}
    return remember(rollback_reply('compensate', advance(out), out))
  end
  return remember({'late', status, ''})
end

if op == 'fail' then
  -- ARGV: 4 step, 5 error
  local m = ARGV[4]
  local s = hget('s:' .. m)
  if s ~= 'RUNNING' and s ~= 'DISPATCHED' then return {'dup', status, '', s or ''} end
  redis.call('HSET', K, 's:' .. m, 'FAILED', 'e:' .. m, ARGV[5], 't1:' .. m, NOW)
  local out = {}
  if status == 'PENDING' or status == 'RUNNING' then
    local changed = begin_rollback(m, ARGV[5])
    advance(out)
    return remember(rollback_reply('compensate', changed, out))
  end
  if status == 'COMPENSATING' then
    return remember(rollback_reply('compensate', advance(out), out))
  end
  return remember({'late', status, ''})
end

if op == 'cbegin' then
  -- ARGV: 4 step, 5 Celery retries of this message, 6 "1" if redelivered
  local m = ARGV[4]
  local cs = hget('cs:' .. m)
  if cs == 'DISPATCHED' or cs == 'RUNNING' or cs == 'RETRYING' then
    if cs == 'RUNNING' and busy('crt:' .. m) then return {'busy', status, ''} end
    local n = redis.call('HINCRBY', K, 'ca:' .. m, 1)
    redis.call('HSET', K, 'cs:' .. m, 'RUNNING', 'crt:' .. m, ARGV[5])
    redis.call('HSETNX', K, 'ct0:' .. m, NOW)
    return remember({'run', status, '', tostring(n)})
  end
  if not cs then return {'skip', status, ''} end
  return {'dup', status, '', cs}
end

if op == 'cdone' then
  -- ARGV: 4 step
  local m = ARGV[4]
  local cs = hget('cs:' .. m)
  if cs ~= 'RUNNING' then return {'dup', status, '', cs or ''} end
  redis.call('HSET', K, 'cs:' .. m, 'COMPENSATED', 'ct1:' .. m, NOW)
  redis.call('HINCRBY', K, 'copen', -1)
  local out = {}
  return remember(rollback_reply('compensate', advance(out), out))
end

if op == 'cfail' then
  -- ARGV: 4 step, 5 error
  local m = ARGV[4]
  local cs = hget('cs:' .. m)
  if cs ~= 'RUNNING' then return {'dup', status, '', cs or ''} end
  redis.call('HSET', K, 'ce:' .. m, ARGV[5])
  local n = tonumber(hget('ca:' .. m))
  local maxr = hget('maxr')
  local out = {}
  -- An operator retry gives each compensation a fresh budget from cb0:<step>.
  if maxr and maxr ~= '' and n - (tonumber(hget('cb0:' .. m)) or 0) > tonumber(maxr) then
    redis.call('HSET', K, 'cs:' .. m, 'GAVE_UP', 'ct1:' .. m, NOW)
    redis.call('HINCRBY', K, 'copen', -1)
    redis.call('HINCRBY', K, 'gaveup', 1)
    return remember(rollback_reply('gaveup', advance(out), out))
  end
  redis.call('HSET', K, 'cs:' .. m, 'RETRYING')
  local changed = advance(out)
  local reply = {'retry', hget('status'), changed or '', tostring(n)}
  for _, d in ipairs(out) do reply[#reply + 1] = d end
  return remember(reply)
end

if op == 'retry' then
  -- An operator re-drives the compensations that gave up in a FAILED saga.
  if status ~= 'FAILED' or (tonumber(hget('gaveup')) or 0) == 0 then return {'notallowed', status, ''} end
  local out = {}
  for _, members in ipairs(stages()) do
    for _, m in ipairs(members) do
      if hget('cs:' .. m) == 'GAVE_UP' then
        redis.call('HSET', K, 'cs:' .. m, 'DISPATCHED', 'cb0:' .. m, hget('ca:' .. m) or '0')
        redis.call('HDEL', K, 'ct1:' .. m)
        out[#out + 1] = m
      end
    end
  end
  redis.call('HSET', K, 'gaveup', '0')
  redis.call('HINCRBY', K, 'copen', #out)
  redis.call('HINCRBY', K, 'rr', 1)
  redis.call('HDEL', K, 'cbs')
  local changed = set_status('COMPENSATING')
  redis.call('PERSIST', K)
  return remember(rollback_reply('compensate', changed, out))
end

if op == 'cbsent' then
  redis.call('HSET', K, 'cbs', '1')
  return {'ok', status, ''}
end

return redis.error_reply('celery_saga: unknown operation ' .. tostring(op))
