"""What a running job can know about itself: ``jobq.current_job()``.

    @jobq.task
    def report(day):
        parents = jobq.current_job().parent_results()   # {parent id: its result}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .queue import JobQueue
    from .worker import Worker

#: (job id, queue, spec) of the job running in this process, set by the worker per job:
#: a tuple assignment, so the hot path pays nothing for contexts nobody asks for.
running: tuple[str, str, dict[str, Any]] | None = None
#: The worker of this process.
worker: Worker | None = None


class JobContext:
    """The running job: its id, task, queue, attempt, parents; and its parents' results."""

    def __init__(self, job_id: str, queue: str, spec: dict[str, Any]) -> None:
        self.id = job_id
        self.queue = queue
        self.task = spec.get("t", "")
        self.parents: list[str] = list(spec.get("dep") or [])
        self.group: str | None = spec.get("g")
        self.group_index: int | None = spec.get("gi")

    def parent_results(self) -> dict[str, Any]:
        """Each parent's result, by id (parents completed before this job started; their
        records are kept for their ``result_ttl``)."""
        queue = _queue()
        out = {}
        for parent in self.parents:
            job = queue.get_job(parent)
            out[parent] = job.return_value if job is not None else None
        return out

    def __repr__(self) -> str:
        return f"<JobContext {self.id} {self.task}>"


def current_job() -> JobContext | None:
    """The job running in this worker process, or None outside a job."""
    if running is None:
        return None
    return JobContext(*running)


_queues: dict[int, JobQueue] = {}


def _queue() -> JobQueue:
    import os

    from .queue import JobQueue

    queue = _queues.get(os.getpid())
    if queue is None:
        if worker is None:
            raise RuntimeError("no jobq worker runs in this process")
        queue = _queues[os.getpid()] = JobQueue(redis_url=worker.url, config=worker.config)
    return queue
