"""The producer API (JobQueue) and the claim order, against a real server."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

import jobq_testtasks as tasks
import pytest
import redis
from conftest import wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobq import job as jobs
from jobq.config import Config
from jobq.exceptions import JobFailed, PayloadTooLarge, SerializationError, TaskNotAllowed
from jobq.groups import Progress
from jobq.job import Job, JobStatus
from jobq.queue import REPLY_SPIN, SPIN_WITHIN, JobQueue
from jobq.registry import TaskResolver
from jobq.settle import Failed, RetryPolicy, settle
from jobq.wire import AckEntry, Spec
from jobq.worker import Worker

Spawn = Callable[..., subprocess.Popen[str]]


def run_worker(config: Config, url: str, queues: tuple[str, ...] = ("default",)) -> Worker:
    """Run a burst Worker in this process; put back the signal handlers it replaces
    (pytest-timeout's SIGALRM among them)."""
    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGUSR1)
    saved = {s: signal.getsignal(s) for s in signums}
    timer = signal.getitimer(signal.ITIMER_REAL)
    try:
        worker = Worker(list(queues), config=config, url=url,
                        resolver=TaskResolver(["jobq_testtasks"]), burst=True)
        worker.run()
        return worker
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        if timer[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, *timer)


def burst_worker(spawn: Spawn, *queues: str) -> subprocess.Popen[str]:
    args = ["worker", "-I", "jobq_testtasks", "--burst"]
    if queues:
        args += ["-q", ",".join(queues)]
    return spawn(*args)


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> int:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return proc.returncode


def claim(queue: JobQueue, count: int, *queues: str, worker: str = "w1") -> list[str]:
    claimed = queue.broker.exchange(worker, [], queues or ("default",), count).claimed
    return [job_id for job_id, _, _, _ in claimed]


# -- enqueue and read back ---------------------------------------------------------------------

def test_enqueue_writes_the_job(queue: JobQueue, r: redis.Redis) -> None:
    job = queue.enqueue(tasks.add, 1, 2)
    k = queue.keys
    assert json.loads(r.hget(k.jobs, job.id))["a"] == [1, 2]
    assert r.lrange(k.level("default", 0), 0, -1) == [job.id]
    assert r.zrange(k.levels("default"), 0, -1, withscores=True) == [("0", 0.0)]
    assert r.smembers(k.queues) == {"default"}
    assert r.llen(k.wake("default")) == 1
    assert job.queue == "default"
    assert queue.size() == len(queue) == 1


def test_get_job_and_status(queue: JobQueue) -> None:
    job = queue.enqueue(tasks.echo, 1, "x", kwargs={"k": [True]}, priority=4, max_retries=1,
                        timeout=9)
    got = queue.get_job(job.id)
    assert got is not None
    assert (got.id, got.task, got.args, got.kwargs) == (
        job.id, "jobq_testtasks:echo", (1, "x"), {"k": [True]})
    assert (got.priority, got.max_retries, got.timeout, got.queue) == (4, 1, 9.0, "default")
    assert got.status is JobStatus.PENDING
    assert queue.get_status(job.id) == "pending"
    assert job.get_status() is JobStatus.PENDING


def test_unknown_job(queue: JobQueue) -> None:
    assert queue.get_job("nope") is None
    assert queue.get_status("nope") is None


def test_status_of_a_claimed_job_is_processing(queue: JobQueue) -> None:
    job = queue.enqueue(tasks.noop)
    assert claim(queue, 1) == [job.id]
    assert queue.get_status(job.id) == "processing"


def test_get_stats(queue: JobQueue) -> None:
    for _ in range(3):
        queue.enqueue(tasks.noop)
    queue.enqueue(tasks.noop, queue="other")
    stats = queue.get_stats()
    assert stats["pending"] == stats["enqueued"] == 3
    for name in ("processing", "scheduled", "deferred", "completed", "failed", "cancelled",
                 "retried", "retry"):
        assert stats[name] == 0, name
    claim(queue, 2)
    stats = queue.get_stats()
    assert (stats["pending"], stats["processing"]) == (1, 2)
    assert queue.size() == 1
    assert JobQueue("other", queue.url).size() == 1


def test_enqueue_job_object(queue: JobQueue, r: redis.Redis) -> None:
    job = Job(tasks.add, (1, 2), priority=-2, id="given-id")
    assert queue.enqueue(job) is job
    assert job.queue == "default"
    assert r.lrange(queue.keys.level("default", -2), 0, -1) == ["given-id"]


