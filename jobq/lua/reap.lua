-- reap.lua: the workers whose lease lapsed, on the server's clock; none after a stall.
--
-- KEYS[1]  the leases sorted set ({ns}:leases)
-- ARGV[1]  key base, e.g. "{jobq}"
-- ARGV[2]  lease length (ms)
-- ARGV[3]  a stall: this long (ms) without a reap
-- ARGV[4]  the most workers to return
--
-- Reapers call this every tick; {ns}:reaper holds when one last did ("last") and until when
-- none may reap ("after"). A gap longer than ARGV[3] means the server (or every reaper) was
-- stalled: a frozen server, a paused VM. Every lease may have lapsed meanwhile although its
-- holder lives and its renewals are on their way, so nothing is reaped for one lease length:
-- the live renew theirs, and what is still lapsed after that is reaped.
-- Returns worker ids (release.lua then checks each lease again).
local B = ARGV[1]
local now = server_ms()
local clock = B .. ':reaper'
local last = tonumber(redis.call('HGET', clock, 'last'))
local after = tonumber(redis.call('HGET', clock, 'after'))
redis.call('HSET', clock, 'last', now)
if last and now - last > tonumber(ARGV[3]) then
  after = now + tonumber(ARGV[2])
  redis.call('HSET', clock, 'after', after)
end
if after and now < after then return {} end
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
