-- lib.lua: helpers shared by jobq's scripts. scripts.py puts this text in front of each
-- script, so every script stays one atomic EVALSHA.

-- Append ids to a queue's level (at the front with `front`), and register the level.
local function push_ready(B, q, prio, ids, front)
  local levels = B .. ':q:' .. q
  redis.call(front and 'LPUSH' or 'RPUSH', levels .. ':' .. prio, unpack(ids))
  redis.call('ZADD', levels, prio, prio)
end

-- Add n to a counter of a queue's stats.
local function count(B, q, field, n)
  if n ~= 0 then redis.call('HINCRBY', B .. ':stats:' .. q, field, n) end
end

-- Leave up to n wake tokens for idle workers of queue q (at most cap waiting).
local function wake(B, q, n, cap)
  local wk = B .. ':wake:' .. q
  local room = cap - redis.call('LLEN', wk)
  if room > n then room = n end
  for _ = 1, room do redis.call('LPUSH', wk, '1') end
end

-- Put a failed job's id in its queue's dead-letter queue, keeping at most cap ids, none
-- older than ttl seconds (their records have expired too).
local function to_dlq(B, q, id, now, cap, ttl)
  local dlq = B .. ':dlq:' .. q
  redis.call('ZADD', dlq, now, id)
  redis.call('ZREMRANGEBYSCORE', dlq, '-inf', now - ttl * 1000)
  if redis.call('ZCARD', dlq) > cap then
    redis.call('ZREMRANGEBYRANK', dlq, 0, -cap - 1)
  end
end

-- Wake the clients blocked on the completion of these ids (see JobQueue.wait).
local function notify_done(B, ids)
  if #ids == 0 then return end
  local waiting = redis.call('HMGET', B .. ':waiting', unpack(ids))
  for k, n in ipairs(waiting) do
    n = tonumber(n)
    if n and n > 0 then
      local dk = B .. ':done:' .. ids[k]
      for _ = 1, n do redis.call('RPUSH', dk, '1') end
      redis.call('EXPIRE', dk, 300)
    end
  end
end

-- Decode a job's state JSON (attempts, errors, status); {} when absent or unreadable.
local function decode_state(raw)
  if not raw then return {} end
  local ok, st = pcall(cjson.decode, raw)
  if ok and type(st) == 'table' then return st end
  return {}
end

-- The final record of a job: its spec (raw JSON text, untouched) and its state.
local function final_record(spec, st)
  return '{"spec":' .. (spec or 'null') .. ',' .. string.sub(cjson.encode(st), 2)
end

-- Forget a finished job's spec and state, keep its final record for ttl seconds.
local function finish(B, id, record, ttl)
  if ttl > 0 then redis.call('SET', B .. ':r:' .. id, record, 'EX', ttl) end
  redis.call('HDEL', B .. ':jobs', id)
  redis.call('HDEL', B .. ':state', id)
end
