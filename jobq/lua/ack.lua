-- ack.lua: settle jobs a worker has finished: completed, failed for good, or to run again.
--
-- KEYS[1]  the jobs hash ({ns}:jobs)
-- ARGV[1]  key base, e.g. "{jobq}"
-- ARGV[2]  worker id
-- ARGV[3]  now (ms since the epoch)
-- ARGV[4]  how many finished ids to keep per queue in {ns}:recent:<queue>
-- ARGV[5]  how many failed ids to keep per queue in the dead-letter queue {ns}:dlq:<queue>
-- ARGV[6]  cap on wake tokens per queue
-- ARGV[7]  how long the records of jobs cancelled because a parent failed are kept (s)
-- ARGV[8]  the batch's token ("" for none): a batch sent again with the token of the last
--          batch this worker's acks settled is skipped (see below)
-- ARGV[9..] groups of ACK_FIELDS (7, wire.AckEntry): kind, id, queue, priority, ttl (s) or
--           due (ms), payload, group id ("" when the job is not part of a queue.map group)
--   "done"  : payload is the final record, kept ttl seconds (0: not kept)
--   "fail"  : payload is the final record, kept ttl seconds; the id joins the DLQ
--   "cancel": payload is the final record (cancelled while running), kept ttl seconds
--   "retry" : payload is the job's new state; the job goes back to the end of its level
--   "later" : payload is the job's new state; the job waits in {ns}:scheduled until the
--             due time (ms) given in place of the ttl, for the scheduler to promote it
--
-- Only jobs this worker still holds are settled: a job whose lease lapsed was given back to
-- its queue (and may run again elsewhere: at-least-once), and one deleted with its queue
-- (delete_queue.lua) is gone, so its late result is dropped.
--
-- A worker whose connection broke after it sent a batch does not know whether the batch was
-- settled (the reply was lost), and sends it again, with the same token: {ns}:acked:<worker>
-- holds the token of the last batch settled and what it found stale ("token\nid\nid...", an
-- hour), so a batch settled already is skipped and answered as it was the first time, instead
-- of all its jobs being reported stale, as if given back, when they were not.
-- Returns the ids that were not held (stale).
local FIRST = 9  -- the first ack entry's first field in ARGV
local B = ARGV[1]
local worker = ARGV[2]
local now = tonumber(ARGV[3])
local recent_cap = tonumber(ARGV[4])
local dlq_cap = tonumber(ARGV[5])
local wake_cap = tonumber(ARGV[6])
local dlq_ttl = tonumber(ARGV[7])
local token = ARGV[8]
local held = B .. ':held:' .. worker
local acked = B .. ':acked:' .. worker
if token ~= '' then
  local last = redis.call('GET', acked)
  if last and (last == token or last:sub(1, #token + 1) == token .. '\n') then
    local answer = {}  -- settled already: what it found stale then
    for id in last:sub(#token + 2):gmatch('[^\n]+') do answer[#answer + 1] = id end
    return answer
  end
end
local ids = {}
for i = FIRST, #ARGV, ACK_FIELDS do ids[#ids + 1] = ARGV[i + 1] end
if #ids == 0 then return {} end
local is_held = redis.call('HMGET', held, unpack(ids))
local stale, live, finished, oks = {}, {}, {}, {}
local delta = {}   -- queue -> {processing, completed, failed, retried, pending, scheduled,
                   --           cancelled}
local recent = {}  -- queue -> {ids}
local records = {} -- ttl -> {key, record, key, record, ...}: the final records to keep
local function keep(id, record, ttl)
  if ttl <= 0 then return end
  local r = records[ttl]
  if not r then r = {}; records[ttl] = r end
  r[#r + 1] = B .. ':r:' .. id
  r[#r + 1] = record
end
for k = 1, #ids do
  local i = FIRST + (k - 1) * ACK_FIELDS
  local kind, id, q, prio, ttl, payload, gid =
    ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], tonumber(ARGV[i + 4]), ARGV[i + 5],
    ARGV[i + 6]
  if not is_held[k] then
    stale[#stale + 1] = id
  else
    live[#live + 1] = id
    if not delta[q] then delta[q] = {0, 0, 0, 0, 0, 0, 0}; recent[q] = {} end
    local c = delta[q]
    c[1] = c[1] - 1
    if kind == 'done' then
      keep(id, payload, ttl)
      finished[#finished + 1] = id
      oks[#oks + 1] = true
      c[2] = c[2] + 1
      table.insert(recent[q], id)
      group_done(B, gid, 'done', id)
    elseif kind == 'fail' then
      keep(id, payload, ttl)
      finished[#finished + 1] = id
      oks[#oks + 1] = false
      c[3] = c[3] + 1
      to_dlq(B, q, id, now, dlq_cap, ttl)
      group_done(B, gid, 'failed', id)
    elseif kind == 'cancel' then
      keep(id, payload, ttl)
      finished[#finished + 1] = id
      oks[#oks + 1] = false
      c[7] = c[7] + 1
      group_done(B, gid, 'failed', id)
    elseif kind == 'retry' then
      c[4] = c[4] + 1
      c[5] = c[5] + 1
      redis.call('HSET', B .. ':state', id, payload)
      push_ready(B, q, prio, {id}, false)
    else -- later
      c[4] = c[4] + 1
      c[6] = c[6] + 1
      redis.call('HSET', B .. ':state', id, payload)
      redis.call('ZADD', B .. ':scheduled', ttl, id)
      local sk = B .. ':sched:wake'
      if redis.call('LLEN', sk) < 4 then redis.call('LPUSH', sk, '1') end
    end
  end
end
if #live > 0 then
  redis.call('HDEL', held, unpack(live))
  free_slots(B, worker, live, wake_cap)  -- ended or back in a queue: no longer running
end
for ttl, r in pairs(records) do set_many(r, ttl) end
if #stale > 0 then
  -- a stale job whose spec is gone was deleted with its queue while this worker held it: the
  -- cancel request that interrupted it is cleared here, where nothing else would
  local specs = redis.call('HMGET', KEYS[1], unpack(stale))
  for k, id in ipairs(stale) do
    if not specs[k] then redis.call('HDEL', B .. ':cancel', id) end
  end
end
if #finished > 0 then
  redis.call('HDEL', KEYS[1], unpack(finished))
  -- most jobs have no state (never failed) and no cancel request: one EXISTS per batch
  -- instead of every id through HDEL
  for _, h in ipairs({B .. ':state', B .. ':cancel'}) do
    if redis.call('EXISTS', h) == 1 then redis.call('HDEL', h, unpack(finished)) end
  end
  notify_done(B, finished)
  finished_parents(B, finished, oks, now, wake_cap, dlq_ttl)
end
for q, c in pairs(delta) do
  count(B, q, 'processing', c[1])
  count(B, q, 'completed', c[2])
  count(B, q, 'failed', c[3])
  count(B, q, 'retried', c[4])
  count(B, q, 'pending', c[5])
  count(B, q, 'scheduled', c[6])
  count(B, q, 'cancelled', c[7])
  if c[5] > 0 then wake(B, q, c[5], wake_cap) end
  if #recent[q] > 0 and recent_cap > 0 then
    local rk = B .. ':recent:' .. base(q)
    redis.call('LPUSH', rk, unpack(recent[q]))
    redis.call('LTRIM', rk, 0, recent_cap - 1)
  end
end
-- last: a batch that failed half way (a bug) is not taken for settled when sent again
if token ~= '' then
  redis.call('SET', acked, table.concat({token, unpack(stale)}, '\n'), 'EX', ACKED_TTL)
end
return stale
