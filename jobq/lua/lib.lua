-- lib.lua: helpers shared by jobq's scripts. scripts.py puts this text in front of each
-- script, so every script stays one atomic EVALSHA, after the constants jobq/wire.py
-- defines (DEFAULT_QUEUE, DEFAULT_PRIORITY, DEFAULT_MAX_RETRIES, MAX_ERRORS_KEPT,
-- ACK_FIELDS).

-- Now on the server's clock (ms since the epoch). Leases are measured on it, so that a client
-- whose clock is off, or whose call waited in a frozen server, cannot shorten one.
local function server_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A queue as users know it. The jobs of a task in a script's __main__ go on a route of their
-- own, "queue~owner", that only the pool that script started claims from (wire.route); they
-- count, and fail into the dead-letter queue, under their queue.
local function base(q)
  return (string.match(q, '^[^~]*'))
end

-- A spec's route (its queue, or queue~owner), priority (as the level's name) and
-- max_retries, with the defaults wire.py leaves out of specs. A field present as JSON null
-- counts as absent.
local function spec_queue(job)
  local q = DEFAULT_QUEUE
  if type(job.q) == 'string' then q = job.q end
  if type(job.o) == 'string' and job.o ~= '' then q = q .. '~' .. job.o end
  return q
end
local function spec_level(job)
  return tostring(tonumber(job.p) or DEFAULT_PRIORITY)
end
local function spec_retries(job)
  return tonumber(job.r) or DEFAULT_MAX_RETRIES
end

-- Append ids to a queue's level (at the front with `front`), and register the level.
local function push_ready(B, q, prio, ids, front)
  local levels = B .. ':q:' .. q
  redis.call(front and 'LPUSH' or 'RPUSH', levels .. ':' .. prio, unpack(ids))
  redis.call('ZADD', levels, prio, prio)
end

-- The worker that holds a job (claimed, handed, running), or false. The holders are the
-- workers with a lease, each with the hash of what it holds; an index from job to holder
-- would cost the claim and the ack a write each, on every job, for the rare reader (cancel,
-- status).
local function holder(B, id)
  for _, w in ipairs(redis.call('ZRANGE', B .. ':leases', 0, -1)) do
    if redis.call('HEXISTS', B .. ':held:' .. w, id) == 1 then return w end
  end
  return false
end

-- Add n to a counter of a queue's stats.
local function count(B, q, field, n)
  if n ~= 0 then redis.call('HINCRBY', B .. ':stats:' .. base(q), field, n) end
end

-- Leave up to n wake tokens for idle workers of queue q (at most cap waiting).
local function wake(B, q, n, cap)
  local wk = B .. ':wake:' .. q
  local room = cap - redis.call('LLEN', wk)
  if room > n then room = n end
  for _ = 1, room do redis.call('LPUSH', wk, '1') end
end

-- Put a failed job's id in its queue's dead-letter queue, keeping at most cap ids, none
-- older than ttl seconds (their records have expired too).
local function to_dlq(B, q, id, now, cap, ttl)
  local dlq = B .. ':dlq:' .. base(q)
  redis.call('ZADD', dlq, now, id)
  redis.call('ZREMRANGEBYSCORE', dlq, '-inf', now - ttl * 1000)
  if redis.call('ZCARD', dlq) > cap then
    redis.call('ZREMRANGEBYRANK', dlq, 0, -cap - 1)
  end
end

-- Wake the clients blocked on the completion of these ids (see JobQueue.wait).
local function notify_done(B, ids)
  if #ids == 0 then return end
  local waiting = redis.call('HMGET', B .. ':waiting', unpack(ids))
  for k, n in ipairs(waiting) do
    n = tonumber(n)
    if n and n > 0 then
      local dk = B .. ':done:' .. ids[k]
      for _ = 1, n do redis.call('RPUSH', dk, '1') end
      redis.call('EXPIRE', dk, 300)
    end
  end
end

-- Decode a job's state JSON (attempts, errors, status); {} when absent or unreadable.
local function decode_state(raw)
  if not raw then return {} end
  local ok, st = pcall(cjson.decode, raw)
  if ok and type(st) == 'table' then return st end
  return {}
end

-- The final record of a job: its spec (raw JSON text, untouched) and its state; the same
-- shape as wire.final_record builds in Python.
local function final_record(spec, st)
  return '{"spec":' .. (spec or 'null') .. ',' .. string.sub(cjson.encode(st), 2)
end

-- Forget a finished job's spec and state, keep its final record for ttl seconds.
local function finish(B, id, record, ttl)
  if ttl > 0 then redis.call('SET', B .. ':r:' .. id, record, 'EX', ttl) end
  redis.call('HDEL', B .. ':jobs', id)
  redis.call('HDEL', B .. ':state', id)
end

