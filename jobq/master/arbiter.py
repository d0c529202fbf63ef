"""The master: forks the workers and the scheduler, watches them, restarts them, reloads.

::

                 ┌────────────────────── jobq-master ──────────────────────┐
      signals ──►│ wakeup fd ──► arbiter loop: reap · check · spawn · kill │
                 │      ▲           │  ▲ decisions from policy.py (pure)   │
                 │ wake │  seen     ▼  │ interrupts                        │
                 │   duties thread: renew leases · heartbeat · cancels ·   │
                 │   give back dead workers' jobs · watch the embedded server
                 └────┬──────────────▲─────────────────────────┬──────────┘
            fork ┌────┴──────┐  ┌────┴────┐             ┌──────┴────┐
                 │ worker 0  │  │ worker 1│ …  slots    │ scheduler │
                 └────┬──────┘  └────┬────┘  (shared    └─────┬─────┘
                      │ claim/ack    │        memory)         │ promote, fire, reap
                      ▼              ▼                        ▼
                 ┌──────────────────── Redis / Valkey ──────────────────────┐

The master never runs jobs, and its loop never talks to the server: the arbiter supervises
processes (reap, spawn, kill, signal, decided by :mod:`.policy`), and what the master owes
the server runs in a thread of its own (:mod:`.duties`), so a slow or hung server never
delays supervision. Signal handlers do nothing but wake the loop (the signal number arrives
through ``signal.set_wakeup_fd``); everything is done in the loop, so no handler ever logs,
locks or forks.

======  =========================================================================================
signal  what the master does
======  =========================================================================================
HUP     reopen log files; re-read the config, then a rolling replacement: new workers (new
        code, new config) start, and once they are up the old ones stop claiming and finish
        their current job; the scheduler reopens its log and reloads its schedules
TERM    graceful stop: workers finish their current job (up to ``graceful_timeout``), then
        whatever still runs is killed and its job re-queued; exit 0
INT     like TERM; a second INT acts like QUIT
QUIT    stop at once: workers are killed, their jobs re-queued (none lost); exit 0
TTIN    one worker more
TTOU    one worker fewer (never below one). The kernel keeps one pending signal of a kind:
        the same signal sent again before the first was delivered is merged into it, so
        quick repeats may count once; ``jobq workers add|remove|set N`` changes the number
        exactly (a control request, see :mod:`jobq.control`, applied by ``_apply_controls``)
USR1    reopen log files (after logrotate), in the master, its workers and its scheduler
CHLD    reap exited children
======  =========================================================================================
"""

from __future__ import annotations

import logging
import os
import random
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from .. import exitcodes, metrics
from .. import log as jobq_log
from ..config import Config, ConfigError, host_name, load_config
from ..connection import ServerProblem, check_server
from ..exceptions import TaskImportError
from ..log import Repeats
from ..metrics.tally import TallyTable, Totals
from ..process import (
    PARENT_DIED,
    die_with_parent,
    kill_group,
    send_signal,
    set_title,
    worker_memory,
)
from ..registry import TaskResolver
from ..schedule import ScheduleError
from ..scheduler import config_schedules
from ..scheduler_daemon import scheduler_main
from ..server import resolve_url
from ..slots import BUSY, IDLE, SlotTable
from ..wire import AckEntry, route
from ..worker_loop import Worker
from . import policy
from .duties import Duties, Seen
from .notify import notify
from .pidfile import PidfileError, acquire, release
from .policy import CrashBreaker, Kill, Limits, Retire, SlotHistory, SpawnPacer, WorkerState

log = logging.getLogger("jobq.master")

#: Signals the master handles in its loop.
HANDLED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGTTIN,
           signal.SIGTTOU, signal.SIGUSR1, signal.SIGCHLD)
