"""The job: what to run, with which options, and what became of it.

Lifecycle (one enum, :class:`JobStatus`)::

    enqueue ──► pending ──claim──► processing ──ack──► completed
       │  ▲        ▲                   │  │
       │  │        └──── retry ◄───────┘  └─────────► failed ──► dead-letter queue
       │  └─ scheduled (delay/at, retry backoff) ◄─┘
       └──► deferred (depends_on) ──parents done──► pending
    pending / scheduled / deferred / retry ──cancel──► cancelled

A job's spec (task, args, options) is written once at enqueue and never rewritten; attempts,
errors and status changes live beside it, and the final record replaces both when it ends.
"""

from __future__ import annotations

import difflib
import reprlib
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Protocol

from .exceptions import JobFailed, TaskNotAllowed
from .limits import check_name
from .wire import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_PRIORITY,
    DEFAULT_TIMEOUT,
    MAX_TIMEOUT,
    MAX_TTL,
    QUEUE_NAME,
    TASK_NAME,
    BadJob,
    Facts,
    Spec,
    exception_name,
    spec_json,
)

#: Set when this process started a worker pool itself (:class:`jobq.worker.WorkerPool`): its
#: workers are forked from it, so functions of ``__main__`` exist there too and may be
#: enqueued; ``main_owner`` names that pool (its jobs are routed to it alone, see wire.route).
main_tasks_allowed = False
main_owner: str | None = None


class JobSource(Protocol):
    """Where a job read back came from (a :class:`jobq.JobQueue`): it can wait for it."""

    def wait(self, job_id: str, timeout: float | None = None) -> Job: ...

    def get_job(self, job_id: str) -> Job | None: ...


