"""Chaos: real masters, workers, schedulers and servers, hit by real faults (SIGKILL, SIGSTOP,
SIGHUP storms, server restarts and crashes, a memory hog, a job that forks), with every job
counted.

Each run of a job is recorded in Redis by the task itself (``jobq_testtasks.chaos_*``: the
job's id, RPUSHed to a list), so a test can tell for each job whether it was

* lost: never completed (and not failed either: it vanished, or is stuck),
* run twice: the runs beyond the first (a run counts as soon as the job starts),
* failed: ended in the dead-letter queue.

One line per test gives the figures (fault, times injected, lost, run twice, failed, time to
recover): printed (``-s``), and appended as JSON to ``$JOBQ_CHAOS_REPORT`` when it is set.
Timings are measured and reported, never asserted; the deadlines are generous (2 cores, other
suites running), and only guard against a fault that never recovers.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jobq_testtasks as tasks
import psutil
import pytest
import redis
from conftest import (
    children,
    kill_processes,
    process_tree,
    subprocess_env,
    title,
    wait_dead,
    wait_until,
)

from jobq import serialization
from jobq.connection import connect
from jobq.job import Job
from jobq.keys import Keys
from jobq.queue import JobQueue
from jobq.scheduler import Scheduler
from jobq.server import EmbeddedServer

pytestmark = pytest.mark.chaos

Spawn = Callable[..., subprocess.Popen[str]]

#: Limits shared by the tests (each test overrides what its fault needs).
BASE_CONFIG: dict[str, Any] = {
    "lease_time": 5.0, "leader_lease": 1.0, "scheduler_tick": 0.2,
    "retry_backoff_base": 0.05, "retry_backoff_cap": 0.5, "retry_jitter": 0.0,
    "graceful_timeout": 10.0, "hard_timeout_grace": 0.5, "heartbeat_timeout": 30.0,
    "max_deliveries": 50, "log_level": "info",
}
KEYS = Keys()


# -- the report -------------------------------------------------------------------------------

def report(fault: str, injected: int, tally: Tally, recover_s: float | None,
           **extra: Any) -> None:
    """One line per test: printed, and appended as JSON to $JOBQ_CHAOS_REPORT if set."""
    line = {"fault": fault, "injected": injected, "jobs": tally.jobs, "lost": tally.lost,
            "run_twice": tally.twice, "failed": tally.failed,
            "run_twice_interrupted": tally.twice_interrupted,
            "run_twice_unacked": tally.twice_unacked,
            "recover_s": None if recover_s is None else round(recover_s, 3), **extra}
    print(f"\n[chaos] {json.dumps(line)}", flush=True)
    path = os.environ.get("JOBQ_CHAOS_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


@dataclass
class Tally:
    """The fate of a set of jobs: how many were lost, ran more than once, failed."""

    jobs: int = 0
    lost: int = 0
    twice: int = 0
    failed: int = 0
    #: runs beyond the first of jobs whose worker was killed under them (a WorkerLost error
    #: is recorded on the job), and of jobs that had finished but whose acknowledgement had
    #: not been sent yet (nothing recorded: they went back as if never started)
    twice_interrupted: int = 0
    twice_unacked: int = 0
    worker_lost: int = 0  # WorkerLost errors recorded on the jobs, in all
    lost_ids: list[str] = field(default_factory=list)
    twice_ids: list[str] = field(default_factory=list)
    failed_ids: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.jobs} jobs: {self.lost} lost {self.lost_ids[:5]}, "
                f"{self.twice} extra runs {self.twice_ids[:5]}, "
                f"{self.failed} failed {self.failed_ids[:5]}")


def final_records(r: redis.Redis, ids: list[str]) -> dict[str, dict[str, Any] | None]:
    """Each job's final record (status "s", errors "e", ...), None while it is not finished."""
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.get(KEYS.result(job_id))
    return {job_id: serialization.loads(raw) if raw else None
            for job_id, raw in zip(ids, pipe.execute(), strict=True)}


def final_states(r: redis.Redis, ids: list[str]) -> dict[str, str | None]:
    """Each job's final status ("completed", "failed", ...), None while it is not finished."""
    return {job_id: rec.get("s") if rec else None
            for job_id, rec in final_records(r, ids).items()}


