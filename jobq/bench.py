"""``jobq bench``: measure jobq on this machine, through its public API and a real master.

Each scenario starts a real ``jobq-master`` (``python -m jobq.cli.master``), drives it, and tears
it down. Everything runs in its own key namespace (``jobqbench``), which is deleted at the end:
nothing of the user's data is touched. Figures are medians over ``--repeat`` runs.

Absolute figures do not travel between machines; ratios measured in the same run do. So the
figures that have a reference come with it, measured in every run beside its scenario, and
with their ratio (figure / reference, the median of each run's ratio): throughput against the
bare loop of :mod:`jobq.benchref` (the same task, as many processes, as many jobs), single
enqueue and latency against unpipelined round trips, the CPU scenario against
``multiprocessing.Pool``. Throughput scenarios also give the server's CPU per job
(``server_us_per_job``, from INFO cpu around the timed part: run the bench on a server
nothing else uses).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from . import benchref
from .benchref import burn
from .config import Config
from .connection import connect
from .metrics import load_exporter
from .queue import JobQueue
from .registry import task

#: Key namespace of the bench (never the user's).
PREFIX = "jobqbench"
#: The key the ``incr`` task increments: the task's own data, outside jobq's namespace.
COUNTER_KEY = "jobqbench:counter"
#: A drain that sees no completion for this long fails (seconds).
STALL = 60.0
SCENARIOS = ("noop", "noop_ttl0", "incr", "cpu", "latency", "delayed", "enqueue", "memory",
             "backlog", "tail", "limited", "metrics")
#: The limited scenario's concurrency limit: far above any pool, so it never binds (what is
#: measured is what checking and holding a slot costs).
NEVER_BINDS = 100_000
#: The metrics scenario scrapes the master's /metrics this often while its jobs run (seconds;
#: Prometheus's default is every 15 s).
SCRAPE_EVERY = 1.0
#: The delayed scenario: its jobs are due this far apart (seconds), the first this long after
#: they are all enqueued; the busy pool's jobs last this long each.
DELAYED_SPACING, DELAYED_LEAD, BUSY_JOB = 0.02, 0.5, 0.002

#: A figure that has a reference -> the reference's key, beside it in the scenario's result
#: with ``<figure>_ratio`` (figure / reference).
REFERENCES = {
    "jobs_per_s": "bare_jobs_per_s",  # the bare loop, same task, processes and jobs
    "server_us_per_job": "bare_server_us_per_job",  # the same, on the server's CPU
    "single_per_s": "rtt_per_s",  # unpipelined round trips on one connection
    "p50_ms": "bare_p50_ms",  # the bare hand-off: LPUSH, BLPOP in as many processes
    "p99_ms": "bare_p99_ms",
    "metrics_jobs_per_s": "plain_jobs_per_s",  # the same empty jobs, metrics off
}

_T = TypeVar("_T")
_R = TypeVar("_R")


# -- the bench's tasks (run by the master's workers: -I jobq.bench) -------------------------------
@task(name="jobq.bench:noop")
def noop() -> None:
    return None


@task(name="jobq.bench:limited_noop", concurrency=NEVER_BINDS)
def limited_noop() -> None:
    """An empty job under a limit that never binds."""
    return None


_incr_client: Any = None


@task(name="jobq.bench:incr")
def incr() -> int:
    """One Redis round trip, on the task's own connection."""
    global _incr_client
    if _incr_client is None or _incr_client[0] != os.getpid():
        _incr_client = (os.getpid(), connect(os.environ["JOBQ_BENCH_URL"]))
    return int(_incr_client[1].incr(COUNTER_KEY))


@task(name="jobq.bench:cpu")
def cpu(n: int) -> int:
    return burn(n)


@task(name="jobq.bench:latency")
def latency(sent: float) -> float:
    """Enqueue-to-start delay (seconds): the first thing the job does."""
    return time.time() - sent


@task(name="jobq.bench:spin")
def spin(seconds: float) -> float:
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass
    return seconds


# -- driving a master -----------------------------------------------------------------------------
class Drained(NamedTuple):
    first: float  #: perf_counter() when the first completion was seen
    last: float  #: when the last one was
    server_us_per_job: float  #: the server's CPU per job completed between the two (metered)


