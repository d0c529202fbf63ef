"""The task catalog: what the running workers can run, as they announce it.

A worker, when it boots, describes every task its imports make runnable (its name, declared
queue and options, signature; :meth:`jobq.registry.TaskResolver.describe`) and announces
them under its master's id, or alone (``jobq worker``) under its own name: one hash per
announcer, replaced whole by each generation (a reload's new code), kept alive by the
master's heartbeat (or the lone worker's lease renewals) and gone ``ttl`` after the last
one. The catalog is the union of the live announcements.

A producer that enqueues a task by name (``"module:function"``: the CLI, a schedule, an
application that does not import the task's code) reads it here, so the job gets the
task's declared options, as ``.delay()`` would, and its arguments are checked against the
task's signature before anything is written. What a name no live worker announced gets is
the caller's choice: the CLI refuses it (``--force`` overrides), the API enqueues it as
given, since a producer must not need its consumers to be up.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from .broker import Broker
from .job import exception_names

#: How long a producer trusts what it read of a task (seconds): enqueueing by name costs a
#: round trip per task name at most this often.
CACHE_TTL = 2.0
#: The shortest life of an announcement after its last renewal (seconds).
MIN_TTL = 15.0
#: The job options a task may declare that the catalog carries (the queue is apart).
OPTIONS = ("priority", "max_retries", "timeout", "result_ttl", "retry_on", "dont_retry_on",
           "limits")
#: How long a signature or docstring line may be in the catalog (characters).
TEXT_MAX = 200

_KINDS = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
          inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.KEYWORD_ONLY,
          inspect.Parameter.VAR_KEYWORD)
_FILLED = object()  # stands for a default value: only its presence matters to a check


def ttl(lease_time: float) -> float:
    """How long an announcement lives after its last renewal."""
    return max(lease_time, MIN_TTL)


class TaskInfo(NamedTuple):
    """One task as a worker announced it."""

    name: str
    queue: str | None  # the declared queue; None: the enqueuer's
    options: dict[str, Any]  # declared job options (OPTIONS)
    params: list[tuple[str, int, bool]] | None  # (name, kind, has a default); None: unknown
    signature: str  # for people: "(path, *, limit=10)"
    doc: str  # the docstring's first line
    declared: bool  # registered with @task (else a plain function of an allowed module)
    announced: float  # when (epoch seconds)
    hosts: tuple[str, ...] = ()  # the announcers that can run it

    @classmethod
    def describe(cls, name: str, fn: Callable[..., Any], options: dict[str, Any], *,
                 declared: bool, now: float) -> TaskInfo:
        """The catalog's entry of ``fn`` registered as ``name`` with ``options``."""
        params: list[tuple[str, int, bool]] | None
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            params, shown = None, "(...)"
        else:
            params = [(p.name, _KINDS.index(p.kind), p.default is not p.empty)
                      for p in sig.parameters.values()]
            shown = str(_readable(sig))
        doc = (inspect.getdoc(fn) or "").strip().splitlines()
        return cls(name=name, queue=options.get("queue"),
                   options={k: exception_names(options[k], k) if k.endswith("retry_on")
                            else options[k] for k in OPTIONS if k in options},
                   params=params, signature=_cap(shown), doc=_cap(doc[0] if doc else ""),
                   declared=declared, announced=now)

    def to_json(self) -> str:
        return json.dumps({"q": self.queue, "o": self.options, "p": self.params,
                           "s": self.signature, "d": self.doc, "t": self.declared,
                           "a": self.announced}, separators=(",", ":"))

    @classmethod
    def from_json(cls, name: str, raw: str, hosts: Sequence[str] = ()) -> TaskInfo | None:
        """The entry, or None when it cannot be read (announced by another version?)."""
        try:
            data = json.loads(raw)
            params = data["p"]
            info = cls(name=name, queue=data["q"], options=dict(data["o"]),
                       params=None if params is None else [(str(n), int(k), bool(d))
                                                           for n, k, d in params],
                       signature=str(data["s"]), doc=str(data["d"]), declared=bool(data["t"]),
                       announced=float(data["a"]), hosts=tuple(hosts))
            info.checker()  # a signature that cannot be rebuilt is no signature
        except (ValueError, TypeError, KeyError):
            return None
        return info

    def job_options(self) -> dict[str, Any]:
        """The job options the task declared, the queue among them."""
        return {**self.options, "queue": self.queue} if self.queue else dict(self.options)

    def checker(self) -> Callable[[Sequence[Any], dict[str, Any]], None]:
        """A function that raises TypeError when ``(args, kwargs)`` do not fit the task."""
        if self.params is None:
            return _accept
        sig = inspect.Signature([
            inspect.Parameter(n, _KINDS[k], default=_FILLED if d else inspect.Parameter.empty)
            for n, k, d in self.params])
        fixed = [k for _, k, _ in self.params]
        if all(k <= 1 for k in fixed):  # positional parameters only: count them
            most = len(self.params)
            least = sum(1 for _, _, d in self.params if not d)
        else:
            most = least = -1

        def check(args: Sequence[Any], kwargs: dict[str, Any]) -> None:
            if not kwargs and least <= len(args) <= most:
                return  # the common case, without building a binding
            try:
                sig.bind(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"{self.name}{self.signature}: {exc}") from None

        return check