#: How often worker memory is read (seconds).
MEMORY_EVERY = 1.0
#: How long a reload waits for the new workers to come up before retiring the old anyway.
RELOAD_READY_WAIT = 10.0
#: Restart delay of a scheduler process that died.
SCHEDULER_RESTART = 1.0
#: Retry back-off while the server does not answer at start (seconds), and how often the
#: master says it is still waiting.
SERVER_WAIT_FIRST, SERVER_WAIT_CAP, SERVER_WAIT_SAY_EVERY = 0.1, 5.0, 60.0
#: How long a stopping master waits for its duties (giving back dead workers' jobs).
DUTIES_DRAIN = 10.0
#: The byte the duties thread writes to the wakeup fd (no signal has number 0).
_DUTIES_WAKE = 0
#: Config keys a reload cannot change: the server and the key names the master's duties and
#: the scheduler hold from the start (new workers would use others), the pidfile it holds,
#: the logging it set up. A HUP that changes one is refused: it takes a restart.
FIXED_AT_START = ("redis_url", "prefix", "pidfile", "log_file", "log_level", "log_format",
                  "metrics_port", "metrics_host", "hostname")
#: Why a master with no task module neither starts nor reloads: every job would fail. (A
#: WorkerPool's master may: its workers run the functions of the script's ``__main__``.)
NO_TASK_MODULE = ('imports: no task module: name the modules that define your tasks '
                  '(imports = ["myapp.tasks"] in the config, or -I myapp.tasks)')