def test_enqueue_function_with_args_kwargs_and_options(queue: JobQueue, r: redis.Redis) -> None:
    job = queue.enqueue(tasks.echo, 1, 2, kwargs={"priority": "a task kwarg"}, priority=5,
                        queue="high", result_ttl=7, timeout=3, max_retries=0)
    spec = json.loads(r.hget(queue.keys.jobs, job.id))
    assert spec["a"] == [1, 2]
    assert spec["k"] == {"priority": "a task kwarg"}
    assert (spec["p"], spec["q"], spec["ttl"], spec["to"], spec["r"]) == (5, "high", 7, 3, 0)
    assert r.lrange(queue.keys.level("high", 5), 0, -1) == [job.id]


def test_enqueue_by_name(queue: JobQueue) -> None:
    job = queue.enqueue("jobq_testtasks:add", 1, 2)
    assert queue.get_job(job.id).task == "jobq_testtasks:add"  # type: ignore[union-attr]


def test_registered_task_options_apply(queue: JobQueue, r: redis.Redis) -> None:
    job = queue.enqueue(tasks.registered.options(priority=3), 1)
    assert r.lrange(queue.keys.level("default", 3), 0, -1) == [job.id]


def test_unknown_option_is_a_type_error(queue: JobQueue, r: redis.Redis) -> None:
    with pytest.raises(TypeError, match="unknown job option.*retries"):
        queue.enqueue(tasks.add, 1, 2, retries=3)
    with pytest.raises(TypeError, match="pass arguments and options to Job"):
        queue.enqueue(Job(tasks.add, (1, 2)), priority=1)
    assert r.dbsize() == 0


def test_an_unknown_option_points_at_kwargs_or_at_the_option_it_misspells(
        queue: JobQueue, r: redis.Redis) -> None:
    with pytest.raises(TypeError) as err:
        queue.enqueue(tasks.echo, 5, limit=1)
    assert str(err.value) == (
        "unknown job option(s): limit: did you mean kwargs={'limit': 1}? (a task's keyword "
        "arguments go in kwargs=, the other keywords are job options)")
    with pytest.raises(TypeError) as err:
        queue.enqueue(tasks.echo, 5, priorty=1)
    assert str(err.value) == "unknown job option(s): priorty: did you mean priority?"
    with pytest.raises(TypeError, match=r"did you mean priority \(for priorty\)\? did you mean "
                                        r"kwargs=\{'limit': 1\}\?"):
        queue.enqueue(tasks.echo, 5, limit=1, priorty=1)
    with pytest.raises(TypeError, match=r"kwargs: map and enqueue_many give the task "
                                        r"positional arguments only"):
        queue.map(tasks.echo, [1, 2], kwargs={"limit": 1})
    assert r.dbsize() == 0


def test_a_chunked_map_made_before_groups_counted_items_still_finishes(
        queue: JobQueue, r: redis.Redis, config: Config, redis_url: str) -> None:
    group = queue.map(tasks.square, range(5), chunksize=2)
    r.hdel(queue.keys.group(group.id), "last", "lastn", "done_items", "failed_items")
    old = queue.group(group.id)
    assert old.progress() == Progress(0, 0, 5)
    run_worker(config, redis_url)
    assert old.progress() == Progress(5, 0, 5) and old.progress().finished


@pytest.mark.parametrize("chunksize", [None, 2])
def test_a_map_item_json_cannot_carry_is_named_by_its_index(
        queue: JobQueue, r: redis.Redis, chunksize: int | None) -> None:
    with pytest.raises(SerializationError) as err:
        queue.map(tasks.square, [1, 2, 3, object(), 5], chunksize=chunksize)
    assert str(err.value).startswith("item 3: object is not JSON-serializable")
    assert r.dbsize() == 0


def test_unserializable_argument_writes_nothing(queue: JobQueue, r: redis.Redis) -> None:
    with pytest.raises(SerializationError, match=r"^argument 1: object is not JSON"):
        queue.enqueue(tasks.echo, "fine", object())
    with pytest.raises(SerializationError, match=r"^keyword argument 'when': datetime"):
        queue.enqueue(tasks.echo, kwargs={"when": datetime.now()})
    assert r.keys("*") == []


