"""Deleting a queue and everything in it (``JobQueue.delete``, delete_queue.lua), against a
real server, with a real worker process holding one of its jobs."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import jobq_testtasks as tasks
import redis
from conftest import subprocess_env, wait_until

from jobq.job import Job, JobStatus
from jobq.keys import Keys
from jobq.queue import JobQueue

Spawn = Callable[..., subprocess.Popen[str]]
KEYS = Keys()


def key() -> str:
    return uuid.uuid4().hex[:12]


def status(queue: JobQueue, job: Job, *statuses: JobStatus, timeout: float = 20) -> None:
    wait_until(lambda: queue.get_status(job.id) in {s.value for s in statuses}, timeout,
               message=f"job {job.id} to be {statuses}")


def test_delete_takes_every_job_of_the_queue_and_leaves_other_queues_whole(
        redis_url: str, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    doomed = JobQueue("doomed", redis_url=redis_url)
    other = JobQueue("other", redis_url=redis_url)
    config = tmp_path / "jobq.toml"  # a failing job waits an hour for its retry
    config.write_text("retry_backoff_base = 3600.0\nretry_backoff_cap = 3600.0\n"
                      "retry_jitter = 0.0\nlease_time = 2.0\n")
    worker = spawn("worker", "-I", "jobq_testtasks", "-q", "doomed",
                   env=subprocess_env(JOBQ_CONFIG=str(config)))

    # what the worker leaves: a dead-letter job, a completed one, one retrying in an hour
    dead = doomed.enqueue(tasks.boom, max_retries=0)
    done = doomed.enqueue(tasks.add, 1, 2)
    retrying = doomed.enqueue(tasks.boom, max_retries=2)
    status(doomed, dead, JobStatus.FAILED)
    status(doomed, done, JobStatus.COMPLETED)
    status(doomed, retrying, JobStatus.RETRY)
    # then a job it runs (it is its only worker: the jobs below wait)
    k = key()
    running = doomed.enqueue(tasks.sleep_until_cancelled, k, 60)
    wait_until(lambda: r.lrange(f"test:{k}", 0, -1) == ["started"], 20,
               message="the job to start")
    pending = [doomed.enqueue(tasks.noop), doomed.enqueue(tasks.noop, priority=-1)]
    tombstone = doomed.enqueue(tasks.noop)
    assert doomed.cancel(tombstone.id)  # its id stays in the list, marked by its record
    routed = Job("jobq_testtasks:noop")  # a job of a script's pool: on the route doomed~...
    routed.owner = "host:1234"
    doomed.enqueue(routed)
    delayed = doomed.enqueue(tasks.noop, delay=3600)
    child = doomed.enqueue(tasks.noop, depends_on=[running])  # deferred, in the queue
    group = doomed.map(tasks.square, [1, 2, 3])
    # other queues: one depends on a deleted job, one of them runs anyway; one is unrelated
    cancelled_child = other.enqueue(tasks.noop, depends_on=[pending[0]])
    running_child = other.enqueue(tasks.noop, depends_on=[pending[0]], on_parent_failure="run")
    unrelated = other.enqueue(tasks.add, 2, 2)
    other_delayed = other.enqueue(tasks.noop, delay=3600)
    doomed.suspend()

    deleted = doomed.delete()

    assert deleted == {"running": 1, "pending": 3 + 3, "scheduled": 2, "deferred": 1,
                       "dead": 1}
    # the running job was interrupted; what it said was dropped, and its cancel request too
    wait_until(lambda: r.lrange(f"test:{k}", 0, -1) == ["started", "JobCancelled"], 20,
               message="the running job to be interrupted")
    wait_until(lambda: r.hlen(KEYS.cancel) == 0, 20, message="the worker's late outcome")
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    # nothing of the queue is left: no job, no record, no key
    for job in (dead, done, retrying, running, *pending, tombstone, routed, delayed, child):
        assert doomed.get_job(job.id) is None, job
    assert [k for k in r.keys() if "doomed" in k] == []
    assert "doomed" not in doomed.queues() and not doomed.exists()
    assert not r.sismember(KEYS.suspended, "doomed")
    assert set(r.hkeys(KEYS.jobs)) == {running_child.id, unrelated.id, other_delayed.id}
    assert r.hlen(KEYS.state) == 0 and r.hlen(KEYS.deps) == 0
    assert not any(r.hlen(k) for k in r.keys(KEYS.held("*")))  # no worker holds anything
    assert r.zrange(KEYS.scheduled, 0, -1) == [other_delayed.id]
    # its dependents elsewhere were settled as if it had failed; its group counts it failed
    assert other.get_status(cancelled_child.id) == "cancelled"
    assert "did not complete" in other.get_job(cancelled_child.id).error
    assert other.get_status(running_child.id) == "pending"
    assert other.get_status(unrelated.id) == "pending"
    stats = other.get_stats()
    assert (stats["pending"], stats["scheduled"], stats["cancelled"]) == (2, 1, 1)
    assert group.progress().failed == 3
    # the name starts afresh
    again = doomed.enqueue(tasks.noop)
    stats = doomed.get_stats()
    assert (stats["enqueued"], stats["pending"], stats["failed"]) == (1, 1, 0)
    assert doomed.failed_count() == 0 and not doomed.suspended
    assert doomed.get_status(again.id) == "pending"


def test_delete_goes_through_a_large_queue_in_batches(redis_url: str, r: redis.Redis) -> None:
    doomed = JobQueue("doomed", redis_url=redis_url)
    other = JobQueue("other", redis_url=redis_url)
    doomed.enqueue_many(tasks.add, [(i, i) for i in range(2500)])
    doomed.enqueue_many(tasks.add, [(i, i) for i in range(700)], priority=-1)
    doomed.enqueue_many(tasks.add, [(i, i) for i in range(1200)], delay=3600)
    kept = other.enqueue_many(tasks.add, [(i, i) for i in range(1300)], delay=3600)
    kept += other.enqueue_many(tasks.add, [(i, i) for i in range(10)])

    deleted = doomed.delete()

    assert deleted == {"running": 0, "pending": 3200, "scheduled": 1200, "deferred": 0,
                       "dead": 0}
    assert set(r.hkeys(KEYS.jobs)) == {j.id for j in kept}
    assert r.zcard(KEYS.scheduled) == 1300
    assert [k for k in r.keys() if "doomed" in k] == []
    stats = other.get_stats()
    assert (stats["pending"], stats["scheduled"], stats["enqueued"]) == (10, 1300, 1310)


def test_jobs_enqueued_while_a_queue_is_deleted_are_gone_or_whole(
        redis_url: str, r: redis.Redis) -> None:
    """A producer keeps enqueueing (now and later) while the queue is deleted: each of its
    jobs is deleted, or belongs whole to the queue of that name that starts afresh; the
    counters of that queue say exactly what it holds."""
    doomed = JobQueue("doomed", redis_url=redis_url)
    doomed.enqueue_many(tasks.add, [(i, i) for i in range(3000)])
    doomed.enqueue_many(tasks.add, [(i, i) for i in range(3000)], delay=3600)
    stop = threading.Event()
    sent: list[str] = []

    def produce() -> None:
        producer = JobQueue("doomed", redis_url=redis_url)
        i = 0
        while not stop.is_set():
            i += 1
            sent.append(producer.enqueue(tasks.noop, delay=3600 if i % 2 else 0).id)

    thread = threading.Thread(target=produce)
    thread.start()
    wait_until(lambda: len(sent) >= 20, message="the producer to run")
    try:
        doomed.delete()
    finally:
        stop.set()
        thread.join(timeout=20)

    live = [i for i in sent if r.hexists(KEYS.jobs, i)]
    scheduled = [i for i in live if r.zscore(KEYS.scheduled, i) is not None]
    pending = sum(r.llen(k) for k in r.keys(KEYS.levels("doomed") + ":*"))
    stats = doomed.get_stats()
    assert (stats["scheduled"], stats["pending"]) == (len(scheduled), len(live) - len(scheduled))
    assert pending == len(live) - len(scheduled)
    assert stats["enqueued"] == len(live)
    assert r.hlen(KEYS.jobs) == len(live)  # nothing of the 6,000 older jobs is left
