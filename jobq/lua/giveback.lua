-- giveback.lua: a worker gives back jobs it holds but never started, untouched.
--
-- KEYS[1]  the jobs hash ({ns}:jobs)
-- ARGV[1]  key base, e.g. "{jobq}"
-- ARGV[2]  worker id
-- ARGV[3]  cap on wake tokens per queue
-- ARGV[4..] job ids
--
-- Used after a lost reply: a claim the server ran but whose answer never arrived left jobs
-- held by a worker that does not know it has them, or a job was handed to it
-- ({ns}:hand:<worker>) while it could not take it. They go back to the front of their level,
-- and out of the worker's hand list (else it would run a job it no longer holds, which
-- another worker runs too).
-- Returns the number given back.
local B, worker = ARGV[1], ARGV[2]
local held = B .. ':held:' .. worker
local n = 0
for i = #ARGV, 4, -1 do  -- last first, so that LPUSH keeps their order
  local id = ARGV[i]
  local q = redis.call('HGET', held, id)
  if q then
    local spec = redis.call('HGET', KEYS[1], id)
    if spec then
      redis.call('LREM', B .. ':hand:' .. worker, 0, id .. '\n' .. q .. '\n' .. spec)
    end
    local ok, job = pcall(cjson.decode, spec or 'null')
    if not (ok and type(job) == 'table') then job = {} end
    redis.call('HDEL', held, id)
    free_slots(B, worker, {id}, tonumber(ARGV[3]))
    push_ready(B, q, spec_level(job), {id}, true)
    count(B, q, 'processing', -1)
    count(B, q, 'pending', 1)
    wake(B, q, 1, tonumber(ARGV[3]))
    n = n + 1
  end
end
return n
