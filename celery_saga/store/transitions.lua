--[[ celery_saga: every state transition of a saga, run atomically inside Redis.

CALLING CONVENTION
  KEYS[1]   the saga record, a hash; its fields are listed in store/keys.py
  KEYS[2]   on one server only: the saga's index shard, "<prefix>:{s<n>}":
            its indexes (see move_index) and its /metrics counters (count)
  KEYS[3]   start, on one server only: the key of the saga's definition
  ARGV[1]   the op (store/protocol.py: Op)
  ARGV[2]   transition id, "" for none. redis-py retries a command after a
            timeout, so a transition may arrive twice: the first reply is
            kept in the slot of its op and step for saga_dedup_window and
            returned again instead of re-applying (see "de-duplication").
            An id starting with "!" (a store that WAITs for replicas) also
            writes that reply again, so that the WAIT after the call covers
            the first write, which may not have reached a replica yet.
  ARGV[3]   the start generation the caller acts for ("*": whatever is
            current, for operators and sweepers). A message from a start
            whose publish failed must not act on a later start.
  ARGV[4..] the op's own arguments, listed at each op below. start and done
            may carry the messages of the stage they dispatch after them
            (see "messages in the transition").

  Times are milliseconds of the store clock (Redis TIME), so every deadline
  is measured on one clock whichever process sets or checks it. Scripts have
  no rollback: each op validates before it writes. Nothing here decodes saga
  data: kwargs and results stay opaque JSON text.

REPLY: one JSON object (store/protocol.py: Transition.from_reply)
  outcome        what happened (store/protocol.py: Outcome)
  status         the saga status after the call; "" if there is no record
  from           the status before, present only when this call changed it
  due            compensations to publish: {step, round, attempt, delay, gave_up}
                 (attempt 0: send now; else attempt n failed and the next is
                 sent after `delay` seconds, or not at all once it gave_up)
  attempt        run: the attempt that begins; backoff/gave_up: the one that failed
  stage, plan_digest, data   next_stage: the stage to publish and its data
                 ([start kwargs, results of earlier stages ...], folded by the caller)
  enq            created, next_stage: true if the call pushed the stage's messages
                 itself; the caller publishes nothing then
  pt             run, when asked for: the data of the step's stage as JSON text
  callback       completed: the on_complete signature (JSON) or ""; swept: the end
                 callback of a finished saga nobody marked sent (send it)
  next_deadline  swept: the record's next deadline (ms) or ""
  heartbeat_timeout  heartbeat, recorded: the step's heartbeat timeout (ms), absent if none
  step_status    duplicate (of a forward step): what the record has
  name, gen      ops called with generation "*": the record's
  waiting        created, exists: the saga waits for its locks; nothing is dispatched
  admitted       waiting sagas this call let start (locks.lua): publish their first stage
  later          a cluster: the lock calls left to the caller (locks.lua): release
                 (resources to give back), relook (a sweep), kept (a FAILED saga
                 keeps its locks)
  lock, holder   locked: the resource refused and the saga holding (or first waiting for) it

OPS, in lifecycle order
  op             caller                           acts when (saga; step)            replies
  start          Saga.apply_async                 no record, or a failed start      created | exists | conflict |
                                                                                    locked | relock (locks.lua)
  abort          Saga.apply_async, publish failed PENDING; or a stage-0 sibling ran rollback | aborted
  begin          step wrapper, before the call    step DISPATCHED, RUNNING          run | busy | fenced | duplicate | not_dispatched
  done           step wrapper, after a return     step RUNNING, DISPATCHED (a lost  wait | next_stage | completed | rollback | late | duplicate
                                                  begin); UNKNOWN, CANCELLED: late
  fail           wrapper; main process (revoked)  step RUNNING, DISPATCHED          rollback | resend | late | duplicate
  lost           wrapper (time limit); main proc. step RUNNING, DISPATCHED          rollback | resend | late | duplicate
                 (lost worker, hard time limit);  (with a worker token: RUNNING
                 sweeper (a worker that stopped   on that worker only)
                 writing its liveness)
  heartbeat      current_step().heartbeat()       step RUNNING, that attempt         recorded | duplicate
  expire         main process (expired message)   step DISPATCHED, deadline due     rollback | resend | early | duplicate
  sweep          sweeper                          any unfinished deadline           swept
  cancel         SagaResult.cancel                PENDING, RUNNING, COMPENSATING    rollback | finished | not_allowed
                                                  (not past the pivot)
  comp_begin     wrapper, before a compensation   compensation DISPATCHED, RUNNING, RETRYING
                                                                                    run | busy | duplicate | not_dispatched
  comp_done      wrapper, after it returned       compensation RUNNING, RETRYING,   rollback | recorded | duplicate
                                                  DISPATCHED (a lost comp_begin)
  comp_fail      wrapper; main process (lost);    compensation RUNNING, DISPATCHED  backoff | gave_up | duplicate
                 sweeper (lost worker)            (with a worker token: RUNNING on that worker only)
  signal         SagaResult.signal (outside)      a wait for the event, not over    recorded | wait | next_stage | completed |
                                                  (kept if not reached yet)         rollback | duplicate | finished | not_allowed
  unwind         a parent's undo of this child    any                               rollback | finished
  callback_sent  whoever sent on_complete/on_failure   a finished saga              recorded
  retry          retry_saga (operator)            FAILED, a compensation or a step  rollback | resend | not_allowed
                                                  past the pivot gave up
  rerun          rerun_saga (operator), on the    COMPENSATED, FAILED               recorded | exists | not_allowed
                 saga it re-runs: links the new id
  unlock         unlock_saga (operator)           FAILED, holding its locks         recorded | duplicate | not_allowed
  admit          a cluster's lock caller          PENDING, waiting for its locks    recorded | duplicate | not_allowed
  purge          purge_saga (operator)            COMPLETED, COMPENSATED, FAILED    purged | not_allowed
  resend: a step past the pivot (or the pivot, its outcome lost) is sent
  again (its due entry has forward = true), or gave up (the saga is FAILED,
  reason "forward"); see "the point of no return".
  Every op but start replies missing without a record; every op but start and
  purge replies corrupt for a record it cannot read and stale for a message
  of another generation; begin and comp_begin reply rejected for a message
  checked against another plan than the record's.

THE SAGA
                  start          a first-stage step begins
     (none) ────────────► PENDING ──────────────────► RUNNING ── last stage done ──► COMPLETED
                             │ │                         │
         abort: publish failed │ └──── a step fails, times out, its worker is lost; the
                             │            saga times out or is cancelled ─────┐
                             ▼                                                ▼
                          FAILED ◄── a compensation gave up ── COMPENSATING ──┘
                             │                                   │  ▲
                             │ retry (operator) ─────────────────┼──┘
                             │                                   ▼ every compensation ended
                             └ (kept until purged)           COMPENSATED

A STEP (s:<step>; none = WAITING: its stage was not dispatched yet)
     WAITING ── stage dispatched ──► DISPATCHED ── begin ──► RUNNING ── done ──► COMPLETED
                                        │                      │ ├──── fail ──► FAILED
       fenced: a sibling failed, the    │                      │ └ deadline, cancel, lost worker,
       deadline passed or a cancel ─────┤                      │   time limit ──► UNKNOWN
                                        ▼                      │        (compensated blind;
                                     CANCELLED (never runs)    │         a late outcome is kept
                                                               ▼         in ls:/lr:/le:)

A COMPENSATION (cs:<step>; cs2:<step> for round 2, a late success)
     (none) ── rollback reaches it ──► DISPATCHED ── comp_begin ──► RUNNING ── comp_done ──► COMPENSATED
                                          ▲                            │
                  retry (operator) ───────┤                comp_fail, or its deadline
                                          │                            ▼
                                       GAVE_UP ◄── out of retries ── RETRYING ── comp_begin ──► RUNNING
     round 2: WAITING ── the first round ends ──► DISPATCHED ── ...

Moving a rollback on is always settle(): it walks the compensation
frontier back (advance) whenever the saga is COMPENSATING.
]]

-- Per-call state. Loaded as a Redis function library (Redis 7+), this file
-- runs once and every call is transition(keys, args), which sets all of it
-- afresh; run by EVALSHA (older servers), it runs whole for each call.
local KS, AV            -- the call's keys and args (KEYS, ARGV above)
local K, op, tx, gen    -- the record; the op, transition id, generation
local SAGA_ID           -- the saga id, K's hash tag
local NOW               -- store clock, ms (text)
local HEAD              -- the head fields (HEAD_FIELDS)
local status, live      -- the saga status when the call began; now
local STAGES            -- stages(), parsed once per call
local CALLBACK_GRACE_MS -- sweep: see pending_callback
local SHARD             -- one server: the saga's index shard (see move_index)
local expanded, ending, purged_name, unindexed  -- see expand, finish, OPS.purge, OPS.abort
local slot              -- this call's reply slot, a function (see de-duplication)
local ENQ               -- start, done: the messages they carry (see take_enqueue)
local ADMITTED          -- the waiters this call let start (locks.lua), for the reply
local LATER            -- a cluster: the lock calls left to the caller (locks.lua), for the reply
-- Defined in locks.lua (semantic locks and running limits), called here:
local lock_check, lock_enter, release_locks, lock_sweep, lock_deadline, retake_slots

