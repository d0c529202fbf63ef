-- delete_queue.lua: delete a queue and everything in it, in steps, each one atomic.
--
-- KEYS[1]  the jobs hash ({ns}:jobs)
-- ARGV[1]  key base, e.g. "{jobq}"
-- ARGV[2]  queue
-- ARGV[3]  step: "held", "pending", "ids" or "finish" (below)
-- ARGV[4]  now (ms)
-- ARGV[5]  how long the records of dependents cancelled here are kept (s)
-- ARGV[6]  cap on wake tokens per queue
-- ARGV[7]  the reason given to the jobs workers hold (their cancel request)
-- ARGV[8]  COUNT: the most pending jobs to delete in this call ("pending")
-- ARGV[9..] "pending", "finish": the queue's routes (queue~owner: jobs of a script's
--           __main__, see wire.route), besides the queue itself;
--           "ids": job ids, some of which may be scheduled or deferred jobs of the queue
--
-- Each step first suspends the queue: no claim takes a job from it and no enqueue hands one
-- to a worker, so what a step deleted cannot come back as a held job.
--   "held"    the jobs of the queue that workers hold (running, or claimed and not started)
--             are taken from them: a worker's late outcome is dropped as stale (ack.lua), and
--             a cancel request makes its master interrupt the job (JobCancelled).
--   "pending" up to COUNT pending jobs (call again until it deletes none).
--   "ids"     those of the ids that are scheduled (delayed, retries) or deferred jobs of the
--             queue.
--   "finish"  the rest, at once: what arrived since the other steps (held and pending jobs;
--             scheduled and deferred ones, by a scan, only if the counters say some are left),
--             the dead-letter queue and the latest finished ids with their records, the
--             counters, the suspend flag, the idle and wake lists; the queue is forgotten
--             ({ns}:queues), so the next job enqueued to that name starts a new queue.
-- A deleted job counts as failed in its queue.map group, and its waiters are woken; its
-- dependents in other queues are settled as if it failed (cancelled, or run with
-- on_parent_failure="run"); its dependents in the queue are deleted with it.
-- Returns {held, pending, scheduled, deferred, dead-letter} jobs deleted by this call.
local B, q, step = ARGV[1], ARGV[2], ARGV[3]
local now, ttl, wake_cap = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local jobs = KEYS[1]
local deleted = {0, 0, 0, 0, 0}
local HELD, PENDING, SCHEDULED, DEFERRED, DEAD = 1, 2, 3, 4, 5

redis.call('SADD', B .. ':suspended', q)

local function decode(spec)
  local ok, job = pcall(cjson.decode, spec or 'null')
  if ok and type(job) == 'table' then return job end
  return nil
end

-- Whether a spec is one of a job of this queue (on the queue itself or one of its routes).
local function ours(job)
  return job ~= nil and base(spec_queue(job)) == q
end

-- A deferred job of the queue leaves the dependency lists of its parents.
local function undefer(id, job)
  if redis.call('HDEL', B .. ':deps', id) == 0 then return false end
  count(B, q, 'deferred', -1)
  if type(job.dep) == 'table' then
    for _, parent in ipairs(job.dep) do
      local wk = B .. ':waits:' .. tostring(parent)
      redis.call('SREM', wk, id)
      if redis.call('SCARD', wk) == 0 then redis.call('SREM', B .. ':parents', parent) end
    end
  end
  if type(job.dg) == 'table' then  -- the groups it waits for (depends_on=group)
    for _, gid in ipairs(job.dg) do redis.call('SREM', B .. ':gwaits:' .. tostring(gid), id) end
  end
  return true
end