def tally(r: redis.Redis, ids: list[str], key: str) -> Tally:
    """Count what became of ``ids``, whose runs were recorded under ``test:<key>``."""
    records = final_records(r, ids)
    ran = Counter(r.lrange(f"test:{key}", 0, -1))
    t = Tally(jobs=len(ids))
    for job_id in ids:
        rec = records[job_id] or {}
        state = rec.get("s")
        errors = rec.get("e") if isinstance(rec.get("e"), list) else []
        lost_worker = sum(1 for e in errors
                          if isinstance(e, dict) and e.get("type") == "WorkerLost")
        t.worker_lost += lost_worker
        if state == "failed":
            t.failed += 1
            t.failed_ids.append(job_id)
        elif state != "completed":
            t.lost += 1
            t.lost_ids.append(job_id)
        if ran[job_id] > 1:
            t.twice += ran[job_id] - 1
            t.twice_ids.append(job_id)
            interrupted = min(lost_worker, ran[job_id] - 1)
            t.twice_interrupted += interrupted
            t.twice_unacked += ran[job_id] - 1 - interrupted
    return t


def wait_finished(r: redis.Redis, ids: list[str], timeout: float) -> bool:
    """Wait until every job finished (completed or failed); False at the deadline (the
    caller then counts what is missing, reports it, and fails)."""
    deadline = time.monotonic() + timeout
    left = list(ids)
    while time.monotonic() < deadline:
        states = final_states(r, left)
        left = [job_id for job_id, state in states.items() if state is None]
        if not left:
            return True
        time.sleep(0.01 if len(left) <= 10 else 0.1)
    return False


def eventually(condition: Callable[[], Any], timeout: float, interval: float = 0.02) -> bool:
    """Like ``wait_until``, but False at the deadline instead of failing (the caller reports
    the figures first)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def new_key() -> str:
    return uuid.uuid4().hex[:12]


def runs(r: redis.Redis, key: str) -> list[str]:
    return r.lrange(f"test:{key}", 0, -1)


def pid_of_run(r: redis.Redis, key: str, job_id: str) -> int:
    """The pid of the worker that started ``job_id`` (its first run)."""
    def find() -> int | None:
        for entry in r.lrange(f"test:{key}:pid", 0, -1):
            jid, pid = entry.split()
            if jid == job_id:
                return int(pid)
        return None

    return wait_until(find, 20, message=f"job {job_id} to start")


# -- processes --------------------------------------------------------------------------------

def gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (a zombie waiting for init to reap it counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


class Masters:
    """Real ``python -m jobq.cli.master`` processes (log to ``masters.log``); each one's whole tree
    is killed at teardown (stopped processes are continued first)."""

    def __init__(self, spawn: Spawn, tmp_path: Path) -> None:
        self.spawn = spawn
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[str]] = []
        self.log_path = tmp_path / "masters.log"

    def start(self, workers: int = 2, env: dict[str, str] | None = None, wait: bool = True,
              **values: Any) -> subprocess.Popen[str]:
        path = self.tmp_path / f"jobq-{len(self.procs)}.toml"
        merged = {**BASE_CONFIG, "log_file": str(self.log_path), **values}
        path.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in merged.items()))
        proc = self.spawn("-w", str(workers), "-I", "jobq_testtasks", "--config", str(path),
                          module="jobq.cli.master", env=env or subprocess_env())
        self.procs.append(proc)
        if wait:
            self.wait_ready(proc, workers)
        return proc

    def wait_ready(self, proc: subprocess.Popen[str], workers: int,
                   timeout: float = 30) -> list[int]:
        def ready() -> list[int] | None:
            if proc.poll() is not None:
                raise AssertionError(f"master {proc.pid} exited: {self.log()[-3000:]}")
            pids = children(proc.pid, ready=True)
            if len(pids) == workers and children(proc.pid, "jobq scheduler"):
                return pids
            return None

        return wait_until(ready, timeout, interval=0.02, message=f"master {proc.pid} ready")

    def log(self) -> str:
        """The masters' log file, and the stderr of those that exited (a traceback)."""
        text = self.log_path.read_text() if self.log_path.exists() else ""
        for proc in self.procs:
            if proc.poll() is not None and proc.stderr is not None and not proc.stderr.closed:
                text += f"\n--- stderr of master {proc.pid} (exit {proc.returncode}):\n"
                text += proc.stderr.read()
        return text

    def stop_all(self) -> None:
        kill_processes([p for proc in self.procs for p in process_tree(proc.pid)])
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def masters(spawn: Spawn, tmp_path: Path) -> Iterator[Masters]:
    m = Masters(spawn, tmp_path)
    try:
        yield m
    finally:
        m.stop_all()


