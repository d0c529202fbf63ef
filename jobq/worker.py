"""One worker process: claim jobs, run each under its own SIGALRM timer, settle the outcome.

The loop, for a worker on queues ``high,default``::

    ┌─► exchange: one round trip = ack.lua (results of the jobs run since the last one)
    │             + claim.lua (the next batch: size adapted to how long jobs take)
    │   got jobs? ── no ──► BLPOP the queues' wake lists (idle: no polling) ──┐
    │      │ yes                                                               │
    │      ▼                                                                   │
    │   run each job: setitimer(timeout) → task(*args, **kwargs) → setitimer(0)│
    └──────┴───────────────────────────────────────────────────────────────────┘

Short jobs are claimed in batches and acknowledged in batches (their results become
visible within ``FLUSH_INTERVAL``); long jobs one at a time, so that no worker holds
unstarted jobs while another idles. Under a master the worker reports the job it runs in
shared memory (see :mod:`jobq.slots`) and the master renews its lease; alone (``jobq worker``)
it renews the lease from a small thread.

Signals: TERM (and INT, when not under a master) stop after the current job (unstarted
prefetched jobs are given back); ALRM raises :class:`JobTimeout` inside the running job;
USR2 raises :class:`JobCancelled` inside it; USR1 reopens log files.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback as tb
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis

from . import context, recovery, serialization
from .config import Config
from .connection import connect, describe_error
from .exceptions import JobCancelled, JobTimeout, Retry, SerializationError, TaskNotAllowed
from .job import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    MAX_TIMEOUT,
    MAX_TTL,
    BadJob,
    decode,
    exception_matches,
)
from .keys import Keys
from .queue import WAKE_CAP
from .registry import TaskResolver
from .schedule import backoff
from .scripts import Scripts

if TYPE_CHECKING:
    from .slots import Slot

log = logging.getLogger("jobq.worker")

#: Aim for a claimed batch to take about this long to run (seconds).
BATCH_TARGET = 0.004
#: Most jobs claimed in one round trip.
BATCH_MAX = 128
#: Results of finished jobs are sent at the latest this long after the job ended (seconds).
FLUSH_INTERVAL = 0.005
#: How long an idle worker blocks before it looks around (heartbeat, its master).
IDLE_TICK = 1.0
#: A worker without a master looks for a cancel request of its running job this often (s).
CANCEL_CHECK_EVERY = 0.25
#: A worker without a master promotes due jobs and reaps lapsed leases this often (s).
HOUSEKEEP_EVERY = 0.25
#: Errors kept on a job (the latest ones); the attempt count keeps counting.
MAX_ERRORS_KEPT = 10
#: Reconnect back-off after a lost server connection (seconds): first, cap.
RECONNECT_FIRST, RECONNECT_CAP = 0.05, 2.0

#: Finished job ids remembered per queue (for listings), newest first.
RECENT_MAX = 1000

#: Exit codes of a worker process.
RET_OK = 0
RET_IMPORT = 4


class _Interrupt(BaseException):
    """Raised by the TERM handler while the worker blocks idle, to leave BLPOP at once."""


def worker_name(slot: int | None = None) -> str:
    host = socket.gethostname().split(".")[0] or "host"
    suffix = f".{slot}" if slot is not None else ""
    return f"{host}.{os.getpid()}{suffix}.{os.urandom(2).hex()}"


class Worker:
    """Runs jobs from ``queues`` (strict priority between them) until stopped."""

    def __init__(self, queues: Sequence[str], *, config: Config, url: str,
                 resolver: TaskResolver, name: str | None = None, burst: bool = False,
                 slot: Slot | None = None, renew_leases: bool = True, max_jobs: int = 0,
                 master_pid: int | None = None, title: str = "") -> None:
        self.queues = list(queues)
        self.config = config
        self.url = url
        self.resolver = resolver
        self.name = name or worker_name()
        self.burst = burst
        self.slot = slot
        self.renew_leases = renew_leases
        self.max_jobs = max_jobs
        self.master_pid = master_pid
        self.title_prefix = f"jobq worker {title or self.name}"
        self._name_json = serialization.dumps(self.name)
        # A job's data may be any bytes: surrogateescape keeps bytes that are not UTF-8 (the
        # job then fails as a BadJob) instead of breaking the claim, and gives ids back as is.
        self.redis = connect(url, encoding_errors="surrogateescape")
        self.keys = Keys(config.prefix)
        self.scripts = Scripts(self.redis)
        self.jobs_done = 0
        self._buffer: deque[tuple[str, str, str | None, str | None]] = deque()
        self._acks: list[Any] = []
        self._first_ack_at = 0.0
        self._avg = BATCH_TARGET  # running average of a job's duration (seconds)
        self._stopping = False
        self._idle = False
        self._running: str | None = None
        self._cancel_requested = False
        self._wake_keys = [self.keys.wake(q) for q in self.queues]
        self._hand_key = self.keys.hand(self.name)
        self._title = ""
        self._next_housekeeping = 0.0
        self._resync = False  # look for jobs held by a claim whose reply was lost

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        context.worker = self
        self._install_signals()
        lease_thread = self._start_lease_thread() if self.renew_leases else None
        log.info("worker %s started on %s", self.name, ",".join(self.queues))
        if self.slot is not None:
            self.slot.idle()  # tells the master this worker is up
        try:
            while not self._stopping:
                if self.max_jobs and self.jobs_done >= self.max_jobs:
                    log.info("worker %s recycles itself after %d jobs", self.name,
                             self.jobs_done)
                    break
                if self.renew_leases and time.monotonic() >= self._next_housekeeping:
                    self._housekeep()
                if not self._buffer and not self._exchange():
                    if self.burst and not self._scheduled_work():
                        break
                    self._wait_for_work()
                    continue
                self._run_one(*self._buffer.popleft())
                if self._acks and time.monotonic() - self._first_ack_at > FLUSH_INTERVAL:
                    self._exchange(claim=False)
        finally:
            self._shutdown(lease_thread)
        return RET_OK

    def stop(self) -> None:
        self._stopping = True

    def _exchange(self, claim: bool = True) -> bool:
        """Send pending acks and (with ``claim``) claim the next batch, in one round trip.

        A lost connection is retried with back-off until it comes back (or the worker is
        told to stop); acks are kept until they are through, so no result is dropped."""
        if self.master_pid is not None and os.getppid() != self.master_pid:
            # an orphan: nobody renews our lease any more, so claim nothing new
            self._stopping = True
            claim = False
        want = min(BATCH_MAX, max(1, int(BATCH_TARGET / max(self._avg, 1e-6)))) if claim else 0
        delay = RECONNECT_FIRST
        logged = False
        while True:
            try:
                calls: list[tuple[str, list[str], list[Any]]] = []
                if self._acks:
                    calls.append(("ack", [self.keys.jobs], [
                        self.keys.base, self.name, int(time.time() * 1000), RECENT_MAX,
                        self.config.dlq_max, WAKE_CAP, self.config.failed_ttl, *self._acks]))
                if want:
                    lease = int((time.time() + self.config.lease_time) * 1000)
                    calls.append(("claim", [self.keys.jobs], [
                        self.keys.base, self.name, lease, want, *self.queues]))
                results = self.scripts.run_many(calls) if calls else []
                break
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                if not logged:
                    log.warning("lost the server (%s); reconnecting",
                                describe_error(exc, self.url))
                    logged = True
                if self._stopping and not self._acks:
                    return False
                if self.master_pid is not None and os.getppid() != self.master_pid:
                    # our master is gone and the server too: nobody can take our results;
                    # the jobs come back when their lease lapses (at-least-once)
                    self._stopping = True
                    self._acks = []
                    return False
                if self.slot is not None:
                    self.slot.idle()  # waiting for the server is not hanging: keep beating
                time.sleep(delay)
                delay = min(delay * 2, RECONNECT_CAP)
        if logged:
            log.warning("reconnected to the server")
            self._resync = True
        if self._acks:
            stale = results[0]
            if stale:
                log.warning("results of %d job(s) dropped: their lease lapsed and they were "
                            "given back (%s)", len(stale), ", ".join(stale[:5]))
            self._acks = []
            if self.slot is not None:
                self.slot.journal_sent()
        if not want:
            return False
        claimed = results[-1]
        for i in range(0, len(claimed), 4):
            self._buffer.append((claimed[i], claimed[i + 1], claimed[i + 2], claimed[i + 3]))
        if self._resync:
            self._give_back_orphans()
        return bool(self._buffer)

    def _give_back_orphans(self) -> None:
        """After a lost connection: a claim the server ran but whose reply was lost left jobs
        held by us that we do not know of (redis-py or our loop sent the claim again). They
        never started: give them back untouched."""
        try:
            held = set(self.redis.hkeys(self.keys.held(self.name)))
            known = {entry[0] for entry in self._buffer}
            orphans = sorted(held - known - {self._running})
            if orphans:
                n = self.scripts.run("giveback", [self.keys.jobs],
                                     [self.keys.base, self.name, WAKE_CAP, *orphans])
                log.warning("gave back %d job(s) claimed by a reply lost with the server", n)
            self._resync = False
        except redis.RedisError:
            pass  # try again after the next exchange

    def _wait_for_work(self) -> None:
        """Block until a job is enqueued on one of our queues (or IDLE_TICK passes)."""
        if self.slot is not None:
            self.slot.idle()
        self._set_title("idle")
        if self.master_pid is not None and os.getppid() != self.master_pid:
            log.warning("worker %s: its master is gone; stopping", self.name)
            self._stopping = True
            return
        try:
            self._idle = True  # from here a TERM interrupts the blocking wait
            if self._stopping:
                return
            tick = HOUSEKEEP_EVERY if self.renew_leases else IDLE_TICK
            # register as idle (a producer then hands a job straight to our list: no claim
            # round trip) and block on that list and the queues' wake tokens, in one trip
            now_ms = int(time.time() * 1000)
            pipe = self.redis.pipeline(transaction=False)
            for q in self.queues:
                pipe.zadd(self.keys.idle(q), {self.name: now_ms})
            pipe.blpop([self._hand_key, *self._wake_keys], timeout=tick)
            got = pipe.execute()[-1]
        except _Interrupt:
            self.redis.connection_pool.disconnect()  # a reply may be half read
            return
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            log.warning("idle wait failed (%s); retrying", describe_error(exc, self.url))
            time.sleep(RECONNECT_FIRST)
            return
        finally:
            self._idle = False
        if got and got[0] == self._hand_key:  # "id\nqueue\nspec", already held by us
            job_id, queue, spec = got[1].split("\n", 2)
            self._buffer.append((job_id, queue, spec, None))

    def _housekeep(self) -> None:
        """Without a master (so maybe without a scheduler), promote due retries and delayed
        jobs and give back the jobs of workers whose lease lapsed."""
        self._next_housekeeping = time.monotonic() + HOUSEKEEP_EVERY
        try:
            self.scripts.run("promote", [self.keys.jobs], [
                self.keys.base, int(time.time() * 1000), 2000, WAKE_CAP])
            recovery.reap(self.redis, self.scripts, self.keys, self.config)
        except redis.RedisError as exc:
            log.warning("housekeeping failed: %s", describe_error(exc, self.url))

    def _scheduled_work(self) -> bool:
        """Whether jobs of our queues wait for a later time (a burst worker waits for them)."""
        pipe = self.redis.pipeline(transaction=False)
        for q in self.queues:
            pipe.hget(self.keys.stats(q), "scheduled")
        return any(int(n or 0) > 0 for n in pipe.execute())

    # -- one job -----------------------------------------------------------------------------
    def _run_one(self, job_id: str, queue: str, spec_raw: str | None,
                 state_raw: str | None) -> None:
        started = time.time()
        spec: Any = None
        try:
            if not job_id.isascii() and _undecodable(job_id):
                raise BadJob("job id is not valid UTF-8")
            if spec_raw is None:
                raise BadJob("job data is missing (the id was queued without a job record)")
            spec = decode(spec_raw)
            if not isinstance(spec, dict):
                raise BadJob(f"job data is a JSON {type(spec).__name__}, not an object")
            task = spec.get("t")
            args = spec.get("a", ())
            kwargs = spec.get("k") or {}
            timeout = spec.get("to", DEFAULT_TIMEOUT)
            if not isinstance(task, str):
                raise BadJob(f"job data has no task name (field 't' is {task!r})")
            if args == {}:
                args = ()
            if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
                raise BadJob("job args must be a list and kwargs an object")
            if isinstance(timeout, bool) or not isinstance(timeout, int | float) or \
                    not 0 < timeout <= MAX_TIMEOUT:
                raise BadJob(f"job timeout must be a number of seconds in (0, {MAX_TIMEOUT}], "
                             f"got {timeout!r}")
            _check_options(spec)
            fn = self.resolver.resolve(task)
        except (BadJob, TaskNotAllowed) as exc:
            named = spec.get("t") if isinstance(spec, dict) else None
            self._settle_failure(job_id, queue, spec_raw, state_raw, exc, started,
                                 permanent=True, task=named if isinstance(named, str) else "?")
            return
        self._running = job_id
        self._cancel_requested = False
        if self.slot is not None:
            self.slot.begin(job_id, started, started + timeout)
        if self._title_every_job:
            self._set_title(f"{queue} {task} {job_id}")
        context.running = (job_id, queue, spec)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("job %s %s started", job_id, task, extra={"job_id": job_id, "task": task})
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: B036 - a job's failure is data, not our crash
            signal.setitimer(signal.ITIMER_REAL, 0)
            self._running = None
            if isinstance(exc, KeyboardInterrupt | SystemExit | _Interrupt):
                exc = RuntimeError(f"the task raised {type(exc).__name__}").with_traceback(
                    exc.__traceback__)
            if isinstance(exc, JobTimeout) and not exc.args:
                # keep the traceback: it shows where the job was when its time ran out
                exc = JobTimeout(f"job exceeded its time limit of {timeout:g} s").with_traceback(
                    exc.__traceback__)
            permanent = isinstance(exc, TypeError) and _bad_arguments(fn, args, kwargs)
            self._settle_failure(job_id, queue, spec_raw, state_raw, exc, started,
                                 permanent=permanent, task=task)
            return
        finally:
            self._running = None
            context.running = None
        signal.setitimer(signal.ITIMER_REAL, 0)
        finished = time.time()
        self._avg = 0.5 * self._avg + 0.5 * (finished - started)
        self.jobs_done += 1
        ttl = spec.get("ttl", self.config.result_ttl)
        record = ""
        if ttl:
            try:
                res = serialization.encode_result(result)
            except SerializationError as exc:
                self._settle_failure(job_id, queue, spec_raw, state_raw, exc, started,
                                     permanent=True, task=task)
                return
            if state_raw:  # a retried job: keep its history of attempts
                state = _decode_state(state_raw)
                state.update(s="completed", st=round(started, 6), fin=round(finished, 6),
                             w=self.name)
                record = f'{{"spec":{spec_raw},"res":{res},{serialization.dumps(state)[1:]}'
            else:  # the common case, without a dict and a second encode
                record = (f'{{"spec":{spec_raw},"res":{res},"s":"completed","st":{started:.6f},'
                          f'"fin":{finished:.6f},"w":{self._name_json}}}')
        self._ack("done", job_id, queue, spec.get("p", 0), ttl or 0, record, spec.get("g"))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("job %s %s completed in %.3f s", job_id, task, finished - started,
                      extra={"job_id": job_id, "task": task})

    def _settle_failure(self, job_id: str, queue: str, spec_raw: str | None,
                        state_raw: str | None, exc: BaseException, started: float, *,
                        permanent: bool, task: str) -> None:
        finished = time.time()
        self._avg = 0.5 * self._avg + 0.5 * (finished - started)
        try:
            spec = decode(spec_raw) if spec_raw else None
        except BadJob:
            spec = None
        spec = spec if isinstance(spec, dict) else None
        state = _decode_state(state_raw)
        errors = state.get("e") if isinstance(state.get("e"), list) else []
        attempts = state.get("n", 0)
        attempts = (attempts if type(attempts) is int else 0) + 1
        error = {"type": type(exc).__name__, "msg": str(exc)[:2000],
                 "tb": "".join(tb.format_exception(exc))[-8000:], "t": round(finished, 3),
                 "w": self.name}
        errors = (errors + [error])[-MAX_ERRORS_KEPT:]
        max_retries = spec.get("r", DEFAULT_MAX_RETRIES) if spec else 0
        if not isinstance(max_retries, int):
            max_retries = 0
        if isinstance(exc, JobCancelled):
            state.update(n=attempts, e=errors, s="cancelled", st=round(started, 6),
                         fin=round(finished, 6), w=self.name, err=error)
            record = f'{{"spec":{spec_raw or "null"},{serialization.dumps(state)[1:]}'
            self._ack("cancel", job_id, queue, spec.get("p", 0) if spec else 0,
                      self.config.failed_ttl, record, spec.get("g") if spec else None)
            log.warning("job %s %s cancelled while running", job_id, task,
                        extra={"job_id": job_id, "task": task})
            return
        if spec and not permanent:
            permanent = not retryable(exc, spec.get("ro"), spec.get("dro"))
        retry = not permanent and attempts <= max_retries
        state.update(n=attempts, e=errors)
        priority = spec.get("p", 0) if spec else 0
        priority = priority if type(priority) is int else 0
        if retry:
            delay = exc.delay if isinstance(exc, Retry) and exc.delay is not None else backoff(
                attempts, self.config.retry_backoff_base, self.config.retry_backoff_cap,
                self.config.retry_jitter)
            state["s"] = "retry"
            if delay > 0:
                due = finished + delay
                state["due"] = round(due, 3)
                self._ack("later", job_id, queue, priority, int(due * 1000),
                          serialization.dumps(state))
            else:
                self._ack("retry", job_id, queue, priority, 0, serialization.dumps(state))
            log.warning("job %s %s failed (attempt %d of %d), retry in %.2f s: %s: %s", job_id,
                        task, attempts, max_retries + 1, delay, error["type"],
                        error["msg"][:200], extra={"job_id": job_id, "task": task})
            return
        state.update(s="failed", st=round(started, 6), fin=round(finished, 6), w=self.name,
                     err=error)
        spec_json = spec_raw if spec is not None else "null"
        record = f'{{"spec":{spec_json},{serialization.dumps(state)[1:]}'
        self._ack("fail", job_id, queue, priority, self.config.failed_ttl, record,
                  spec.get("g") if spec else None)
        log.warning("job %s %s failed%s: %s: %s", job_id, task,
                    "" if permanent else f" after {attempts} attempt(s)", error["type"],
                    error["msg"][:200], extra={"job_id": job_id, "task": task})

    def _ack(self, kind: str, job_id: str, queue: str, priority: Any, ttl: int,
             payload: str, group: Any = None) -> None:
        if not self._acks:
            self._first_ack_at = time.monotonic()
        ident: str | bytes = job_id
        if not job_id.isascii():  # as bytes: the id as it came, even if it is not UTF-8
            ident = job_id.encode("utf-8", "surrogateescape")
        fields = (kind, ident, queue, priority, ttl, payload,
                  group if _valid_group(group) else "")
        if self.slot is not None:
            # journal it first: if this worker dies before sending it, the master will
            if isinstance(ident, str) and not self.slot.journal_ack(fields):
                self._exchange(claim=False)  # journal full: send what is there now
                self.slot.journal_ack(fields)
            self.slot.end()
        self._acks += fields

    # -- process plumbing --------------------------------------------------------------------
    _title_every_job = True

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

    def _on_stop(self, signum: int, frame: Any) -> None:
        if self.master_pid is not None and os.getppid() != self.master_pid:
            # our master died (this TERM is its death signal): nobody renews our lease any
            # more, so the job we hold will run elsewhere; stop now, with whatever we forked
            os.killpg(os.getpgrp(), signal.SIGKILL)
        self._stopping = True
        if self._idle:
            raise _Interrupt()

    def _on_alarm(self, signum: int, frame: Any) -> None:
        if self._running is not None:
            raise JobTimeout()

    def _on_reopen_logs(self, signum: int, frame: Any) -> None:
        from . import log as jobq_log

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
        stop = self._lease_stop = threading.Event()
        client = connect(self.url)

        def renew() -> None:
            period = self.config.lease_time / 3
            next_renewal = 0.0
            while not stop.wait(CANCEL_CHECK_EVERY):
                try:
                    if time.monotonic() >= next_renewal:
                        next_renewal = time.monotonic() + period
                        client.zadd(self.keys.leases, {
                            self.name: int((time.time() + self.config.lease_time) * 1000)},
                            xx=True)
                    running = self._running
                    if running and client.hexists(self.keys.cancel, running):
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
            if self._acks:
                self._exchange(claim=False)
            # give back what was claimed (or handed to us) but not started: it runs
            # elsewhere, untouched
            recovery.release(self.redis, self.scripts, self.keys, self.config, self.name,
                             cause="worker stopped", current="-", queues=self.queues)
        except redis.RedisError as exc:
            log.warning("could not give back unstarted jobs (%s); they return when the "
                        "lease lapses", describe_error(exc, self.url))
        if lease_thread is not None:
            self._lease_stop.set()
        log.info("worker %s stopped after %d job(s)", self.name, self.jobs_done)


def _check_options(spec: dict[str, Any]) -> None:
    """The spec's optional fields the settle scripts use must have their types: data found in
    Redis is not trusted (a bad value fails the job, it must not break a script)."""
    p, r, ttl, g = spec.get("p", 0), spec.get("r", 0), spec.get("ttl", 0), spec.get("g")
    if type(p) is not int or type(r) is not int or r < 0 or type(ttl) is not int or \
            not 0 <= ttl <= MAX_TTL:
        raise BadJob(f"job options have bad values (priority {p!r}, max_retries {r!r}, "
                     f"result_ttl {ttl!r})")
    if g is not None and not _valid_group(g):
        raise BadJob(f"job group (field 'g') must be a short printable string, got {g!r:.80}")


def _valid_group(g: Any) -> bool:
    return type(g) is str and 0 < len(g) <= 128 and g.isascii() and g.isprintable()


def _undecodable(text: str) -> bool:
    """True if ``text`` was read from bytes that are not UTF-8 (they arrive as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _decode_state(raw: str | None) -> dict[str, Any]:
    """A job's state (attempts, errors), {} when absent or unreadable.

    It goes into the job's final record, so what jobq would never have written there is
    dropped: the record's own fields (a second "res" would replace the job's result), and
    counts or errors of the wrong type (readers count on them)."""
    if not raw:
        return {}
    try:
        state = decode(raw)
    except BadJob:
        return {}
    if not isinstance(state, dict):
        return {}
    for name in ("spec", "res", "st", "fin"):
        state.pop(name, None)
    for name in ("n", "d"):
        if name in state and type(state[name]) is not int:
            del state[name]
    if "e" in state:
        errors = state["e"]
        state["e"] = [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []
    return state


def retryable(exc: BaseException, retry_on: Any, dont_retry_on: Any) -> bool:
    """Whether a job's failure may be retried, by its retry_on/dont_retry_on names."""
    if isinstance(exc, Retry):
        return True
    if isinstance(dont_retry_on, list) and exception_matches(exc, dont_retry_on):
        return False
    if isinstance(retry_on, list) and retry_on:
        return exception_matches(exc, retry_on)
    return True


def _bad_arguments(fn: Any, args: Any, kwargs: Any) -> bool:
    """True if ``fn`` cannot be called with these arguments at all (a permanent failure)."""
    import inspect

    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError:
        return True
    except ValueError:
        return False
    return False


def set_title(title: str) -> None:
    try:
        import setproctitle
    except ImportError:  # pragma: no cover - a declared dependency
        return
    setproctitle.setproctitle(title)


class WorkerPool:
    """A supervised pool of worker processes, started from Python (the tutorial's API).

    ``WorkerPool(queue, num_workers=2).start()`` forks a jobq master from this process, so
    functions defined in this script (``__main__``) can be enqueued and run: the workers are
    forked from it. ``stop()`` stops it gracefully (running jobs finish) and waits.
    """

    def __init__(self, queue: Any, num_workers: int = 4, *, queues: Sequence[str] | None = None,
                 imports: Sequence[str] = ()) -> None:
        self.queue = queue
        self.num_workers = num_workers
        self.queues = list(queues or [queue.name])
        self.imports = list(imports)
        self.pid = 0

    @property
    def workers(self) -> list[int]:
        """Pids of the live worker processes."""
        import psutil

        if not self.pid:
            return []
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        return [p.pid for p in children if "jobq worker" in " ".join(p.cmdline())]

    def start(self, timeout: float = 30.0) -> None:
        """Fork the master and wait until its workers are up."""
        from . import registry
        from .master.arbiter import Master, Options

        if self.pid:
            raise RuntimeError("this pool is already started")
        config = self.queue.config.replace(
            workers=self.num_workers, queues=self.queues,
            imports=list(dict.fromkeys([*self.queue.config.imports, *self.imports])),
            redis_url=self.queue.url)
        from .scheduler import owner_id

        registry.main_tasks_allowed = True
        owner = owner_id()
        ready_r, ready_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the master
            code = 1
            try:
                os.close(ready_r)
                os.setsid()  # Ctrl-C in the terminal reaches the script, which stops us
                options = Options(allow_main=True, owner=owner,
                                  on_ready=lambda: os.write(ready_w, b"1") and None)
                code = Master(config, options).run()
            finally:
                os._exit(code)
        os.close(ready_w)
        self.pid = pid
        import select

        ready, _, _ = select.select([ready_r], [], [], timeout)
        got = os.read(ready_r, 1) if ready else b""
        os.close(ready_r)
        if got != b"1":
            self.stop(timeout=5)
            raise RuntimeError("the worker pool did not start (see its log)")
        log.info("started %d workers", self.num_workers)

    def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully: running jobs finish (killed and re-queued after ``timeout``)."""
        from .scheduler import drop_owned_schedules

        if not self.pid:
            return
        pid, self.pid = self.pid, 0
        wait = self.queue.config.graceful_timeout + 5 if timeout is None else timeout
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.02)
        else:
            os.kill(pid, signal.SIGQUIT)  # the master re-queues what still runs
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        drop_owned_schedules(self.queue)
        log.info("all workers stopped")

    def __enter__(self) -> WorkerPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
