-- announce.lua: replace one announcer's part of the task catalog (see jobq/catalog.py).
--
-- KEYS[1]  the set of announcers ({ns}:catalog)
-- ARGV[1]  key base, e.g. "{jobq}"
-- ARGV[2]  the announcer: a master's id, or a lone worker's name
-- ARGV[3]  its generation: a reload's workers replace what the older code announced, and an
--          older generation never replaces a newer one
-- ARGV[4]  how long the announcement lives unless renewed (ms)
-- ARGV[5..] pairs: task name, its description (JSON)
--
-- Returns 1 if announced, 0 if a newer generation had announced already.
local key = ARGV[1] .. ':tasks:' .. ARGV[2]
local current = tonumber(redis.call('HGET', key, '@generation'))
if current and current > tonumber(ARGV[3]) then return 0 end
redis.call('DEL', key)
redis.call('HSET', key, '@generation', ARGV[3])
for i = 5, #ARGV, 2 do
  redis.call('HSET', key, ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', key, ARGV[4])
redis.call('SADD', KEYS[1], ARGV[2])
return 1
