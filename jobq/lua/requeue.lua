-- requeue.lua: put a finished job (failed, cancelled, or completed) back in its queue.
--
-- KEYS[1]  the jobs hash ({ns}:jobs)
-- ARGV[1]  key base, e.g. "{jobq}"
-- ARGV[2]  job id
-- ARGV[3]  its final record, as read by the caller: nothing happens if it changed since
-- ARGV[4]  queue
-- ARGV[5]  priority
-- ARGV[6]  spec (JSON, extracted from the record by the caller without re-encoding it)
-- ARGV[7]  new state (JSON): fresh attempts, the history kept
-- ARGV[8]  cap on wake tokens per queue
--
-- A job of a queue.map group no longer counts as ended in its group (lib.lua's group_undone):
-- jobs that depend on the group wait for it again.
-- Returns 1 if requeued, 0 if the record changed or the job is live again.
local B = ARGV[1]
local id, q, prio = ARGV[2], ARGV[4], ARGV[5]
if redis.call('GET', B .. ':r:' .. id) ~= ARGV[3] then return 0 end
if redis.call('HSETNX', KEYS[1], id, ARGV[6]) == 0 then return 0 end
local ok, job = pcall(cjson.decode, ARGV[6])
if ok and type(job) == 'table' and job.g then
  local ok_rec, rec = pcall(cjson.decode, ARGV[3])
  local ended = ok_rec and type(rec) == 'table' and rec.s
  if ended == 'completed' then
    group_undone(B, job.g, 'done', id)
  elseif ended == 'failed' or ended == 'cancelled' then
    group_undone(B, job.g, 'failed', id)
  end
end
redis.call('HSET', B .. ':state', id, ARGV[7])
redis.call('DEL', B .. ':r:' .. id)
redis.call('ZREM', B .. ':dlq:' .. base(q), id)
push_ready(B, q, prio, {id}, false)
redis.call('SADD', B .. ':queues', base(q))
count(B, q, 'pending', 1)
count(B, q, 'requeued', 1)
wake(B, q, 1, tonumber(ARGV[8]))
return 1
