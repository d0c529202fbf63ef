-- enqueue_one.lua: add one job that needs more than enqueue.lua does: parents it waits for
-- (depends_on: jobs, queue.map groups) and/or a unique key.
--
-- KEYS[1]  the jobs hash ({ns}:jobs)
-- ARGV[1]  key base, e.g. "{jobq}"
-- ARGV[2]  cap on wake tokens per queue
-- ARGV[3]  id          ARGV[4] queue          ARGV[5] priority
-- ARGV[6]  due (ms since the epoch; 0 = now)   ARGV[7] spec (its "opf" field: "run" means
--          run even if a parent fails; otherwise a failed parent cancels this job)
-- ARGV[8]  unique key ("" for none)            ARGV[9] how long the key holds (s)
-- ARGV[10] now (ms)    ARGV[11] how long the record of a job cancelled here is kept (s)
-- ARGV[12] how many parent jobs (n)
-- ARGV[13..12+n] parent job ids; ARGV[13+n..] parent group ids (queue.map groups)
--
-- A job with unfinished parents waits as deferred: {ns}:deps holds how many parents it still
-- waits for, {ns}:waits:<parent> its children, {ns}:parents the ids that have children. The
-- last parent to complete moves it to its queue (see resolve_children in lib.lua).
-- A group is a parent that finishes when each of its jobs ended for good (its counters in
-- {ns}:g:<group>, read here in the same atomic step: a group that ended before is not waited
-- for); its waiters are in {ns}:gwaits:<group>, and the group keeps what settling them needs
-- ("dep_ttl", "dep_wake": see settle_group in lib.lua). A group with a failed or cancelled
-- job counts as a failed parent.
-- Returns {outcome, id}: "added", "deferred", "cancelled" (a parent already failed),
-- "exists" (the unique key is held: id is that job), "duplicate" (the id exists),
-- "unknown_parent" (id is the parent job that does not exist), "unknown_group" (id is the
-- group that does not exist, or expired).
local B = ARGV[1]
local wake_cap = tonumber(ARGV[2])
local id, q, prio, due, spec = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7]
local ukey = ARGV[8]
local now = tonumber(ARGV[10])
local first_group = 13 + tonumber(ARGV[12])
if ukey ~= '' then
  local holder = redis.call('GET', B .. ':u:' .. ukey)
  if holder then return {'exists', holder} end
end
local live, live_groups, failed = {}, {}, nil  -- failed: why this job is cancelled
for i = 13, first_group - 1 do
  local parent = ARGV[i]
  if redis.call('HEXISTS', KEYS[1], parent) == 1 then
    live[#live + 1] = parent
  else
    local final = redis.call('GET', B .. ':r:' .. parent)
    if not final then return {'unknown_parent', parent} end
    local ok, rec = pcall(cjson.decode, final)
    if not (ok and type(rec) == 'table' and rec.s == 'completed') then
      failed = 'parent job ' .. parent .. ' did not complete'
    end
  end
end
for i = first_group, #ARGV do
  local gid = ARGV[i]
  local g = redis.call('HMGET', B .. ':g:' .. gid, 'total', 'done', 'failed')
  if not g[1] then return {'unknown_group', gid} end
  local total, gfailed = tonumber(g[1]), tonumber(g[3]) or 0
  if (tonumber(g[2]) or 0) + gfailed < total then
    live_groups[#live_groups + 1] = gid
  elseif gfailed > 0 then
    failed = group_failed(gid, gfailed, total)
  end
end
if redis.call('HSETNX', KEYS[1], id, spec) == 0 then return {'duplicate', id} end
if ukey ~= '' then redis.call('SET', B .. ':u:' .. ukey, id, 'EX', tonumber(ARGV[9])) end
redis.call('SADD', B .. ':queues', base(q))
count(B, q, 'enqueued', 1)
local job = cjson.decode(spec)
if failed and job.opf ~= 'run' then
  local st = {s = 'cancelled', fin = now / 1000, err = {type = 'ParentFailed', msg = failed}}
  finish(B, id, final_record(spec, st), tonumber(ARGV[11]))
  count(B, q, 'cancelled', 1)
  group_done(B, job.g, 'failed', id)
  return {'cancelled', id}
end
if #live + #live_groups > 0 then
  for _, parent in ipairs(live) do
    redis.call('SADD', B .. ':waits:' .. parent, id)
  end
  if #live > 0 then redis.call('SADD', B .. ':parents', unpack(live)) end
  for _, gid in ipairs(live_groups) do
    local gk, wk = B .. ':g:' .. gid, B .. ':gwaits:' .. gid
    redis.call('SADD', wk, id)
    redis.call('HSET', gk, 'dep_ttl', ARGV[11], 'dep_wake', wake_cap)
    local left = redis.call('PTTL', gk)  -- the waiters go with the group
    if left > 0 then redis.call('PEXPIRE', wk, left) end
  end
  redis.call('HSET', B .. ':deps', id, #live + #live_groups)
  count(B, q, 'deferred', 1)
  return {'deferred', id}
end
if due > 0 then
  redis.call('ZADD', B .. ':scheduled', due, id)
  count(B, q, 'scheduled', 1)
  local sk = B .. ':sched:wake'
  if redis.call('LLEN', sk) < 4 then redis.call('LPUSH', sk, '1') end
else
  push_ready(B, q, prio, {id}, false)
  count(B, q, 'pending', 1)
  wake(B, q, 1, wake_cap)
end
return {'added', id}
