"""JobStore, the tutorial's read API, against the real server."""

from __future__ import annotations

import jobq_testtasks as tasks

from jobq.queue import JobQueue
from jobq.registry import TaskResolver
from jobq.store import JobStore
from jobq.worker import Worker


def run_burst(queue: JobQueue) -> None:
    Worker([queue.name], config=queue.config, url=queue.url,
           resolver=TaskResolver(["jobq_testtasks"]), burst=True, renew_leases=False).run()


def test_get_job_and_stats(queue: JobQueue) -> None:
    store = JobStore(queue=queue)
    done = queue.enqueue(tasks.add, 1, 2)
    failed = queue.enqueue(tasks.boom, max_retries=0)
    run_burst(queue)
    waiting = queue.enqueue(tasks.noop)
    assert store.get_job(done.id)["result"] == 3
    assert store.get_job(failed.id)["status"] == "failed"
    assert store.get_job("nope") is None
    stats = store.get_stats()
    assert (stats["completed"], stats["failed"], stats["pending"], stats["total"]) == (1, 1, 1, 3)
    assert waiting.id in {j["id"] for j in store.get_all_jobs()}


def test_get_all_jobs_pages_without_keys(queue: JobQueue) -> None:
    store = JobStore(queue=queue)
    ids = {j.id for j in queue.enqueue_many(tasks.noop, [()] * 250)}
    seen: set[str] = set()
    cursor = 0
    while True:
        page, cursor = store.page(limit=40, cursor=cursor, include_finished=False)
        assert page
        seen |= {j["id"] for j in page}
        if cursor == 0:
            break
    assert seen == ids
    assert len(store.get_all_jobs(limit=10)) == 10


def test_delete_job_cancels_a_pending_one(queue: JobQueue) -> None:
    store = JobStore(queue=queue)
    job = queue.enqueue(tasks.record, "deleted", "ran")
    assert store.delete_job(job.id)
    run_burst(queue)
    assert queue.redis.llen("test:deleted") == 0  # it never ran
    assert store.get_job(job.id)["status"] == "cancelled"
    finished = queue.enqueue(tasks.noop)
    run_burst(queue)
    assert store.delete_job(finished.id)
    assert store.get_job(finished.id) is None