def test_payload_too_large_writes_nothing(redis_url: str, r: redis.Redis, config: Config) -> None:
    small = JobQueue("default", config=config.replace(max_payload_bytes=200))
    with pytest.raises(PayloadTooLarge):
        small.enqueue(tasks.echo, "x" * 300)
    assert r.keys("*") == []
    small.enqueue(tasks.echo, "x" * 10)
    assert small.size() == 1


def test_bad_queue_names(redis_url: str) -> None:
    for name in ("a b", "a:b", "q\n", ""):
        with pytest.raises(ValueError, match="queue name"):
            JobQueue(name, redis_url)


def test_idempotent_enqueue_by_id(queue: JobQueue, r: redis.Redis) -> None:
    first = queue.enqueue(tasks.add, 1, 2, id="once")
    again = queue.enqueue(tasks.add, 5, 5, id="once")
    assert first.id == again.id == "once"
    assert r.lrange(queue.keys.level("default", 0), 0, -1) == ["once"]
    assert queue.get_job("once").args == (1, 2)  # type: ignore[union-attr]  # never rewritten
    assert queue.get_stats()["enqueued"] == queue.size() == 1
    # nor while it is held by a worker
    claim(queue, 1)
    queue.enqueue(tasks.add, 1, 2, id="once")
    assert r.llen(queue.keys.level("default", 0)) == 0
    assert queue.get_stats()["pending"] == 0


def test_enqueue_many_jobs(queue: JobQueue, r: redis.Redis) -> None:
    jobs = [Job(tasks.add, (i, i), priority=i % 2) for i in range(6)]
    assert queue.enqueue_many(jobs) == jobs
    assert all(j.queue == "default" for j in jobs)
    assert queue.size() == 6
    assert r.lrange(queue.keys.level("default", 0), 0, -1) == [j.id for j in jobs[0::2]]
    assert r.lrange(queue.keys.level("default", 1), 0, -1) == [j.id for j in jobs[1::2]]
    assert queue.get_job(jobs[3].id).args == (3, 3)  # type: ignore[union-attr]


def test_enqueue_many_function_and_arg_list(queue: JobQueue, r: redis.Redis) -> None:
    jobs = queue.enqueue_many(tasks.add, [(1, 2), [3, 4], (5, 6)], priority=-1, max_retries=0)
    assert [j.args for j in jobs] == [(1, 2), (3, 4), (5, 6)]
    assert r.lrange(queue.keys.level("default", -1), 0, -1) == [j.id for j in jobs]
    assert all(json.loads(r.hget(queue.keys.jobs, j.id))["r"] == 0 for j in jobs)


def test_enqueue_many_refuses_options_with_job_objects(queue: JobQueue, r: redis.Redis) -> None:
    with pytest.raises(TypeError, match="job options go on the Job objects"):
        queue.enqueue_many([Job(tasks.noop)], priority=1)
    assert r.dbsize() == 0


def test_enqueue_many_over_several_chunks_writes_nothing_on_a_bad_argument(
        queue: JobQueue, r: redis.Redis) -> None:
    args: list[tuple[Any, ...]] = [(i,) for i in range(1500)]
    args[-1] = (object(),)
    with pytest.raises(SerializationError, match="argument 0: object"):
        queue.enqueue_many(tasks.echo, args)
    assert r.dbsize() == 0
    args[-1] = (1499,)
    jobs = queue.enqueue_many(tasks.echo, args)
    assert queue.size() == 1500
    assert claim(queue, 2000) == [j.id for j in jobs]


