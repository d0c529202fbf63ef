"""One worker process: claim jobs, run each under its own SIGALRM timer, settle the outcome.

The loop, for a worker on queues ``high,default``::

    ┌─► exchange: one round trip = ack.lua (the jobs settled since the last one)
    │             + claim.lua (the next batch: size adapted to how long jobs take)
    │   got jobs? ── no ──► wait: BLPOP its hand list and the queues' wake lists ──┐
    │      │ yes                (idle: no polling)                                  │
    │      ▼                                                                        │
    │   run: setitimer(timeout) → task(*args, **kwargs)                              │
    │   settle (jobq.settle, pure) → an ack entry, journaled in shared memory      │
    └──────┴────────────────────────────────────────────────────────────────────────┘

Short jobs are claimed in batches and acknowledged in batches (their results become
visible within ``FLUSH_INTERVAL``); long jobs one at a time, so that no worker holds
unstarted jobs while another idles. With short jobs the next exchange is sent ahead, once a
quarter of the batch ran, and its reply read when the batch is done: the server works on it
while the worker runs the rest (the acks it carries stay in their half of the journal until
then; new ones go to the other half). Under a master the worker reports the job it runs in
shared memory (see :mod:`jobq.slots`) and the master renews its lease; alone (``jobq worker``)
it renews the lease from a small thread.

Signals: TERM (and INT, when not under a master) stop after the current job (unstarted
prefetched jobs are given back); ALRM raises :class:`JobTimeout` inside the running job;
USR2 raises :class:`JobCancelled` inside it; USR1 reopens log files.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import redis

from . import catalog, context, serialization
from . import log as jobq_log
from .broker import Broker, Claimed, Exchanged, Released
from .config import Config
from .connection import connect, describe_error, unavailable
from .exceptions import JobCancelled, JobTimeout, TaskNotAllowed
from .keys import Keys
from .log import Trouble
from .metrics.tally import INVALID_TASK, Tally
from .process import PARENT_DIED, BlockingCall, Interrupted, set_title
from .registry import TaskResolver
from .settle import Completed, Failed, RetryPolicy, Settlement, settle
from .slots import Slot
from .wire import ACK_FIELDS, AckEntry, BadJob, Spec, undecodable

log = logging.getLogger("jobq.worker")

#: Builds a NamedTuple from a tuple of its fields without its Python-level __new__: the
#: worker makes one per job.
_new = tuple.__new__

#: Aim for a claimed batch to take about this long to run (seconds).
BATCH_TARGET = 0.004
#: Most jobs claimed in one round trip.
BATCH_MAX = 128
#: A claimed batch of at least this many jobs sends its next exchange ahead, once one in
#: AHEAD_AFTER of its jobs ran (see _send_ahead).
AHEAD_MIN, AHEAD_AFTER = 8, 4
#: Results of finished jobs are sent at the latest this long after the job ended (seconds).
FLUSH_INTERVAL = 0.005
#: A worker's title names the job it runs when its jobs take this long on average (s).
TITLE_JOB_ID_FROM = 0.01
#: How long an idle worker blocks before it looks around (heartbeat, its master).
IDLE_TICK = 1.0
#: A worker without a master looks for a cancel request of its running job this often (s).
CANCEL_CHECK_EVERY = 0.25
#: A worker without a master promotes due jobs and reaps lapsed leases this often (s).
HOUSEKEEP_EVERY = 0.25
#: Reconnect back-off after a lost server connection (seconds): first, cap.
RECONNECT_FIRST, RECONNECT_CAP = 0.05, 2.0

#: Exit codes of a worker process.
RET_OK = 0
RET_IMPORT = 4


def worker_name(slot: int | None = None, host: str | None = None) -> str:
    host = host or socket.gethostname().split(".")[0] or "host"
    suffix = f".{slot}" if slot is not None else ""
    return f"{host}.{os.getpid()}{suffix}.{os.urandom(2).hex()}"


class Worker:
    """Runs jobs from ``queues`` (strict priority between them) until stopped."""

    def __init__(self, queues: Sequence[str], *, config: Config, url: str,
                 resolver: TaskResolver, name: str | None = None, burst: bool = False,
                 slot: Slot | None = None, renew_leases: bool = True, max_jobs: int = 0,
                 master_pid: int | None = None, title: str = "", announcer: str | None = None,
                 generation: int = 0, tally: Tally | None = None) -> None:
        self.queues = list(queues)
        self.config = config
        self.url = url
        self.resolver = resolver
        self.name = name or worker_name(host=config.hostname or None)
        self.burst = burst
        self.slot = slot
        self.renew_leases = renew_leases
        self.max_jobs = max_jobs
        self.master_pid = master_pid
        #: whom the tasks this worker can run are announced for (its master, or itself)
        self.announcer = announcer or self.name
        self.generation = generation
        #: per-task counts for the master's metrics (None when they are off)
        self.tally = tally
        self._announced = False
        self.title_prefix = f"jobq worker {title or self.name}"
        self.policy = RetryPolicy.from_config(config)
        self._name_json = serialization.dumps(self.name)
        # A job's data may be any bytes: surrogateescape keeps bytes that are not UTF-8 (the
        # job then fails as a BadJob) instead of breaking the claim, and gives ids back as is.
        self.keys = Keys(config.namespace())
        self.redis = connect(url, lease_time=config.lease_time, route=self.keys.route,
                             encoding_errors="surrogateescape")
        self.broker = Broker(self.redis, self.keys, config)
        self.jobs_done = 0
        self._buffer: deque[Claimed] = deque()
        self._acks: list[Any] = []  # the fields of the ack entries not sent yet, flat
        self._first_ack_at = 0.0
        #: the token of the acks not sent yet, kept while the same batch is sent again (see
        #: ack.lua); a new one when the batch grows
        self._ack_token: str | None = None
        self._ack_batches = 0
        self._ack_prefix = os.urandom(4).hex()  # a worker of the same name, later, differs
        self._avg = BATCH_TARGET  # running average of a job's duration (seconds)
        self._stopping = False
        self._waiting = BlockingCall(on_interrupt=self.broker.disconnect)
        self._running: str | None = None
        self._title = ""
        self._next_housekeeping = 0.0
        self._resync = False  # look for jobs held by a claim whose reply was lost
        #: the exchange sent ahead whose reply is not read yet: its acks, their token, their
        #: journal half, the jobs it claims (see _send_ahead)
        self._flight: tuple[list[Any], str, int, int] | None = None
        #: exchanges sent ahead so far
        self.sent_ahead = 0
        #: send the next exchange ahead when this many jobs of the batch are left (-1: not)
        self._ahead_at = -1
        self._lease_stop = threading.Event()
        self._trouble: Trouble | None = None  # the server cannot be used now
        self._epoch: str | None = None
        #: when the last claim got nothing because a rate limit held jobs back: how long this
        #: worker waits to keep the limit's time (claim.lua), instead of its idle tick
        self._keep_time: float | None = None

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        context.worker = self
        self._install_signals()
        lease_thread = self._start_lease_thread() if self.renew_leases else None
        log.info("worker %s started on %s", self.name, ",".join(self.queues))
        self._set_title("starting")
        self._warm_up()
        try:
            while not self._stopping:
                if not self._announced:
                    self._announce()
                if self.max_jobs and self.jobs_done >= self.max_jobs:
                    log.info("worker %s recycles itself after %d jobs", self.name,
                             self.jobs_done)
                    break
                if self.renew_leases and time.monotonic() >= self._next_housekeeping:
                    self._housekeep()
                if not self._buffer and self._flight is not None:
                    self._land()
                if not self._buffer and not self._exchange():
                    if self.burst and not self._scheduled_work():
                        break
                    self._wait_for_work()
                    continue
                self._run_one(self._buffer.popleft())
                if len(self._buffer) == self._ahead_at:
                    self._send_ahead()
                elif self._acks and self._flight is None and self._ahead_at < 0 and \
                        time.monotonic() - self._first_ack_at > FLUSH_INTERVAL:
                    # (with an exchange in flight, or one to send ahead in this batch, the
                    # acks go with that one, a quarter of a batch later at the most)
                    self._exchange(claim=False)
        finally:
            self._shutdown(lease_thread)
        return RET_OK

    def stop(self) -> None:
        self._stopping = True

    def _warm_up(self) -> None:
        """Do what a fresh worker does once before its slot first says it is ready (idle,
        as it waits for work, or busy): the master reports the pool ready when every slot
        does, and the first job handed over then must not pay for it. That is the worker's
        two connections to the server (the first one a process makes also pays redis-py's
        look-up of its own version: 2-6 ms in a fresh worker), the epoch, and the
        announcement of its tasks; then the loop's first claim, and its first wait, which
        says idle and registers the worker for hand-offs in the round trip that follows.
        Best effort: a server that cannot be used now is waited out by the loop, which
        keeps the slot beating meanwhile."""
        # the announcement first: the scripts take a connection of the pool and keep it
        # (claims, acks); the epoch's then makes the one the waits will use
        self._announce()
        self._data_lost()  # learn the epoch

    def _orphaned(self) -> bool:
        """Our master is gone: nobody renews our lease any more."""
        return self.master_pid is not None and os.getppid() != self.master_pid

    def _exchange(self, claim: bool = True) -> bool:
        """Send pending acks and (with ``claim``) claim the next batch, in one round trip,
        after reading the reply of an exchange sent ahead, if there is one.

        A lost connection is retried with back-off until it comes back (or the worker is
        told to stop); acks are kept until they are through, so no result is dropped."""
        if self._flight is not None:
            self._land()
        if self._orphaned():
            self._stopping = True  # an orphan claims nothing new
            claim = False
        want = self._want() if claim else 0
        got = self._call(self._acks, self._token(), want)
        if got is None:  # see _call
            self._acks = []
            self._ack_token = None
            return False
        stale, claimed, keep_time = got
        if self._acks:
            self._sent(stale, None)
            self._acks = []
            self._ack_token = None
        if not want:
            return False
        self._took(claimed, keep_time)
        return bool(self._buffer)

    def _send_ahead(self) -> None:
        """Send the acks so far and the claim of the next batch while the rest of this batch
        runs: the server works on them meanwhile, and the reply is read when the batch is
        done (:meth:`_land`). The acks' journal entries stay in their half until then, new
        ones go to the other: a worker killed meanwhile leaves both to its master, which
        sends them (ack.lua skips what the server settled already)."""
        self._ahead_at = -1
        if self._stopping or self._orphaned():
            return
        want, token = self._want(), self._token()
        try:
            self.broker.send_exchange(self.name, self._acks, self.queues, want, token=token)
        except redis.RedisError as exc:
            if not unavailable(exc):
                raise
            self._resync = True  # the next exchange, a round trip of its own, waits it out
            return
        half = self.slot.journal_switch() if self.slot is not None else 0
        self._flight = (self._acks, token, half, want)
        self.sent_ahead += 1
        self._acks = []
        self._ack_token = None

    def _land(self) -> None:
        """Read the reply of the exchange sent ahead. Lost with the connection, whether the
        server ran it is not known: its acks are sent again, alone and with their token (a
        batch settled already is skipped, and answered as it was), and jobs that its claim
        left held by us, unknown to us, are given back after the next claim
        (:meth:`_give_back_orphans`)."""
        assert self._flight is not None
        acks, token, half, want = self._flight
        self._flight = None
        try:
            stale, claimed, keep_time = self.broker.read_exchange(acks, want)
        except redis.RedisError as exc:
            if not unavailable(exc):
                raise
            self._in_trouble(exc)
            self._resync = True
            got = self._call(acks, token, 0)
            if got is not None and acks:
                self._sent(got.stale, half)
            return
        if acks:
            self._sent(stale, half)
        if want:
            self._took(claimed, keep_time)

    def _want(self) -> int:
        """How many jobs to claim: about BATCH_TARGET of work, at the recent jobs' pace."""
        return min(BATCH_MAX, max(1, int(BATCH_TARGET / max(self._avg, 1e-6))))

    def _token(self) -> str:
        """The token of the acks not sent yet (see ack.lua); "" when there are none."""
        if self._acks and self._ack_token is None:
            self._ack_batches += 1
            self._ack_token = f"{self._ack_prefix}.{self._ack_batches}"
        return self._ack_token or ""

    def _call(self, acks: list[Any], token: str, want: int) -> Exchanged | None:
        """One exchange, tried again with back-off while the server cannot be used. None
        when the worker gives up: told to stop with no acks to send, or orphaned (then it
        stops: nobody can take its results, and its jobs come back when their lease lapses,
        at-least-once)."""
        delay = RECONNECT_FIRST
        while True:
            try:
                got = self.broker.exchange(self.name, acks, self.queues, want, token=token)
                break
            except redis.RedisError as exc:
                if not unavailable(exc):
                    raise
                # lost, frozen, or refusing writes (out of memory): a condition of the server,
                # not of this worker. Its results stay here (and in the journal) until they
                # are through; nothing new is claimed meanwhile (the call that would claim is
                # the one that fails).
                self._in_trouble(exc)
                if self._stopping and not acks:
                    return None
                if self._orphaned():
                    self._stopping = True
                    return None
                if self.slot is not None:
                    self.slot.idle()  # waiting for the server is not hanging: keep beating
                time.sleep(delay)
                delay = min(delay * 2, RECONNECT_CAP)
        if self._trouble is not None:
            self._trouble.over()
            self._trouble = None
            self._resync = True
        return got

    def _sent(self, stale: list[str], half: int | None) -> None:
        """A batch of acks went through: say what it found stale, count it, and forget its
        journal entries (those of ``half``, or all)."""
        if stale and self._data_lost():
            log.error("results of %d job(s) dropped: the server lost its data, and those "
                      "jobs with it (%s)", len(stale), ", ".join(stale[:5]))
        elif stale:
            log.warning("results of %d job(s) dropped: given back when their lease "
                        "lapsed, or deleted with their queue (%s)", len(stale),
                        ", ".join(stale[:5]))
        if self.tally is not None:  # counted once the server has their outcome
            self.tally.publish()
        if self.slot is not None:
            if half is None:
                self.slot.journal_sent()
            else:
                self.slot.journal_settled(half)

    def _took(self, claimed: list[Claimed], keep_time: float | None) -> None:
        """Jobs claimed: run them in turn; a batch large enough sends its next exchange
        ahead."""
        self._keep_time = keep_time
        self._buffer.extend(claimed)
        n = len(claimed)
        self._ahead_at = n - n // AHEAD_AFTER if n >= AHEAD_MIN else -1
        if self._resync:
            self._give_back_orphans()

    def _in_trouble(self, exc: BaseException) -> None:
        """The server cannot be used now: said once (and once a minute while it lasts), not
        per attempt; :meth:`_exchange` says when it is over."""
        if self._trouble is None:
            self._trouble = Trouble(log, describe_error(exc, self.url),
                                    pending=len(self._acks) // ACK_FIELDS)
        self._trouble.again()

    def _data_lost(self) -> bool:
        """Whether the server lost its data since this worker last looked (see
        :meth:`Broker.epoch`)."""
        try:
            epoch = self.broker.epoch()
        except redis.RedisError:
            return False
        lost = self._epoch is not None and epoch != self._epoch
        self._epoch = epoch
        if lost:
            self._announced = False  # the catalog went with the rest
        return lost

    def _announce(self) -> None:
        """Tell the task catalog what this worker can run (see :mod:`jobq.catalog`); tried
        again on the next pass while the server cannot take it."""
        if self._flight is not None:
            self._land()  # the scripts' connection is the exchanges'
        try:
            entries = {name: info.to_json()
                       for name, info in self.resolver.describe(time.time()).items()}
            self.broker.announce_tasks(self.announcer, self.generation, entries,
                                       catalog.ttl(self.config.lease_time))
            self.broker.define_limits(self.resolver.own_limits())
        except redis.RedisError as exc:
            log.debug("could not announce the tasks yet: %s", describe_error(exc, self.url))
            return
        self._announced = True

    def _give_back_orphans(self) -> None:
        """After a lost connection: a claim the server ran but whose reply was lost left jobs
        held by us that we do not know of (redis-py or our loop sent the claim again). They
        never started: give them back untouched. Jobs that ran and whose acks are not sent
        yet are held too, and known."""
        try:
            known = {job_id for job_id, _, _, _ in self._buffer}
            known.update(str(job_id) for job_id in self._acks[1::ACK_FIELDS])
            orphans = sorted(self.broker.held_ids(self.name) - known - {self._running or ""})
            if orphans:
                n = self.broker.give_back(self.name, orphans)
                log.warning("gave back %d job(s) claimed by a reply lost with the server (%s)",
                            n, ", ".join(orphans[:8]))
            self._resync = False
        except redis.RedisError:
            pass  # try again after the next exchange

    def _wait_for_work(self) -> None:
        """Block until a job is enqueued on one of our queues (or IDLE_TICK passes)."""
        signal.setitimer(signal.ITIMER_REAL, 0)  # the last job's alarm: not needed idle
        self._ahead_at = -1
        if self.slot is not None:
            self.slot.idle()
        self._set_title("idle")
        if self._orphaned():
            log.warning("worker %s: its master is gone; stopping", self.name)
            self._stopping = True
            return
        tick = HOUSEKEEP_EVERY if self.renew_leases else IDLE_TICK
        keep_time, self._keep_time = self._keep_time, None
        on_time = keep_time is not None and keep_time < tick
        if keep_time is not None and on_time:
            tick = keep_time  # a rate-limited job may start then: be on time
        try:
            # a TERM interrupts the blocking wait (and one that came before it is seen by
            # the wait's own check of the flag, under the same span)
            handed = self._waiting.call(self._wait, tick, on_time)
        except redis.RedisError as exc:
            if not unavailable(exc):
                raise
            self._in_trouble(exc)
            time.sleep(RECONNECT_FIRST)
            return
        if handed is not None:  # already held by us
            self._buffer.append(handed)

    def _wait(self, tick: float, on_time: bool) -> Claimed | None:
        if self._stopping:  # a TERM came before the span opened
            return None
        return self.broker.wait_for_work(self.name, self.queues, tick, on_time=on_time)

    def _housekeep(self) -> None:
        """Without a master (so maybe without a scheduler), promote due retries and delayed
        jobs and give back the jobs of workers whose lease lapsed."""
        self._next_housekeeping = time.monotonic() + HOUSEKEEP_EVERY
        if self._flight is not None:
            self._land()  # the scripts' connection is the exchanges'
        try:
            self.broker.promote(time.time())
            for worker, released in self.broker.reap(HOUSEKEEP_EVERY):
                log_release(worker, "lease expired", released)
        except redis.RedisError as exc:
            log.warning("housekeeping failed: %s", describe_error(exc, self.url))

    def _scheduled_work(self) -> bool:
        """Whether jobs of our queues wait for a later time, or for a limit to admit them: a
        burst worker waits for them (a slot that frees, or a rate's next start, wakes it)."""
        return (self.broker.scheduled_count(self.queues) > 0
                or self.broker.held_back_count(self.queues) > 0)

    # -- one job -----------------------------------------------------------------------------
    def _run_one(self, claimed: Claimed) -> None:
        job_id, queue, spec_raw, state_raw = claimed
        started = time.time()
        spec: Spec | None = None
        try:
            if not job_id.isascii() and undecodable(job_id):
                raise BadJob("job id is not valid UTF-8")
            spec = Spec.decode(spec_raw)
            fn = self.resolver.resolve(spec.task)
        except (BadJob, TaskNotAllowed) as exc:
            task = spec.task if spec is not None else "?"
            self._settle(claimed, spec, Failed(exc, started, time.time(), permanent=True),
                         task, runnable=False)
            return
        task = spec.task
        if self.slot is not None:
            self.slot.begin(job_id, started, started + spec.timeout)
        # the title names the job when jobs last long enough to be seen in ps (one system
        # call per job: 2% of a worker's time on empty jobs); short ones show their task
        self._set_title(f"{queue} {task} {job_id}" if self._avg >= TITLE_JOB_ID_FROM
                        else f"{queue} {task}")
        context.running = (job_id, queue, spec, state_raw)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("job %s %s started", job_id, task, extra={"job_id": job_id, "task": task})
        outcome: Completed | Failed
        # Armed first, then the job is named: an alarm left from the job before (the timer is
        # only disarmed when the worker stops running jobs, one system call less per job) is
        # replaced before it could be taken for this job's.
        signal.setitimer(signal.ITIMER_REAL, spec.timeout)
        self._running = job_id
        try:
            result = fn(*spec.args, **spec.kwargs)
        except BaseException as exc:  # noqa: B036 - a job's failure is data, not our crash
            self._running = None
            failure, permanent = _as_failure(exc, fn, spec)
            outcome = Failed(failure, started, time.time(), permanent)
        else:
            self._running = None  # from here an alarm is ignored (_on_alarm)
            outcome = _new(Completed, (result, started, time.time()))
        finally:
            self._running = None
            context.running = None
        self._settle(claimed, spec, outcome, task)

    def _settle(self, claimed: Claimed, spec: Spec | None, outcome: Completed | Failed,
                task: str, runnable: bool = True) -> None:
        self._avg = 0.5 * self._avg + 0.5 * (outcome.finished - outcome.started)
        if isinstance(outcome, Completed):
            self.jobs_done += 1
        job_id, queue, spec_raw, state_raw = claimed
        s = settle(job_id, queue, spec_raw, spec, state_raw, outcome, worker=self.name,
                   worker_json=self._name_json, policy=self.policy)
        self._ack(s.entry)
        if self.tally is not None:
            # enqueue-to-start: first attempts only (a retry's includes its back-off)
            created = spec.created if spec is not None and state_raw is None else None
            self.tally.record(queue, task if runnable else INVALID_TASK, s.status,
                              outcome.finished - outcome.started,
                              outcome.started - created if created else None)
        if s.status != "completed" or log.isEnabledFor(logging.DEBUG):
            _log_settlement(job_id, task, s, outcome)

    def _ack(self, entry: AckEntry) -> None:
        if not self._acks:
            self._first_ack_at = time.monotonic()
        if self.slot is not None:
            # journal it first: if this worker dies before sending it, the master will
            if isinstance(entry.job_id, str) and not self.slot.journal_ack(entry):
                self._exchange(claim=False)  # journal full: send what is there now
                self.slot.journal_ack(entry)
            self.slot.end()
        self._acks += entry
        self._ack_token = None  # another batch: a token of its own

    # -- process plumbing --------------------------------------------------------------------
    def _set_title(self, what: str) -> None:
        if what != self._title:
            self._title = what
            set_title(f"{self.title_prefix}: {what}")

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        if self.master_pid is None:  # under a master, Ctrl-C is the master's to handle
            signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGALRM, self._on_alarm)
        signal.signal(signal.SIGUSR1, self._on_reopen_logs)
        signal.signal(signal.SIGUSR2, self._on_cancel)
        if self.master_pid is not None and PARENT_DIED != signal.SIGTERM:
            signal.signal(PARENT_DIED, self._on_master_died)

    def _on_stop(self, signum: int, frame: Any) -> None:
        if self._orphaned():
            self._on_master_died(signum, frame)
        self._stopping = True
        self._waiting.interrupt()

    def _on_master_died(self, signum: int, frame: Any) -> None:
        # nobody renews our lease any more, so the jobs we hold will run elsewhere: stop now,
        # with whatever we forked, and leave them as they are (a graceful stop would finish
        # this job past a lease nobody renews, and give back the others as if the master
        # were there)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    def _on_alarm(self, signum: int, frame: Any) -> None:
        if self._running is not None:
            raise JobTimeout()

    def _on_reopen_logs(self, signum: int, frame: Any) -> None:
        jobq_log.reopen()

    def _on_cancel(self, signum: int, frame: Any) -> None:
        job_id = self._running
        if job_id is None:
            return
        if self.slot is not None and self.slot.cancel_target() != job_id:
            return  # meant for the job before this one, which has ended
        self._running = None  # raise it once
        raise JobCancelled(f"job {job_id} was cancelled")

    def _start_lease_thread(self) -> threading.Thread:
        """Renew this worker's lease while it holds jobs (used when no master does it)."""
        stop = self._lease_stop
        broker = Broker(connect(self.url, lease_time=self.config.lease_time,
                                route=self.keys.route), self.keys, self.config)

        def renew() -> None:
            period = self.config.lease_time / 3
            next_renewal = 0.0
            while not stop.wait(CANCEL_CHECK_EVERY):
                try:
                    if time.monotonic() >= next_renewal:
                        next_renewal = time.monotonic() + period
                        broker.renew_leases([self.name])
                        broker.keep_tasks(self.announcer, catalog.ttl(self.config.lease_time))
                    running = self._running
                    if running and broker.cancel_requested(running):
                        os.kill(os.getpid(), signal.SIGUSR2)  # JobCancelled in the job
                except redis.RedisError:
                    pass  # the main loop reports a lost server

        thread = threading.Thread(target=renew, name="jobq-lease", daemon=True)
        thread.start()
        return thread

    def _shutdown(self, lease_thread: threading.Thread | None) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            if self._flight is not None:
                self._land()  # its jobs are given back with the others below
            if self._acks:
                self._exchange(claim=False)
            # give back what was claimed (or handed to us) but not started: it runs
            # elsewhere, untouched
            released = self.broker.release(self.name, cause="worker stopped", current="-",
                                           queues=self.queues)
            if released is not None:
                log_release(self.name, "worker stopped", released)
        except redis.RedisError as exc:
            log.warning("could not give back unstarted jobs (%s); they return when the "
                        "lease lapses", describe_error(exc, self.url))
        if lease_thread is not None:
            self._lease_stop.set()
            try:
                self.broker.withdraw_tasks(self.announcer)  # alone: the announcement is ours
            except redis.RedisError:
                pass  # it lapses with its TTL
        log.info("worker %s stopped after %d job(s)", self.name, self.jobs_done)


