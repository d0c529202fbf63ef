"""Limits: how many jobs of a kind may run at once, and how many may start per second,
across every host. Pure: parsing, checking and the stored form; claim.lua enforces them.

A limit has a name and one or both of:

- ``concurrency``: at most this many of its jobs held by workers at once (claimed and not
  settled yet; a prefetched job counts from its claim, so that a claim never hands out more
  than the limit);
- ``rate``: ``"N/s"``, ``"N/m"`` or ``"N/h"`` starts, with ``burst`` (default 1) starts allowed
  back to back after a quiet time. The claim runs GCRA (a token bucket kept as one time, the
  "theoretical arrival time") on the server's clock: one start every period/N, ``burst - 1``
  of them early.

The burst is its own option (``rate_burst=`` on a task, ``burst`` in the config, ``--burst``
on the command line), not part of the rate's text: a rate has one syntax everywhere, and a
burst is a number each of those places checks as a number.

Where a limit comes from:

- a task's own ``@task(concurrency=4, rate_limit="100/m")`` is an implicit limit named after
  the task (``module:function``), written to the server by whoever enqueues the task or runs
  it (so its declaration, not an operator, owns it);
- a named limit shared by tasks (``@task(limits=["gpu"])``) is defined in the config
  (``[limits.gpu]``), by ``jobq limit set``, or ``JobQueue.set_limit``.

The spec of a limited job carries the names (``lm``, see :mod:`jobq.wire`); definitions live in
``{ns}:limits``. A name whose definition is gone (deleted) no longer limits anything: a job never
waits for a limit nobody can define or free.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: A rate's text: "<count>/<unit>", spaces allowed around the slash.
RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*([smh])\s*\Z")
#: Seconds per unit of a rate.
RATE_UNITS = {"s": 1, "m": 60, "h": 3600}
#: A limit's name: a task name ("pkg.mod:fn") or a word; it is part of Redis key names.
LIMIT_NAME_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}\Z")
#: The highest concurrency, burst and rate count accepted (beyond them a limit limits nothing).
MAX_COUNT = 1_000_000


class LimitError(ValueError):
    """A limit that cannot be: a malformed rate, a concurrency below 1, an unknown name."""


@dataclass(frozen=True)
class Rate:
    """``count`` starts per ``per`` seconds, ``burst`` of them back to back."""

    count: int
    per: int
    burst: int = 1

    @property
    def interval_ms(self) -> float:
        """The time between two starts at the steady rate (ms)."""
        return self.per * 1000 / self.count

    @property
    def text(self) -> str:
        """As written: "10/s"."""
        return f"{self.count}/{ {v: k for k, v in RATE_UNITS.items()}[self.per]}"

    def __str__(self) -> str:
        return self.text + (f" (burst {self.burst})" if self.burst > 1 else "")


def parse_rate(text: Any, burst: Any = None) -> Rate:
    """``"10/s"`` (or ``/m``, ``/h``) with an optional ``burst`` (int >= 1) as a :class:`Rate`;
    :class:`LimitError` says what is wrong."""
    if not isinstance(text, str):
        raise LimitError(f"rate must be a string such as '10/s', '100/m' or '5/h', got "
                         f"{text!r:.60}")
    m = RATE_RE.match(text)
    if not m:
        raise LimitError(f"rate {text!r:.60} is not of the form N/s, N/m or N/h "
                         "(e.g. '100/m')")
    count = int(m.group(1))
    if not 1 <= count <= MAX_COUNT:
        raise LimitError(f"rate {text!r}: the count must be 1 to {MAX_COUNT}")
    return Rate(count, RATE_UNITS[m.group(2)], check_count("burst", 1 if burst is None
                                                           else burst))


def check_count(what: str, value: Any) -> int:
    """A concurrency or burst: an int from 1 to MAX_COUNT."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
        raise LimitError(f"{what} must be an integer from 1 to {MAX_COUNT}, got {value!r:.60}")
    return value


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not LIMIT_NAME_RE.match(name):
        raise LimitError(f"limit name {name!r:.60} must be 1-128 of A-Z a-z 0-9 _ . : -")
    return name


