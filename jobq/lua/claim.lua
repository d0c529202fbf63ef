-- claim.lua: hand up to COUNT pending jobs to one worker: best priority first, FIFO within it,
-- past the jobs their limits hold back.
--
-- KEYS[1]  the jobs hash ({ns}:jobs)
-- ARGV[1]  key base, e.g. "{jobq}"
-- ARGV[2]  worker id
-- ARGV[3]  lease length (ms), from now on the server's clock
-- ARGV[4]  COUNT, the most jobs to claim
-- ARGV[5..] queue names, in claim order (strict priority between queues)
--
-- Each claimed id is recorded in the hash {ns}:held:<worker> (id -> queue: what to give back if
-- the worker dies; lib.lua's holder() finds a job's worker there). The worker's lease in
-- {ns}:leases is pushed to the server's now + ARGV[3]. A cancelled job left in a list is a
-- tombstone: its spec is gone and its final record exists; it is dropped here.
--
-- Limits (jobq/limits.py). A job whose spec begins with LIMITED_PREFIX names its limits; their
-- definitions are in {ns}:limits (a name without one limits nothing). It is claimed only if
-- every limit admits it now:
--   concurrency c: fewer than c ids in {ns}:lim:run:<name> (id -> worker); the claim adds it
--     there, and the names of the limits whose slots it took in the worker's
--     {ns}:limheld:<worker> (id -> names), from which lib.lua's free_slots() frees them when
--     the job stops being held, however that happens;
--   rate n/per, burst b: GCRA on the server's clock: {ns}:lim:rate:<name> "tat" (ms) minus
--     (b - 1) * per/n is not after now; a start moves tat to max(tat, now) + per/n.
-- A job held back stays pending in its place: it is put back at the front of its level, in
-- order, and the claim goes on with the jobs behind it, looking past at most SCAN_MAX held-back
-- jobs per queue and call (beyond them, the queue's jobs further down wait until the head
-- drains; the worker's next queue is looked at all the same). The queue is
-- noted in {ns}:lim:wait:<name>; free_slots() (a slot freed), or a claim that takes a rate's
-- start, wakes an idle worker there. For a rate, one idle worker keeps the time: a claim that
-- got nothing and was held back by a rate becomes the keeper ({ns}:lim:rate:<name> "keeper": when
-- it wakes, ms; "keeper_by": who) unless another one will wake in time, and is told how long
-- to wait (a keeper that woke early keeps it).
--
-- Returns a flat array: the keeper's wait (ms; 0: none), then id, queue, spec, state, ...
-- (spec false when the spec is missing, which the worker fails into the dead-letter queue;
-- state false when the job has none).
local B = ARGV[1]
local worker = ARGV[2]
local need = tonumber(ARGV[4])
local jobs = KEYS[1]
local SCAN_MAX = 100  -- held-back jobs looked past per queue and call
local REPAIR_MAX = 16  -- a full concurrency limit of at most this many is checked for leaks
local out = {0}
local held = {}
local now = nil      -- the server's clock (ms), read once when a rate needs it
local defs = {}      -- limit name -> its definition, or false (unknown: it limits nothing)
local running = {}   -- limit name -> slots in use
local tats = {}      -- limit name -> its rate's tat (ms), as this call moved it
local blocked = {}   -- limit name -> "c" (full), or when its rate allows the next start (ms)
local waiting = {}   -- limit name -> {queue = true}: where it held jobs back
local skipped = 0

local function def_of(name)
  local d = defs[name]
  if d == nil then
    local raw = redis.call('HGET', B .. ':limits', name)
    local ok, v = pcall(cjson.decode, raw or 'null')
    d = false
    if ok and type(v) == 'table' then
      -- only what jobq.limits writes counts: a concurrency of 1 or more; a rate of n > 0
      -- starts per per > 0 seconds, burst 1 or more. Anything else (written by hand) limits
      -- nothing, rather than failing the claim or holding jobs back for good.
      local c, n, per, b = tonumber(v.c), tonumber(v.n), tonumber(v.per), tonumber(v.b or 1)
      d = {}
      if c and c >= 1 then d.c = math.floor(c) end
      if n and n > 0 and per and per > 0 and b and b >= 1 then
        d.n, d.per, d.b = n, per, math.floor(b)
      end
      if not d.c and not d.n then d = false end
    end
    defs[name] = d
  end
  return d
end

-- A full limit's holders that no worker holds any more (a leak: it should not happen) are
-- dropped; returns the slots in use.
local function repair(name)
  local rk = B .. ':lim:run:' .. name
  local all = redis.call('HGETALL', rk)
  for i = 1, #all, 2 do
    if redis.call('HEXISTS', B .. ':held:' .. all[i + 1], all[i]) == 0 then
      redis.call('HDEL', rk, all[i])
      redis.call('HDEL', B .. ':limheld:' .. all[i + 1], all[i])
    end
  end
  return redis.call('HLEN', rk)
end

local function interval(d)
  return tonumber(d.per) * 1000 / tonumber(d.n)
end

-- Whether every limit admits one more job now; else the name of one that does not.
local function admits(names)
  for _, name in ipairs(names) do
    if blocked[name] then return false, name end
    local d = def_of(name)
    if d then
      local c = tonumber(d.c)
      if c then
        if running[name] == nil then
          running[name] = redis.call('HLEN', B .. ':lim:run:' .. name)
          if running[name] >= c and c <= REPAIR_MAX then running[name] = repair(name) end
        end
        if running[name] >= c then blocked[name] = 'c'; return false, name end
      end
      if tonumber(d.n) then
        now = now or server_ms()
        if tats[name] == nil then
          tats[name] = tonumber(redis.call('HGET', B .. ':lim:rate:' .. name, 'tat')) or 0
        end
        local allowed = tats[name] - interval(d) * ((tonumber(d.b) or 1) - 1)
        if allowed > now then blocked[name] = allowed; return false, name end
      end
    end
  end
  return true
end

-- Take a job's slots and starts: counted here at once, written once per call (flush_takes).
local taken = {}    -- concurrency limit name -> {id, worker, id, worker, ...}
local holding = {}  -- {id, the names of the concurrency limits it took, ...}: limheld
local started = {}  -- rate limit name -> true: this call took a start
local function take(id, names)
  local slots = {}
  for _, name in ipairs(names) do
    local d = defs[name]
    if d then
      if tonumber(d.c) then
        local t = taken[name]
        if not t then t = {}; taken[name] = t end
        t[#t + 1] = id
        t[#t + 1] = worker
        running[name] = running[name] + 1
        slots[#slots + 1] = name
      end
      if tonumber(d.n) then
        tats[name] = math.max(tats[name], now) + interval(d)
        started[name] = true
      end
    end
  end
  if #slots > 0 then
    holding[#holding + 1] = id
    holding[#holding + 1] = table.concat(slots, '\n')
  end
end

local function flush_takes()
  for name, t in pairs(taken) do redis.call('HSET', B .. ':lim:run:' .. name, unpack(t)) end
  if #holding > 0 then redis.call('HSET', B .. ':limheld:' .. worker, unpack(holding)) end
  for name in pairs(started) do
    redis.call('HSET', B .. ':lim:rate:' .. name, 'tat', string.format('%.3f', tats[name]))
    -- a start taken: whoever waited for it is woken, to wait for the next one
    wake_waiting(B, name, 1)
  end
end

for i = 5, #ARGV do
  if need <= 0 then break end
  local q = ARGV[i]
  skipped = 0  -- each queue its own budget: a limited backlog at the head of one never
               -- keeps the worker from its other queues
  if redis.call('SISMEMBER', B .. ':suspended', base(q)) == 0 then
    local levels = B .. ':q:' .. q
    local got = 0
    for _, lv in ipairs(redis.call('ZRANGE', levels, 0, -1)) do
      if need <= 0 or skipped >= SCAN_MAX then break end
      local lk = levels .. ':' .. lv
      local back = {}  -- held back, in queue order
      while need > 0 and skipped < SCAN_MAX do
        local ids = redis.call('LPOP', lk, need)
        if not ids then break end
        local specs = redis.call('HMGET', jobs, unpack(ids))
        local states = {}  -- most jobs have none (never failed)
        if redis.call('EXISTS', B .. ':state') == 1 then
          states = redis.call('HMGET', B .. ':state', unpack(ids))
        end
        for j, id in ipairs(ids) do
          local spec = specs[j]
          if spec or redis.call('EXISTS', B .. ':r:' .. id) == 0 then
            local ok, by = true, nil
            if spec and string.sub(spec, 1, #LIMITED_PREFIX) == LIMITED_PREFIX then
              local names = limit_names(spec)
              ok, by = admits(names)
              if ok then take(id, names) end
            end
            if ok then
              out[#out + 1] = id
              out[#out + 1] = q
              out[#out + 1] = spec
              out[#out + 1] = states[j] or false
              held[#held + 1] = id
              held[#held + 1] = q
              got = got + 1
              need = need - 1
            else
              back[#back + 1] = id
              skipped = skipped + 1
              waiting[by] = waiting[by] or {}
              waiting[by][q] = true
            end
          end
        end
      end
      if #back > 0 then
        local rev = {}
        for k = #back, 1, -1 do rev[#rev + 1] = back[k] end
        redis.call('LPUSH', lk, unpack(rev))
      elseif redis.call('EXISTS', lk) == 0 then
        redis.call('ZREM', levels, lv)
      end
    end
    count(B, q, 'pending', -got)
    count(B, q, 'processing', got)
  end
end
flush_takes()  -- before the queues held back are noted as waiting: those stay
for name, qs in pairs(waiting) do
  local wk = B .. ':lim:wait:' .. name
  for q in pairs(qs) do redis.call('SADD', wk, q) end
  local when = blocked[name]
  if when ~= 'c' then
    -- a rate: make sure an idle worker wakes when its next start is allowed
    local sk = B .. ':lim:rate:' .. name
    local kept = redis.call('HMGET', sk, 'keeper', 'keeper_by')
    local keeper = tonumber(kept[1])
    if not keeper or keeper <= now or keeper > when or kept[2] == worker then
      if #out == 1 then  -- this worker claimed nothing: it waits, and keeps the time
        redis.call('HSET', sk, 'keeper', string.format('%.3f', when), 'keeper_by', worker)
        local wait = math.ceil(when - now)
        if out[1] == 0 or wait < out[1] then out[1] = wait end
      else  -- busy now: wake an idle one, which will keep it
        for q in pairs(qs) do wake(B, q, 1, 1) end
      end
    end
  end
end
if #held > 0 then
  redis.call('HSET', B .. ':held:' .. worker, unpack(held))
  redis.call('ZADD', B .. ':leases', server_ms() + tonumber(ARGV[3]), worker)
end
return out