class PoolSampler(threading.Thread):
    """Samples the number of live worker children of a master every ``every`` seconds, and
    keeps the longest stretch below ``target``."""

    def __init__(self, master: int, target: int, every: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.master, self.target, self.every = master, target, every
        self.halt = threading.Event()
        self.samples = 0
        self.longest_below = 0.0
        self.below_since: float | None = None
        self.minimum = self.maximum = target
        self.seen: set[int] = set()

    def run(self) -> None:
        while not self.halt.is_set():
            now = time.monotonic()
            pids = children(self.master)
            live = len(pids)
            self.seen.update(pids)
            self.samples += 1
            self.minimum = min(self.minimum, live)
            self.maximum = max(self.maximum, live)
            if live < self.target:
                if self.below_since is None:
                    self.below_since = now
                self.longest_below = max(self.longest_below, now - self.below_since)
            else:
                self.below_since = None
            time.sleep(self.every)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)


# == 1. kill -9 a random worker every 200 ms ====================================================

def test_kill_9_a_random_worker_every_200ms(
        queue: JobQueue, r: redis.Redis, masters: Masters) -> None:
    # the brief's counts: 2,000 short jobs and 200 CPU-heavy ones (25 ms of CPU each)
    master = masters.start(workers=2, lease_time=5.0, max_deliveries=50)
    k = new_key()
    jobs = [Job(tasks.chaos_record, (k,), max_retries=50) for _ in range(2000)]
    jobs += [Job(tasks.chaos_cpu, (k, 0.025), max_retries=50) for _ in range(200)]
    random.Random(7).shuffle(jobs)
    ids = [j.id for j in jobs]
    sampler = PoolSampler(master.pid, 2)
    sampler.start()
    queue.enqueue_many(jobs)
    kills: list[int] = []
    skipped = 0
    rng = random.Random()
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline and master.poll() is None:
        s = queue.get_stats()
        if s["completed"] + s["failed"] >= len(ids):
            break
        up = children(master.pid, up=True)  # a kill at boot would be a crash: backed off
        if up:
            victim = rng.choice(up)
            try:
                os.kill(victim, signal.SIGKILL)
                kills.append(victim)
            except ProcessLookupError:
                skipped += 1
        else:
            skipped += 1  # every worker is booting or starting: nothing to kill this time
        time.sleep(0.2)
    finished = wait_finished(r, ids, 30)
    # the pool is back to 2 after the last kill
    back = eventually(lambda: len(children(master.pid, ready=True)) == 2, 15)
    sampler.stop()
    t = tally(r, ids, k)
    report("SIGKILL a random worker every 200 ms (2 workers, 2000 short + 200 CPU jobs)",
           len(kills), t, sampler.longest_below, pool_min=sampler.minimum,
           pool_samples=sampler.samples, ticks_without_a_ready_worker=skipped)
    assert master.poll() is None, masters.log()[-3000:]
    assert finished and back, str(t)
    assert len(kills) >= 5, "too few kills landed to test anything"
    assert t.lost == 0 and t.failed == 0, str(t)
    # Each kill interrupts at most the one job its worker was running: that job is charged
    # a WorkerLost error and runs again. Prefetched, unstarted jobs go back untouched, and
    # jobs that finished but whose (batched) acks were not sent yet are settled by the master
    # from the worker's ack journal in shared memory: so extra runs <= kills.
    assert t.worker_lost <= len(kills), f"{t} after {len(kills)} kills"
    assert t.twice <= len(kills), f"{t} after {len(kills)} kills"
    # How long the pool stayed short is reported, not asserted: kills of a ready worker every
    # 200 ms outpace the master's forks (4 a second beyond a burst, policy.SpawnPacer), so
    # it depends on how fast workers boot on this machine. That a killed worker is replaced
    # at once is test_policy's; that the pool is whole again after the kills, `back` above.
    assert "Traceback" not in masters.log(), masters.log()[-3000:]


