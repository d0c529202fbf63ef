-- cancel.lua: make sure a job that has not started never runs.
--
-- KEYS[1]  the jobs hash ({ns}:jobs)
-- ARGV[1]  key base, e.g. "{jobq}"
-- ARGV[2]  job id
-- ARGV[3]  now (ms since the epoch)
-- ARGV[4]  how long the cancelled record is kept (s); it also marks the id left in its queue
--          list as a tombstone that claim.lua drops, so it must outlive the backlog
-- ARGV[5]  reason
--
-- Returns "cancelled", or the reason it was not: "running" (the caller interrupts the worker),
-- "finished", "unknown".
local B = ARGV[1]
local id = ARGV[2]
local now = tonumber(ARGV[3])
local jobs = KEYS[1]
if redis.call('HEXISTS', B .. ':active', id) == 1 then return 'running' end
local spec = redis.call('HGET', jobs, id)
if not spec then
  if redis.call('EXISTS', B .. ':r:' .. id) == 1 then return 'finished' end
  return 'unknown'
end
local st = {}
local raw = redis.call('HGET', B .. ':state', id)
if raw then
  local ok, decoded = pcall(cjson.decode, raw)
  if ok and type(decoded) == 'table' then st = decoded end
end
local ok, job = pcall(cjson.decode, spec)
local q = (ok and type(job) == 'table' and job.q) or 'default'
local stats = B .. ':stats:' .. q
if redis.call('ZREM', B .. ':scheduled', id) == 1 then
  redis.call('HINCRBY', stats, 'scheduled', -1)
elseif st.s == 'deferred' then
  redis.call('HINCRBY', stats, 'deferred', -1)
else
  redis.call('HINCRBY', stats, 'pending', -1)
end
st.s = 'cancelled'
st.fin = now / 1000
st.err = {type = 'Cancelled', msg = ARGV[5]}
redis.call('SET', B .. ':r:' .. id, '{"spec":' .. spec .. ',' .. string.sub(cjson.encode(st), 2),
  'EX', tonumber(ARGV[4]))
redis.call('HDEL', jobs, id)
redis.call('HDEL', B .. ':state', id)
redis.call('HINCRBY', stats, 'cancelled', 1)
local n = tonumber(redis.call('HGET', B .. ':waiting', id) or '0')
for _ = 1, n do redis.call('RPUSH', B .. ':done:' .. id, '1') end
if n > 0 then redis.call('EXPIRE', B .. ':done:' .. id, 300) end
return 'cancelled'
