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
-- Times are milliseconds of the store clock (Redis TIME), so every deadline
-- is measured on one clock whichever process sets or checks it.
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

local function num(x) return tonumber(x) end

-- Compensation fields of round r: round 1 is the rollback ("cs:<step>"),
-- round 2 re-compensates a late success with its real result ("cs2:<step>").
local function cf(f, m, r)
  if r == '2' then return f .. '2:' .. m end
  return f .. ':' .. m
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

local function each_step(fn)
  for _, members in ipairs(stages()) do
    for _, m in ipairs(members) do fn(m) end
  end
end

local function set_status(new)
  local old = hget('status')
  redis.call('HSET', K, 'status', new, 'status_at', NOW)
  return old
end

local function expire_after_retention()
  local ttl = num(hget('retention') or '0')
  if ttl and ttl > 0 then redis.call('PEXPIRE', K, math.floor(ttl * 1000)) end
end

local function remember(reply)
  if tx ~= '' then redis.call('HSET', K, 'tx:' .. tx, cjson.encode(reply)) end
  return reply
end

-- -- deadlines ------------------------------------------------------------
--
-- A step's deadline runs from the transition that dispatches it to its
-- recorded outcome ("dl:<step>" = dispatch time + "to:<step>"), so it covers
-- a message nobody consumes and the step's own Celery retries. Each
-- compensation attempt has one too ("cdl:<step>"), counted from the moment
-- it may start (after its retry countdown).

local function dispatch_step(m)
  redis.call('HSET', K, 's:' .. m, 'DISPATCHED', 'td:' .. m, NOW)
  local to = num(hget('to:' .. m))
  if to then redis.call('HSET', K, 'dl:' .. m, NOW + to) end
end

local function dispatch_compensation(m, r, delay_ms)
  redis.call('HSET', K, cf('cs', m, r), 'DISPATCHED')
  local to = num(hget('to:' .. m))
  if to then
    redis.call('HSET', K, cf('cdl', m, r), NOW + delay_ms + to)
  else
    redis.call('HDEL', K, cf('cdl', m, r))
  end
end

-- The longest retry countdown before compensation attempt n+1 (the worker
-- draws its delay at or below it), so the attempt's deadline covers it.
local function max_backoff_ms(n)
  local ok, settings = pcall(cjson.decode, hget('settings') or '{}')
  if not ok or type(settings) ~= 'table' then settings = {} end
  local base = num(settings['compensation_retry_backoff']) or 1
  local cap = num(settings['compensation_retry_backoff_max']) or 600
  return math.floor(math.min(cap, base * 2 ^ math.max(n - 1, 0)) * 1000)
end

local IN_FLIGHT = {DISPATCHED = true, RUNNING = true, RETRYING = true, WAITING = true}

-- Whether step m may still get a deadline it does not have yet: a forward
-- dispatch, a compensation attempt, or a second round after a late success.
local function may_get_deadline(m, st)
  local s = hget('s:' .. m)
  if (st == 'PENDING' or st == 'RUNNING') and not s then return true end
  if not hget('comp:' .. m) then return false end
  local cs = hget('cs:' .. m)
  if IN_FLIGHT[cs] or IN_FLIGHT[hget('cs2:' .. m)] then return true end
  if not cs and (st == 'PENDING' or st == 'RUNNING' or st == 'COMPENSATING') then return true end
  return s == 'UNKNOWN' and not hget('ls:' .. m)
end

