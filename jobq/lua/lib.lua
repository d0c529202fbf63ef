-- lib.lua: helpers shared by jobq's scripts. scripts.py puts the ones a script uses (and
-- those they use) in front of it, so every script stays one atomic EVALSHA, after the
-- constants jobq/wire.py defines (DEFAULT_QUEUE, DEFAULT_PRIORITY, DEFAULT_MAX_RETRIES,
-- MAX_ERRORS_KEPT, ACK_FIELDS). Each helper is one top-level definition (local function
-- name, local NAME = value, or a forward declaration and its later name = function): what
-- it uses is read from its text. Anything before the first one goes to every script.

-- Now on the server's clock (ms since the epoch). Leases are measured on it, so that a client
-- whose clock is off, or whose call waited in a frozen server, cannot shorten one.
local function server_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- An idle worker's registration (idle.lua) older than this (ms) is from a dead worker.
local IDLE_FRESH = 3000
-- How long the token of a worker's last settled ack batch is kept (s; see ack.lua).
local ACKED_TTL = 3600

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
  if n <= 0 then return end
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
  if #ids == 0 or redis.call('EXISTS', B .. ':waiting') == 0 then return end
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

-- Set the string keys of kv (key, value, key, value, ...), each to expire in ttl seconds:
-- MSETEX (Valkey 9, Redis 8.4) writes them in one command, which costs the server half a
-- microsecond less per key than one SET each; a server without it gets one SET each (the
-- failed attempt costs it one error reply per call).
local MSETEX_MAX = 512  -- keys per MSETEX: unpack() takes its arguments on Lua's C stack
local function set_many(kv, ttl)
  local n = #kv / 2
  for first = 1, n, MSETEX_MAX do
    local last = math.min(n, first + MSETEX_MAX - 1)
    local args = {'MSETEX', last - first + 1}
    for i = 2 * first - 1, 2 * last do args[#args + 1] = kv[i] end
    args[#args + 1] = 'EX'
    args[#args + 1] = ttl
    local reply = redis.pcall(unpack(args))
    if type(reply) == 'table' and reply.err then
      for i = 2 * first - 1, 2 * last, 2 do
        redis.call('SET', kv[i], kv[i + 1], 'EX', ttl)
      end
    end
  end
end

-- Forget a finished job's spec and state, keep its final record for ttl seconds.
local function finish(B, id, record, ttl)
  if ttl > 0 then redis.call('SET', B .. ':r:' .. id, record, 'EX', ttl) end
  redis.call('HDEL', B .. ':jobs', id)
  redis.call('HDEL', B .. ':state', id)
end

-- Settles the jobs waiting for a group when its last job ended (defined below: it calls
-- resolve_children, which calls group_done).
local settle_group

-- Add `by` to a group's count of its jobs in `field` ("done", "failed"); a group of chunks
-- also counts their items ("done_items", "failed_items"): each chunk holds "chunk" items but
-- the last one ("last"), which holds "lastn". meta: the group's total, chunk, last, lastn.
local function group_add(gk, meta, field, id, by)
  redis.call('HINCRBY', gk, field, by)
  local chunk = tonumber(meta[2]) or 1
  if chunk > 1 then
    local n = chunk
    if meta[3] == id then n = tonumber(meta[4]) or chunk end
    redis.call('HINCRBY', gk, field .. '_items', by * n)
  end
end

-- Count a finished member (job id) of a group (queue.map): "done" or "failed" (and its
-- items), and wake its waiters. A group that jobs wait for (depends_on=group: its "dep_ttl"
-- is set) settles them when this was its last job.
local function group_done(B, gid, field, id)
  if gid == nil or gid == '' or gid == cjson.null then return end
  local gk = B .. ':g:' .. gid
  local meta = redis.call('HMGET', gk, 'total', 'chunk', 'last', 'lastn', 'dep_ttl', 'ttl')
  if not meta[1] then return end
  group_add(gk, meta, field, id, 1)
  local ttl = tonumber(meta[6])
  if ttl then
    -- kept ttl seconds after its last job ended, not after map(): a map that runs longer
    -- keeps its counts, and whoever waits for it, while its jobs still end
    redis.call('EXPIRE', gk, ttl)
    redis.call('EXPIRE', B .. ':gi:' .. gid, ttl)
    if meta[5] then redis.call('EXPIRE', B .. ':gwaits:' .. gid, ttl) end
  end
  local wk = B .. ':gw:' .. gid
  redis.call('RPUSH', wk, '1')
  redis.call('LTRIM', wk, -16, -1)
  redis.call('EXPIRE', wk, 3600)
  if meta[5] then settle_group(B, gid) end
end

-- A member of a group that had ended ("done" or "failed") is put back in its queue
-- (requeue.lua): it no longer counts as ended, so that it counts once when it ends again (a
-- group counted twice would look ended, and settle the jobs that wait for it, while another
-- of its jobs still runs).
local function group_undone(B, gid, field, id)
  if gid == nil or gid == '' or gid == cjson.null then return end
  local gk = B .. ':g:' .. gid
  local meta = redis.call('HMGET', gk, 'total', 'chunk', 'last', 'lastn')
  if meta[1] then group_add(gk, meta, field, id, -1) end
end

-- Why a job that waited for a group is cancelled: some of the group's jobs did not complete.
local function group_failed(gid, failed, total)
  return 'parent group ' .. gid .. ' did not complete: ' .. failed .. ' of its ' .. total ..
    ' jobs failed or were cancelled'
end

-- A parent finished: completed (ok) or failed/cancelled for good. Its dependents become
-- pending when their last parent completes; when a parent fails they are cancelled, and
-- theirs in turn (or they run anyway, with on_parent_failure="run"). With group_why the
-- parent is a queue.map group whose jobs all ended (its waiters are in {ns}:gwaits:<group>),
-- and group_why says why its dependents are cancelled if it failed.
local function resolve_children(B, parent, ok, now, wake_cap, ttl, group_why)
  local stack = {{parent, ok, group_why}}
  while #stack > 0 do
    local item = table.remove(stack)
    local pid, pok, why = item[1], item[2], item[3]
    local wk
    if why then
      wk = B .. ':gwaits:' .. pid
    else
      wk = B .. ':waits:' .. pid
      why = 'parent job ' .. pid .. ' did not complete'
      redis.call('SREM', B .. ':parents', pid)
    end
    local children = redis.call('SMEMBERS', wk)
    redis.call('DEL', wk)
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
                      err = {type = 'ParentFailed', msg = why}}
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

-- A group that jobs wait for counted one more finished job: once every job of it ended (for
-- good: a retry is not counted), its waiters are settled as a parent's, ok only if none of its
-- jobs failed; enqueue_one.lua left in the group the settings they need ("dep_ttl",
-- "dep_wake"), which go: the group settles once, and a job enqueued after that sees it ended.
settle_group = function(B, gid)
  local gk = B .. ':g:' .. gid
  local g = redis.call('HMGET', gk, 'total', 'done', 'failed', 'dep_ttl', 'dep_wake')
  local total, failed = tonumber(g[1]), tonumber(g[3]) or 0
  if (tonumber(g[2]) or 0) + failed < total then return end
  redis.call('HDEL', gk, 'dep_ttl', 'dep_wake')
  resolve_children(B, gid, failed == 0, server_ms(), tonumber(g[5]), tonumber(g[4]),
                   group_failed(gid, failed, total))
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
-- for limit `name` ({ns}:lim:wait:<name>, filled by claim.lua), and forget them: a woken
-- worker that still finds them held back puts them there again.
local function wake_waiting(B, name, wake_cap)
  local wk = B .. ':lim:wait:' .. name
  for _, q in ipairs(redis.call('SMEMBERS', wk)) do wake(B, q, 1, wake_cap) end
  redis.call('DEL', wk)
end

-- The names in a limited spec's "lm" (it begins with LIMITED_PREFIX; limit names hold no
-- quote or bracket), each once.
local function limit_names(spec)
  local names, seen = {}, {}
  local body = string.match(spec, '^{"lm":%[([^%]]*)%]')
  if body then
    for name in string.gmatch(body, '"([^"]+)"') do
      if not seen[name] then seen[name] = true; names[#names + 1] = name end
    end
  end
  return names
end

-- Jobs that a worker no longer holds (settled, given back, released, deleted): free the slots
-- claim.lua took for them in their concurrency limits ({ns}:lim:run:<name>), which it noted in
-- the worker's {ns}:limheld:<worker> (id -> names), and wake a worker for what waited on those
-- limits. One EXISTS when the worker holds no limited job: nothing is read per job then.
local function free_slots(B, worker, ids, wake_cap)
  local lk = B .. ':limheld:' .. worker
  if #ids == 0 or redis.call('EXISTS', lk) == 0 then return end
  local held = redis.call('HMGET', lk, unpack(ids))
  local freed, gone = {}, {}  -- limit name -> the ids to free in it; every id freed
  for k, names in ipairs(held) do
    if names then
      for name in string.gmatch(names, '[^\n]+') do
        local f = freed[name]
        if not f then f = {}; freed[name] = f end
        f[#f + 1] = ids[k]
      end
      gone[#gone + 1] = ids[k]
    end
  end
  if #gone > 0 then redis.call('HDEL', lk, unpack(gone)) end
  for name, f in pairs(freed) do
    redis.call('HDEL', B .. ':lim:run:' .. name, unpack(f))
    wake_waiting(B, name, wake_cap)
  end
end
