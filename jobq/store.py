"""``JobStore``: a read API over jobq's records by job, without KEYS or SCAN of the
keyspace: live jobs are paged with HSCAN of the jobs hash, finished ones come from each
queue's capped list of recent ids and its dead-letter queue."""

from __future__ import annotations

from typing import Any

from .queue import JobQueue


class JobStore:
    """``JobStore(redis_url=None)``: get_job, get_all_jobs (paged), delete_job, get_stats."""

    def __init__(self, redis_url: str | None = None, *, queue: JobQueue | None = None,
                 redis_host: str | None = None, redis_port: int = 6379) -> None:
        if queue is None:
            if redis_url is None and redis_host is not None:
                redis_url = f"redis://{redis_host}:{redis_port}/0"  # host and port, as a URL
            queue = JobQueue(redis_url=redis_url)
        self.queue = queue
        self.broker = queue.broker

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        job = self.queue.get_job(job_id)
        return job.to_dict() if job is not None else None

    def get_all_jobs(self, limit: int = 100, cursor: int = 0,
                     include_finished: bool = True) -> list[dict[str, Any]]:
        """Up to ``limit`` jobs: live ones first (pending, scheduled, running...), then the
        recently finished and failed ones. Use :meth:`page` to go on from a cursor."""
        return self.page(limit, cursor, include_finished)[0][:limit]

    def page(self, limit: int = 100, cursor: int = 0,
             include_finished: bool = True) -> tuple[list[dict[str, Any]], int]:
        """(jobs, next cursor); the next cursor is 0 when there are no more live jobs. A page
        holds about ``limit`` jobs (HSCAN's count is a hint, and none is dropped)."""
        out: list[dict[str, Any]] = []
        while len(out) < limit:
            cursor, chunk = self.broker.scan_jobs(cursor, min(limit, 1000))
            for job_id in chunk:
                job = self.get_job(job_id)
                if job is not None:
                    out.append(job)
            if cursor == 0:
                break
        if cursor == 0 and include_finished and len(out) < limit:
            seen = {j["id"] for j in out}
            for queue in self.broker.queue_names():
                ids = self.broker.recent_ids(queue, limit) + \
                    self.broker.dlq_ids(queue, 0, limit, newest_first=True)
                for job_id in ids:
                    if len(out) >= limit:
                        break
                    if job_id not in seen:
                        job = self.get_job(job_id)
                        if job is not None:
                            out.append(job)
                            seen.add(job_id)
        return out, cursor

    def delete_job(self, job_id: str) -> bool:
        """Forget a job. A finished one's record is deleted. One that has not started is
        cancelled instead: it never runs, and its record (cancelled) stays until it expires,
        because it marks the id left in its queue. A running job is not deleted (cancel it).
        """
        if self.broker.active_holder(job_id) is not None:
            return False
        if self.queue.cancel_job(job_id) == "cancelled":
            return True
        return self.broker.delete_record(job_id)

    def get_stats(self) -> dict[str, int]:
        """Totals over every queue: ``total`` (enqueued), completed, failed, pending,
        processing and the other counters."""
        totals: dict[str, int] = {}
        for queue in self.broker.queue_names():
            q = JobQueue(queue, redis_url=self.queue.url, config=self.queue.config,
                         connection=self.queue.redis)
            for key, value in q.get_stats().items():
                totals[key] = totals.get(key, 0) + value
        for key in ("completed", "failed", "pending", "processing"):
            totals.setdefault(key, 0)
        totals["total"] = totals.get("enqueued", 0)
        return totals