@dataclass(frozen=True)
class Limit:
    """One limit's definition."""

    name: str
    concurrency: int | None = None
    rate: Rate | None = None

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.concurrency is not None:
            check_count("concurrency", self.concurrency)
        if self.concurrency is None and self.rate is None:
            raise LimitError(f"limit {self.name!r} needs a concurrency, a rate, or both")

    @classmethod
    def build(cls, name: str, *, concurrency: Any = None, rate: Any = None,
              burst: Any = None) -> Limit:
        """A limit from user input (config, CLI, API): every value checked."""
        if burst is not None and rate is None:
            raise LimitError(f"limit {name!r}: a burst needs a rate")
        return cls(check_name(name), None if concurrency is None else
                   check_count("concurrency", concurrency),
                   None if rate is None else parse_rate(rate, burst))

    def to_json(self) -> str:
        """The stored form (``{ns}:limits``), read by claim.lua: c (concurrency), n and per
        (rate: n starts per per seconds), b (burst)."""
        out: dict[str, int] = {}
        if self.concurrency is not None:
            out["c"] = self.concurrency
        if self.rate is not None:
            out.update(n=self.rate.count, per=self.rate.per, b=self.rate.burst)
        return json.dumps(out, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, name: str, raw: str) -> Limit:
        data = json.loads(raw)
        rate = None
        if "n" in data:
            rate = Rate(int(data["n"]), int(data["per"]), int(data.get("b", 1)))
        return cls(name, data.get("c"), rate)

    def describe(self) -> str:
        parts = []
        if self.concurrency is not None:
            parts.append(f"concurrency {self.concurrency}")
        if self.rate is not None:
            parts.append(f"rate {self.rate}")
        return ", ".join(parts)


def from_config(tables: Mapping[str, Any]) -> dict[str, Limit]:
    """The ``[limits.NAME]`` tables of a config (keys: concurrency, rate, burst)."""
    out = {}
    for name, table in tables.items():
        if not isinstance(table, Mapping):
            raise LimitError(f"{name}: expected a table ([limits.{name}]), got {table!r:.60}")
        unknown = set(table) - {"concurrency", "rate", "burst"}
        if unknown:
            raise LimitError(f"{name}: unknown key {sorted(unknown)[0]!r} (known: concurrency, "
                             "rate, burst)")
        try:
            out[name] = Limit.build(name, **table)
        except LimitError as exc:
            raise LimitError(f"{name}: {exc}") from None
    return out


def task_limits(task_name: str, *, concurrency: Any = None, rate_limit: Any = None,
                rate_burst: Any = None, limits: Iterable[Any] | None = None
                ) -> tuple[Limit | None, list[str]]:
    """What a task declares: its own (implicit) limit, if any, and every limit name its jobs
    are subject to (its own first). :class:`LimitError` at declaration for a bad value."""
    own = None
    if concurrency is not None or rate_limit is not None:
        if rate_burst is not None and rate_limit is None:
            raise LimitError(f"task {task_name}: rate_burst needs a rate_limit")
        own = Limit.build(task_name, concurrency=concurrency, rate=rate_limit,
                          burst=rate_burst)
    elif rate_burst is not None:
        raise LimitError(f"task {task_name}: rate_burst needs a rate_limit")
    if limits is None:
        named: list[str] = []
    elif isinstance(limits, str) or not isinstance(limits, Iterable):
        raise LimitError(f"task {task_name}: limits must be a list of limit names, got "
                         f"{limits!r:.60}")
    else:
        named = [check_name(n) for n in limits]
    names = ([own.name] if own else []) + [n for n in dict.fromkeys(named)
                                           if own is None or n != own.name]
    return own, names


def tokens(rate: Rate, tat: float | None, now: float) -> int:
    """How many starts ``rate`` allows at once at ``now`` (epoch seconds), its GCRA time
    being ``tat`` (epoch seconds; None: never used): what ``jobq limit list`` shows."""
    if tat is None:
        return rate.burst
    interval = rate.interval_ms / 1000
    tolerance = interval * (rate.burst - 1)
    return max(0, min(rate.burst, int((now + tolerance - max(tat, now)) // interval) + 1))
