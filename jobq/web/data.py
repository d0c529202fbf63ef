"""What the dashboard's pages show, read through jobq's own API (the reads of ``jobq info``,
``jobq job``, ``jobq dlq list``, ``jobq schedule list``, ``jobq limit list``, ``jobq wait``),
each cached for a second (:mod:`.cache`): a page costs the server a few batched calls, however
many look. The one read that scans the keyspace (the names of limits with state on the
server, undefined ones among them) is kept for :data:`LIMIT_NAMES_TTL`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .. import info
from ..exceptions import UnknownJob
from ..groups import Group, GroupSummary, Progress
from ..job import Job
from ..queue import JobQueue
from ..scheduler import Scheduler
from .cache import TtlCache

#: Jobs a dead-letter page lists (newest first), and parents, dependents and group jobs a
#: page reads one by one (the rest are named by id, or counted).
DLQ_PAGE = 50
RELATED_SHOWN = 20
#: Groups the groups page lists (the newest).
GROUPS_SHOWN = 50
#: How long the names of the limits with state on the server are kept (seconds): finding
#: them is a SCAN of the namespace, as long as it holds keys (a record per finished job). A
#: limit defined meanwhile shows at once (the definitions are read each time); one deleted
#: while it still holds jobs, or left with state by a deleted one, within this time.
LIMIT_NAMES_TTL = 30.0


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

    def __init__(self, queue: JobQueue, *, cache: TtlCache | None = None,
                 limit_names_ttl: float = LIMIT_NAMES_TTL) -> None:
        self.queue = queue
        self.cache = cache or TtlCache()
        self.limit_names_ttl = limit_names_ttl
        self._queues: dict[str, JobQueue] = {queue.name: queue}

    def handle(self, name: str) -> JobQueue:
        """A handle on queue ``name``, sharing this dashboard's connection and namespace (on a
        Cluster, the dashboard shows one queue group's)."""
        if name not in self._queues:
            self._queues[name] = JobQueue(name, config=self.queue.config,
                                          prefix=self.queue.keys.prefix,
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
        broker = self.queue.broker  # only the ids shown are read: a group may hold millions
        ids = broker.group_job_ids(group_id, 0, RELATED_SHOWN - 1)
        return GroupPage(group_id, group.progress(), broker.group_job_count(group_id),
                         group.chunksize, [(i, self.queue.get_status(i)) for i in ids])

    def limits(self) -> dict[str, dict[str, Any]]:
        """Every limit defined or in use, and its use now (``jobq limit list``)."""
        def read() -> dict[str, dict[str, Any]]:
            in_use = self.cache.get("limit-names", self.queue.broker.limit_names_in_use,
                                    ttl=self.limit_names_ttl)
            return self.queue.limit_use(in_use)

        return self.cache.get("limits", read)

    def groups(self) -> list[GroupSummary]:
        """The groups made last that still exist, newest first."""
        return self.cache.get("groups", lambda: self.queue.recent_groups(GROUPS_SHOWN))
