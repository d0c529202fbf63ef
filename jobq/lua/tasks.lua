-- tasks.lua: what the live announcers of the task catalog say (see jobq/catalog.py).
--
-- KEYS[1]  the set of announcers ({ns}:catalog)
-- ARGV[1]  key base, e.g. "{jobq}"
-- ARGV[2]  a task name, or "" for every task
--
-- Returns a flat list: announcer, task name, description (JSON), ... Announcers whose
-- announcement expired (their master is gone) are dropped from the set on the way.
local out = {}
for _, announcer in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. ':tasks:' .. announcer
  if redis.call('EXISTS', key) == 0 then
    redis.call('SREM', KEYS[1], announcer)
  elseif ARGV[2] ~= '' then
    local entry = redis.call('HGET', key, ARGV[2])
    if entry then
      out[#out + 1] = announcer; out[#out + 1] = ARGV[2]; out[#out + 1] = entry
    end
  else
    local all = redis.call('HGETALL', key)
    for i = 1, #all, 2 do
      if string.sub(all[i], 1, 1) ~= '@' then
        out[#out + 1] = announcer; out[#out + 1] = all[i]; out[#out + 1] = all[i + 1]
      end
    end
  end
end
return out
