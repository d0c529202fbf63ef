-- idle.lua: a worker waits idle on its queues: producers may hand it a job straight.
--
-- KEYS[1]  its hand list ({ns}:hand:<worker>), unused: declared so that a node that does not
--          serve the namespace's slot (a Cluster) redirects the call before it runs
-- ARGV[1]  key base, e.g. "{jobq}"
-- ARGV[2]  worker id
-- ARGV[3]  its lease length (ms)
-- ARGV[4..] its queues
--
-- The worker joins {ns}:idle:<queue> of each, scored with the server's now (ms): enqueue.lua
-- hands a job to an idle worker registered recently (a stale entry is from a dead worker:
-- dropped here, so that the enqueue, on the path of a job's latency, only skips them).
-- Its lease length goes to {ns}:ilease:<worker> for as long as the registration is fresh:
-- a job handed to it is leased for the worker's lease, not the producer's (a producer
-- configured with a longer one would otherwise delay the job's return when the worker's
-- host dies before its master's first renewal).
-- A queue with no pending job, or suspended, loses its wake tokens ({ns}:wake:<queue>):
-- they were left by jobs that busy workers claimed without waiting (an enqueue pushes one per
-- job, up to a cap, when no worker is idle), and each would only wake this worker for a claim
-- that finds nothing, then another: at the end of every drain, up to the cap of empty round
-- trips per queue. A job enqueued later pushes its own token (or is handed straight to a
-- worker), and a queue resumed pushes one per pending job.
-- Returns the number of queues.
local B, worker = ARGV[1], ARGV[2]
local now = server_ms()
redis.call('SET', B .. ':ilease:' .. worker, ARGV[3], 'PX', IDLE_FRESH)
for i = 4, #ARGV do
  local idle_key = B .. ':idle:' .. ARGV[i]
  redis.call('ZREMRANGEBYSCORE', idle_key, '-inf', now - IDLE_FRESH)  -- dead workers'
  redis.call('ZADD', idle_key, now, worker)
  if redis.call('EXISTS', B .. ':q:' .. ARGV[i]) == 0
      or redis.call('SISMEMBER', B .. ':suspended', base(ARGV[i])) == 1 then
    redis.call('DEL', B .. ':wake:' .. ARGV[i])
  end
end
return #ARGV - 3