def test_a_worker_killed_in_the_middle_of_writing_its_slot(
        queue: JobQueue, r: redis.Redis, masters: Masters) -> None:
    """A worker SIGKILLed between the two stores of its slot's seqlock leaves the sequence
    odd for good; the master must still read the slot (to give the job back), not crash."""
    master = masters.start(workers=2)
    before = set(children(master.pid))
    k = new_key()
    job = queue.enqueue(tasks.chaos_die_mid_slot_write, k, max_retries=5)
    victim = pid_of_run(r, k, job.id)
    killed_at = time.monotonic()
    finished = wait_finished(r, [job.id], 20)

    def replaced() -> bool:
        assert master.poll() is None, f"the master died: {masters.log()[-3000:]}"
        now = children(master.pid, ready=True)
        return len(now) == 2 and victim not in now

    back = wait_until(replaced, 20, message="the worker to be replaced")
    recover = time.monotonic() - killed_at
    t = tally(r, [job.id], k)
    report("worker SIGKILLed mid-write of its shared-memory slot", 1, t, recover)
    assert victim in before
    assert finished and back and master.poll() is None, masters.log()[-3000:]
    assert t.lost == 0 and t.failed == 0 and t.twice_interrupted == 1, str(t)


@pytest.mark.parametrize("when", ["flight", "landed"])
def test_a_worker_killed_around_an_exchange_sent_ahead(
        queue: JobQueue, r: redis.Redis, masters: Masters, when: str) -> None:
    """Short jobs: a worker sends its next exchange (acks, and the claim of the next batch)
    while it runs the rest of a batch. SIGKILLed while it flies, it leaves acks sent but
    unconfirmed (one half of its journal), acks after them (the other half), jobs it claimed
    unstarted, and jobs the exchange's claim may have taken unseen; SIGKILLed after its
    reply was read, the acks journaled meanwhile. Every job runs, and only the one the
    worker was running runs twice."""
    master = masters.start(workers=1)
    k = new_key()
    ids = [j.id for j in queue.enqueue_many(tasks.chaos_die_in_flight, [(k, when)] * 600)]
    finished = wait_finished(r, ids, 60)
    t = tally(r, ids, k)
    killed = r.get(f"test:{k}:killed")
    report(f"worker SIGKILLed around an exchange sent ahead ({when}; 600 short jobs)", 1, t,
           None)
    assert killed, "no job ran with an exchange in flight: nothing was tested"
    assert finished and master.poll() is None, masters.log()[-3000:]
    assert t.lost == 0 and t.failed == 0, str(t)
    assert t.twice_ids == [killed] and t.twice_interrupted == 1, str(t)
    assert "Traceback" not in masters.log(), masters.log()[-3000:]


def test_a_connection_cut_with_the_next_exchange_in_flight(
        queue: JobQueue, r: redis.Redis, masters: Masters) -> None:
    """The reply of an exchange sent ahead is lost with the connection: its acks are sent
    again with their token, and what its claim took unseen is given back. Every job runs once."""
    master = masters.start(workers=1)
    k = new_key()
    ids = [j.id for j in queue.enqueue_many(tasks.chaos_cut_in_flight, [(k,)] * 600)]
    finished = wait_finished(r, ids, 60)
    t = tally(r, ids, k)
    report("connection cut with the next exchange in flight (600 short jobs)", 0, t, None)
    assert r.get(f"test:{k}:cut"), "no job ran with an exchange in flight: nothing was tested"
    assert finished and master.poll() is None, masters.log()[-3000:]
    assert t.lost == 0 and t.failed == 0 and t.twice == 0, str(t)
    assert "Traceback" not in masters.log(), masters.log()[-3000:]


# == 2. kill -9 the whole master tree, start a new master ======================================