class JobStatus(str, Enum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    RETRY = "retry"
    SCHEDULED = "scheduled"
    DEFERRED = "deferred"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


def task_name(func: Callable[..., Any] | str) -> str:
    """The name a worker resolves: ``module:function``, or a registered task's name."""
    if isinstance(func, str):
        if not TASK_NAME.match(func):
            raise ValueError(f"task name {func!r} is not of the form 'package.module:function'")
        return func
    name = getattr(func, "task_name", None)
    if isinstance(name, str):
        return name
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not callable(func) or not module or not qualname:
        raise TypeError(f"a job needs a function or a 'module:function' name, got {func!r}")
    if "<" in qualname or "." in qualname:
        raise ValueError(
            f"{qualname!r} is not a module-level function: workers find tasks by name, "
            "so define it at the top level of a module"
        )
    return f"{module}:{qualname}"


def check_enqueueable(name: str) -> None:
    """Refuse, at enqueue time, a task of ``__main__`` that no worker can have."""
    if name.startswith("__main__:") and not main_tasks_allowed:
        raise TaskNotAllowed(
            f"task {name!r} is defined in the __main__ script, which workers cannot import: "
            "move it to a module and start workers with -I that.module "
            "(or start the WorkerPool from this script, so its workers are forked from it)"
        )


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _ts(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value is not None else None


def _check_int(name: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_number(name: str, value: Any, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


class Job:
    """A unit of work: a task, its arguments and options; and, once read back, its fate.

    ``Job(func, args, kwargs, id=None, priority=0, max_retries=3, timeout=300)``, plus
    ``queue`` and ``result_ttl``. Lower priority numbers run first; equal priorities run in
    enqueue order.
    """

    def __init__(
        self,
        func: Callable[..., Any] | str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        id: str | None = None,
        priority: int = DEFAULT_PRIORITY,
        max_retries: int = DEFAULT_MAX_RETRIES,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        queue: str | None = None,
        result_ttl: int | None = None,
        retry_on: Sequence[type[BaseException] | str] = (),
        dont_retry_on: Sequence[type[BaseException] | str] = (),
        limits: Sequence[str] = (),
    ) -> None:
        self.func = func
        self.task = task_name(func)
        if not isinstance(args, tuple | list) and (
                isinstance(args, str | bytes) or not isinstance(args, Sequence)):
            raise TypeError(f"args must be a tuple or list, got {type(args).__name__}")
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        for key in self.kwargs:
            if not isinstance(key, str):
                raise TypeError(f"keyword argument names must be strings, got {key!r}")
        self.id = id or new_id()
        if not isinstance(self.id, str) or not 0 < len(self.id) <= 128 or not self.id.isprintable():
            raise ValueError(f"job id must be 1-128 printable characters, got {self.id!r}")
        self.priority = _check_int("priority", priority)
        self.max_retries = _check_int("max_retries", max_retries, 0)
        self.timeout = _check_number("timeout", timeout)
        if self.timeout > MAX_TIMEOUT:
            raise ValueError(f"timeout must be at most {MAX_TIMEOUT} s (30 days), got {timeout}")
        #: None until enqueued: then the queue it was enqueued on
        self.queue: str | None = queue or getattr(func, "default_queue", None)
        if self.queue is not None and not QUEUE_NAME.match(self.queue):
            raise ValueError(f"queue name {self.queue!r} must be 1-64 of A-Z a-z 0-9 _ . -")
        self.result_ttl = None if result_ttl is None else _check_int("result_ttl", result_ttl, 0)
        if self.result_ttl is not None and self.result_ttl > MAX_TTL:
            raise ValueError(f"result_ttl must be at most {MAX_TTL} s (100 years), "
                             f"got {result_ttl}")
        #: Exception names: only these are retried / these are never retried
        self.retry_on = exception_names(retry_on, "retry_on")
        self.dont_retry_on = exception_names(dont_retry_on, "dont_retry_on")
        #: the names of the limits the job is subject to (see :mod:`jobq.limits`)
        if isinstance(limits, str) or not isinstance(limits, Sequence):
            raise TypeError(f"limits must be a list of limit names, got {limits!r:.60}")
        self.limits: list[str] = [check_name(n) for n in dict.fromkeys(limits)]
        #: When a delayed job is due (epoch seconds), None to run as soon as possible
        self.due_at: float | None = None
        #: Ids of the jobs this one waits for (``depends_on``), of the ``queue.map`` groups it
        #: waits for (all their items), and what a failed one does
        self.depends_on: list[str] = []
        self.depends_on_groups: list[str] = []
        self.on_parent_failure = "cancel"
        #: ``queue.map``: the group this job belongs to, and its index in the input
        self.group: str | None = None
        self.group_index: int | None = None
        #: the pool that alone can run it (a task of this script's __main__), if any
        self.owner: str | None = main_owner if self.task.startswith("__main__:") else None
        self.status = JobStatus.PENDING
        #: when the job was created (epoch seconds; ``created_at`` is the same as a datetime)
        self.created: float = time.time()
        self.started_at: datetime | None = None
        self.completed_at: datetime | None = None
        self.return_value: Any = None
        self.error: str | None = None
        self.traceback: str | None = None
        self.errors: list[dict[str, Any]] = []
        #: the error that ended the job (type, msg, tb), from the final record
        self.final_error: dict[str, Any] = {}
        #: runs of the job started since it was enqueued or last requeued, a running one
        #: included (see the README: attempts, retries, deliveries)
        self.attempts = 0
        #: times a worker took it: its attempts, and the hosts lost holding it (lapsed
        #: leases) that may not have started it
        self.deliveries = 0
        #: times it was requeued; each requeue starts the counts again, its errors are kept
        self.requeues = 0
        self.worker: str | None = None
        self._queue: JobSource | None = None

    @property
    def retries(self) -> int:
        """The attempts after the first: each one followed an attempt that failed."""
        return max(0, self.attempts - 1)

    @property
    def retry_count(self) -> int:
        """The same as :attr:`retries`, under the tutorial's name."""
        return self.retries

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "task": self.task,
            "args": list(self.args),
            "kwargs": self.kwargs,
            "queue": self.queue,
            "status": self.status.value,
            "priority": self.priority,
            "max_retries": self.max_retries,
            "timeout": self.timeout,
            "result_ttl": self.result_ttl,
            "created_at": self.created_at.isoformat(),
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "completed_at": self.completed_at.isoformat() if self.completed_at else None,
            "result": self.return_value,
            "error": self.error,
            "traceback": self.traceback,
            "errors": self.errors,
            "attempts": self.attempts,
            "retries": self.retries,
            "retry_count": self.retries,
            "deliveries": self.deliveries,
            "requeues": self.requeues,
            "worker": self.worker,
            "due_at": _iso(_ts(self.due_at)),
            "depends_on": self.depends_on,
            "depends_on_groups": self.depends_on_groups,
            "group": self.group,
            "group_index": self.group_index,
        }

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the job to finish and return its result.

        Raises :class:`JobFailed` (remote type, message and traceback) if it failed or was
        cancelled, :class:`TimeoutError` if it is not finished within ``timeout`` seconds.
        """
        if self._queue is None:
            raise RuntimeError("this job was not enqueued or read from a queue")
        job = self._queue.wait(self.id, timeout)
        self.__dict__.update({k: v for k, v in job.__dict__.items() if k != "_queue"})
        if job.status is JobStatus.COMPLETED:
            return job.return_value
        last = job.final_error or (job.errors or [{}])[-1]
        raise JobFailed(job.id, last.get("type", "Error"), last.get("msg", job.error or ""),
                        last.get("tb", ""), status=job.status.value)

    def refresh(self) -> Job:
        if self._queue is None:
            raise RuntimeError("this job was not enqueued or read from a queue")
        fresh = self._queue.get_job(self.id)
        if fresh is not None:
            self.__dict__.update({k: v for k, v in fresh.__dict__.items() if k != "_queue"})
        return self

    def get_status(self) -> JobStatus:
        return self.refresh().status

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.task} {self.status.value}>"

    # -- Redis encoding --------------------------------------------------------------------
    @property
    def created_at(self) -> datetime:
        """When the job was created."""
        return datetime.fromtimestamp(self.created, UTC)

    @created_at.setter
    def created_at(self, value: datetime) -> None:
        self.created = value.timestamp()

    def spec(self) -> dict[str, Any]:
        """The compact spec stored in Redis (see :mod:`jobq.wire`)."""
        return spec_json(self)

    @classmethod
    def from_spec(cls, job_id: str, spec: Any) -> Job:
        """Rebuild a job from a decoded spec; :class:`BadJob` says what is wrong with it."""
        s = Spec.from_json(spec)
        if not TASK_NAME.match(s.task):
            raise BadJob(f"job data has no valid task name (field 't' is {s.task!r:.80})")
        try:
            job = cls(s.task, s.args, s.kwargs, id=job_id, priority=s.priority,
                      max_retries=s.max_retries, timeout=s.timeout, queue=s.queue,
                      result_ttl=s.result_ttl, retry_on=s.retry_on,
                      dont_retry_on=s.dont_retry_on)
        except (TypeError, ValueError) as exc:
            raise BadJob(f"job data has a bad option: {exc}") from None
        job.depends_on = list(s.depends_on)
        job.depends_on_groups = list(s.depends_on_groups)
        job.on_parent_failure = s.on_parent_failure
        job.group, job.group_index = s.group, s.group_index
        job.owner = s.owner
        job.limits = list(s.limits)
        if s.created is not None:
            job.created = s.created
        return job

    def apply_state(self, state: Mapping[str, Any]) -> None:
        """Fold a state or final record (status, attempts, errors, result) into this job."""
        facts = Facts.from_json(state)
        if facts.status:
            self.status = JobStatus(facts.status)
        self.attempts = facts.attempts
        self.deliveries = facts.deliveries
        self.requeues = facts.requeues
        self.errors = facts.errors
        self.final_error = facts.final_error
        shown = facts.final_error or (facts.errors[-1] if facts.errors else None)
        if shown:
            self.error = f"{shown.get('type', 'Error')}: {shown.get('msg', '')}"
            self.traceback = shown.get("tb")
        self.started_at = _ts(facts.started)
        self.completed_at = _ts(facts.finished)
        self.return_value = facts.result
        self.worker = facts.worker


def exception_names(types: Sequence[type[BaseException] | str], option: str) -> list[str]:
    """Exception classes as names (``ValueError``, ``package.module.MyError``) for a spec."""
    if isinstance(types, str | type):
        types = [types]
    names = []
    for t in types:
        if isinstance(t, str) and t:
            names.append(t)
        elif isinstance(t, type) and issubclass(t, BaseException):
            names.append(exception_name(t))
        else:
            raise TypeError(f"{option} takes exception classes or their names, got {t!r}")
    return names


def new_id() -> str:
    """A 24-character id: milliseconds then 52 random bits, so ids sort by creation time."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(7)[:13]}"


def unknown_options(given: Mapping[str, Any], known: Iterable[str], *,
                    what: str = "job option", task_args: str | None = "kwargs") -> TypeError:
    """The error for keywords that are not among ``known`` options: each name, the option it
    may be a typo of, and where a task's own arguments go (``task_args``: "kwargs" for
    ``enqueue(..., kwargs={...})``, "delay" for ``Task.delay(...)``, None for nowhere)."""
    known = sorted(known)
    names = sorted(set(given) - set(known))
    hints, args = [], {}
    for name in names:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        if close:
            hints.append(f"did you mean {close[0]}" + (f" (for {name})?" if len(names) > 1
                                                         else "?"))
        elif name == "kwargs" and task_args == "kwargs":  # given to map or enqueue_many
            hints.append("map and enqueue_many give the task positional arguments only.")
        else:
            args[name] = given[name]
    if args and task_args == "kwargs":
        shown = ", ".join(f"{n!r}: {reprlib.repr(v)}" for n, v in args.items())
        hints.append(f"did you mean kwargs={{{shown}}}? (a task's keyword arguments go in "
                     "kwargs=, the other keywords are job options)")
    elif args and task_args == "delay":
        shown = ", ".join(f"{n}={reprlib.repr(v)}" for n, v in args.items())
        hints.append(f"did you mean .delay(..., {shown})? (the task's own arguments go to "
                     ".delay())")
    elif args:
        hints.append(f"({what}s: {', '.join(known)})")
    head = f"unknown {what}(s): {', '.join(names)}"
    return TypeError(f"{head}{' ' if hints[0][0] == '(' else ': '}{' '.join(hints)}")
