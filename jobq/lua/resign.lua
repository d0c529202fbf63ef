-- resign.lua: give up the scheduler leadership lease at once, if it is still ours.
--
-- KEYS[1]  the lease key ({ns}:sched:leader)
-- ARGV[1]  this scheduler's token
--
-- Returns 1 if the lease was ours and is gone, else 0 (another scheduler leads now).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
