-- idle.lua: a worker waits idle on its queues: producers may hand it a job straight.
--
-- KEYS     none
-- ARGV[1]  key base, e.g. "{jobq}"
-- ARGV[2]  worker id
-- ARGV[3..] its queues
--
-- The worker joins {ns}:idle:<queue> of each, scored with the server's now (ms): enqueue.lua
-- hands a job to an idle worker registered recently (a stale entry is from a dead worker).
-- Returns the number of queues.
local B, worker = ARGV[1], ARGV[2]
local now = server_ms()
for i = 3, #ARGV do redis.call('ZADD', B .. ':idle:' .. ARGV[i], now, worker) end
return #ARGV - 2
