-- enqueue.lua: add jobs, atomically and idempotently by id.
--
-- KEYS[1]  the jobs hash ({ns}:jobs): id -> job spec (JSON, written once, never rewritten)
-- ARGV[1]  key base, e.g. "{jobq}"
-- ARGV[2]  cap on wake tokens per queue
-- ARGV[3..] groups of 5: id, queue, priority, due (ms since the epoch; 0 = now), spec
--
-- A ready job goes to the end of the list {ns}:q:<queue>:<priority>; the sorted set
-- {ns}:q:<queue> holds the non-empty priority levels, so a claim finds the best level in
-- O(log levels). Each ready job leaves a token in {ns}:wake:<queue> for an idle worker.
-- A job due later waits in {ns}:scheduled (score: due time) and wakes the scheduler.
-- Returns the number of jobs added (an id already present is skipped).
local B = ARGV[1]
local wake_cap = tonumber(ARGV[2])
local jobs = KEYS[1]
local per_level, level_of, ready, later = {}, {}, {}, {}
local added = 0
for i = 3, #ARGV, 5 do
  local id, q, prio, due, spec = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]),
    ARGV[i + 4]
  if redis.call('HSETNX', jobs, id, spec) == 1 then
    added = added + 1
    if due > 0 then
      redis.call('ZADD', B .. ':scheduled', due, id)
      later[q] = (later[q] or 0) + 1
    else
      local lk = q .. ':' .. prio
      if not per_level[lk] then per_level[lk] = {}; level_of[lk] = {q, prio} end
      table.insert(per_level[lk], id)
      ready[q] = (ready[q] or 0) + 1
    end
  end
end
for lk, ids in pairs(per_level) do
  push_ready(B, level_of[lk][1], level_of[lk][2], ids, false)
end
for q, n in pairs(ready) do
  redis.call('SADD', B .. ':queues', q)
  count(B, q, 'pending', n)
  count(B, q, 'enqueued', n)
  wake(B, q, n, wake_cap)
end
for q, n in pairs(later) do
  redis.call('SADD', B .. ':queues', q)
  count(B, q, 'scheduled', n)
  count(B, q, 'enqueued', n)
end
if next(later) then
  local sk = B .. ':sched:wake'
  if redis.call('LLEN', sk) < 4 then redis.call('LPUSH', sk, '1') end
end
return added
