"""``queue.map``: a batch of jobs over an iterable, with progress and ordered results.

It is the durable, multi-host equivalent of ``multiprocessing.Pool.map``: the items are jobs
in Redis, any worker on any host runs them, a killed worker's item is retried, and
``results()`` yields in input order as they arrive.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import click

from . import serialization
from .broker import Broker
from .exceptions import JobFailed, SerializationError, UnknownJob
from .job import Job, JobStatus
from .wire import BadJob, Facts, read_record

#: How long a group's bookkeeping (and its jobs' results) is kept (seconds).
GROUP_TTL = 86400
#: The task name of a chunk of items (``chunksize`` > 1); workers run it with
#: :func:`run_chunk`, which resolves the real task through the worker's allow-list.
CHUNK_TASK = "jobq.groups:map_chunk"


class GroupQueue(Protocol):
    """What a group handle needs of its queue (a :class:`jobq.JobQueue`)."""

    broker: Broker

    def wait(self, job_id: str, timeout: float | None = None) -> Job: ...

    def cancel(self, job_id: str, reason: str = ...) -> bool: ...


def run_chunk(resolve: Callable[[str], Callable[..., Any]], task_name: str, items: list[Any],
              start: int) -> list[Any]:
    """Run ``task(item)`` for each item of a chunk; a failure names the item's index."""
    fn = resolve(task_name)
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


def item_error(exc: SerializationError, items: list[Any], chunksize: int,
               job_index: int) -> SerializationError:
    """A map job JSON cannot carry, as the error of its item: "item 7: ...", the index in the
    input (the job's own message says "argument 0", or names its chunk's list)."""
    start = job_index * chunksize
    for offset, item in enumerate(items[start:start + chunksize]):
        try:
            serialization.encode_args([item], {})
        except SerializationError as bad:
            problem = str(bad).removeprefix("argument 0: ")
            return SerializationError(f"item {start + offset}: {problem}")
    return exc  # not an item's fault (a job option)


