"""Real ``jobq worker`` processes: running jobs, failures, time limits, signals, lost workers;
and a worker run in this process where the test must see what it had done at one moment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import jobq_testtasks as tasks
import pytest
import redis
from conftest import Valkey, run_in_this_process, subprocess_env, wait_until

from jobq.config import Config
from jobq.job import Job, JobStatus
from jobq.process import BlockingCall
from jobq.queue import JobQueue
from jobq.registry import TaskResolver
from jobq.slots import IDLE, Slot, SlotTable
from jobq.worker import Worker

Spawn = Callable[..., subprocess.Popen[str]]


def start_worker(spawn: Spawn, *args: str, config: Path | None = None) -> subprocess.Popen[str]:
    env = subprocess_env(JOBQ_CONFIG=str(config)) if config else None
    return spawn("worker", "-I", "jobq_testtasks", *args, env=env)


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str]:
    """Wait for the process to exit; its exit code and stderr."""
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def burst(spawn: Spawn, *args: str, config: Path | None = None) -> str:
    code, err = finish(start_worker(spawn, "--burst", *args, config=config))
    assert code == 0, err
    return err


def get(queue: JobQueue, job_id: str) -> Job:
    job = queue.get_job(job_id)
    assert job is not None, f"job {job_id} is unknown"
    return job


def write_config(tmp_path: Path, **values: float) -> Path:
    path = tmp_path / "jobq.toml"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in values.items()))
    return path


def runs(r: redis.Redis, key: str) -> list[str]:
    return r.lrange(f"test:{key}", 0, -1)


def key() -> str:
    return uuid.uuid4().hex[:12]


# -- running jobs ------------------------------------------------------------------------------

def test_burst_worker_drains_the_queues_in_order_and_exits_0(queue: JobQueue, r: redis.Redis,
                                                              spawn: Spawn) -> None:
    high = JobQueue("high", queue.url)
    order = key()
    # enqueued worst first: the worker must reorder them
    for i, prio in enumerate([5, 0, -5, 0, 5]):
        queue.enqueue(tasks.record, order, f"default:{prio}:{i}", priority=prio)
    for i, prio in enumerate([9, 1, 1]):
        high.enqueue(tasks.record, order, f"high:{prio}:{i}", priority=prio)
    expected = ["high:1:1", "high:1:2", "high:9:0",
                "default:-5:2", "default:0:1", "default:0:3", "default:5:0", "default:5:4"]
    add = queue.enqueue(tasks.add, 2, 40)
    echo = queue.enqueue(tasks.echo, 1, [2], kwargs={"x": {"y": None}})
    reg = queue.enqueue(tasks.registered, 21)

    burst(spawn, "-q", "high,default")

    assert runs(r, order) == expected
    assert get(queue, add.id).return_value == 42
    assert get(queue, echo.id).return_value == {"args": [1, [2]], "kwargs": {"x": {"y": None}}}
    assert get(queue, reg.id).return_value == 42
    done = get(queue, add.id)
    assert done.status is JobStatus.COMPLETED
    assert done.started_at is not None and done.completed_at is not None
    assert done.started_at <= done.completed_at
    assert done.worker
    assert queue.size() == high.size() == 0
    stats = queue.get_stats()
    assert (stats["completed"], stats["processing"], stats["failed"]) == (8, 0, 0)
    assert high.get_stats()["completed"] == 3
    assert not r.keys(queue.keys.held("*"))  # no worker holds anything
    assert r.hlen(queue.keys.jobs) == 0  # finished jobs live on only as final records
    assert r.keys(f"{queue.keys.base}:held:*") == []
    assert set(r.lrange(queue.keys.recent("default"), 0, -1)) >= {add.id, echo.id, reg.id}


def test_burst_worker_on_empty_queues_exits_0(redis_url: str, spawn: Spawn) -> None:
    err = burst(spawn, "-q", "high,default")
    assert "stopped after 0 job(s)" in err


def test_failing_job_is_retried_then_failed(queue: JobQueue, r: redis.Redis,
                                            spawn: Spawn, tmp_path: Path) -> None:
    job = queue.enqueue(tasks.boom, "kaput", max_retries=2)
    burst(spawn, config=write_config(tmp_path, retry_backoff_base=0.0))
    failed = get(queue, job.id)
    assert failed.status is JobStatus.FAILED
    assert (failed.attempts, failed.retries, failed.deliveries) == (3, 2, 3)
    assert failed.error == "ValueError: kaput"
    assert len(failed.errors) == 3
    for entry in failed.errors:
        assert entry["type"] == "ValueError"
        assert entry["msg"] == "kaput"
        assert "Traceback" in entry["tb"] and "raise ValueError(message)" in entry["tb"]
    assert failed.traceback and "raise ValueError(message)" in failed.traceback
    assert r.zscore(queue.keys.dlq("default"), job.id) is not None
    stats = queue.get_stats()
    assert (stats["failed"], stats["retried"], stats["completed"], stats["pending"]) == (
        1, 2, 0, 0)


def test_current_job_says_which_attempt_runs_as_the_record_does(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    k = key()
    job = queue.enqueue(tasks.record_attempt, k, 2, max_retries=3, queue="q1")
    config = write_config(tmp_path, retry_backoff_base=0.0)
    burst(spawn, "-q", "q1", config=config)
    seen = [json.loads(x) for x in runs(r, k)]
    assert [(s["attempt"], s["retries"], s["deliveries"], s["requeues"]) for s in seen] == [
        (1, 0, 1, 0), (2, 1, 2, 0), (3, 2, 3, 0)]
    # the record read while the attempt runs counts it, as the job does
    assert [s["record"] for s in seen] == [[1, 0, 1], [2, 1, 2], [3, 2, 3]]
    assert {(s["id"], s["task"], s["queue"], s["max_retries"]) for s in seen} == {
        (job.id, "jobq_testtasks:record_attempt", "q1", 3)}
    done = get(queue, job.id)
    assert (done.status, done.attempts, done.retries) == (JobStatus.COMPLETED, 3, 2)

    # after a requeue the attempts count from 1 again, and the requeue is counted
    assert queue.requeue(job.id)
    burst(spawn, "-q", "q1", config=config)
    last = json.loads(runs(r, k)[-1])
    assert (last["attempt"], last["retries"], last["deliveries"], last["requeues"]) == (
        1, 0, 1, 1)


def test_refused_task_never_runs(queue: JobQueue, r: redis.Redis, spawn: Spawn,
                                 tmp_path: Path) -> None:
    target = tmp_path / f"pwned-{key()}"
    shell = queue.enqueue("os:system", f"touch {target}")
    evil = queue.enqueue("builtins:eval", f"__import__('os').system('touch {target}')")
    private = queue.enqueue("jobq_testtasks:_private")
    imported = queue.enqueue("jobq_testtasks:connect", "redis://localhost")
    control = queue.enqueue(tasks.record, "control", "ran")  # proves the worker ran jobs
    burst(spawn)
    assert runs(r, "control") == ["ran"]
    assert get(queue, control.id).status is JobStatus.COMPLETED
    assert not target.exists()
    for job in (shell, evil, private, imported):
        refused = get(queue, job.id)
        assert refused.status is JobStatus.FAILED
        assert refused.error is not None
        assert refused.error.startswith("TaskNotAllowed: ")
        assert "not allowed" in refused.error
        assert (refused.attempts, refused.retries) == (1, 0)  # never retried
        assert r.zscore(queue.keys.dlq("default"), job.id) is not None
    assert "module 'os' is not among this worker's imports" in get(queue, shell.id).error
    assert "private names never run" in get(queue, private.id).error


def test_wrong_arguments_fail_without_retries(queue: JobQueue, spawn: Spawn,
                                              tmp_path: Path) -> None:
    missing = queue.enqueue(tasks.add, 1)
    extra = queue.enqueue(tasks.add, 1, 2, kwargs={"c": 3})
    # a TypeError raised inside the task is an ordinary failure: it is retried
    inside = queue.enqueue(tasks.add, 1, "x", max_retries=1)
    burst(spawn, config=write_config(tmp_path, retry_backoff_base=0.0))
    for job in (missing, extra):
        failed = get(queue, job.id)
        assert failed.status is JobStatus.FAILED
        assert (failed.attempts, failed.retries) == (1, 0)
        assert failed.error is not None and failed.error.startswith("TypeError: add()")
    failed = get(queue, inside.id)
    assert failed.status is JobStatus.FAILED
    assert (failed.attempts, failed.retries) == (2, 1)


def test_unserializable_result_fails_clearly(queue: JobQueue, spawn: Spawn) -> None:
    job = queue.enqueue(tasks.unserializable)
    burst(spawn)
    failed = get(queue, job.id)
    assert failed.status is JobStatus.FAILED
    assert (failed.attempts, failed.retries) == (1, 0)
    assert failed.error is not None
    assert failed.error.startswith("SerializationError: the task returned a object, which JSON "
                                   "cannot carry")


def test_timeout_interrupts_the_job(queue: JobQueue, r: redis.Redis, spawn: Spawn) -> None:
    k = key()
    job = queue.enqueue(tasks.spin, 5, k, timeout=0.3, max_retries=0)
    after = queue.enqueue(tasks.add, 1, 1)
    burst(spawn)
    assert runs(r, k) == ["JobTimeout"]  # raised inside the job, which could clean up
    failed = get(queue, job.id)
    assert failed.status is JobStatus.FAILED
    assert failed.error == "JobTimeout: job exceeded its time limit of 0.3 s"
    assert failed.final_error["type"] == "JobTimeout"
    assert "spin" in (failed.traceback or "")
    # the timer is off again: the next job runs normally
    assert get(queue, after.id).return_value == 2


def test_each_job_of_a_batch_runs_under_its_own_time_limit(
        queue: JobQueue, r: redis.Redis, spawn: Spawn) -> None:
    """Each job's limit is its own: a quick job's short one does not cut the longer job
    after it (whose sleep outlasts it), nor does that long one spare the short one after."""
    k = key()
    first = queue.enqueue(tasks.add, 1, 1, timeout=0.3)
    past = queue.enqueue(tasks.sleep, 1.0, timeout=60)
    short = queue.enqueue(tasks.spin, 30, k, timeout=0.5, max_retries=0)
    burst(spawn)
    assert get(queue, first.id).return_value == 2
    done = get(queue, past.id)
    assert (done.status, done.return_value) == (JobStatus.COMPLETED, 1.0)
    assert runs(r, k) == ["JobTimeout"]
    failed = get(queue, short.id)
    assert failed.status is JobStatus.FAILED
    assert failed.error == "JobTimeout: job exceeded its time limit of 0.5 s"


# -- signals and lost workers ------------------------------------------------------------------

def test_sigterm_stops_after_the_current_job(queue: JobQueue, r: redis.Redis,
                                             spawn: Spawn) -> None:
    k, gate = key(), key()
    proc = start_worker(spawn)
    job = queue.enqueue(tasks.mark_then_wait, k, gate)
    wait_until(lambda: runs(r, k), message="the job to start")
    assert runs(r, k) == [str(proc.pid)]
    behind = queue.enqueue(tasks.record, "behind", "ran")
    os.kill(proc.pid, signal.SIGTERM)
    r.rpush(f"test:{gate}", "go")  # the job ends only now, after the signal
    code, err = finish(proc)
    assert code == 0, err
    done = get(queue, job.id)
    assert done.status is JobStatus.COMPLETED
    assert done.return_value == "released"
    # the job behind it was not started, and nothing is left held by the stopped worker
    assert r.exists("test:behind") == 0
    assert queue.get_status(behind.id) == "pending"
    assert not r.keys(queue.keys.held("*"))  # no worker holds anything
    assert queue.get_stats()["processing"] == 0


def test_sigterm_of_an_idle_worker(redis_url: str, spawn: Spawn, r: redis.Redis) -> None:
    proc = start_worker(spawn)
    wait_until(lambda: any(c.get("cmd") == "blpop" for c in r.client_list()),
               message="the worker to idle")
    os.kill(proc.pid, signal.SIGTERM)
    code, err = finish(proc)
    assert code == 0, err
    assert "Traceback" not in err
    assert "stopped after 0 job(s)" in err


def test_killed_worker_job_is_redelivered(queue: JobQueue, r: redis.Redis, spawn: Spawn,
                                          tmp_path: Path) -> None:
    config = write_config(tmp_path, lease_time=1.0)
    k = key()
    job = queue.enqueue(tasks.mark_first_run_hangs, k, 60)
    first = start_worker(spawn, config=config)
    wait_until(lambda: runs(r, k), message="the first run to start")
    assert runs(r, k) == [str(first.pid)]  # the job runs in the worker process itself
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(timeout=10) == -signal.SIGKILL
    assert queue.get_status(job.id) == "processing"  # held by a dead worker, until...

    second = start_worker(spawn, config=config)
    wait_until(lambda: queue.get_status(job.id) == "completed", timeout=20,
               message="the job to be redelivered and complete")
    assert runs(r, k) == [str(first.pid), str(second.pid)]
    done = get(queue, job.id)
    assert done.return_value == "run 2"
    # its lease lapsed: no one knew the first run had started, so that one is a delivery
    # and not an attempt
    assert (done.attempts, done.retries, done.deliveries) == (1, 0, 2)
    assert queue.get_stats()["retried"] == 1
    assert queue.get_stats()["completed"] == 1
    # the dead worker's lease is gone with what it held
    assert not [w for w in r.zrange(queue.keys.leases, 0, -1) if f".{first.pid}." in w]
    assert r.keys(f"{queue.keys.base}:held:*.{first.pid}.*") == []
    assert second.poll() is None  # the second worker carries on


def test_poison_job_fails_after_max_deliveries(queue: JobQueue, r: redis.Redis, spawn: Spawn,
                                               tmp_path: Path) -> None:
    config = write_config(tmp_path, lease_time=1.0, max_deliveries=2)
    k = key()
    job = queue.enqueue(tasks.mark_then_sleep, k, 60, max_retries=100)
    pids = []
    for run in (1, 2):
        proc = start_worker(spawn, config=config)
        wait_until(lambda n=run: len(runs(r, k)) == n, timeout=20, message=f"run {run} to start")
        assert runs(r, k)[-1] == str(proc.pid)
        pids.append(str(proc.pid))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    start_worker(spawn, config=config)  # reaps the second lease, and must not run the job
    wait_until(lambda: queue.get_status(job.id) == "failed", timeout=20,
               message="the poison job to fail")
    failed = get(queue, job.id)
    assert failed.error is not None and "poison" in failed.error
    assert failed.final_error["type"] == "WorkerLost"
    # both holders vanished with their lease: two deliveries, neither known to have started
    assert (failed.attempts, failed.deliveries) == (0, 2)
    assert runs(r, k) == pids  # never a third run
    assert r.zscore(queue.keys.dlq("default"), job.id) is not None
    stats = queue.get_stats()
    assert (stats["failed"], stats["pending"], stats["processing"]) == (1, 0, 0)


# -- a fresh worker's first costs --------------------------------------------------------------

def test_a_worker_warms_up_before_its_slot_says_it_is_ready(
        config: Config, redis_url: str, r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The master reports its pool ready (READY=1) when every slot says idle or busy: by the
    first time a worker's slot says so, the worker has made its connections to the server,
    learned the epoch and announced its tasks, so that the first job handed to it pays none
    of that (seen when the slot first says so, then the worker is stopped)."""
    table = SlotTable(1)
    slot = table.slot(0)
    slot.boot(os.getpid())
    worker = Worker(["default"], config=config, url=redis_url,
                    resolver=TaskResolver(["jobq_testtasks"]), slot=slot, renew_leases=False,
                    announcer="host.1")
    r.ping()
    clients_before = len(r.client_list())
    seen: list[dict[str, object]] = []

    def first_ready(what: str) -> None:
        if not seen:
            seen.append({"as": what, "state": table.read(0).state, "epoch": worker._epoch,
                         "announced": r.exists(worker.keys.tasks("host.1")),
                         "connections": len(r.client_list()) - clients_before})
            worker.stop()  # its wait then returns at once: the loop ends

    idle, begin = Slot.idle, Slot.begin
    monkeypatch.setattr(Slot, "idle", lambda self: (idle(self), first_ready("idle"))[0])
    monkeypatch.setattr(Slot, "begin", lambda self, *a: (begin(self, *a), first_ready("busy"))[0])
    assert run_in_this_process(worker) == 0

    assert seen == [{"as": "idle", "state": IDLE, "epoch": r.get(worker.keys.epoch),
                     "announced": 1, "connections": 2}]


