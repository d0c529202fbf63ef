-- claim.lua: hand up to COUNT pending jobs to one worker: best priority first, FIFO within it.
--
-- KEYS[1]  the jobs hash ({ns}:jobs)
-- ARGV[1]  key base, e.g. "{jobq}"
-- ARGV[2]  worker id
-- ARGV[3]  lease length (ms), from now on the server's clock
-- ARGV[4]  COUNT, the most jobs to claim
-- ARGV[5..] queue names, in claim order (strict priority between queues)
--
-- Each claimed id is recorded in the hash {ns}:held:<worker> (id -> queue: what to give back if
-- the worker dies; lib.lua's holder() finds a job's worker there). The worker's lease in
-- {ns}:leases is pushed to the server's now + ARGV[3]. A cancelled job left in a list is a tombstone: its spec is gone and its
-- final record exists; it is dropped here.
-- Returns a flat array: id, queue, spec, state, ... (spec false when the spec is missing,
-- which the worker fails into the dead-letter queue; state false when the job has none).
local B = ARGV[1]
local worker = ARGV[2]
local need = tonumber(ARGV[4])
local jobs = KEYS[1]
local out = {}
local held = {}
for i = 5, #ARGV do
  if need <= 0 then break end
  local q = ARGV[i]
  if redis.call('SISMEMBER', B .. ':suspended', base(q)) == 0 then
    local levels = B .. ':q:' .. q
    local got = 0
    while need > 0 do
      local lv = redis.call('ZRANGE', levels, 0, 0)
      if #lv == 0 then break end
      local lk = levels .. ':' .. lv[1]
      local ids = redis.call('LPOP', lk, need)
      if not ids or #ids < need or redis.call('EXISTS', lk) == 0 then
        redis.call('ZREM', levels, lv[1])
      end
      if ids then
        local specs = redis.call('HMGET', jobs, unpack(ids))
        local states = {}  -- most jobs have none (never failed)
        if redis.call('EXISTS', B .. ':state') == 1 then
          states = redis.call('HMGET', B .. ':state', unpack(ids))
        end
        for j, id in ipairs(ids) do
          local spec = specs[j]
          if spec or redis.call('EXISTS', B .. ':r:' .. id) == 0 then
            out[#out + 1] = id
            out[#out + 1] = q
            out[#out + 1] = spec
            out[#out + 1] = states[j] or false
            held[#held + 1] = id
            held[#held + 1] = q
            got = got + 1
            need = need - 1
          end
        end
      end
    end
    count(B, q, 'pending', -got)
    count(B, q, 'processing', got)
  end
end
if #held > 0 then
  redis.call('HSET', B .. ':held:' .. worker, unpack(held))
  redis.call('ZADD', B .. ':leases', server_ms() + tonumber(ARGV[3]), worker)
end
return out
