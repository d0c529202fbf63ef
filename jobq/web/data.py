"""What the dashboard's pages show, read through jobq's own API (the reads of ``jobq info``,
``jobq job``, ``jobq dlq list``, ``jobq schedule list``, ``jobq wait``), each cached for a
second (:mod:`.cache`): a page costs the server a few batched calls, however many look."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .. import info
from ..exceptions import UnknownJob
from ..groups import Group, Progress
from ..job import Job
from ..queue import JobQueue
from ..scheduler import Scheduler
from .cache import TtlCache

#: Jobs a dead-letter page lists (newest first), and parents, dependents and group jobs a
#: page reads one by one (the rest are named by id, or counted).
DLQ_PAGE = 50
RELATED_SHOWN = 20


@dataclass
class JobPage:
    """A job, and the jobs around it."""

    job: Job
    #: (id, status or None when its record is gone), for each parent
    parents: list[tuple[str, str | None]] = field(default_factory=list)
    #: the deferred jobs still waiting for this one
    dependents: list[str] = field(default_factory=list)


@dataclass
class GroupPage:
    id: str
    progress: Progress
    total_jobs: int
    chunksize: int
    #: the first jobs of the group, in input order: (id, status or None)
    jobs: list[tuple[str, str | None]]


class Dashboard:
    """The pages' reads, for one server and key prefix (``queue``'s)."""

    def __init__(self, queue: JobQueue, *, cache: TtlCache | None = None) -> None:
        self.queue = queue
        self.cache = cache or TtlCache()
        self._queues: dict[str, JobQueue] = {queue.name: queue}

    def handle(self, name: str) -> JobQueue:
        """A handle on queue ``name``, sharing this dashboard's connection."""
        if name not in self._queues:
            self._queues[name] = JobQueue(name, config=self.queue.config,
                                          connection=self.queue.redis)
        return self._queues[name]

    def forget(self) -> None:
        """After an action: the next page reads afresh."""
        self.cache.clear()

    # -- pages ---------------------------------------------------------------------------------
    def overview(self) -> dict[str, Any]:
        """Queues with counts and rates, masters and their workers, the leader (jobq info)."""
        return self.cache.get("overview", lambda: info.collect(self.queue.broker))

    def queue_names(self) -> list[str]:
        return [q["queue"] for q in self.overview()["queues"]]

    def job(self, job_id: str) -> JobPage | None:
        return self.cache.get(("job", job_id), lambda: self._job(job_id))

    def _job(self, job_id: str) -> JobPage | None:
        job = self.queue.get_job(job_id)
        if job is None:
            return None
        parents = [(p, self.queue.get_status(p)) for p in job.depends_on[:RELATED_SHOWN]]
        parents += [(p, None) for p in job.depends_on[RELATED_SHOWN:]]
        return JobPage(job, parents, self.queue.broker.dependents(job_id))

    def dead_letters(self, queue: str) -> tuple[list[Job], int]:
        """The newest failed jobs of ``queue``'s dead-letter queue, and how many it holds."""
        q = self.handle(queue)
        return self.cache.get(("dlq", queue),
                              lambda: (q.failed_jobs(limit=DLQ_PAGE), q.failed_count()))

    def schedules(self) -> tuple[list[dict[str, Any]], str | None]:
        """Every schedule (jobq schedule list), and the leading scheduler."""
        sched = Scheduler(self.queue)
        return self.cache.get("schedules", lambda: (sched.list(), sched.leader()))

    def group(self, group_id: str) -> GroupPage | None:
        return self.cache.get(("group", group_id), lambda: self._group(group_id))

    def _group(self, group_id: str) -> GroupPage | None:
        try:
            group = Group(self.queue, group_id)
        except UnknownJob:
            return None
        ids = group.job_ids()[:RELATED_SHOWN]
        return GroupPage(group_id, group.progress(), group.total, group.chunksize,
                         [(i, self.queue.get_status(i)) for i in ids])
