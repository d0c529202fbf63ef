"""``jobq bench``: measure jobq on this machine, through its public API and a real master.

Each scenario starts a real ``jobq-master`` (``python -m jobq.master``), drives it, and tears
it down. Everything runs in its own key namespace (``jobqbench``), which is deleted at the end:
nothing of the user's data is touched. Figures are medians over ``--repeat`` runs, and the
CPU scenario is a ratio against ``multiprocessing.Pool`` measured in the same run.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import Config
from .connection import connect
from .queue import JobQueue
from .registry import task

#: Key namespace of the bench (never the user's).
PREFIX = "jobqbench"
#: The key the ``incr`` task increments: the task's own data, outside jobq's namespace.
COUNTER_KEY = "jobqbench:counter"
#: A drain that sees no completion for this long fails (seconds).
STALL = 60.0
SCENARIOS = ("noop", "incr", "cpu", "latency", "enqueue", "memory", "backlog", "tail")


# -- the bench's tasks (run by the master's workers: -I jobq.bench) -------------------------------
@task(name="jobq.bench:noop")
def noop() -> None:
    return None


_incr_client: Any = None


@task(name="jobq.bench:incr")
def incr() -> int:
    """One Redis round trip, on the task's own connection."""
    global _incr_client
    if _incr_client is None or _incr_client[0] != os.getpid():
        _incr_client = (os.getpid(), connect(os.environ["JOBQ_BENCH_URL"]))
    return int(_incr_client[1].incr(COUNTER_KEY))