def test_kill_9_the_whole_master_tree_then_a_new_master(
        queue: JobQueue, r: redis.Redis, masters: Masters) -> None:
    # leader_lease (1 s) <= lease_time (2 s): the new master's scheduler leads (and reaps)
    # by the time the killed workers' leases lapse; with a longer leader_lease the bound is
    # max(lease_time, leader_lease) + one tick
    config = {"lease_time": 2.0, "scheduler_tick": 0.2, "leader_lease": 1.0}
    first = masters.start(workers=2, **config)
    k = new_key()
    jobs = [Job(tasks.chaos_sleep, (k, 0.02), max_retries=10) for _ in range(300)]
    ids = [j.id for j in jobs]
    queue.enqueue_many(jobs)
    wait_until(lambda: len(runs(r, k)) >= 40, 20, message="40 jobs to have run")

    victims = process_tree(first.pid)
    assert len(victims) == 4, [title(p) for p in victims]  # master, 2 workers, scheduler
    for p in victims:  # all at once: nobody gets to give anything back
        p.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    wait_dead(victims)
    first.wait(timeout=10)
    prefix = f"{KEYS.base}:held:"
    mine = f".{first.pid}."
    held = {name: r.hkeys(name) for name in r.scan_iter(f"{prefix}*") if mine in name}
    interrupted = sorted({job_id for ids_ in held.values() for job_id in ids_})
    assert interrupted, "no job was held by the killed workers"
    masters.start(workers=2, wait=False, **config)

    def given_back() -> bool:
        return not any(r.exists(name) for name in held)

    wait_until(given_back, 30, interval=0.01, message="the killed workers' jobs given back")
    requeued_after = time.monotonic() - killed_at
    ran_before = Counter(runs(r, k))

    def restarted() -> bool:
        now = Counter(runs(r, k))
        states = final_states(r, interrupted)
        return all(now[j] > ran_before[j] or states[j] == "completed" for j in interrupted)

    wait_until(restarted, 30, interval=0.01, message="the interrupted jobs to start again")
    restarted_after = time.monotonic() - killed_at
    finished = wait_finished(r, ids, 40)
    t = tally(r, ids, k)
    bound = config["lease_time"] + config["scheduler_tick"]
    report("SIGKILL the whole master tree (master, 2 workers, scheduler), new master", 1, t,
           requeued_after, interrupted=len(interrupted), started_again_s=round(restarted_after, 3),
           bound_s=bound)
    assert finished, str(t)
    assert t.lost == 0 and t.failed == 0, str(t)
    # only the jobs held at the kill can run again, each at most once
    assert set(t.twice_ids) <= set(interrupted) and t.twice <= len(interrupted), str(t)
    # The bound (lease_time + one tick) holds when the new master is up before the leases
    # lapse; it is reported, and asserted only as a generous deadline.
    assert requeued_after < bound + 10, f"given back after {requeued_after:.1f} s"


# == 3. restart the server mid-run: clean shutdown, and a crash =================================
#
# The durability window of the embedded server (appendonly yes, appendfsync everysec):
#
# * a clean shutdown (SHUTDOWN, what EmbeddedServer.stop() sends) writes and fsyncs the AOF
#   before the server exits: nothing acknowledged is lost;
# * a crash can lose writes acknowledged in the last ~1 s: with everysec the AOF is fsynced
#   once a second by a background thread, and if that fsync is slow the server postpones its
#   write() of the AOF buffer for up to 2 s more, so up to ~2 s. A kill -9 of the server
#   process alone loses only what had not reached write() yet (the kernel keeps what was
#   written, and normally the server writes the AOF buffer before it replies); a power loss
#   or kernel crash loses everything not yet fsynced. Either way: anything acknowledged
#   more than 2 s before the crash survives, which is what the crash test relies on.

@pytest.fixture
def own_server() -> Iterator[EmbeddedServer]:
    """A server of this test alone, in a short JOBQ_HOME (a unix socket path must fit in
    ~100 bytes), so the test can stop, crash and restart it."""
    home = tempfile.mkdtemp(dir="/tmp", prefix="jqc-")
    server = EmbeddedServer(home)
    server.start()
    try:
        yield server
    finally:
        pid = server.pid()
        try:
            server.stop()
        except Exception:
            if pid:
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)