def test_main_task_is_refused_at_enqueue(queue: JobQueue, r: redis.Redis,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def script_task() -> None:
        pass

    script_task.__module__ = "__main__"
    script_task.__qualname__ = "script_task"
    monkeypatch.setattr(jobs, "main_tasks_allowed", False)
    with pytest.raises(TaskNotAllowed, match=r"'__main__:script_task' is defined in the "
                                             r"__main__ script.*-I"):
        queue.enqueue(script_task)
    with pytest.raises(TaskNotAllowed):
        queue.enqueue("__main__:script_task")
    with pytest.raises(TaskNotAllowed):
        queue.enqueue_many([Job(script_task)])
    assert r.dbsize() == 0
    monkeypatch.setattr(jobs, "main_tasks_allowed", True)
    assert queue.enqueue(script_task).task == "__main__:script_task"
    monkeypatch.setattr(jobs, "main_tasks_allowed", False)  # its pool ended: refused again
    with pytest.raises(TaskNotAllowed):
        queue.enqueue(script_task)


def test_enqueue_of_a_function_and_arguments_builds_the_job_the_full_path_builds(
        queue: JobQueue, r: redis.Redis) -> None:
    """``enqueue(func, *args)`` builds a function's job once, then fills in each call's id,
    arguments and time (JobQueue._plain): the same job, spec and route as the full path."""
    def without_time(spec: str, job: Job) -> dict[str, Any]:
        fields = json.loads(spec)
        assert fields.pop("c") == round(job.created, 3)
        return fields

    def fields(job: Job) -> dict[str, Any]:
        return {k: v for k, v in job.__dict__.items() if k not in ("id", "created")}

    for task, args in ((tasks.add, (1, 2)), (tasks.echo, ("x", [1], {"a": None})),
                       (tasks.declared, (0.5,)), (tasks.registered, (4,))):
        full = queue._build(task, args, None, {})  # what enqueue did before _plain
        sent = queue._new_job(full)
        first, second = queue.enqueue(task, *args), queue.enqueue(task, *args)
        for job in (first, second):
            assert without_time(r.hget(queue.keys.jobs, job.id), job) == \
                without_time(sent.spec, full)
            assert fields(job) == fields(full)
        assert first.id != second.id and second.created >= first.created
        where = queue.keys.level(sent.queue, sent.priority)
        assert r.lrange(where, -2, -1) == [first.id, second.id]
        # each job has its own lists and dicts
        first.errors.append({"type": "X"})
        first.kwargs["k"] = 1
        assert second.errors == [] and second.kwargs == {}
    assert len(queue._plains) == 4
    # a task that names limits takes the full path (each enqueue makes sure they exist)
    queue.enqueue(tasks.one_at_a_time, "k")
    assert queue._plains[tasks.one_at_a_time] is None


# -- cancel ------------------------------------------------------------------------------------

def test_cancelled_job_never_runs(queue: JobQueue, r: redis.Redis, config: Config,
                                  redis_url: str) -> None:
    doomed = queue.enqueue(tasks.record, "doomed", "ran")
    control = queue.enqueue(tasks.record, "control", "ran")
    assert queue.cancel(doomed.id) is True
    assert queue.get_status(doomed.id) == "cancelled"
    stats = queue.get_stats()
    assert (stats["pending"], stats["cancelled"]) == (1, 1)
    worker = run_worker(config, redis_url)
    assert worker.jobs_done == 1
    assert r.lrange("test:control", 0, -1) == ["ran"]
    assert r.exists("test:doomed") == 0
    assert queue.get_status(doomed.id) == "cancelled"
    assert queue.get_status(control.id) == "completed"
    assert r.llen(queue.keys.level("default", 0)) == 0  # the tombstone was dropped
    stats = queue.get_stats()
    assert (stats["pending"], stats["processing"], stats["completed"]) == (0, 0, 1)


def test_cancel_outcomes(queue: JobQueue) -> None:
    assert queue.cancel("unknown") is False
    held = queue.enqueue(tasks.noop)
    claim(queue, 1)
    # running: its worker is asked to stop it (the master or the lease thread signals it)
    assert queue.cancel_job(held.id) == "interrupting"
    assert queue.get_status(held.id) == "processing"
    assert queue.redis.hexists(queue.keys.cancel, held.id)
    job = queue.enqueue(tasks.noop)
    assert queue.cancel(job.id, reason="changed my mind") is True
    assert queue.cancel(job.id) is False  # already finished
    got = queue.get_job(job.id)
    assert got is not None and got.status is JobStatus.CANCELLED
    assert got.error == "Cancelled: changed my mind"


def test_cancelled_job_result_raises(queue: JobQueue) -> None:
    job = queue.enqueue(tasks.noop)
    queue.cancel(job.id, reason="not today")
    with pytest.raises(JobFailed) as info:
        job.result(timeout=5)
    assert info.value.status == "cancelled"
    assert info.value.exc_type == "Cancelled"
    assert info.value.message == "not today"


def test_cancel_wakes_a_waiter(queue: JobQueue) -> None:
    job = queue.enqueue(tasks.noop)
    outcome: list[bool] = []
    waiter = threading.Thread(target=lambda: outcome.append(queue.wait_for_completion(job.id)),
                              daemon=True)
    waiter.start()
    wait_until(lambda: queue.redis.hget(queue.keys.waiting, job.id) == "1",
               message="the waiter to register")
    queue.cancel(job.id)
    waiter.join(timeout=10)
    assert outcome == [True]
    assert queue.redis.hexists(queue.keys.waiting, job.id) == 0


# -- waiting and results -----------------------------------------------------------------------

def test_wait_for_completion_with_a_worker_process(queue: JobQueue, spawn: Spawn) -> None:
    job = queue.enqueue(tasks.add, 20, 22)
    outcome: list[bool] = []
    # no timeout: only the token pushed by the worker's ack can end this wait
    waiter = threading.Thread(target=lambda: outcome.append(queue.wait_for_completion(job.id)),
                              daemon=True)
    waiter.start()
    wait_until(lambda: queue.redis.hget(queue.keys.waiting, job.id) == "1",
               message="the waiter to register")
    finish(burst_worker(spawn))
    waiter.join(timeout=20)
    assert outcome == [True]
    assert queue.get_status(job.id) == "completed"
    assert queue.get_job(job.id).return_value == 42  # type: ignore[union-attr]
    assert queue.redis.hexists(queue.keys.waiting, job.id) == 0
    assert queue.wait_for_completion(job.id, timeout=1) is True  # already finished


def test_wait_for_completion_times_out(queue: JobQueue) -> None:
    job = queue.enqueue(tasks.noop)
    assert queue.wait_for_completion(job.id, timeout=0.2) is False
    assert queue.redis.hexists(queue.keys.waiting, job.id) == 0  # no registration left behind
    assert queue.get_status(job.id) == "pending"
    assert queue.wait_for_completion("no-such-job", timeout=0.2) is False
    with pytest.raises(TimeoutError):
        job.result(timeout=0.2)


def test_result_value_and_remote_failure(queue: JobQueue, spawn: Spawn) -> None:
    ok = queue.enqueue(tasks.add, 2, 3)
    bad = queue.enqueue(tasks.boom, "kaput", max_retries=0)
    finish(burst_worker(spawn))
    assert ok.result(timeout=20) == 5
    assert ok.status is JobStatus.COMPLETED
    with pytest.raises(JobFailed) as info:
        bad.result(timeout=20)
    exc = info.value
    assert (exc.job_id, exc.exc_type, exc.message, exc.status) == (
        bad.id, "ValueError", "kaput", "failed")
    assert "Traceback" in exc.traceback
    assert "jobq_testtasks.py" in exc.traceback
    assert "raise ValueError(message)" in exc.traceback
    assert str(exc) == f"job {bad.id} failed: ValueError: kaput"
    assert bad.status is JobStatus.FAILED


def test_result_of_a_job_not_enqueued() -> None:
    with pytest.raises(RuntimeError, match="not enqueued"):
        Job(tasks.noop).result()


def test_result_ttl_expiry(queue: JobQueue, r: redis.Redis, config: Config,
                           redis_url: str) -> None:
    short = queue.enqueue(tasks.add, 1, 1, result_ttl=1)
    kept = queue.enqueue(tasks.add, 2, 2)
    run_worker(config, redis_url)
    assert 0 < r.pttl(queue.keys.result(short.id)) <= 1000
    assert r.ttl(queue.keys.result(kept.id)) > 1
    wait_until(lambda: queue.get_job(short.id) is None, timeout=10,
               message="the short-lived record to expire")
    assert queue.get_job(kept.id).return_value == 4  # type: ignore[union-attr]


def test_result_ttl_zero_keeps_nothing(queue: JobQueue, r: redis.Redis, config: Config,
                                       redis_url: str) -> None:
    job = queue.enqueue(tasks.record, "ttl0", "ran", result_ttl=0)
    run_worker(config, redis_url)
    assert r.lrange("test:ttl0", 0, -1) == ["ran"]
    assert queue.get_job(job.id) is None
    assert r.exists(queue.keys.result(job.id)) == 0
    assert queue.get_stats()["completed"] == 1


def test_memory_per_queued_job(queue: JobQueue, r: redis.Redis) -> None:
    before = r.info("memory")["used_memory"]
    queue.enqueue_many(tasks.noop, [()] * 20_000)
    used = r.info("memory")["used_memory"] - before
    assert queue.size() == 20_000
    assert used / 20_000 < 400, f"{used / 20_000:.0f} bytes per queued job"


# -- claim order -------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(priorities=st.lists(st.integers(-3, 3), max_size=40),
       batches=st.lists(st.integers(1, 7), min_size=1, max_size=10))