-- The earliest deadline of the record, or '' for none. While a step may
-- still get a deadline (see may_get_deadline), it is at most NOW plus the
-- shortest timeout of such steps: anything dispatched later has a deadline
-- at least that far away. So the sweeper's index entry, rescored with this
-- value, never wakes after a deadline that did not exist when it was scored,
-- and transitions that dispatch need not register anything.
local function next_deadline()
  local best = nil
  local function consider(x)
    x = num(x)
    if x and (not best or x < best) then best = x end
  end
  local st = hget('status')
  if st == 'PENDING' or st == 'RUNNING' then consider(hget('sdl')) end
  local shortest = nil
  each_step(function(m)
    local s = hget('s:' .. m)
    if s == 'DISPATCHED' or s == 'RUNNING' then consider(hget('dl:' .. m)) end
    for _, r in ipairs({'1', '2'}) do
      local cs = hget(cf('cs', m, r))
      if cs == 'DISPATCHED' or cs == 'RUNNING' or cs == 'RETRYING' then consider(hget(cf('cdl', m, r))) end
    end
    local to = num(hget('to:' .. m))
    if to and (not shortest or to < shortest) and may_get_deadline(m, st) then shortest = to end
  end)
  if shortest then consider(NOW + shortest) end
  if best then return string.format('%.0f', best) end
  return ''
end

-- -- ending a saga ----------------------------------------------------------

