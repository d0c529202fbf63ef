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

import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from enum import Enum
from typing import TYPE_CHECKING, Any

from . import serialization
from .exceptions import JobFailed

if TYPE_CHECKING:
    from .queue import JobQueue

#: Defaults of a job's options (the seed's); a spec omits options equal to these.
DEFAULT_PRIORITY = 0
DEFAULT_MAX_RETRIES = 3
DEFAULT_TIMEOUT = 300.0
DEFAULT_QUEUE = "default"
#: The longest time limit a job may have (30 days, in seconds).
MAX_TIMEOUT = 30 * 86400
#: The longest a job's record may be kept (100 years, in seconds): Redis refuses an expiry
#: much longer than that (SET EX 10**16 is an error, which would fail the whole settle script).
MAX_TTL = 100 * 365 * 86400

#: What a queue name may look like (it becomes part of Redis key names).
QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}\Z")
#: "package.module:function" (``module:Class.method`` is not a task name).
#: ``\Z``, not ``$``: ``$`` also matches before a trailing newline.
TASK_NAME = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*\Z")


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


class BadJob(ValueError):
    """Data found in Redis where a job should be is not a valid job; the text says why."""


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

    ``Job(func, args, kwargs, id=None, priority=0, max_retries=3, timeout=300)`` as in the
    tutorial jobq grew from, plus ``queue`` and ``result_ttl``. Lower priority numbers run
    first; equal priorities run in enqueue order.
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
        #: When a delayed job is due (epoch seconds), None to run as soon as possible
        self.due_at: float | None = None
        #: Ids of the jobs this one waits for (``depends_on``), and what a failed one does
        self.depends_on: list[str] = []
        self.on_parent_failure = "cancel"
        #: ``queue.map``: the group this job belongs to, and its index in the input
        self.group: str | None = None
        self.group_index: int | None = None
        self.status = JobStatus.PENDING
        self.created_at: datetime = datetime.now(UTC)
        self.started_at: datetime | None = None
        self.completed_at: datetime | None = None
        self.return_value: Any = None
        self.error: str | None = None
        self.traceback: str | None = None
        self.errors: list[dict[str, Any]] = []
        #: the error that ended the job (type, msg, tb), from the final record
        self.final_error: dict[str, Any] = {}
        self.retry_count = 0
        self.deliveries = 0
        self.worker: str | None = None
        self._queue: JobQueue | None = None

    # -- the seed's names ------------------------------------------------------------------
    @property
    def attempts(self) -> int:
        return self.retry_count

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
            "retry_count": self.retry_count,
            "deliveries": self.deliveries,
            "worker": self.worker,
            "due_at": _ts(self.due_at).isoformat() if self.due_at else None,
            "depends_on": self.depends_on,
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
    def spec(self) -> dict[str, Any]:
        """The compact spec stored in Redis: options equal to their defaults are left out."""
        spec: dict[str, Any] = {"t": self.task, "a": self.args}
        if self.kwargs:
            spec["k"] = self.kwargs
        if self.queue and self.queue != DEFAULT_QUEUE:
            spec["q"] = self.queue
        if self.priority != DEFAULT_PRIORITY:
            spec["p"] = self.priority
        if self.max_retries != DEFAULT_MAX_RETRIES:
            spec["r"] = self.max_retries
        if self.timeout != DEFAULT_TIMEOUT:
            spec["to"] = self.timeout
        if self.result_ttl is not None:
            spec["ttl"] = self.result_ttl
        if self.retry_on:
            spec["ro"] = self.retry_on
        if self.dont_retry_on:
            spec["dro"] = self.dont_retry_on
        if self.depends_on:
            spec["dep"] = self.depends_on
            if self.on_parent_failure != "cancel":
                spec["opf"] = self.on_parent_failure
        if self.group is not None:
            spec["g"] = self.group
            spec["gi"] = self.group_index
        spec["c"] = round(self.created_at.timestamp(), 3)
        return spec

    @classmethod
    def from_spec(cls, job_id: str, spec: Any) -> Job:
        """Rebuild a job from a decoded spec; :class:`BadJob` says what is wrong with it."""
        if not isinstance(spec, dict):
            raise BadJob(f"job data is a JSON {type(spec).__name__}, not an object")
        task = spec.get("t")
        if not isinstance(task, str) or not TASK_NAME.match(task):
            raise BadJob(f"job data has no valid task name (field 't' is {task!r})")
        args = spec.get("a", [])
        if args == {}:
            args = []  # Lua's cjson cannot tell an empty array from an empty object
        if not isinstance(args, list):
            raise BadJob(f"job args (field 'a') must be a list, got {type(args).__name__}")
        kwargs = spec.get("k", {})
        if not isinstance(kwargs, dict):
            raise BadJob(f"job kwargs (field 'k') must be an object, got {type(kwargs).__name__}")
        try:
            job = cls(task, args, kwargs, id=job_id,
                      priority=spec.get("p", DEFAULT_PRIORITY),
                      max_retries=spec.get("r", DEFAULT_MAX_RETRIES),
                      timeout=spec.get("to", DEFAULT_TIMEOUT),
                      queue=spec.get("q") or DEFAULT_QUEUE, result_ttl=spec.get("ttl"),
                      retry_on=spec.get("ro", ()), dont_retry_on=spec.get("dro", ()))
            deps = spec.get("dep", [])
            if isinstance(deps, list):
                job.depends_on = [str(d) for d in deps]
            job.on_parent_failure = "run" if spec.get("opf") == "run" else "cancel"
            if isinstance(spec.get("g"), str):
                job.group, job.group_index = spec["g"], spec.get("gi")
            created = spec.get("c")
            if created is not None:
                job.created_at = _ts(_check_number("created", created)) or job.created_at
        except (TypeError, ValueError, OverflowError, OSError) as exc:
            # OverflowError, OSError: a number too large for a float or a timestamp
            raise BadJob(f"job data has a bad option: {exc}") from None
        return job

    def apply_state(self, state: Mapping[str, Any]) -> None:
        """Fold a state or final record (status, attempts, errors, result) into this job."""
        status = state.get("s")
        if status:
            self.status = JobStatus(status)
        self.retry_count = int(state.get("n", 0) or 0)
        self.deliveries = int(state.get("d", 0) or 0)
        errors = state.get("e") or []
        self.errors = list(errors) if isinstance(errors, list) else []
        err = state.get("err")
        if isinstance(err, dict):
            self.final_error = dict(err)
            self.error = f"{err.get('type', 'Error')}: {err.get('msg', '')}"
            self.traceback = err.get("tb")
        elif self.errors:
            last = self.errors[-1]
            self.error = f"{last.get('type', 'Error')}: {last.get('msg', '')}"
            self.traceback = last.get("tb")
        self.started_at = _ts(state.get("st"))
        self.completed_at = _ts(state.get("fin"))
        self.return_value = state.get("res")
        self.worker = state.get("w")


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


def exception_name(t: type[BaseException]) -> str:
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def exception_matches(exc: BaseException, names: Sequence[str]) -> bool:
    """True if ``exc`` is an instance of a class named in ``names`` (or of a subclass)."""
    for cls in type(exc).__mro__:
        if exception_name(cls) in names or cls.__qualname__ in names:
            return True
    return False


def new_id() -> str:
    """A 24-character id: milliseconds then 52 random bits, so ids sort by creation time."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(7)[:13]}"


def decode(raw: str | bytes) -> Any:
    if isinstance(raw, str) and not raw.isascii():
        # a worker reads with errors="surrogateescape": a byte that is not UTF-8 arrives as a
        # lone surrogate (valid UTF-8 never decodes to one)
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = raw[exc.start]
            what = f"byte 0x{ord(bad) - 0xDC00:02x}" if "\udc80" <= bad <= "\udcff" else repr(bad)
            raise BadJob(f"job data is not valid UTF-8 ({what} at character {exc.start})"
                         ) from None
    try:
        return serialization.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadJob(f"job data is not valid JSON ({exc})") from None
    except RecursionError:
        raise BadJob("job data is nested too deeply to decode") from None