def test_claim_order_is_priority_then_fifo(queue: JobQueue, priorities: list[int],
                                           batches: list[int]) -> None:
    queue.redis.flushall()
    ids = [queue.enqueue(tasks.noop, priority=p).id for p in priorities]
    expected = [ids[i] for i in sorted(range(len(ids)), key=lambda i: (priorities[i], i))]
    claimed: list[str] = []
    rounds = 0
    while len(claimed) < len(ids):
        got = claim(queue, batches[rounds % len(batches)])
        assert got, "claim returned nothing while jobs were pending"
        assert len(got) <= batches[rounds % len(batches)]
        claimed += got
        rounds += 1
    assert claimed == expected
    assert claim(queue, 5) == []
    assert queue.redis.exists(queue.keys.levels("default")) == 0  # no empty level left behind
    stats = queue.get_stats()
    assert (stats["pending"], stats["processing"]) == (0, len(ids))


Op = tuple[str, Any]


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("enqueue"), st.integers(-3, 3)),
    st.tuples(st.just("many"), st.lists(st.integers(-3, 3), min_size=1, max_size=5)),
    st.tuples(st.just("claim"), st.integers(1, 6)),
), max_size=30))
def test_interleaved_enqueues_and_claims_follow_a_priority_queue(queue: JobQueue,
                                                                 ops: list[Op]) -> None:
    queue.redis.flushall()
    model: list[tuple[int, int, str]] = []  # (priority, enqueue index, id)
    seq = 0
    for op, arg in ops:
        if op == "enqueue":
            model.append((arg, seq, queue.enqueue(tasks.noop, priority=arg).id))
            seq += 1
        elif op == "many":
            for job in queue.enqueue_many([Job(tasks.noop, priority=p) for p in arg]):
                model.append((job.priority, seq, job.id))
                seq += 1
        else:
            model.sort()
            expected = [entry[2] for entry in model[:arg]]
            del model[:arg]
            assert claim(queue, arg) == expected
    model.sort()
    assert claim(queue, 1000) == [entry[2] for entry in model]


