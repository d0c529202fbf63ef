"""Tasks: what a worker is allowed to run, found by name, never imported on a job's say-so.

A task is a function registered with :func:`task` in a module the worker imported at boot
(``-I/--import MODULE`` or ``imports = [...]``), or a ``module:function`` name whose module is
in that list and whose function is defined there. Anything else (``os:system``, a typo, a
module nobody allowed, a name starting with ``_``) is refused without importing anything.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types
from collections.abc import Callable, Iterable
from typing import Any, Generic, ParamSpec, TypeVar

from .catalog import TaskInfo
from .exceptions import TaskImportError, TaskNotAllowed
from .groups import CHUNK_TASK, run_chunk
from .job import Job, unknown_options
from .limits import Limit, task_limits
from .queue import default_queue
from .wire import TASK_NAME

P = ParamSpec("P")
R = TypeVar("R")

#: Tasks registered with @task in this process, by name.
REGISTRY: dict[str, Task[Any, Any]] = {}

_OPTIONS = ("queue", "priority", "max_retries", "timeout", "result_ttl", "retry_on",
            "dont_retry_on", "limits")
#: What @task declares beyond job options: the task's own limit (see :mod:`jobq.limits`).
_LIMIT_OPTIONS = ("concurrency", "rate_limit", "rate_burst")


class Task(Generic[P, R]):
    """A function registered as a task: call it to run it here, ``.delay()`` to enqueue it."""

    def __init__(self, fn: Callable[P, R], name: str, options: dict[str, Any],
                 own_limit: Limit | None = None) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.task_name = name
        self.job_options = options
        self.default_queue = options.get("queue")
        #: the task's own limit (concurrency=, rate_limit=), named after the task; whoever
        #: enqueues or runs the task writes its definition to the server
        self.own_limit = own_limit

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def options(self, **options: Any) -> Task[P, R]:
        """A variant of this task that enqueues with other job options."""
        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise unknown_options(options, _OPTIONS, task_args="delay")
        variant = Task(self.fn, self.task_name, {**self.job_options, **options}, self.own_limit)
        return variant

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """Enqueue this task with these arguments on the default connection; return the job."""
        opts = dict(self.job_options)
        queue = default_queue(opts.pop("queue", None))
        return queue.enqueue(self, *args, kwargs=kwargs, **opts)

    def __repr__(self) -> str:
        return f"<Task {self.task_name}>"


def task(fn: Callable[P, R] | None = None, *, name: str | None = None,
         **options: Any) -> Any:
    """Register a function as a task: ``@task`` or ``@task(queue=..., priority=..., ...)``.

    Limits (:mod:`jobq.limits`): ``concurrency=4`` (at most 4 running across all hosts),
    ``rate_limit="100/m"`` with ``rate_burst=20``, ``limits=["gpu"]`` (named limits, shared);
    a bad value is a :class:`~jobq.limits.LimitError` here, at declaration."""
    unknown = set(options) - set(_OPTIONS) - set(_LIMIT_OPTIONS)
    if unknown:
        raise unknown_options(options, (*_OPTIONS, *_LIMIT_OPTIONS), what="task option",
                              task_args=None)

    def register(f: Callable[P, R]) -> Task[P, R]:
        task_name = name or f"{f.__module__}:{f.__qualname__}"
        if not TASK_NAME.match(task_name):
            raise ValueError(f"task name {task_name!r} is not of the form 'module:function'")
        job_options = {k: v for k, v in options.items() if k not in _LIMIT_OPTIONS}
        own, names = task_limits(task_name, concurrency=options.get("concurrency"),
                                 rate_limit=options.get("rate_limit"),
                                 rate_burst=options.get("rate_burst"),
                                 limits=options.get("limits"))
        if names:
            job_options["limits"] = names
        else:
            job_options.pop("limits", None)
        t = Task(f, task_name, job_options, own)
        REGISTRY[task_name] = t
        return t

    return register(fn) if fn is not None else register


class TaskResolver:
    """The allow-list of one worker: imports the allowed modules once, resolves names."""

    def __init__(self, imports: Iterable[str], *, allow_main: bool = False) -> None:
        self.modules: dict[str, types.ModuleType] = {}
        for module in imports:
            try:
                self.modules[module] = importlib.import_module(module)
            except BaseException as exc:  # whatever a module raises at import
                raise TaskImportError(
                    f"cannot import task module {module!r}: {type(exc).__name__}: {exc}"
                ) from exc
        if allow_main:
            self.modules["__main__"] = sys.modules["__main__"]
        self._cache: dict[str, Callable[..., Any]] = {
            # queue.map's chunks: always allowed, since the runner resolves each item's task
            # through this allow-list
            CHUNK_TASK: functools.partial(run_chunk, self.resolve),
        }

    def describe(self, now: float) -> dict[str, TaskInfo]:
        """Every task this worker can run by name, for the catalog (:mod:`jobq.catalog`):
        the tasks registered with @task, and the public functions defined in the allowed
        modules. Not those of ``__main__``: only the script's own pool can run them."""
        found: dict[str, TaskInfo] = {}
        for name, registered in REGISTRY.items():
            if registered.fn.__module__ != "__main__":
                found[name] = TaskInfo.describe(name, registered.fn, registered.job_options,
                                                declared=True, now=now)
        for module_name, module in self.modules.items():
            if module_name == "__main__":
                continue
            for attr, obj in sorted(vars(module).items()):
                name = f"{module_name}:{attr}"
                if attr.startswith("_") or name in found or not TASK_NAME.match(name):
                    continue
                fn = obj.fn if isinstance(obj, Task) else obj
                if isinstance(fn, types.FunctionType) and fn.__module__ == module.__name__:
                    found[name] = TaskInfo.describe(
                        name, fn, obj.job_options if isinstance(obj, Task) else {},
                        declared=isinstance(obj, Task), now=now)
        return found

    def own_limits(self) -> dict[str, str]:
        """The definitions (JSON) of the limits the registered tasks declared for themselves
        (``@task(concurrency=...)``): a worker writes them to the server when it boots, so
        that a job enqueued by name, by a producer without the task's code, finds its limit."""
        return {t.own_limit.name: t.own_limit.to_json() for t in REGISTRY.values()
                if t.own_limit is not None}

    def resolve(self, name: str) -> Callable[..., Any]:
        fn = self._cache.get(name)
        if fn is None:
            fn = self._cache[name] = self._lookup(name)
        return fn

    def _lookup(self, name: str) -> Callable[..., Any]:
        registered = REGISTRY.get(name)
        if registered is not None:  # registered by a module this worker imported
            return registered.fn
        if not TASK_NAME.match(name):
            raise TaskNotAllowed(f"task name {name!r} is not of the form 'module:function'")
        module_name, attr = name.split(":")
        module = self.modules.get(module_name)
        if module is None:
            raise TaskNotAllowed(
                f"task {name!r} is not allowed: module {module_name!r} is not among this "
                f"worker's imports ({', '.join(sorted(self.modules)) or 'none'})"
            )
        if attr.startswith("_"):
            raise TaskNotAllowed(f"task {name!r} is not allowed: private names never run")
        obj = getattr(module, attr, None)
        fn = obj.fn if isinstance(obj, Task) else obj
        if not isinstance(fn, types.FunctionType) or fn.__module__ != module.__name__:
            raise TaskNotAllowed(
                f"task {name!r} is not allowed: {module_name} has no function {attr!r} "
                "defined in it"
            )
        return fn
