"""The master's decisions, as pure functions of ``now`` and what it knows: no processes,
no Redis, no clock of its own. The master (:mod:`jobq.master.arbiter`) carries them out;
tests drive them with a fake clock.
"""

from __future__ import annotations

import os
import random
import signal
from dataclasses import dataclass, field

from .. import exitcodes
from ..config import Config

#: A crash: a worker that dies before it reports ready (by a signal too), or exits with an
#: error code after it was up (the worker process itself failed). Restarts of its slot back
#: off from BOOT_BACKOFF_FIRST doubling to BOOT_BACKOFF_CAP, reset once a worker of that slot
#: stayed up STABLE_AFTER seconds.
BOOT_BACKOFF_FIRST = 0.05
BOOT_BACKOFF_CAP = 10.0
STABLE_AFTER = 5.0
#: The crash-rate breaker: this many crashes within BREAKER_WINDOW seconds stop the master
#: (something is broken, not unlucky).
BREAKER_COUNT = 10
BREAKER_WINDOW = 60.0
#: Whatever happens, the master forks at most SPAWN_RATE workers a second (beyond a burst of
#: its pool's size, to fill it at start and on a reload).
SPAWN_RATE = 4.0


@dataclass(frozen=True)
class Limits:
    """The master's knobs (from the config)."""

    hard_timeout_grace: float = 0.5
    heartbeat_timeout: float = 60.0
    memory_soft_mb: float = 0.0
    memory_hard_mb: float = 0.0
    graceful_timeout: float = 30.0

    @classmethod
    def from_config(cls, c: Config) -> Limits:
        return cls(hard_timeout_grace=c.hard_timeout_grace,
                   heartbeat_timeout=c.heartbeat_timeout,
                   memory_soft_mb=c.memory_soft_limit_mb,
                   memory_hard_mb=c.memory_hard_limit_mb,
                   graceful_timeout=c.graceful_timeout)


@dataclass
class WorkerState:
    """What the master knows of one live worker (from the fork, its slot and psutil)."""

    slot: int
    pid: int
    name: str
    born: float
    generation: int = 0
    ready: bool = False
    busy: bool = False
    job_id: str | None = None
    job_started: float = 0.0
    deadline: float = 0.0
    heartbeat: float = 0.0
    memory_mb: float | None = None
    memory_read_at: float = 0.0  # when memory_mb was last read as its USS
    jobs_done: int = 0
    retiring_since: float | None = None  # asked to stop after its current job
    ready_since: float | None = None  # when the master first saw it ready
    killing: str | None = None  # why we killed it, once we did
    ending: str = ""  # why the master ended it (retired or killed): one of ENDINGS


#: Why a worker exits, as metrics count its restarts (``jobq_worker_restarts_total{cause}``):
#: the master ended it (killed at a limit, retired, recycled), or it ended on its own.
KILL_CAUSES = ("hard_timeout", "memory_hard_limit", "heartbeat", "stop_timeout")
RETIRE_CAUSES = ("memory_soft_limit", "reload")
OWN_CAUSES = ("max_jobs", "killed", "crashed")
RESTART_CAUSES = KILL_CAUSES + RETIRE_CAUSES + OWN_CAUSES
#: Endings after which no worker takes the slot's place: not restarts.
NOT_RESTARTS = ("scaled_down", "stopping")
ENDINGS = KILL_CAUSES + RETIRE_CAUSES + NOT_RESTARTS


@dataclass(frozen=True)
class Kill:
    """Kill the worker's whole process group now; its job is resolved with ``cause``."""

    pid: int
    cause: str
    kind: str = ""  # one of KILL_CAUSES


@dataclass(frozen=True)
class Retire:
    """Ask the worker to stop after its current job (SIGTERM); a new one takes its slot."""

    pid: int
    reason: str
    kind: str = ""  # one of RETIRE_CAUSES


Action = Kill | Retire