@dataclass(frozen=True)
class Progress:
    """Items of a ``map`` done, failed, and in all (with ``chunksize``, each chunk counts as
    its items)."""

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

    def __init__(self, queue: GroupQueue, group_id: str) -> None:
        self.queue = queue
        self.id = group_id
        self._broker = queue.broker
        meta = self._broker.group_meta(group_id)
        if not meta:
            raise UnknownJob(f"no group with id {group_id!r}")
        self.total = int(meta["total"])  # jobs
        self.items = int(meta.get("items", self.total))
        self.chunksize = int(meta.get("chunk", 1))
        #: the group counts its items itself (made by a jobq that knew the last chunk's size)
        self._counts_items = "lastn" in meta

    def __repr__(self) -> str:
        return f"<Group {self.id} {self.items} items>"

    def job_ids(self) -> list[str]:
        return self._broker.group_job_ids(self.id)

    def progress(self) -> Progress:
        """Items done and failed, out of all the items (a chunk counts as its items)."""
        return _progress(self.items, self.total, self.chunksize, self._counts_items,
                         *self._broker.group_progress(self.id))

    def wait(self, timeout: float | None = None, progress: bool = False) -> bool:
        """Block until every job of the group finished; True, or False on timeout.
        With ``progress``, a progress bar is drawn on a terminal."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _Bar(self.items) if progress else None
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
                self._broker.wait_group(self.id, max(left, 0.01))
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

    def outcomes(self) -> list[Any]:
        """Every item's result in input order, read now, without waiting: for a group that
        ended (a job that ran with ``depends_on=group`` reads it through
        ``current_job().group_results()``). A failed or cancelled item's place holds its
        :class:`ItemFailed` (with chunks, each item of its chunk does), never None; so does
        one whose record is gone (``result_ttl`` passed, its queue deleted) or that has not
        ended (status "unknown")."""
        ids = self.job_ids()
        out: list[Any] = []
        for chunk_no, (job_id, raw) in enumerate(
                zip(ids, self._broker.final_records(ids), strict=True)):
            start = chunk_no * self.chunksize
            try:
                facts = Facts.from_json(read_record(raw)[1]) if raw is not None else Facts()
            except BadJob as exc:
                facts = Facts(status="unknown", final_error={"type": "BadJob", "msg": str(exc)})
            if facts.status == JobStatus.COMPLETED.value:
                out.extend(facts.result if self.chunksize > 1 else [facts.result])
                continue
            last = facts.final_error or (facts.errors or [{}])[-1]
            if facts.status is None:
                last = {"type": "Unknown", "msg": "no record of how it ended (not ended, its "
                        "result_ttl passed, or its queue was deleted)"}
            message = str(last.get("msg", ""))
            failure = ItemFailed(_item_index(message, start), JobFailed(
                job_id, str(last.get("type", "Error")), message, str(last.get("tb", "")),
                status=facts.status or "unknown"))
            out.extend([failure] * min(self.chunksize, self.items - start))
        return out

    def cancel(self) -> int:
        """Cancel every job of the group that has not finished; returns how many."""
        return sum(self.queue.cancel(i) for i in self.job_ids())


def _progress(items: int, jobs: int, chunksize: int, counts_items: bool, done: int,
              failed: int, done_items: int, failed_items: int) -> Progress:
    """A group's progress from its counts: of jobs (``done``, ``failed``), and of items when
    it ``counts_items`` (a group of chunks made by a jobq that knew its last chunk's size)."""
    if chunksize == 1:
        return Progress(done, failed, items)
    if counts_items:
        return Progress(done_items, failed_items, items)
    # a group made before groups counted items: whole chunks, the short last one unknown
    failed_items = min(failed * chunksize, items)
    left = items - failed_items
    if done + failed < jobs:
        left = min(done * chunksize, left)
    return Progress(left, failed_items, items)


@dataclass(frozen=True)
class GroupSummary:
    """A group as a list of groups shows it (:meth:`jobq.JobQueue.recent_groups`)."""

    id: str
    #: the task of its items (``module:function``), "" when the group does not say
    task: str
    #: when ``map`` made it (epoch seconds)
    created: float
    progress: Progress
    #: its jobs (fewer than its items with ``chunksize``), and the items per job
    jobs: int
    chunksize: int

    @classmethod
    def from_meta(cls, group_id: str, created: float,
                  meta: dict[str, str]) -> GroupSummary | None:
        """From a group's bookkeeping (``{ns}:g:<group>``); None if it is not a group's."""
        try:
            jobs = int(meta["total"])
            items = int(meta.get("items", jobs))
            chunksize = int(meta.get("chunk", 1))
            counts = [int(meta.get(f) or 0) for f in ("done", "failed", "done_items",
                                                      "failed_items")]
        except (KeyError, ValueError):
            return None
        return cls(group_id, meta.get("task", ""), created,
                   _progress(items, jobs, chunksize, "lastn" in meta, *counts), jobs,
                   chunksize)


def recent_groups(broker: Broker, limit: int) -> list[GroupSummary]:
    """The ``limit`` groups made last that still exist, newest first."""
    found = (GroupSummary.from_meta(*entry) for entry in broker.recent_groups(limit))
    return [g for g in found if g is not None]


def _item_index(message: str, default: int) -> int:
    if message.startswith("item "):
        head = message[5:].split(":", 1)[0]
        if head.isdigit():
            return int(head)
    return default


class _Bar:
    """A progress bar on a terminal (click's), a line per 10% elsewhere."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.shown = 0
        self.tty = sys.stderr.isatty()
        self.bar = click.progressbar(length=total, label="items", file=sys.stderr,
                                     show_pos=True, show_percent=True) if self.tty else None
        if self.bar:
            self.bar.__enter__()
        self.last_tenth = -1

    def update(self, p: Progress) -> None:
        now = p.done + p.failed
        if self.bar:
            self.bar.update(now - self.shown)
            self.bar.label = f"items ({p.failed} failed)" if p.failed else "items"
        elif self.total and now * 10 // self.total != self.last_tenth:
            self.last_tenth = now * 10 // self.total
            print(f"{now}/{self.total} done, {p.failed} failed", file=sys.stderr, flush=True)
        self.shown = now

    def close(self) -> None:
        if self.bar:
            self.bar.__exit__(None, None, None)