def test_strict_priority_between_queues(queue: JobQueue, r: redis.Redis) -> None:
    low = [queue.enqueue(tasks.noop, priority=p) for p in (-9, 0)]
    high = [queue.enqueue(tasks.noop, priority=p, queue="high") for p in (9, 5, 5)]
    # a better priority number in a later queue does not jump ahead of an earlier queue
    assert claim(queue, 2, "high", "default") == [high[1].id, high[2].id]
    assert claim(queue, 3, "high", "default") == [high[0].id, low[0].id, low[1].id]
    assert JobQueue("high", queue.url).get_stats()["processing"] == 3
    assert queue.get_stats()["processing"] == 2
    # the claiming worker's bookkeeping
    held = r.hgetall(queue.keys.held("w1"))
    assert held == {high[0].id: "high", high[1].id: "high", high[2].id: "high",
                    low[0].id: "default", low[1].id: "default"}
    assert {queue.broker.active_holder(j.id) for j in [*high, *low]} == {"w1"}
    # the lease runs from now on the server's clock
    seconds, micros = r.time()
    server_now = seconds * 1000 + micros // 1000
    assert 0 < r.zscore(queue.keys.leases, "w1") - server_now <= queue.config.lease_time * 1000


@pytest.mark.parametrize("lost", ["flushed", "restarted"])
def test_an_ack_and_a_claim_in_one_round_trip_run_in_order_on_a_server_without_the_scripts(
        queue: JobQueue, r: redis.Redis, redis_url: str, lost: str) -> None:
    # a worker acks a retry and claims in one round trip: the claim must find the job the ack
    # put back, even when the server lost ack.lua but holds claim.lua again (its scripts were
    # flushed, or it restarted, and other calls reloaded claim.lua first)
    broker = queue.broker
    job = queue.enqueue(tasks.boom, "x")
    [(job_id, name, spec, state)] = broker.exchange("w1", [], ["default"], 1)[1]
    broker.exchange("w0", ["done", "none", "default", 0, 0, "", ""], ["other"], 1)  # both known
    retry = settle(job_id, name, spec, Spec.decode(spec), state, Failed(ValueError("x"), 1, 2),
                   worker="w1", worker_json='"w1"', policy=RetryPolicy(backoff_base=0.0))
    assert retry.entry.kind == "retry"
    r.script_flush()
    if lost == "flushed":
        broker.exchange("w2", [], ["other"], 1)  # this client finds claim.lua gone, reloads it
    else:  # the connection dropped (a restart); another client reloaded claim.lua meanwhile
        r.client_kill_filter(_type="normal", skipme=True)
        with pytest.raises(redis.ConnectionError):
            broker.exchange("w2", [], ["other"], 1)
        JobQueue("default", redis_url).broker.exchange("w3", [], ["other"], 1)

    claimed = broker.exchange("w1", list(retry.entry), ["default"], 1)[1]

    assert [c[0] for c in claimed] == [job.id]


