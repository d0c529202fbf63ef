"""Schedules and time: pure functions of ``now`` (next fire times, misfires, retry back-off).

No Redis and no clock here: the scheduler process (:mod:`jobq.scheduler`) passes ``now`` in,
and tests pass a fake one.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from .job import QUEUE_NAME, TASK_NAME, Job

#: What a schedule may be named (it becomes part of job ids).
SCHEDULE_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,100}$")
#: Misfire policies: what a schedule does about runs missed while no scheduler ran.
MISFIRE = ("skip", "catch_up", "all")
#: A fire this late (seconds) still counts as on time, not as a misfire.
ON_TIME = 5.0
#: Two times closer than this (seconds) are the same due time (Redis keeps milliseconds).
EPSILON = 0.002
#: Most missed runs fired at once by the "all" policy.
MAX_BURST = 1000
#: The names of the five (or six, with seconds) cron fields, for errors.
CRON_FIELDS_5 = ("minute", "hour", "day of month", "month", "day of week")
CRON_FIELDS_6 = (*CRON_FIELDS_5, "second")


class ScheduleError(ValueError):
    """A schedule definition is invalid; the message names the field."""


@dataclass
class ScheduleDef:
    """A named schedule: enqueue ``task(*args, **kwargs)`` once, every ``interval`` seconds,
    or on a ``cron`` expression (in ``timezone``)."""

    name: str
    task: str
    kind: str  # "once" | "interval" | "cron"
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str | None = None  # None: the task's declared queue (the catalog), else default
    priority: int | None = None  # None: the task's declared priority, else 0
    options: dict[str, Any] = field(default_factory=dict)  # max_retries, timeout, result_ttl
    at: float | None = None  # once: epoch seconds
    interval: float | None = None  # interval: seconds
    start: float | None = None  # interval: the anchor of its fire times (epoch seconds)
    cron: str | None = None
    timezone: str = "UTC"
    misfire: str = "skip"
    paused: bool = False
    source: str = "api"  # "api", "config", "cli"
    owner: str = ""  # a master id when the task lives in that master's __main__

    def validate(self) -> ScheduleDef:
        where = f"schedule {self.name!r}"
        # due times are kept in whole milliseconds in Redis: keep the definition's the same
        if _number(self.at):
            self.at = round(self.at, 3)  # type: ignore[arg-type]
        if _number(self.start):
            self.start = round(self.start, 3)  # type: ignore[arg-type]
        if not isinstance(self.name, str) or not SCHEDULE_NAME.match(self.name):
            raise ScheduleError(f"schedule name {self.name!r}: use 1-100 of A-Z a-z 0-9 _ . : -")
        if not isinstance(self.task, str) or not TASK_NAME.match(self.task):
            raise ScheduleError(f"{where}: task: {self.task!r} is not 'module:function'")
        if self.queue is not None and (
                not isinstance(self.queue, str) or not QUEUE_NAME.match(self.queue)):
            raise ScheduleError(f"{where}: queue: {self.queue!r} is not a valid queue name")
        if self.priority is not None and (
                isinstance(self.priority, bool) or not isinstance(self.priority, int)):
            raise ScheduleError(f"{where}: priority: expected an integer, got {self.priority!r}")
        if not isinstance(self.args, list) or not isinstance(self.kwargs, dict):
            raise ScheduleError(f"{where}: args must be a list and kwargs a table")
        if self.misfire not in MISFIRE:
            raise ScheduleError(f"{where}: misfire: expected one of {', '.join(MISFIRE)}, "
                                f"got {self.misfire!r}")
        zone(self.timezone, where)
        # the job options are checked now: a bad one would make every fire fail
        if not isinstance(self.options, dict):
            raise ScheduleError(f"{where}: options must be a table")
        try:
            Job(self.task, **self.options)
        except (TypeError, ValueError) as exc:
            raise ScheduleError(f"{where}: {exc}") from None
        if self.kind == "once":
            if not _number(self.at):
                raise ScheduleError(f"{where}: at: a time is required for a one-off schedule")
        elif self.kind == "interval":
            if not _number(self.interval) or not self.interval > 0:  # type: ignore[operator]
                raise ScheduleError(f"{where}: interval: expected seconds > 0, "
                                    f"got {self.interval!r}")
            if self.start is not None and not _number(self.start):
                raise ScheduleError(f"{where}: start: expected a time, got {self.start!r}")
        elif self.kind == "cron":
            check_cron(self.cron, where)
        else:
            raise ScheduleError(f"{where}: one of at, interval or cron is required")
        return self

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScheduleDef:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(
        value)


def zone(name: str, where: str = "schedule") -> tzinfo:
    try:
        return UTC if name in ("UTC", "utc") else ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ScheduleError(f"{where}: timezone: unknown time zone {name!r}") from None


def check_cron(expr: Any, where: str = "schedule") -> None:
    """Refuse an invalid cron expression, naming the field at fault."""
    if not isinstance(expr, str) or not expr.strip():
        raise ScheduleError(f"{where}: cron: expected a cron expression, got {expr!r}")
    parts = expr.split()
    if len(parts) not in (5, 6):
        raise ScheduleError(f"{where}: cron: {expr!r} has {len(parts)} fields; expected 5 "
                            "(minute hour day-of-month month day-of-week) or 6 (+ seconds)")
    names = CRON_FIELDS_6 if len(parts) == 6 else CRON_FIELDS_5
    for i, part in enumerate(parts):
        probe = ["*"] * len(parts)
        probe[i] = part
        if not croniter.is_valid(" ".join(probe)):
            raise ScheduleError(f"{where}: cron: field {i + 1} ({names[i]}) {part!r} is "
                                f"invalid in {expr!r}")
    if not croniter.is_valid(expr):
        raise ScheduleError(f"{where}: cron: {expr!r} is invalid")


def next_fire(d: ScheduleDef, after: float) -> float | None:
    """The first fire time strictly after ``after`` (epoch seconds); None when done."""
    after += EPSILON  # "strictly after", robust to the millisecond rounding of due times
    if d.kind == "once":
        return d.at if d.at is not None and d.at > after else None
    if d.kind == "interval":
        assert d.interval is not None
        # no start: the grid is anchored on the previous due time itself (not on it plus
        # EPSILON, which would add 2 ms to every interval)
        anchor = d.start if d.start is not None else after - EPSILON
        if after < anchor:
            return anchor
        steps = math.floor((after - anchor) / d.interval) + 1
        return round(anchor + steps * d.interval, 3)
    assert d.cron is not None
    tz = zone(d.timezone)
    base = datetime.fromtimestamp(after, tz)
    times = croniter(d.cron, base)
    fixed = not any(part.startswith("*") for part in str(d.cron).split()[:2])
    while True:
        nxt = times.get_next(datetime)
        # on fall-back day a wall time happens twice: like cron, a job at a fixed time (no
        # '*' minute or hour) runs at the first one only; frequent ones run through both
        if not (fixed and _repeated(nxt, tz)):
            return float(nxt.timestamp())


def _repeated(when: datetime, tz: tzinfo) -> bool:
    """Whether ``when`` is the second occurrence of a wall time (a DST fall-back)."""
    wall = when.replace(tzinfo=None)
    first = wall.replace(tzinfo=tz, fold=0).timestamp()
    second = wall.replace(tzinfo=tz, fold=1).timestamp()
    return second > first and when.timestamp() == second


def first_due(d: ScheduleDef, now: float) -> float | None:
    """When a new schedule first fires: interval schedules fire at their start (now by
    default), the others at their next fire time."""
    if d.kind == "interval":
        return d.start if d.start is not None else now
    if d.kind == "once":
        return d.at
    return next_fire(d, now - 1e-6)


@dataclass(frozen=True)
class Fire:
    """What to do for a schedule that is due: fire these runs, then wait for ``next_due``."""

    runs: list[float]  # the due times fired now (empty: missed runs skipped)
    next_due: float | None


def plan_fire(d: ScheduleDef, due: float, now: float) -> Fire:
    """Fire a due schedule. On time (within ON_TIME) it fires once; after downtime its
    misfire policy decides: "skip" the missed runs, "catch_up" with one run, or "all"."""
    if now - due <= ON_TIME:
        return Fire([due], _after(d, due, now))
    missed = [due]
    t = due
    while len(missed) < MAX_BURST:
        nxt = next_fire(d, t)
        if nxt is None or nxt > now:
            break
        missed.append(nxt)
        t = nxt
    upcoming = _after(d, missed[-1], now)
    if d.misfire == "all":
        return Fire(missed, upcoming)
    # past the burst cap runs up to now are still missed: skip and catch up past them all
    # (a next due time in the past would fire again, "on time")
    latest = missed[-1]
    while upcoming is not None and upcoming <= now:
        latest, upcoming = upcoming, next_fire(d, upcoming)
    if d.misfire == "catch_up":
        return Fire([latest], upcoming)
    return Fire([], upcoming)


def _after(d: ScheduleDef, due: float, now: float) -> float | None:
    """The next due time after ``due`` that is not already in the past."""
    nxt = next_fire(d, due)
    while nxt is not None and nxt <= now - ON_TIME:
        nxt = next_fire(d, nxt)
    return nxt


def refuse_past(d: ScheduleDef, now: float) -> None:
    """A one-off schedule whose time has passed would be skipped (a misfire): refuse it."""
    if d.kind == "once" and d.at is not None and d.at < now - ON_TIME:
        raise ScheduleError(f"schedule {d.name!r}: at: {local_time(d.at)} has passed (it is "
                            f"{local_time(now)}); give a time to come")


def local_time(ts: float) -> str:
    """A time as people read it: local, with its zone (``2026-11-27 03:00:00 CET``)."""
    return datetime.fromtimestamp(ts, UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def iso_time(ts: float) -> str:
    """A time for programs: ISO 8601, local, with its offset
    (``2026-11-27T03:00:00.000+01:00``)."""
    return datetime.fromtimestamp(ts, UTC).astimezone().isoformat(timespec="milliseconds")


def to_epoch(value: datetime | float | int) -> float:
    """A due time as epoch seconds; a naive datetime is local time."""
    if isinstance(value, datetime):
        return value.timestamp()  # naive: Python treats it as local time
    if _number(value):
        return float(value)
    raise TypeError(f"expected a datetime or epoch seconds, got {value!r}")
