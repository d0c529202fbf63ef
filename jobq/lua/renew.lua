-- renew.lua: extend the leases of live workers, on the server's clock.
--
-- KEYS[1]  the leases sorted set ({ns}:leases): worker id -> lease deadline (ms)
-- ARGV[1]  lease length (ms)
-- ARGV[2..] worker ids
--
-- A lease that is not there (released: the worker holds nothing) is not created (ZADD XX).
-- Returns the number of leases extended.
local deadline = server_ms() + tonumber(ARGV[1])
local n = 0
for i = 2, #ARGV do
  n = n + redis.call('ZADD', KEYS[1], 'XX', 'CH', deadline, ARGV[i])
end
return n
