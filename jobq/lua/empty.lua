-- empty.lua: delete up to COUNT pending jobs of a queue (call again until it returns 0).
--
-- KEYS[1]  the jobs hash ({ns}:jobs)
-- ARGV[1]  key base, e.g. "{jobq}"
-- ARGV[2]  queue
-- ARGV[3]  COUNT, the most jobs to delete in this call (keeps each call short)
--
-- Jobs a worker holds finish normally; scheduled and deferred jobs are not touched.
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
    local live = {}
    for k, id in ipairs(ids) do
      if specs[k] then live[#live + 1] = id end
    end
    if #live > 0 then
      redis.call('HDEL', KEYS[1], unpack(live))
      redis.call('HDEL', B .. ':state', unpack(live))
      notify_done(B, live)
    end
    deleted = deleted + #live
    left = left - #ids
  end
end
count(B, q, 'pending', -deleted)
return deleted