def test_a_stop_signal_as_the_wait_returns_is_never_raised_into_the_loop() -> None:
    """The worker's TERM handler interrupts its blocking wait by raising inside it. A signal
    that lands as the wait returns (between two bytecodes, where Python runs handlers) must
    end it as quietly as one that lands during it: it used to escape from the context
    manager's ``__exit__`` and crash a stopping worker. Signals are fired every 20 µs at a
    call that returns at once, so they land at every point of the span."""
    ends = {"result": 0, "interrupted": 0}
    cleanups: list[None] = []
    waiting = BlockingCall(on_interrupt=lambda: cleanups.append(None))

    def on_signal(signum: int, frame: object) -> None:
        waiting.interrupt()

    old = signal.signal(signal.SIGALRM, on_signal)
    signal.setitimer(signal.ITIMER_REAL, 0.00002, 0.00002)
    try:
        for i in range(50_000):
            got = waiting.call(lambda n: n + 1, i)
            ends["result" if got == i + 1 else "interrupted"] += 1
            assert not waiting.active
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert ends["interrupted"] == len(cleanups) > 0
    assert ends["result"] > 0


def test_a_wait_that_failed_closes_its_window() -> None:
    """A blocking wait that fails (the server was lost: a failover, a restart) must close the
    span in which a signal raises: left open, the TERM that came next raised Interrupted in
    the scheduler's back-off nap, and the scheduler crashed as it stopped."""
    waiting = BlockingCall(on_interrupt=lambda: None)

    def lost() -> None:
        raise redis.ConnectionError("Connection closed by server.")

    with pytest.raises(redis.ConnectionError):
        waiting.call(lost)
    assert not waiting.active
    waiting.interrupt()  # a TERM now: nothing is raised, the loop sees its flag


