-- promote.lua: move jobs whose time has come from {ns}:scheduled to their queues.
--
-- KEYS[1]  the jobs hash ({ns}:jobs)
-- ARGV[1]  key base, e.g. "{jobq}"
-- ARGV[2]  now (ms since the epoch)
-- ARGV[3]  the most jobs to move in this call
-- ARGV[4]  cap on wake tokens per queue
--
-- A job keeps its priority; a retry keeps its state (attempts, errors) and status "retry".
-- Returns {moved, due time of the next scheduled job in ms or -1}.
local B = ARGV[1]
local now = tonumber(ARGV[2])
local wake_cap = tonumber(ARGV[4])
local sched = B .. ':scheduled'
local ids = redis.call('ZRANGEBYSCORE', sched, '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local per_queue = {}
if #ids > 0 then
  local specs = redis.call('HMGET', KEYS[1], unpack(ids))
  for k, id in ipairs(ids) do
    local ok, job = pcall(cjson.decode, specs[k] or 'null')
    if ok and type(job) == 'table' then
      local q = spec_queue(job)
      push_ready(B, q, spec_level(job), {id}, false)
      per_queue[q] = (per_queue[q] or 0) + 1
    else
      -- no spec (cancelled meanwhile, or garbage): a claim would fail it into the DLQ
      push_ready(B, DEFAULT_QUEUE, tostring(DEFAULT_PRIORITY), {id}, false)
      per_queue[DEFAULT_QUEUE] = (per_queue[DEFAULT_QUEUE] or 0) + 1
    end
  end
  redis.call('ZREM', sched, unpack(ids))
end
for q, n in pairs(per_queue) do
  count(B, q, 'scheduled', -n)
  count(B, q, 'pending', n)
  wake(B, q, n, wake_cap)
end
local nxt = redis.call('ZRANGE', sched, 0, 0, 'WITHSCORES')
return {#ids, nxt[2] and tonumber(nxt[2]) or -1}
