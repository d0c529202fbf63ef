"""The scheduler against a real server: the Scheduler API, leadership and fire.lua with
in-process SchedulerProcess objects (stepped by hand), then real masters (``python -m
jobq.cli.master``) for delayed jobs, retries and the dead-letter queue, failover after SIGKILL,
a SIGSTOPped leader, and jobs of a killed master coming back.

Measured figures (lateness, promotion time, failover time) are printed (``-s``) and
appended to ``$JOBQ_TEST_FIGURES`` when set; they are never asserted."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jobq_testtasks as tasks
import psutil
import pytest
import redis
from conftest import figure, kill_processes, process_tree, wait_until

from jobq.broker import NewJob
from jobq.config import Config, load_config
from jobq.connection import connect
from jobq.job import Job, JobStatus
from jobq.queue import JobQueue
from jobq.registry import TaskResolver
from jobq.schedule import next_fire
from jobq.scheduler import Scheduler
from jobq.scheduler_daemon import SchedulerProcess
from jobq.server import EmbeddedServer
from jobq.wire import encode_spec
from jobq.worker import Worker

Spawn = Callable[..., subprocess.Popen[str]]

#: Small limits: a leader lease and worker leases of a second, retries in tenths of seconds.
CONFIG: dict[str, Any] = {
    "lease_time": 1.0, "leader_lease": 1.0, "scheduler_tick": 0.2,
    "retry_backoff_base": 0.1, "retry_backoff_cap": 1.0, "retry_jitter": 0.0,
    "graceful_timeout": 2.0, "heartbeat_timeout": 10.0, "log_level": "info",
}


def key() -> str:
    return uuid.uuid4().hex[:12]


def runs(r: redis.Redis, name: str) -> list[str]:
    return r.lrange(f"test:{name}", 0, -1)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def wait_status(queue: JobQueue, job_id: str, *statuses: JobStatus,
                timeout: float = 15) -> Job:
    def check() -> Job | None:
        job = queue.get_job(job_id)
        return job if job is not None and job.status in statuses else None

    return wait_until(check, timeout, message=f"job {job_id} to be one of {statuses}")


def done(queue: JobQueue, job_id: str, timeout: float = 15) -> Job:
    return wait_status(queue, job_id, JobStatus.COMPLETED, JobStatus.FAILED,
                       JobStatus.CANCELLED, timeout=timeout)


# -- processes ---------------------------------------------------------------------------------




def dead(p: psutil.Process) -> bool:
    """Gone, or a zombie (dead; its new parent reaps it when it gets to it)."""
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ""


class Masters:
    """Real ``python -m jobq.cli.master -w 1`` processes; each one's whole tree is killed at
    teardown (stopped ones are continued first)."""

    def __init__(self, spawn: Spawn, tmp_path: Path) -> None:
        self.spawn = spawn
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[str]] = []

    def config(self, extra: str = "", **values: Any) -> Path:
        path = self.tmp_path / f"jobq-{len(self.procs)}.toml"
        merged = {**CONFIG, "log_file": str(self.tmp_path / "masters.log"), **values}
        path.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in merged.items()) + extra)
        return path

    def start(self, count: int = 1, extra: str = "", **values: Any) -> list[subprocess.Popen[str]]:
        started = []
        for _ in range(count):
            path = self.config(extra, **values)
            proc = self.spawn("-w", "1", "-I", "jobq_testtasks", "--config", str(path),
                              module="jobq.cli.master")
            self.procs.append(proc)
            started.append(proc)
        for proc in started:
            self.wait_ready(proc)
        return started

    def wait_ready(self, proc: subprocess.Popen[str], timeout: float = 20) -> None:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"master {proc.pid} exited: {self.log()[-3000:]}")
            titles = [title(c) for c in process_tree(proc.pid)[1:]]
            return any("jobq scheduler" in t for t in titles) and any(
                "jobq worker" in t and "booting" not in t for t in titles)

        wait_until(ready, timeout, interval=0.02, message=f"master {proc.pid} ready")

    def log(self) -> str:
        path = self.tmp_path / "masters.log"
        return path.read_text() if path.exists() else ""

    def kill(self, proc_pid: int) -> list[int]:
        """SIGKILL a master and every process under it at once; their pids."""
        victims = process_tree(proc_pid)
        kill_processes(victims)
        for proc in self.procs:
            if proc.pid == proc_pid:
                proc.wait(timeout=10)
        return [p.pid for p in victims]

    def stop_all(self) -> None:
        trees = [p for proc in self.procs for p in process_tree(proc.pid)]
        kill_processes(trees)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


@pytest.fixture
def masters(spawn: Spawn, tmp_path: Path) -> Iterator[Masters]:
    m = Masters(spawn, tmp_path)
    try:
        yield m
    finally:
        m.stop_all()


def scheduler_pid(sched: Scheduler) -> int:
    leader = wait_until(sched.leader, 10, message="a scheduler leader")
    return int(leader.rsplit(".", 1)[1])


def master_of(pid: int) -> int:
    return psutil.Process(pid).ppid()


# -- in-process scheduler processes ------------------------------------------------------------

@pytest.fixture
def stepper(redis_url: str) -> Callable[..., SchedulerProcess]:
    """SchedulerProcess objects in this process, stepped by hand with ``.step(now)``."""

    def make(**values: Any) -> SchedulerProcess:
        config = load_config(redis_url=redis_url, **{"leader_lease": 0.5,
                                                     "scheduler_tick": 0.1, **values})
        return SchedulerProcess(config, redis_url)

    return make


def run_burst(redis_url: str) -> None:
    """Run a burst Worker in this process (what is pending, then return); put back the
    signal handlers and the timer it replaces (pytest-timeout's SIGALRM among them)."""
    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGUSR1, signal.SIGUSR2)
    saved = {s: signal.getsignal(s) for s in signums}
    timer = signal.getitimer(signal.ITIMER_REAL)
    try:
        Worker(["default"], config=load_config(redis_url=redis_url), url=redis_url,
               resolver=TaskResolver(["jobq_testtasks"]), burst=True).run()
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        if timer[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, *timer)