-- Delete jobs already taken out of their list, set or worker (and counted out), with the
-- deferred jobs of the queue that wait for them; then settle their other dependents.
local function drop(ids)
  local gone, stack = {}, {}
  for i = #ids, 1, -1 do stack[#stack + 1] = ids[i] end
  while #stack > 0 do
    local id = table.remove(stack)
    local job = decode(redis.call('HGET', jobs, id))
    redis.call('HDEL', jobs, id)
    redis.call('HDEL', B .. ':state', id)
    gone[#gone + 1] = id
    if job then group_done(B, job.g, 'failed', id) end
    for _, child in ipairs(redis.call('SMEMBERS', B .. ':waits:' .. id)) do
      local cjob = decode(redis.call('HGET', jobs, child))
      if ours(cjob) and undefer(child, cjob) then
        deleted[DEFERRED] = deleted[DEFERRED] + 1
        stack[#stack + 1] = child
      end
    end
  end
  ended_unfinished(B, gone, now, wake_cap, ttl)
end

local function take_held()
  local taken = {}
  for _, worker in ipairs(redis.call('ZRANGE', B .. ':leases', 0, -1)) do
    local held = B .. ':held:' .. worker
    local all = redis.call('HGETALL', held)
    local mine = {}
    for i = 1, #all, 2 do
      local id, route = all[i], all[i + 1]
      if base(route) == q then
        local spec = redis.call('HGET', jobs, id)
        if spec then  -- handed to it and not yet picked up: it never will be
          redis.call('LREM', B .. ':hand:' .. worker, 0, id .. '\n' .. route .. '\n' .. spec)
        end
        redis.call('HDEL', held, id)
        redis.call('HSET', B .. ':cancel', id, ARGV[7])
        count(B, route, 'processing', -1)
        taken[#taken + 1] = id
        mine[#mine + 1] = id
      end
    end
    free_slots(B, worker, mine, wake_cap)
  end
  deleted[HELD] = deleted[HELD] + #taken
  if #taken > 0 then drop(taken) end
end

-- Pop up to `left` ids from the queue's levels and its routes' (nil: all of them).
local function take_pending(left)
  local routes = {q}
  for i = 9, #ARGV do routes[#routes + 1] = ARGV[i] end
  for _, route in ipairs(routes) do
    local levels = B .. ':q:' .. route
    while left == nil or left > 0 do
      local lv = redis.call('ZRANGE', levels, 0, 0)
      if #lv == 0 then break end
      local lk = levels .. ':' .. lv[1]
      local ids = redis.call('LPOP', lk, left or 1000)
      if not ids or redis.call('EXISTS', lk) == 0 then redis.call('ZREM', levels, lv[1]) end
      if ids then
        if left then left = left - #ids end
        local specs = redis.call('HMGET', jobs, unpack(ids))
        local live = {}
        for k, id in ipairs(ids) do
          if specs[k] then
            live[#live + 1] = id
          else  -- a tombstone (cancelled while pending): its record goes too
            redis.call('DEL', B .. ':r:' .. id)
          end
        end
        count(B, route, 'pending', -#live)
        deleted[PENDING] = deleted[PENDING] + #live
        if #live > 0 then drop(live) end
      end
    end
  end
end

-- Those of the ids that are scheduled or deferred jobs of the queue.
local function take_waiting(ids)
  local specs = redis.call('HMGET', jobs, unpack(ids))
  local taken = {}
  for k, id in ipairs(ids) do
    local job = decode(specs[k])
    if ours(job) then
      if redis.call('ZREM', B .. ':scheduled', id) == 1 then
        count(B, q, 'scheduled', -1)
        deleted[SCHEDULED] = deleted[SCHEDULED] + 1
        taken[#taken + 1] = id
      elseif undefer(id, job) then
        deleted[DEFERRED] = deleted[DEFERRED] + 1
        taken[#taken + 1] = id
      end
    end
  end
  if #taken > 0 then drop(taken) end
end

-- Delete the records of ids (finished jobs) in batches.
local function delete_records(ids)
  for i = 1, #ids, 1000 do
    local batch = {}
    for j = i, math.min(i + 999, #ids) do batch[#batch + 1] = B .. ':r:' .. ids[j] end
    redis.call('DEL', unpack(batch))
  end
end

local function scan_waiting()
  local sched = B .. ':scheduled'
  local total = redis.call('ZCARD', sched)
  for start = 0, total - 1, 1000 do  -- by rank from the end: removals do not shift the rest
    local stop = total - 1 - start
    local ids = redis.call('ZRANGE', sched, math.max(0, stop - 999), stop)
    if #ids > 0 then take_waiting(ids) end
  end
  local deferred = redis.call('HKEYS', B .. ':deps')
  for i = 1, #deferred, 1000 do
    take_waiting({unpack(deferred, i, math.min(i + 999, #deferred))})
  end
end

if step == 'held' then
  take_held()
elseif step == 'pending' then
  take_pending(tonumber(ARGV[8]))
elseif step == 'ids' then
  if #ARGV >= 9 then take_waiting({unpack(ARGV, 9)}) end
elseif step == 'finish' then
  take_held()
  take_pending(nil)
  local left = redis.call('HMGET', B .. ':stats:' .. q, 'scheduled', 'deferred')
  if (tonumber(left[1]) or 0) > 0 or (tonumber(left[2]) or 0) > 0 then scan_waiting() end
  local dlq = B .. ':dlq:' .. q
  local dead = redis.call('ZRANGE', dlq, 0, -1)
  delete_records(dead)
  deleted[DEAD] = #dead
  delete_records(redis.call('LRANGE', B .. ':recent:' .. q, 0, -1))
  local gone = {dlq, B .. ':recent:' .. q, B .. ':stats:' .. q}
  local routes = {q}
  for i = 9, #ARGV do routes[#routes + 1] = ARGV[i] end
  for _, route in ipairs(routes) do
    gone[#gone + 1] = B .. ':q:' .. route
    gone[#gone + 1] = B .. ':idle:' .. route
    gone[#gone + 1] = B .. ':wake:' .. route
  end
  redis.call('DEL', unpack(gone))
  redis.call('SREM', B .. ':suspended', q)
  redis.call('SREM', B .. ':queues', q)
else
  return redis.error_reply('delete_queue.lua: unknown step ' .. tostring(step))
end
return deleted
