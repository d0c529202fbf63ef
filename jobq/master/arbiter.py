"""The master: forks the workers and the scheduler, watches them, restarts them, reloads.

::

                        ┌───────────── jobq-master ─────────────┐
      signals ──► wakeup fd ──► loop: reap · check · renew · spawn
                        │   reads     ▲            │ decisions from policy.py
                        │ shared mem  │ slots      ▼ (pure, fake-clock tested)
            fork ┌──────┴──────┐  ┌───┴─────┐   ┌───────────┐
                 │ worker 0    │  │ worker 1│ … │ scheduler │
                 └──────┬──────┘  └───┬─────┘   └─────┬─────┘
                        │ claim/ack   │               │ promote, fire, reap lapsed leases
                        ▼             ▼               ▼
                 ┌──────────────── Redis / Valkey ───────────────┐
                 └── the master renews its workers' leases, and gives back the jobs of
                     a worker that died, with the cause, at once ─┘

The master never runs jobs. Signal handlers do nothing but wake the loop (the signal number
arrives through ``signal.set_wakeup_fd``); everything is done in the loop, so no handler ever
logs, locks or forks.

======  =========================================================================================
signal  what the master does
======  =========================================================================================
HUP     re-read the config, then a rolling replacement: new workers (new code, new config)
        start, and once they are up the old ones stop claiming and finish their current job
TERM    graceful stop: workers finish their current job (up to ``graceful_timeout``), then
        whatever still runs is killed and its job re-queued; exit 0
INT     like TERM; a second INT acts like QUIT
QUIT    stop at once: workers are killed, their jobs re-queued (none lost); exit 0
TTIN    one worker more
TTOU    one worker fewer (never below one)
USR1    reopen log files (after logrotate), in the master and its workers
CHLD    reap exited children
======  =========================================================================================
"""

from __future__ import annotations

import logging
import os
import random
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
import redis

from .. import exitcodes, recovery
from .. import log as jobq_log
from ..config import Config, ConfigError, load_config
from ..connection import connect, describe_error
from ..keys import Keys
from ..scripts import Scripts
from ..slots import BUSY, IDLE, SlotTable
from ..worker import set_title
from . import policy
from .notify import notify
from .policy import CrashBreaker, Kill, Limits, Retire, SlotHistory, WorkerState

log = logging.getLogger("jobq.master")

#: Signals the master handles in its loop.
HANDLED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGTTIN,
           signal.SIGTTOU, signal.SIGUSR1, signal.SIGCHLD)
#: How often worker memory is read (seconds).
MEMORY_EVERY = 1.0
#: How often the embedded server is checked (seconds).
SERVER_EVERY = 5.0
#: How long a reload waits for the new workers to come up before retiring the old anyway.
RELOAD_READY_WAIT = 10.0
#: Restart delay of a scheduler process that died.
SCHEDULER_RESTART = 1.0
#: How often the master looks for cancel requests of the jobs its workers run (seconds).
CANCEL_CHECK_EVERY = 0.25
#: How often the master describes itself and its workers in Redis (``jobq info``).
HEARTBEAT_EVERY = 2.0


@dataclass
class Options:
    """How the master was started (re-applied on every reload)."""

    config_path: str | None = None
    overrides: dict[str, Any] | None = None
    allow_main: bool = False  # workers may run functions of __main__ (WorkerPool)
    pidfile: str = ""
    on_ready: Callable[[], None] | None = None
    owner: str = ""  # the script that forked this master (schedules of its __main__ tasks)