# == 1. the Scheduler API ======================================================================

def test_schedules_are_stored_and_listed_with_their_next_and_last_runs(
        queue: JobQueue, redis_url: str, stepper: Callable[..., SchedulerProcess]) -> None:
    sched = Scheduler(queue)
    now = time.time()
    at = datetime.now(UTC) + timedelta(hours=1)
    assert sched.schedule_once("once", tasks.add, at, args=(1, 2)) == "once"
    sched.schedule_interval("every", "jobq_testtasks:record", 60, args=("every", "x"),
                            start=now, max_retries=1, priority=3, queue="other")
    sched.schedule_cron("nightly", tasks.noop, "0 3 * * *", timezone="Europe/Paris")

    listed = {s["name"]: s for s in sched.list()}
    assert sorted(listed) == ["every", "nightly", "once"]
    assert listed["once"]["kind"] == "once" and listed["once"]["args"] == [1, 2]
    assert listed["once"]["next_run"] == round(at.timestamp(), 3)
    assert listed["every"]["next_run"] == round(now, 3)
    nightly_at = listed["nightly"]["next_run"]
    paris = datetime.fromtimestamp(nightly_at, ZoneInfo("Europe/Paris"))
    assert (paris.hour, paris.minute) == (3, 0) and now < nightly_at <= now + 86400
    for s in listed.values():
        assert s["last_run"] is None and s["last_status"] is None and s["paused"] is False

    # a second Scheduler (its own connection) sees the very same schedules
    other = Scheduler(JobQueue("default", redis_url=redis_url))
    assert [(s["name"], s["next_run"]) for s in other.list()] == [
        (s["name"], s["next_run"]) for s in sched.list()]
    assert other.get("every") == sched.get("every")

    # the leader fires the due interval: last_run, last_job, last_status appear
    proc = stepper()
    fired_at = time.time()
    proc.step(fired_at)
    assert sched.leader() == f"{socket.gethostname()}.{os.getpid()}"
    every = {s["name"]: s for s in other.list()}["every"]
    job_id = f"every@{int(round(now, 3) * 1000)}"
    assert every["last_job"] == job_id
    assert every["last_run"] == pytest.approx(fired_at, abs=0.002)
    assert every["last_status"] == "pending"
    assert every["next_run"] == round(now, 3) + 60
    job = queue.get_job(job_id)
    assert job is not None and (job.queue, job.priority, job.max_retries) == ("other", 3, 1)
    assert job.args == ("every", "x")
    proc.step(fired_at + 1)  # nothing more is due: nothing more fires
    assert JobQueue("other", redis_url=redis_url).size() == 1

    # pause: no next run, nothing fires even when it would be due; resume: the next one
    assert sched.pause("every")
    paused = {s["name"]: s for s in sched.list()}["every"]
    assert paused["paused"] is True and paused["next_run"] is None
    proc.step(now + 600)
    assert JobQueue("other", redis_url=redis_url).size() == 1
    assert sched.resume("every", now=now + 90)
    resumed = {s["name"]: s for s in sched.list()}["every"]
    assert resumed["paused"] is False and resumed["next_run"] == round(now, 3) + 120
    assert not sched.pause("missing") and not sched.resume("missing")

    # run_now: a job now, outside the timetable, which stays as it was
    extra = other.run_now("nightly")
    assert queue.get_status(extra.id) == "pending" and extra.task == "jobq_testtasks:noop"
    assert {s["name"]: s for s in sched.list()}["nightly"]["next_run"] == nightly_at
    with pytest.raises(KeyError):
        sched.run_now("missing")

    # cancel: gone for everyone
    assert other.cancel("once")
    assert not other.cancel("once")
    assert sched.get("once") is None
    assert [s["name"] for s in sched.list()] == ["every", "nightly"]