#: Control requests the heartbeat lists as applied (their senders look for their id).
RESIZED_KEPT = 16


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
        self.repeats = Repeats(log)  # a line that would repeat: once, then with a count
        self.pacer = SpawnPacer(burst=max(4.0, float(config.workers)))
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
        #: a reload being checked: (the checking child's pid, the new config, its report fd)
        self.reload_check: tuple[int, Config, int] | None = None
        self.next_memory = 0.0
        self.started = time.time()
        self.id = ""
        self.pid = os.getpid()
        self.rng = random.Random()
        self.host = host_name(config)
        self.slots = SlotTable(max(64, 8 * config.workers))
        self.duties: Duties | None = None
        #: what the metrics read (jobq.metrics): the workers as the last tick saw them, the
        #: restarts by cause and the reloads by result, and with metrics on the workers'
        #: per-task tallies
        self.seen_now: list[Seen] = []
        self.restarts = dict.fromkeys(policy.RESTART_CAUSES, 0)
        self.reloads = {"applied": 0, "refused": 0}
        self.totals = (Totals(TallyTable(self.slots.capacity)) if config.metrics_port
                       else None)
        self._metrics: Any = None  # the HTTP server of the metrics, when on
        self._wakeup_r = self._wakeup_w = -1
        #: signals read before the loop ran (while waiting for the server), for it to act on
        self._early_signals = b""
        #: the latest control requests applied, as the heartbeat shows them (a tuple: the
        #: duties thread reads it while the loop may replace it)
        self.resized: tuple[dict[str, Any], ...] = ()
        self._pidfile: Any = None

    @property
    def limits(self) -> Limits:
        return Limits.from_config(self.config)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        """Run until stopped; returns the exit code (see :mod:`jobq.exitcodes`)."""
        if self.options.pidfile:
            try:
                self._pidfile = acquire(self.options.pidfile)
            except PidfileError as exc:
                self._fatal(str(exc))
                return exitcodes.PIDFILE
        try:
            self.id = f"{self.host}.{os.getpid()}"
            self.pid = os.getpid()
            self._install_signals()
            problem = self._import_problem()
            if problem:  # one line, and nothing was started: no server, no worker
                self._fatal(problem)
                return exitcodes.IMPORT
            self.url = resolve_url(self.config)
            if self.config.metrics_port and not self._serve_metrics():
                return exitcodes.USAGE
            self._title()
            if not self._wait_for_server():
                return self.exit_code
            self.duties = Duties(self.config, self.url, self.id, describe=self._describe,
                                 wake=self._wake_from_duties, embedded=self.embedded)
            self.duties.start()
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

    def _serve_metrics(self) -> bool:
        """Listen for scrapes (metrics_port): before anything is forked, so that a port
        taken or the extra missing stops the master at once (exit 2)."""
        try:
            self._metrics = metrics.load_exporter().serve_master(self, self.config, self.url)
        except metrics.MetricsError as exc:
            self._fatal(str(exc))
            return False
        log.info("metrics on http://%s:%d/metrics", self.config.metrics_host,
                 self._metrics.port)
        return True

    def _wait_for_server(self) -> bool:
        """Before anything is forked: the server must answer, as one jobq can use. A lasting
        problem (not a Redis server, refused credentials, too old) stops the master (exit 3);
        while nothing answers, it tries again with back-off, saying why once a minute, and
        stops at once on TERM, INT or QUIT. False when it is to stop."""
        delay, said, tries = SERVER_WAIT_FIRST, -SERVER_WAIT_SAY_EVERY, 0
        while True:
            try:
                check_server(self.url, timeout=0)
            except ServerProblem as exc:
                if exc.lasting:
                    self._fatal(str(exc))
                    self.exit_code = exitcodes.CONNECT
                    return False
                tries += 1
                if time.monotonic() - said >= SERVER_WAIT_SAY_EVERY:
                    said = time.monotonic()
                    log.warning("waiting for the server: %s (tried %d time(s); nothing starts "
                                "until it answers)", exc, tries)
            else:
                if tries:
                    log.info("the server answers after %d tries", tries)
                return True
            readable, _, _ = select.select([self._wakeup_r], [], [], delay)
            if readable:
                try:
                    signals = os.read(self._wakeup_r, 512)
                except BlockingIOError:
                    signals = b""
                if {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT} & set(signals):
                    log.info("stopping: told to while waiting for the server")
                    return False
                self._early_signals += signals  # TTIN, HUP, ...: the loop acts on each
            delay = min(delay * 2, SERVER_WAIT_CAP)

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
            self._read_memory(now)
        for action in policy.check_workers(now, list(self.workers.values()), self.limits):
            if isinstance(action, Kill):
                self._kill(action.pid, action.cause, action.kind)
            elif isinstance(action, Retire):
                log.warning("recycling worker %d: %s", action.pid, action.reason)
                self._retire(action.pid, now, action.kind)
        self._interrupt_cancelled()
        self._apply_controls()
        self.seen_now = self._seen()
        if self.duties is not None:
            self.duties.seen(self.seen_now)
        if self.reload_started is not None and (
                self._all_ready() or now - self.reload_started > RELOAD_READY_WAIT):
            for pid in self.to_retire:
                self._retire(pid, now, "reload")
            self.to_retire = []
            self.reload_started = None
            notify("READY=1")
        if self.stopping == "graceful" and now > self.stop_deadline:
            for pid, w in list(self.workers.items()):
                if not w.killing:
                    self._kill(pid, "still running at graceful_timeout when stopping; "
                                    "re-queued", "stopping")
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
        """Act on every signal received, one by one (the wakeup fd carries a byte per signal
        delivered; the kernel merges a signal sent again while it is still pending, see
        the README)."""
        data, self._early_signals = self._early_signals, b""
        try:
            data += os.read(self._wakeup_r, 512)
        except BlockingIOError:
            pass
        for signum in data:
            if signum in (signal.SIGCHLD, _DUTIES_WAKE):
                continue  # _reap and _interrupt_cancelled run on every pass
            handler = getattr(self, f"handle_{signal.Signals(signum).name[3:].lower()}", None)
            if handler:
                handler()

    def handle_hup(self) -> None:
        """Reload, checked first: the new config is loaded and its schedules checked here,
        the task modules imported in a short-lived child (new code can fail at import); only
        then are the workers replaced. A reload that would break the pool is refused and the
        running workers and config stay."""
        if self.stopping:
            return
        # the log file is reopened at once (logrotate may send HUP), whatever becomes of the
        # reload: the new workers inherit it, the scheduler reopens its own on HUP
        jobq_log.reopen()
        if self.reload_check is not None:
            log.info("HUP: a reload is being checked already")
            return
        notify("RELOADING=1")
        try:
            config = load_config(self.options.config_path, **(self.options.overrides or {}))
            config_schedules(config)
            namespace = config.namespace()
        except (ConfigError, ScheduleError) as exc:
            self._refuse_reload(str(exc))
            return
        if not config.imports and not self.options.allow_main:
            self._refuse_reload(NO_TASK_MODULE)
            return
        fixed = [k for k in FIXED_AT_START if getattr(config, k) != getattr(self.config, k)]
        if namespace != self.config.namespace() and "prefix" not in fixed:
            fixed.append("the queue group (Cluster)")
        if fixed:
            self._refuse_reload(f"{', '.join(fixed)} changed: that takes a restart, not a "
                                f"reload")
            return
        read, write = os.pipe()
        pid = self._fork(lambda: self._check_child(config, write))
        os.close(write)
        self.reload_check = (pid, config, read)

    def _import_problem(self) -> str | None:
        """Before anything starts, import the task modules in a short-lived child, as a
        reload is checked (the master itself never imports them: its workers must import
        new code after a reload). Returns why a module cannot be imported, or None. A child
        that dies otherwise (a module that kills its process) is left to the workers' crash
        policy, which stops the master (exit 7) if they all die so."""
        if not self.config.imports:
            return None
        read, write = os.pipe()
        pid = self._fork(lambda: self._check_child(self.config, write))
        os.close(write)
        with os.fdopen(read, "rb") as report:
            said = report.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) == exitcodes.IMPORT and said:
            return said
        return None

    def _check_child(self, config: Config, report: int) -> int:
        """In the child that checks the task modules (at start, and before a reload): import
        them as a worker would."""
        set_title("jobq-master: checking the task modules")
        try:
            TaskResolver(config.imports, allow_main=self.options.allow_main)
        except TaskImportError as exc:
            os.write(report, str(exc).encode(errors="replace")[:2000])
            return exitcodes.IMPORT
        return exitcodes.OK

    def _reload_checked(self, status: int) -> None:
        """The reload's check ended: reload, or refuse with what the check said."""
        assert self.reload_check is not None
        _, config, read = self.reload_check
        self.reload_check = None
        with os.fdopen(read, "rb") as report:
            said = report.read().decode(errors="replace")
        if os.waitstatus_to_exitcode(status) != exitcodes.OK:
            self._refuse_reload(said or f"checking it, a child {policy.describe_exit(status)[0]}")
        elif not self.stopping:
            self._reload(config)

    def _refuse_reload(self, why: str) -> None:
        self.reloads["refused"] += 1
        message = " ".join(f"reload refused, the running workers and config stay: {why}".split())
        log.error("%s", message)
        notify("READY=1")
        notify(f"STATUS={message}")

    def _reload(self, config: Config) -> None:
        log.info("reloading: config re-read, replacing %d worker(s)", len(self.workers))
        self.reloads["applied"] += 1
        self.config = config
        if self.duties is not None:
            self.duties.reconfigure(config)
        self.target = config.workers
        self.generation += 1
        self.to_retire += [pid for pid, w in self.workers.items() if w.retiring_since is None]
        self.spawn_at = {}
        self.reload_started = time.time()
        self._manage_workers(time.time())
        if self.scheduler_pid:
            send_signal(self.scheduler_pid, signal.SIGHUP)
        self._title()

    def handle_term(self) -> None:
        self._stop("graceful")

    def handle_int(self) -> None:
        self.int_count += 1
        self._stop("graceful" if self.int_count == 1 else "quit")

    def handle_quit(self) -> None:
        self._stop("quit")

    def handle_ttin(self) -> None:
        self._resize("add", 1, "TTIN")

    def handle_ttou(self) -> None:
        self._resize("remove", 1, "TTOU")

    def _resize(self, op: str, n: int, why: str) -> tuple[int, int, str]:
        """Change the number of workers (TTIN, TTOU, ``jobq workers``): (before, after, a
        note when the number asked for could not be had). Nothing changes while stopping."""
        was = self.target
        if self.stopping:
            return was, was, "stopping"
        self.target, note = policy.resize(was, op, n, self.slots.capacity)
        if self.target != was:
            log.info("%s: now %d worker(s), was %d", why, self.target, was)
            self._manage_workers(time.time())
            self._title()
        return was, self.target, note

    def _apply_controls(self) -> None:
        """Apply the control requests the duties thread took (``jobq workers``), in order;
        the next heartbeat, at once, says what each did."""
        if self.duties is None or self.duties.controls.empty():
            return
        while not self.duties.controls.empty():
            request = self.duties.controls.get()
            was, target, note = self._resize(request.op, request.n,
                                             f"jobq workers {request.op} {request.n}")
            done = {"id": request.id, "target": target, "was": was, "note": note}
            self.resized = (*self.resized[-(RESIZED_KEPT - 1):], done)
        self.duties.beat_now()

    def handle_usr1(self) -> None:
        """Reopen the log files (logrotate moved them): here, in the workers and in the
        scheduler, which all write to them."""
        jobq_log.reopen()
        for pid in [*self.workers, self.scheduler_pid]:
            if pid:
                send_signal(pid, signal.SIGUSR1)

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
                self._retire(pid, now, "stopping")
        else:
            log.info("stopping now: running jobs are re-queued")
            for pid in list(self.workers):
                self._kill(pid, "master stopped at once (QUIT); re-queued", "stopping")
        if self.scheduler_pid:
            send_signal(self.scheduler_pid,
                        signal.SIGTERM if how == "graceful" else signal.SIGKILL)

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
                self._retire(victim.pid, now, "scaled_down")
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
                at = self.pacer.next_spawn(now)
                if at > now:  # forking too fast: this one waits its turn
                    self.spawn_at[slot] = at
                    continue
                del self.spawn_at[slot]
                self._spawn_worker(slot, now)

    def _spawn_worker(self, slot: int, now: float) -> None:
        name = f"{self.host}.{os.getpid()}.{slot}.{os.urandom(3).hex()}"
        max_jobs = policy.max_jobs_for(self.config.max_jobs_per_worker,
                                       self.config.max_jobs_jitter, self.rng)
        self.slots.clear(slot)
        pid = self._fork(lambda: self._worker_child(slot, name, max_jobs), PARENT_DIED)
        self.workers[pid] = WorkerState(slot=slot, pid=pid, name=name, born=now,
                                        generation=self.generation, heartbeat=now)
        log.debug("spawned worker %d in slot %d (%s)", pid, slot, name)

    def _fork(self, child: Callable[[], int], death_signal: int = signal.SIGTERM) -> int:
        """Fork ``child`` (its return value is the exit code). It is sent ``death_signal``
        when the master dies (workers: :data:`process.PARENT_DIED`)."""
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
                # a log reopen is no reason to die (USR1's default) before the child has
                # installed its own handler
                signal.signal(signal.SIGUSR1, signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
                os.setpgid(0, 0)  # its own group: killing it kills its children too
                die_with_parent(death_signal)
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
        tally = self.totals.table.writer(slot_index) if self.totals is not None else None
        worker = Worker(self._worker_queues(), config=self.config, url=self.url,
                        resolver=resolver, name=name, slot=slot, renew_leases=False,
                        max_jobs=max_jobs, master_pid=self.pid, title=f"{slot_index}",
                        announcer=self.id, generation=self.generation, tally=tally)
        return worker.run()

    def _worker_queues(self) -> list[str]:
        """What the workers claim from: the config's queues; for a script's pool, first the
        routes of its own ``__main__`` jobs, which no other pool can run (wire.route)."""
        queues = list(self.config.queues)
        if self.options.allow_main and self.options.owner:
            queues = [route(q, self.options.owner) for q in queues] + queues
        return queues

    def _read_slots(self, now: float) -> None:
        for w in self.workers.values():
            view = self.slots.read(w.slot)
            if view.pid != w.pid:
                continue  # not yet booted
            if not w.ready and view.state in (IDLE, BUSY):
                w.ready, w.ready_since = True, now
            w.busy = view.state == BUSY
            w.job_id = view.job_id
            w.job_started = view.job_started
            w.deadline = view.deadline
            w.heartbeat = view.heartbeat
            w.jobs_done = view.jobs_done
            if w.ready and w.slot in self.histories:
                self.histories[w.slot].seen_up(now, w.ready_since)

    def _read_memory(self, now: float) -> None:
        """Each worker's memory, as its limits need it (see :func:`worker_memory`)."""
        set_limits = [mb for mb in (self.limits.memory_soft_mb, self.limits.memory_hard_mb) if mb]
        bound = min(set_limits) if set_limits else None
        for w in self.workers.values():
            try:
                w.memory_mb, w.memory_read_at = worker_memory(
                    w.pid, w.memory_mb, w.memory_read_at, now, bound)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass

    def _all_ready(self) -> bool:
        current = [w for w in self.workers.values() if w.generation == self.generation]
        return len(current) >= self.target and all(w.ready for w in current)

    def _retire(self, pid: int, now: float, why: str) -> None:
        """Ask a worker to stop after its current job (``why``: one of policy.ENDINGS)."""
        w = self.workers.get(pid)
        if w is None or w.retiring_since is not None:
            return
        w.retiring_since = now
        w.ending = why
        send_signal(pid, signal.SIGTERM)

    def _kill(self, pid: int, cause: str, why: str) -> None:
        """Kill a worker now (``why``: one of policy.ENDINGS); its job is given back with
        ``cause``."""
        w = self.workers.get(pid)
        if w is None or w.killing:
            return
        w.killing = cause
        w.ending = why
        if not self.stopping:
            log.warning("killing worker %d (slot %d): %s", pid, w.slot, cause)
        kill_group(pid)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.reload_check is not None and pid == self.reload_check[0]:
                self._reload_checked(status)
                continue
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
        kill_group(w.pid)  # whatever it forked goes with it
        history = self.histories.setdefault(w.slot, SlotHistory())
        decision = policy.on_exit(now, w, status, history, self.breaker,
                                  stopping=self.stopping is not None, boot_error=view.message)
        current = "-"  # none, or we stopped it: give its job back untouched
        if not self.stopping and view.pid == w.pid and view.state == BUSY and view.job_id:
            current = view.job_id
        acks = [e for e in map(AckEntry.from_fields, self.slots.unsent_acks(w.slot))
                if e is not None]
        if self.duties is not None:  # it sends the acks, then gives back the jobs
            self.duties.worker_gone(w.name, current, decision.cause, acks,
                                    self._worker_queues())
        self.slots.clear(w.slot)
        if self.totals is not None:  # its counts stay in the totals, its slot is emptied
            self.totals.worker_gone(w.slot)
        cause = policy.restart_cause(w, status)
        if cause and not self.stopping:
            self.restarts[cause] += 1
        if decision.unexpected and not self.stopping:
            self.repeats.say(decision.kind, "worker %d (slot %d) %s%s", w.pid, w.slot,
                             decision.cause,
                             f"; its job {current} was given back" if current != "-" else "")
        if decision.stop_master:
            code, reason = decision.stop_master
            self._fatal(reason)
            self.exit_code = code
            self._stop("quit")
            return
        if decision.respawn_at is not None:
            history.not_before = max(history.not_before, decision.respawn_at)
        self._manage_workers(now)

    def _interrupt_cancelled(self) -> None:
        """Signal the workers whose running job was cancelled (USR2: JobCancelled); the
        duties thread finds them."""
        if self.duties is None:
            return
        while not self.duties.interrupts.empty():
            pid, slot, job, reason = self.duties.interrupts.get()
            w = self.workers.get(pid)
            if w is None or w.job_id != job:
                continue  # it finished that job, or died, meanwhile
            log.info("interrupting job %s in worker %d: %s", job, pid, reason)
            self.slots.set_cancel(slot, job)  # the worker checks it is still that job
            send_signal(pid, signal.SIGUSR2)

    def _wake_from_duties(self) -> None:
        """Called from the duties thread: wake the loop (a byte no signal uses)."""
        try:
            os.write(self._wakeup_w, bytes([_DUTIES_WAKE]))
        except (BlockingIOError, OSError):
            pass  # the pipe is full: the loop is awake already

    def _seen(self) -> list[Seen]:
        return [Seen(w.pid, w.slot, w.name, w.busy, w.job_id, w.job_started, w.memory_mb,
                     w.jobs_done) for w in self.workers.values()]

    def _describe(self, workers: list[Seen], now: float) -> dict[str, Any]:
        """This master and what each worker does, for ``jobq info`` and the scheduler (which
        drops the schedules of a pool that is gone); written by the duties thread."""
        return {"host": self.host, "pid": self.pid, "started": self.started, "ts": now,
                "lease_time": self.config.lease_time,
                "queues": self.config.queues, "target": self.target,
                "generation": self.generation, "owner": self.options.owner,
                "scheduler_pid": self.scheduler_pid, "resized": list(self.resized),
                "workers": [{"slot": w.slot, "pid": w.pid, "name": w.name, "job": w.job_id,
                             "since": w.job_started if w.busy else None,
                             "memory_mb": round(w.memory_mb, 1) if w.memory_mb else None,
                             "jobs_done": w.jobs_done, "state": "busy" if w.busy else "idle"}
                            for w in sorted(workers, key=lambda w: w.slot)]}

    # -- the scheduler -------------------------------------------------------------------------
    def _spawn_scheduler(self) -> None:
        self.scheduler_pid = self._fork(
            lambda: scheduler_main(self.config, self.url, self.options))
        log.debug("spawned scheduler %d", self.scheduler_pid)

    def _fatal(self, message: str) -> None:
        """Why the master stops: one line on stderr (``jobq-master: error: ...``), and in the
        log file if there is one (logging to stderr would say it twice)."""
        if self.config.log_file:
            log.error("stopping: %s", message)
        print(f"jobq-master: error: {message}", file=sys.stderr, flush=True)

    # -- odds and ends ----------------------------------------------------------------------
    def _title(self) -> None:
        set_title(f"jobq-master [{','.join(self.config.queues)}] workers={self.target}"
                  f" gen={self.generation}")

    def _cleanup(self) -> None:
        for pid in list(self.workers):
            kill_group(pid)
        if self.reload_check is not None:
            kill_group(self.reload_check[0])
        if self.scheduler_pid:
            send_signal(self.scheduler_pid, signal.SIGKILL)
        if self.duties is not None:  # gives back what dead workers held, forgets this master
            self.duties.stop(DUTIES_DRAIN)
        if self._wakeup_w >= 0:
            signal.set_wakeup_fd(-1)
            os.close(self._wakeup_r)
            os.close(self._wakeup_w)
        if self._metrics is not None:
            self._metrics.close()
        if self._pidfile is not None:
            release(self._pidfile)


def _noop(signum: int, frame: Any) -> None:
    """Signal handler of the master: the wakeup fd already carries the signal."""