class Master:
    """Supervise ``config.workers`` workers and one scheduler until told to stop."""

    def __init__(self, config: Config, options: Options | None = None) -> None:
        self.config = config
        self.options = options or Options()
        self.url = ""
        self.embedded = not config.redis_url
        self.workers: dict[int, WorkerState] = {}
        self.histories: dict[int, SlotHistory] = {}
        self.spawn_at: dict[int, float] = {}  # slot -> when to (re)spawn a worker there
        self.breaker = CrashBreaker()
        self.generation = 0
        self.target = config.workers
        self.scheduler_pid = 0
        self.scheduler_due = 0.0
        self.stopping: str | None = None  # None, "graceful" or "quit"
        self.stop_deadline = 0.0
        self.exit_code = exitcodes.OK
        self.int_count = 0
        self.reload_started: float | None = None
        self.to_retire: list[int] = []
        self.unreleased: list[tuple[str, str, str]] = []  # (worker, current job, cause)
        self.next_memory = self.next_renew = self.next_server = self.next_heartbeat = 0.0
        self.next_cancel_check = 0.0
        self.interrupted: set[tuple[int, str]] = set()  # (worker pid, job id) signalled
        self.started = time.time()
        self.id = ""
        self.pid = os.getpid()
        self.rng = random.Random()
        self.host = socket.gethostname().split(".")[0] or "host"
        self.slots = SlotTable(max(64, 8 * config.workers))
        self.redis: redis.Redis | None = None
        self.keys = Keys(config.prefix)
        self.scripts: Scripts | None = None
        self._wakeup_r = self._wakeup_w = -1
        self._pidfile: Any = None

    @property
    def limits(self) -> Limits:
        c = self.config
        return Limits(hard_timeout_grace=c.hard_timeout_grace,
                      heartbeat_timeout=c.heartbeat_timeout,
                      memory_soft_mb=c.memory_soft_limit_mb,
                      memory_hard_mb=c.memory_hard_limit_mb,
                      graceful_timeout=c.graceful_timeout)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        """Run until stopped; returns the exit code (see :mod:`jobq.exitcodes`)."""
        from ..connection import resolve_url

        if self.options.pidfile:
            from .pidfile import PidfileError, acquire

            try:
                self._pidfile = acquire(self.options.pidfile)
            except PidfileError as exc:
                log.error("%s", exc)
                print(f"jobq-master: error: {exc}", file=sys.stderr, flush=True)
                return exitcodes.PIDFILE
        try:
            self.url = resolve_url(self.config)
            self.id = f"{self.host}.{os.getpid()}"
            self.pid = os.getpid()
            self.redis = connect(self.url)
            self.scripts = Scripts(self.redis)
            self._install_signals()
            self._title()
            log.info("master %d starting %d worker(s) on %s", os.getpid(), self.target,
                     ",".join(self.config.queues))
            self._spawn_scheduler()
            self._manage_workers(time.time())
            ready_sent = False
            while True:
                now = time.time()
                self._spawn_due(now)
                if not ready_sent and self._all_ready():
                    ready_sent = True
                    notify("READY=1")
                    if self.options.on_ready:
                        self.options.on_ready()
                    log.info("master ready: %d worker(s)", len(self.workers))
                if self.stopping and not self.workers and not self.scheduler_pid:
                    break
                wake = policy.next_check(now, list(self.workers.values()), self.limits)
                self._wait(wake if ready_sent else min(wake, now + 0.02))
                self._handle_signals()
                self._reap()
                self._tick(time.time())
        finally:
            self._cleanup()
        log.info("master %d stopped", os.getpid())
        return self.exit_code

    def _wait(self, until: float) -> None:
        timeout = max(0.0, min(until - time.time(), 1.0))
        if self.spawn_at:
            timeout = min(timeout, max(0.0, min(self.spawn_at.values()) - time.time()))
        try:
            select.select([self._wakeup_r], [], [], timeout)
        except InterruptedError:
            pass

    def _tick(self, now: float) -> None:
        self._read_slots(now)
        if now >= self.next_memory:
            self.next_memory = now + MEMORY_EVERY
            self._read_memory()
        for action in policy.check_workers(now, list(self.workers.values()), self.limits):
            if isinstance(action, Kill):
                self._kill(action.pid, action.cause)
            elif isinstance(action, Retire):
                log.warning("recycling worker %d: %s", action.pid, action.reason)
                self._retire(action.pid, now)
        if self.reload_started is not None and (
                self._all_ready() or now - self.reload_started > RELOAD_READY_WAIT):
            for pid in self.to_retire:
                self._retire(pid, now)
            self.to_retire = []
            self.reload_started = None
            notify("READY=1")
        if self.stopping == "graceful" and now > self.stop_deadline:
            for pid, w in list(self.workers.items()):
                if not w.killing:
                    self._kill(pid, "still running at graceful_timeout when stopping; "
                                    "re-queued")
        if now >= self.next_renew:
            self.next_renew = now + self.config.lease_time / 3
            self._renew_leases(now)
        if now >= self.next_cancel_check:
            self.next_cancel_check = now + CANCEL_CHECK_EVERY
            self._interrupt_cancelled()
        if now >= self.next_heartbeat and not self.stopping:
            self.next_heartbeat = now + HEARTBEAT_EVERY
            self._heartbeat(now)
        if self.unreleased:
            self._retry_releases()
        if self.embedded and now >= self.next_server and not self.stopping:
            self.next_server = now + SERVER_EVERY
            self._supervise_server()
        if not self.stopping and not self.scheduler_pid and now >= self.scheduler_due:
            self._spawn_scheduler()

    # -- signals -----------------------------------------------------------------------------
    def _install_signals(self) -> None:
        self._wakeup_r, self._wakeup_w = os.pipe()
        os.set_blocking(self._wakeup_r, False)
        os.set_blocking(self._wakeup_w, False)
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        for sig in HANDLED:
            signal.signal(sig, _noop)  # the wakeup fd carries the signal number

    def _handle_signals(self) -> None:
        try:
            data = os.read(self._wakeup_r, 512)
        except BlockingIOError:
            return
        for signum in data:
            if signum == signal.SIGCHLD:
                continue  # _reap runs on every pass
            handler = getattr(self, f"handle_{signal.Signals(signum).name[3:].lower()}", None)
            if handler:
                handler()

    def handle_hup(self) -> None:
        if self.stopping:
            return
        notify("RELOADING=1")
        try:
            config = load_config(self.options.config_path, **(self.options.overrides or {}))
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            notify("READY=1")
            return
        log.info("reloading: config re-read, replacing %d worker(s)", len(self.workers))
        self.config = config
        self.target = config.workers
        self.generation += 1
        self.to_retire += [pid for pid, w in self.workers.items() if w.retiring_since is None]
        self.spawn_at = {}
        self.reload_started = time.time()
        self._manage_workers(time.time())
        if self.scheduler_pid:
            _signal(self.scheduler_pid, signal.SIGHUP)
        self._title()

    def handle_term(self) -> None:
        self._stop("graceful")

    def handle_int(self) -> None:
        self.int_count += 1
        self._stop("graceful" if self.int_count == 1 else "quit")

    def handle_quit(self) -> None:
        self._stop("quit")

    def handle_ttin(self) -> None:
        if not self.stopping:
            self.target += 1
            log.info("TTIN: now %d worker(s)", self.target)
            self._manage_workers(time.time())
            self._title()

    def handle_ttou(self) -> None:
        if not self.stopping and self.target > 1:
            self.target -= 1
            log.info("TTOU: now %d worker(s)", self.target)
            self._manage_workers(time.time())
            self._title()

    def handle_usr1(self) -> None:
        jobq_log.reopen()
        for pid in self.workers:
            _signal(pid, signal.SIGUSR1)

    def _stop(self, how: str) -> None:
        now = time.time()
        if self.stopping == "quit" or self.stopping == how:
            return
        notify("STOPPING=1")
        self.stopping = how
        self.spawn_at = {}
        if how == "graceful":
            self.stop_deadline = now + self.config.graceful_timeout
            log.info("stopping: waiting up to %g s for running jobs",
                     self.config.graceful_timeout)
            for pid in list(self.workers):
                self._retire(pid, now)
        else:
            log.info("stopping now: running jobs are re-queued")
            for pid in list(self.workers):
                self._kill(pid, "master stopped at once (QUIT); re-queued")
        if self.scheduler_pid:
            _signal(self.scheduler_pid, signal.SIGTERM if how == "graceful" else signal.SIGKILL)

    # -- workers -----------------------------------------------------------------------------
    def _manage_workers(self, now: float) -> None:
        """Bring the current generation to ``target`` workers: queue spawns, or retire."""
        if self.stopping:
            return
        current = [w for w in self.workers.values()
                   if w.generation == self.generation and w.retiring_since is None
                   and not w.killing]
        count = len(current) + len(self.spawn_at)
        while count < self.target:
            slot = self._free_slot()
            if slot is None:
                log.error("no free worker slot (capacity %d)", self.slots.capacity)
                break
            self.spawn_at[slot] = max(now, self.histories.setdefault(slot, SlotHistory())
                                      .not_before)
            count += 1
        while count > self.target:
            if self.spawn_at:
                self.spawn_at.pop(max(self.spawn_at))
            else:
                victim = min(current, key=lambda w: (w.busy, -w.slot))
                current.remove(victim)
                self._retire(victim.pid, now)
            count -= 1

    def _free_slot(self) -> int | None:
        used = {w.slot for w in self.workers.values()} | set(self.spawn_at)
        for slot in range(self.slots.capacity):
            if slot not in used:
                return slot
        return None

    def _spawn_due(self, now: float) -> None:
        for slot, when in sorted(self.spawn_at.items()):
            if when <= now:
                del self.spawn_at[slot]
                self._spawn_worker(slot, now)

    def _spawn_worker(self, slot: int, now: float) -> None:
        name = f"{self.host}.{os.getpid()}.{slot}.{os.urandom(3).hex()}"
        max_jobs = policy.max_jobs_for(self.config.max_jobs_per_worker,
                                       self.config.max_jobs_jitter, self.rng)
        self.slots.clear(slot)
        pid = self._fork(lambda: self._worker_child(slot, name, max_jobs))
        self.workers[pid] = WorkerState(slot=slot, pid=pid, name=name, born=now,
                                        generation=self.generation, heartbeat=now)
        log.debug("spawned worker %d in slot %d (%s)", pid, slot, name)

    def _fork(self, child: Callable[[], int]) -> int:
        # Block the handled signals across fork: the child must not run the master's
        # handlers (or write to its wakeup fd) before it has installed its own.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        sys.stdout.flush()
        sys.stderr.flush()
        master = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = exitcodes.FAILURE
            try:
                signal.set_wakeup_fd(-1)
                os.close(self._wakeup_r)
                os.close(self._wakeup_w)
                for sig in HANDLED:
                    signal.signal(sig, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the master decides on Ctrl-C
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
                os.setpgid(0, 0)  # its own group: killing it kills its children too
                _die_with_parent()
                if os.getppid() != master:
                    os._exit(exitcodes.FAILURE)  # the master died before that took effect
                random.seed()
                code = child()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else exitcodes.FAILURE
            except BaseException:
                logging.getLogger("jobq.worker").exception("worker crashed")
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return pid

    def _worker_child(self, slot_index: int, name: str, max_jobs: int) -> int:
        from ..exceptions import TaskImportError
        from ..registry import TaskResolver
        from ..worker import Worker

        slot = self.slots.slot(slot_index)
        slot.boot(os.getpid())
        set_title(f"jobq worker {slot_index}: booting")
        try:
            resolver = TaskResolver(self.config.imports, allow_main=self.options.allow_main)
        except TaskImportError as exc:
            message = str(exc)
            slot.fail_boot(message)
            log.error("worker %d: %s", slot_index, message)
            return exitcodes.IMPORT
        worker = Worker(self.config.queues, config=self.config, url=self.url,
                        resolver=resolver, name=name, slot=slot, renew_leases=False,
                        max_jobs=max_jobs, master_pid=self.pid, title=f"{slot_index}")
        return worker.run()

    def _read_slots(self, now: float) -> None:
        for w in self.workers.values():
            view = self.slots.read(w.slot)
            if view.pid != w.pid:
                continue  # not yet booted
            w.ready = w.ready or view.state in (IDLE, BUSY)
            w.busy = view.state == BUSY
            w.job_id = view.job_id
            w.job_started = view.job_started
            w.deadline = view.deadline
            w.heartbeat = view.heartbeat
            w.jobs_done = view.jobs_done
            if w.ready and self.histories.get(w.slot):
                self.histories[w.slot].failures = 0
                self.histories[w.slot].not_before = 0.0

    def _read_memory(self) -> None:
        for w in self.workers.values():
            try:
                w.memory_mb = _memory_mb(w.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass

    def _all_ready(self) -> bool:
        current = [w for w in self.workers.values() if w.generation == self.generation]
        return len(current) >= self.target and all(w.ready for w in current)

    def _retire(self, pid: int, now: float) -> None:
        w = self.workers.get(pid)
        if w is None or w.retiring_since is not None:
            return
        w.retiring_since = now
        _signal(pid, signal.SIGTERM)

    def _kill(self, pid: int, cause: str) -> None:
        w = self.workers.get(pid)
        if w is None or w.killing:
            return
        w.killing = cause
        if not self.stopping:
            log.warning("killing worker %d (slot %d): %s", pid, w.slot, cause)
        _killpg(pid)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.scheduler_pid:
                self.scheduler_pid = 0
                if not self.stopping:
                    text = policy.describe_exit(status)[0]
                    log.warning("scheduler %d %s; restarting in %g s", pid, text,
                                SCHEDULER_RESTART)
                    self.scheduler_due = time.time() + SCHEDULER_RESTART
                continue
            w = self.workers.pop(pid, None)
            if w is not None:
                self._worker_exited(w, status)

    def _worker_exited(self, w: WorkerState, status: int) -> None:
        now = time.time()
        view = self.slots.read(w.slot)
        if view.pid == w.pid and view.state in (IDLE, BUSY):
            w.ready = True  # it came up, even if no tick saw it: its death is no boot failure
        _killpg(w.pid)  # whatever it forked goes with it
        history = self.histories.setdefault(w.slot, SlotHistory())
        decision = policy.on_exit(now, w, status, history, self.breaker,
                                  stopping=self.stopping is not None, boot_error=view.message)
        if self.stopping:
            current = "-"  # we stopped it: give its job back untouched
        else:
            current = view.job_id if view.pid == w.pid and view.state == BUSY else "-"
        self._send_unsent_acks(w)
        self._release(w.name, current, decision.cause)
        self.slots.clear(w.slot)
        if decision.unexpected and not self.stopping:
            log.warning("worker %d (slot %d) %s%s", w.pid, w.slot, decision.cause,
                        f"; its job {current} was given back" if current != "-" else "")
        if decision.stop_master:
            code, reason = decision.stop_master
            log.error("stopping: %s", reason)
            print(f"jobq-master: error: {reason}", file=sys.stderr, flush=True)
            self.exit_code = code
            self._stop("quit")
            return
        if decision.respawn_at is not None:
            history.not_before = max(history.not_before, decision.respawn_at)
        self._manage_workers(now)

    def _send_unsent_acks(self, w: WorkerState) -> None:
        """Settle the jobs the dead worker finished but had not acknowledged yet."""
        acks = self.slots.unsent_acks(w.slot)
        if not acks:
            return
        try:
            assert self.scripts is not None
            recovery.send_acks(self.redis, self.scripts, self.keys, self.config, w.name, acks)
            log.info("sent %d acknowledgement(s) worker %d had not sent", len(acks), w.pid)
        except redis.RedisError as exc:
            log.warning("cannot send the acknowledgements of worker %d (%s): those jobs will "
                        "run again", w.pid, describe_error(exc, self.url))

    def _release(self, worker: str, current: str, cause: str) -> None:
        try:
            assert self.scripts is not None
            recovery.release(self.redis, self.scripts, self.keys, self.config, worker,
                             cause=cause, current=current, queues=self.config.queues)
        except redis.RedisError as exc:
            log.warning("cannot give back the jobs of %s yet (%s); will retry", worker,
                        describe_error(exc, self.url))
            self.unreleased.append((worker, current, cause))

    def _retry_releases(self) -> None:
        pending, self.unreleased = self.unreleased, []
        for worker, current, cause in pending:
            self._release(worker, current, cause)

    def _renew_leases(self, now: float) -> None:
        """Extend the lease of every live worker (XX: never re-create a released one)."""
        if not self.workers or self.redis is None:
            return
        deadline = int((now + self.config.lease_time) * 1000)
        try:
            self.redis.zadd(self.keys.leases,
                            {w.name: deadline for w in self.workers.values()}, xx=True)
        except redis.RedisError as exc:
            log.warning("cannot renew leases (%s)", describe_error(exc, self.url))

    def _interrupt_cancelled(self) -> None:
        """Signal the workers whose running job was cancelled (USR2: JobCancelled)."""
        busy = [(w.pid, w.job_id) for w in self.workers.values() if w.busy and w.job_id]
        slot_of = {w.pid: w.slot for w in self.workers.values()}
        if not busy or self.redis is None:
            return
        try:
            asked = self.redis.hmget(self.keys.cancel, [job for _, job in busy])
        except redis.RedisError:
            return
        for (pid, job), reason in zip(busy, asked, strict=True):
            if reason is not None and (pid, job) not in self.interrupted:
                self.interrupted.add((pid, job))
                log.info("interrupting job %s in worker %d: %s", job, pid, reason)
                self.slots.set_cancel(slot_of[pid], job)  # the worker checks it is still that job
                _signal(pid, signal.SIGUSR2)
        current = set(busy)
        self.interrupted &= current

    def _heartbeat(self, now: float) -> None:
        """Describe this master and what each worker does, for ``jobq info`` and the
        scheduler (which drops the schedules of a pool that is gone)."""
        if self.redis is None:
            return
        from .. import serialization

        workers = [{"slot": w.slot, "pid": w.pid, "name": w.name, "job": w.job_id,
                    "since": w.job_started if w.busy else None,
                    "memory_mb": round(w.memory_mb, 1) if w.memory_mb else None,
                    "jobs_done": w.jobs_done, "state": "busy" if w.busy else "idle"}
                   for w in sorted(self.workers.values(), key=lambda w: w.slot)]
        info = {"host": self.host, "pid": os.getpid(), "started": self.started, "ts": now,
                "queues": self.config.queues, "target": self.target,
                "generation": self.generation, "owner": self.options.owner,
                "scheduler_pid": self.scheduler_pid, "workers": workers}
        try:
            self.redis.hset(self.keys.masters, self.id, serialization.dumps(info))
        except redis.RedisError as exc:
            log.debug("heartbeat failed: %s", exc)

    # -- the scheduler and the server ----------------------------------------------------------
    def _spawn_scheduler(self) -> None:
        from ..scheduler import scheduler_main

        self.scheduler_pid = self._fork(
            lambda: scheduler_main(self.config, self.url, self.options))
        log.debug("spawned scheduler %d", self.scheduler_pid)

    def _supervise_server(self) -> None:
        from ..server import EmbeddedServer, ServerError

        server = EmbeddedServer()
        if server.is_running():
            return
        log.warning("the embedded server is not running; starting it")
        try:
            server.start()
        except ServerError as exc:
            log.error("cannot start the embedded server: %s", exc)

    # -- odds and ends ----------------------------------------------------------------------
    def _title(self) -> None:
        set_title(f"jobq-master [{','.join(self.config.queues)}] workers={self.target}"
                  f" gen={self.generation}")

    def _cleanup(self) -> None:
        if self.redis is not None and self.id:
            try:
                self.redis.hdel(self.keys.masters, self.id)
            except redis.RedisError:
                pass
        for pid in list(self.workers):
            _killpg(pid)
        if self.scheduler_pid:
            _signal(self.scheduler_pid, signal.SIGKILL)
        if self._wakeup_w >= 0:
            signal.set_wakeup_fd(-1)
            os.close(self._wakeup_r)
            os.close(self._wakeup_w)
        if self._pidfile is not None:
            from .pidfile import release

            release(self._pidfile)


def _die_with_parent() -> None:
    """Ask Linux to send us SIGTERM when the master dies (even by SIGKILL): an orphaned
    worker stops after its job instead of running on with nobody renewing its lease."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the getppid() checks of the worker and scheduler loops remain


def _noop(signum: int, frame: Any) -> None:
    """Signal handler of the master: the wakeup fd already carries the signal."""


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        _signal(pid, signal.SIGKILL)


def _memory_mb(pid: int) -> float:
    """Current unique memory (USS) of a process, falling back to RSS; in MiB."""
    proc = psutil.Process(pid)
    try:
        return float(proc.memory_full_info().uss) / 2**20
    except (psutil.AccessDenied, AttributeError):
        return float(proc.memory_info().rss) / 2**20
