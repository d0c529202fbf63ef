"""Schedules: declare, list, pause and remove them (``Scheduler``), and the ``[[schedule]]``
tables of a config.

Schedules live in Redis, so every host sees the same ones: ``{ns}:sched:defs`` (name ->
definition), ``{ns}:sched:due`` (name -> next due time, ms), ``{ns}:sched:last``. The
scheduler process of whichever master leads fires them (:mod:`jobq.scheduler_daemon`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from . import serialization
from .config import Config
from .job import Job, check_enqueueable
from .queue import JobQueue
from .schedule import ScheduleDef, ScheduleError, first_due, next_fire, refuse_past, to_epoch
from .wire import DEFAULT_QUEUE

log = logging.getLogger("jobq.scheduler")


def owner_id() -> str:
    """Identifies schedules whose task lives in this script's ``__main__``."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Scheduler:
    """Named schedules on a queue's server: once, interval and cron.

    ``schedule_once(job_id, func, run_at, args, kwargs)``, ``schedule_interval(job_id, func,
    interval, args, kwargs)``, ``schedule_cron``, ``cancel(job_id)``, ``start()``/``stop()``.
    Schedules are stored in Redis and fired by the scheduler process of whichever jobq master
    leads, so ``start()`` has nothing to start; ``stop()`` removes the schedules of
    ``__main__`` tasks this object made (they live as long as the script's pool).
    """

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self.broker = queue.broker
        self.mine: set[str] = set()

    # -- declaring ---------------------------------------------------------------------------
    def schedule_once(self, job_id: str, func: Callable[..., Any] | str, run_at: Any,
                      args: tuple[Any, ...] | list[Any] = (),
                      kwargs: dict[str, Any] | None = None, **options: Any) -> str:
        """Run ``func`` once at ``run_at`` (a datetime; naive means local time)."""
        return self.add(self._define(job_id, func, args, kwargs, options, kind="once",
                                     at=to_epoch(run_at)))

    def schedule_interval(self, job_id: str, func: Callable[..., Any] | str, interval: float,
                          args: tuple[Any, ...] | list[Any] = (),
                          kwargs: dict[str, Any] | None = None, *,
                          start: datetime | float | None = None, **options: Any) -> str:
        """Run ``func`` every ``interval`` seconds, first at ``start`` (default: now)."""
        return self.add(self._define(job_id, func, args, kwargs, options, kind="interval",
                                     interval=interval,
                                     start=to_epoch(start) if start is not None else time.time()))

    def schedule_cron(self, name: str, func: Callable[..., Any] | str, cron: str,
                      args: tuple[Any, ...] | list[Any] = (),
                      kwargs: dict[str, Any] | None = None, *, timezone: str = "UTC",
                      **options: Any) -> str:
        """Run ``func`` on a cron expression (5 fields, or 6 with seconds) in ``timezone``."""
        return self.add(self._define(name, func, args, kwargs, options, kind="cron", cron=cron,
                                     timezone=timezone))

    def _define(self, name: str, func: Callable[..., Any] | str, args: Any, kwargs: Any,
                options: dict[str, Any], **fields: Any) -> ScheduleDef:
        misfire = options.pop("misfire", "skip")
        # what the caller chose, and what a task object declared (the caller has its code);
        # a task named by a string gets its declared options from the catalog at each fire
        chosen = {**getattr(func, "job_options", {}), **options}
        queue, priority = chosen.pop("queue", None), chosen.pop("priority", None)
        job = Job(func, tuple(args), kwargs, queue=queue, **chosen)
        serialization.encode_args(job.args, job.kwargs)
        kept = {"max_retries": job.max_retries, "timeout": job.timeout,
                "result_ttl": job.result_ttl}
        opts: dict[str, Any] = {k: v for k, v in kept.items() if k in chosen}
        check_enqueueable(job.task)
        return ScheduleDef(name=name, task=job.task, args=list(job.args), kwargs=job.kwargs,
                           queue=queue, priority=priority, options=opts, misfire=misfire,
                           owner=owner_id() if job.task.startswith("__main__:") else "",
                           **fields)

    def add(self, d: ScheduleDef, *, now: float | None = None) -> str:
        """Store a schedule (replacing one of the same name) and wake the leader."""
        d.validate()
        if self.queue.config.cluster:  # it fires into its queue where it is stored
            if not d.queue:
                raise ScheduleError(f"schedule {d.name!r}: queue: required on a Cluster (a "
                                    "schedule is stored and fires in its queue's group)")
            self.queue.check_same_slot(d.queue, f"schedule {d.name!r}")
        now = time.time() if now is None else now
        if d.source != "config":  # a config's one-off stays when it has run (reloads)
            refuse_past(d, now)
        encoded = serialization.dumps(d.to_json())
        changed = self.broker.schedule_def(d.name) != encoded
        due = None if d.paused else first_due(d, now)
        self.broker.store_schedule(d.name, encoded, due, changed=changed)
        self.mine.add(d.name)
        return d.name

    def cancel(self, job_id: str) -> bool:
        """Remove a schedule; True if it existed."""
        removed = self.broker.remove_schedule(job_id)
        self.mine.discard(job_id)
        return removed

    remove = cancel

    def get(self, name: str) -> ScheduleDef | None:
        raw = self.broker.schedule_def(name)
        return ScheduleDef.from_json(serialization.loads(raw)) if raw else None

    def pause(self, name: str) -> bool:
        d = self.get(name)
        if d is None:
            return False
        d.paused = True
        self.broker.store_schedule(name, serialization.dumps(d.to_json()), None)
        return True

    def resume(self, name: str, now: float | None = None) -> bool:
        d = self.get(name)
        if d is None:
            return False
        d.paused = False
        now = time.time() if now is None else now
        due = next_fire(d, now) if d.kind != "once" else d.at
        self.broker.store_schedule(name, serialization.dumps(d.to_json()), due)
        return True

    def run_now(self, name: str) -> Job:
        """Enqueue the schedule's job now, outside its timetable."""
        d = self.get(name)
        if d is None:
            raise KeyError(name)
        given = {"queue": d.queue, "priority": d.priority, **d.options}
        return self.queue.enqueue(d.task, *d.args, kwargs=d.kwargs,
                                  **{k: v for k, v in given.items() if v is not None})

    def list(self) -> list[dict[str, Any]]:
        """Every schedule with its next and last run (epoch seconds; None if it never ran),
        the last job's status, the due time of the latest run skipped as missed after it
        (``last_skipped``), the leader."""
        defs = self.broker.schedule_defs()
        due = self.broker.schedule_timetable()
        last = self.broker.schedule_fires()
        leader = self.broker.leader_token()
        out = []
        for name in sorted(defs):
            d = serialization.loads(defs[name])
            fired = serialization.loads(last[name]) if name in last else {}
            job_id = fired.get("job")
            # a record without a job is a skip (older fire.lua wrote skips that way)
            skipped = fired.get("skipped", None if job_id else fired.get("due"))
            d.update(next_run=due.get(name),
                     last_run=fired.get("fired") if job_id else None, last_job=job_id,
                     last_status=self.queue.get_status(job_id) if job_id else None,
                     last_skipped=skipped,
                     leader=leader.rsplit(".", 2)[0] if leader else None)
            out.append(d)
        return out

    def leader(self) -> str | None:
        """The host (and pid) of the scheduler that leads, if any."""
        token = self.broker.leader_token()
        return token.rsplit(".", 1)[0] if token else None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Scheduler:
        """Nothing to start: schedules fire as soon as they are stored."""
        log.info("scheduler: %d schedule(s) active", len(self.mine))
        return self

    def stop(self) -> None:
        """Remove this object's schedules of ``__main__`` tasks (they die with the script)."""
        for name in list(self.mine):
            d = self.get(name)
            if d is not None and d.owner == owner_id():
                self.cancel(name)


