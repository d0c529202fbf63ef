"""``queue.map``: a batch of jobs over an iterable, with progress and ordered results.

It is the durable, multi-host equivalent of ``multiprocessing.Pool.map``: the items are jobs
in Redis, any worker on any host runs them, a killed worker's item is retried, and
``results()`` yields in input order as they arrive.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .exceptions import JobFailed, UnknownJob
from .job import JobStatus
from .registry import task

if TYPE_CHECKING:
    from .queue import JobQueue

#: How long a group's bookkeeping (and its jobs' results) is kept (seconds).
GROUP_TTL = 86400
#: The name of the chunk runner (always allowed: it resolves the real task through the
#: worker's allow-list).
CHUNK_TASK = "jobq.groups:map_chunk"


@task(name=CHUNK_TASK)
def map_chunk(task_name: str, items: list[Any], start: int) -> list[Any]:
    """Run ``task(item)`` for each item of a chunk; a failure names the item's index."""
    from . import context

    if context.worker is None:
        raise RuntimeError("map_chunk runs inside a jobq worker")
    fn = context.worker.resolver.resolve(task_name)
    out = []
    for offset, item in enumerate(items):
        try:
            out.append(fn(item))
        except Exception as exc:
            message = f"item {start + offset}: {exc}"
            try:
                renamed = type(exc)(message)
            except Exception:  # an exception type that wants other arguments
                renamed = RuntimeError(f"{type(exc).__name__}: {message}")
            raise renamed from exc
    return out


@dataclass(frozen=True)
class Progress:
    done: int
    failed: int
    total: int

    @property
    def finished(self) -> bool:
        return self.done + self.failed >= self.total


class ItemFailed(JobFailed):
    """A ``queue.map`` item failed; ``index`` is its position in the input."""

    def __init__(self, index: int, cause: JobFailed) -> None:
        super().__init__(cause.job_id, cause.exc_type, cause.message, cause.traceback,
                         cause.status)
        self.index = index
        self.args = (f"item {index} (job {cause.job_id}) {cause.status}: {cause.exc_type}: "
                     f"{cause.message}",)


class Group:
    """A handle on a ``queue.map`` batch: progress, wait (with a progress bar), results."""

    def __init__(self, queue: JobQueue, group_id: str) -> None:
        self.queue = queue
        self.id = group_id
        k = queue.keys.base
        self._hash, self._ids, self._wake = f"{k}:g:{group_id}", f"{k}:gi:{group_id}", \
            f"{k}:gw:{group_id}"
        meta = queue.redis.hgetall(self._hash)
        if not meta:
            raise UnknownJob(f"no group with id {group_id!r}")
        self.total = int(meta["total"])
        self.items = int(meta.get("items", self.total))
        self.chunksize = int(meta.get("chunk", 1))

    def __repr__(self) -> str:
        return f"<Group {self.id} {self.items} items>"

    def job_ids(self) -> list[str]:
        return list(self.queue.redis.lrange(self._ids, 0, -1))

    def progress(self) -> Progress:
        """Jobs done and failed (chunks, with chunksize > 1) out of the total."""
        done, failed = self.queue.redis.hmget(self._hash, "done", "failed")
        return Progress(int(done or 0), int(failed or 0), self.total)

    def wait(self, timeout: float | None = None, progress: bool = False) -> bool:
        """Block until every job of the group finished; True, or False on timeout.
        With ``progress``, a progress bar is drawn on a terminal."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _Bar(self.total) if progress else None
        try:
            while True:
                p = self.progress()
                if bar:
                    bar.update(p)
                if p.finished:
                    return True
                left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if left <= 0:
                    return False
                # each finished job pushes a token; the 1 s cap redraws a quiet bar
                self.queue.redis.blpop([self._wake], timeout=max(left, 0.01))
        finally:
            if bar:
                bar.close()

    def results(self, timeout: float | None = None,
                return_exceptions: bool = False) -> Iterator[Any]:
        """Yield the results in input order, each as soon as it (and those before it)
        arrived. A failed item raises :class:`ItemFailed` (naming its index), or is yielded
        as that exception with ``return_exceptions``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for chunk_no, job_id in enumerate(self.job_ids()):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            job = self.queue.wait(job_id, left)
            start = chunk_no * self.chunksize
            if job.status is JobStatus.COMPLETED:
                if self.chunksize > 1:
                    yield from job.return_value
                else:
                    yield job.return_value
                continue
            try:
                job.result(timeout=0)
            except JobFailed as exc:
                failure = ItemFailed(_item_index(exc.message, start), exc)
            if not return_exceptions:
                raise failure
            count = min(self.chunksize, self.items - start)
            for _ in range(count):
                yield failure

    def cancel(self) -> int:
        """Cancel every job of the group that has not finished; returns how many."""
        return sum(self.queue.cancel(i) for i in self.job_ids())


def _item_index(message: str, default: int) -> int:
    if message.startswith("item "):
        head = message[5:].split(":", 1)[0]
        if head.isdigit():
            return int(head)
    return default


def enqueue_map(queue: JobQueue, func: Callable[..., Any] | str, iterable: Iterable[Any], *,
                chunksize: int | None = None, **options: Any) -> Group:
    """See :meth:`JobQueue.map`."""
    from .job import new_id, task_name

    items = list(iterable)
    size = chunksize or 1
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"chunksize must be a positive integer, got {chunksize!r}")
    name = task_name(func)
    group_id = new_id()
    options.setdefault("result_ttl", GROUP_TTL)
    jobs = []
    for index, start in enumerate(range(0, len(items), size)):
        if size == 1:
            job = queue._build(func, (items[start],), None, dict(options))
        else:
            job = queue._build(CHUNK_TASK, (name, items[start:start + size], start), None,
                               dict(options))
        job.group, job.group_index = group_id, index
        jobs.append(job)
    for j in jobs:
        queue._encode(j)  # refuse a bad item before anything is written
    k = queue.keys.base
    pipe = queue.redis.pipeline()
    pipe.hset(f"{k}:g:{group_id}", mapping={"total": len(jobs), "items": len(items),
                                            "chunk": size, "done": 0, "failed": 0,
                                            "task": name, "created": time.time()})
    for start in range(0, len(jobs), 5000):
        pipe.rpush(f"{k}:gi:{group_id}", *[j.id for j in jobs[start:start + 5000]])
    pipe.expire(f"{k}:g:{group_id}", GROUP_TTL)
    pipe.expire(f"{k}:gi:{group_id}", GROUP_TTL)
    pipe.execute()
    if jobs:
        queue.enqueue_many(jobs)
    return Group(queue, group_id)


class _Bar:
    """A progress bar on a terminal (click's), a line per 10% elsewhere."""

    def __init__(self, total: int) -> None:
        import click

        self.total = total
        self.shown = 0
        self.tty = sys.stderr.isatty()
        self.bar = click.progressbar(length=total, label="jobs", file=sys.stderr,
                                     show_pos=True, show_percent=True) if self.tty else None
        if self.bar:
            self.bar.__enter__()
        self.last_tenth = -1

    def update(self, p: Progress) -> None:
        now = p.done + p.failed
        if self.bar:
            self.bar.update(now - self.shown)
            self.bar.label = f"jobs ({p.failed} failed)" if p.failed else "jobs"
        elif self.total and now * 10 // self.total != self.last_tenth:
            self.last_tenth = now * 10 // self.total
            print(f"{now}/{self.total} done, {p.failed} failed", file=sys.stderr, flush=True)
        self.shown = now

    def close(self) -> None:
        if self.bar:
            self.bar.__exit__(None, None, None)
