"""Every exception jobq raises, in one place."""

from __future__ import annotations

from typing import Any


class JobqError(Exception):
    """Base class of jobq's own errors."""


class SerializationError(JobqError, TypeError):
    """An argument or result cannot be carried as JSON."""


class PayloadTooLarge(JobqError, ValueError):
    """An encoded job is over the configured ``max_payload_bytes``."""


class TaskNotAllowed(JobqError):
    """A job names a task that this worker does not allow (unknown module, not registered)."""


class TaskImportError(JobqError):
    """A task module (``-I``, ``imports = [...]``) failed to import; the message names it."""


class UnknownTask(JobqError, LookupError):
    """``enqueue(name, ..., strict=True)``: no running worker announced a task of that name
    (see :mod:`jobq.catalog`)."""


class UnknownJob(JobqError, KeyError):
    """No job with this id exists (never enqueued, or its record expired)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown job"


class ReplicationTimeout(JobqError):
    """``enqueue(..., wait_replicas=N)``: the jobs WERE enqueued on the primary, but fewer
    than N replicas acknowledged them within ``wait_replicas_timeout``; a failover before
    the replicas catch up would lose them. ``jobs`` holds the Job objects (when raised by
    :class:`~jobq.queue.JobQueue`), ``job_ids`` their ids."""

    def __init__(self, job_ids: list[str], wanted: int, acknowledged: int,
                 timeout: float) -> None:
        what = f"job {job_ids[0]}" if len(job_ids) == 1 else \
            f"{len(job_ids)} jobs ({', '.join(job_ids[:3])}{', ...' if len(job_ids) > 3 else ''})"
        super().__init__(f"{what} enqueued on the primary, but confirmed by {acknowledged} of "
                         f"{wanted} replica(s) within {timeout:g} s: a failover before they "
                         "catch up would lose it")
        self.job_ids = job_ids
        self.wanted = wanted
        self.acknowledged = acknowledged
        self.timeout = timeout
        self.jobs: list[Any] = []


class JobFailed(JobqError):
    """Raised by :meth:`Job.result` when the job ended failed or cancelled.

    Carries the remote exception's type name, message and traceback text.
    """

    def __init__(self, job_id: str, exc_type: str, message: str, traceback: str = "",
                 status: str = "failed") -> None:
        super().__init__(f"job {job_id} {status}: {exc_type}: {message}")
        self.job_id = job_id
        self.exc_type = exc_type
        self.message = message
        self.traceback = traceback
        self.status = status


class JobTimeout(JobqError):
    """Raised inside a job when its time limit runs out (SIGALRM); the job may clean up.

    A job that swallows it and runs on is killed by the master at the hard limit.
    """


class JobCancelled(JobqError):
    """Raised inside a running job that was cancelled (the master signals its worker)."""


class Retry(JobqError):
    """Raise from inside a job to ask for another attempt, optionally after ``delay`` seconds."""

    def __init__(self, delay: float | None = None, message: str = "retry requested") -> None:
        super().__init__(message)
        self.delay = delay


class MetricsError(JobqError):
    """Metrics cannot be served (the ``metrics`` extra is missing, the port is taken, ...);
    the message is one line."""