def burn(n: int) -> int:
    """Pure-Python CPU work: about ``n`` loop iterations."""
    total = 0
    for i in range(n):
        total = (total + i * i) % 1000003
    return total


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

    def cleanup(self) -> None:
        """Delete everything in the bench's namespace."""
        self.queue.broker.delete_namespace()
        self.redis.delete(COUNTER_KEY)

    master: subprocess.Popen[bytes] | None = None

    def start_master(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, "JOBQ_REDIS_URL": self.url, "JOBQ_BENCH_URL": self.url}
        cmd = [sys.executable, "-m", "jobq.master", "--workers", str(self.workers), "-q",
               "bench", "-I", "jobq.bench", "--config", str(self.config_path),
               "--log-level", "error"]
        self.master = subprocess.Popen(cmd, env=env, start_new_session=True)
        return self.master

    def stop_master(self, proc: subprocess.Popen[bytes]) -> None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()

    def completed(self) -> int:
        return self.queue.broker.counter("bench", "completed")

    def drain(self, n: int, before: int = 0, poll: float = 0.002) -> tuple[float, float]:
        """Wait for ``n`` more completions; return (time of the first, time of the last).
        Fails if the master died, or if nothing completes for STALL seconds."""
        first = None
        last_progress, last_done = time.perf_counter(), -1
        while True:
            done = self.completed() - before
            now = time.perf_counter()
            if done > 0 and first is None:
                first = now
            if done >= n:
                return first or now, now
            if done != last_done:
                last_progress, last_done = now, done
            elif now - last_progress > STALL:
                raise RuntimeError(f"bench: no job completed for {STALL} s ({done} of {n})")
            if self.master is not None and self.master.poll() is not None:
                raise RuntimeError(f"bench: the master exited with code "
                                   f"{self.master.returncode} ({done} of {n} jobs done)")
            time.sleep(poll)

    # -- scenarios --------------------------------------------------------------------------
    def throughput(self, fn: Any, n: int) -> dict[str, float]:
        """Pre-enqueue n jobs, start the master, time the drain by jobq's own counters."""
        self.cleanup()
        self.queue.enqueue_many(fn, [()] * n)
        started = time.perf_counter()
        master = self.start_master()
        try:
            first, last = self.drain(n)
        finally:
            self.stop_master(master)
        rate = (n - 1) / (last - first) if last > first else float("inf")
        return {"jobs_per_s": round(rate), "startup_s": round(first - started, 3), "jobs": n}

    def noop(self) -> dict[str, float]:
        return self.throughput(noop, int(200_000 * self.scale))

    def incr(self) -> dict[str, float]:
        return self.throughput(incr, int(100_000 * self.scale))

    def cpu(self) -> dict[str, float]:
        """CPU-bound jobs through jobq and through multiprocessing.Pool, on the same work.

        The machines this runs on change speed while it runs (shared hosts), so the two are
        interleaved in rounds, pool-jobq-jobq-pool, and each side's time is summed over its
        rounds: a drift of speed then weighs the same on both sides. Nothing of the other
        side runs during a round (the master is started before and stopped after each)."""
        n_jobs = max(self.workers * 4, int(400 * min(self.scale, 1.0)))
        per_round = max(self.workers * 2, n_jobs // 4)
        size = self._calibrate(0.035)
        pool_s = jobq_s = 0.0
        for side in ("pool", "jobq", "jobq", "pool"):
            if side == "pool":
                with multiprocessing.get_context("fork").Pool(self.workers) as pool:
                    pool.map(burn, [1000] * self.workers)  # started and warm
                    t0 = time.perf_counter()
                    pool.map(burn, [size] * per_round, chunksize=1)
                    pool_s += time.perf_counter() - t0
                continue
            self.cleanup()
            master = self.start_master()
            try:
                self.queue.enqueue(noop).result(timeout=60)  # its workers are up
                before = self.completed()
                t0 = time.time()
                jobs = self.queue.enqueue_many(cpu, [(size,)] * per_round)
                # look rarely (this process must not take CPU from the workers), then take the
                # end from the jobs' own records
                self.drain(per_round, before, poll=0.1)
                ends = [j.completed_at.timestamp() for j in map(self.queue.get_job,
                                                                 (j.id for j in jobs))
                        if j is not None and j.completed_at is not None]
                jobq_s += max(ends) - t0
            finally:
                self.stop_master(master)
        total = 2 * per_round
        return {"jobs_per_s": round(total / jobq_s, 2), "pool_jobs_per_s":
                round(total / pool_s, 2), "efficiency": round(pool_s / jobq_s, 4),
                "jobs": 2 * total}

    def _calibrate(self, seconds: float) -> int:
        n = 20000
        while True:
            t0 = time.perf_counter()
            burn(n)
            took = time.perf_counter() - t0
            if took > 0.01:
                return max(1, int(n * seconds / took))
            n *= 2

    def latency(self) -> dict[str, float]:
        count = max(50, int(500 * min(self.scale, 1.0)))
        self.cleanup()
        master = self.start_master()
        delays = []
        try:
            self.queue.enqueue(noop).result(timeout=60)  # up and idle
            time.sleep(0.2)
            jobs = []
            for _ in range(count):
                jobs.append(self.queue.enqueue(latency, time.time()))
                time.sleep(0.01)
            delays = [j.result(timeout=60) * 1000 for j in jobs]
        finally:
            self.stop_master(master)
        q = statistics.quantiles(delays, n=100)
        return {"p50_ms": round(statistics.median(delays), 3), "p90_ms": round(q[89], 3),
                "p99_ms": round(q[98], 3), "max_ms": round(max(delays), 3), "jobs": count}

    def enqueue(self) -> dict[str, float]:
        self.cleanup()
        n_single = int(20_000 * min(self.scale, 1.0)) or 100
        t0 = time.perf_counter()
        for _ in range(n_single):
            self.queue.enqueue(noop)
        single = n_single / (time.perf_counter() - t0)
        self.cleanup()
        n_bulk = int(200_000 * min(self.scale, 1.0)) or 1000
        t0 = time.perf_counter()
        self.queue.enqueue_many(noop, [()] * n_bulk)
        bulk = n_bulk / (time.perf_counter() - t0)
        self.cleanup()
        return {"single_per_s": round(single), "bulk_per_s": round(bulk)}

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
        small_rate = self._rate_with_backlog(1000, measured)
        large_rate = self._rate_with_backlog(large, measured)
        return {"small_jobs_per_s": round(small_rate), "large_jobs_per_s": round(large_rate),
                "ratio": round(large_rate / small_rate, 3), "backlog": large}

    def _rate_with_backlog(self, backlog: int, measured: int) -> float:
        """Throughput over ``measured`` completions while ``backlog`` jobs stay queued."""
        self.cleanup()
        for start in range(0, backlog, 100_000):
            self.queue.enqueue_many(noop, [()] * min(100_000, backlog - start))
        master = self.start_master()
        try:
            warm = min(measured // 5, backlog // 2)
            self.drain(warm)
            base = self.completed()
            t0 = time.perf_counter()
            done = 0
            while done < measured:
                if backlog <= measured:  # keep the small backlog topped up at about its size
                    pending = self.queue.size()
                    if pending < backlog // 2:
                        self.queue.enqueue_many(noop, [()] * (backlog - pending))
                done = self.completed() - base
                if master.poll() is not None or time.perf_counter() - t0 > STALL * 5:
                    raise RuntimeError(f"bench: backlog run stalled at {done} of {measured}")
                time.sleep(0.002)
            rate = done / (time.perf_counter() - t0)
        finally:
            self.stop_master(master)
            self.queue.empty()
        return rate

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


@task(name="jobq.bench:noop_with_args")
def noop_with_args(a: int, b: str) -> None:
    return None


def run(url: str, workers: int, scenarios: list[str], repeat: int, scale: float,
        log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run the scenarios; each result is the median over ``repeat`` runs of every figure."""
    bench = Bench(url, workers, scale, log)
    out = []
    try:
        for name in scenarios:
            runs = []
            for i in range(repeat):
                log(f"{name}: run {i + 1} of {repeat}")
                runs.append(getattr(bench, name)())
            result: dict[str, Any] = {"scenario": name, "workers": workers, "repeat": repeat}
            for key in runs[0]:
                values = [r[key] for r in runs]
                result[key] = statistics.median(values)
            out.append(result)
    finally:
        bench.cleanup()
    return out