@pytest.mark.parametrize("msetex", [True, False], ids=["msetex", "one-set-each"])
def test_results_are_kept_with_their_ttl_with_or_without_msetex(
        msetex: bool, config: Config, tmp_path: Path, valkeys: list[Valkey]) -> None:
    """ack.lua keeps the final records of a batch with one MSETEX (Valkey 9, Redis 8.4); a
    server without that command (here: renamed away, as on an older server) gets one SET
    each. Both ways every record is there, with its own ttl, and the failed ones too."""
    extra = () if msetex else ("--rename-command", "MSETEX", "")
    server = Valkey(tmp_path / "v", None, *extra).start()
    valkeys.append(server)
    q = JobQueue("default", redis_url=server.url, config=config)
    ok = q.enqueue_many(tasks.add, [(i, 1) for i in range(200)], result_ttl=300)
    short = q.enqueue_many(tasks.add, [(i, 2) for i in range(30)], result_ttl=60)
    failed = q.enqueue(tasks.boom, "on purpose", max_retries=0)
    worker = Worker(["default"], config=config, url=server.url,
                    resolver=TaskResolver(["jobq_testtasks"]), burst=True, renew_leases=False)
    assert run_in_this_process(worker) == 0

    assert [j.result(timeout=0) for j in ok] == [i + 1 for i in range(200)]
    assert [j.result(timeout=0) for j in short] == [i + 2 for i in range(30)]
    assert get(q, failed.id).status == JobStatus.FAILED
    ttls = {j.id: q.redis.ttl(q.keys.result(j.id)) for j in [*ok, *short]}
    assert all(250 < ttls[j.id] <= 300 for j in ok) and all(0 < ttls[j.id] <= 60 for j in short)
    calls = q.redis.info("commandstats")
    assert ("cmdstat_msetex" in calls) == msetex
