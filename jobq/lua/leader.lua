-- leader.lua: take or keep the scheduler leadership lease, never by blind overwrite.
--
-- KEYS[1]  the lease key ({ns}:sched:leader): token of the leader, with a TTL
-- ARGV[1]  this scheduler's token
-- ARGV[2]  lease length (ms)
--
-- Returns 1 if the caller leads (took a free lease, or extended its own), else 0.
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