class Bench:
    """One bench session on one server."""

    def __init__(self, url: str, workers: int, scale: float = 1.0,
                 log: Callable[[str], None] = lambda s: None) -> None:
        self.url = url
        self.workers = workers
        self.scale = scale
        self.log = log
        self.dir = Path(tempfile.mkdtemp(prefix="jobq-bench-"))
        self.config_path = self.dir / "bench.toml"
        self.config_path.write_text(f'prefix = "{PREFIX}"\nresult_ttl = 300\n'
                                    'heartbeat_timeout = 600\n')
        self.config = Config(redis_url=url, prefix=PREFIX)
        self.queue = JobQueue("bench", redis_url=url, config=self.config)
        self.redis = self.queue.redis
        self.broker = self.queue.broker
        #: which of the --repeat runs this is (0, 1, ...): see :meth:`_interleave`
        self.run_index = 0
        # the masters report ready here as they would to systemd (READY=1, see
        # jobq.master.notify): every worker up and idle
        self.notify_path = self.dir / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))

    def cleanup(self) -> None:
        """Delete everything in the bench's namespace."""
        self.broker.delete_namespace()
        self.redis.delete(COUNTER_KEY, *benchref.KEYS)

    def close(self) -> None:
        """Remove the session's files (its masters are stopped)."""
        self.notify.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    master: subprocess.Popen[bytes] | None = None

    def start_master(self, *args: str) -> subprocess.Popen[bytes]:
        """A master on the bench queue (``args``: more of its options)."""
        self._drain_notifications()  # what an earlier master said is not this one's
        env = {**os.environ, "JOBQ_REDIS_URL": self.url, "JOBQ_BENCH_URL": self.url,
               "NOTIFY_SOCKET": str(self.notify_path)}
        cmd = [sys.executable, "-m", "jobq.cli.master", "--workers", str(self.workers), "-q",
               "bench", "-I", "jobq.bench", "--config", str(self.config_path),
               "--log-level", "error", *args]
        # A process group of its own (a terminal's Ctrl-C reaches the bench, which stops it),
        # but the bench's session: a new session is a new autogroup for Linux's scheduler,
        # which shares the cores between autogroups before it shares them between processes,
        # and the references (the bare loop, Pool) run in the bench's. In a session of its
        # own, jobq ran `incr` at 0.88 of its rate in the bench's (3 runs each, alternated).
        self.master = subprocess.Popen(cmd, env=env, process_group=0)
        return self.master

    def wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        """Wait until the master reports ready (READY=1): every worker up and idle."""
        deadline = time.monotonic() + STALL
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bench: the master exited with code {proc.returncode} "
                                   "before it was ready")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"bench: the master was not ready after {STALL} s")
            self.notify.settimeout(min(left, 0.1))
            try:
                if b"READY=1" in self.notify.recv(4096).split(b"\n"):
                    return
            except TimeoutError:
                pass

    def _drain_notifications(self) -> None:
        self.notify.setblocking(False)
        try:
            while True:
                self.notify.recv(4096)
        except BlockingIOError:
            pass

    def stop_master(self, proc: subprocess.Popen[bytes]) -> None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()

    def completed(self) -> int:
        return self.queue.broker.counter("bench", "completed")

    def drain(self, n: int, before: int = 0, poll: float = 0.002, *,
              meter: bool = False, each: Callable[[], None] | None = None) -> Drained:
        """Wait for ``n`` more completions; return the time of the first and of the last, and
        with ``meter`` the server's CPU per job between the two. ``each`` is called at every
        look at the counter. Fails if the master died, or if nothing completes for STALL
        seconds."""
        first = None
        cpu_first, done_first = 0.0, 0
        last_progress, last_done = time.perf_counter(), -1
        while True:
            if each is not None:
                each()
            done = self.completed() - before
            now = time.perf_counter()
            if done > 0 and first is None:
                first = now
                if meter:  # read right after the counter: the two windows match
                    cpu_first, done_first = self.broker.server_cpu(), done
            if done >= n:
                us = 0.0
                if meter and done > done_first:
                    us = (self.broker.server_cpu() - cpu_first) * 1e6 / (done - done_first)
                return Drained(first or now, now, us)
            if done != last_done:
                last_progress, last_done = now, done
            elif now - last_progress > STALL:
                raise RuntimeError(f"bench: no job completed for {STALL} s ({done} of {n})")
            if self.master is not None and self.master.poll() is not None:
                raise RuntimeError(f"bench: the master exited with code "
                                   f"{self.master.returncode} ({done} of {n} jobs done)")
            time.sleep(poll)

    def _interleave(self, reference: Callable[[], _R], measure: Callable[[], _T]) -> tuple[
            _T, _R]:
        """Measure a scenario and its reference one after the other: the reference first in
        even runs, last in odd ones, so that a drift of the machine's speed over the
        --repeat runs weighs on both."""
        if self.run_index % 2 == 0:
            ref = reference()
            return measure(), ref
        got = measure()
        return got, reference()

    # -- scenarios --------------------------------------------------------------------------
    def throughput(self, fn: Any, n: int, *, master_args: tuple[str, ...] = (),
                   **options: Any) -> dict[str, float]:
        """Pre-enqueue n jobs, start the master, time the drain by jobq's own counters.

        The server's CPU is read at the first completion seen and at the last, as the time
        is: the master's start (forks, imports, announcements) stays out of both windows,
        the steady work of its scheduler and duties thread is in them (and this process's
        look at the counter every 2 ms, a few hundredths of a microsecond per job)."""
        self.cleanup()
        self.queue.enqueue_many(fn, [()] * n, **options)
        started = time.perf_counter()
        master = self.start_master(*master_args)
        try:
            first, last, server_us = self.drain(n, meter=True)
        finally:
            self.stop_master(master)
        rate = (n - 1) / (last - first) if last > first else float("inf")
        return {"jobs_per_s": round(rate), "server_us_per_job": round(server_us, 2),
                "startup_s": round(first - started, 3), "jobs": n}

    def bare(self, n: int, task: str, acks: str = "batch", *, real: bool = False,
             keep: bool = True) -> benchref.BareRun:
        """The bare loop (:mod:`jobq.benchref`) on ``n`` jobs with as many processes;
        ``real``: the least real queue, its results kept with ``keep`` (deleted after)."""
        self.cleanup()
        try:
            return benchref.bare_loop(self.url, self.redis, self.broker.server_cpu, jobs=n,
                                      workers=self.workers, task=task, acks=acks, real=real,
                                      keep=keep)
        finally:
            if real:
                benchref.clear(self.redis)

    def _versus_bare(self, fn: Any, n: int, task: str, **options: Any) -> dict[str, float]:
        """jobq's throughput with task ``fn`` and the bare loop's with the same work, its
        acknowledgements batched (the reference) and one per job (``ackeach_*``); and the
        least real queue's (``floor_*``), which keeps results as jobq does here. Each with
        jobq's ratios to it (``*_vs_ackeach``, ``*_vs_floor``)."""
        keep = options.get("result_ttl") != 0
        result, (bare, each, floor) = self._interleave(
            lambda: (self.bare(n, task), self.bare(n, task, "each"),
                     self.bare(n, task, real=True, keep=keep)),
            lambda: self.throughput(fn, n, **options))
        result["bare_jobs_per_s"] = round(bare.jobs_per_s)
        result["bare_server_us_per_job"] = round(bare.server_us_per_job, 2)
        for name, run in (("ackeach", each), ("floor", floor)):
            result[f"{name}_jobs_per_s"] = round(run.jobs_per_s)
            result[f"{name}_server_us_per_job"] = round(run.server_us_per_job, 2)
            for figure in ("jobs_per_s", "server_us_per_job"):
                if result[f"{name}_{figure}"]:
                    result[f"{figure}_vs_{name}"] = round(
                        result[figure] / result[f"{name}_{figure}"], 3)
        return with_ratios(result, "jobs_per_s", "server_us_per_job")

    def noop(self) -> dict[str, float]:
        """Empty jobs, their results kept (result_ttl 300)."""
        return self._versus_bare(noop, int(200_000 * self.scale), "empty")

    def noop_ttl0(self) -> dict[str, float]:
        """Empty jobs, no result kept (result_ttl 0)."""
        return self._versus_bare(noop, int(200_000 * self.scale), "empty", result_ttl=0)

    def limited(self) -> dict[str, float]:
        """Empty jobs of a task with a concurrency limit that never binds against the same
        unlimited, in the same run (interleaved): what a limit costs (jobq.limits)."""
        n = int(100_000 * self.scale)
        limited, plain = self._interleave(lambda: self.throughput(noop, n),
                                          lambda: self.throughput(limited_noop, n))
        return {"jobs_per_s": limited["jobs_per_s"],
                "unlimited_jobs_per_s": plain["jobs_per_s"],
                "ratio": round(limited["jobs_per_s"] / max(plain["jobs_per_s"], 1), 3),
                "server_us_per_job": limited["server_us_per_job"],
                "unlimited_server_us_per_job": plain["server_us_per_job"]}

    def incr(self) -> dict[str, float]:
        return self._versus_bare(incr, int(100_000 * self.scale), "incr")

    def cpu(self) -> dict[str, float]:
        """CPU-bound jobs through jobq, through multiprocessing.Pool, and through the bare
        loop one job at a time (:mod:`jobq.benchref`: a round trip to the server between
        two jobs, as jobq's), on the same work.

        The machines this runs on change speed while it runs (shared hosts), so the three are
        interleaved in rounds, pool-bare-jobq-jobq-bare-pool, and each side's time is summed
        over its rounds: a drift of speed then weighs the same on every side. Nothing of
        another side runs during a round (the master is started before and stopped after
        each)."""
        n_jobs = max(self.workers * 4, int(400 * min(self.scale, 1.0)))
        per_round = max(self.workers * 2, n_jobs // 4)
        size = self._calibrate(0.035)
        pool_s = bare_s = jobq_s = server_s = 0.0
        for side in ("pool", "bare", "jobq", "jobq", "bare", "pool"):
            if side == "pool":
                with multiprocessing.get_context("fork").Pool(self.workers) as pool:
                    pool.map(burn, [1000] * self.workers)  # started and warm
                    t0 = time.perf_counter()
                    pool.map(burn, [size] * per_round, chunksize=1)
                    pool_s += time.perf_counter() - t0
                continue
            if side == "bare":
                self.cleanup()
                bare = benchref.bare_loop(self.url, self.redis, self.broker.server_cpu,
                                          jobs=per_round, workers=self.workers, task="cpu",
                                          batch=1, size=size)
                bare_s += per_round / bare.jobs_per_s
                continue
            self.cleanup()
            master = self.start_master()
            try:
                self.queue.enqueue(noop).result(timeout=60)  # its workers are up
                before = self.completed()
                cpu_before = self.broker.server_cpu()
                t0 = time.time()
                jobs = self.queue.enqueue_many(cpu, [(size,)] * per_round)
                # look rarely (this process must not take CPU from the workers), then take the
                # end from the jobs' own records
                self.drain(per_round, before, poll=0.1)
                server_s += self.broker.server_cpu() - cpu_before  # enqueue to the last ack
                ends = [j.completed_at.timestamp() for j in map(self.queue.get_job,
                                                                 (j.id for j in jobs))
                        if j is not None and j.completed_at is not None]
                jobq_s += max(ends) - t0
            finally:
                self.stop_master(master)
        total = 2 * per_round
        result = {"jobs_per_s": round(total / jobq_s, 2), "pool_jobs_per_s":
                  round(total / pool_s, 2), "efficiency": round(pool_s / jobq_s, 4),
                  "bare_jobs_per_s": round(total / bare_s, 2),
                  "bare_efficiency": round(pool_s / bare_s, 4),
                  "server_us_per_job": round(server_s * 1e6 / total, 2), "jobs": 3 * total}
        return with_ratios(result, "jobs_per_s")

    def _calibrate(self, seconds: float) -> int:
        n = 20000
        while True:
            t0 = time.perf_counter()
            burn(n)
            took = time.perf_counter() - t0
            if took > 0.01:
                return max(1, int(n * seconds / took))
            n *= 2

    def round_trips(self) -> float:
        """Unpipelined round trips per second on one connection (:mod:`jobq.benchref`)."""
        return benchref.round_trips(self.url, max(1000, int(20_000 * min(self.scale, 1.0))))

    def latency(self) -> dict[str, float]:
        """Enqueue-to-start on an idle pool, from the first job the master runs (``first_ms``
        is that one alone). The reference: the bare hand-off (:func:`benchref.handoff`, the
        same count and spacing, as many processes), measured with no master running; beside
        it the least at-least-once hand-off (``floor_*``, :func:`benchref.held_handoff`), and
        one round trip on a busy connection (``rtt_ms``), for scale."""
        def references() -> tuple[list[float], list[float], float]:
            count = self._latency_count()
            return (benchref.handoff(self.url, self.redis, workers=self.workers, count=count,
                                     spacing=0.01),
                    benchref.held_handoff(self.url, self.redis, workers=self.workers,
                                          count=count, spacing=0.01),
                    self.round_trips())

        with settled_heap():
            delays, (bare, floor, rtt) = self._interleave(references, self._latencies)
        result = {**_quantiles("", delays), "first_ms": round(delays[0], 3),
                  **_quantiles("bare_", bare), **_quantiles("floor_", floor),
                  "rtt_ms": round(1000 / rtt, 4), "jobs": len(delays)}
        for q in ("p50", "p99"):
            result[f"{q}_ms_vs_floor"] = round(result[f"{q}_ms"] / result[f"floor_{q}_ms"], 3)
        return with_ratios(result, "p50_ms", "p99_ms")

    def _latency_count(self) -> int:
        return max(50, int(500 * min(self.scale, 1.0)))

    def _latencies(self) -> list[float]:
        """Jobs 10 ms apart, the first enqueued as soon as the master reports ready: a fresh
        pool's first job is measured as it comes, not warmed up."""
        count = self._latency_count()
        self.cleanup()
        master = self.start_master()
        try:
            self.wait_ready(master)
            jobs = []
            for _ in range(count):
                jobs.append(self.queue.enqueue(latency, time.time()))
                time.sleep(0.01)
            return [j.result(timeout=60) * 1000 for j in jobs]
        finally:
            self.stop_master(master)

    def delayed(self) -> dict[str, float]:
        """Lateness of delayed jobs, from their due time to the start of their task (ms).

        Jobs due DELAYED_SPACING apart (enqueued with ``at=``, all of them before the first is
        due) run twice on one master: with the pool idle, then with the pool busy: both
        workers draining a backlog of BUSY_JOB CPU jobs on the same queue, which outlasts the
        delayed jobs (every core is taken: workers, server and scheduler compete for them).
        The delayed jobs then have priority -1, so that they wait for no backlog, only for a
        worker to finish the batch it holds (about 4 ms of work)."""
        count = max(10, int(200 * min(self.scale, 1.0)))
        self.cleanup()
        master = self.start_master()
        try:
            self.queue.enqueue(noop).result(timeout=60)  # the workers are up
            deadline = time.monotonic() + STALL
            while self.broker.leader_token() is None:  # and the scheduler leads
                if time.monotonic() > deadline or master.poll() is not None:
                    raise RuntimeError("bench: no scheduler took the lead")
                time.sleep(0.01)
            idle = self._lateness(count)
            phase = DELAYED_LEAD + count * DELAYED_SPACING
            backlog = int(1.5 * (phase + 1.0) * self.workers / BUSY_JOB)
            self.queue.enqueue_many(spin, [(BUSY_JOB,)] * backlog)
            busy = self._lateness(count, priority=-1)
            self.queue.empty()
        finally:
            self.stop_master(master)
        result: dict[str, float] = {}
        for name, late in (("idle", idle), ("busy", busy)):
            result.update(_quantiles(f"{name}_", late))
        result["jobs"] = count
        return result

    def _lateness(self, count: int, **options: Any) -> list[float]:
        """Enqueue ``count`` delayed jobs and return each one's lateness (ms)."""
        first = time.time() + DELAYED_LEAD
        jobs = [self.queue.enqueue(latency, due, at=due, **options)
                for due in (first + i * DELAYED_SPACING for i in range(count))]
        return [j.result(timeout=STALL) * 1000 for j in jobs]

    def enqueue(self) -> dict[str, float]:
        """Single enqueue against unpipelined round trips; bulk has no reference."""
        (single, bulk), rtt = self._interleave(self.round_trips, self._enqueue_rates)
        result = {"single_per_s": round(single[0]), "rtt_per_s": round(rtt),
                  "bulk_per_s": round(bulk[0]),
                  "single_server_us_per_job": round(single[1], 2),
                  "bulk_server_us_per_job": round(bulk[1], 2)}
        return with_ratios(result, "single_per_s")

    def _enqueue_rates(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(jobs/s, server µs per job) of enqueue one by one, and of enqueue_many."""
        self.cleanup()
        n_single = int(20_000 * min(self.scale, 1.0)) or 100
        cpu0, t0 = self.broker.server_cpu(), time.perf_counter()
        for _ in range(n_single):
            self.queue.enqueue(noop)
        took, cpu = time.perf_counter() - t0, self.broker.server_cpu() - cpu0
        single = (n_single / took, cpu * 1e6 / n_single)
        self.cleanup()
        n_bulk = int(200_000 * min(self.scale, 1.0)) or 1000
        cpu0, t0 = self.broker.server_cpu(), time.perf_counter()
        self.queue.enqueue_many(noop, [()] * n_bulk)
        took, cpu = time.perf_counter() - t0, self.broker.server_cpu() - cpu0
        bulk = (n_bulk / took, cpu * 1e6 / n_bulk)
        self.cleanup()
        return single, bulk

    def memory(self) -> dict[str, float]:
        n = max(1000, int(100_000 * min(self.scale, 1.0)))
        self.cleanup()
        time.sleep(0.1)
        before = self.queue.broker.used_memory()
        self.queue.enqueue_many(noop_with_args, [(i, "x")for i in range(n)])
        after = self.queue.broker.used_memory()
        self.cleanup()
        return {"bytes_per_job": round((after - before) / n, 1), "jobs": n}

    def backlog(self) -> dict[str, float]:
        measured = int(50_000 * self.scale) or 1000
        large = int(1_000_000 * self.scale) or 10_000
        small_rate, _ = self._rate_with_backlog(1000, measured, top_up=True)
        large_rate, server_us = self._rate_with_backlog(large, measured, top_up=False)
        return {"small_jobs_per_s": round(small_rate), "large_jobs_per_s": round(large_rate),
                "ratio": round(large_rate / small_rate, 3), "backlog": large,
                "server_us_per_job": round(server_us, 2)}

    def _rate_with_backlog(self, backlog: int, measured: int, *, top_up: bool) -> tuple[
            float, float]:
        """Throughput over ``measured`` completions while ``backlog`` jobs stay queued, and
        the server's CPU per job over them. With ``top_up`` the backlog is kept at about its
        size (the enqueues count in the server's CPU); without, it must outlast the measure:
        if it runs out first, that is an error, not a figure."""
        self.cleanup()
        for start in range(0, backlog, 100_000):
            self.queue.enqueue_many(noop, [()] * min(100_000, backlog - start))
        master = self.start_master()
        try:
            self.drain(min(measured // 5, backlog // 2))
            # the workers may be far past the warm-up by now (a bench descheduled for a few
            # milliseconds sees thousands of jobs more): the measure starts here, whatever ran
            base = self.completed()
            if not top_up and backlog - base < measured:
                raise RuntimeError(f"bench: {base} of the backlog's {backlog} jobs ran before "
                                   f"the measure of {measured} began (the bench was late to "
                                   "start it); try a larger --scale")

            def keep_topped_up() -> None:
                pending = self.queue.size()
                if pending < backlog // 2:
                    self.queue.enqueue_many(noop, [()] * (backlog - pending))

            cpu0, t0 = self.broker.server_cpu(), time.perf_counter()
            self.drain(measured, base, each=keep_topped_up if top_up else None)
            done = self.completed() - base
            rate = done / (time.perf_counter() - t0)
            server_us = (self.broker.server_cpu() - cpu0) * 1e6 / done
        finally:
            self.stop_master(master)
            self.queue.empty()
        return rate, server_us

    def tail(self) -> dict[str, float]:
        median = 0.05 * self.scale
        lengths = [median * f for f in (0.5, 0.75, 1.0, 1.25, 1.5)] * 8
        lengths[17] = median * 20  # one job 20 times the median
        self.cleanup()
        master = self.start_master()
        try:
            self.queue.enqueue(noop).result(timeout=60)
            jobs = self.queue.enqueue_many(spin, [(s,) for s in lengths])
            done = [j.result(timeout=120) and self.queue.get_job(j.id) for j in jobs]
        finally:
            self.stop_master(master)
        starts = [j.started_at.timestamp() for j in done if j and j.started_at]
        ends = [j.completed_at.timestamp() for j in done if j and j.completed_at]
        makespan = max(ends) - min(starts)
        ideal = max(sum(lengths) / self.workers, max(lengths))
        return {"efficiency": round(ideal / makespan, 4), "makespan_s": round(makespan, 3),
                "ideal_s": round(ideal, 3), "jobs": len(lengths)}


    def metrics(self) -> dict[str, float]:
        """Empty jobs with the master's metrics on (scraped every SCRAPE_EVERY seconds while
        they run) and off, interleaved: what the workers' tallies and the scrapes cost."""
        load_exporter()  # MetricsError, in one line, when the extra is missing
        n = int(200_000 * self.scale)
        with socket.socket() as s:  # a free port (the master binds it a moment later)
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        scrapes: list[float] = []
        stop = threading.Event()

        def scrape() -> None:
            while not stop.wait(SCRAPE_EVERY):
                t0 = time.perf_counter()
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                                timeout=5) as reply:
                        reply.read()
                except OSError:
                    continue  # not up yet
                scrapes.append(time.perf_counter() - t0)

        def with_metrics() -> dict[str, float]:
            scraper = threading.Thread(target=scrape, daemon=True)
            scraper.start()
            try:
                return self.throughput(noop, n, master_args=("--metrics-port", str(port)))
            finally:
                stop.set()
                scraper.join()

        on, off = self._interleave(lambda: self.throughput(noop, n), with_metrics)
        result = {"metrics_jobs_per_s": on["jobs_per_s"], "plain_jobs_per_s": off["jobs_per_s"],
                  "metrics_server_us_per_job": on["server_us_per_job"],
                  "plain_server_us_per_job": off["server_us_per_job"],
                  "scrape_ms": round(median(scrapes) * 1000, 2) if scrapes else 0.0,
                  "jobs": n}
        return with_ratios(result, "metrics_jobs_per_s")


@task(name="jobq.bench:noop_with_args")
def noop_with_args(a: int, b: str) -> None:
    return None


def with_ratios(result: dict[str, float], *figures: str) -> dict[str, float]:
    """Add ``<figure>_ratio`` = figure / its reference (:data:`REFERENCES`) for each of
    ``figures``, from the figures as reported, so that the table's numbers agree."""
    for figure in figures:
        ref = result[REFERENCES[figure]]
        if ref:
            result[f"{figure}_ratio"] = round(result[figure] / ref, 3)
    return result


def _quantiles(prefix: str, delays: list[float]) -> dict[str, float]:
    """p50, p90, p99 and max of ``delays`` (ms), as ``<prefix>p50_ms`` & co."""
    q = statistics.quantiles(delays, n=100, method="inclusive")  # never beyond the max
    return {f"{prefix}p50_ms": round(statistics.median(delays), 3),
            f"{prefix}p90_ms": round(q[89], 3), f"{prefix}p99_ms": round(q[98], 3),
            f"{prefix}max_ms": round(max(delays), 3)}


@contextmanager
def settled_heap() -> Iterator[None]:
    """The bench's own objects frozen out of its garbage collector while it times latencies:
    the scenarios before leave it with a large heap (lists of 100,000 jobs), a full
    collection of which took it 10-60 ms, and one that fell between a job's timestamp and
    its enqueue was counted as that job's enqueue-to-start."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def median(values: list[float]) -> float:
    """The median, without the float noise of an even count's mean (14.719999999999999), and
    whole when whole figures give a whole one."""
    mid = statistics.median(values)
    if isinstance(mid, float):
        mid = round(mid, 4)
        if mid.is_integer() and all(isinstance(v, int) for v in values):
            return int(mid)
    return mid


def run(url: str, workers: int, scenarios: list[str], repeat: int, scale: float,
        log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run the scenarios; each result is the median over ``repeat`` runs of every figure."""
    bench = Bench(url, workers, scale, log)
    out = []
    # a TERM or HUP stops the bench as Ctrl-C does, through the finally clauses that stop
    # its masters (in process groups of their own, no signal sent to the bench reaches them)
    handlers = _stop_on_signals() if threading.current_thread() is threading.main_thread() \
        else {}
    try:
        for name in scenarios:
            runs = []
            for i in range(repeat):
                log(f"{name}: run {i + 1} of {repeat}")
                bench.run_index = i
                runs.append(getattr(bench, name)())
            result: dict[str, Any] = {"scenario": name, "workers": workers, "repeat": repeat}
            for key in runs[0]:
                result[key] = median([r[key] for r in runs])
            out.append(result)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        bench.cleanup()
        bench.close()
    return out


def _stop_on_signals() -> dict[int, Any]:
    """Make TERM and HUP raise SystemExit(128 + signal); return the handlers they had."""
    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    return {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGHUP)}
