-- fire.lua: fire one schedule for one due time, at most once, however many leaders try.
--
-- KEYS[1]  the jobs hash ({ns}:jobs)
-- ARGV[1]  key base, e.g. "{jobq}"
-- ARGV[2]  schedule name
-- ARGV[3]  the due time being fired (ms): the idempotency key, with the name
-- ARGV[4]  the next due time (ms), or -1 when the schedule is done
-- ARGV[5]  now (ms)
-- ARGV[6]  cap on wake tokens per queue
-- ARGV[7..] 0 or 1 group of: job id, queue, priority, spec (0: a missed run that is skipped)
--
-- The schedule's due time in {ns}:sched:due must still be ARGV[3]: a second leader (a paused
-- one waking up) finds it moved on and fires nothing. {ns}:sched:last keeps the last run
-- ({due, fired, job}); a skipped run only adds its due time ("skipped") to it, so a schedule
-- that never ran shows no run. Returns 1 if fired, 0 if not.
local B = ARGV[1]
local name = ARGV[2]
local due_key = B .. ':sched:due'
local current = redis.call('ZSCORE', due_key, name)
if not current or tonumber(current) ~= tonumber(ARGV[3]) then return 0 end
local nxt = tonumber(ARGV[4])
if nxt >= 0 then
  redis.call('ZADD', due_key, nxt, name)
else
  redis.call('ZREM', due_key, name)
end
local last = {due = tonumber(ARGV[3]) / 1000, fired = tonumber(ARGV[5]) / 1000}
if not ARGV[7] then
  local ok, before = pcall(cjson.decode, redis.call('HGET', B .. ':sched:last', name) or 'null')
  last = (ok and type(before) == 'table' and before.job) and before or {}
  last.skipped = tonumber(ARGV[3]) / 1000
else
  local id, q, prio, spec = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
  if redis.call('HSETNX', KEYS[1], id, spec) == 1 then
    push_ready(B, q, prio, {id}, false)
    redis.call('SADD', B .. ':queues', base(q))
    count(B, q, 'pending', 1)
    count(B, q, 'enqueued', 1)
    wake(B, q, 1, tonumber(ARGV[6]))
  end
  last.job = id
end
redis.call('HSET', B .. ':sched:last', name, cjson.encode(last))
return 1
