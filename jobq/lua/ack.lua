-- ack.lua: settle jobs a worker has finished: completed, failed for good, or back for a retry.
--
-- KEYS[1]  the jobs hash ({ns}:jobs)
-- ARGV[1]  key base, e.g. "{jobq}"
-- ARGV[2]  worker id
-- ARGV[3]  now (ms since the epoch)
-- ARGV[4]  how many finished ids to keep per queue in {ns}:recent:<queue>
-- ARGV[5]  how many failed ids to keep per queue in the dead-letter queue {ns}:dlq:<queue>
-- ARGV[6]  cap on wake tokens per queue
-- ARGV[7..] groups of 6: kind, id, queue, priority, ttl (s), payload
--   kind "done"  : payload is the final record; kept ttl seconds (0: not kept)
--   kind "fail"  : payload is the final record; kept ttl seconds, id added to the DLQ
--   kind "retry" : payload is the job's new state; the job goes back to the end of its level
--   kind "later" : payload is the job's new state; the job waits in {ns}:scheduled until ttl
--                  (here: the due time in ms) for the scheduler to promote it
--
-- Only jobs this worker still holds are settled: a job whose lease lapsed was given back to
-- its queue (and may run again elsewhere; at-least-once), so its late result is dropped.
-- Returns the ids that were not held (stale).
local B = ARGV[1]
local worker = ARGV[2]
local now = tonumber(ARGV[3])
local recent_cap = tonumber(ARGV[4])
local dlq_cap = tonumber(ARGV[5])
local wake_cap = tonumber(ARGV[6])
local jobs = KEYS[1]
local held = B .. ':held:' .. worker
local ids = {}
for i = 7, #ARGV, 6 do ids[#ids + 1] = ARGV[i + 1] end
if #ids == 0 then return {} end
local is_held = redis.call('HMGET', held, unpack(ids))
local stale, live, finished = {}, {}, {}
local delta = {}   -- queue -> {processing, completed, failed, retried, pending, scheduled}
local recent = {}  -- queue -> {ids}
local function d(q)
  if not delta[q] then delta[q] = {0, 0, 0, 0, 0, 0}; recent[q] = {} end
  return delta[q]
end
for k = 1, #ids do
  local i = 7 + (k - 1) * 6
  local kind, id, q, prio, ttl, payload =
    ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], tonumber(ARGV[i + 4]), ARGV[i + 5]
  if not is_held[k] then
    stale[#stale + 1] = id
  else
    live[#live + 1] = id
    local c = d(q)
    c[1] = c[1] - 1
    if kind == 'done' or kind == 'fail' then
      finished[#finished + 1] = id
      if ttl > 0 then redis.call('SET', B .. ':r:' .. id, payload, 'EX', ttl) end
      if kind == 'done' then
        c[2] = c[2] + 1
        table.insert(recent[q], id)
      else
        c[3] = c[3] + 1
        local dlq = B .. ':dlq:' .. q
        redis.call('ZADD', dlq, now, id)
        if redis.call('ZCARD', dlq) > dlq_cap then
          redis.call('ZREMRANGEBYRANK', dlq, 0, -dlq_cap - 1)
        end
      end
    elseif kind == 'retry' then
      c[4] = c[4] + 1
      c[5] = c[5] + 1
      redis.call('HSET', B .. ':state', id, payload)
      local levels = B .. ':q:' .. q
      redis.call('RPUSH', levels .. ':' .. prio, id)
      redis.call('ZADD', levels, prio, prio)
    else -- later
      c[4] = c[4] + 1
      c[6] = c[6] + 1
      redis.call('HSET', B .. ':state', id, payload)
      redis.call('ZADD', B .. ':scheduled', ttl, id)
    end
  end
end
if #live > 0 then
  redis.call('HDEL', held, unpack(live))
  redis.call('HDEL', B .. ':active', unpack(live))
end
if #finished > 0 then
  redis.call('HDEL', jobs, unpack(finished))
  redis.call('HDEL', B .. ':state', unpack(finished))
  -- wake whoever waits for these jobs (wait_for_completion registers in {ns}:waiting)
  local waiting = redis.call('HMGET', B .. ':waiting', unpack(finished))
  for k, n in ipairs(waiting) do
    if n and tonumber(n) > 0 then
      local dk = B .. ':done:' .. finished[k]
      for _ = 1, tonumber(n) do redis.call('RPUSH', dk, '1') end
      redis.call('EXPIRE', dk, 300)
    end
  end
end
for q, c in pairs(delta) do
  local st = B .. ':stats:' .. q
  if c[1] ~= 0 then redis.call('HINCRBY', st, 'processing', c[1]) end
  if c[2] ~= 0 then redis.call('HINCRBY', st, 'completed', c[2]) end
  if c[3] ~= 0 then redis.call('HINCRBY', st, 'failed', c[3]) end
  if c[4] ~= 0 then redis.call('HINCRBY', st, 'retried', c[4]) end
  if c[5] ~= 0 then
    redis.call('HINCRBY', st, 'pending', c[5])
    local wk = B .. ':wake:' .. q
    if redis.call('LLEN', wk) < wake_cap then redis.call('LPUSH', wk, '1') end
  end
  if c[6] ~= 0 then redis.call('HINCRBY', st, 'scheduled', c[6]) end
  if #recent[q] > 0 and recent_cap > 0 then
    local rk = B .. ':recent:' .. q
    redis.call('LPUSH', rk, unpack(recent[q]))
    redis.call('LTRIM', rk, 0, recent_cap - 1)
  end
end
return stale