def _as_failure(exc: BaseException, fn: Callable[..., Any],
                spec: Spec) -> tuple[BaseException, bool]:
    """A job's exception as its failure, and whether that failure is permanent."""
    if isinstance(exc, KeyboardInterrupt | SystemExit | Interrupted):
        exc = RuntimeError(f"the task raised {type(exc).__name__}").with_traceback(
            exc.__traceback__)
    if isinstance(exc, JobTimeout) and not exc.args:
        # keep the traceback: it shows where the job was when its time ran out
        exc = JobTimeout(f"job exceeded its time limit of {spec.timeout:g} s").with_traceback(
            exc.__traceback__)
    permanent = isinstance(exc, TypeError) and _bad_arguments(fn, spec.args, spec.kwargs)
    return exc, permanent


def _bad_arguments(fn: Callable[..., Any], args: Sequence[Any], kwargs: Any) -> bool:
    """True if ``fn`` cannot be called with these arguments at all (a permanent failure)."""
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError:
        return True
    except ValueError:
        return False
    return False


def _log_settlement(job_id: str, task: str, s: Settlement, outcome: Completed | Failed) -> None:
    extra = {"job_id": job_id, "task": task}
    if s.status == "completed":
        if log.isEnabledFor(logging.DEBUG):
            log.debug("job %s %s completed in %.3f s", job_id, task,
                      outcome.finished - outcome.started, extra=extra)
        return
    err = s.error or {}
    what = f"{err.get('type')}: {str(err.get('msg'))[:200]}"
    if s.status == "cancelled":
        log.warning("job %s %s cancelled while running", job_id, task, extra=extra)
    elif s.status == "retry":
        log.warning("job %s %s failed (attempt %d of %d), retry in %.2f s: %s", job_id, task,
                    s.attempts, s.max_retries + 1, s.delay, what, extra=extra)
    else:
        log.warning("job %s %s failed%s: %s", job_id, task,
                    "" if s.permanent else f" after {s.attempts} attempt(s)", what, extra=extra)


def log_release(worker: str, cause: str, released: Released) -> None:
    """Log what giving back a worker's jobs did (nothing when it held none)."""
    message = released.describe(worker, cause)
    if message:
        log.warning("%s", message)