def test_a_fired_schedule_shows_the_status_of_its_last_job(
        queue: JobQueue, redis_url: str, stepper: Callable[..., SchedulerProcess]) -> None:
    sched = Scheduler(queue)
    sched.schedule_interval("adds", tasks.add, 3600, args=(2, 3), start=time.time())
    stepper().step(time.time())
    assert sched.list()[0]["last_status"] == "pending"
    run_burst(redis_url)
    [item] = sched.list()
    assert item["last_status"] == "completed"
    assert queue.get_job(item["last_job"]).return_value == 5  # type: ignore[union-attr]


# == 2. leadership and fire.lua, stepped by hand ===============================================

def test_one_scheduler_leads_and_the_standby_takes_over_when_the_lease_lapses(
        queue: JobQueue, r: redis.Redis, stepper: Callable[..., SchedulerProcess]) -> None:
    a, b = stepper(), stepper()
    sched = Scheduler(queue)
    a.step(time.time())
    b.step(time.time())
    assert (a.leading, b.leading) == (True, False)
    assert r.get("{jobq}:sched:leader") == a.token
    for _ in range(5):  # a keeps renewing: b never gets in
        a.step(time.time())
        b.step(time.time())
        assert (a.leading, b.leading) == (True, False)

    # a stops renewing (as if hung): its lease lapses in real time, then b leads
    last_renewal = time.time()
    wait_until(lambda: b.step(time.time()) and b.leading, 5, interval=0.02,
               message="the standby to take the lead")
    figure(f"in-process takeover after the last renewal: {time.time() - last_renewal:.3f} s "
           f"(leader_lease {a.config.leader_lease} s)")
    assert r.get("{jobq}:sched:leader") == b.token
    a.step(time.time())  # the old leader never overwrites a live lease
    assert (a.leading, b.leading) == (False, True)
    assert r.get("{jobq}:sched:leader") == b.token
    assert sched.leader() == f"{socket.gethostname()}.{os.getpid()}"

    # the lease key deleted: the first to step takes it
    r.delete("{jobq}:sched:leader")
    a.step(time.time())
    b.step(time.time())
    assert (a.leading, b.leading) == (True, False)


def test_only_the_leader_promotes_delayed_jobs(
        queue: JobQueue, stepper: Callable[..., SchedulerProcess]) -> None:
    a, b = stepper(), stepper()
    job = queue.enqueue(tasks.noop, delay=30)
    now = time.time()
    a.step(now)
    assert queue.get_status(job.id) == "scheduled"
    b.step(now + 31)  # a standby: it does nothing
    assert queue.get_status(job.id) == "scheduled"
    a.step(now + 31)
    assert queue.get_status(job.id) == "pending" and queue.size() == 1
    assert queue.get_stats()["scheduled"] == 0


