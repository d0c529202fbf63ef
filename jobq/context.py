"""What a running job can know about itself: ``jobq.current_job()``.

    @jobq.task
    def report(day):
        parents = jobq.current_job().parent_results()   # {parent id: its result}
        items = jobq.current_job().group_results()      # a map group's, in input order

The worker loop fills this module in (it sits above it); the job reads it.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from .config import Config
from .keys import Keys
from .queue import JobQueue
from .wire import Facts, Spec, read_state


class WorkerInfo(Protocol):
    """What a job may learn of the worker running it."""

    name: str
    url: str
    config: Config
    keys: Keys


#: (job id, queue, spec, state as claimed) of the job running in this process, set by the
#: worker per job: a tuple assignment, so the hot path pays nothing for contexts nobody asks
#: for (the state is decoded only when the job asks).
running: tuple[str, str, Spec, str | None] | None = None
#: The worker of this process (None outside a worker).
worker: WorkerInfo | Any = None


class JobContext:
    """The running job: its id, task, queue, attempt, parents (jobs, and ``queue.map``
    groups), group; and its parents' results.

    ``attempt`` is this attempt's number, from 1 (since the job was enqueued or last
    requeued); ``retries`` the attempts before it (``attempt - 1``), out of ``max_retries``;
    ``deliveries`` the times a worker took the job, this time included; ``requeues`` the
    times it was requeued (the README defines each)."""

    def __init__(self, job_id: str, queue: str, spec: Spec, state: str | None = None) -> None:
        self.id = job_id
        self.queue = queue
        self.task = spec.task
        self.parents: list[str] = list(spec.depends_on)
        #: the ``queue.map`` groups it waited for (``depends_on=group``)
        self.parent_groups: list[str] = list(spec.depends_on_groups)
        self.group: str | None = spec.group
        self.group_index: int | None = spec.group_index
        self.max_retries = spec.max_retries
        before = Facts.from_json(read_state(state))  # what the attempts before this one left
        self.attempt = before.attempts + 1
        self.retries = before.attempts
        self.deliveries = before.deliveries + 1
        self.requeues = before.requeues

    def parent_results(self) -> dict[str, Any]:
        """Each parent's result, by id (parents completed before this job started; their
        records are kept for their ``result_ttl``)."""
        queue = _queue()
        out = {}
        for parent in self.parents:
            job = queue.get_job(parent)
            out[parent] = job.return_value if job is not None else None
        return out

    def group_results(self, group_id: str | None = None) -> list[Any]:
        """The results of a ``queue.map`` group this job waited for (``depends_on=group``),
        one per item, in input order (with chunks too); a failed or cancelled item's place
        holds its :class:`~jobq.groups.ItemFailed` (index, error type, message), never None.
        ``group_id`` may be left out when the job waited for one group."""
        if group_id is None:
            if len(self.parent_groups) != 1:
                raise ValueError(f"this job waited for {len(self.parent_groups)} groups "
                                 f"({', '.join(self.parent_groups) or 'none'}): name one")
            group_id = self.parent_groups[0]
        return _queue().group(group_id).outcomes()

    def __repr__(self) -> str:
        return f"<JobContext {self.id} {self.task} attempt {self.attempt}>"


def current_job() -> JobContext | None:
    """The job running in this worker process, or None outside a job."""
    if running is None:
        return None
    return JobContext(*running)


_queues: dict[int, JobQueue] = {}


def _queue() -> JobQueue:
    """A queue on the worker's server, made once per process (a forked worker makes its own)."""
    queue = _queues.get(os.getpid())
    if queue is None:
        if worker is None:
            raise RuntimeError("no jobq worker runs in this process")
        queue = _queues[os.getpid()] = JobQueue(redis_url=worker.url, config=worker.config,
                                                prefix=worker.keys.prefix)
    return queue
