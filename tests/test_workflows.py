"""Workflows on a real server with a real master: dependencies (depends_on), queue.map groups,
unique keys and cancellation. Jobs record their side effects in Redis (``jobq_testtasks``), so
a test sees what really ran, and how often."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jobq_testtasks as tasks
import psutil
import pytest
import redis
from conftest import subprocess_env, wait_until

from jobq.exceptions import JobFailed, UnknownJob
from jobq.groups import ItemFailed, Progress
from jobq.job import Job, JobStatus
from jobq.queue import JobQueue

Spawn = Callable[..., subprocess.Popen[str]]

#: Small limits so that retries, promotions and recoveries happen within a fraction of a second.
CONFIG = {"lease_time": 2.0, "hard_timeout_grace": 0.5, "heartbeat_timeout": 5.0,
          "graceful_timeout": 5.0, "retry_backoff_base": 0.05, "retry_jitter": 0.0,
          "scheduler_tick": 0.1}


def key() -> str:
    return uuid.uuid4().hex[:12]


def runs(r: redis.Redis, name: str) -> list[str]:
    return r.lrange(f"test:{name}", 0, -1)


def start_master(spawn: Spawn, tmp_path: Path, workers: int = 2) -> subprocess.Popen[str]:
    path = tmp_path / "jobq.toml"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in CONFIG.items()))
    return spawn("-I", "jobq_testtasks", "-w", str(workers),
                 env=subprocess_env(JOBQ_CONFIG=str(path)), module="jobq.cli.master")


def ready_workers(master: subprocess.Popen[str], count: int = 2) -> list[int]:
    """Wait until the master has ``count`` workers past booting; their pids."""
    def check() -> list[int] | None:
        assert master.poll() is None, f"the master exited: {master.communicate()[1]}"
        found = []
        for child in psutil.Process(master.pid).children():
            try:
                title = " ".join(child.cmdline())
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            if "jobq worker" in title and "booting" not in title:
                found.append(child.pid)
        return sorted(found) if len(found) == count else None

    return wait_until(check, 20, interval=0.02, message=f"{count} ready workers")


def finished(queue: JobQueue, job: Job | str, timeout: float = 20) -> Job:
    """Wait (blocking on the server) for the job to finish; the job as it ended."""
    return queue.wait(job if isinstance(job, str) else job.id, timeout=timeout)


def wait_status(queue: JobQueue, job_id: str, *statuses: JobStatus,
                timeout: float = 15) -> Job:
    def check() -> Job | None:
        job = queue.get_job(job_id)
        return job if job is not None and job.status in statuses else None

    return wait_until(check, timeout, message=f"job {job_id} to be one of {statuses}")


def started(r: redis.Redis, name: str, count: int = 1, timeout: float = 15) -> list[str]:
    return wait_until(lambda: len(runs(r, name)) >= count and runs(r, name), timeout,
                      message=f"{count} run(s) recorded under {name}")


def open_gate(r: redis.Redis, gate: str) -> None:
    r.rpush(f"test:{gate}", "1")


def status(queue: JobQueue, job: Job) -> JobStatus:
    found = queue.get_job(job.id)
    assert found is not None, f"job {job.id} is gone"
    return found.status


# -- dependencies ----------------------------------------------------------------------------

def test_diamond_the_join_sees_both_parents_results(
        queue: JobQueue, spawn: Spawn, tmp_path: Path) -> None:
    start_master(spawn, tmp_path)
    a = queue.enqueue(tasks.add, 1, 2)
    b = queue.enqueue(tasks.parents_sum_plus, 10, depends_on=a)
    c = queue.enqueue(tasks.parents_sum_plus, 100, depends_on=[a])
    d = queue.enqueue(tasks.parents, depends_on=[b, c.id])

    done = finished(queue, d)

    assert done.status is JobStatus.COMPLETED, done.error
    assert done.return_value == {b.id: 13, c.id: 103}
    assert d.result(timeout=5) == {b.id: 13, c.id: 103}
    assert done.depends_on == [b.id, c.id]
    jobs = {j.id: queue.get_job(j.id) for j in (a, b, c, d)}
    for child, parents in ((b, [a]), (c, [a]), (d, [b, c])):
        for parent in parents:  # each started after its parents ended
            assert jobs[child.id].started_at >= jobs[parent.id].completed_at
    assert queue.get_stats()["deferred"] == 0


def test_a_chain_of_20_runs_link_by_link_and_deferred_goes_up_then_back_to_zero(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    start_master(spawn, tmp_path)
    k, gate = key(), key()
    root = queue.enqueue(tasks.gated, f"{k}:root", gate, False, 0)
    started(r, f"{k}:root")  # the root runs, held at its gate
    chain = [root]
    for _ in range(20):
        chain.append(queue.enqueue(tasks.chain_link, k, depends_on=chain[-1]))
    assert all(j.status is JobStatus.DEFERRED for j in chain[1:])
    assert status(queue, chain[10]) is JobStatus.DEFERRED
    assert queue.get_stats()["deferred"] == 20

    open_gate(r, gate)
    last = finished(queue, chain[-1])

    assert last.status is JobStatus.COMPLETED, last.error
    assert last.return_value == 20  # each link added 1 to its parent's result
    assert runs(r, k) == [str(i) for i in range(1, 21)]  # one at a time, in order
    stats = queue.get_stats()
    assert stats["deferred"] == 0 and stats["completed"] == 21 and stats["pending"] == 0


def test_a_parent_failed_for_good_cancels_its_dependents_transitively(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    start_master(spawn, tmp_path)
    k, gate = key(), key()
    a = queue.enqueue(tasks.gated, f"{k}:a", gate, True, max_retries=1)
    b = queue.enqueue(tasks.record, k, "b", depends_on=a)
    c = queue.enqueue(tasks.record, k, "c", depends_on=b)
    d = queue.enqueue(tasks.record, k, "d", depends_on=[c])
    anyway = queue.enqueue(tasks.record, k, "anyway", depends_on=a, on_parent_failure="run")
    after_c = queue.enqueue(tasks.record, k, "after-c", depends_on=c, on_parent_failure="run")
    dependents = [b, c, d, anyway, after_c]
    started(r, f"{k}:a")
    assert queue.get_stats()["deferred"] == 5

    open_gate(r, gate)  # the first attempt fails: a retry, not a failure for good
    started(r, f"{k}:a", 2)
    assert [status(queue, j) for j in dependents] == [JobStatus.DEFERRED] * 5
    open_gate(r, gate)  # the second fails too: out of retries
    assert finished(queue, a).status is JobStatus.FAILED
    for j in dependents:
        finished(queue, j)

    for child, parent in ((b, a), (c, b), (d, c)):
        done = queue.get_job(child.id)
        assert done.status is JobStatus.CANCELLED
        assert done.final_error["type"] == "ParentFailed"
        assert parent.id in done.final_error["msg"]
        assert done.error == f"ParentFailed: parent job {parent.id} did not complete"
    with pytest.raises(JobFailed) as failure:
        b.result(timeout=5)
    assert failure.value.status == "cancelled" and a.id in str(failure.value)
    # on_parent_failure="run": ran anyway, both after a failed and after a cancelled parent
    assert queue.get_job(anyway.id).status is JobStatus.COMPLETED
    assert queue.get_job(after_c.id).status is JobStatus.COMPLETED
    assert sorted(runs(r, k)) == ["after-c", "anyway"]  # b, c and d never ran
    stats = queue.get_stats()
    assert (stats["deferred"], stats["cancelled"], stats["failed"], stats["completed"]) == \
        (0, 3, 1, 2)


def test_parents_finished_before_the_child_is_enqueued(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    start_master(spawn, tmp_path)
    k = key()
    ok = queue.enqueue(tasks.add, 2, 3)
    bad = queue.enqueue(tasks.boom, "parent fails", max_retries=0)
    dropped = queue.enqueue(tasks.noop, delay=3600)
    assert queue.cancel(dropped.id)
    assert finished(queue, ok).status is JobStatus.COMPLETED
    assert finished(queue, bad).status is JobStatus.FAILED

    after_failed = queue.enqueue(tasks.record, k, "after-failed", depends_on=bad)
    after_cancelled = queue.enqueue(tasks.record, k, "after-cancelled", depends_on=[dropped])
    after_ok = queue.enqueue(tasks.parents, depends_on=ok)
    run_anyway = queue.enqueue(tasks.parents, depends_on=[ok, bad], on_parent_failure="run")

    # a finished parent is not waited for: cancelled at once, or pending at once
    assert after_failed.status is JobStatus.CANCELLED
    assert after_cancelled.status is JobStatus.CANCELLED
    assert after_ok.status is JobStatus.PENDING
    assert run_anyway.status is JobStatus.PENDING
    for child, parent in ((after_failed, bad), (after_cancelled, dropped)):
        record = queue.get_job(child.id)
        assert record.status is JobStatus.CANCELLED
        assert record.final_error["type"] == "ParentFailed"
        assert parent.id in record.final_error["msg"]
    assert finished(queue, after_ok).return_value == {ok.id: 5}
    assert finished(queue, run_anyway).return_value == {ok.id: 5, bad.id: None}
    # enqueued before the two that completed (FIFO): had they been queued, they had run
    assert runs(r, k) == []
    assert queue.get_stats()["deferred"] == 0


def test_an_unknown_parent_is_refused_at_enqueue_and_nothing_is_written(
        queue: JobQueue, r: redis.Redis) -> None:
    live = queue.enqueue(tasks.noop)
    with pytest.raises(UnknownJob, match="no-such-job"):
        queue.enqueue(tasks.noop, depends_on=[live, "no-such-job"], id="child-1")
    assert queue.get_job("child-1") is None
    assert not r.exists(f"{queue.keys.base}:waits:{live.id}")
    stats = queue.get_stats()
    assert (stats["enqueued"], stats["deferred"], stats["pending"]) == (1, 0, 1)


def test_a_delay_is_refused_with_depends_on_rather_than_dropped(queue: JobQueue) -> None:
    parent = queue.enqueue(tasks.noop)
    with pytest.raises(ValueError, match="depends_on cannot be combined with delay or at"):
        queue.enqueue(tasks.noop, depends_on=parent, delay=60)
    with pytest.raises(ValueError, match="depends_on cannot be combined with delay or at"):
        queue.enqueue(tasks.noop, depends_on=parent, at=datetime.now(UTC) + timedelta(hours=1))
    assert queue.get_stats()["enqueued"] == 1
    assert queue.enqueue(tasks.noop, depends_on=parent, delay=0).status is JobStatus.DEFERRED


def test_emptying_a_queue_settles_the_dependents_and_groups_of_the_deleted_jobs(
        queue: JobQueue, r: redis.Redis) -> None:
    k = key()
    parent = queue.enqueue(tasks.noop)
    child = queue.enqueue(tasks.record, k, "child", depends_on=parent)
    grandchild = queue.enqueue(tasks.record, k, "grandchild", depends_on=child)
    elsewhere = queue.enqueue(tasks.record, k, "elsewhere", depends_on=parent, queue="other",
                              on_parent_failure="run")
    group = queue.map(tasks.square, range(3))

    assert queue.empty() == 4  # the parent and the group's three jobs

    assert queue.get_job(parent.id) is None
    for job, cause in ((child, parent), (grandchild, child)):
        done = queue.get_job(job.id)
        assert done.status is JobStatus.CANCELLED  # not deferred for ever
        assert cause.id in done.final_error["msg"]
    assert status(queue, elsewhere) is JobStatus.PENDING  # on_parent_failure="run"
    assert group.progress() == Progress(0, 3, 3)
    assert group.wait(timeout=5)  # does not hang
    stats = queue.get_stats()
    assert (stats["pending"], stats["deferred"], stats["cancelled"]) == (0, 0, 2)
    assert JobQueue("other", redis_url=queue.url).get_stats()["deferred"] == 0
    assert not r.exists(queue.keys.deps)


def test_fan_in_one_child_of_1000_parents_runs_after_all_of_them(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    queue.suspend()  # nothing runs until every job is enqueued
    parents = queue.enqueue_many(tasks.add, [(i, 0) for i in range(1000)])
    child = queue.enqueue(tasks.count_parents, depends_on=parents)
    assert child.status is JobStatus.DEFERRED
    assert int(r.hget(queue.keys.deps, child.id)) == 1000
    assert queue.get_stats()["deferred"] == 1
    start_master(spawn, tmp_path)

    queue.resume()
    done = finished(queue, child, timeout=60)

    assert done.status is JobStatus.COMPLETED, done.error
    assert done.return_value == [1000, sum(range(1000))]
    last_parent = max(queue.get_job(p.id).completed_at for p in parents)
    assert done.started_at >= last_parent
    stats = queue.get_stats()
    assert (stats["deferred"], stats["completed"]) == (0, 1001)
    assert not r.exists(queue.keys.deps) and not r.exists(f"{queue.keys.base}:parents")


def test_a_worker_killed_in_the_middle_of_a_chain_does_not_stall_it(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    master = start_master(spawn, tmp_path)
    k = key()
    chain: list[Job] = []
    for i in range(10):
        hang = 30 if i == 4 else 0
        chain.append(queue.enqueue(tasks.chain_link, k, hang, max_retries=2,
                                   depends_on=chain[-1:] or None))
    [victim] = started(r, f"{k}:pid")
    assert int(victim) in ready_workers(master)
    assert runs(r, k) == ["1", "2", "3", "4"]
    assert queue.get_stats()["deferred"] == 5

    os.kill(int(victim), signal.SIGKILL)
    last = finished(queue, chain[-1], timeout=30)

    assert last.status is JobStatus.COMPLETED, last.error
    assert last.return_value == 10
    assert runs(r, k) == [str(i) for i in range(1, 11)]
    killed = queue.get_job(chain[4].id)
    assert killed.status is JobStatus.COMPLETED
    assert killed.retry_count == 1
    assert [e["type"] for e in killed.errors] == ["WorkerLost"]
    assert "SIGKILL" in killed.errors[0]["msg"]
    assert queue.get_stats()["deferred"] == 0


# -- map -------------------------------------------------------------------------------------

def test_map_yields_results_in_input_order_whatever_order_they_finish_in(
        queue: JobQueue, spawn: Spawn, tmp_path: Path) -> None:
    ready_workers(start_master(spawn, tmp_path))
    rng = random.Random(7)
    values = rng.sample(range(1000), 30)
    durations = [rng.uniform(0, 0.03) for _ in values]
    durations[0] = 0.3  # the first item finishes well after the second
    group = queue.map(tasks.item_after, [[v, s] for v, s in zip(values, durations, strict=True)])

    results = list(group.results(timeout=30))

    assert results == values
    jobs = [queue.get_job(i) for i in group.job_ids()]
    by_finish = sorted(range(len(jobs)), key=lambda n: jobs[n].completed_at)
    assert by_finish != list(range(len(jobs)))  # they did finish out of order
    assert len({j.worker for j in jobs}) == 2
    assert group.progress() == Progress(30, 0, 30)


def test_map_progress_counts_and_failures_at_their_index(
        queue: JobQueue, spawn: Spawn, tmp_path: Path) -> None:
    start_master(spawn, tmp_path)
    failing = {3, 7, 11}
    group = queue.map(tasks.item_or_fail, [[i, i in failing] for i in range(20)],
                      max_retries=1)

    assert group.wait(timeout=30)

    p = group.progress()
    assert (p.done, p.failed, p.total) == (17, 3, 20)  # a retried attempt is not counted
    assert p.done + p.failed == p.total and p.finished
    for i in failing:
        assert queue.get_job(group.job_ids()[i]).attempts == 2
    got = []
    with pytest.raises(ItemFailed) as first:
        for value in group.results(timeout=10):
            got.append(value)
    assert got == [0, 1, 2]
    assert first.value.index == 3
    assert "item with value 3 fails" in str(first.value)
    mixed = list(group.results(timeout=10, return_exceptions=True))
    assert len(mixed) == 20
    for i, value in enumerate(mixed):
        if i in failing:
            assert isinstance(value, ItemFailed) and value.index == i
        else:
            assert value == i


def test_map_with_chunks_flattens_results_and_names_the_failing_item(
        queue: JobQueue, spawn: Spawn, tmp_path: Path) -> None:
    start_master(spawn, tmp_path)
    group = queue.map(tasks.square, range(25), chunksize=4)
    assert (group.total, group.items, len(group.job_ids())) == (7, 25, 7)
    assert list(group.results(timeout=30)) == [x * x for x in range(25)]
    assert group.progress() == Progress(25, 0, 25)  # items, the short last chunk's too

    bad = queue.map(tasks.square, [0, 1, 2, 3, 4, 5, -6, 7, 8], chunksize=4, max_retries=0)
    with pytest.raises(ItemFailed) as failure:
        list(bad.results(timeout=30))
    assert failure.value.index == 6 and "negative: -6" in str(failure.value)
    mixed = list(bad.results(timeout=10, return_exceptions=True))
    assert mixed[:4] == [0, 1, 4, 9] and mixed[8] == 64
    assert all(isinstance(x, ItemFailed) and x.index == 6 for x in mixed[4:8])  # its chunk
    assert bad.progress() == Progress(5, 4, 9)  # the failed chunk's four items failed


def test_group_wait_with_progress_prints_lines_when_not_a_tty(
        queue: JobQueue, spawn: Spawn, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    start_master(spawn, tmp_path)
    queue.suspend()
    group = queue.map(tasks.square, range(12))
    assert group.wait(timeout=0.3, progress=True) is False  # nothing can run yet
    assert capsys.readouterr().err.splitlines() == ["0/12 done, 0 failed"]

    queue.resume()
    assert group.wait(timeout=30, progress=True) is True

    lines = capsys.readouterr().err.splitlines()
    assert lines and lines[-1] == "12/12 done, 0 failed"
    counts = [int(line.split("/", 1)[0]) for line in lines]
    assert counts == sorted(counts)
    assert all(line.endswith(" done, 0 failed") and "/12 " in line for line in lines)


# -- depending on a group (depends_on=group) ---------------------------------------------------

def item_ends(r: redis.Redis, k: str) -> dict[int, float]:
    """When each timed_item recorded under ``k`` ended, by value (one entry per value: an
    item recorded twice fails the test)."""
    ends = [line.split() for line in runs(r, k)]
    assert len({v for v, _ in ends}) == len(ends), f"an item ended twice: {ends}"
    return {int(v): float(t) for v, t in ends}


def report_starts(r: redis.Redis, k: str) -> list[float]:
    return [float(t) for t in runs(r, f"{k}:report")]


def test_a_job_that_depends_on_a_map_runs_once_after_every_item_and_reads_their_results(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    k = key()
    queue.suspend()  # no item ends before the report is enqueued
    values = list(range(12))
    group = queue.map(tasks.timed_item, [{"key": k, "value": v, "seconds": (v % 4) * 0.03,
                                          "fail_first": v == 5} for v in values],
                      max_retries=1)
    report = queue.enqueue(tasks.group_report, k, depends_on=group)
    assert report.status is JobStatus.DEFERRED
    assert (report.depends_on, report.depends_on_groups) == ([], [group.id])
    assert queue.get_stats()["deferred"] == 1
    start_master(spawn, tmp_path)

    queue.resume()
    done = finished(queue, report, timeout=30)

    assert done.status is JobStatus.COMPLETED, done.error
    assert done.return_value == {"groups": {group.id: values}, "parents": {}}
    ends = item_ends(r, k)
    assert sorted(ends) == values
    [start] = report_starts(r, k)  # it ran once, after every item ended
    assert start >= max(ends.values())
    jobs = [queue.get_job(i) for i in group.job_ids()]
    assert done.started_at >= max(j.completed_at for j in jobs)
    # the item that failed once was retried: its first end did not count as the group's
    assert jobs[5].attempts == 2 and jobs[5].status is JobStatus.COMPLETED
    stats = queue.get_stats()
    assert (stats["deferred"], stats["completed"], stats["cancelled"]) == (0, 13, 0)
    assert not r.exists(queue.keys.group_waits(group.id))
    assert not r.hexists(queue.keys.group(group.id), "dep_ttl")


def test_a_failed_item_cancels_the_dependent_and_one_that_runs_anyway_sees_the_error(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    k = key()
    queue.suspend()
    group = queue.map(tasks.timed_item, [{"key": k, "value": v, "fail": v == 3}
                                         for v in range(6)], max_retries=0)
    cancelled = queue.enqueue(tasks.group_report, f"{k}:c", depends_on=group)
    anyway = queue.enqueue(tasks.group_report, f"{k}:a", depends_on=group.id,  # by its id
                           on_parent_failure="run")
    after_cancelled = queue.enqueue(tasks.record, k, "after", depends_on=cancelled)
    assert anyway.depends_on_groups == [group.id]
    start_master(spawn, tmp_path)

    queue.resume()
    for job in (cancelled, anyway, after_cancelled):
        finished(queue, job, timeout=30)

    why = f"parent group {group.id} did not complete: 1 of its 6 jobs failed or were cancelled"
    done = queue.get_job(cancelled.id)
    assert done.status is JobStatus.CANCELLED
    assert done.final_error["type"] == "ParentFailed"
    assert done.error == f"ParentFailed: {why}"
    assert runs(r, f"{k}:c:report") == []  # it never ran
    after = queue.get_job(after_cancelled.id)  # and its own dependent neither
    assert after.status is JobStatus.CANCELLED and cancelled.id in after.final_error["msg"]
    ran = queue.get_job(anyway.id)
    assert ran.status is JobStatus.COMPLETED, ran.error
    results = ran.return_value["groups"][group.id]
    assert results[:3] == [0, 1, 2] and results[4:] == [4, 5]
    failed_id = group.job_ids()[3]
    assert results[3] == (f"failed 3: item 3 (job {failed_id}) failed: ValueError: item 3 "
                          "fails as asked")  # the error, not None
    [start] = report_starts(r, f"{k}:a")
    assert start >= max(item_ends(r, k).values())
    assert queue.get_stats()["deferred"] == 0


def test_a_group_that_already_ended_is_not_waited_for(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    start_master(spawn, tmp_path)
    k = key()
    good = queue.map(tasks.square, range(4))
    bad = queue.map(tasks.square, [1, -2], max_retries=0)
    assert good.wait(timeout=30) and bad.wait(timeout=30)

    after_good = queue.enqueue(tasks.group_report, k, depends_on=good)
    after_bad = queue.enqueue(tasks.record, k, "after-bad", depends_on=[bad.id])
    anyway = queue.enqueue(tasks.group_report, f"{k}:a", depends_on=bad,
                           on_parent_failure="run")

    # pending at once, or cancelled at once: never deferred
    assert after_good.status is JobStatus.PENDING and anyway.status is JobStatus.PENDING
    assert after_bad.status is JobStatus.CANCELLED
    record = queue.get_job(after_bad.id)
    assert record.status is JobStatus.CANCELLED
    assert record.final_error == {"type": "ParentFailed", "msg": f"parent group {bad.id} did "
                                  "not complete: 1 of its 2 jobs failed or were cancelled"}
    assert finished(queue, after_good).return_value == {"groups": {good.id: [0, 1, 4, 9]},
                                                        "parents": {}}
    [first, second] = finished(queue, anyway).return_value["groups"][bad.id]
    assert first == 1 and second.startswith("failed 1: item 1 (job ")
    assert second.endswith("failed: ValueError: negative: -2")
    assert runs(r, k) == []  # after-bad never ran
    assert queue.get_stats()["deferred"] == 0
    assert not r.exists(queue.keys.group_waits(good.id))


def test_a_job_that_depends_on_chunked_maps_reads_one_result_per_item(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    start_master(spawn, tmp_path)
    k = key()
    queue.suspend()
    good = queue.map(tasks.square, range(10), chunksize=3)
    bad = queue.map(tasks.square, [0, 1, 2, 3, -4, 5, 6], chunksize=3, max_retries=0)
    report = queue.enqueue(tasks.group_report, k, depends_on=[good, bad],
                           on_parent_failure="run")
    cancelled = queue.enqueue(tasks.group_report, f"{k}:c", depends_on=bad)
    assert report.depends_on_groups == [good.id, bad.id]

    queue.resume()
    done = finished(queue, report, timeout=30)

    assert done.status is JobStatus.COMPLETED, done.error
    groups = done.return_value["groups"]
    assert groups[good.id] == [x * x for x in range(10)]  # per item, the short last chunk too
    results = groups[bad.id]
    assert len(results) == 7 and results[:3] == [0, 1, 4] and results[6] == 36
    for failed in results[3:6]:  # the failed chunk: each of its items names the failing one
        assert failed.startswith("failed 4: item 4 (job ") and "negative: -4" in failed
    gone = finished(queue, cancelled)
    assert gone.status is JobStatus.CANCELLED
    assert gone.final_error["msg"].endswith("1 of its 3 jobs failed or were cancelled")
    assert runs(r, f"{k}:c:report") == []


def test_a_job_that_depends_on_a_group_and_a_job_waits_for_both(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    start_master(spawn, tmp_path)
    k, gate = key(), key()
    parent = queue.enqueue(tasks.gated, f"{k}:parent", gate, False, 7)
    group = queue.map(tasks.timed_item, [{"key": k, "value": v} for v in range(5)])

    report = queue.enqueue(tasks.group_report, k, depends_on=[group.id, parent])

    assert (report.depends_on, report.depends_on_groups) == ([parent.id], [group.id])
    assert group.wait(timeout=30)
    started(r, f"{k}:parent")
    assert status(queue, report) is JobStatus.DEFERRED  # the group ended, the job has not
    open_gate(r, gate)
    done = finished(queue, report)
    assert done.status is JobStatus.COMPLETED, done.error
    assert done.return_value == {"groups": {group.id: list(range(5))},
                                 "parents": {parent.id: 7}}
    assert done.started_at >= queue.get_job(parent.id).completed_at
    [start] = report_starts(r, k)
    assert start >= max(item_ends(r, k).values())


def test_dependents_enqueued_while_their_group_ends_are_never_left_deferred(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    ready_workers(start_master(spawn, tmp_path))
    k = key()
    group = queue.map(tasks.timed_item, [{"key": k, "value": v} for v in range(40)])
    dependents = []
    while not group.progress().finished:  # as the items end, one after the other
        dependents.append(queue.enqueue(tasks.noop, depends_on=group))
    for _ in range(5):
        dependents.append(queue.enqueue(tasks.noop, depends_on=group))

    assert {j.status for j in dependents} == {JobStatus.DEFERRED, JobStatus.PENDING}
    for job in dependents:
        assert finished(queue, job).status is JobStatus.COMPLETED
    assert queue.get_stats()["deferred"] == 0
    assert not r.exists(queue.keys.deps)


def test_a_worker_killed_mid_group_the_dependent_still_runs_once_after_every_item(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    master = start_master(spawn, tmp_path)
    k = key()
    values = list(range(8))
    group = queue.map(tasks.timed_item, [{"key": k, "value": v, "seconds": 0.02,
                                          "hang": v == 2} for v in values], max_retries=2)
    report = queue.enqueue(tasks.group_report, k, depends_on=group)
    [victim] = started(r, f"{k}:pid")
    assert int(victim) in ready_workers(master)
    assert status(queue, report) is JobStatus.DEFERRED

    os.kill(int(victim), signal.SIGKILL)
    done = finished(queue, report, timeout=30)

    assert done.status is JobStatus.COMPLETED, done.error
    assert done.return_value == {"groups": {group.id: values}, "parents": {}}
    ends = item_ends(r, k)
    assert sorted(ends) == values
    [start] = report_starts(r, k)
    assert start >= max(ends.values())
    killed = queue.get_job(group.job_ids()[2])
    assert killed.status is JobStatus.COMPLETED and killed.attempts == 2
    assert [e["type"] for e in killed.errors] == ["WorkerLost"]
    assert group.progress() == Progress(8, 0, 8)
    assert queue.get_stats()["deferred"] == 0


def test_a_requeued_item_is_waited_for_again_not_counted_twice(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    start_master(spawn, tmp_path)
    k, gate = key(), key()
    group = queue.map(tasks.timed_item, [{"key": k, "value": 0, "fail_first": True},
                                         {"key": k, "value": 1, "gate": gate}], max_retries=0)
    report = queue.enqueue(tasks.group_report, k, depends_on=group, on_parent_failure="run")
    first, gated = group.job_ids()
    assert finished(queue, first).status is JobStatus.FAILED
    assert group.progress() == Progress(0, 1, 2)

    assert queue.requeue(first)
    assert group.progress() == Progress(0, 0, 2)  # in flight again
    assert finished(queue, first).status is JobStatus.COMPLETED
    assert group.progress() == Progress(1, 0, 2)  # not 1 done + 1 failed: "ended"
    assert status(queue, report) is JobStatus.DEFERRED  # the gated item still runs
    open_gate(r, gate)
    done = finished(queue, report)

    assert done.status is JobStatus.COMPLETED, done.error
    assert done.return_value == {"groups": {group.id: [0, 1]}, "parents": {}}
    [start] = report_starts(r, k)
    assert start >= max(item_ends(r, k).values())


def test_cancelling_and_deleting_a_groups_jobs_settles_the_jobs_waiting_for_it(
        queue: JobQueue, r: redis.Redis) -> None:
    k = key()
    other = JobQueue("other", redis_url=queue.url)
    group = queue.map(tasks.square, range(3))
    child = other.enqueue(tasks.record, k, "child", depends_on=group)
    anyway = other.enqueue(tasks.record, k, "anyway", depends_on=group,
                           on_parent_failure="run")

    assert queue.cancel(group.job_ids()[0])
    assert status(queue, child) is JobStatus.DEFERRED  # two of its jobs are left
    assert queue.delete()["pending"] == 2

    done = queue.get_job(child.id)
    assert done.status is JobStatus.CANCELLED  # not deferred for ever
    assert done.final_error["msg"] == (f"parent group {group.id} did not complete: 3 of its "
                                       "3 jobs failed or were cancelled")
    assert status(queue, anyway) is JobStatus.PENDING
    assert group.progress() == Progress(0, 3, 3)
    assert other.get_stats()["deferred"] == 0

    # a job waiting for a group is deleted with its own queue, and leaves the group's waiters
    group = other.map(tasks.square, range(2))
    waiting = queue.enqueue(tasks.record, k, "waiting", depends_on=group)
    stays = other.enqueue(tasks.record, k, "stays", depends_on=group)
    assert queue.delete()["deferred"] == 1
    assert r.smembers(queue.keys.group_waits(group.id)) == {stays.id}
    assert group.cancel() == 2
    assert queue.get_job(waiting.id) is None  # not brought back by its group's end
    assert status(queue, stays) is JobStatus.CANCELLED
    assert not r.exists(queue.keys.deps)


def test_an_unknown_or_expired_group_is_refused_at_enqueue_and_nothing_is_written(
        queue: JobQueue, r: redis.Redis) -> None:
    with pytest.raises(UnknownJob, match="no job with id 'nope', nor a queue.map group"):
        queue.enqueue(tasks.noop, depends_on="nope")
    group = queue.map(tasks.square, range(2))
    r.delete(queue.keys.group(group.id))  # as when it expires
    with pytest.raises(UnknownJob, match=f"no queue.map group with id '{group.id}'"):
        queue.enqueue(tasks.noop, depends_on=group, id="child-1")
    with pytest.raises(UnknownJob, match=f"no job with id '{group.id}', nor a queue.map group"):
        queue.enqueue(tasks.noop, depends_on=[group.id], id="child-1")
    assert queue.get_job("child-1") is None
    stats = queue.get_stats()
    assert (stats["enqueued"], stats["deferred"], stats["pending"]) == (2, 0, 2)
    with pytest.raises(TypeError, match="depends_on takes Jobs, queue.map groups or their ids"):
        queue.enqueue(tasks.noop, depends_on=[42])


# -- unique keys and cancellation --------------------------------------------------------------

def test_concurrent_enqueues_of_one_unique_key_make_one_job(
        redis_url: str, queue: JobQueue, r: redis.Redis) -> None:
    k, unique = key(), key()
    barrier = threading.Barrier(8)
    ids: list[str] = []
    errors: list[BaseException] = []

    def producer(n: int) -> None:
        own = JobQueue("default", redis_url=redis_url)  # its own connection
        try:
            barrier.wait(timeout=10)
            ids.append(own.enqueue(tasks.record, k, str(n), unique_key=unique).id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=producer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)

    assert errors == []
    assert len(ids) == 8 and len(set(ids)) == 1
    assert r.hkeys(queue.keys.jobs) == ids[:1]
    assert queue.get_stats()["enqueued"] == 1 and queue.size() == 1


def test_cancelled_pending_scheduled_and_deferred_jobs_never_run(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    k, gate = key(), key()
    pending = queue.enqueue(tasks.record, k, "pending")
    scheduled = queue.enqueue(tasks.record, k, "scheduled", delay=0.5)
    parent = queue.enqueue(tasks.gated, f"{k}:parent", gate)
    deferred = queue.enqueue(tasks.record, k, "deferred", depends_on=parent)
    assert [j.status for j in (pending, scheduled, deferred)] == \
        [JobStatus.PENDING, JobStatus.SCHEDULED, JobStatus.DEFERRED]

    for job in (pending, scheduled, deferred):
        assert queue.cancel(job.id) is True
        assert status(queue, job) is JobStatus.CANCELLED
        assert queue.cancel_job(job.id) == "finished"
    assert queue.cancel_job("no-such-job") == "unknown"
    stats = queue.get_stats()
    assert (stats["pending"], stats["scheduled"], stats["deferred"], stats["cancelled"]) == \
        (1, 0, 0, 3)  # only the parent is left
    # each cancelled job has a later twin that does run
    twins = [queue.enqueue(tasks.record, k, "pending-twin"),
             queue.enqueue(tasks.record, k, "scheduled-twin", delay=0.7),
             queue.enqueue(tasks.record, k, "deferred-twin", depends_on=parent)]
    start_master(spawn, tmp_path)
    started(r, f"{k}:parent")
    open_gate(r, gate)
    for twin in twins:
        assert finished(queue, twin).status is JobStatus.COMPLETED

    assert sorted(runs(r, k)) == ["deferred-twin", "pending-twin", "scheduled-twin"]
    for job in (pending, scheduled, deferred):
        done = queue.get_job(job.id)
        assert done.status is JobStatus.CANCELLED
        assert done.final_error == {"type": "Cancelled", "msg": "cancelled by request"}
    stats = queue.get_stats()
    assert (stats["pending"], stats["scheduled"], stats["deferred"], stats["processing"]) == \
        (0, 0, 0, 0)


@pytest.mark.parametrize("how", ["spin", "sleep"])
def test_cancelling_a_running_job_interrupts_it(
        how: str, queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    master = start_master(spawn, tmp_path)
    k = key()
    if how == "spin":
        job = queue.enqueue(tasks.spin, 30, k)  # a pure-Python busy loop
        expected = ["JobCancelled"]
    else:
        job = queue.enqueue(tasks.sleep_until_cancelled, k, 30)
        started(r, k)
        expected = ["started", "JobCancelled"]
    running = wait_status(queue, job.id, JobStatus.PROCESSING)
    before = ready_workers(master)

    t0 = time.monotonic()
    assert queue.cancel_job(job.id) == "interrupting"
    done = finished(queue, job, timeout=20)  # well before its natural end (30 s)
    print(f"\n{how}: cancelled after {time.monotonic() - t0:.3f} s")

    assert done.status is JobStatus.CANCELLED
    assert runs(r, k) == expected  # JobCancelled was raised inside it; it did not finish
    assert done.final_error["type"] == "JobCancelled"
    assert (done.attempts, done.retries) == (1, 0) and done.worker == running.worker
    assert not r.hexists(queue.keys.cancel, job.id)
    stats = queue.get_stats()
    assert (stats["cancelled"], stats["failed"], stats["processing"]) == (1, 0, 0)
    # the worker survived the interruption and takes the next job
    assert finished(queue, queue.enqueue(tasks.add, 1, 1)).return_value == 2
    assert ready_workers(master) == before


def test_map_refuses_what_its_batch_cannot_honour(queue: JobQueue, r: redis.Redis) -> None:
    """depends_on and unique_key used to be dropped by map without a word: its jobs would
    run at once, or twice. Refused, and nothing is written."""
    parent = queue.enqueue(tasks.add, 1, 2, delay=60)
    before = set(r.keys(f"{queue.keys.base}:*"))
    with pytest.raises(TypeError, match="map does not take depends_on"):
        queue.map(tasks.square, [1, 2, 3], depends_on=parent)
    with pytest.raises(TypeError, match="map does not take unique_key"):
        queue.map(tasks.square, [1, 2, 3], unique_key="nightly")
    assert set(r.keys(f"{queue.keys.base}:*")) == before


def test_a_group_is_kept_a_day_after_its_last_job_ended_not_after_map(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    """A map that runs longer than a day used to lose its counts (and leave whoever waited
    for it waiting for good) a day after map(): each job that ends now keeps the group a day
    from then. Its expiry is brought near first, as if the map had run for most of a day."""
    group = queue.map(tasks.square, [1, 2, 3], delay=60)
    report = queue.enqueue(tasks.add, 1, 2, depends_on=group)
    keys = [queue.keys.group(group.id), queue.keys.group_ids(group.id),
            queue.keys.group_waits(group.id)]
    for k in keys:
        assert r.expire(k, 100)
    queue.broker.promote(time.time() + 120)  # due now
    ready_workers(start_master(spawn, tmp_path))
    assert list(group.results(timeout=30)) == [1, 4, 9]
    assert queue.wait(report.id, timeout=30).status == JobStatus.COMPLETED
    assert 86_000 < r.ttl(keys[0]) <= 86_400 and 86_000 < r.ttl(keys[1]) <= 86_400


def test_recent_groups_lists_the_maps_made_last_and_forgets_the_expired(
        queue: JobQueue, r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """map() indexes its group ({ns}:groups, in the transaction that writes the group); the
    index is trimmed to the groups' TTL and a cap at each map(), and its reader drops the ids
    whose group expired."""
    import jobq.broker
    from jobq.groups import GROUP_TTL

    old = "0ld-group"  # as if made more than a day ago
    queue.broker.create_group(old, {"total": 0, "items": 0, "chunk": 1, "done": 0, "failed": 0,
                                    "created": time.time() - GROUP_TTL - 60}, [], GROUP_TTL)
    assert r.zscore(queue.keys.groups, old) is not None
    first = queue.map(tasks.square, [1, 2, 3])
    assert r.zscore(queue.keys.groups, old) is None  # trimmed: older than the TTL
    chunked = queue.map(tasks.square, range(5), chunksize=2)
    gone = queue.map(tasks.square, [4])
    r.delete(queue.keys.group(gone.id))  # expired
    listed = queue.recent_groups()
    assert [g.id for g in listed] == [chunked.id, first.id]  # newest first, the expired skipped
    assert r.zscore(queue.keys.groups, gone.id) is None  # and dropped from the index
    assert listed[0].task == "jobq_testtasks:square" and listed[0].chunksize == 2
    assert (listed[0].jobs, listed[0].progress) == (3, Progress(0, 0, 5))
    assert listed[1].progress == first.progress() == Progress(0, 0, 3)
    assert abs(listed[1].created - time.time()) < 60
    assert [g.id for g in queue.recent_groups(1)] == [chunked.id]

    monkeypatch.setattr(jobq.broker, "GROUP_INDEX_CAP", 3)  # many small maps: a bound
    made = [queue.map(tasks.square, [i]).id for i in range(4)]
    assert [g.id for g in queue.recent_groups()] == made[::-1][:3]
    assert r.zcard(queue.keys.groups) == 3

    def refused(*_: object) -> None:
        raise redis.ResponseError("READONLY You can't write against a read only replica.")

    monkeypatch.setattr(queue.broker._r, "zrem", refused)  # a reader that may not write
    r.delete(queue.keys.group(made[-1]))
    assert [g.id for g in queue.recent_groups()] == made[::-1][1:3]  # skipped all the same
    assert [g.id for g in queue.recent_groups(1)] == [made[-2]]  # read on past it, once
    assert r.zcard(queue.keys.groups) == 3