def check_workers(now: float, workers: list[WorkerState], limits: Limits) -> list[Action]:
    """What to do about live workers: the ones past their hard limit (time, memory), hung,
    or bloated."""
    actions: list[Action] = []
    for w in workers:
        if w.killing:
            continue
        if w.busy and w.deadline and now > w.deadline + limits.hard_timeout_grace:
            actions.append(Kill(w.pid, (
                f"hard time limit: job {w.job_id} ran {now - w.job_started:.1f} s, past its "
                f"timeout plus {limits.hard_timeout_grace:g} s grace, and did not stop on "
                "SIGALRM; its worker was killed"), "hard_timeout"))
        elif limits.memory_hard_mb and w.memory_mb and w.memory_mb > limits.memory_hard_mb:
            actions.append(Kill(w.pid, (
                f"memory hard limit: worker used {w.memory_mb:.0f} MB, over "
                f"{limits.memory_hard_mb:g} MB; it was killed"), "memory_hard_limit"))
        elif (w.ready and not w.busy and w.heartbeat
              and now - w.heartbeat > limits.heartbeat_timeout):
            actions.append(Kill(w.pid, (
                f"no heartbeat for {now - w.heartbeat:.0f} s while idle (hung?); killed"),
                "heartbeat"))
        elif (w.retiring_since is not None
              and now - w.retiring_since > limits.graceful_timeout + limits.hard_timeout_grace):
            actions.append(Kill(w.pid, "did not stop within graceful_timeout after SIGTERM",
                                "stop_timeout"))
        elif (w.retiring_since is None and limits.memory_soft_mb and w.memory_mb
              and w.memory_mb > limits.memory_soft_mb):
            actions.append(Retire(w.pid, (
                f"memory soft limit: {w.memory_mb:.0f} MB > {limits.memory_soft_mb:g} MB; "
                "recycled after its current job"), "memory_soft_limit"))
    return actions


def next_check(now: float, workers: list[WorkerState], limits: Limits,
               tick: float = 1.0) -> float:
    """When the master must look again at the latest (a hard deadline may come sooner)."""
    wake = now + tick
    if any(w.busy for w in workers):
        wake = now + min(tick, 0.25)  # cancel requests of running jobs are looked for
    for w in workers:
        if w.busy and w.deadline:
            wake = min(wake, w.deadline + limits.hard_timeout_grace + 0.01)
    return max(wake, now + 0.01)


def describe_exit(status: int) -> tuple[str, int | None, int | None]:
    """(text, exit code, signal) for a waitpid status."""
    if hasattr(status, "__index__") and status >= 0:
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = f"signal {sig}"
            hint = " (out of memory?)" if sig == signal.SIGKILL else ""
            return f"killed by signal {sig} ({name}){hint}", None, sig
        if os.WIFEXITED(status):
            code = os.WEXITSTATUS(status)
            return f"exited with code {code}", code, None
    return f"ended with status {status}", None, None


@dataclass
class SlotHistory:
    """Crashes of one slot in a row, for its restart back-off."""

    failures: int = 0
    not_before: float = 0.0

    def seen_up(self, now: float, ready_since: float | None) -> None:
        """A worker of the slot is up: once it stayed up STABLE_AFTER, the back-off is
        forgotten."""
        if self.failures and ready_since is not None and now - ready_since >= STABLE_AFTER:
            self.failures = 0
            self.not_before = 0.0


@dataclass
class SpawnPacer:
    """At most ``rate`` forks a second beyond a burst of ``burst`` (a token bucket)."""

    rate: float = SPAWN_RATE
    burst: float = 4.0
    tokens: float = -1.0  # full at the first call
    at: float = 0.0

    def next_spawn(self, now: float) -> float:
        """When the next fork may happen (``now`` if at once); takes the token if now."""
        if self.tokens < 0:
            self.tokens, self.at = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return now
        return now + (1 - self.tokens) / self.rate


