-- release.lua: give back every job a worker held, because it died or its lease lapsed.
--
-- KEYS[1]  the jobs hash ({ns}:jobs)
-- ARGV[1]  key base, e.g. "{jobq}"
-- ARGV[2]  worker id
-- ARGV[3]  now (ms since the epoch), for the times written in records
-- ARGV[4]  cause, recorded in the job's errors ("worker killed by signal 9 (SIGKILL)", ...)
-- ARGV[5]  id of the job the worker was running, "" when unknown (lease lapsed: every held
--          job may have started), "-" when it was running none
-- ARGV[6]  max deliveries: a job whose holder vanished this many times is failed as poison
-- ARGV[7]  how long failed records are kept (s)
-- ARGV[8]  dead-letter queue cap per queue
-- ARGV[9]  cap on wake tokens per queue
-- ARGV[10] "1": only if the worker's lease has lapsed on the server's clock (the reaper),
--          "0": unconditionally
-- ARGV[11..] the worker's queues: it is taken off their idle lists
--
-- The running job counts one attempt that failed (n, with a WorkerLost error) and one lost
-- holder (d); with the running job unknown every held job counts one lost holder that may
-- not have started it (d and u: a delivery, not an attempt). Jobs prefetched but not started
-- go back to the front of their level untouched. A job out of attempts, or whose holder
-- vanished max deliveries times (poison), is failed into its queue's dead-letter queue with
-- the cause. (wire.py documents the state's fields.)
-- Returns {requeued ids}, {failed ids}; or false when the lease had not lapsed.
local B = ARGV[1]
local worker = ARGV[2]
local now = tonumber(ARGV[3])
local cause = ARGV[4]
local current = ARGV[5]
local max_deliveries = tonumber(ARGV[6])
local failed_ttl = tonumber(ARGV[7])
local dlq_cap = tonumber(ARGV[8])
local wake_cap = tonumber(ARGV[9])
local jobs = KEYS[1]
local held_key = B .. ':held:' .. worker
if ARGV[10] == '1' then
  local deadline = redis.call('ZSCORE', B .. ':leases', worker)
  if deadline and tonumber(deadline) > server_ms() then return false end
end
local held = redis.call('HGETALL', held_key)
local ids = {}
for i = 1, #held, 2 do ids[#ids + 1] = held[i] end
free_slots(B, worker, ids, wake_cap)  -- first: the loop may finish (delete) some of them
redis.call('DEL', B .. ':limheld:' .. worker)
local requeued, failed = {}, {}
-- last claimed first: each is pushed to the front of its level, so they keep their order
for i = #held - 1, 1, -2 do
  local id, q = held[i], held[i + 1]
  local spec = redis.call('HGET', jobs, id)
  local ok_spec, job = pcall(cjson.decode, spec or 'null')
  if not ok_spec or type(job) ~= 'table' then job = nil end
  local st = decode_state(redis.call('HGET', B .. ':state', id))
  if type(st.e) ~= 'table' then st.e = {} end
  local started = current == '' or current == id
  local reason = nil
  if started then
    st.d = (tonumber(st.d) or 0) + 1
    if current ~= '' then
      st.n = (tonumber(st.n) or 0) + 1
      local entry = {type = 'WorkerLost', msg = cause, t = now / 1000, n = st.n}
      if (tonumber(st.rq) or 0) > 0 then entry.rq = tonumber(st.rq) end
      table.insert(st.e, entry)
      -- the latest errors only, as wire.add_error keeps them
      while #st.e > MAX_ERRORS_KEPT do table.remove(st.e, 1) end
    else
      st.u = (tonumber(st.u) or 0) + 1
    end
    local retries = job and spec_retries(job) or DEFAULT_MAX_RETRIES
    if job == nil then
      reason = 'job data is missing or not a JSON object'
    elseif (tonumber(st.n) or 0) > retries then
      reason = cause
    elseif st.d >= max_deliveries then
      reason = 'poison job: delivered ' .. st.d .. ' times and its holder vanished each time ('
        .. cause .. ')'
    end
  end
  count(B, q, 'processing', -1)
  if reason then
    st.s = 'failed'
    st.fin = now / 1000
    st.w = worker
    st.err = {type = 'WorkerLost', msg = reason}
    finish(B, id, final_record(job and spec or nil, st), failed_ttl)
    to_dlq(B, q, id, now, dlq_cap, failed_ttl)
    count(B, q, 'failed', 1)
    if job then group_done(B, job.g, 'failed', id) end
    failed[#failed + 1] = id
  else
    if started then
      st.s = 'retry'
      redis.call('HSET', B .. ':state', id, cjson.encode(st))
      count(B, q, 'retried', 1)
    end
    push_ready(B, q, job and spec_level(job) or tostring(DEFAULT_PRIORITY), {id}, true)
    count(B, q, 'pending', 1)
    wake(B, q, 1, wake_cap)
    requeued[#requeued + 1] = id
  end
end
ended_unfinished(B, failed, now, wake_cap, failed_ttl)
if current ~= '' and current ~= '-' and redis.call('HEXISTS', jobs, current) == 0 then
  -- the job it ran is finished, or was deleted with its queue (delete_queue.lua) while it
  -- ran: no cancel request of it is left behind
  redis.call('HDEL', B .. ':cancel', current)
end
redis.call('DEL', held_key)
redis.call('DEL', B .. ':hand:' .. worker)  -- what was handed to it is in held_key too
-- a worker that stopped, or died, sends no batch again; one whose lease lapsed may be alive
-- (cut off), and its token must still answer a batch it sends again (ack.lua)
if ARGV[10] == '0' then redis.call('DEL', B .. ':acked:' .. worker) end
redis.call('ZREM', B .. ':leases', worker)
for i = 11, #ARGV do redis.call('ZREM', B .. ':idle:' .. ARGV[i], worker) end
return {requeued, failed}