-- Count a finished member (job id) of a group (queue.map): "done" or "failed", and wake its
-- waiters. A group of chunks also counts its items ("done_items", "failed_items"): each chunk
-- holds "chunk" items but the last one ("last"), which holds "lastn".
local function group_done(B, gid, field, id)
  if gid == nil or gid == '' or gid == cjson.null then return end
  local gk = B .. ':g:' .. gid
  local meta = redis.call('HMGET', gk, 'total', 'chunk', 'last', 'lastn')
  if not meta[1] then return end
  redis.call('HINCRBY', gk, field, 1)
  local chunk = tonumber(meta[2]) or 1
  if chunk > 1 then
    local n = chunk
    if meta[3] == id then n = tonumber(meta[4]) or chunk end
    redis.call('HINCRBY', gk, field .. '_items', n)
  end
  local wk = B .. ':gw:' .. gid
  redis.call('RPUSH', wk, '1')
  redis.call('LTRIM', wk, -16, -1)
  redis.call('EXPIRE', wk, 3600)
end

-- A parent finished: completed (ok) or failed/cancelled for good. Its dependents become
-- pending when their last parent completes; when a parent fails they are cancelled, and
-- theirs in turn (or they run anyway, with on_parent_failure="run").
local function resolve_children(B, parent, ok, now, wake_cap, ttl)
  local stack = {{parent, ok}}
  while #stack > 0 do
    local item = table.remove(stack)
    local pid, pok = item[1], item[2]
    local wk = B .. ':waits:' .. pid
    local children = redis.call('SMEMBERS', wk)
    redis.call('DEL', wk)
    redis.call('SREM', B .. ':parents', pid)
    for _, child in ipairs(children) do
      local spec = redis.call('HGET', B .. ':jobs', child)
      local left = redis.call('HGET', B .. ':deps', child)
      if spec and left then
        local job = cjson.decode(spec)
        local q = spec_queue(job)
        if pok or job.opf == 'run' then
          left = redis.call('HINCRBY', B .. ':deps', child, -1)
          if left <= 0 then
            redis.call('HDEL', B .. ':deps', child)
            redis.call('HDEL', B .. ':state', child)
            push_ready(B, q, spec_level(job), {child}, false)
            count(B, q, 'deferred', -1)
            count(B, q, 'pending', 1)
            wake(B, q, 1, wake_cap)
          end
        else
          redis.call('HDEL', B .. ':deps', child)
          local st = {s = 'cancelled', fin = now / 1000,
                      err = {type = 'ParentFailed', msg = 'parent job ' .. pid ..
                             ' did not complete'}}
          finish(B, child, final_record(spec, st), ttl)
          count(B, q, 'deferred', -1)
          count(B, q, 'cancelled', 1)
          group_done(B, job.g, 'failed', child)
          notify_done(B, {child})
          table.insert(stack, {child, false})
        end
      end
    end
  end
end

-- After jobs finished: resolve the dependents of those that have any.
local function finished_parents(B, ids, oks, now, wake_cap, ttl)
  if #ids == 0 or redis.call('SCARD', B .. ':parents') == 0 then return end
  local has = redis.call('SMISMEMBER', B .. ':parents', unpack(ids))
  for k, id in ipairs(ids) do
    if has[k] == 1 then resolve_children(B, id, oks[k], now, wake_cap, ttl) end
  end
end

-- Jobs that ended without completing (failed for good, cancelled, deleted): wake whoever
-- waits on them, and settle their dependents as a failed parent's.
local function ended_unfinished(B, ids, now, wake_cap, ttl)
  notify_done(B, ids)
  local oks = {}
  for k = 1, #ids do oks[k] = false end
  finished_parents(B, ids, oks, now, wake_cap, ttl)
end

-- Limits (jobq/limits.py, claim.lua). Wake one idle worker of each queue where jobs wait
-- for limit `name` ({ns}:lim:<name>:wait, filled by claim.lua), and forget them: a woken
-- worker that still finds them held back puts them there again.
local function wake_waiting(B, name, wake_cap)
  local wk = B .. ':lim:' .. name .. ':wait'
  for _, q in ipairs(redis.call('SMEMBERS', wk)) do wake(B, q, 1, wake_cap) end
  redis.call('DEL', wk)
end

-- Jobs that no worker holds any more (settled, given back, released, deleted): free their
-- slots in the concurrency limits claim.lua took for them ({ns}:limited: id -> the limits'
-- names), and wake a worker for what waited on those limits. One EXISTS when no limited job
-- runs anywhere.
local function free_slots(B, ids, wake_cap)
  if #ids == 0 or redis.call('EXISTS', B .. ':limited') == 0 then return end
  local names = redis.call('HMGET', B .. ':limited', unpack(ids))
  local freed, gone = {}, {}
  for k, held in ipairs(names) do
    if held then
      for name in string.gmatch(held, '[^\n]+') do
        redis.call('HDEL', B .. ':lim:' .. name .. ':run', ids[k])
        freed[name] = true
      end
      gone[#gone + 1] = ids[k]
    end
  end
  if #gone > 0 then redis.call('HDEL', B .. ':limited', unpack(gone)) end
  for name in pairs(freed) do wake_waiting(B, name, wake_cap) end
end