@dataclass
class CrashBreaker:
    """Trips when too many workers fail at boot within a window (fork-loop protection)."""

    count: int = BREAKER_COUNT
    window: float = BREAKER_WINDOW
    times: list[float] = field(default_factory=list)

    def record(self, now: float) -> bool:
        self.times = [t for t in self.times if now - t < self.window] + [now]
        return len(self.times) >= self.count


@dataclass(frozen=True)
class ExitDecision:
    """What follows a worker's exit."""

    cause: str  # recorded on the job it held, if any
    respawn_at: float | None  # None: do not respawn this slot
    stop_master: tuple[int, str] | None = None  # (exit code, one-line reason)
    unexpected: bool = True
    kind: str = ""  # the cause without its figures (a memory reading): exits said once a kind


def on_exit(now: float, worker: WorkerState, status: int, history: SlotHistory,
            breaker: CrashBreaker, *, stopping: bool, boot_error: str = "") -> ExitDecision:
    """Decide what a worker's exit means: restart at once, back off, or stop the master."""
    text, code, sig = describe_exit(status)
    kind = cause = worker.killing or f"worker {text}"
    if worker.memory_mb and not worker.killing:
        cause += f"; last memory reading {worker.memory_mb:.0f} MB"
    if stopping:
        return ExitDecision(cause, None, unexpected=False, kind=kind)
    planned = worker.retiring_since is not None or (code == 0 and sig is None)
    if code == exitcodes.IMPORT and not worker.ready:  # only a booting worker imports
        reason = boot_error or "a worker could not import its task modules"
        return ExitDecision(cause, None, (exitcodes.IMPORT, reason), kind=kind)
    # A crash: it died booting, or the worker process itself failed after it was up. A
    # worker that was up and was killed (by us: hard limit, memory; or from outside: the OOM
    # killer, an operator) is replaced at once: a kill storm must not stop the master, and the
    # spawn pacer caps the forks anyway.
    crashed = not planned and (not worker.ready or (sig is None and not worker.killing))
    if not crashed:
        return ExitDecision(cause, now, unexpected=not planned, kind=kind)
    history.failures += 1
    delay = min(BOOT_BACKOFF_CAP, BOOT_BACKOFF_FIRST * 2 ** (history.failures - 1))
    history.not_before = now + delay
    if breaker.record(now):
        when = "at boot" if not worker.ready else "right after they start"
        reason = (f"workers keep crashing {when} ({breaker.count} within "
                  f"{breaker.window:g} s); last one {text}"
                  + (f": {boot_error}" if boot_error else ""))
        return ExitDecision(cause, None, (exitcodes.WORKER_BOOT, reason), kind=kind)
    return ExitDecision(cause, history.not_before, kind=kind)


def restart_cause(worker: WorkerState, status: int) -> str | None:
    """Why a worker exited, as one of RESTART_CAUSES; None when no worker replaces it (the
    pool shrank, or the master stops)."""
    if worker.ending:
        return None if worker.ending in NOT_RESTARTS else worker.ending
    _, code, sig = describe_exit(status)
    if sig is not None:
        return "killed"  # by someone else: an operator, the OOM killer
    return "max_jobs" if code == 0 else "crashed"


def max_jobs_for(base: int, jitter: float, rng: random.Random) -> int:
    """A worker's job budget: ``base`` spread by ±``jitter`` so workers recycle apart."""
    if base <= 0:
        return 0
    spread = int(base * jitter)
    return max(1, base + rng.randint(-spread, spread))


def resize(target: int, op: str, n: int, capacity: int) -> tuple[int, str]:
    """The number of workers after ``op`` ("add", "remove", "set") ``n``, from ``target``:
    never below one, nor above ``capacity`` (the worker slots made at start); with a note
    saying so when the number asked for could not be had."""
    wanted = {"add": target + n, "remove": target - n, "set": n}[op]
    if wanted < 1:
        return 1, "never fewer than one"
    if wanted > capacity:
        return capacity, f"at most {capacity}: the worker slots this master made at start"
    return wanted, ""