def test_suspended_queue_is_skipped(queue: JobQueue, r: redis.Redis) -> None:
    low = queue.enqueue(tasks.noop)
    high = queue.enqueue(tasks.noop, queue="high")
    r.sadd(queue.keys.suspended, "high")
    assert claim(queue, 5, "high", "default") == [low.id]
    r.srem(queue.keys.suspended, "high")
    assert claim(queue, 5, "high", "default") == [high.id]


def test_jobs_given_back_unstarted_keep_their_order(queue: JobQueue, r: redis.Redis) -> None:
    # what a stopping worker does with the jobs it prefetched but did not start
    jobs = [queue.enqueue(tasks.noop, priority=p) for p in (0, 1, 0, 1, 0, 0)]
    assert claim(queue, 4) == [jobs[i].id for i in (0, 2, 4, 5)]
    requeued, failed = queue.broker.release(
        "w1", cause="worker stopped", current="-") or ([], [])
    assert (len(requeued), failed) == (4, [])
    back = queue.get_job(jobs[0].id)
    assert back is not None and (back.attempts, back.deliveries) == (0, 0)  # untouched
    assert claim(queue, 10, worker="w2") == [jobs[i].id for i in (0, 2, 4, 5, 1, 3)]
    assert r.exists(queue.keys.held("w1")) == 0


def test_a_batch_of_acks_sent_again_is_skipped_not_reported_stale(queue: JobQueue) -> None:
    """A worker whose connection broke after it sent its acks does not know if they were
    settled, and sends the same batch again with the same token: settled already, it is
    skipped. Without the token the jobs, no longer held, came back as stale and the worker
    said their results were dropped as given back, when they had been settled."""
    a, b = queue.enqueue(tasks.add, 1, 2), queue.enqueue(tasks.add, 3, 4)
    assert claim(queue, 2) == [a.id, b.id]
    acks = [field for job in (a, b)
            for field in AckEntry("done", job.id, "default", 0, 300, "{}", "")]
    assert queue.broker.exchange("w1", acks, [], 0, token="7").stale == []
    assert queue.broker.exchange("w1", acks, [], 0, token="7").stale == []  # the reply was lost
    assert queue.get_stats()["completed"] == 2
    # another batch (another token), or none: a job this worker does not hold is stale
    assert sorted(queue.broker.exchange("w1", acks, [], 0, token="8").stale) == \
        sorted([a.id, b.id])
    assert sorted(queue.broker.exchange("w1", acks[:7], [], 0).stale) == [a.id]
    assert queue.get_stats()["completed"] == 2
    # a batch sent again is answered as it was the first time: what was stale then still is
    c = queue.enqueue(tasks.add, 5, 6)
    assert claim(queue, 1) == [c.id]
    acks = [*acks[:7], *AckEntry("done", c.id, "default", 0, 300, "{}", "")]
    assert queue.broker.exchange("w1", acks, [], 0, token="9").stale == [a.id]
    assert queue.broker.exchange("w1", acks, [], 0, token="9").stale == [a.id]
    assert queue.get_stats()["completed"] == 3
    # the token goes with the worker: kept while its lease lapsed (it may be cut off, and
    # send the batch again), deleted once it stopped or died
    acked = f"{queue.keys.base}:acked:w1"
    queue.redis.zadd(queue.keys.leases, {"w1": 1})  # lapsed long ago
    assert queue.broker.release("w1", cause="lease lapsed", current=None,
                                only_if_expired=True) is not None
    assert queue.redis.exists(acked)
    queue.broker.release("w1", cause="worker stopped", current="-")
    assert not queue.redis.exists(acked)