class Catalog:
    """A producer's view of the catalog, each task cached for ``CACHE_TTL`` seconds."""

    def __init__(self, broker: Broker, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.broker = broker
        self.clock = clock
        self._cache: dict[str, tuple[float, TaskInfo | None, Any]] = {}

    def get(self, name: str) -> TaskInfo | None:
        """The task as the live workers announced it (the latest announcement when they
        differ, e.g. during a rolling upgrade); None when no live worker has it."""
        return self.lookup(name)[0]

    def checker(self, name: str) -> Callable[[Sequence[Any], dict[str, Any]], None] | None:
        """The check of a known task's arguments (see :meth:`TaskInfo.checker`)."""
        return self.lookup(name)[1]

    def lookup(self, name: str) -> tuple[TaskInfo | None, Any]:
        """The task (None: no live worker has it) and the check of its arguments."""
        now = self.clock()
        hit = self._cache.get(name)
        if hit is not None and now - hit[0] < CACHE_TTL:
            return hit[1], hit[2]
        info = _merge(name, self.broker.announced_task(name))
        check = info.checker() if info is not None else None
        self._cache[name] = (now, info, check)
        return info, check

    def all(self) -> dict[str, TaskInfo]:
        """Every task the live workers announced, by name (read now, never cached)."""
        by_name: dict[str, list[tuple[str, str]]] = {}
        for announcer, entries in self.broker.announced_tasks().items():
            for name, raw in entries.items():
                by_name.setdefault(name, []).append((announcer, raw))
        merged = {name: _merge(name, found) for name, found in sorted(by_name.items())}
        return {name: info for name, info in merged.items() if info is not None}


def _merge(name: str, found: list[tuple[str, str]]) -> TaskInfo | None:
    """One entry from what several announcers said: the latest, with every announcer."""
    hosts = sorted(announcer for announcer, _ in found)
    entries = [info for _, raw in found
               if (info := TaskInfo.from_json(name, raw, hosts)) is not None]
    return max(entries, key=lambda i: i.announced) if entries else None


class _Shown(str):
    """An annotation kept as text (``from __future__ import annotations``), shown bare."""

    def __repr__(self) -> str:
        return str(self)


def _readable(sig: inspect.Signature) -> inspect.Signature:
    def bare(annotation: Any) -> Any:
        return _Shown(annotation) if isinstance(annotation, str) else annotation
    return sig.replace(
        parameters=[p.replace(annotation=bare(p.annotation)) for p in sig.parameters.values()],
        return_annotation=bare(sig.return_annotation))


def _accept(args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    return None


def _cap(text: str) -> str:
    return text if len(text) <= TEXT_MAX else text[:TEXT_MAX - 1] + "…"
