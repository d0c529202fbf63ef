"""The bench's bare references: what this machine and server do with no job queue in the way.

Absolute figures do not travel between machines, even of the same kind (2x apart); a figure
divided by a reference measured in the same run, on the same server, does. The references:

* **The bare loop**: the least a Redis job queue does per job, with as many forked worker
  processes as the pool has. Jobs are ids in a sorted set and payloads in a hash. Each
  process claims a batch of :data:`BATCH` (claim: ZPOPMIN → ZADD active → HGET payloads),
  runs the task on each job, and acknowledges the batch (ack: ZREM active + HDEL payloads; no
  result kept) in the same round trip as its next claim, as jobq's workers do, until the set
  is empty::

      parent: fill the set ─► fork N ─► all ready? ─► INFO cpu ─► go ─┐   ┌─► INFO cpu
                                                                      ▼   │
      process i: ┌─► [ack.lua of the last batch +] claim.lua ──► run each job's task
                 └─────────────────────────────────────────────┘ (empty, or one INCR)
                 until a claim comes back empty ─► report (first claim, last ack) ─┘

  Timed from the first claim to the last ack, across processes (``time.time()``: one clock
  for every process).
* **The loop that acknowledges each job** (``acks="each"``): the same, but each job is
  acknowledged on its own as it ends, one round trip each (ack.lua with one id), the claim
  alone in its own: what a queue without batched acknowledgements does, and the loop issue
  13's targets were first set against (18 µs of server CPU per job there; 18.5–20 here,
  against 4.4 for the batched loop).
* **The least real queue** (``real=True``): the bare loop, batched, doing per job what any
  queue that runs tasks must, and nothing more: decode the payload as JSON, look its task up
  by name, call it with its arguments, encode what it returned as JSON, and (``keep``) keep
  that under a key of its own for :data:`RESULT_TTL` seconds, written in the ack (one MSETEX
  per batch where the server has it, as jobq writes results; else a SET each). No lease
  checked, no counter, no journal, no timeout, no retry: the most a Python queue can reach,
  beside the bare loop, which does none of that work.
* **The loop one job at a time** (``task="cpu"``, ``batch=1``): the same, claiming one job per
  round trip (with the last one's ack), as jobq's workers do with long jobs: the reference
  for CPU-heavy jobs beside ``multiprocessing.Pool``, which needs no server at all.
* **The bare hand-off** (:func:`handoff`): a producer LPUSHes its clock's time; as many
  processes as the pool has wait in BLPOP, and the one woken computes the delay: the least
  enqueue-to-start any Redis queue has, where every hop costs a process's wake-up (a few
  hundred microseconds on a virtual machine whose cores were idle). The reference for
  latency.
* **The least at-least-once hand-off** (:func:`held_handoff`): the same, but what a queue that
  loses no job must do at the least on that path: the producer stamps the time, makes an id
  and a JSON spec, and runs one script that records the job (HSETNX) and hands it to a
  process registered idle, recorded as held by it with a lease (HSET, ZADD), on a list of
  its own; each process registers idle and waits on its list in one round trip, decodes the
  spec, takes the time, then acknowledges the job. No counters, no priorities, no limits,
  no timeout, no title: the floor of jobq's own path, beside the bare hand-off's.
* **Round trips**: PING after PING on one connection, each reply waited for the way jobq's
  single enqueue waits for its own (:data:`jobq.queue.REPLY_SPIN`): the reference for
  single enqueue.

The two scripts here are the yardstick, not jobq's protocol (``jobq/lua``, which only
:mod:`jobq.broker` calls): they live here as strings, on keys of their own (the bench's
``jobqbench:`` space, outside jobq's ``{jobqbench}`` namespace; one hash tag, so they would
share a slot on a Cluster).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import queue as queues
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import redis

from .connection import connect
from .job import new_id
from .queue import REPLY_SPIN

#: The bare loop's keys: ids waiting (score: order), ids claimed (score: lease end, ms),
#: payloads by id, and the counter its INCR task increments; then the bare hand-off's.
PENDING = "jobqbench:{ref}:pending"
ACTIVE = "jobqbench:{ref}:active"
PAYLOADS = "jobqbench:{ref}:payloads"
COUNTER = "jobqbench:{ref}:counter"
HANDOFF = "jobqbench:{ref}:handoff"
HANDOFF_OUT = "jobqbench:{ref}:handoff:out"
#: The least at-least-once hand-off's: jobs by id, the takers registered idle, their leases,
#: jobs that found nobody idle; a taker's held jobs and hand list are HELD_OF / HAND_OF + name.
HELD_JOBS = "jobqbench:{ref}:hjobs"
HELD_IDLE = "jobqbench:{ref}:hidle"
HELD_LEASES = "jobqbench:{ref}:hleases"
HELD_QUEUE = "jobqbench:{ref}:hqueue"
HELD_OF = "jobqbench:{ref}:held:"
HAND_OF = "jobqbench:{ref}:hand:"
KEYS = (PENDING, ACTIVE, PAYLOADS, COUNTER, HANDOFF, HANDOFF_OUT, HELD_JOBS, HELD_IDLE,
        HELD_LEASES, HELD_QUEUE)
#: Jobs claimed per round trip.
BATCH = 50
#: The claim's lease (ms): recorded, never enforced (nothing reaps in the bare loop).
LEASE_MS = 15_000
#: A payload the size of a jobq spec of an empty job (~60 bytes).
PAYLOAD = '{"t":"jobq.bench:noop","a":[],"q":"bench","c":1795944382.395}'
#: The least real queue's results: a key each, this prefix and the job's id (the hash tag of
#: the keys above), kept this long (seconds: the result_ttl of jobq's noop scenario).
RESULTS = "jobqbench:{ref}:r:"
RESULT_TTL = 300
#: The bare loop fails if it has not finished within this long (seconds).
STALL = 120.0
#: The tasks of the bare loop: the same work as jobq.bench's noop, incr and cpu.
TASKS = ("empty", "incr", "cpu")
#: How the bare loop acknowledges: a batch with its next claim, or each job on its own.
ACKS = ("batch", "each")

# The shebang: the same script mode as jobq's own scripts (see jobq.scripts).
CLAIM_LUA = """#!lua
-- claim: up to ARGV[1] ids from KEYS[1] (lowest score first) into KEYS[2] (score: ARGV[2],
-- the lease's end); returns id, payload (from the hash KEYS[3]), id, payload, ...
local got = redis.call('ZPOPMIN', KEYS[1], ARGV[1])
if #got == 0 then return {} end
local ids, held = {}, {}
for i = 1, #got, 2 do
  ids[#ids + 1] = got[i]
  held[#held + 1] = ARGV[2]
  held[#held + 1] = got[i]
end
redis.call('ZADD', KEYS[2], unpack(held))
local out = {}
for _, id in ipairs(ids) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[3], id)
end
return out
"""
ACK_LUA = """#!lua
-- ack: the ids ARGV leave the claimed set KEYS[1] and the payload hash KEYS[2]; no result kept
redis.call('ZREM', KEYS[1], unpack(ARGV))
redis.call('HDEL', KEYS[2], unpack(ARGV))
return #ARGV
"""

ACK_KEEP_LUA = """#!lua
-- ack, results kept: ARGV[1] is n, the ids are ARGV[2..n+1] and their results the n after;
-- the ids leave the claimed set KEYS[1] and the payload hash KEYS[2], each result is kept
-- under jobqbench:{ref}:r:<id> for ARGV[2n+2] seconds: one MSETEX where the server has it
-- (Valkey 9, Redis 8.4), else a SET each
local n = tonumber(ARGV[1])
local ids = {unpack(ARGV, 2, n + 1)}
redis.call('ZREM', KEYS[1], unpack(ids))
redis.call('HDEL', KEYS[2], unpack(ids))
local kv = {'MSETEX', n}
for i = 1, n do
  kv[#kv + 1] = 'jobqbench:{ref}:r:' .. ids[i]
  kv[#kv + 1] = ARGV[n + 1 + i]
end
kv[#kv + 1] = 'EX'
kv[#kv + 1] = ARGV[2 * n + 2]
local reply = redis.pcall(unpack(kv))
if type(reply) == 'table' and reply.err then
  for i = 1, n do redis.call('SET', kv[2 * i + 1], kv[2 * i + 2], 'EX', ARGV[2 * n + 2]) end
end
return n
"""

# The least at-least-once hand-off's scripts. KEYS: HELD_JOBS, HELD_IDLE, HELD_LEASES,
# HELD_QUEUE (the same four for each). Both that hand a job over start with this:
_HAND_LUA = """#!lua
-- hand job id (spec) to taker w: held by it, with a lease of lease_ms, on its own list
local function hand(w, id, spec, lease_ms)
  redis.call('HSET', 'jobqbench:{ref}:held:' .. w, id, 1)
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[3], tonumber(t[1]) * 1000 + tonumber(lease_ms), w)
  redis.call('RPUSH', 'jobqbench:{ref}:hand:' .. w, id .. '\\n' .. spec)
end
"""
HAND_ENQUEUE_LUA = _HAND_LUA + """
-- enqueue: record the job ARGV[1] (spec ARGV[2]) once, and hand it to the first taker
-- registered idle, with a lease of ARGV[3] ms; nobody idle: it waits in KEYS[4]
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local w = redis.call('LPOP', KEYS[2])
if w then
  hand(w, ARGV[1], ARGV[2], ARGV[3])
else
  redis.call('RPUSH', KEYS[4], ARGV[1])
end
return 1
"""
HAND_IDLE_LUA = _HAND_LUA + """
-- taker ARGV[1] waits: a job waiting in KEYS[4] is handed to it at once (a lease of ARGV[2]
-- ms), else it is registered idle (once)
local id = redis.call('LPOP', KEYS[4])
if id then
  hand(ARGV[1], id, redis.call('HGET', KEYS[1], id), ARGV[2])
  return 1
end
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('RPUSH', KEYS[2], ARGV[1])
return 0
"""
HAND_ACK_LUA = """#!lua
-- taker ARGV[1] ran job ARGV[2]: it is forgotten, and no longer held
redis.call('HDEL', KEYS[1], ARGV[2])
redis.call('HDEL', 'jobqbench:{ref}:held:' .. ARGV[1], ARGV[2])
return 1
"""
#: The four keys of the hand-off's scripts.
_HELD_KEYS = (HELD_JOBS, HELD_IDLE, HELD_LEASES, HELD_QUEUE)


def burn(n: int) -> int:
    """Pure-Python CPU work: about ``n`` loop iterations (jobq.bench's cpu task, and the bare
    loop's)."""
    total = 0
    for i in range(n):
        total = (total + i * i) % 1000003
    return total


class BareRun(NamedTuple):
    jobs_per_s: float
    #: the server's CPU (its process, all threads) over the timed part, per job (µs)
    server_us_per_job: float


def fill(client: redis.Redis, jobs: int) -> None:
    """Queue ``jobs`` jobs for the bare loop (ids of 24 characters, as jobq's)."""
    client.delete(*KEYS)
    for start in range(0, jobs, 10_000):
        ids = [f"{i:024x}" for i in range(start, min(jobs, start + 10_000))]
        pipe = client.pipeline(transaction=False)
        pipe.zadd(PENDING, {job_id: i for i, job_id in enumerate(ids, start)})
        pipe.hset(PAYLOADS, mapping=dict.fromkeys(ids, PAYLOAD))
        pipe.execute()


def bare_loop(url: str, client: redis.Redis, server_cpu: Callable[[], float], *, jobs: int,
              workers: int, task: str, acks: str = "batch", batch: int = BATCH,
              size: int = 0, real: bool = False, keep: bool = True) -> BareRun:
    """Run the bare loop on ``jobs`` jobs with ``workers`` forked processes; ``task`` is
    "empty", "incr" (one INCR on the process's own connection, as jobq.bench's incr) or
    "cpu" (:func:`burn` of ``size``); ``acks`` "batch" (with the next claim) or "each" (one
    round trip per job); ``batch``: the most jobs a claim takes; ``real``: the least real
    queue (batched acks only), its results kept with ``keep``.
    ``server_cpu`` reads the server's CPU time (s) before and after the timed part. Its keys
    are left for the caller to delete (:data:`KEYS`, and the results: :func:`clear`): the
    counter says what the tasks did."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if acks not in ACKS:
        raise ValueError(f"acks must be one of {ACKS}, got {acks!r}")
    if batch < 1:
        raise ValueError(f"batch must be 1 or more, got {batch}")
    if real and acks != "batch":
        raise ValueError("the least real queue acknowledges in batches (acks='batch')")
    fill(client, jobs)
    ctx = multiprocessing.get_context("fork")
    reports: Any = ctx.Queue()
    go = ctx.Event()
    procs = [ctx.Process(target=_worker, args=(url, task, size, batch, acks == "each", go,
                                                 reports, real, real and keep),
                         daemon=True)
             for _ in range(workers)]
    for p in procs:
        p.start()
    try:
        for _ in range(workers):
            _report(reports, procs)  # connected, scripts loaded
        # nothing of the loop has touched the server yet, and nothing else does until the
        # last report: the CPU read here and after it is the loop's alone
        cpu_before = server_cpu()
        go.set()
        done = [_report(reports, procs) for _ in range(workers)]
        cpu_after = server_cpu()
    finally:
        _join(procs)
    first = min(d[0] for d in done)
    last = max(d[1] for d in done)
    claimed = sum(d[2] for d in done)
    if claimed != jobs:
        raise RuntimeError(f"bench: the bare loop ran {claimed} jobs of {jobs}")
    return BareRun(jobs / (last - first) if last > first else float("inf"),
                   (cpu_after - cpu_before) * 1e6 / jobs)


def _join(procs: list[Any]) -> None:
    """Wait for the processes to end; kill those that do not within 10 s."""
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()


def _report(reports: Any, procs: list[Any]) -> Any:
    deadline = time.monotonic() + STALL
    while True:
        try:
            got = reports.get(timeout=0.5)
        except queues.Empty:
            if time.monotonic() > deadline:
                raise RuntimeError(f"bench: the bare loop stalled ({STALL} s)") from None
            if any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError("bench: a process of the bare loop died") from None
            continue
        if isinstance(got, str):
            raise RuntimeError(f"bench: the bare loop failed: {got}")
        return got


def _worker(url: str, task: str, size: int, batch: int, each: bool, go: Any,
            reports: Any, real: bool = False, keep: bool = False) -> None:
    """One forked process of the bare loop; reports (), then (first claim, last ack, jobs)."""
    try:
        conn = connect(url).connection_pool.get_connection()  # its own socket
        claim_sha, ack_sha = _load(conn, CLAIM_LUA), _load(conn, ACK_LUA)
        keep_sha = _load(conn, ACK_KEEP_LUA) if keep else ""
        run = _task(url, task, size)
        tasks = {json.loads(PAYLOAD)["t"]: run}  # the least real queue's: by name
        reports.put(())
        if not go.wait(STALL):  # the bench is gone: do not linger
            raise RuntimeError("never told to start")
        acks: list[str] = []
        count = 0
        first = time.time()
        while each:  # each job acknowledged as it ends, in a round trip of its own
            conn.send_command("EVALSHA", claim_sha, 3, PENDING, ACTIVE, PAYLOADS, batch,
                              int(time.time() * 1000) + LEASE_MS)
            got = conn.read_response()
            if not got:
                break
            for job_id in got[0::2]:
                run()
                conn.send_command("EVALSHA", ack_sha, 2, ACTIVE, PAYLOADS, job_id)
                conn.read_response()
                count += 1
        results: list[str] = []
        while not each:
            calls: list[tuple[Any, ...]] = []
            if acks and keep:
                calls.append(("EVALSHA", keep_sha, 2, ACTIVE, PAYLOADS, len(acks), *acks,
                              *results, RESULT_TTL))
            elif acks:
                calls.append(("EVALSHA", ack_sha, 2, ACTIVE, PAYLOADS, *acks))
            lease = int(time.time() * 1000) + LEASE_MS
            calls.append(("EVALSHA", claim_sha, 3, PENDING, ACTIVE, PAYLOADS, batch, lease))
            conn.send_packed_command(conn.pack_commands(calls))
            got = [conn.read_response() for _ in calls][-1]
            if not got:
                break
            acks = got[0::2]
            if real:
                results = []
                for payload in got[1::2]:
                    spec = json.loads(payload)
                    results.append(json.dumps(tasks[spec["t"]](*spec["a"])))
            else:
                for _payload in got[1::2]:
                    run()
            count += len(acks)
        reports.put((first, time.time(), count))
    except KeyboardInterrupt:  # Ctrl-C reached the whole process group: the bench says it
        pass
    except Exception as e:  # the parent says it in one line
        reports.put(f"{type(e).__name__}: {e}")


def clear(client: redis.Redis) -> None:
    """Delete the results the least real queue kept (the rest is in :data:`KEYS`)."""
    batch = []
    for key in client.scan_iter(match=RESULTS + "*", count=10_000):
        batch.append(key)
        if len(batch) >= 10_000:
            client.unlink(*batch)
            batch = []
    if batch:
        client.unlink(*batch)


def _load(conn: Any, source: str) -> str:
    conn.send_command("SCRIPT", "LOAD", source)
    sha = str(conn.read_response())
    assert sha == hashlib.sha1(source.encode()).hexdigest()
    return sha


def _empty() -> None:
    return None


def _task(url: str, task: str, size: int) -> Callable[[], Any]:
    if task == "empty":
        return _empty
    if task == "cpu":
        return lambda: burn(size)
    counter = connect(url)  # the task's own connection, as jobq.bench's incr has

    def incr() -> int:
        return int(counter.incr(COUNTER))
    return incr


def round_trips(url: str, count: int) -> float:
    """Unpipelined round trips per second (PING) on one connection of its own."""
    conn = connect(url).connection_pool.get_connection()
    packed = conn.pack_command("PING")
    try:
        conn.send_packed_command(packed)
        conn.read_response()  # connected
        t0 = time.perf_counter()
        for _ in range(count):
            conn.send_packed_command(packed)
            # wait as jobq's enqueue waits for its reply (see jobq.scripts.Scripts.run_many)
            deadline = time.perf_counter() + REPLY_SPIN
            while not conn.can_read(timeout=0) and time.perf_counter() < deadline:
                os.sched_yield()
            conn.read_response()
        return count / (time.perf_counter() - t0)
    finally:
        conn.disconnect()


def handoff(url: str, client: redis.Redis, *, workers: int, count: int,
            spacing: float) -> list[float]:
    """The bare hand-off: ``count`` timestamps LPUSHed ``spacing`` seconds apart, taken by
    ``workers`` forked processes blocked in BLPOP; returns each one's delay (ms), from the
    producer's clock before its push to the taker's after the pop (one clock: ``time.time()``
    in processes of one machine)."""
    client.delete(HANDOFF, HANDOFF_OUT)
    blocked_before = int(client.info("clients")["blocked_clients"])
    ctx = multiprocessing.get_context("fork")
    reports: Any = ctx.Queue()
    procs = [ctx.Process(target=_taker, args=(url, reports), daemon=True)
             for _ in range(workers)]
    for p in procs:
        p.start()
    try:
        for _ in range(workers):
            _report(reports, procs)  # connected: about to block
        # blocked in BLPOP: every taker is, once the server counts them all
        deadline = time.monotonic() + STALL
        while int(client.info("clients")["blocked_clients"]) < blocked_before + workers:
            if time.monotonic() > deadline:
                raise RuntimeError("bench: the bare hand-off's processes never blocked")
            time.sleep(0.005)
        for _ in range(count):
            client.lpush(HANDOFF, repr(time.time()))
            time.sleep(spacing)
        client.lpush(HANDOFF, *["stop"] * workers)
        for _ in range(workers):
            _report(reports, procs)
        return [float(d) for d in client.lrange(HANDOFF_OUT, 0, -1)]
    finally:
        _join(procs)
        client.delete(HANDOFF, HANDOFF_OUT)


def _taker(url: str, reports: Any) -> None:
    """One process of the bare hand-off: pop, take the time, report the delay (ms)."""
    try:
        conn = connect(url)
        conn.ping()
        parent = os.getppid()
        reports.put(())
        while os.getppid() == parent:  # the bench is gone: do not linger
            got = conn.blpop([HANDOFF], timeout=1)
            now = time.time()
            if got is None:
                continue
            if got[1] == "stop":
                break
            conn.rpush(HANDOFF_OUT, (now - float(got[1])) * 1000)
        reports.put(())
    except KeyboardInterrupt:
        pass
    except Exception as e:
        reports.put(f"{type(e).__name__}: {e}")


def held_handoff(url: str, client: redis.Redis, *, workers: int, count: int,
                 spacing: float) -> list[float]:
    """The least at-least-once hand-off: ``count`` jobs enqueued ``spacing`` seconds apart,
    each handed to one of ``workers`` forked processes registered idle (see the module's
    docstring); returns each job's delay (ms), from the producer's clock before it made the
    job to the taker's once it decoded it."""
    names = [f"t{i}" for i in range(workers)]
    mine = [*_HELD_KEYS, HANDOFF_OUT, *(HELD_OF + n for n in names),
            *(HAND_OF + n for n in names)]
    client.delete(*mine)
    ctx = multiprocessing.get_context("fork")
    reports: Any = ctx.Queue()
    procs = [ctx.Process(target=_held_taker, args=(url, name, reports), daemon=True)
             for name in names]
    for p in procs:
        p.start()
    conn = connect(url).connection_pool.get_connection()
    try:
        enqueue = _load(conn, HAND_ENQUEUE_LUA)
        for _ in range(workers):
            _report(reports, procs)  # connected
        deadline = time.monotonic() + STALL
        while client.llen(HELD_IDLE) < workers:  # every taker registered idle
            if time.monotonic() > deadline:
                raise RuntimeError("bench: the hand-off's processes never registered")
            time.sleep(0.005)
        for _ in range(count):
            now = time.time()
            job_id = new_id()
            spec = json.dumps({"t": "jobq.bench:latency", "a": [now]}, separators=(",", ":"))
            conn.send_command("EVALSHA", enqueue, len(_HELD_KEYS), *_HELD_KEYS, job_id, spec,
                              LEASE_MS)
            conn.read_response()
            time.sleep(spacing)
        for name in names:
            client.rpush(HAND_OF + name, "-\nstop")
        for _ in range(workers):
            _report(reports, procs)
        return [float(d) for d in client.lrange(HANDOFF_OUT, 0, -1)]
    finally:
        conn.disconnect()
        _join(procs)
        client.delete(*mine)


def _held_taker(url: str, name: str, reports: Any) -> None:
    """One process of the least at-least-once hand-off."""
    try:
        client = connect(url)
        idle, ack = client.script_load(HAND_IDLE_LUA), client.script_load(HAND_ACK_LUA)
        hand = HAND_OF + name
        parent = os.getppid()
        reports.put(())
        while os.getppid() == parent:  # the bench is gone: do not linger
            pipe = client.pipeline(transaction=False)
            pipe.evalsha(idle, len(_HELD_KEYS), *_HELD_KEYS, name, LEASE_MS)
            pipe.blpop([hand], timeout=1)
            got = pipe.execute()[1]
            if got is None:
                continue
            job_id, spec = got[1].split("\n", 1)
            if spec == "stop":
                break
            sent = json.loads(spec)["a"][0]
            delay = (time.time() - sent) * 1000
            pipe = client.pipeline(transaction=False)
            pipe.evalsha(ack, len(_HELD_KEYS), *_HELD_KEYS, name, job_id)
            pipe.rpush(HANDOFF_OUT, delay)
            pipe.execute()
        reports.put(())
    except KeyboardInterrupt:
        pass
    except Exception as e:
        reports.put(f"{type(e).__name__}: {e}")