def test_an_enqueue_skips_a_dead_workers_idle_registration_and_the_next_one_drops_it(
        queue: JobQueue, r: redis.Redis) -> None:
    def register(worker: str) -> None:
        queue.broker.scripts.run("idle", [queue.keys.hand(worker)],
                                 [queue.keys.base, worker, 15_000, "default"])

    idle = queue.keys.idle("default")
    register("w9")
    r.zadd(idle, {"w9": 1})  # registered long ago: a worker that died idle
    queued = queue.enqueue(tasks.noop)
    assert r.llen(queue.keys.hand("w9")) == 0  # not handed to the dead one: queued
    assert queue.get_stats()["pending"] == 1 and queue.broker.active_holder(queued.id) is None
    register("w8")
    assert r.zrange(idle, 0, -1) == ["w8"]  # the stale entry went with the next registration
    handed = queue.enqueue(tasks.noop)
    assert queue.broker.active_holder(handed.id) == "w8"


def test_a_worker_that_waits_idle_drops_the_wake_tokens_of_jobs_already_claimed(
        queue: JobQueue, r: redis.Redis) -> None:
    """Jobs enqueued while no worker was idle leave a wake token each (up to WAKE_CAP); busy
    workers claim those jobs without one. The tokens left would wake each idle worker for a
    claim that finds nothing, once per token, at the end of every drain: the wait drops them
    when the queue has nothing pending (or is suspended), and keeps them while it has."""
    wake = queue.keys.wake("default")
    queue.enqueue_many(tasks.noop, [()] * 5)
    assert r.llen(wake) == 5
    assert len(claim(queue, 3)) == 3
    # jobs still pending: a waiting worker is woken at once, by one token; the rest stay
    assert queue.broker.wait_for_work("w1", ["default"], 5) is None
    assert r.llen(wake) == 4
    assert len(claim(queue, 10)) == 2
    calls_before = r.info("commandstats")["cmdstat_blpop"]["calls"]
    # the queue is empty: the wait drops the tokens and blocks until its timeout
    assert queue.broker.wait_for_work("w1", ["default"], 0.05) is None
    assert r.llen(wake) == 0
    assert r.info("commandstats")["cmdstat_blpop"]["calls"] == calls_before + 1
    # a job enqueued meanwhile still wakes a worker (handed to the idle one, or its token)
    job = queue.enqueue(tasks.noop)
    assert queue.broker.active_holder(job.id) == "w1" or r.llen(wake) == 1
    # a suspended queue: its tokens go too, and its resume puts one back per pending job
    queue.broker.release("w1", cause="worker stopped", current="-")  # its jobs: pending again
    queue.broker.suspend("default")
    assert r.llen(wake) > 0
    assert queue.broker.wait_for_work("w2", ["default"], 0.05) is None
    assert r.llen(wake) == 0
    queue.broker.resume("default")
    assert r.llen(wake) == queue.get_stats()["pending"] == 6


def test_an_enqueue_polls_for_its_reply_only_right_after_another(queue: JobQueue) -> None:
    # enqueues that follow each other: their replies come fast, polling saves a wake-up; one
    # that comes alone would poll while the worker that starts its job needs the core
    assert queue._spin(100.0) == 0.0
    assert queue._spin(100.0 + SPIN_WITHIN / 2) == REPLY_SPIN
    assert queue._spin(100.0 + SPIN_WITHIN / 2 + SPIN_WITHIN) == 0.0
    # both ways of enqueueing one job poll as that says
    sent: list[float] = []
    enqueue = queue.broker.enqueue

    def spy(job: Any, *, spin: float = 0.0, replicas: int = 0) -> int:
        sent.append(spin)
        return enqueue(job, spin=spin, replicas=replicas)

    queue.broker.enqueue = spy  # type: ignore[method-assign]
    queue._spin = lambda now: 0.123  # type: ignore[method-assign]
    queue.enqueue(tasks.add, 1, 2)
    queue.enqueue(Job(tasks.add, (3, 4)))
    assert sent == [0.123, 0.123] and queue.size() == 2


def test_enqueue_many_asks_nothing_first_and_sends_again_to_a_server_that_lost_its_scripts(
        queue: JobQueue, r: redis.Redis) -> None:
    def asked() -> int:  # how often a client asked the server whether it holds a script
        return int(r.info("commandstats").get("cmdstat_script|exists", {}).get("calls", 0))

    before = asked()
    first = queue.enqueue_many(tasks.add, [(i, i) for i in range(3)])
    r.script_flush()  # a server restarted with its data, without its scripts
    second = queue.enqueue_many(tasks.add, [(i, i) for i in range(1200)])  # two chunks
    assert asked() == before
    assert queue.size() == 1203 and queue.get_stats()["enqueued"] == 1203
    assert claim(queue, 2000) == [j.id for j in first + second]
