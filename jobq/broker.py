"""The broker: every conversation jobq has with Redis, as one typed method each.

Callers say what they want (claim these queues for this worker, settle these entries, give
back what this worker held); the broker knows which script or command does it, builds its
arguments from :mod:`jobq.keys` and :mod:`jobq.wire`, and turns redis-py's untyped replies
into typed values. It is the only module that calls a Lua script (one file per operation in
``jobq/lua``, each opening with its KEYS/ARGV contract), and it holds the constants those
calls share.

::

    producers (queue, groups, scheduler API) ─┐
    the worker loop (claim, ack, wait)        ├──► Broker ──► scripts.py / redis-py ──► server
    the master's duties, the scheduler daemon ┘        keys.py (names), wire.py (formats)
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import redis
from redis.exceptions import NoScriptError

from .config import Config
from .connection import block_limit, blpop_by
from .exceptions import ReplicationTimeout
from .keys import Keys
from .scripts import Scripts
from .wire import ACK_FIELDS, ROUTE, AckEntry, route

#: Wake tokens kept per queue when no worker is idle (each wakes one idle worker).
WAKE_CAP = 64
#: Finished job ids remembered per queue (for listings), newest first.
RECENT_MAX = 1000
#: Jobs per enqueue script call in a bulk enqueue (bounded so one call stays short).
ENQUEUE_CHUNK = 1000
#: Most delayed jobs promoted per script call (the caller repeats until none is due).
PROMOTE_BATCH = 2000
#: Most expired leases handled per reap (the rest wait for the next tick).
REAP_BATCH = 32
#: Jobs deleted per call of empty.lua, and per call of delete_queue.lua's steps.
EMPTY_BATCH = 1000
#: Records of jobs cancelled on the server (a parent failed, cancelled before they ran) are
#: kept at least this long (seconds): a cancelled id left in its queue list is a tombstone
#: that the record marks, so it must outlive the backlog.
CANCELLED_TTL_MIN = 86400
#: How long a token for a client waiting on a job lives (seconds).
DONE_TOKEN_TTL = 300
#: Snapshots of the counters kept for rates (see :mod:`jobq.info`).
SNAPSHOTS_KEPT = 30
#: Most control requests a master takes in one poll.
CONTROL_BATCH = 100
#: Tokens kept in the scheduler's wake list (one is enough to wake it).
SCHED_WAKE_CAP = 4
#: The server counts as stalled when no reaper ran for half a lease (leases lapse when
#: renewals cannot land for about two thirds of one), or STALL_TICKS of the reaper's ticks if
#: that is longer (see reap.lua; reapers tick at most every sixth of a lease).
STALL_TICKS = 3
#: Most groups kept in the index of recent groups (``{ns}:groups``, for ``jobq web``): the
#: oldest go first, whatever their age, so that many small maps a second cannot grow it
#: beyond this.
GROUP_INDEX_CAP = 10_000


#: A job handed to a worker: (job id, queue, spec, state), spec and state as stored (None when
#: absent). A plain tuple: a busy worker gets thousands a second, made in C by ``zip``.
Claimed = tuple[str, str, str | None, str | None]


class NewJob(NamedTuple):
    """A job to enqueue: ``due_ms`` 0 for now; ``spec`` is the encoded spec."""

    job_id: str
    queue: str
    priority: int
    due_ms: int
    spec: str


class Exchanged(NamedTuple):
    """What one exchange did: the ids whose results were stale (their lease had lapsed), the
    jobs claimed, and, when it claimed nothing because a rate limit held jobs back, how long
    this worker waits (seconds) to keep the limit's time (see claim.lua); else None."""

    stale: list[str]
    claimed: list[Claimed]
    keep_time: float | None = None


class LimitUse(NamedTuple):
    """A limit's definition (JSON, None if it has none) and use right now: jobs holding its
    slots, queues where it holds jobs back, its rate's GCRA time (epoch seconds, None: never
    used)."""

    definition: str | None
    running: int
    waiting: list[str]
    tat: float | None


class Released(NamedTuple):
    """What giving back a worker's jobs did: ids requeued, and ids failed for good."""

    requeued: list[str]
    failed: list[str]

    def describe(self, worker: str, cause: str) -> str | None:
        """One log line saying what was given back (None when the worker held nothing)."""
        if not self.requeued and not self.failed:
            return None
        failed = f" ({', '.join(self.failed[:5])})" if self.failed else ""
        return (f"gave back the jobs of worker {worker} ({cause}): {len(self.requeued)} "
                f"requeued, {len(self.failed)} failed{failed}")


class QueueDeleted(NamedTuple):
    """What deleting a queue deleted: jobs workers held (running, or claimed and not started:
    interrupted, their outcome dropped), pending, scheduled (delayed, retries), deferred, and
    in its dead-letter queue."""

    running: int = 0
    pending: int = 0
    scheduled: int = 0
    deferred: int = 0
    dead: int = 0

    def plus(self, other: QueueDeleted) -> QueueDeleted:
        return QueueDeleted(*(a + b for a, b in zip(self, other, strict=True)))


class JobParts(NamedTuple):
    """Everything Redis holds about one job, as stored (see :func:`jobq.queue.read_job`)."""

    final: str | None
    spec: str | None
    state: str | None
    holder: str | None
    due_ms: float | None
    deferred: bool