local function hget(f) return redis.call('HGET', K, f) end

-- HMGET of any number of fields (unpack has a limit: 200 at a time); false for a missing one.
local function hmget(names)
  local values = {}
  for i = 1, #names, 200 do
    local got = redis.call('HMGET', K, unpack(names, i, math.min(i + 199, #names)))
    for j = 1, #got do values[i + j - 1] = got[j] end
  end
  return values
end

local function num(x) return tonumber(x) end

-- The counters of /metrics (the shard's "metrics" hash, store/keys.py): kept
-- in the transition itself, so they are exact whichever process reads them.
-- A cluster has no shard key in the call (SHARD nil) and keeps none.
local function count(field, by)
  if SHARD then redis.call('HINCRBY', SHARD .. ':metrics', field, by or 1) end
end

local function split(s, sep)
  local out = {}
  if not s or s == '' then return out end
  for piece in string.gmatch(s, '([^' .. sep .. ']+)') do out[#out + 1] = piece end
  return out
end

-- Compensation fields of round r: round 1 is the rollback ("cs:<step>"),
-- round 2 re-compensates a late success with its real result ("cs2:<step>").
local function cf(f, m, r)
  if r == '2' then return f .. '2:' .. m end
  return f .. ':' .. m
end

-- -- compact records -------------------------------------------------------------
--
-- A finished saga is kept compact: its fields, but for the few in TOP, are
-- packed into one string ("<len>:<field><len>:<value>" ..., lengths in
-- bytes) cut into values of at most CHUNK bytes ("z1" .. "z<zn>"), and the
-- fields nothing reads after the end are dropped (see compact). A hash whose
-- every value is that short stays in Redis's listpack encoding, about half
-- the memory of one with a single long value, and one packed field costs a
-- few bytes where a hash field costs tens. Ops that act on a finished saga
-- (late outcomes, sweeps, duplicates, operators) expand it first and pack it
-- again after; celery_saga.store.compact unpacks it for readers.
local TOP = {status = true, status_at = true, name = true, gen = true, v = true, cbs = true, sk = true, rrs = true,
  lk = true, lks = true}
local CHUNK = 60

local function expand()
  local n = num(redis.call('HGET', K, 'zn'))
  if not n then return end
  local names = {}
  for i = 1, n do names[i] = 'z' .. i end
  local parts = redis.call('HMGET', K, unpack(names))
  for i = 1, n do parts[i] = parts[i] or '' end
  local packed = table.concat(parts)
  local flat, pos = {}, 1
  while pos <= #packed do
    local colon = string.find(packed, ':', pos, true)
    if not colon then break end
    local len = num(string.sub(packed, pos, colon - 1)) or 0
    flat[#flat + 1] = string.sub(packed, colon + 1, colon + len)
    pos = colon + len + 1
  end
  redis.call('HDEL', K, 'zn', unpack(names))
  for i = 1, #flat - 1, 200 do redis.call('HSET', K, unpack(flat, i, math.min(i + 199, #flat))) end
  expanded = true
end

-- Fields no op and no reader needs once the saga has ended in `st`: when
-- steps were dispatched and their deadlines and retry counts (nothing is in
-- flight), the forward progress; and for a COMPLETED saga, which can never
-- roll back, everything rolling back would read. Its steps' configured
-- timeouts ("to:<step>") are kept as one field, "tos": show displays them.
local ENDED_DROP = {td = true, rt = true, crt = true, wk = true, cwk = true, cwk2 = true, hbt = true, hbd = true}
local ENDED_DROP_FIELDS = {sdl = true, left = true}
local COMPLETED_DROP = {to = true, comp = true, cof = true, fb0 = true}
local COMPLETED_DROP_FIELDS = {copen = true, gaveup = true, cstage = true, stage = true, bo = true, maxr = true,
  cret = true, fret = true, lw = true, dw = true, retention = true, startfail = true, fbo = true, fmaxr = true}

local function dropped(f, st, v, fields)
  -- (string.find, not a pattern with captures: this runs for every field of every ending saga.)
  local colon = string.find(f, ':', 1, true)
  local kind = colon and string.sub(f, 1, colon - 1)
  -- A saga that gave up forward may be retried: it still counts the steps left in its stage.
  if f == 'left' and fields['reason'] == 'forward' then return false end
  if ENDED_DROP_FIELDS[f] or (kind and ENDED_DROP[kind]) then return true end
  -- Replies: only the call that ended the saga may still be sent again, and
  -- the one that completed a saga with no on_complete asks its caller for
  -- nothing more (a replay then gets "duplicate").
  if kind == 'x' then
    return f ~= slot() or (st == 'COMPLETED' and (fields['cb_ok'] or '') == '')
  end
  -- A deadline says when a step without an outcome was given up on: kept for those.
  if kind == 'dl' and fields['s:' .. string.sub(f, colon + 1)] == 'COMPLETED' then return true end
  -- A step that returned None reads the same without its result.
  if kind == 'r' and v == 'null' then return true end
  -- A completed child saga may still be rolled back by its parent (unwind).
  if st ~= 'COMPLETED' or fields['parent'] then return false end
  return COMPLETED_DROP_FIELDS[f] or (kind ~= nil and COMPLETED_DROP[kind] ~= nil)
end

-- The decimal text of small lengths, kept across calls (a function library
-- lives on between calls): turning a number into text costs Lua more than
-- the rest of packing a field.
local DIGITS = {}
local function digits(n)
  local d = DIGITS[n]
  if not d then
    d = tostring(n)
    if n < 4096 then DIGITS[n] = d end
  end
  return d
end

local function compact(st)
  local all = redis.call('HGETALL', K)
  local ttl = redis.call('PTTL', K)
  local top, packed = {}, {}
  local fields = {}
  for i = 1, #all, 2 do fields[all[i]] = all[i + 1] end
  local no_key = (fields['key'] or '') == ''
  for i = 1, #all, 2 do
    local f, v = all[i], all[i + 1]
    if TOP[f] then
      top[#top + 1] = f
      top[#top + 1] = v
    elseif v ~= '' and f ~= 'tos' and not dropped(f, st, v, fields) and not (no_key and f == 'fp') then
      -- (An empty field reads as a missing one; the fingerprint only matters
      -- to a start with the same idempotency key.)
      packed[#packed + 1] = digits(#f) .. ':' .. f .. digits(#v) .. ':' .. v
    end
  end
  if st == 'COMPLETED' then
    -- In step order, as the "stages" field lists them; "" for a step without one.
    -- Packed once: a record expanded and packed again (a late or repeated
    -- call) has "tos" and no "to:" fields left.
    local v = fields['tos']
    if not v then
      local tos = {}
      for _, part in ipairs(split(fields['stages'] or '', ';')) do
        for _, m in ipairs(split(part, ',')) do tos[#tos + 1] = fields['to:' .. m] or '' end
      end
      v = table.concat(tos, ',')
    end
    packed[#packed + 1] = '3:tos' .. digits(#v) .. ':' .. v
  end
  local text = table.concat(packed)
  local n, i = 0, 1
  while i <= #text do
    -- Never cut inside a UTF-8 sequence: each value must be valid text.
    local j = math.min(i + CHUNK - 1, #text)
    while j < #text and j > i and string.byte(text, j + 1) >= 128 and string.byte(text, j + 1) < 192 do j = j - 1 end
    n = n + 1
    top[#top + 1] = 'z' .. n
    top[#top + 1] = string.sub(text, i, j)
    i = j + 1
  end
  top[#top + 1] = 'zn'
  top[#top + 1] = tostring(n)
  -- A new key: Redis never converts a hash back to listpack in place.
  redis.call('DEL', K)
  for k = 1, #top - 1, 200 do redis.call('HSET', K, unpack(top, k, math.min(k + 199, #top))) end
  if ttl > 0 then redis.call('PEXPIRE', K, ttl) end
end

-- The fields every op reads, in one call.
-- 1 status, 2 gen, 3 v, 4 stages, 5 cstage, 6 zn (compact), 7 dw, 8 pv (the pivot).
local HEAD_FIELDS = {'status', 'gen', 'v', 'stages', 'cstage', 'zn', 'dw', 'pv'}
-- `status` is what the saga was when this call began; `live`, what it is now.

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

-- -- the point of no return ----------------------------------------------------
--
-- A saga with a pivot ("pv": a step alone in its stage) can roll back only
-- until the pivot has completed ("past" = "1"; the saga timeout stops
-- applying then). The steps of later stages are retriable: a failure or a
-- lost outcome sends them again after a backoff ("fbo", "fmaxr"), so the
-- saga finishes forward or ends FAILED with reason "forward". A pivot whose
-- outcome is unknown (its deadline, a lost worker, a time limit) is sent
-- again the same way, until its outcome decides between forward and back.

-- The 0-based stage of step m.
local function stage_of(m)
  for k, members in ipairs(stages()) do
    for _, n in ipairs(members) do
      if n == m then return k - 1 end
    end
  end
  return -1
end

local function is_pivot(m)
  return HEAD[8] and HEAD[8] ~= '' and HEAD[8] == m
end

-- A wait (wait_for) is the step "wait:<event>": no task, no message; the
-- signal op delivers its event (see OPS.signal).
local function is_wait(m)
  return string.sub(m, 1, 5) == 'wait:'
end

-- Whether step m comes after the pivot: sent again, never compensated.
local function retriable(m)
  if not HEAD[8] or HEAD[8] == '' then return false end
  return stage_of(m) > stage_of(HEAD[8])
end

-- -- replies -----------------------------------------------------------------

-- The reply object. `changed` is the status before this call when the call
-- changed it. `raw` is JSON text spliced in as is (saga data stays opaque).
local function respond(outcome, changed, fields, raw)
  local r = fields or {}
  r.outcome = outcome
  if r.status == nil then r.status = live or '' end
  if changed and changed ~= '' then r.from = changed end
  if r.due and #r.due == 0 then r.due = nil end
  if ADMITTED and #ADMITTED > 0 then r.admitted = ADMITTED end
  if LATER and next(LATER) then r.later = LATER end
  if gen == '*' then
    if r.name == nil then r.name = hget('name') or '' end
    r.gen = hget('gen') or ''
  end
  local text = cjson.encode(r)
  if raw then text = string.sub(text, 1, -2) .. ',' .. raw .. '}' end
  return text
end

-- The data of the steps of stage k + 1, as JSON texts the caller folds: the
-- start kwargs, then the result of every step of stages 1..k that has one
-- (only a completed step has), in declaration order; and their size in bytes.
-- Saga data is never copied in the record: it is read back from it.
local function data_parts(k)
  local names = {'kwargs'}
  local st = stages()
  for j = 1, k do
    for _, n in ipairs(st[j]) do names[#names + 1] = 'r:' .. n end
  end
  local values = hmget(names)
  local parts = {values[1] or '{}'}
  local size = #parts[1]
  for i = 2, #names do
    if values[i] then
      parts[#parts + 1] = values[i]
      size = size + #values[i]
    end
  end
  return parts, size
end

-- A next_stage reply with the data of stage k + 1 (see data_parts).
local function with_stage_data(text, k)
  return string.sub(text, 1, -2) .. ',"data":[' .. table.concat(data_parts(k), ',') .. ']}'
end

-- -- messages in the transition ---------------------------------------------
--
-- On one server that is also the Celery broker (kombu's Redis transport),
-- start and done carry the messages of the stage they expect to dispatch,
-- built by the caller as kombu would send them (celery_saga/enqueue.py):
-- after the op's own ARGV come the stage, the digest of its data, then per
-- message its kind ("q": a queue key; "x": the binding set of a direct
-- exchange), key, routing key, queue key prefix, priority suffix and
-- payload; then their count and "!enq". The call pushes them only if it
-- dispatches that very stage and the data they carry is the record's (the
-- digest is sha1 of the stage's data parts as one JSON array): so a stage
-- cannot be decided and left unpublished, and no message carries data the
-- record does not hold. Otherwise (another stage, a sibling's result, a push
-- refused) the reply says nothing was pushed, and the caller publishes.
local ENQ_FIELDS = 6

local function take_enqueue()
  ENQ = nil
  if (op ~= 'start' and op ~= 'done') or AV[#AV] ~= '!enq' then return end
  local n = num(AV[#AV - 1]) or 0
  local base = #AV - 2 - ENQ_FIELDS * n - 2
  -- Taken off ARGV, so that each op sees only its own arguments.
  ENQ = {stage = num(AV[base + 1]), digest = AV[base + 2], n = n, fields = {}}
  for i = base + 3, #AV - 2 do ENQ.fields[#ENQ.fields + 1] = AV[i] end
  for i = #AV, base + 1, -1 do AV[i] = nil end
end

-- The keys message i goes to: its queue's, or those of the queues whose
-- bindings ("<routing key>\6\22<pattern>\6\22<queue>") match its routing
-- key, as kombu routes a direct exchange; nil if none (the caller decides).
local function message_keys(i)
  local f = ENQ.fields
  local kind, key, rk, prefix, suffix = f[i], f[i + 1], f[i + 2], f[i + 3], f[i + 4]
  if kind == 'q' then return {key} end
  local bindings = redis.pcall('SMEMBERS', key)
  if type(bindings) ~= 'table' or bindings.err then return nil end
  local seen, keys = {}, {}
  for _, b in ipairs(bindings) do
    local brk, _, queue = string.match(b, '^(.-)\6\22(.-)\6\22(.*)$')
    if brk == rk and not seen[queue] then
      seen[queue] = true
      keys[#keys + 1] = prefix .. queue .. suffix
    end
  end
  if #keys == 0 then return nil end
  return keys
end

-- Push the carried messages if they are stage k's, with the record's data.
-- A push the server refuses (an ACL, a key of another type) ends it: the
-- caller then publishes them all, and a receiver skips a copy.
local function enqueue(k)
  if not ENQ or ENQ.stage ~= k then return false end
  if redis.sha1hex('[' .. table.concat(data_parts(k), ',') .. ']') ~= ENQ.digest then return false end
  local pushes = {}
  for j = 0, ENQ.n - 1 do
    local i = 1 + ENQ_FIELDS * j
    local keys = message_keys(i)
    if not keys then return false end
    for _, q in ipairs(keys) do pushes[#pushes + 1] = {q, ENQ.fields[i + 5]} end
  end
  for _, p in ipairs(pushes) do
    local r = redis.pcall('LPUSH', p[1], p[2])
    if type(r) == 'table' and r.err then return false end
  end
  return true
end

-- -- de-duplication -----------------------------------------------------------
--
-- A call sent again (redis-py's retries, the wrapper writing an outcome
-- again) must get its first reply back instead of applying twice. Each reply
-- is kept in the slot of what it was for (slot()): "x:<op>:<step>:<round>",
-- or "x:<op>" for ops on the whole saga, as "<id> <time> <stage> <reply>".
-- A slot holds the latest call only: a caller sends again only its own last
-- call, and a call a later one replaced is applied afresh on a replay, where
-- the record's state refuses it (duplicate, busy, stale ...). So a saga keeps
-- at most a few replies per step, however often a compensation is retried.
-- A next_stage reply is kept without its data (<stage> says which stage's
-- data to rebuild from the record), so no reply copies the saga's data. A
-- reply older than the window ("dw", ms; saga_dedup_window) is not used, and
-- packing an ended record keeps only the reply of the call that ended it.
local function window_ms() return num(HEAD[7]) or 600000 end

-- Where the op's step and compensation round are among its arguments.
local STEP_ROUND = {begin = 0, done = 0, fail = 0, lost = 0, expire = 0, heartbeat = 0, comp_begin = 7,
  comp_done = 5, comp_fail = 6}

function slot()
  local at = STEP_ROUND[op]
  if not at then return 'x:' .. op end
  local round = '1'
  if at > 0 then round = AV[at] or '1' end
  return 'x:' .. op .. ':' .. (AV[4] or '') .. ':' .. round
end

-- Keep `text` as the reply of this transition; `stage` names the stage whose
-- data a next_stage reply leaves out.
local function remember(text, stage)
  if tx ~= '' then redis.call('HSET', K, slot(), tx .. ' ' .. NOW .. ' ' .. (stage or '-') .. ' ' .. text) end
  return text
end

-- A compensation of round r to publish now.
local function due_now(m, r)
  if r == '2' then return {step = m, round = 2} end
  return {step = m}
end

-- -- statuses ----------------------------------------------------------------

local function set_status(new)
  local old = live
  redis.call('HSET', K, 'status', new, 'status_at', NOW)
  live = new
  return old
end

-- The retention of a saga that ended in `st`: "cret" for COMPENSATED ("":
-- as "retention", the COMPLETED one), "fret" for FAILED ("": none, kept
-- until purged).
local function expire_after_retention(st)
  local ttl
  if st == 'FAILED' then
    ttl = num(hget('fret'))
  elseif st == 'COMPENSATED' then
    ttl = num(hget('cret')) or num(hget('retention'))
  else
    ttl = num(hget('retention'))
  end
  if ttl and ttl > 0 then redis.call('PEXPIRE', K, math.floor(ttl * 1000)) else redis.call('PERSIST', K) end
end

-- -- deadlines ---------------------------------------------------------------
--
-- A step's deadline runs from the transition that dispatches it to its
-- recorded outcome ("dl:<step>" = dispatch time + "to:<step>"), so it covers
-- a message nobody consumes and the step's own Celery retries. Each
-- compensation attempt has one too ("cdl:<step>"), counted from the moment
-- it may start (after its retry delay).

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

-- The delay before the attempt after attempt n, in ms: equal jitter in
-- [d/2, d], d = min(backoff_max, backoff * 2^(n-1)), from the settings the
-- saga started with ("bo"; "fbo" for a step sent forward again). Scripts draw
-- no random numbers: the caller passes `u` in [0, 1). This is the one place
-- a backoff is computed.
local function backoff_ms(n, u, field)
  local bo = split(hget(field or 'bo'), ',')
  if #bo == 0 and not field then
    -- A record started by an earlier version keeps its settings inline.
    local ok, settings = pcall(cjson.decode, hget('settings') or '{}')
    if ok and type(settings) == 'table' then
      bo = {settings['compensation_retry_backoff'], settings['compensation_retry_backoff_max']}
    end
  end
  local base = num(bo[1]) or 0
  local cap = num(bo[2]) or 0
  local d = math.min(cap, base * 2 ^ math.max(n - 1, 0)) * 1000
  return math.floor(d / 2 + u * d / 2)
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
  if s ~= 'UNKNOWN' or hget('ls:' .. m) then return false end
  -- A late success would start a second round: wait for one until the
  -- rollback has been over for saga_late_outcome_window ("lw"), then let the
  -- saga leave the deadline index (a later one re-enters it, see SagaStore.apply).
  if st == 'COMPENSATED' or st == 'FAILED' then
    return num(NOW) < (num(hget('status_at')) or 0) + (num(hget('lw')) or 86400000)
  end
  return true
end

-- The earliest deadline of the record, or '' for none. While a step may
-- still get a deadline (see may_get_deadline), it is at most NOW plus the
-- shortest timeout of such steps: anything dispatched later has a deadline
-- at least that far away. So the sweeper's index entry, rescored with this
-- value, never wakes after a deadline that did not exist when it was scored,
-- and transitions that dispatch need not register anything.
-- The end callback of a finished saga that is not marked sent: its
-- signature. The sweep op sends it once the grace (its ARGV[4]) has passed
-- since the saga ended: the process that ended it sends it at once, unless
-- it died first.

local function pending_callback()
  if hget('cbs') == '1' then return nil end
  local sig
  if live == 'COMPLETED' then sig = hget('cb_ok') elseif live == 'COMPENSATED' or live == 'FAILED' then
    sig = hget('cb_fail')
  end
  if not sig or sig == '' then return nil end
  return sig
end

local function next_deadline()
  local best = nil
  local function consider(x)
    x = num(x)
    if x and (not best or x < best) then best = x end
  end
  local st = live
  local lock_look, waiting = lock_deadline()
  consider(lock_look)
  -- Waiting for its locks, nothing of it runs: only its locks have deadlines.
  if waiting then return string.format('%.0f', best) end
  if st == 'PENDING' or st == 'RUNNING' then consider(hget('sdl')) end
  if pending_callback() then consider(num(hget('status_at')) + CALLBACK_GRACE_MS) end
  local shortest = nil
  each_step(function(m)
    local s = hget('s:' .. m)
    if s == 'DISPATCHED' or s == 'RUNNING' then consider(hget('dl:' .. m)) end
    if s == 'RUNNING' then consider(hget('hbd:' .. m)) end
    -- A step with a heartbeat timeout that may still begin gets a heartbeat
    -- deadline then: one server's begin moves the index entry itself, a
    -- cluster's cannot (another slot), so its sweeper looks that often.
    local hb = num(hget('hbt:' .. m))
    if hb and not SHARD and (not s or s == 'DISPATCHED') and (st == 'PENDING' or st == 'RUNNING') then
      if not shortest or hb < shortest then shortest = hb end
    end
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

-- -- ending a saga -----------------------------------------------------------

-- Second-round compensations wait for the first round to end.
local function dispatch_waiting_rounds(out)
  each_step(function(m)
    if hget('cs2:' .. m) == 'WAITING' then
      dispatch_compensation(m, '2', 0)
      out[#out + 1] = due_now(m, '2')
    end
  end)
end

-- The end message: the new status, and for a completed saga the data parts
-- get() returns ("COMPLETED\n[<kwargs>,<result>,...]", folded by the waiter,
-- as a next_stage reply's), so a woken waiter needs no read of the record.
-- Data over END_DATA_MAX bytes is left for the waiter to read.
local END_DATA_MAX = 65536

local function end_message(new)
  if new ~= 'COMPLETED' then return new end
  local parts, size = data_parts(#stages())
  if size > END_DATA_MAX then return new end
  return new .. '\n[' .. table.concat(parts, ',') .. ']'
end

-- A finished saga expires after its retention; a running one never does.
-- FAILED sagas are the dead-letter list: by default kept until an operator
-- retries or purges them.
local function finish(new, out)
  ending = true
  local old = set_status(new)
  expire_after_retention(new)
  release_locks(new)
  -- Wakes SagaResult.get() waiters, which would otherwise poll. pcall: a
  -- user whose ACL has no channel access still ends its sagas (they poll).
  redis.pcall('PUBLISH', K .. ':end', end_message(new))
  if out then dispatch_waiting_rounds(out) end
  return old
end

-- -- rolling back ------------------------------------------------------------

-- Walk the compensation frontier back from the stage that failed.
-- A stage holds back earlier stages until each of its steps has been
-- compensated, has ended without effect, or has had its compensation fail
-- once (a failing compensation keeps retrying, but must not block others).
-- A step whose outcome is unknown (UNKNOWN) may have had its effect, so it
-- is compensated blind, with no result.
-- Appends the compensations to dispatch now to `out`, and returns the
-- status before the saga ended, or false if it did not end.
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
            out[#out + 1] = due_now(m, '1')
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

-- The one way a rollback moves on: if the saga is rolling back, walk the
-- frontier. `changed` is the status this call found the saga in, if an
-- earlier part of it changed it; that one, not COMPENSATING, is what the
-- caller reports.
local function settle(out, changed)
  if live ~= 'COMPENSATING' then return changed end
  local ended = advance(out)
  return changed or ended
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

local function saga_timeout_text()
  return 'timeout: the saga did not finish within ' .. secs(hget('sto'))
end

-- Step m, retriable or the pivot, has no outcome to go on (it failed, its
-- outcome is lost, or it missed its deadline): send it again after a
-- backoff drawn with `u`, with the same idempotency key, or give up after
-- saga_forward_max_retries ("fmaxr"; an operator retry resets the budget
-- from "fb0:<step>") and end the saga FAILED, reason "forward". In a saga
-- that has given up already, a sibling gives up too, for the operator's
-- retry to send again with it. Returns its due entry, and the status the
-- saga had before if this ended it.
local function forward_retry(m, err, u)
  if err then redis.call('HSET', K, 'e:' .. m, err) end
  local n = redis.call('HINCRBY', K, 'fa:' .. m, 1)
  local entry = {step = m, forward = true, attempt = n}
  local maxr = hget('fmaxr')
  local going = live == 'PENDING' or live == 'RUNNING'
  if not going or (maxr and maxr ~= '' and n - (num(hget('fb0:' .. m)) or 0) > num(maxr)) then
    redis.call('HSET', K, 's:' .. m, 'FAILED', 'fg:' .. m, '1', 't1:' .. m, NOW)
    redis.call('HDEL', K, 'dl:' .. m)
    entry.gave_up = true
    if not going then return entry, false end
    redis.call('HSET', K, 'failed_step', m, 'error', err or '', 'reason', 'forward')
    return entry, finish('FAILED')
  end
  local delay = backoff_ms(n, u, 'fbo')
  redis.call('HSET', K, 's:' .. m, 'DISPATCHED', 'td:' .. m, NOW)
  local to = num(hget('to:' .. m))
  if to then redis.call('HSET', K, 'dl:' .. m, NOW + delay + to) end
  entry.delay = delay / 1000
  return entry, false
end

-- Whether step m, in flight, is sent again rather than stopped on: a
-- retriable step, or the pivot while the saga still goes forward.
local function sent_again(m)
  if is_wait(m) then return false end
  return retriable(m) or (is_pivot(m) and (live == 'PENDING' or live == 'RUNNING'))
end

-- Step m missed its deadline: fence or stop waiting for it, and roll back;
-- or, for a step sent again (see forward_retry), append its due entry to
-- `out`. Returns the status the saga had before, when it changed.
local function time_out_step(m, out, u)
  local err = 'timeout: step ' .. m .. ' had no outcome ' .. secs(hget('to:' .. m)) .. ' after it was dispatched'
  if is_wait(m) then
    err = 'timeout: event ' .. string.sub(m, 6) .. ' did not come within ' .. secs(hget('to:' .. m))
  end
  if sent_again(m) then
    local entry, changed = forward_retry(m, err, u)
    out[#out + 1] = entry
    return changed
  end
  local st = live
  if is_wait(m) and hget('past') == '1' then
    -- A wait past the pivot that times out: nothing can be rolled back.
    stop_waiting(m, 'timeout', err)
    if st ~= 'RUNNING' then return false end
    redis.call('HSET', K, 'failed_step', m, 'error', err, 'reason', 'timeout')
    return finish('FAILED')
  end
  stop_waiting(m, 'timeout', err)
  if st == 'PENDING' or st == 'RUNNING' then return begin_rollback(m, err, 'timeout') end
  return false
end

-- A compensation attempt failed (or missed its deadline): retry it after a
-- backoff drawn with `u`, or give up after the saga's max retries. Returns
-- its due entry, with the attempts so far.
local function compensation_failed(m, r, err, u, forced)
  redis.call('HSET', K, cf('ce', m, r), err)
  count('compfail:' .. (hget('name') or ''))
  local n = num(hget(cf('ca', m, r))) or 0
  local entry = due_now(m, r)
  entry.attempt = n
  local maxr = hget('maxr')
  -- An operator retry gives each compensation a fresh budget from cb0:<step>.
  if forced or (maxr and maxr ~= '' and n - (num(hget(cf('cb0', m, r))) or 0) > num(maxr)) then
    redis.call('HSET', K, cf('cs', m, r), 'GAVE_UP', cf('ct1', m, r), NOW)
    if r == '1' then
      redis.call('HINCRBY', K, 'copen', -1)
      redis.call('HINCRBY', K, 'gaveup', 1)
    end
    entry.gave_up = true
    return entry
  end
  local delay = backoff_ms(n, u)
  redis.call('HSET', K, cf('cs', m, r), 'RETRYING')
  local to = num(hget('to:' .. m))
  if to then redis.call('HSET', K, cf('cdl', m, r), NOW + delay + to) end
  entry.delay = delay / 1000
  return entry
end

-- Running step m sent no heartbeat within its heartbeat timeout ("hbd:<step>"
-- passed) while its worker may well be alive: its outcome is lost, as if its
-- worker was (see fail_or_lose). Returns the status before, when it changed.
local function heartbeat_missed(m, out, u)
  local err = 'lost: step ' .. m .. ' sent no heartbeat for ' .. secs(hget('hbt:' .. m))
  count('lost:heartbeat')
  if sent_again(m) then
    local entry, changed = forward_retry(m, err, u)
    out[#out + 1] = entry
    return changed
  end
  stop_waiting(m, 'lost', err)
  if live == 'PENDING' or live == 'RUNNING' then return begin_rollback(m, err, 'failure') end
  return false
end

-- Act on every deadline that has passed; `u` draws the backoff of the
-- compensations it retries. Appends their due entries to `out`. Returns the
-- saga status before, when it changed, else false.
local function apply_deadlines(out, u)
  local changed = false
  local st = live
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
      -- Several retries drawn in one sweep get different jitter.
      local c = time_out_step(m, out, (u + #out * 0.6180339887) % 1)
      changed = changed or c
    end
    local hbd = num(hget('hbd:' .. m))
    if hget('s:' .. m) == 'RUNNING' and hbd and num(NOW) >= hbd then
      local c = heartbeat_missed(m, out, (u + #out * 0.6180339887) % 1)
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
        local err = 'timeout: compensation attempt had no outcome ' .. secs(hget('to:' .. m)) .. ' after it was due'
        -- Several retries drawn in one sweep get different jitter.
        out[#out + 1] = compensation_failed(m, r, err, (u + #out * 0.6180339887) % 1)
      end
    end
  end)
  return settle(out, changed)
end

-- A copy that finds its step running is another copy of the same message,
-- unless it is a Celery retry (more retries than seen) or the broker
-- redelivered it after its first copy's worker died (ARGV[6] = "1").
-- Only those may run the function again: a plain duplicate must not.
local function busy(seen_field)
  if AV[6] == '1' then return false end
  return (num(AV[5]) or 0) <= (num(hget(seen_field)) or -1)
end

local function finished(st)
  return st == 'COMPLETED' or st == 'COMPENSATED' or st == 'FAILED'
end

-- An outcome for a step the record shows DISPATCHED: its begin was lost (a
-- failover dropped the write), and it ran. Record the begin it had.
-- Returns the saga status before, if this took it from PENDING to RUNNING.
local function begun_after_all(m)
  redis.call('HINCRBY', K, 'a:' .. m, 1)
  redis.call('HSETNX', K, 't0:' .. m, NOW)
  if live == 'PENDING' then return set_status('RUNNING') end
  return false
end

-- -- moving forward ------------------------------------------------------------

local step_completed

-- The event that settles wait m, if it came already: "accept" or "reject", and its data.
local function early_event(m)
  local data = hget('ev:' .. string.sub(m, 6))
  if data then return 'accept', data end
  local rj = hget('rj:' .. m)
  if rj then
    data = hget('ev:' .. rj)
    if data then return 'reject', data end
  end
  return nil
end

-- Wait m was rejected by event `ev`: roll back with reason "rejected" (past
-- the pivot, nothing can be: the saga ends FAILED). The error is the text
-- the signal's caller built ("evx:<event>": the data masked and capped),
-- never the data itself, which may hold redacted values.
local function reject_wait(m, ev, changed)
  local err = hget('evx:' .. ev) or ('rejected: event ' .. ev)
  redis.call('HSET', K, 's:' .. m, 'FAILED', 'e:' .. m, err, 't1:' .. m, NOW)
  redis.call('HSETNX', K, 't0:' .. m, NOW)
  if hget('past') == '1' then
    redis.call('HSET', K, 'failed_step', m, 'error', err, 'reason', 'rejected')
    local ended = finish('FAILED')
    return remember(respond('rollback', changed or ended))
  end
  changed = changed or begin_rollback(m, err, 'rejected')
  local out = {}
  return remember(respond('rollback', settle(out, changed), {due = out}))
end

-- The stage is complete: dispatch the next one (completing the saga after
-- the last). A wait whose event came early is settled as it is reached,
-- which may complete that stage too. Returns the reply.
local function enter_next(changed)
  local st = stages()
  local k = num(hget('stage')) + 1
  while k < #st do
    redis.call('HSET', K, 'stage', k, 'left', #st[k + 1])
    for _, n in ipairs(st[k + 1]) do dispatch_step(n) end
    local left = #st[k + 1]
    for _, n in ipairs(st[k + 1]) do
      if is_wait(n) then
        local how, data = early_event(n)
        if how == 'reject' then return reject_wait(n, hget('rj:' .. n), changed) end
        if how == 'accept' then
          redis.call('HSET', K, 's:' .. n, 'COMPLETED', 'r:' .. n, data, 't0:' .. n, NOW, 't1:' .. n, NOW)
          left = redis.call('HINCRBY', K, 'left', -1)
        end
      end
    end
    if left > 0 then
      if enqueue(k) then
        -- Published already: the reply (and a replay of it) needs no data.
        return remember(respond('next_stage', changed, {stage = k, plan_digest = hget('ph'), enq = true}))
      end
      local text = remember(respond('next_stage', changed, {stage = k, plan_digest = hget('ph')}), k)
      return with_stage_data(text, k)
    end
    k = k + 1
  end
  local ended = finish('COMPLETED')
  return remember(respond('completed', changed or ended, {callback = hget('cb_ok') or ''}))
end

-- Step m (or wait m) completed with `result` (JSON). Returns the reply.
function step_completed(m, result, changed)
  if finished(live) and not (live == 'FAILED' and hget('reason') == 'forward' and retriable(m)) then
    -- The saga ended while this step ran (past the pivot, a wait was
    -- rejected or timed out): no step completes after the end. Its success
    -- is kept apart as a late outcome, and nothing follows it.
    if not hget('ls:' .. m) then
      redis.call('HSET', K, 'ls:' .. m, 'COMPLETED', 'lr:' .. m, result, 'lt:' .. m, NOW)
    end
    return remember(respond('late', changed))
  end
  redis.call('HSET', K, 's:' .. m, 'COMPLETED', 'r:' .. m, result, 't1:' .. m, NOW)
  if live == 'FAILED' and retriable(m) then
    -- A sibling of a step that gave up forward: one step fewer for the operator's retry to wait for.
    redis.call('HINCRBY', K, 'left', -1)
    return remember(respond('late', changed))
  end
  if live == 'RUNNING' then
    if is_pivot(m) then
      -- The point of no return: from here the saga only goes forward.
      redis.call('HSET', K, 'past', '1')
      redis.call('HDEL', K, 'sdl')
    end
    local left = redis.call('HINCRBY', K, 'left', -1)
    if left > 0 then return remember(respond('wait', changed)) end
    -- The last step of the stage to finish dispatches the next stage: the
    -- join lives here, not in a chord, so a lost header task cannot hang it.
    return enter_next(changed)
  end
  if live == 'COMPENSATING' then
    -- A sibling that was still running when another failed: undo it now.
    local out = {}
    return remember(respond('rollback', settle(out, changed), {due = out}))
  end
  return remember(respond('late', changed))
end

-- Business keys (store/keys.py, "k:<key>:<b>"): the start indexes the
-- record's "sk" values, purge removes them, sweepers remove those of
-- expired records. The bucket is store/keys.py search_bucket, on one sha1.
local SEARCH_BUCKETS = 4
local function index_search(add, sk)
  sk = sk or hget('sk')
  if not SHARD or not sk or sk == '' then return end
  local ok, keys = pcall(cjson.decode, sk)
  if not ok or type(keys) ~= 'table' then return end
  for key, value in pairs(keys) do
    if type(key) == 'string' and type(value) == 'string' then
      local b = tonumber(string.sub(redis.sha1hex(value), 1, 2), 16) % SEARCH_BUCKETS
      local index, member = SHARD .. ':k:' .. key .. ':' .. b, value .. '\0' .. SAGA_ID
      if add then
        redis.call('ZADD', index, 0, member)
        redis.call('SADD', SHARD .. ':keys', key)
      else
        redis.call('ZREM', index, member)
      end
    end
  end
end

-- -- the ops, in lifecycle order ----------------------------------------------

local OPS = {}

-- ARGV[4..]: field/value pairs of the new record (StartRequest.fields()).
OPS.start = function()
  -- On one server two pseudo-fields ride along: "!def", the definition to
  -- store once under KEYS[3], and "!watch", when sweepers first look (ms).
  local f, pairs_ = {}, {}
  for i = 4, #AV, 2 do
    f[AV[i]] = AV[i + 1]
    if string.sub(AV[i], 1, 1) ~= '!' then
      pairs_[#pairs_ + 1] = AV[i]
      pairs_[#pairs_ + 1] = AV[i + 1]
    end
  end
  if status then
    if hget('startfail') == '1' then
      -- A start whose publish failed released its key: start afresh.
      index_search(false)
      redis.call('DEL', K)
    elseif HEAD[2] == gen then
      -- This very start, sent again after its reply was lost: the caller
      -- has not published yet, so answer as the first time.
      return respond('created', nil, {gen = gen, waiting = (hget('lks') == 'wait') or nil})
    elseif hget('fp') == f.fp then
      return respond('exists', nil, {gen = HEAD[2], waiting = (hget('lks') == 'wait') or nil})
    else
      return respond('conflict')
    end
  end
  -- Its locks and running limit: refused (on_locked="reject") before anything is written.
  local lock, refusal = lock_check(f)
  if refusal then return refusal end
  if f['!def'] then redis.call('SET', KS[3], f['!def'], 'nx') end
  for i = 1, #pairs_, 200 do redis.call('HSET', K, unpack(pairs_, i, math.min(i + 199, #pairs_))) end
  redis.call('HSET', K, 'v', '1', 'gen', gen, 'created', NOW, 'stage', '0', 'copen', '0', 'gaveup', '0')
  index_search(true, f.sk)
  if f['!watch'] then
    redis.call('ZADD', SHARD .. ':due', 'lt', f['!watch'], SAGA_ID)
  end
  set_status('PENDING')
  if lock then
    lock_enter(f, lock)
    -- Waiting: nothing is dispatched, and the saga timeout runs from when it may start.
    if lock == 'wait' then return respond('created', nil, {gen = gen, waiting = true}) end
  end
  if f.sto then redis.call('HSET', K, 'sdl', NOW + num(f.sto)) end
  HEAD[4] = f.stages
  local first = stages()[1]
  for _, m in ipairs(first) do dispatch_step(m) end
  redis.call('HSET', K, 'left', #first)
  -- (A start sent again above publishes again: a receiver skips the copy.)
  return respond('created', nil, {gen = gen, enq = enqueue(0) or nil})
end

-- ARGV: 4 error, 5.. first-stage steps whose message was never published.
OPS.abort = function()
  if status == 'PENDING' then
    for _, m in ipairs(stages()[1]) do
      redis.call('HSET', K, 's:' .. m, 'CANCELLED', 't1:' .. m, NOW)
    end
    -- "startfail" releases the idempotency key; reason "publish" says why.
    redis.call('HSET', K, 'startfail', '1', 'error', AV[4], 'reason', 'publish')
    unindexed = true
    local changed = finish('FAILED')
    -- Nothing ran, so there is nothing for an operator to retry: expire it.
    expire_after_retention('COMPLETED')
    return remember(respond('aborted', changed))
  end
  -- A published sibling already began: fail the unpublished ones instead,
  -- so the saga rolls back rather than waiting for them forever.
  local out, changed = {}, false
  for i = 5, #AV do
    local m = AV[i]
    if hget('s:' .. m) == 'DISPATCHED' then
      redis.call('HSET', K, 's:' .. m, 'FAILED', 'e:' .. m, AV[4], 't1:' .. m, NOW)
      if live == 'RUNNING' then changed = begin_rollback(m, AV[4], 'failure') end
    end
  end
  return remember(respond('rollback', settle(out, changed), {due = out}))
end

-- A worker's instance token ("wk:<step>", "cwk:<step>") names who runs an
-- attempt, for sweepers to find what a lost worker ran; "" (a caller outside
-- a worker) clears it, so that an earlier attempt's worker is not blamed.
local function mark_worker(field, token)
  if token and token ~= '' then redis.call('HSET', K, field, token) else redis.call('HDEL', K, field) end
end

-- ARGV: 4 step, 5 Celery retries of this message, 6 "1" if redelivered,
-- 7 the digest of the plan the message's task was checked against ("": unchecked; see run),
-- 8 the instance token of the worker that runs it ("": none), 9 "1" to get
-- the data of its stage back ("pt"), which the caller builds the next
-- stage's messages from (see "messages in the transition").
OPS.begin = function()
  local m = AV[4]
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
      changed = settle(out, changed)
    elseif (status == 'PENDING' or status == 'RUNNING') and sdl and num(NOW) >= sdl then
      changed = settle(out, halt('timeout', saga_timeout_text()))
    elseif dl and num(NOW) >= dl and sent_again(m) then
      -- Late, but here before a sweeper sent it again: let this copy run, with a fresh deadline.
      redis.call('HSET', K, 'dl:' .. m, NOW + (num(hget('to:' .. m)) or 0))
    elseif dl and num(NOW) >= dl then
      changed = settle(out, time_out_step(m, out, 0))
    end
    s = hget('s:' .. m)
  end
  if s == 'CANCELLED' or s == 'UNKNOWN' then
    -- Fenced, or compensated blind: this copy runs nothing and, unlike a
    -- duplicate of a finished step, re-drives nothing.
    return remember(respond('fenced', changed, {due = out}))
  end
  if (s == 'DISPATCHED' or s == 'RUNNING') and not finished(status) then
    if s == 'RUNNING' and busy('rt:' .. m) then return respond('busy') end
    if status == 'PENDING' then changed = set_status('RUNNING') end
    local n = redis.call('HINCRBY', K, 'a:' .. m, 1)
    redis.call('HSET', K, 's:' .. m, 'RUNNING', 'rt:' .. m, AV[5])
    redis.call('HSETNX', K, 't0:' .. m, NOW)
    mark_worker('wk:' .. m, AV[8])
    local hbt = num(hget('hbt:' .. m))
    if hbt then
      -- Its first heartbeat is due a heartbeat timeout from now: on one
      -- server, the sweepers' index entry moves that early itself.
      redis.call('HSET', K, 'hbd:' .. m, NOW + hbt)
      if SHARD then redis.call('ZADD', SHARD .. ':due', 'lt', NOW + hbt, SAGA_ID) end
    end
    local text = remember(respond('run', changed, {attempt = n}))
    if AV[9] ~= '1' then return text end
    -- Not kept in the reply slot: the record holds no copy of saga data.
    local pt = '[' .. table.concat(data_parts(stage_of(m)), ',') .. ']'
    return string.sub(text, 1, -2) .. ',"pt":' .. cjson.encode(pt) .. '}'
  end
  if not s then return respond('not_dispatched') end
  -- The outcome is recorded already: a duplicate or a redelivered copy.
  return respond('duplicate', nil, {step_status = s})
end

-- ARGV: 4 step, 5 result (JSON).
OPS.done = function()
  local m = AV[4]
  local s = hget('s:' .. m)
  if (s == 'UNKNOWN' or s == 'CANCELLED') and not hget('ls:' .. m) then
    -- A late success: the step was compensated blind (or is being), so its
    -- effect may be left. Compensate it again with its real result, in a
    -- second round once the first has ended. The saga status stays.
    -- CANCELLED means fenced before it began; an outcome means its begin
    -- was lost (a failover dropped the write), and it ran after all.
    redis.call('HSET', K, 'ls:' .. m, 'COMPLETED', 'lr:' .. m, AV[5], 'lt:' .. m, NOW)
    local out = {}
    if hget('comp:' .. m) and not hget('cs2:' .. m) then
      if status == 'COMPENSATED' or status == 'FAILED' then
        dispatch_compensation(m, '2', 0)
        out[#out + 1] = due_now(m, '2')
      else
        redis.call('HSET', K, 'cs2:' .. m, 'WAITING')
      end
    end
    return remember(respond('late', false, {due = out}))
  end
  local changed = false
  if s == 'DISPATCHED' then
    changed = begun_after_all(m)
  elseif s ~= 'RUNNING' then
    return respond('duplicate', nil, {step_status = s or ''})
  end
  return step_completed(m, AV[5], changed)
end

-- fail ARGV: 4 step, 5 error, 6 u, 7 "1" for a child saga that ended FAILED
-- (its compensations gave up: the step counts as one whose compensation
-- gave up, and the rollback ends FAILED). lost ARGV: 4 step, 5 error, 6 why
-- ("timeout" for a hard time limit, "lost" for a lost worker), 7 u, 8 the
-- instance token of the worker declared lost (a sweeper; "" for none): then
-- it acts only on the step RUNNING on that worker, never on a later attempt
-- or an outcome that came meanwhile. A lost outcome is unknown: the step may have had its effect, so it is
-- compensated blind. `u` draws the backoff of a step sent again.
local function fail_or_lose()
  local m = AV[4]
  local s = hget('s:' .. m)
  local token = op == 'lost' and AV[8] or ''
  if token ~= '' and (s ~= 'RUNNING' or hget('wk:' .. m) ~= token) then
    return respond('duplicate', nil, {step_status = s or ''})
  end
  if s == 'UNKNOWN' and not hget('ls:' .. m) then
    -- A late failure changes nothing but the record.
    redis.call('HSET', K, 'ls:' .. m, 'FAILED', 'le:' .. m, AV[5], 'lt:' .. m, NOW)
    return remember(respond('late'))
  end
  if s ~= 'RUNNING' and s ~= 'DISPATCHED' then return respond('duplicate', nil, {step_status = s or ''}) end
  -- /metrics: steps lost with their worker (a pool child, or a whole worker declared lost).
  if op == 'lost' and AV[6] == 'lost' then count('lost:worker') end
  if retriable(m) or (op == 'lost' and sent_again(m)) then
    if s == 'DISPATCHED' and hget('fa:' .. m) then
      -- An earlier attempt's outcome, after the step was sent again: the new copy decides.
      return respond('duplicate', nil, {step_status = s})
    end
    local u = num(AV[op == 'lost' and 7 or 6]) or 0
    local entry, changed = forward_retry(m, AV[5], u)
    return remember(respond('resend', changed, {due = {entry}, attempt = entry.attempt}))
  end
  local reason = 'failure'
  if op == 'lost' then
    stop_waiting(m, AV[6], AV[5])
    if AV[6] == 'timeout' then reason = 'timeout' end
  else
    redis.call('HSET', K, 's:' .. m, 'FAILED', 'e:' .. m, AV[5], 't1:' .. m, NOW)
  end
  local out, changed = {}, false
  if op == 'fail' and AV[7] == '1' and hget('comp:' .. m) then
    redis.call('HSET', K, 'cs:' .. m, 'GAVE_UP', 'ce:' .. m, AV[5], 'ct1:' .. m, NOW)
    redis.call('HINCRBY', K, 'gaveup', 1)
  end
  if status == 'PENDING' or status == 'RUNNING' then
    changed = begin_rollback(m, AV[5], reason)
  elseif status ~= 'COMPENSATING' then
    return remember(respond('late'))
  end
  return remember(respond('rollback', settle(out, changed), {due = out}))
end
OPS.fail = fail_or_lose
OPS.lost = fail_or_lose

-- ARGV: 4 step. Its message expired (expires = its deadline) before any
-- copy began: a timeout of a step that never started, not a failure.
OPS.expire = function()
  local m = AV[4]
  local s = hget('s:' .. m)
  if s ~= 'DISPATCHED' then return respond('duplicate', nil, {step_status = s or ''}) end
  -- Celery expired it by the worker's clock; the store's clock decides. If
  -- the deadline is not due yet, the message is gone anyway and the sweeper
  -- fences the step at its deadline.
  local dl = num(hget('dl:' .. m))
  if not dl or num(NOW) < dl then return respond('early') end
  local out = {}
  if sent_again(m) then return remember(respond('resend', time_out_step(m, out, 0), {due = out})) end
  return remember(respond('rollback', settle(out, time_out_step(m, out, 0)), {due = out}))
end

-- ARGV: 4 step, 5 the attempt that sends it. A long step says it is alive:
-- its heartbeat deadline moves a heartbeat timeout ahead, if that attempt
-- still runs. Not de-duplicated (nothing to redo); the caller throttles it.
OPS.heartbeat = function()
  local m = AV[4]
  local s = hget('s:' .. m)
  if s ~= 'RUNNING' or hget('a:' .. m) ~= AV[5] then return respond('duplicate', nil, {step_status = s or ''}) end
  local hbt = num(hget('hbt:' .. m))
  if not hbt then return respond('recorded') end
  redis.call('HSET', K, 'hbd:' .. m, NOW + hbt)
  return respond('recorded', nil, {heartbeat_timeout = hbt})
end

-- ARGV: 4 the grace (ms) before a finished saga's unsent callback is sent,
-- 5 u, the jitter of any compensation retry this sweep decides.
OPS.sweep = function()
  local out = {}
  -- A waiting saga: repair its locks, maybe start, or give up waiting.
  local lock = lock_sweep()
  local changed
  if lock == 'timeout' then
    changed = settle(out, halt('lock_timeout', 'lock_timeout: waited ' .. secs(hget('lkto')) .. ' for its locks'))
  else
    changed = apply_deadlines(out, num(AV[5]) or 0)
  end
  local fields = {due = out, next_deadline = next_deadline(), redrive = (lock == 'redrive') or nil}
  local sig = pending_callback()
  if sig and not changed and num(NOW) >= num(hget('status_at')) + CALLBACK_GRACE_MS then
    -- Whoever ended the saga died before sending its callback: send it now.
    fields.callback = sig
  end
  local text = respond('swept', changed, fields)
  -- Most sweeps find nothing due: keep no reply for those (nothing to redo).
  if not changed and #out == 0 and not fields.redrive and #ADMITTED == 0 then return text end
  return remember(text)
end

-- ARGV: 4 error. Like a saga timeout, on demand.
OPS.cancel = function()
  if finished(status) then return respond('finished') end
  -- Past its point of no return, a saga finishes forward.
  if hget('past') == '1' then return respond('not_allowed') end
  local out, changed = {}, false
  if status == 'COMPENSATING' then
    each_step(function(m) stop_waiting(m, 'cancelled') end)
  else
    changed = halt('cancelled', AV[4])
  end
  return remember(respond('rollback', settle(out, changed), {due = out}))
end

-- ARGV: 4 step, 5 Celery retries of this message, 6 "1" if redelivered, 7 round,
-- 8 the digest of the plan the message's task was checked against ("": unchecked; see run),
-- 9 the instance token of the worker that runs it ("": none).
OPS.comp_begin = function()
  local m, r = AV[4], AV[7]
  local cs = hget(cf('cs', m, r))
  if cs == 'DISPATCHED' or cs == 'RUNNING' or cs == 'RETRYING' then
    if cs == 'RUNNING' and busy(cf('crt', m, r)) then return respond('busy') end
    local n = redis.call('HINCRBY', K, cf('ca', m, r), 1)
    redis.call('HSET', K, cf('cs', m, r), 'RUNNING', cf('crt', m, r), AV[5])
    redis.call('HSETNX', K, cf('ct0', m, r), NOW)
    mark_worker(cf('cwk', m, r), AV[9])
    return remember(respond('run', false, {attempt = n}))
  end
  if not cs then return respond('not_dispatched') end
  return respond('duplicate')
end

-- ARGV: 4 step, 5 round.
OPS.comp_done = function()
  local m, r = AV[4], AV[5]
  local cs = hget(cf('cs', m, r))
  -- DISPATCHED: its comp_begin was lost (a failover), and it ran.
  if cs ~= 'RUNNING' and cs ~= 'RETRYING' and cs ~= 'DISPATCHED' then return respond('duplicate') end
  if cs == 'DISPATCHED' then redis.call('HINCRBY', K, cf('ca', m, r), 1) end
  redis.call('HSET', K, cf('cs', m, r), 'COMPENSATED', cf('ct1', m, r), NOW)
  if r == '2' then return remember(respond('recorded')) end
  redis.call('HINCRBY', K, 'copen', -1)
  local out = {}
  return remember(respond('rollback', settle(out, false), {due = out}))
end

-- ARGV: 4 step, 5 error, 6 round, 7 u, the jitter of its retry backoff,
-- 8 "1" to give up now (a child saga whose own compensations gave up), 9 the
-- instance token of a worker declared lost (a sweeper): then only an
-- attempt RUNNING on that worker fails.
OPS.comp_fail = function()
  local m, r = AV[4], AV[6]
  local cs = hget(cf('cs', m, r))
  if (AV[9] or '') ~= '' and (cs ~= 'RUNNING' or hget(cf('cwk', m, r)) ~= AV[9]) then return respond('duplicate') end
  if cs ~= 'RUNNING' and cs ~= 'DISPATCHED' then return respond('duplicate') end
  -- DISPATCHED: its comp_begin was lost (a failover); the attempt still counts.
  if cs == 'DISPATCHED' then redis.call('HINCRBY', K, cf('ca', m, r), 1) end
  local failed = compensation_failed(m, r, AV[5], num(AV[7]) or 0, AV[8] == '1')
  local out = {failed}
  local changed = false
  if r == '1' then changed = settle(out, false) end
  local fields = {due = out, attempt = failed.attempt}
  if failed.gave_up then return remember(respond('gave_up', changed, fields)) end
  return remember(respond('backoff', changed, fields))
end

-- ARGV: 4 event, 5 its data (JSON), 6 the error it records if it rejects a
-- wait (built by the caller, see reject_wait). The outside world delivers an event.
-- The first delivery is kept ("ev:<event>") and consumed by the wait for
-- it ("wait:<event>", or the wait it rejects, "rj:<wait>"), now or when the
-- saga gets there; a later one changes nothing and says so (duplicate).
-- Refused (not_allowed) when no wait of the saga can still take it.
OPS.signal = function()
  local ev, data = AV[4], AV[5]
  if finished(status) then return respond('finished') end
  local target, rejects = nil, false
  each_step(function(m)
    if is_wait(m) and string.sub(m, 6) == ev then target = m end
    if is_wait(m) and hget('rj:' .. m) == ev then target, rejects = m, true end
  end)
  if not target then return respond('not_allowed') end
  if hget('ev:' .. ev) then return respond('duplicate') end
  local s = hget('s:' .. target)
  local forward = status == 'PENDING' or status == 'RUNNING'
  -- Over (settled, timed out, fenced), or never to be reached (rolling back).
  if (s and s ~= 'DISPATCHED') or not forward then return respond('not_allowed') end
  redis.call('HSET', K, 'ev:' .. ev, data, 'evt:' .. ev, NOW)
  if rejects and AV[6] and AV[6] ~= '' then redis.call('HSET', K, 'evx:' .. ev, AV[6]) end
  if not s then return remember(respond('recorded')) end  -- kept until the saga gets there
  local changed = false
  if status == 'PENDING' then changed = set_status('RUNNING') end
  if rejects then return reject_wait(target, ev, changed) end
  redis.call('HSETNX', K, 't0:' .. target, NOW)
  return step_completed(target, data, changed)
end

-- ARGV: 4 error. The parent of this child saga rolls back: a running child
-- is cancelled; a completed one is compensated as a unit (its completed
-- steps in reverse order), reason "parent"; one rolling back or ended
-- already is left as it is (finished tells the caller to look at it).
OPS.unwind = function()
  local out = {}
  if status == 'COMPLETED' then
    redis.call('HSET', K, 'reason', 'parent', 'error', AV[4], 'failed_step', '', 'cstage', #stages() - 1)
    redis.call('HSETNX', K, 'copen', '0')
    redis.call('HSETNX', K, 'gaveup', '0')
    redis.call('HDEL', K, 'cbs')
    redis.call('PERSIST', K)
    local changed = set_status('COMPENSATING')
    return remember(respond('rollback', settle(out, changed), {due = out}))
  end
  if status == 'PENDING' or status == 'RUNNING' then
    return remember(respond('rollback', settle(out, halt('cancelled', AV[4])), {due = out}))
  end
  if status == 'COMPENSATING' then return respond('rollback') end
  return respond('finished')
end

-- Not de-duplicated: setting the flag twice is harmless.
OPS.callback_sent = function()
  redis.call('HSET', K, 'cbs', '1')
  return respond('recorded')
end

-- An operator re-drives what gave up in a FAILED saga: the steps that gave
-- up forward (with a fresh budget), or else the compensations.
OPS.retry = function()
  if status == 'FAILED' and hget('reason') == 'forward' then
    -- The steps that gave up, and any sibling still queued: a FAILED saga
    -- runs nothing (begin refuses it), so its message was dropped.
    local out = {}
    each_step(function(m)
      if hget('fg:' .. m) == '1' or hget('s:' .. m) == 'DISPATCHED' then
        redis.call('HDEL', K, 'fg:' .. m, 't1:' .. m)
        redis.call('HSET', K, 'fb0:' .. m, hget('fa:' .. m) or '0')
        dispatch_step(m)
        out[#out + 1] = {step = m, forward = true}
      end
    end)
    if #out == 0 then return respond('not_allowed') end
    redis.call('HINCRBY', K, 'rr', 1)
    redis.call('HDEL', K, 'cbs', 'failed_step', 'error', 'reason')
    local changed = set_status('RUNNING')
    retake_slots()
    redis.call('PERSIST', K)
    return remember(respond('resend', changed, {due = out}))
  end
  if status ~= 'FAILED' or (num(hget('gaveup')) or 0) == 0 then return respond('not_allowed') end
  local out = {}
  each_step(function(m)
    if hget('cs:' .. m) == 'GAVE_UP' then
      dispatch_compensation(m, '1', 0)
      redis.call('HSET', K, 'cb0:' .. m, hget('ca:' .. m) or '0')
      redis.call('HDEL', K, 'ct1:' .. m)
      out[#out + 1] = due_now(m, '1')
    end
  end)
  redis.call('HSET', K, 'gaveup', '0')
  redis.call('HINCRBY', K, 'copen', #out)
  redis.call('HINCRBY', K, 'rr', 1)
  redis.call('HDEL', K, 'cbs')
  local changed = set_status('COMPENSATING')
  retake_slots()
  redis.call('PERSIST', K)
  return remember(respond('rollback', changed, {due = out}))
end

-- Operators may remove any finished saga, even one whose record is damaged.
-- An operator re-runs a saga that ended without completing (celery_saga.rerun).
-- ARGV: 4 the new saga's id, 5 "1" to re-run a saga re-run already. The link
-- is written before the new saga starts, so that two re-runs at once (a bulk
-- run and its repeat) start one saga, not two.
OPS.rerun = function()
  if status ~= 'COMPENSATED' and status ~= 'FAILED' then return respond('not_allowed') end
  local ok, ids = pcall(cjson.decode, hget('rrs') or '[]')
  if not ok or type(ids) ~= 'table' then ids = {} end
  if #ids > 0 and AV[5] ~= '1' then return respond('exists') end
  ids[#ids + 1] = AV[4]
  redis.call('HSET', K, 'rrs', cjson.encode(ids))
  return respond('recorded')
end

OPS.purge = function()
  if not finished(status) then return respond('not_allowed') end
  local name = hget('name') or ''
  purged_name = name
  index_search(false)
  release_locks('purged')
  redis.call('DEL', K)
  return respond('purged', nil, {status = status, name = name})
end