class Producer(threading.Thread):
    """Enqueues ``count`` jobs, one every ``pause`` s, each with a fixed id so that a retried
    enqueue (after a connection error) is idempotent; ``acked`` are those whose enqueue
    returned."""

    def __init__(self, url: str, key: str, count: int, pause: float,
                 seconds: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.queue = JobQueue("default", redis_url=url)
        self.key, self.count, self.pause, self.seconds = key, count, pause, seconds
        self.acked: list[str] = []
        self.errors = 0

    def run(self) -> None:
        for i in range(self.count):
            job = Job(tasks.chaos_sleep, (self.key, self.seconds), id=f"{self.key}-{i}",
                      max_retries=20)
            while True:
                try:
                    self.queue.enqueue(job)
                    break
                except (redis.RedisError, OSError):
                    self.errors += 1
                    time.sleep(0.02)
            self.acked.append(job.id)
            time.sleep(self.pause)


def server_env(server: EmbeddedServer) -> dict[str, str]:
    return subprocess_env(JOBQ_REDIS_URL=server.url, JOBQ_HOME=str(server.home))


@pytest.mark.parametrize("how", ["clean", "crash"])
def test_restart_the_server_mid_run(own_server: EmbeddedServer, masters: Masters,
                                    how: str) -> None:
    server = own_server
    url = server.url
    r = connect(url)
    master = masters.start(workers=2, env=server_env(server), redis_url=url, lease_time=15.0)
    workers_before = children(master.pid)
    scheduler_before = children(master.pid, "jobq scheduler")
    k = new_key()
    if how == "clean":
        # jobs keep coming while the server goes down and comes back
        producer = Producer(url, k, 1500, 0.002)
        producer.start()
        wait_until(lambda: len(producer.acked) >= 400, 30, message="400 jobs enqueued")
    else:
        # everything enqueued (jobs of 20 ms: about half still queued at the crash), then
        # 2 s (past the everysec window) before the crash
        producer = Producer(url, k, 400, 0.0, seconds=0.02)
        producer.run()
        time.sleep(2.0)
    ran_at_fault = len(runs(r, k))
    pid = server.pid()
    assert pid is not None
    down_at = time.monotonic()
    if how == "clean":
        server.stop()
    else:
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: gone(pid), 10, message="the server to die")
    time.sleep(1.0)  # down for a second: clients retry, with back-off
    server.start()
    up_at = time.monotonic()
    assert server.pid() != pid
    wait_until(lambda: len(runs(r, k)) > ran_at_fault, 30, interval=0.01,
               message="a job to run after the restart")
    recover = time.monotonic() - up_at
    if how == "clean":
        producer.join(timeout=60)
        assert not producer.is_alive()
    # the scheduler reconnected too: a delayed job is promoted and runs
    queue = JobQueue("default", redis_url=url)
    delayed = queue.enqueue(tasks.chaos_record, k + "-delayed", delay=0.3)
    ids = list(producer.acked)
    finished = wait_finished(r, ids + [delayed.id], 40)
    t = tally(r, ids, k)
    report(f"server {'stopped cleanly (SHUTDOWN)' if how == 'clean' else 'SIGKILLed'} and "
           "restarted mid-run, down 1 s", 1, t, recover, ran_before_fault=ran_at_fault,
           down_s=round(up_at - down_at, 3), producer_retries=producer.errors)
    assert finished, f"{t}; delayed job {final_states(r, [delayed.id])}"
    assert t.lost == 0 and t.failed == 0, str(t)
    # nobody was restarted: the same master, workers and scheduler reconnected
    assert master.poll() is None, masters.log()[-3000:]
    assert children(master.pid) == workers_before
    assert children(master.pid, "jobq scheduler") == scheduler_before


# == 4. SIGHUP the master every 500 ms ==========================================================

def test_sighup_every_500ms(queue: JobQueue, r: redis.Redis, masters: Masters) -> None:
    # the brief's count: 5,000 short jobs (each records its run and sleeps 1 ms, so that the
    # run lasts long enough for a storm of reloads: ~5 s on 2 workers)
    master = masters.start(workers=2)
    k = new_key()
    jobs = [Job(tasks.chaos_sleep, (k, 0.001), max_retries=10) for _ in range(5000)]
    ids = [j.id for j in jobs]
    sampler = PoolSampler(master.pid, 2)
    sampler.start()
    queue.enqueue_many(jobs)
    hups = 0
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        assert master.poll() is None, f"the master died: {masters.log()[-3000:]}"
        s = queue.get_stats()
        if s["completed"] + s["failed"] >= len(ids):
            break
        os.kill(master.pid, signal.SIGHUP)
        hups += 1
        time.sleep(0.5)
    last_hup = time.monotonic()
    finished = wait_finished(r, ids, 30)

    def settled() -> bool:  # the retiring generations are gone: exactly N workers remain
        return len(children(master.pid)) == 2 and len(children(master.pid, ready=True)) == 2

    back = wait_until(settled, 30, message="exactly 2 workers after the reloads")
    recover = time.monotonic() - last_hup
    time.sleep(1.0)  # and it stays so (a leak would show up as a third worker)
    sampler.stop()
    t = tally(r, ids, k)
    report("SIGHUP (rolling reload) of the master every 500 ms (2 workers, 5000 jobs)", hups,
           t, recover, most_worker_children=sampler.maximum, workers_seen=len(sampler.seen),
           reloads_logged=masters.log().count("reloading: config re-read"))
    assert finished and back, str(t)
    assert hups >= 5, "the jobs ran too fast for a storm of reloads"
    assert len(sampler.seen) > 2 * 2, "the reloads did not replace the workers"
    assert t.lost == 0 and t.failed == 0, str(t)
    # retiring workers finish their job and give back the prefetched ones untouched
    assert t.twice == 0, str(t)
    assert len(children(master.pid)) == 2, [title(p) for p in process_tree(master.pid)]
    assert master.poll() is None


