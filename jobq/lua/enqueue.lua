-- enqueue.lua: add jobs to their queues, atomically and idempotently by id.
--
-- KEYS[1]  the jobs hash ({ns}:jobs): id -> job spec (JSON, written once, never rewritten)
-- ARGV[1]  key base, e.g. "{jobq}"
-- ARGV[2]  cap on wake tokens per queue
-- ARGV[3..] groups of 4: id, queue, priority, spec
--
-- A job lives in the list {ns}:q:<queue>:<priority> (FIFO); the sorted set {ns}:q:<queue>
-- holds the non-empty priority levels, so a claim finds the best level in O(log levels).
-- Each enqueue leaves a token in {ns}:wake:<queue>, where idle workers block (BLPOP).
-- Returns the number of jobs added (an id already present is skipped).
local B = ARGV[1]
local wake_cap = tonumber(ARGV[2])
local jobs = KEYS[1]
local per_level = {}   -- level key -> {ids}
local level_of = {}    -- level key -> {queue, priority}
local per_queue = {}   -- queue -> count added
local added = 0
for i = 3, #ARGV, 4 do
  local id, q, prio, spec = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if redis.call('HSETNX', jobs, id, spec) == 1 then
    local lk = B .. ':q:' .. q .. ':' .. prio
    if not per_level[lk] then per_level[lk] = {}; level_of[lk] = {q, prio} end
    table.insert(per_level[lk], id)
    per_queue[q] = (per_queue[q] or 0) + 1
    added = added + 1
  end
end
for lk, ids in pairs(per_level) do
  redis.call('RPUSH', lk, unpack(ids))
  local q, prio = level_of[lk][1], level_of[lk][2]
  redis.call('ZADD', B .. ':q:' .. q, prio, prio)
end
for q, n in pairs(per_queue) do
  redis.call('SADD', B .. ':queues', q)
  local st = B .. ':stats:' .. q
  redis.call('HINCRBY', st, 'pending', n)
  redis.call('HINCRBY', st, 'enqueued', n)
  local wk = B .. ':wake:' .. q
  local room = wake_cap - redis.call('LLEN', wk)
  if room > n then room = n end
  for _ = 1, room do redis.call('LPUSH', wk, '1') end
end
return added