def drop_owned_schedules(queue: JobQueue) -> None:
    """Remove the schedules whose task lives in this process's ``__main__``."""
    sched = Scheduler(queue)
    for name, raw in queue.broker.schedule_defs().items():
        if serialization.loads(raw).get("owner") == owner_id():
            sched.cancel(name)


def config_schedules(config: Config) -> list[ScheduleDef]:
    """The ``[[schedule]]`` tables of a config, as validated definitions."""
    out = []
    for table in config.schedules:
        t = dict(table)
        name = t.pop("name")
        where = f"schedule {name!r}"
        fields: dict[str, Any] = {"name": name, "source": "config"}
        for key in ("task", "args", "kwargs", "queue", "priority", "timezone", "misfire"):
            if key in t:
                fields[key] = t.pop(key)
        opts: dict[str, Any] = {
            k: t.pop(k) for k in ("max_retries", "timeout", "result_ttl") if k in t}
        if "cron" in t:
            fields.update(kind="cron", cron=t.pop("cron"))
        elif "interval" in t:
            fields.update(kind="interval", interval=t.pop("interval"))
            if "start" in t:
                fields["start"] = _config_time(t.pop("start"), f"{where}: start")
        elif "at" in t:
            fields.update(kind="once", at=_config_time(t.pop("at"), f"{where}: at"))
        else:
            raise ScheduleError(f"{where}: one of cron, interval or at is required")
        if t:
            raise ScheduleError(f"{where}: unknown key(s) {', '.join(sorted(t))}")
        if "task" not in fields:
            raise ScheduleError(f"{where}: task: required")
        if config.cluster and not fields.get("queue"):
            raise ScheduleError(f"{where}: queue: required on a Cluster (a schedule is "
                                "stored and fires in its queue's group)")
        out.append(ScheduleDef(options=opts, **fields).validate())
    return out


def _config_time(value: Any, where: str) -> float:
    try:
        return to_epoch(value)
    except TypeError:
        raise ScheduleError(f"{where}: expected a date-time or epoch seconds, "
                            f"got {value!r}") from None


def apply_config_schedules(queue: JobQueue, config: Config) -> None:
    """Make the stored config schedules match the file: add/replace, remove the missing."""
    # on a Cluster, each queue group's schedulers apply the schedules of its queues
    wanted = [d for d in config_schedules(config)  # (a queue each, on a Cluster)
              if config.namespace([d.queue or DEFAULT_QUEUE]) == queue.keys.prefix]
    sched = Scheduler(queue)
    names = {d.name for d in wanted}
    for name, raw in queue.broker.schedule_defs().items():
        if serialization.loads(raw).get("source") == "config" and name not in names:
            sched.cancel(name)
    for d in wanted:
        current = sched.get(d.name)
        if current is not None and current.source == "config" and current.paused:
            d.paused = True  # an operator paused it: a reload does not resume it
        sched.add(d)