-- Second-round compensations wait for the first round to end.
local function dispatch_waiting_rounds(out)
  each_step(function(m)
    if hget('cs2:' .. m) == 'WAITING' then
      dispatch_compensation(m, '2', 0)
      out[#out + 1] = m .. ':2'
    end
  end)
end

-- A finished saga expires after its retention; a running one never does.
-- FAILED sagas are the dead-letter list: kept until an operator retries or
-- purges them.
local function finish(new, out)
  local old = set_status(new)
  if new == 'FAILED' then
    redis.call('PERSIST', K)
  else
    expire_after_retention()
  end
  if out then dispatch_waiting_rounds(out) end
  return old
end

-- Walk the compensation frontier back from the stage that failed.
-- A stage holds back earlier stages until each of its steps has been
-- compensated, has ended without effect, or has had its compensation fail
-- once (a failing compensation keeps retrying, but must not block others).
-- A step whose outcome is unknown (UNKNOWN) may have had its effect, so it
-- is compensated blind, with no result.
-- Appends the steps whose compensation must be dispatched now to `out`, and
-- returns the status before the saga ended, or false if it did not end.
local function advance(out)
  local st = stages()
  local c = num(hget('cstage'))
  while c >= 0 do
    local settled = true
    for _, m in ipairs(st[c + 1]) do
      local s = hget('s:' .. m)
      if s == 'RUNNING' or s == 'DISPATCHED' then
        settled = false
      elseif s == 'COMPLETED' or s == 'UNKNOWN' or (s == 'FAILED' and hget('cof:' .. m) == '1') then
        if hget('comp:' .. m) then
          local cs = hget('cs:' .. m)
          if not cs then
            dispatch_compensation(m, '1', 0)
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
  if c < 0 and num(hget('copen')) == 0 then
    if num(hget('gaveup')) > 0 then return finish('FAILED', out) end
    return finish('COMPENSATED', out)
  end
  return false
end

-- Move the rollback on if the saga is rolling back. `changed` is the status
-- this call found the saga in, if an earlier part of it changed it; that
-- one, not COMPENSATING, is what the caller reports.
local function settle(out, changed)
  if hget('status') ~= 'COMPENSATING' then return changed end
  local fin = advance(out)
  return changed or fin
end

-- Stop waiting for forward step m: a queued one is fenced (it will never
-- run), a started one has an unknown outcome. `why` is timeout, cancelled,
-- lost or failure. Returns the step's new status, or nil if it was not in flight.
local function stop_waiting(m, why, err)
  local s = hget('s:' .. m)
  if s == 'DISPATCHED' then
    redis.call('HSET', K, 's:' .. m, 'CANCELLED', 't1:' .. m, NOW, 'w:' .. m, why)
    return 'CANCELLED'
  end
  if s == 'RUNNING' then
    redis.call('HSET', K, 's:' .. m, 'UNKNOWN', 't1:' .. m, NOW, 'w:' .. m, why)
    if err then redis.call('HSET', K, 'e:' .. m, err) end
    return 'UNKNOWN'
  end
  return nil
end

-- Start rolling back from the current stage because of step m.
local function begin_rollback(m, err, reason)
  local old = set_status('COMPENSATING')
  local stage = num(hget('stage'))
  redis.call('HSET', K, 'failed_step', m, 'error', err, 'reason', reason, 'cstage', stage)
  -- Siblings still queued never start: fence them now, so that a queued
  -- message cannot hold the rollback back, and cannot run later.
  for _, s in ipairs(stages()[stage + 1]) do
    if hget('s:' .. s) == 'DISPATCHED' then stop_waiting(s, reason) end
  end
  return old
end

-- A saga timeout or a cancel: stop waiting for everything in flight.
local function halt(reason, err)
  local stage = num(hget('stage'))
  local concerned = nil
  for _, m in ipairs(stages()[stage + 1]) do
    local s = hget('s:' .. m)
    if s == 'RUNNING' or (s == 'DISPATCHED' and not concerned) then concerned = m end
  end
  for _, m in ipairs(stages()[stage + 1]) do stop_waiting(m, reason) end
  return begin_rollback(concerned or '', err, reason)
end

-- Milliseconds as seconds for messages: "300", "0.5".
local function secs(ms)
  local text = string.format('%.3f', (num(ms) or 0) / 1000)
  text = string.gsub(string.gsub(text, '0+$', ''), '%.$', '')
  return text .. 's'
end

local function timeout_text(m)
  return 'timeout: step ' .. m .. ' had no outcome ' .. secs(hget('to:' .. m)) .. ' after it was dispatched'
end

local function saga_timeout_text()
  return 'timeout: the saga did not finish within ' .. secs(hget('sto'))
end

-- Step m missed its deadline: fence or stop waiting for it, and roll back.
-- Returns the status the saga had before, when it changed.
local function time_out_step(m)
  local err = timeout_text(m)
  local st = hget('status')
  stop_waiting(m, 'timeout', err)
  if st == 'PENDING' or st == 'RUNNING' then return begin_rollback(m, err, 'timeout') end
  return false
end

-- A compensation attempt failed (or missed its deadline): retry it with
-- backoff, or give up after the saga's max retries. Returns 'retry' or
-- 'gaveup', and the attempts so far.
local function compensation_failed(m, r, err)
  redis.call('HSET', K, cf('ce', m, r), err)
  local n = num(hget(cf('ca', m, r))) or 0
  local maxr = hget('maxr')
  -- An operator retry gives each compensation a fresh budget from cb0:<step>.
  if maxr and maxr ~= '' and n - (num(hget(cf('cb0', m, r))) or 0) > num(maxr) then
    redis.call('HSET', K, cf('cs', m, r), 'GAVE_UP', cf('ct1', m, r), NOW)
    if r == '1' then
      redis.call('HINCRBY', K, 'copen', -1)
      redis.call('HINCRBY', K, 'gaveup', 1)
    end
    return 'gaveup', n
  end
  redis.call('HSET', K, cf('cs', m, r), 'RETRYING')
  local to = num(hget('to:' .. m))
  if to then redis.call('HSET', K, cf('cdl', m, r), NOW + max_backoff_ms(n) + to) end
  return 'retry', n
end

-- Act on every deadline that has passed. Appends to `out` what must be
-- published: "<step>" / "<step>:2" for a compensation to send now,
-- "<step>@<n>" / "<step>:2@<n>" for one to send again after the backoff of
-- attempt n, and "<step>!<n>" / "<step>:2!<n>" for one that gave up after
-- attempt n (nothing to send; it is announced). Returns the saga status
-- before, when it changed, else false.
local function apply_deadlines(out)
  local changed = false
  local st = hget('status')
  if st == 'PENDING' or st == 'RUNNING' then
    local sdl = num(hget('sdl'))
    if sdl and num(NOW) >= sdl then
      changed = halt('timeout', saga_timeout_text())
    end
  end
  each_step(function(m)
    local s = hget('s:' .. m)
    local dl = num(hget('dl:' .. m))
    if (s == 'DISPATCHED' or s == 'RUNNING') and dl and num(NOW) >= dl then
      local c = time_out_step(m)
      changed = changed or c
    end
  end)
  each_step(function(m)
    for _, r in ipairs({'1', '2'}) do
      local cs = hget(cf('cs', m, r))
      local cdl = num(hget(cf('cdl', m, r)))
      if (cs == 'DISPATCHED' or cs == 'RUNNING' or cs == 'RETRYING') and cdl and num(NOW) >= cdl then
        -- A missed deadline counts as a failed attempt, also when the
        -- attempt never began (its message was lost).
        if cs ~= 'RUNNING' then redis.call('HINCRBY', K, cf('ca', m, r), 1) end
        local verdict, n = compensation_failed(m, r,
          'timeout: compensation attempt had no outcome ' .. secs(hget('to:' .. m)) .. ' after it was due')
        local ref = m
        if r == '2' then ref = m .. ':2' end
        if verdict == 'retry' then
          out[#out + 1] = ref .. '@' .. n
        else
          out[#out + 1] = ref .. '!' .. n
        end
      end
    end
  end)
  changed = settle(out, changed)
  return changed
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
  return (num(ARGV[5]) or 0) <= (num(hget(seen_field)) or -1)
end

local status = HEAD[1]

if op == 'start' then
  -- ARGV: 4 name, 5 fingerprint, 6 kwargs, 7 plan, 8 plan digest, 9 stages,
  --       10 retention, 11 settings, 12 on_complete, 13 on_failure,
  --       14 idempotency key, 15 max compensation retries,
  --       16 saga timeout (ms, "" for none), 17.. field/value pairs
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
  if ARGV[16] ~= '' then redis.call('HSET', K, 'sto', ARGV[16], 'sdl', NOW + num(ARGV[16])) end
  for i = 17, #ARGV, 2 do redis.call('HSET', K, ARGV[i], ARGV[i + 1]) end
  HEAD[4] = ARGV[9]
  local first = stages()[1]
  for _, m in ipairs(first) do dispatch_step(m) end
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
-- Operators and sweepers act on whatever generation is current ("*").
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
      if hget('status') == 'RUNNING' then changed = begin_rollback(m, ARGV[4], 'failure') end
    end
  end
  changed = settle(out, changed)
  return remember(rollback_reply('compensate', changed, out))
end

if op == 'begin' then
  -- ARGV: 4 step, 5 Celery retries of this message, 6 "1" if redelivered
  local m = ARGV[4]
  local s = hget('s:' .. m)
  local out, changed = {}, false
  -- Whether the function may run is decided here, atomically with marking
  -- it running: a copy that arrives after its deadline, after the saga's
  -- deadline, or after the step was fenced never runs.
  if s == 'DISPATCHED' or s == 'RUNNING' then
    local dl, sdl = num(hget('dl:' .. m)), num(hget('sdl'))
    if status == 'COMPENSATING' and s == 'DISPATCHED' then
      -- Defensive: queued steps are fenced when the rollback starts.
      stop_waiting(m, hget('reason') or 'failure')
      changed = advance(out)
    elseif (status == 'PENDING' or status == 'RUNNING') and sdl and num(NOW) >= sdl then
      changed = halt('timeout', saga_timeout_text())
      advance(out)
    elseif dl and num(NOW) >= dl then
      changed = settle(out, time_out_step(m))
    end
    s = hget('s:' .. m)
  end
  if s == 'CANCELLED' or s == 'UNKNOWN' then
    -- Fenced, or compensated blind: this copy runs nothing and, unlike a
    -- duplicate of a finished step, re-drives nothing.
    return remember(rollback_reply('fenced', changed, out))
  end
  if s == 'DISPATCHED' or s == 'RUNNING' then
    if status == 'PENDING' or status == 'RUNNING' or status == 'COMPENSATING' then
      if s == 'RUNNING' and busy('rt:' .. m) then return {'busy', status, ''} end
      if status == 'PENDING' then changed = set_status('RUNNING') end
      local n = redis.call('HINCRBY', K, 'a:' .. m, 1)
      redis.call('HSET', K, 's:' .. m, 'RUNNING', 'rt:' .. m, ARGV[5])
      redis.call('HSETNX', K, 't0:' .. m, NOW)
      return remember({'run', hget('status'), changed or '', tostring(n)})
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
  if s == 'UNKNOWN' and not hget('ls:' .. m) then
    -- A late success: the step was compensated blind (or is being), so its
    -- effect may be left. Compensate it again with its real result, in a
    -- second round once the first has ended. The saga status stays.
    redis.call('HSET', K, 'ls:' .. m, 'COMPLETED', 'lr:' .. m, ARGV[5], 'lt:' .. m, NOW)
    local out = {}
    if hget('comp:' .. m) and not hget('cs2:' .. m) then
      if status == 'COMPENSATED' or status == 'FAILED' then
        dispatch_compensation(m, '2', 0)
        out[#out + 1] = m .. ':2'
      else
        redis.call('HSET', K, 'cs2:' .. m, 'WAITING')
      end
    end
    return remember(rollback_reply('late', false, out))
  end
  if s ~= 'RUNNING' then return {'dup', status, '', s or ''} end
  redis.call('HSET', K, 's:' .. m, 'COMPLETED', 'r:' .. m, ARGV[5], 't1:' .. m, NOW)
  if status == 'RUNNING' then
    local left = redis.call('HINCRBY', K, 'left', -1)
    if left > 0 then return remember({'wait', status, ''}) end
    -- The last step of the stage to finish dispatches the next stage: the
    -- join lives here, not in a chord, so a lost header task cannot hang it.
    local k = num(hget('stage')) + 1
    local st = stages()
    if k >= #st then
      return remember({'completed', 'COMPLETED', finish('COMPLETED'), hget('cb_ok') or ''})
    end
    redis.call('HSET', K, 'stage', k, 'left', #st[k + 1])
    for _, n in ipairs(st[k + 1]) do dispatch_step(n) end
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

if op == 'fail' or op == 'lost' then
  -- ARGV: 4 step, 5 error; for lost: 6 why ("timeout" for a hard time limit,
  -- "lost" for a lost worker). A lost outcome is unknown: the step may have
  -- had its effect, so it is compensated blind.
  local m = ARGV[4]
  local s = hget('s:' .. m)
  if s == 'UNKNOWN' and not hget('ls:' .. m) then
    -- A late failure changes nothing but the record.
    redis.call('HSET', K, 'ls:' .. m, 'FAILED', 'le:' .. m, ARGV[5], 'lt:' .. m, NOW)
    return remember({'late', status, ''})
  end
  if s ~= 'RUNNING' and s ~= 'DISPATCHED' then return {'dup', status, '', s or ''} end
  local reason = 'failure'
  if op == 'lost' then
    stop_waiting(m, ARGV[6], ARGV[5])
    if ARGV[6] == 'timeout' then reason = 'timeout' end
  else
    redis.call('HSET', K, 's:' .. m, 'FAILED', 'e:' .. m, ARGV[5], 't1:' .. m, NOW)
  end
  local out = {}
  if status == 'PENDING' or status == 'RUNNING' then
    local changed = begin_rollback(m, ARGV[5], reason)
    advance(out)
    return remember(rollback_reply('compensate', changed, out))
  end
  if status == 'COMPENSATING' then
    return remember(rollback_reply('compensate', advance(out), out))
  end
  return remember({'late', status, ''})
end

if op == 'expire' then
  -- ARGV: 4 step. Its message expired (expires = its deadline) before any
  -- copy began: a timeout of a step that never started, not a failure.
  local m = ARGV[4]
  if hget('s:' .. m) ~= 'DISPATCHED' then return {'dup', status, '', hget('s:' .. m) or ''} end
  -- Celery expired it by the worker's clock; the store's clock decides. If
  -- the deadline is not due yet, the message is gone anyway and the sweeper
  -- fences the step at its deadline.
  local dl = num(hget('dl:' .. m))
  if not dl or num(NOW) < dl then return {'early', status, ''} end
  local out = {}
  local changed = settle(out, time_out_step(m))
  return remember(rollback_reply('compensate', changed, out))
end

if op == 'sweep' then
  -- Act on every deadline due by the store clock. Reply:
  -- {'swept', status, changed, next deadline ('' = none), name, to publish ...}
  local out = {}
  local changed = apply_deadlines(out)
  local reply = {'swept', hget('status'), changed or '', next_deadline(), hget('name') or ''}
  for _, x in ipairs(out) do reply[#reply + 1] = x end
  -- Most sweeps find nothing due: keep no reply for those (nothing to redo).
  if not changed and #out == 0 then return reply end
  return remember(reply)
end

if op == 'cancel' then
  -- ARGV: 4 error. Like a saga timeout, on demand.
  if status == 'COMPLETED' or status == 'COMPENSATED' or status == 'FAILED' then
    return {'finished', status, ''}
  end
  local out, changed = {}, false
  if status == 'COMPENSATING' then
    each_step(function(m) stop_waiting(m, 'cancelled') end)
  else
    changed = halt('cancelled', ARGV[4])
  end
  changed = settle(out, changed)
  return remember(rollback_reply('compensate', changed, out))
end

if op == 'cbegin' then
  -- ARGV: 4 step, 5 Celery retries of this message, 6 "1" if redelivered, 7 round
  local m, r = ARGV[4], ARGV[7]
  local cs = hget(cf('cs', m, r))
  if cs == 'DISPATCHED' or cs == 'RUNNING' or cs == 'RETRYING' then
    if cs == 'RUNNING' and busy(cf('crt', m, r)) then return {'busy', status, ''} end
    local n = redis.call('HINCRBY', K, cf('ca', m, r), 1)
    redis.call('HSET', K, cf('cs', m, r), 'RUNNING', cf('crt', m, r), ARGV[5])
    redis.call('HSETNX', K, cf('ct0', m, r), NOW)
    return remember({'run', status, '', tostring(n)})
  end
  if not cs then return {'skip', status, ''} end
  return {'dup', status, '', cs}
end

if op == 'cdone' then
  -- ARGV: 4 step, 5 round
  local m, r = ARGV[4], ARGV[5]
  local cs = hget(cf('cs', m, r))
  if cs ~= 'RUNNING' and cs ~= 'RETRYING' then return {'dup', status, '', cs or ''} end
  redis.call('HSET', K, cf('cs', m, r), 'COMPENSATED', cf('ct1', m, r), NOW)
  if r == '2' then return remember({'done', status, ''}) end
  redis.call('HINCRBY', K, 'copen', -1)
  local out = {}
  return remember(rollback_reply('compensate', advance(out), out))
end

if op == 'cfail' then
  -- ARGV: 4 step, 5 error, 6 round
  local m, r = ARGV[4], ARGV[6]
  local cs = hget(cf('cs', m, r))
  if cs ~= 'RUNNING' then return {'dup', status, '', cs or ''} end
  local verdict, n = compensation_failed(m, r, ARGV[5])
  local out = {}
  local changed = false
  if r == '1' then changed = advance(out) end
  if verdict == 'gaveup' then return remember(rollback_reply('gaveup', changed, out)) end
  local reply = {'retry', hget('status'), changed or '', tostring(n)}
  for _, d in ipairs(out) do reply[#reply + 1] = d end
  return remember(reply)
end

if op == 'retry' then
  -- An operator re-drives the compensations that gave up in a FAILED saga.
  if status ~= 'FAILED' or (num(hget('gaveup')) or 0) == 0 then return {'notallowed', status, ''} end
  local out = {}
  each_step(function(m)
    if hget('cs:' .. m) == 'GAVE_UP' then
      dispatch_compensation(m, '1', 0)
      redis.call('HSET', K, 'cb0:' .. m, hget('ca:' .. m) or '0')
      redis.call('HDEL', K, 'ct1:' .. m)
      out[#out + 1] = m
    end
  end)
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