def test_two_schedulers_firing_the_same_due_time_fire_it_once(
        queue: JobQueue, r: redis.Redis, redis_url: str,
        stepper: Callable[..., SchedulerProcess]) -> None:
    a, b = stepper(), stepper()
    sched = Scheduler(queue)
    start = round(time.time(), 3)
    names = [f"s{i}" for i in range(30)]
    for name in names:
        sched.schedule_interval(name, tasks.noop, 3600, start=start)

    # both fire, at the same time, for the same due times (fire_due ignores leadership)
    barrier = threading.Barrier(2)
    now = time.time()

    def fire(proc: SchedulerProcess) -> None:
        barrier.wait()
        for _ in range(3):
            proc.fire_due(now)

    threads = [threading.Thread(target=fire, args=(p,)) for p in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    start_ms = int(start * 1000)
    pending = r.lrange("{jobq}:q:default:0", 0, -1)
    assert sorted(pending) == sorted(f"{n}@{start_ms}" for n in names)
    assert queue.get_stats()["enqueued"] == len(names)
    due = dict(r.zrange("{jobq}:sched:due", 0, -1, withscores=True))
    assert due == {n: start_ms + 3_600_000 for n in names}

    # the fired jobs complete; a scheduler that was paused mid-fire now sends its fire of
    # the old due time: fire.lua refuses it, although no job with that id exists any more
    run_burst(redis_url)
    first = f"{names[0]}@{start_ms}"
    assert queue.get_status(first) == "completed"
    d = sched.get(names[0])
    assert d is not None
    spec = encode_spec(Job(d.task, id=first), max_bytes=1 << 20)

    def stale_fire(expected_ms: int, job_id: str) -> int:
        return int(b.broker.fire(names[0], expected_ms, expected_ms + 3_600_000,
                                 NewJob(job_id, "default", 0, 0, spec), time.time()))

    assert stale_fire(start_ms, first) == 0
    assert queue.size() == 0 and queue.get_status(first) == "completed"
    assert queue.get_stats()["enqueued"] == len(names)
    # the current due time does fire (so the refusal above is the due-time check)
    nxt = f"{names[0]}@{start_ms + 3_600_000}"
    assert stale_fire(start_ms + 3_600_000, nxt) == 1
    assert queue.size() == 1 and queue.get_status(nxt) == "pending"


# == 2b. the leader's sleep: timed on its own clock, never losing a wake token ================

@pytest.fixture
def slow_server(home: Path) -> str:
    """A server of the test's own that looks at its blocked clients' timeouts once a second
    (hz 1; stock servers: 10 times): a wait ended by the server's own timeout would end up
    to a second late, and one whose server timeout is 30 s, after 30 s."""
    return EmbeddedServer(home).start(extra={"hz": "1"})


def sleeper(url: str, **values: Any) -> SchedulerProcess:
    """A scheduler process object in this process (its sleep is called by hand)."""
    return SchedulerProcess(Config(redis_url=url, **values), url)


def test_the_leaders_sleep_ends_on_its_own_clock_not_the_servers(slow_server: str) -> None:
    proc = sleeper(slow_server)
    admin = connect(slow_server)
    assert proc.broker.wait_for_wake(0.01) is False  # its connections are made
    received = admin.info("stats")["total_connections_received"]
    for _ in range(3):
        started = time.monotonic()
        assert proc.broker.wait_for_wake(0.05, server_timeout=30) is False
        # not after the server's own 30 s: the client unblocked its connection ...
        assert time.monotonic() - started < 10
        assert admin.info("clients")["blocked_clients"] == 0  # ... which waits no more
    # and it went on with the same connections: the blocked one was not dropped
    assert admin.info("stats")["total_connections_received"] == received


def test_a_wake_token_is_never_lost_however_it_meets_the_end_of_the_sleep(
        slow_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = sleeper(slow_server)
    other = connect(slow_server)
    wake = proc.keys.sched_wake
    other.lpush(wake, "1")  # there before the sleep: taken at once
    assert proc.broker.wait_for_wake(30) is True and other.llen(wake) == 0

    def push_once_blocked() -> None:
        wait_until(lambda: other.info("clients")["blocked_clients"] == 1, message="a sleep")
        other.lpush(wake, "1")

    pusher = threading.Thread(target=push_once_blocked)
    pusher.start()
    assert proc.broker.wait_for_wake(30, server_timeout=30) is True  # pushed during it
    pusher.join()
    assert other.llen(wake) == 0

    # pushed after the sleep's own deadline passed, before its CLIENT UNBLOCK lands: the
    # blocked pop took it, and the sleep returns it (the unblock found nothing to unblock)
    unblock = redis.Redis.client_unblock
    unblocked: list[bool] = []

    def token_first(client: redis.Redis, client_id: int, *args: Any, **kw: Any) -> bool:
        other.lpush(wake, "1")
        unblocked.append(unblock(client, client_id, *args, **kw))
        return unblocked[-1]

    monkeypatch.setattr(redis.Redis, "client_unblock", token_first)
    assert proc.broker.wait_for_wake(0.05, server_timeout=30) is True
    assert unblocked == [False] and other.llen(wake) == 0
    # the connection is in step: no reply left over for the next sleep, which finds nothing
    monkeypatch.undo()
    assert proc.broker.wait_for_wake(0.05, server_timeout=30) is False
    assert other.llen(wake) == 0


def test_a_user_refused_client_unblock_sleeps_until_the_servers_own_timeout(
        slow_server: str, home: Path, caplog: pytest.LogCaptureFixture) -> None:
    connect(slow_server).acl_setuser("sched", enabled=True, passwords=["+pw"], keys=["*"],
                                     channels=["*"], commands=["+@all", "-client|unblock"])
    url = f"unix://sched@{home / 'valkey.sock'}?password=pw"
    proc = sleeper(url)
    for _ in range(2):
        assert proc.broker.wait_for_wake(0.05, server_timeout=0.2) is False
    said = [r for r in caplog.records if "refuses CLIENT UNBLOCK" in r.getMessage()]
    assert len(said) == 1 and "+client|unblock" in said[0].getMessage()  # said once


def test_a_server_that_freezes_during_the_sleep_fails_it_instead_of_hanging_it(
        slow_server: str, home: Path) -> None:
    proc = sleeper(slow_server, lease_time=1.0)  # a read from the server: 1 s at most
    admin = connect(slow_server)
    pid = EmbeddedServer(home).pid()
    assert pid is not None
    outcome: list[object] = []

    def sleep() -> None:
        try:
            outcome.append(proc.broker.wait_for_wake(0.3, server_timeout=30))
        except redis.RedisError as exc:
            outcome.append(exc)

    sleeping = threading.Thread(target=sleep)
    sleeping.start()
    wait_until(lambda: admin.info("clients")["blocked_clients"] == 1, message="the sleep")
    os.kill(pid, signal.SIGSTOP)
    try:
        sleeping.join(20)
        assert not sleeping.is_alive(), "the sleep hung on a frozen server"
    finally:
        os.kill(pid, signal.SIGCONT)
    assert len(outcome) == 1 and isinstance(outcome[0], redis.RedisError), outcome
    assert proc.broker.wait_for_wake(0.05, server_timeout=30) is False  # and then goes on


# == 3. delayed jobs on a running master =======================================================

def test_delayed_jobs_wait_then_run(queue: JobQueue, masters: Masters) -> None:
    masters.start(1)
    job = queue.enqueue(tasks.noop, delay=0.3)
    assert job.due_at is not None
    assert queue.get_status(job.id) == "scheduled" or time.time() >= job.due_at
    ran = done(queue, job.id)
    assert ran.status is JobStatus.COMPLETED
    assert ran.started_at is not None and ran.started_at.timestamp() >= job.due_at - 0.001

    aware = datetime.now(UTC) + timedelta(seconds=0.4)
    naive = datetime.now() + timedelta(seconds=0.4)  # naive: local time
    jobs = [queue.enqueue(tasks.add, 1, 2, at=aware), queue.enqueue(tasks.add, 3, 4, at=naive)]
    for j, when in zip(jobs, (aware, naive), strict=True):
        assert queue.get_status(j.id) == "scheduled" or time.time() >= when.timestamp()
    for j, when in zip(jobs, (aware, naive), strict=True):
        finished = done(queue, j.id)
        assert finished.status is JobStatus.COMPLETED and finished.started_at is not None
        assert finished.started_at.timestamp() >= when.timestamp() - 0.001
    assert [queue.get_job(j.id).return_value for j in jobs] == [3, 7]  # type: ignore[union-attr]


def test_delayed_job_lateness_and_a_burst_of_10000_due_at_once(
        queue: JobQueue, r: redis.Redis, masters: Masters) -> None:
    masters.start(1)
    warm = queue.enqueue(tasks.noop)
    done(queue, warm.id)

    # 200 jobs due over 2 s: how late does each start?
    base = time.time() + 0.5
    dues = [base + 2.0 * i / 200 for i in range(200)]
    delayed = [queue.enqueue(tasks.noop, at=due) for due in dues]
    assert all(queue.get_status(j.id) == "scheduled" for j in delayed[-10:])
    finished = [done(queue, j.id) for j in delayed]
    assert all(j.status is JobStatus.COMPLETED for j in finished)
    late = [j.started_at.timestamp() - due  # type: ignore[union-attr]
            for j, due in zip(finished, dues, strict=True)]
    assert min(late) >= -0.001  # never early (due times are whole milliseconds)
    figure(f"delayed-job lateness (started_at - due, 200 jobs over 2 s, 1 worker): "
           f"p50 {pct(late, 50) * 1000:.1f} ms, p99 {pct(late, 99) * 1000:.1f} ms, "
           f"max {max(late) * 1000:.1f} ms")

    # 10,000 jobs due at one moment, on a queue no worker takes: all promoted
    bulk = JobQueue("bulk", redis_url=queue.url)
    due = time.time() + 2.0
    t0 = time.time()
    bulk.enqueue_many(tasks.noop, [()] * 10_000, at=due)
    enqueued_in = time.time() - t0
    assert time.time() < due, "enqueueing took longer than the margin before the due time"
    assert r.zcard("{jobq}:scheduled") == 10_000 and bulk.size() == 0
    assert bulk.get_stats()["scheduled"] == 10_000
    wait_until(lambda: r.zcard("{jobq}:scheduled") == 0, 15, interval=0.002,
               message="10,000 jobs promoted")
    promoted_after = time.time() - due
    assert bulk.size() == 10_000 and r.llen("{jobq}:q:bulk:0") == 10_000
    assert bulk.get_stats()["scheduled"] == 0
    figure(f"10,000 jobs due at once: all promoted {promoted_after * 1000:.0f} ms after the "
           f"due time (enqueue_many took {enqueued_in * 1000:.0f} ms)")


# == 4. retries and the dead-letter queue ======================================================

def test_a_job_that_always_fails_ends_in_the_dlq_after_growing_back_offs(
        queue: JobQueue, masters: Masters) -> None:
    masters.start(1)
    job = queue.enqueue(tasks.boom, "always", max_retries=3)
    failed = done(queue, job.id)
    assert failed.status is JobStatus.FAILED
    assert (failed.attempts, failed.retries, failed.deliveries) == (4, 3, 4)
    assert [e["type"] for e in failed.errors] == ["ValueError"] * 4
    assert failed.final_error["msg"] == "always"
    times = [e["t"] for e in failed.errors]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # retry_jitter = 0: each wait is at least base * 2**(n-1), and they grow
    for n, gap in enumerate(gaps, start=1):
        assert gap >= CONFIG["retry_backoff_base"] * 2 ** (n - 1) - 0.002, gaps
    assert gaps[0] < gaps[1] < gaps[2], gaps
    figure("retry gaps (base 0.1 s, no jitter): " + ", ".join(f"{g:.3f} s" for g in gaps))
    assert [j.id for j in queue.failed_jobs()] == [job.id]
    assert queue.failed_count() == 1


def test_retry_with_a_delay_raised_by_the_task(
        queue: JobQueue, r: redis.Redis, masters: Masters) -> None:
    masters.start(1)
    k = key()
    job = queue.enqueue(tasks.retry_once, k, 0.5, max_retries=1)
    finished = done(queue, job.id)
    assert finished.status is JobStatus.COMPLETED and finished.return_value == "run 2"
    first, second = (float(t) for t in runs(r, k))
    assert second - first >= 0.5
    [error] = finished.errors
    assert error["type"] == "Retry"
    assert finished.retry_count == 1


@pytest.mark.parametrize("options,exc,attempts,status", [
    ({"retry_on": [KeyError]}, "ValueError", 1, JobStatus.FAILED),
    ({"retry_on": ["KeyError"]}, "KeyError", 3, JobStatus.COMPLETED),
    ({"dont_retry_on": [ValueError]}, "ValueError", 1, JobStatus.FAILED),
    ({"dont_retry_on": [ValueError]}, "KeyError", 3, JobStatus.COMPLETED),
    ({"retry_on": [LookupError], "dont_retry_on": [KeyError]}, "KeyError", 1,
     JobStatus.FAILED),
    ({"retry_on": [LookupError]}, "IndexError", 3, JobStatus.COMPLETED),
])
def test_retry_on_and_dont_retry_on(queue: JobQueue, r: redis.Redis, masters: Masters,
                                    options: dict[str, Any], exc: str, attempts: int,
                                    status: JobStatus) -> None:
    masters.start(1)
    k = key()
    job = queue.enqueue(tasks.fail_times, k, 2, exc, max_retries=3, **options)
    finished = done(queue, job.id)
    assert finished.status is status
    assert len(runs(r, k)) == attempts
    assert [e["type"] for e in finished.errors] == [exc] * min(attempts, 2)


def test_dead_letters_requeue_requeue_failed_and_purge(
        queue: JobQueue, r: redis.Redis, masters: Masters) -> None:
    masters.start(1)
    # one failure, requeued: it runs again, with its error history and fresh attempts
    k = key()
    job = queue.enqueue(tasks.fail_times, k, 1, max_retries=0)
    failed = done(queue, job.id)
    assert failed.status is JobStatus.FAILED and (failed.attempts, failed.retries) == (1, 0)
    assert [j.id for j in queue.failed_jobs()] == [job.id]
    assert queue.requeue(job.id)
    again = done(queue, job.id)
    assert again.status is JobStatus.COMPLETED and again.return_value == "run 2"
    assert [e["type"] for e in again.errors] == ["ValueError"]
    assert (again.attempts, again.retries, again.requeues) == (1, 0, 1)
    assert queue.failed_jobs() == [] and len(runs(r, k)) == 2
    assert not queue.requeue("no-such-job")

    # several at once
    keys = [key() for _ in range(3)]
    jobs = [queue.enqueue(tasks.fail_times, kk, 1, max_retries=0) for kk in keys]
    for j in jobs:
        assert done(queue, j.id).status is JobStatus.FAILED
    assert sorted(j.id for j in queue.failed_jobs()) == sorted(j.id for j in jobs)
    assert queue.requeue_failed() == 3
    for j in jobs:
        assert done(queue, j.id).status is JobStatus.COMPLETED
    assert queue.failed_count() == 0 and [len(runs(r, kk)) for kk in keys] == [2, 2, 2]

    # purge: the dead letters and their records are gone
    doomed = [queue.enqueue(tasks.boom, max_retries=0) for _ in range(2)]
    for j in doomed:
        assert done(queue, j.id).status is JobStatus.FAILED
    assert queue.failed_count() == 2
    assert queue.purge_failed() == 2
    assert queue.failed_jobs() == [] and queue.failed_count() == 0
    assert all(queue.get_job(j.id) is None for j in doomed)
    assert queue.requeue_failed() == 0


# == 5-7. real masters: failover, a stopped leader, jobs of a killed master ===================

def ticks(r: redis.Redis, name: str) -> list[tuple[str, int, int]]:
    """(job id, due ms, pid) of every recorded run of schedule ``name``."""
    out = []
    for entry in runs(r, name):
        job_id, pid = entry.split()
        out.append((job_id, int(job_id.rsplit("@", 1)[1]), int(pid)))
    return out


def settle(queue: JobQueue, sched: Scheduler, name: str) -> None:
    """Stop the schedule and wait until everything it fired has run."""
    assert sched.pause(name)

    def drained() -> bool:
        s = queue.get_stats()
        return s["pending"] == 0 and s["processing"] == 0 and s["scheduled"] == 0

    wait_until(drained, 15, message="the fired jobs to finish")


def check_each_due_fired_once(queue: JobQueue, r: redis.Redis, name: str, interval_ms: int,
                              killed: set[int] = frozenset()) -> list[int]:
    """Every due time from the first to the last fired, none twice; return the due times.

    A job run by a worker that was SIGKILLed is given back and runs again (at-least-once):
    such a second run is no second fire; the 'enqueued' counter (fires that created a job)
    must equal the number of due times."""
    recorded = ticks(r, name)
    dues = sorted({due for _, due, _ in recorded})
    assert len(dues) >= 2
    steps = {b - a for a, b in zip(dues, dues[1:], strict=False)}
    assert steps == {interval_ms}, f"a gap in the due times: {dues}"
    per_due = Counter(due for _, due, pid in recorded if pid not in killed)
    assert max(per_due.values()) == 1, f"a due time ran twice: {per_due.most_common(3)}"
    assert queue.get_stats()["enqueued"] == len(dues)
    return dues


def test_failover_after_the_leaders_master_is_killed(
        queue: JobQueue, r: redis.Redis, masters: Masters) -> None:
    procs = masters.start(3)
    sched = Scheduler(queue)
    sched.schedule_interval("tick", "jobq_testtasks:record_job_id", 1.0, args=("tick",))
    wait_until(lambda: len(runs(r, "tick")) >= 2, 10, message="two ticks")

    leader = sched.leader()
    assert leader is not None
    victim = master_of(int(leader.rsplit(".", 1)[1]))
    assert victim in {p.pid for p in procs}
    killed_at = time.time()
    killed = set(masters.kill(victim))
    new_leader = wait_until(lambda: (lambda cur: cur if cur and cur != leader else None)(
        sched.leader()), 10, interval=0.01, message="another scheduler to lead")
    failover = time.time() - killed_at
    figure(f"failover (SIGKILL of the leader's master tree -> a new leader): "
           f"{failover:.3f} s (leader_lease {CONFIG['leader_lease']} s, "
           f"scheduler_tick {CONFIG['scheduler_tick']} s)")
    survivors = {p.pid for p in procs} - {victim}
    assert master_of(int(new_leader.rsplit(".", 1)[1])) in survivors

    # the schedule goes on: wait for three fires due after the kill, then stop it
    wait_until(lambda: sum(due / 1000 > killed_at for _, due, _ in ticks(r, "tick")) >= 3,
               15, message="three fires after the failover")
    settle(queue, sched, "tick")
    dues = check_each_due_fired_once(queue, r, "tick", 1000, killed)
    assert dues[0] / 1000 < killed_at < dues[-1] / 1000
    runners = {pid for _, due, pid in ticks(r, "tick") if due / 1000 > killed_at + 2}
    assert runners and not runners & killed


def test_a_stopped_leader_does_not_fire_twice_when_it_continues(
        queue: JobQueue, r: redis.Redis, masters: Masters) -> None:
    masters.start(2)
    sched = Scheduler(queue)
    sched.schedule_interval("tick", "jobq_testtasks:record_job_id", 1.0, args=("tick",))
    wait_until(lambda: len(runs(r, "tick")) >= 2, 10, message="two ticks")

    leader = sched.leader()
    assert leader is not None
    stopped = int(leader.rsplit(".", 1)[1])
    os.kill(stopped, signal.SIGSTOP)
    try:
        stopped_at = time.time()
        wait_until(lambda: sched.leader() not in (None, leader), 10, interval=0.01,
                   message="another scheduler to lead")
        figure(f"takeover from a SIGSTOPped leader: {time.time() - stopped_at:.3f} s")
        # the new leader fires a couple of times while the old one is still stopped
        wait_until(lambda: sum(due / 1000 > stopped_at for _, due, _ in ticks(r, "tick")) >= 2,
                   10, message="two fires by the new leader")
    finally:
        os.kill(stopped, signal.SIGCONT)
    continued_at = time.time()
    wait_until(lambda: sum(due / 1000 > continued_at for _, due, _ in ticks(r, "tick")) >= 2,
               10, message="two fires after the old leader continued")
    assert psutil.Process(stopped).status() != psutil.STATUS_STOPPED
    assert sched.leader() != leader  # it did not take the lead back
    settle(queue, sched, "tick")
    dues = check_each_due_fired_once(queue, r, "tick", 1000)
    assert len(ticks(r, "tick")) == len(dues)  # no job ran twice either


def test_jobs_of_a_killed_master_come_back_and_complete_elsewhere(
        queue: JobQueue, r: redis.Redis, masters: Masters) -> None:
    procs = masters.start(2)
    k = key()
    job = queue.enqueue(tasks.mark_then_sleep, k, 1.5)
    [first] = wait_until(lambda: runs(r, k), 10, message="the job to start")
    holder = master_of(int(first))
    assert holder in {p.pid for p in procs}
    assert queue.get_status(job.id) == "processing"
    # handed to an idle worker by a producer with the default lease (15 s): leased for the
    # worker's own (1 s), so that it comes back within that when the worker's host dies
    seconds, micros = r.time()
    server_ms = seconds * 1000 + micros // 1000
    assert max(score for _, score in r.zrange("{jobq}:leases", 0, -1, withscores=True)) \
        <= server_ms + CONFIG["lease_time"] * 1000
    killed_at = time.time()
    killed = set(masters.kill(holder))
    assert int(first) in killed

    finished = done(queue, job.id, timeout=20)
    figure(f"job of a SIGKILLed master completed elsewhere {time.time() - killed_at:.3f} s "
           f"after the kill (lease_time {CONFIG['lease_time']} s, job 1.5 s)")
    assert finished.status is JobStatus.COMPLETED and finished.return_value == "slept"
    first_pid, second_pid = (int(p) for p in runs(r, k))
    assert first_pid == int(first) and second_pid not in killed
    assert master_of(second_pid) in {p.pid for p in procs} - {holder}
    # given back once, by the reaper: a delivery not known to have started, then the attempt
    # that completed
    assert (finished.attempts, finished.deliveries) == (1, 2)
    leases = r.zrange("{jobq}:leases", 0, -1)  # worker names: host.master-pid.slot.random
    assert not [w for w in leases if w.rsplit(".", 3)[1] == str(holder)]


# == a broken [[schedule]] table does not stop the scheduler ===================================

@pytest.mark.parametrize("table", [
    'task = "jobq_testtasks:noop"\ninterval = 0.3\nmax_retries = -1',
    'task = "jobq_testtasks:noop"\nat = "tomorrow"',
])
def test_a_bad_config_schedule_is_refused_and_the_scheduler_keeps_promoting(
        queue: JobQueue, masters: Masters, spawn: Spawn, table: str) -> None:
    bad = f'\n[[schedule]]\nname = "bad"\n{table}\n'
    # at start: the master refuses the file, naming the schedule
    refused = spawn("-w", "1", "-I", "jobq_testtasks", "--config", str(masters.config(bad)),
                    module="jobq.cli.master")
    _, err = refused.communicate(timeout=20)
    assert refused.returncode == 2 and "schedule 'bad'" in err, err

    # on reload (HUP): the master refuses the reload, as it refused the start, and the
    # scheduler goes on promoting
    [master] = masters.start(1)
    path = masters.tmp_path / f"jobq-{len(masters.procs) - 1}.toml"
    path.write_text(path.read_text() + bad)
    os.kill(master.pid, signal.SIGHUP)
    wait_until(lambda: "reload refused" in masters.log() and "schedule 'bad'" in masters.log(),
               10, message="the master to refuse the reload")
    job = queue.enqueue(tasks.noop, delay=0.3)
    assert done(queue, job.id).status is JobStatus.COMPLETED
    assert Scheduler(queue).get("bad") is None
    assert "Traceback" not in masters.log() and master.poll() is None


def test_config_schedules_fire_from_a_master(
        queue: JobQueue, r: redis.Redis, masters: Masters) -> None:
    masters.start(1, extra='\n[[schedule]]\nname = "cfg"\ntask = "jobq_testtasks:record_job_id"'
                           '\nargs = ["cfg"]\ninterval = 0.5\n')
    wait_until(lambda: len(runs(r, "cfg")) >= 3, 10, message="three fires of a config schedule")
    d = Scheduler(queue).get("cfg")
    assert d is not None and d.source == "config" and d.start is None
    dues = sorted(due for _, due, _ in ticks(r, "cfg"))
    assert {b - a for a, b in zip(dues, dues[1:], strict=False)} == {500}  # no drift
    assert next_fire(d, dues[-1] / 1000) == (dues[-1] + 500) / 1000
