-- empty.lua: delete up to COUNT pending jobs of a queue (call again until it returns 0).
--
-- KEYS[1]  the jobs hash ({ns}:jobs)
-- ARGV[1]  key base, e.g. "{jobq}"
-- ARGV[2]  queue
-- ARGV[3]  COUNT, the most jobs to delete in this call (keeps each call short)
-- ARGV[4]  now (ms)   ARGV[5] how long the records of dependents cancelled here are kept (s)
-- ARGV[6]  cap on wake tokens per queue
--
-- Jobs a worker holds finish normally; scheduled and deferred jobs are not touched. A deleted
-- job counts as failed in its queue.map group, and its dependents are settled as if it failed
-- (cancelled, or run with on_parent_failure="run").
-- Returns the number of jobs deleted.
local B, q = ARGV[1], ARGV[2]
local levels = B .. ':q:' .. q
local left = tonumber(ARGV[3])
local deleted = 0
while left > 0 do
  local lv = redis.call('ZRANGE', levels, 0, 0)
  if #lv == 0 then break end
  local lk = levels .. ':' .. lv[1]
  local ids = redis.call('LPOP', lk, left)
  if not ids or redis.call('EXISTS', lk) == 0 then redis.call('ZREM', levels, lv[1]) end
  if ids then
    local specs = redis.call('HMGET', KEYS[1], unpack(ids))
    local live, live_specs = {}, {}
    for k, id in ipairs(ids) do
      if specs[k] then
        live[#live + 1] = id
        live_specs[#live] = specs[k]
      end
    end
    if #live > 0 then
      redis.call('HDEL', KEYS[1], unpack(live))
      redis.call('HDEL', B .. ':state', unpack(live))
      for k, id in ipairs(live) do
        local ok, job = pcall(cjson.decode, live_specs[k])
        if ok and type(job) == 'table' then group_done(B, job.g, 'failed', id) end
      end
      ended_unfinished(B, live, tonumber(ARGV[4]), tonumber(ARGV[6]), tonumber(ARGV[5]))
    end
    deleted = deleted + #live
    left = left - #ids
  end
end
count(B, q, 'pending', -deleted)
return deleted