# == 5. SIGSTOP a worker past its lease ==========================================================

def test_sigstop_a_worker_past_its_lease(queue: JobQueue, r: redis.Redis,
                                         masters: Masters) -> None:
    """A frozen worker keeps its job: its master, alive, keeps renewing its lease. (Across
    hosts a frozen *master* would lose the lease and the job would also run elsewhere:
    documented, README "Not exactly-once", not tested here.)"""
    lease = 1.0
    master = masters.start(workers=2, lease_time=lease)
    k = new_key()
    job = queue.enqueue(tasks.chaos_sleep, k, 0.5, max_retries=5)
    victim = pid_of_run(r, k, job.id)
    assert victim in children(master.pid)
    os.kill(victim, signal.SIGSTOP)
    try:
        time.sleep(3 * lease + 0.5)  # well past the lease
        assert psutil.Process(victim).status() == psutil.STATUS_STOPPED
        deadline = r.zscore(KEYS.leases, [n for n in r.zrange(KEYS.leases, 0, -1)
                                          if r.hexists(KEYS.held(n), job.id)][0])
        assert deadline is not None and deadline / 1000 > time.time()  # still renewed
        assert runs(r, k) == [job.id]  # nobody else started it
    finally:
        os.kill(victim, signal.SIGCONT)
    continued = time.monotonic()
    finished = wait_finished(r, [job.id], 20)
    recover = time.monotonic() - continued
    time.sleep(0.5)
    t = tally(r, [job.id], k)
    report(f"SIGSTOP a busy worker for {3 * lease + 0.5:g} s (lease_time {lease:g} s), then "
           "SIGCONT", 1, t, recover)
    assert finished, str(t)
    assert t.lost == 0 and t.failed == 0 and t.twice == 0, str(t)
    assert runs(r, k) == [job.id]
    assert victim in children(master.pid)  # the same worker finished it


# == 6. the scheduler leader SIGKILLed, then the new one SIGSTOPped ===============================

def leader_pid(sched: Scheduler, other_than: str | None = None) -> tuple[str, int]:
    def find() -> str | None:
        token = sched.leader()
        return token if token and token != other_than else None

    token = wait_until(find, 20, interval=0.01, message="a (new) scheduler leader")
    return token, int(token.rsplit(".", 1)[1])