class Broker:
    """The job protocol on one client (a ``redis.Redis`` made by :func:`jobq.connection.
    connect`, which decodes replies to ``str``), for one key namespace and config."""

    def __init__(self, client: redis.Redis, keys: Keys, config: Config) -> None:
        self.client = client
        self.keys = keys
        self.config = config
        self.scripts = Scripts(client)
        self._r: Any = client  # redis-py's replies are untyped: they are typed here, once
        self._block_max = block_limit(client)

    @property
    def lease_ms(self) -> int:
        return int(self.config.lease_time * 1000)

    @property
    def cancelled_ttl(self) -> int:
        """How long the record of a job cancelled on the server is kept (seconds)."""
        return max(self.config.failed_ttl, CANCELLED_TTL_MIN)

    def _block(self, timeout: float) -> float:
        """A blocking command's timeout: ``timeout`` (0: as long as may be), within the
        client's read timeout (the caller loops until what it waits for happened)."""
        return min(timeout, self._block_max) if timeout > 0 else self._block_max

    def disconnect(self) -> None:
        """Drop the pooled connections (after a blocking call was interrupted: a reply may
        be half read)."""
        self.client.connection_pool.disconnect()

    # -- enqueue ---------------------------------------------------------------------------------
    def _enqueue_head(self) -> list[Any]:
        return [self.keys.base, WAKE_CAP, self.lease_ms]

    def enqueue(self, job: NewJob, *, spin: float = 0.0, replicas: int = 0) -> int:
        """Add one job (enqueue.lua): handed to an idle worker, queued, or scheduled. With
        ``replicas``, wait for that many replicas to have it (see :meth:`_replicated`)."""
        argv = [*self._enqueue_head(), *job]
        if not replicas:
            return int(self.scripts.run("enqueue", [self.keys.jobs], argv, spin=spin))
        reply, acked = self.scripts.run_and_wait("enqueue", [self.keys.jobs], argv,
                                                 replicas=replicas, spin=spin,
                                                 timeout=self.config.wait_replicas_timeout)
        self._replicated([job.job_id], replicas, acked)
        return int(reply)

    def enqueue_many(self, jobs: Sequence[NewJob], *, replicas: int = 0) -> None:
        """Add many jobs in one round trip, in atomic chunks of :data:`ENQUEUE_CHUNK`; with
        ``replicas``, then wait for that many replicas to have them."""
        def fill(pipe: Any) -> None:
            for start in range(0, len(jobs), ENQUEUE_CHUNK):
                argv = self._enqueue_head()
                for job in jobs[start:start + ENQUEUE_CHUNK]:
                    argv += job
                self.scripts.queue_sha(pipe, "enqueue", [self.keys.jobs], argv)
            if replicas and jobs:  # a pipeline is one connection: WAIT follows its writes
                pipe.execute_command("WAIT", replicas, self._wait_ms)

        replies = self.scripts.execute(fill, "enqueue")
        if replicas and jobs:
            self._replicated([j.job_id for j in jobs], replicas, int(replies[-1]))

    def enqueue_one(self, job: NewJob, *, unique_key: str = "", unique_ttl: int = 0,
                    parents: Sequence[str] = (), groups: Sequence[str] = (),
                    replicas: int = 0) -> tuple[str, str]:
        """Add a job with parents (jobs, and ``queue.map`` groups) and/or a unique key
        (enqueue_one.lua); returns (outcome, id): see the script for the outcomes.
        ``replicas``: as for :meth:`enqueue`."""
        argv = [self.keys.base, WAKE_CAP, *job, unique_key, unique_ttl,
                int(time.time() * 1000), self.cancelled_ttl, len(parents), *parents, *groups]
        if not replicas:
            outcome, ref = self.scripts.run("enqueue_one", [self.keys.jobs], argv)
            return str(outcome), str(ref)
        (outcome, ref), acked = self.scripts.run_and_wait(
            "enqueue_one", [self.keys.jobs], argv, replicas=replicas,
            timeout=self.config.wait_replicas_timeout)
        self._replicated([job.job_id], replicas, acked)
        return str(outcome), str(ref)

    @property
    def _wait_ms(self) -> int:
        return max(1, int(self.config.wait_replicas_timeout * 1000))

    def _replicated(self, job_ids: list[str], replicas: int, acked: int) -> None:
        """WAIT's answer: fewer replicas than asked acknowledged the writes within
        ``wait_replicas_timeout``: raise :class:`ReplicationTimeout` (the jobs are on the
        primary; never a silent success)."""
        if acked < replicas:
            raise ReplicationTimeout(job_ids, replicas, acked, self.config.wait_replicas_timeout)

    def create_group(self, group_id: str, meta: dict[str, Any], job_ids: Sequence[str],
                     ttl: int) -> None:
        """Write a ``queue.map`` group's bookkeeping (before its jobs are enqueued)."""
        k = self.keys
        pipe = self._r.pipeline()
        pipe.hset(k.group(group_id), mapping=meta)
        for start in range(0, len(job_ids), 5000):
            pipe.rpush(k.group_ids(group_id), *job_ids[start:start + 5000])
        pipe.expire(k.group(group_id), ttl)
        pipe.expire(k.group_ids(group_id), ttl)
        # the index of recent groups: made with the group, in the same transaction; the
        # entries older than the group's TTL go (a group of a map that runs for longer may
        # outlive its entry: it is still found by its id)
        created = float(meta.get("created") or time.time())
        pipe.zadd(k.groups, {group_id: created})
        pipe.zremrangebyscore(k.groups, "-inf", f"({created - ttl}")
        pipe.zremrangebyrank(k.groups, 0, -GROUP_INDEX_CAP - 1)
        pipe.execute()

    # -- read ------------------------------------------------------------------------------------
    def job_parts(self, job_id: str) -> JobParts:
        """Everything stored about a job, in one round trip."""
        k = self.keys
        def fill(pipe: Any) -> None:
            pipe.get(k.result(job_id)).hget(k.jobs, job_id).hget(k.state, job_id)
            self.scripts.queue_sha(pipe, "holder", [k.leases], [k.base, job_id])
            pipe.zscore(k.scheduled, job_id).hget(k.deps, job_id)

        replies = self.scripts.execute(fill, "holder")
        final, spec, state, holder, due, deps = replies
        return JobParts(final, spec, state, _opt_str(holder), due, deps is not None)

    def dependents(self, job_id: str) -> list[str]:
        """The deferred jobs still waiting for this one (``depends_on``), sorted."""
        return sorted(str(i) for i in self._r.smembers(self.keys.waits(job_id)))

    def final_record(self, job_id: str) -> str | None:
        return _opt_str(self._r.get(self.keys.result(job_id)))

    def stats(self, queue: str) -> dict[str, int]:
        """A queue's counters (see keys.py), each at least 0."""
        raw = self._r.hgetall(self.keys.stats(queue))
        return {str(name): max(0, int(value)) for name, value in raw.items()}

    def counter(self, queue: str, name: str) -> int:
        return max(0, int(self._r.hget(self.keys.stats(queue), name) or 0))

    def counters(self) -> dict[str, dict[str, int]]:
        """Every queue's counters, by queue name."""
        queues = self.queue_names()
        pipe = self._r.pipeline(transaction=False)
        for q in queues:
            pipe.hgetall(self.keys.stats(q))
        return {q: {str(k): max(0, int(v)) for k, v in raw.items()}
                for q, raw in zip(queues, pipe.execute(), strict=True)}

    def queue_names(self) -> list[str]:
        """Every queue name used on this server, sorted."""
        return sorted(str(q) for q in self._r.smembers(self.keys.queues))

    def queue_exists(self, queue: str) -> bool:
        return bool(self._r.sismember(self.keys.queues, queue))

    def active_holder(self, job_id: str) -> str | None:
        """The worker that holds the job (claimed or running), if any (holder.lua)."""
        return _opt_str(self.scripts.run("holder", [self.keys.leases], [self.keys.base,
                                                                         job_id]) or None)

    def scan_jobs(self, cursor: int, count: int) -> tuple[int, list[str]]:
        """One page of live job ids (HSCAN of the jobs hash); cursor 0 when done."""
        cursor, ids = self._r.hscan(self.keys.jobs, cursor, count=count)
        return int(cursor), [str(i) for i in ids]

    def recent_ids(self, queue: str, limit: int) -> list[str]:
        """The latest finished ids of a queue, newest first."""
        return [str(i) for i in self._r.lrange(self.keys.recent(queue), 0, limit)]

    def delete_record(self, job_id: str) -> bool:
        """Forget a finished job: its record, and its id in any dead-letter queue."""
        removed = self._r.delete(self.keys.result(job_id))
        for queue in self.queue_names():
            self._r.zrem(self.keys.dlq(queue), job_id)
        return bool(removed)

    # -- wait for a job --------------------------------------------------------------------------
    def watch(self, job_id: str) -> None:
        """Ask to be woken when the job finishes (see :meth:`wait_done`)."""
        self._r.hincrby(self.keys.waiting, job_id, 1)

    def unwatch(self, job_id: str) -> None:
        if int(self._r.hincrby(self.keys.waiting, job_id, -1)) <= 0:
            self._r.hdel(self.keys.waiting, job_id)

    def wait_done(self, job_id: str, timeout: float) -> None:
        """Block until a watched job finishes, or ``timeout`` seconds (0: as long as the
        connection allows; the caller looks again)."""
        self._r.blpop([self.keys.done(job_id)], timeout=self._block(timeout))

    # -- cancel, requeue, empty, suspend ---------------------------------------------------------
    def cancel(self, job_id: str, reason: str) -> str:
        """cancel.lua: "cancelled", "running" (its master will interrupt it), "finished" or
        "unknown"."""
        return str(self.scripts.run("cancel", [self.keys.jobs], [
            self.keys.base, job_id, int(time.time() * 1000), self.cancelled_ttl, reason]))

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self._r.hexists(self.keys.cancel, job_id))

    def master_requests(self, master_id: str, job_ids: Sequence[str]
                        ) -> tuple[list[str | None], list[str]]:
        """What a master polls, in one round trip: for each job its workers run, the reason
        it was asked to stop, or None; and the control requests sent to the master (taken:
        each is read once)."""
        pipe = self._r.pipeline(transaction=False)
        if job_ids:
            pipe.hmget(self.keys.cancel, list(job_ids))
        pipe.lpop(self.keys.control(master_id), CONTROL_BATCH)
        replies = pipe.execute()
        asked = [_opt_str(r) for r in replies[0]] if job_ids else []
        return asked, [str(r) for r in replies[-1] or ()]

    def request_control(self, master_id: str, request: str, ttl: int) -> None:
        """Queue a control request for a master (dropped after ``ttl`` seconds untaken)."""
        key = self.keys.control(master_id)
        self._r.pipeline(transaction=False).rpush(key, request).expire(key, ttl).execute()

    def withdraw_control(self, master_id: str, request: str) -> bool:
        """Take back a control request the master has not taken yet; whether it was there."""
        return bool(self._r.lrem(self.keys.control(master_id), 1, request))

    def requeue(self, job_id: str, record: str, queue: str, priority: int, spec: str,
                state: str) -> bool:
        """requeue.lua: put a finished job back in its queue if its record is unchanged."""
        return bool(self.scripts.run("requeue", [self.keys.jobs], [
            self.keys.base, job_id, record, queue, priority, spec, state, WAKE_CAP]))

    def empty(self, queue: str) -> int:
        """Delete every pending job of a queue, in short script calls; returns how many."""
        total = 0
        while True:
            n = int(self.scripts.run("empty", [self.keys.jobs], [
                self.keys.base, queue, EMPTY_BATCH, int(time.time() * 1000),
                self.cancelled_ttl, WAKE_CAP]))
            total += n
            if n == 0:
                return total

    def delete_queue(self, queue: str) -> QueueDeleted:
        """Delete a queue and everything in it (delete_queue.lua, in steps: each one atomic
        and short but the last, which finishes at once whatever arrived meanwhile)."""
        routes = sorted(self.keys.queue_of_levels(str(k)) for k in self._r.scan_iter(
            match=self.keys.levels(route(queue, "*")), count=1000, _type="zset"))
        reason = f"its queue {queue} was deleted"

        def step(name: str, *args: Any) -> QueueDeleted:
            out = self.scripts.run("delete_queue", [self.keys.jobs], [
                self.keys.base, queue, name, int(time.time() * 1000), self.cancelled_ttl,
                WAKE_CAP, reason, EMPTY_BATCH, *args])
            return QueueDeleted(*(int(n) for n in out))

        total = step("held")  # first: a held job's retry would come back after the others
        while True:
            batch = step("pending", *routes)
            total = total.plus(batch)
            if not batch.pending:
                break
        # the scheduled and deferred jobs of every queue are in one set and one hash: go
        # through them a page at a time; the script deletes those of this queue
        for page in self._pages_of_waiting_ids():
            total = total.plus(step("ids", *page))
        return total.plus(step("finish", *routes))

    def _pages_of_waiting_ids(self) -> Iterator[list[str]]:
        """The ids of every scheduled and deferred job, a page at a time (ZSCAN, HSCAN: an id
        that is there all along is seen at least once)."""
        cursor = 0
        while True:
            cursor, pairs = self._r.zscan(self.keys.scheduled, cursor, count=EMPTY_BATCH)
            if pairs:
                yield [str(member) for member, _ in pairs]
            if int(cursor) == 0:
                break
        while True:
            cursor, fields = self._r.hscan(self.keys.deps, cursor, count=EMPTY_BATCH)
            if fields:
                yield [str(f) for f in fields]
            if int(cursor) == 0:
                break

    def dlq_ids(self, queue: str, start: int = 0, stop: int = -1, *,
                newest_first: bool = False) -> list[str]:
        key = self.keys.dlq(queue)
        ids = (self._r.zrevrange(key, start, stop) if newest_first
               else self._r.zrange(key, start, stop))
        return [str(i) for i in ids]

    def dlq_count(self, queue: str) -> int:
        return int(self._r.zcard(self.keys.dlq(queue)))

    def dlq_counts(self, queues: Sequence[str]) -> list[int]:
        pipe = self._r.pipeline(transaction=False)
        for q in queues:
            pipe.zcard(self.keys.dlq(q))
        return [int(n) for n in pipe.execute()]

    def drop_from_dlq(self, queue: str, job_ids: Sequence[str]) -> None:
        if job_ids:
            self._r.zrem(self.keys.dlq(queue), *job_ids)

    def purge_dlq(self, queue: str) -> int:
        """Delete a dead-letter queue and the records of its jobs; returns how many."""
        ids = self.dlq_ids(queue)
        pipe = self._r.pipeline()
        for start in range(0, len(ids), 1000):
            pipe.delete(*[self.keys.result(i) for i in ids[start:start + 1000]])
        pipe.delete(self.keys.dlq(queue))
        pipe.execute()
        return len(ids)

    def suspend(self, queue: str) -> None:
        self._r.sadd(self.keys.suspended, queue)

    def resume(self, queue: str) -> None:
        """Claim from the queue again; wake as many idle workers as it has pending jobs."""
        pending = min(self.counter(queue, "pending"), WAKE_CAP)
        pipe = self._r.pipeline()
        pipe.srem(self.keys.suspended, queue)
        if pending:
            pipe.lpush(self.keys.wake(queue), *["1"] * pending)
        pipe.execute()

    def is_suspended(self, queue: str) -> bool:
        return bool(self._r.sismember(self.keys.suspended, queue))

    def suspended_queues(self) -> set[str]:
        return {str(q) for q in self._r.smembers(self.keys.suspended)}

    # -- the worker ------------------------------------------------------------------------------
    def exchange(self, worker: str, acks: Sequence[Any], queues: Sequence[str], want: int, *,
                 now: float | None = None, token: str = "") -> Exchanged:
        """One round trip: settle ``acks`` (flat ack entry fields, see :class:`wire.AckEntry`)
        with ack.lua and claim up to ``want`` jobs from ``queues`` with claim.lua. ``token``
        names the batch of acks: sent again with the same token (its reply was lost), a
        batch settled already is skipped, not reported stale."""
        calls = self._exchange_calls(worker, acks, queues, want, now, token)
        if not calls:
            return Exchanged([], [])
        return self._exchanged(self.scripts.run_many(calls), bool(acks), want)

    def send_exchange(self, worker: str, acks: Sequence[Any], queues: Sequence[str],
                      want: int, *, token: str = "") -> None:
        """:meth:`exchange`, sent without waiting for its reply: :meth:`read_exchange`
        reads it (with the same ``acks`` and ``want``); nothing else may use the scripts'
        connection in between."""
        self.scripts.send_many(self._exchange_calls(worker, acks, queues, want, None, token))

    def read_exchange(self, acks: Sequence[Any], want: int) -> Exchanged:
        return self._exchanged(self.scripts.read_many(), bool(acks), want)

    def _exchange_calls(self, worker: str, acks: Sequence[Any], queues: Sequence[str],
                        want: int, now: float | None,
                        token: str) -> list[tuple[str, list[str], list[Any]]]:
        now = time.time() if now is None else now
        calls: list[tuple[str, list[str], list[Any]]] = []
        if acks:
            calls.append(("ack", [self.keys.jobs],
                          self._ack_head(worker, now) + [token, *acks]))
        if want:
            calls.append(("claim", [self.keys.jobs],
                          [self.keys.base, worker, self.lease_ms, want, *queues]))
        return calls

    @staticmethod
    def _exchanged(replies: list[Any], acks: bool, want: int) -> Exchanged:
        stale = [str(i) for i in replies[0]] if acks else []
        claimed: list[Claimed] = []
        keep_time = None
        if want:
            fields = iter(replies[-1])  # keeper's wait (ms), then id, queue, spec, state, id, ...
            wait_ms = int(next(fields))
            claimed = list(zip(fields, fields, fields, fields, strict=True))
            keep_time = wait_ms / 1000 if wait_ms > 0 else None
        return Exchanged(stale, claimed, keep_time)

    def _ack_head(self, worker: str, now: float) -> list[Any]:
        return [self.keys.base, worker, int(now * 1000), RECENT_MAX, self.config.dlq_max,
                WAKE_CAP, self.config.failed_ttl]

    def send_acks(self, worker: str, entries: Iterable[AckEntry],
                  now: float | None = None) -> list[str]:
        """Settle the acknowledgements a worker had journaled but not sent (it died): the
        jobs it finished are settled, not run again; those it had sent already are no
        longer held by it, and ack.lua skips them. Returns the stale ids."""
        flat = [field for entry in entries for field in entry]
        if not flat:
            return []
        assert len(flat) % ACK_FIELDS == 0
        return self.exchange(worker, flat, (), 0, now=now).stale

    def wait_for_work(self, worker: str, queues: Sequence[str],
                      timeout: float, *, on_time: bool = False) -> Claimed | None:
        """Register ``worker`` as idle on its queues (a producer then hands it a job
        straight: no claim round trip) and block on its hand list and the queues' wake
        tokens, in one round trip. Returns a job handed to it (already held by it), if any.

        ``on_time``: the wait ends when ``timeout`` is up on this client's clock, not at the
        server's next tick (a worker keeping a rate limit's time: see claim.lua); that costs
        a second round trip, and a third when the time is up (:func:`blpop_by`)."""
        hand = self.keys.hand(worker)
        keys = [hand, *[self.keys.wake(q) for q in queues]]
        if on_time:
            self.scripts.run("idle", [hand], [self.keys.base, worker, self.lease_ms, *queues])
            got = blpop_by(self.client, keys, timeout, server_timeout=self._block(timeout))
        else:
            pipe = self._r.pipeline(transaction=False)
            self.scripts.queue_sha(pipe, "idle", [hand], [self.keys.base, worker,
                                                      self.lease_ms, *queues])
            pipe.blpop(keys, timeout=self._block(timeout))
            idle, got = pipe.execute(raise_on_error=False)
            if isinstance(idle, NoScriptError):
                # a server that lost its scripts: this wait goes unregistered (a wake token
                # ends it, not a hand-off), the next one is registered
                self.scripts.load("idle")
            elif isinstance(idle, Exception):
                raise idle
            if isinstance(got, Exception):
                raise got
        if got and got[0] == hand:  # "id\nqueue\nspec"
            job_id, queue, spec = str(got[1]).split("\n", 2)
            return job_id, queue, spec, None
        return None

    def held_ids(self, worker: str) -> set[str]:
        return {str(i) for i in self._r.hkeys(self.keys.held(worker))}

    def give_back(self, worker: str, job_ids: Sequence[str]) -> int:
        """giveback.lua: jobs a worker holds but never started go back untouched."""
        return int(self.scripts.run("giveback", [self.keys.jobs],
                                    [self.keys.base, worker, WAKE_CAP, *job_ids]))

    def scheduled_count(self, queues: Sequence[str]) -> int:
        """Jobs of these queues waiting for a later time (delayed, or retries)."""
        pipe = self._r.pipeline(transaction=False)
        for q in dict.fromkeys(q.partition(ROUTE)[0] for q in queues):  # a route: its queue
            pipe.hget(self.keys.stats(q), "scheduled")
        return sum(max(0, int(n or 0)) for n in pipe.execute())

    def held_back_count(self, queues: Sequence[str]) -> int:
        """Jobs ready in these queues (not suspended) that a claim just left where they are:
        held back by a limit (after a claim that got nothing, there is no other reason but a
        tombstone of a cancelled job behind them). Counted from the level lists, not from the
        counters, so that a burst worker never waits for a job that is not there."""
        queues = list(dict.fromkeys(queues))
        pipe = self._r.pipeline(transaction=False)
        pipe.smismember(self.keys.suspended, [q.partition(ROUTE)[0] for q in queues])
        for q in queues:
            pipe.zrange(self.keys.levels(q), 0, -1)
        suspended, *levels = pipe.execute()
        pipe = self._r.pipeline(transaction=False)
        for q, off, prios in zip(queues, suspended, levels, strict=True):
            if not off:
                for prio in prios:
                    pipe.llen(self.keys.level(q, int(prio)))
        return sum(int(n) for n in pipe.execute())

    def renew_leases(self, workers: Sequence[str]) -> None:
        """renew.lua: extend the leases of live workers, on the server's clock (a released
        lease is never re-created)."""
        if workers:
            self.scripts.run("renew", [self.keys.leases], [self.lease_ms, *workers])

    # -- limits (jobq.limits; claim.lua enforces them) --------------------------------------------
    def define_limits(self, definitions: dict[str, str], *, keep: bool = False) -> None:
        """Store limit definitions (name -> JSON); with ``keep``, only those not defined
        yet. Whatever waited on a limit whose definition changed is woken (it may fit now)."""
        if not definitions:
            return
        pipe = self._r.pipeline()
        for name, definition in definitions.items():
            if keep:
                pipe.hsetnx(self.keys.limits, name, definition)
            else:
                pipe.hset(self.keys.limits, name, definition)
        pipe.execute()
        if not keep:
            for name in definitions:
                self._wake_limit(name)

    def delete_limit(self, name: str) -> bool:
        """Forget a limit's definition: its jobs are no longer limited. Slots in use are
        still freed as their jobs end. True if it was defined."""
        removed = bool(self._r.hdel(self.keys.limits, name))
        self._wake_limit(name)
        return removed

    def _wake_limit(self, name: str) -> None:
        """Wake an idle worker of each queue where the limit held jobs back."""
        waiting = self._r.smembers(self.keys.limit_waiting(name))
        if waiting:
            pipe = self._r.pipeline()
            for queue in waiting:
                pipe.lpush(self.keys.wake(str(queue)), "1").ltrim(self.keys.wake(str(queue)), 0,
                                                                    WAKE_CAP - 1)
            pipe.delete(self.keys.limit_waiting(name))
            pipe.execute()

    def limit_definitions(self) -> dict[str, str]:
        """Every stored limit definition (JSON), by name."""
        return {str(k): str(v) for k, v in self._r.hgetall(self.keys.limits).items()}

    def limits_defined(self, names: Sequence[str]) -> list[bool]:
        if not names:
            return []
        return [v is not None for v in self._r.hmget(self.keys.limits, list(names))]

    def limit_use(self, names: Sequence[str]) -> dict[str, LimitUse]:
        """The definition and use of each named limit, in one round trip."""
        k = self.keys
        pipe = self._r.pipeline(transaction=False)
        for name in names:
            pipe.hget(k.limits, name).hlen(k.limit_running(name)).smembers(
                k.limit_waiting(name)).hget(k.limit_state(name), "tat")
        replies = pipe.execute()
        out = {}
        for i, name in enumerate(names):
            definition, running, waiting, tat = replies[4 * i:4 * i + 4]
            out[name] = LimitUse(_opt_str(definition), int(running),
                                 sorted(str(q) for q in waiting),
                                 float(tat) / 1000 if tat is not None else None)
        return out

    def limit_names_in_use(self) -> list[str]:
        """The names of limits with state on the server (slots held, jobs held back, a rate
        used), defined or not (SCAN: for tools such as ``jobq limit list``)."""
        names = set()
        for prefix in (self.keys.limit_state(""), self.keys.limit_running(""),
                       self.keys.limit_waiting("")):
            for key in self._r.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
                names.add(str(key)[len(prefix):])
        return sorted(names)

    # -- giving back the jobs of workers that are gone -------------------------------------------
    def release(self, worker: str, *, cause: str, current: str | None,
                queues: Sequence[str] = (), only_if_expired: bool = False,
                now: float | None = None) -> Released | None:
        """release.lua: give back what ``worker`` held. ``current`` is the job it was
        running ("-" for none, None if unknown); it leaves the idle lists of ``queues``.
        None if its lease is still live and ``only_if_expired``."""
        now_ms = int((time.time() if now is None else now) * 1000)
        c = self.config
        out = self.scripts.run("release", [self.keys.jobs], [
            self.keys.base, worker, now_ms, cause, "" if current is None else current,
            c.max_deliveries, c.failed_ttl, c.dlq_max, WAKE_CAP,
            "1" if only_if_expired else "0", *queues])
        if not out:
            return None
        return Released([str(i) for i in out[0]], [str(i) for i in out[1]])

    def expired_workers(self, tick: float) -> list[str]:
        """reap.lua: workers whose lease lapsed on the server's clock (their host or master
        died), a batch at a time; none for a lease after a stall of the server: no reap for
        half a lease (or ``STALL_TICKS`` ticks of ``tick`` seconds) while the server was
        frozen, or refused writes, or no reaper ran."""
        stall_ms = int(max(self.config.lease_time / 2, STALL_TICKS * tick) * 1000)
        return [str(w) for w in self.scripts.run("reap", [self.keys.leases], [
            self.keys.base, self.lease_ms, stall_ms, REAP_BATCH])]

    def reap(self, tick: float, now: float | None = None) -> list[tuple[str, Released]]:
        """Give back the jobs of every worker whose lease lapsed (its host or master died);
        returns (worker, what was given back) for each. ``tick``: how often the caller reaps
        (seconds), see :meth:`expired_workers`."""
        now = time.time() if now is None else now
        out = []
        for worker in self.expired_workers(tick):
            released = self.release(worker, current=None, now=now, only_if_expired=True,
                                    cause="lease expired: the worker or its host stopped "
                                          "renewing it")
            if released is not None:
                out.append((worker, released))
        return out

    # -- the scheduler ---------------------------------------------------------------------------
    def lead(self, token: str, lease: float) -> bool:
        """leader.lua: take the leadership lease if free, extend it if ours."""
        return bool(self.scripts.run("leader", [self.keys.sched_leader],
                                     [token, int(lease * 1000)]))

    def resign(self, token: str) -> None:
        """resign.lua: give the lease up at once, if it is still ours."""
        self.scripts.run("resign", [self.keys.sched_leader], [token])

    def leader_token(self) -> str | None:
        return _opt_str(self._r.get(self.keys.sched_leader))

    def promote(self, now: float) -> float | None:
        """promote.lua until nothing is due: move due delayed jobs and retries to their
        queues; returns the next one's due time (epoch seconds), None if there is none."""
        while True:
            moved, nxt = self.scripts.run("promote", [self.keys.jobs], [
                self.keys.base, int(now * 1000), PROMOTE_BATCH, WAKE_CAP])
            if int(moved) < PROMOTE_BATCH:
                return None if int(nxt) < 0 else int(nxt) / 1000

    def fire(self, name: str, due_ms: int, next_ms: int, job: NewJob | None,
             now: float) -> bool:
        """fire.lua: fire one run of a schedule (or skip it, with no job) and move its due
        time on, unless another scheduler did already. True if this call fired it."""
        job_args = [job.job_id, job.queue, job.priority, job.spec] if job else []
        return bool(self.scripts.run("fire", [self.keys.jobs], [
            self.keys.base, name, due_ms, next_ms, int(now * 1000), WAKE_CAP, *job_args]))

    def wake_scheduler(self, pipe: Any = None) -> None:
        target = pipe if pipe is not None else self._r.pipeline()
        target.lpush(self.keys.sched_wake, "1").ltrim(self.keys.sched_wake, 0, SCHED_WAKE_CAP - 1)
        if pipe is None:
            target.execute()

    def wait_for_wake(self, timeout: float, *, server_timeout: float | None = None) -> bool:
        """Block until a token in the scheduler's wake list (True), or until ``timeout``
        seconds have passed on this client's clock (False), not the server's: an idle server
        would end the wait up to 1/hz late (see :func:`jobq.connection.blpop_by`; its
        ``server_timeout`` is the backup, by default the same time)."""
        if server_timeout is None:
            server_timeout = self._block(timeout)
        return blpop_by(self.client, [self.keys.sched_wake], timeout,
                        server_timeout=server_timeout) is not None

    def schedule_defs(self) -> dict[str, str]:
        """Every stored schedule definition (JSON), by name."""
        return {str(k): str(v) for k, v in self._r.hgetall(self.keys.sched_defs).items()}

    def schedule_def(self, name: str) -> str | None:
        return _opt_str(self._r.hget(self.keys.sched_defs, name))

    def store_schedule(self, name: str, definition: str, due: float | None, *,
                       changed: bool = True) -> None:
        """Store a definition with its next due time (None: not due, e.g. paused) and wake
        the leader; with ``changed`` False only the leader is woken."""
        k = self.keys
        pipe = self._r.pipeline()
        if changed:
            pipe.hset(k.sched_defs, name, definition)
            if due is None:
                pipe.zrem(k.sched_due, name)
            else:
                pipe.zadd(k.sched_due, {name: int(due * 1000)})
        self.wake_scheduler(pipe)
        pipe.execute()

    def remove_schedule(self, name: str) -> bool:
        """Forget a schedule; True if it existed."""
        k = self.keys
        removed = self._r.pipeline().hdel(k.sched_defs, name).zrem(k.sched_due, name).hdel(
            k.sched_last, name).execute()
        return bool(removed[0])

    def unschedule(self, name: str) -> None:
        """Take a schedule off the timetable (paused, or broken); its definition stays."""
        self._r.zrem(self.keys.sched_due, name)

    def schedules_due(self, now: float) -> list[tuple[str, int]]:
        """(name, due time in ms) of every schedule due at ``now``."""
        return [(str(n), int(ms)) for n, ms in self._r.zrangebyscore(
            self.keys.sched_due, "-inf", int(now * 1000), withscores=True)]

    def next_schedule_due(self) -> float | None:
        nxt = self._r.zrange(self.keys.sched_due, 0, 0, withscores=True)
        return float(nxt[0][1]) / 1000 if nxt else None

    def schedule_timetable(self) -> dict[str, float]:
        """Every scheduled name -> its next due time (epoch seconds)."""
        return {str(n): float(ms) / 1000
                for n, ms in self._r.zrange(self.keys.sched_due, 0, -1, withscores=True)}

    def schedule_fires(self) -> dict[str, str]:
        """Every schedule's last fire (JSON), by name."""
        return {str(k): str(v) for k, v in self._r.hgetall(self.keys.sched_last).items()}

    # -- masters, for jobq info and the scheduler -----------------------------------------------
    def describe_master(self, master_id: str, description: str, tasks_ttl: float) -> None:
        """The master's heartbeat: its description, and its workers' announcement of their
        tasks kept alive for ``tasks_ttl`` seconds more."""
        pipe = self._r.pipeline(transaction=False)
        pipe.hset(self.keys.masters, master_id, description)
        self.keep_tasks(master_id, tasks_ttl, pipe)
        pipe.execute()

    def forget_master(self, master_id: str) -> None:
        self._r.hdel(self.keys.masters, master_id)
        self.withdraw_tasks(master_id)

    def masters(self) -> dict[str, str]:
        """Every master's last description (JSON), by id."""
        return {str(k): str(v) for k, v in self._r.hgetall(self.keys.masters).items()}

    # -- the task catalog (catalog.py) ---------------------------------------------------------
    def announce_tasks(self, announcer: str, generation: int, entries: dict[str, str],
                       ttl: float) -> bool:
        """announce.lua: replace what ``announcer`` can run; False if a newer generation of
        it announced already."""
        pairs = [x for name_entry in entries.items() for x in name_entry]
        return bool(self.scripts.run("announce", [self.keys.catalog], [
            self.keys.base, announcer, generation, int(ttl * 1000), *pairs]))

    def keep_tasks(self, announcer: str, ttl: float, pipe: Any = None) -> None:
        """Keep an announcement alive for ``ttl`` seconds more."""
        (pipe if pipe is not None else self._r).pexpire(self.keys.tasks(announcer),
                                                        int(ttl * 1000))

    def withdraw_tasks(self, announcer: str) -> None:
        self._r.pipeline().delete(self.keys.tasks(announcer)).srem(
            self.keys.catalog, announcer).execute()

    def announced_task(self, name: str) -> list[tuple[str, str]]:
        """Who announced task ``name`` and what each said: [(announcer, JSON), ...]."""
        flat = self.scripts.run("tasks", [self.keys.catalog], [self.keys.base, name])
        return [(str(flat[i]), str(flat[i + 2])) for i in range(0, len(flat), 3)]

    def announced_tasks(self) -> dict[str, dict[str, str]]:
        """Every live announcement: announcer -> {task name: JSON}."""
        flat = self.scripts.run("tasks", [self.keys.catalog], [self.keys.base, ""])
        out: dict[str, dict[str, str]] = {}
        for i in range(0, len(flat), 3):
            out.setdefault(str(flat[i]), {})[str(flat[i + 1])] = str(flat[i + 2])
        return out

    # -- counters history, for rates --------------------------------------------------------------
    def add_snapshot(self, snapshot: str) -> None:
        self._r.pipeline(transaction=False).lpush(self.keys.history, snapshot).ltrim(
            self.keys.history, 0, SNAPSHOTS_KEPT - 1).execute()

    def snapshots(self) -> list[str]:
        return [str(s) for s in self._r.lrange(self.keys.history, 0, -1)]

    # -- the namespace's epoch: did the server lose its data? -----------------------------------
    def epoch(self) -> str:
        """The namespace's epoch: a random token, written if there is none (first use, or the
        server lost its data: restarted empty). A process that knew another token knows the
        data it relied on is gone. (A new token every time: one process creating it twice
        must not find the same one.)"""
        mine = os.urandom(8).hex()
        before = self._r.set(self.keys.epoch, mine, nx=True, get=True)
        return mine if before is None else str(before)

    # -- tools -------------------------------------------------------------------------------------
    def delete_namespace(self) -> None:
        """Delete every key of this namespace (SCAN: for tools such as the bench only)."""
        cursor = 0
        while True:
            cursor, keys = self._r.scan(cursor, match=self.keys.pattern, count=1000)
            if keys:
                self._r.unlink(*keys)
            if int(cursor) == 0:
                return

    def round_trip(self) -> float:
        """Seconds one PING takes, on this client's connection (for metrics)."""
        start = time.perf_counter()
        self._r.ping()
        return time.perf_counter() - start

    def used_memory(self) -> int:
        """The server's memory in use (bytes)."""
        return int(self._r.info("memory")["used_memory"])

    def server_cpu(self) -> float:
        """The CPU time the server's process has used (seconds): INFO cpu's used_cpu_sys +
        used_cpu_user, all its threads (the main one and those that fsync the AOF and free
        memory), not the children it forks to save or rewrite."""
        cpu = self._r.info("cpu")
        return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])

    # -- groups (queue.map) ----------------------------------------------------------------------
    def group_meta(self, group_id: str) -> dict[str, str]:
        return {str(k): str(v) for k, v in self._r.hgetall(self.keys.group(group_id)).items()}

    def group_exists(self, group_id: str) -> bool:
        return bool(self._r.exists(self.keys.group(group_id)))

    def recent_groups(self, limit: int) -> list[tuple[str, float, dict[str, str]]]:
        """The ``limit`` groups made last that still exist, newest first: (id, when it was
        made, its bookkeeping). The ids of groups that expired are skipped, and dropped from
        the index as they are met where this client may write (a round trip per ``limit`` ids
        read)."""
        k = self.keys
        out: list[tuple[str, float, dict[str, str]]] = []
        start = 0
        while len(out) < limit:
            page = self._r.zrevrange(k.groups, start, start + limit - 1, withscores=True)
            if not page:
                break
            pipe = self._r.pipeline(transaction=False)
            for group_id, _ in page:
                pipe.hgetall(k.group(str(group_id)))
            gone = []
            for (group_id, created), meta in zip(page, pipe.execute(), strict=True):
                if not meta:
                    gone.append(str(group_id))
                elif len(out) < limit:
                    out.append((str(group_id), float(created),
                                {str(f): str(v) for f, v in meta.items()}))
            dropped = 0
            if gone:
                try:
                    dropped = int(self._r.zrem(k.groups, *gone))
                except redis.ResponseError:
                    pass  # a reader that may not write (a replica, an ACL): skipped all the same
            if len(page) < limit:
                break
            start += len(page) - dropped  # the ids dropped no longer take a rank
        return out

    def final_records(self, job_ids: Sequence[str]) -> list[str | None]:
        """The final records of jobs (None: live, or gone), in a round trip per 1000."""
        out: list[str | None] = []
        for start in range(0, len(job_ids), 1000):
            keys = [self.keys.result(i) for i in job_ids[start:start + 1000]]
            out.extend(_opt_str(raw) for raw in self._r.mget(keys))
        return out

    def group_job_ids(self, group_id: str, start: int = 0, stop: int = -1) -> list[str]:
        """A group's job ids in input order, ``start`` to ``stop`` inclusive (LRANGE's
        rules: -1 is the last; the default, every one)."""
        return [str(i) for i in self._r.lrange(self.keys.group_ids(group_id), start, stop)]

    def group_job_count(self, group_id: str) -> int:
        """How many job ids a group's list holds (LLEN), without reading them."""
        return int(self._r.llen(self.keys.group_ids(group_id)))

    def group_progress(self, group_id: str) -> tuple[int, int, int, int]:
        """(done, failed) jobs of a group, then (done, failed) items (0 when it has no
        chunks: its jobs are its items)."""
        counts = self._r.hmget(self.keys.group(group_id), "done", "failed", "done_items",
                               "failed_items")
        done, failed, done_items, failed_items = (int(n or 0) for n in counts)
        return done, failed, done_items, failed_items

    def wait_group(self, group_id: str, timeout: float) -> None:
        """Block until a job of the group finishes, or ``timeout`` seconds."""
        self._r.blpop([self.keys.group_wake(group_id)], timeout=self._block(timeout))


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a SCAN pattern (the key base's braces, a name's *)."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
