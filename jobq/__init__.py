"""jobq: a durable Redis job queue with a pre-fork master, built for CPU-heavy batch pipelines.

    from jobq import JobQueue, task

    @task(timeout=60)
    def resize(path): ...

    resize.delay("a.png")                      # or JobQueue().enqueue(resize, "a.png")
"""

from .context import current_job
from .exceptions import (
    JobCancelled,
    JobFailed,
    JobqError,
    JobTimeout,
    PayloadTooLarge,
    ReplicationTimeout,
    Retry,
    SerializationError,
    TaskNotAllowed,
    UnknownJob,
)
from .job import Job, JobStatus
from .queue import JobQueue, Queue
from .registry import Task, task

__version__ = "0.1.0"

__all__ = [
    "Job", "JobStatus", "JobQueue", "Queue", "Task", "task", "current_job",
    "JobqError", "JobTimeout", "JobCancelled", "JobFailed", "Retry", "SerializationError",
    "PayloadTooLarge", "ReplicationTimeout", "TaskNotAllowed", "UnknownJob",
]


def __getattr__(name: str) -> object:
    # WorkerPool, Scheduler and JobStore pull in more machinery: import them on first use
    if name == "WorkerPool":
        from .pool import WorkerPool
        return WorkerPool
    if name == "Scheduler":
        from .scheduler import Scheduler
        return Scheduler
    if name == "JobStore":
        from .store import JobStore
        return JobStore
    raise AttributeError(f"module 'jobq' has no attribute {name!r}")
