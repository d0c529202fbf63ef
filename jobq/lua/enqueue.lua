-- enqueue.lua: add jobs, atomically and idempotently by id.
--
-- KEYS[1]  the jobs hash ({ns}:jobs): id -> job spec (JSON, written once, never rewritten)
-- ARGV[1]  key base, e.g. "{jobq}"
-- ARGV[2]  cap on wake tokens per queue
-- ARGV[3]  lease time (ms), for jobs handed straight to an idle worker that did not say its
--          own ({ns}:ilease:<worker>, see idle.lua)
-- ARGV[4..] groups of 5: id, queue, priority, due (ms since the epoch; 0 = now), spec
--
-- A ready job is handed straight to an idle worker of its queue when there is one: the
-- worker registered in {ns}:idle:<queue> (score: when, ms, server clock) and blocks on its own list
-- {ns}:hand:<worker>, which receives "id\nqueue\nspec"; the job is recorded as held by that
-- worker (its held hash, its lease) as a claim would, so it is just as safe, and
-- the worker starts it without another round trip (never a limited job: claim.lua enforces
-- limits). Otherwise the job goes to the end of
-- {ns}:q:<queue>:<priority>; the sorted set {ns}:q:<queue> holds the non-empty priority
-- levels, so a claim finds the best level in O(log levels); a token in {ns}:wake:<queue>
-- wakes an idle worker. A job due later waits in {ns}:scheduled and wakes the scheduler.
-- Returns the number of jobs added (an id already present is skipped).
local B = ARGV[1]
local wake_cap = tonumber(ARGV[2])
local lease = tonumber(ARGV[3])
local jobs = KEYS[1]
local ready, later = {}, {}
local added = 0
for i = 4, #ARGV, 5 do
  local id, q, prio, due, spec = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]),
    ARGV[i + 4]
  if redis.call('HSETNX', jobs, id, spec) == 1 then
    added = added + 1
    if due > 0 then
      redis.call('ZADD', B .. ':scheduled', due, id)
      later[q] = (later[q] or 0) + 1
    else
      if not ready[q] then ready[q] = {} end
      local list = ready[q]
      list[#list + 1] = {tonumber(prio), prio, id, spec, #list + 1,
                          string.sub(spec, 1, #LIMITED_PREFIX) == LIMITED_PREFIX}
    end
  end
end
local now = next(ready) and server_ms()
for q, list in pairs(ready) do
  local handed = 0
  local idle_key = B .. ':idle:' .. q
  local idle = {}
  if redis.call('SISMEMBER', B .. ':suspended', base(q)) == 0 then  -- workers skip a suspended one
    -- the fresh registrations only (idle.lua drops the stale ones, off this path)
    idle = redis.call('ZRANGEBYSCORE', idle_key, now - IDLE_FRESH, '+inf', 'LIMIT', 0, #list)
  end
  if #idle > 0 then
    if #list > 1 then
      table.sort(list, function(a, b)  -- the best jobs go first: priority, then FIFO
        if a[1] ~= b[1] then return a[1] < b[1] end
        return a[5] < b[5]
      end)
    end
    local k = 0  -- the last job looked at: a limited one is never handed (claim.lua
                 -- enforces its limits)
    for _, w in ipairs(idle) do
      while k < #list and list[k + 1][6] do k = k + 1 end
      if k >= #list then break end  -- only limited jobs left: the idle stay idle
      redis.call('ZREM', idle_key, w)  -- handed a job, or busy already (a stale entry)
      if redis.call('EXISTS', B .. ':held:' .. w) == 0 then
        handed = handed + 1
        k = k + 1
        local job = list[k]
        job.handed = true
        redis.call('HSET', B .. ':held:' .. w, job[3], q)
        local own = tonumber(redis.call('GET', B .. ':ilease:' .. w))
        redis.call('ZADD', B .. ':leases', now + (own or lease), w)
        redis.call('RPUSH', B .. ':hand:' .. w, job[3] .. '\n' .. q .. '\n' .. job[4])
      end
    end
    if #list > 1 then
      table.sort(list, function(a, b) return a[5] < b[5] end)  -- back to enqueue order
    end
  end
  local per_level = {}
  for _, job in ipairs(list) do
    if not job.handed then
      if not per_level[job[2]] then per_level[job[2]] = {} end
      table.insert(per_level[job[2]], job[3])
    end
  end
  for prio, ids in pairs(per_level) do push_ready(B, q, prio, ids, false) end
  redis.call('SADD', B .. ':queues', base(q))
  count(B, q, 'processing', handed)
  count(B, q, 'pending', #list - handed)
  count(B, q, 'enqueued', #list)
  wake(B, q, #list - handed, wake_cap)
end
for q, n in pairs(later) do
  redis.call('SADD', B .. ':queues', base(q))
  count(B, q, 'scheduled', n)
  count(B, q, 'enqueued', n)
end
if next(later) then
  local sk = B .. ':sched:wake'
  if redis.call('LLEN', sk) < 4 then redis.call('LPUSH', sk, '1') end
end
return added