def test_scheduler_leader_killed_then_new_leader_stopped(
        queue: JobQueue, r: redis.Redis, masters: Masters) -> None:
    config = {"leader_lease": 1.0, "scheduler_tick": 0.2, "lease_time": 1.0}
    masters.start(workers=1, **config)
    masters.start(workers=1, **config)
    sched = Scheduler(queue)
    k = new_key()
    sched.schedule_cron("chaos-cron", "jobq_testtasks:chaos_record", "* * * * * *", args=(k,))
    wait_until(lambda: len(runs(r, k)) >= 2, 20, message="two fires")

    first, first_pid = leader_pid(sched)
    os.kill(first_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    second, second_pid = leader_pid(sched, other_than=first)
    failover_kill = time.monotonic() - killed_at
    count = len(runs(r, k))
    wait_until(lambda: len(runs(r, k)) >= count + 2, 20, message="two fires after the kill")

    os.kill(second_pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        third, _ = leader_pid(sched, other_than=second)
        failover_stop = time.monotonic() - stopped_at
        time.sleep(max(0.0, 3 * config["leader_lease"] - (time.monotonic() - stopped_at)))
    finally:
        os.kill(second_pid, signal.SIGCONT)
    count = len(runs(r, k))
    wait_until(lambda: len(runs(r, k)) >= count + 3, 20,
               message="three fires after the stopped leader continued")
    assert sched.pause("chaos-cron")
    wait_until(lambda: (lambda s: s["pending"] == 0 and s["processing"] == 0)(
        queue.get_stats()), 20, message="the fired jobs to finish")

    ran = Counter(runs(r, k))
    dues = sorted(int(job_id.rsplit("@", 1)[1]) for job_id in ran)
    expected = list(range(dues[0], dues[-1] + 1, 1000))
    missing = sorted(set(expected) - set(dues))
    t = Tally(jobs=len(expected), lost=len(missing),
              twice=sum(n - 1 for n in ran.values()),
              twice_ids=[j for j, n in ran.items() if n > 1], lost_ids=[str(m) for m in missing])
    t.failed = sum(1 for s in final_states(r, list(ran)).values() if s != "completed")
    report("scheduler leader SIGKILLed, then the new leader SIGSTOPped 3 s (leader_lease 1 s), "
           "cron every second, 2 masters", 2, t, max(failover_kill, failover_stop),
           failover_after_kill_s=round(failover_kill, 3),
           failover_after_stop_s=round(failover_stop, 3), fires=len(ran))
    assert third != second and second != first
    assert len(expected) >= 7, expected
    assert not missing, f"due times never fired: {missing}"
    assert t.twice == 0, f"fired or ran twice: {t.twice_ids}"
    assert t.failed == 0, str(t)
    assert queue.get_stats()["enqueued"] == len(ran)  # each due time enqueued exactly once


# == 7. memory pressure ==========================================================================

def test_a_job_allocating_without_bound_hits_the_memory_hard_limit(
        queue: JobQueue, r: redis.Redis, masters: Masters) -> None:
    master = masters.start(workers=2, memory_hard_limit_mb=300)
    k = new_key()
    hog = queue.enqueue(tasks.chaos_hog, k, max_retries=0)
    victim = pid_of_run(r, k, hog.id)
    # the other worker goes on with ordinary jobs meanwhile
    others = queue.enqueue_many(tasks.chaos_sleep, [(k + "-others", 0.01)] * 50)
    wait_until(lambda: gone(victim), 30, interval=0.01, message="the hog's worker killed")
    killed_at = time.monotonic()
    finished = wait_finished(r, [hog.id], 30)

    def replaced() -> bool:
        assert master.poll() is None, f"the master died: {masters.log()[-3000:]}"
        now = children(master.pid, ready=True)
        return len(now) == 2 and victim not in now

    back = wait_until(replaced, 20, message="a new worker in the hog's slot")
    recover = time.monotonic() - killed_at
    done_others = wait_finished(r, [j.id for j in others], 30)
    t = tally(r, [hog.id], k)
    t_others = tally(r, [j.id for j in others], k + "-others")
    record = final_records(r, [hog.id])[hog.id] or {}
    cause = str((record.get("err") or {}).get("msg", ""))
    report("a job allocating 10 MB every 25 ms without bound (memory_hard_limit_mb 300)", 1,
           t, recover, cause=cause[:120], other_jobs_lost=t_others.lost,
           other_jobs_failed=t_others.failed)
    assert finished and back and done_others, str(t)
    assert gone(victim)
    assert record.get("s") == "failed" and t.failed == 1 and t.lost == 0 and t.twice == 0
    assert "memory hard limit" in cause, record
    assert t_others.lost == 0 and t_others.failed == 0 and t_others.twice == 0, str(t_others)
    assert master.poll() is None


# == 8. a job that forks grandchildren, then is killed ===========================================

@pytest.mark.parametrize("how", ["kill -9 its worker", "hard timeout"])
def test_grandchildren_of_a_killed_job_do_not_survive(
        queue: JobQueue, r: redis.Redis, masters: Masters, how: str) -> None:
    master = masters.start(workers=1, hard_timeout_grace=0.5)
    k = new_key()
    if how == "hard timeout":  # deaf to SIGALRM: the master kills it at timeout + grace
        job = queue.enqueue(tasks.chaos_grandchildren, k, True, max_retries=0, timeout=1)
    else:
        job = queue.enqueue(tasks.chaos_grandchildren, k, max_retries=0)
    victim = pid_of_run(r, k, job.id)
    kids = [int(p) for p in wait_until(lambda: r.lrange(f"test:{k}:kids", 0, -1), 20,
                                       message="the grandchildren's pids")]
    assert all(not gone(p) for p in kids)
    assert all(psutil.Process(p).ppid() == victim for p in kids)
    if how == "kill -9 its worker":
        os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    finished = wait_finished(r, [job.id], 20)
    all_gone = wait_until(lambda: all(gone(p) for p in kids + [victim]), 20,
                          message="the grandchildren to be gone")
    recover = time.monotonic() - killed_at
    survivors = [p for p in kids if not gone(p)]
    zombies = [p for p in kids if psutil.pid_exists(p)]  # dead, not yet reaped by init
    t = tally(r, [job.id], k)
    report(f"a job with 2 grandchildren (Popen sleep 300, os.fork) ended by {how}", 1, t,
           recover, orphans_left=len(survivors), unreaped_zombies=len(zombies))
    assert finished and all_gone and not survivors
    assert t.failed == 1 and t.lost == 0 and t.twice == 0, str(t)  # max_retries=0
    assert master.poll() is None
