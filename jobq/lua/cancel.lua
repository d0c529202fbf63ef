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
-- Returns "cancelled", or the reason it was not: "running" (recorded in {ns}:cancel: the
-- worker's master interrupts it),
-- "finished", "unknown".
local B = ARGV[1]
local id = ARGV[2]
local now = tonumber(ARGV[3])
local jobs = KEYS[1]
if holder(B, id) then
  -- a worker holds it: record the request (its master signals the worker; ack.lua clears it)
  redis.call('HSET', B .. ':cancel', id, ARGV[5])
  return 'running'
end
local spec = redis.call('HGET', jobs, id)
if not spec then
  if redis.call('EXISTS', B .. ':r:' .. id) == 1 then return 'finished' end
  return 'unknown'
end
local st = decode_state(redis.call('HGET', B .. ':state', id))
local ok, job = pcall(cjson.decode, spec)
if not (ok and type(job) == 'table') then job = {} end
local q = spec_queue(job)
if redis.call('ZREM', B .. ':scheduled', id) == 1 then
  count(B, q, 'scheduled', -1)
elseif redis.call('HDEL', B .. ':deps', id) == 1 then
  count(B, q, 'deferred', -1)
else
  count(B, q, 'pending', -1)  -- its id stays in the list as a tombstone; claim.lua drops it
end
st.s = 'cancelled'
st.fin = now / 1000
st.err = {type = 'Cancelled', msg = ARGV[5]}
finish(B, id, final_record(spec, st), tonumber(ARGV[4]))
count(B, q, 'cancelled', 1)
group_done(B, job.g, 'failed', id)
ended_unfinished(B, {id}, now, 64, tonumber(ARGV[4]))
return 'cancelled'
