"""Schedules (the tutorial's ``Scheduler`` API) and the scheduler process.

Every master forks one scheduler process; across all hosts sharing a server exactly one of
them leads, through a lease in Redis (``leader.lua``: take it when free, extend it when ours,
never overwrite another's). The leader:

* promotes delayed jobs and retries whose time has come (``promote.lua``), sleeping until the
  next due time and woken early when a sooner one arrives (``{ns}:sched:wake``);
* fires schedules (``fire.lua``): a fire is keyed by (schedule, due time) and moves the due
  time on atomically, so two schedulers that both believe they lead never fire one run twice;
* gives back the jobs of workers whose lease lapsed (their host or master died).

Schedules live in Redis, so every host sees the same ones: ``{ns}:sched:defs`` (name ->
definition), ``{ns}:sched:due`` (name -> next due time, ms), ``{ns}:sched:last``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import redis

from . import info, recovery, serialization
from .config import Config, load_config
from .connection import connect, describe_error
from .job import Job
from .keys import Keys
from .queue import WAKE_CAP, JobQueue
from .schedule import ScheduleDef, ScheduleError, first_due, plan_fire, to_epoch
from .scripts import Scripts
from .worker import set_title

log = logging.getLogger("jobq.scheduler")

#: Most delayed jobs promoted per script call (the loop repeats until none is due).
PROMOTE_BATCH = 2000
#: How often the leader drops schedules whose owning pool is gone (seconds).
OWNER_CHECK_EVERY = 10.0
#: A master that has not written its heartbeat for this long is gone (seconds).
MASTER_STALE = 15.0
#: ... and is no longer listed by ``jobq info`` after this long.
MASTER_FORGOTTEN = 600.0


def owner_id() -> str:
    """Identifies schedules whose task lives in this script's ``__main__``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def sched_keys(keys: Keys) -> dict[str, str]:
    b = keys.base
    return {"defs": f"{b}:sched:defs", "due": f"{b}:sched:due", "last": f"{b}:sched:last",
            "leader": f"{b}:sched:leader", "wake": f"{b}:sched:wake",
            "masters": keys.masters}


class Scheduler:
    """Named schedules on a queue's server: once, interval and cron.

    The tutorial's API: ``schedule_once(job_id, func, run_at, args, kwargs)``,
    ``schedule_interval(job_id, func, interval, args, kwargs)``, ``cancel(job_id)``,
    ``start()``/``stop()``; plus ``schedule_cron``. Schedules are stored in Redis and fired by
    the scheduler process of whichever jobq master leads; ``start()`` and ``stop()`` exist
    for the tutorial's code (a schedule of a ``__main__`` task lives as long as its pool).
    """

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self.redis = queue.redis
        self.k = sched_keys(queue.keys)
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
        queue = options.pop("queue", None)
        priority = options.pop("priority", 0)
        job = Job(func, tuple(args), kwargs, queue=queue, priority=priority, **options)
        serialization.encode_args(job.args, job.kwargs)
        opts = {k: v for k, v in (("max_retries", job.max_retries), ("timeout", job.timeout),
                                  ("result_ttl", job.result_ttl)) if k in options}
        from . import registry

        registry.check_enqueueable(job.task)
        return ScheduleDef(name=name, task=job.task, args=list(job.args), kwargs=job.kwargs,
                           queue=job.queue or self.queue.name, priority=job.priority,
                           options=opts, misfire=misfire,
                           owner=owner_id() if job.task.startswith("__main__:") else "",
                           **fields)

    def add(self, d: ScheduleDef, *, now: float | None = None) -> str:
        """Store a schedule (replacing one of the same name) and wake the leader."""
        d.validate()
        now = time.time() if now is None else now
        old = self.redis.hget(self.k["defs"], d.name)
        encoded = serialization.dumps(d.to_json())
        pipe = self.redis.pipeline()
        if old != encoded:
            pipe.hset(self.k["defs"], d.name, encoded)
            due = first_due(d, now)
            if due is None or d.paused:
                pipe.zrem(self.k["due"], d.name)
            else:
                pipe.zadd(self.k["due"], {d.name: int(due * 1000)})
        pipe.lpush(self.k["wake"], "1").ltrim(self.k["wake"], 0, 3)
        pipe.execute()
        self.mine.add(d.name)
        return d.name

    def cancel(self, job_id: str) -> bool:
        """Remove a schedule; True if it existed."""
        removed = self.redis.pipeline().hdel(self.k["defs"], job_id).zrem(
            self.k["due"], job_id).hdel(self.k["last"], job_id).execute()
        self.mine.discard(job_id)
        return bool(removed[0])

    remove = cancel

    def get(self, name: str) -> ScheduleDef | None:
        raw = self.redis.hget(self.k["defs"], name)
        return ScheduleDef.from_json(serialization.loads(raw)) if raw else None

    def pause(self, name: str) -> bool:
        d = self.get(name)
        if d is None:
            return False
        d.paused = True
        self.redis.pipeline().hset(self.k["defs"], name, serialization.dumps(d.to_json())).zrem(
            self.k["due"], name).execute()
        return True

    def resume(self, name: str, now: float | None = None) -> bool:
        from .schedule import next_fire

        d = self.get(name)
        if d is None:
            return False
        d.paused = False
        now = time.time() if now is None else now
        due = next_fire(d, now) if d.kind != "once" else d.at
        pipe = self.redis.pipeline().hset(self.k["defs"], name, serialization.dumps(d.to_json()))
        if due is not None:
            pipe.zadd(self.k["due"], {name: int(due * 1000)})
        pipe.lpush(self.k["wake"], "1").ltrim(self.k["wake"], 0, 3).execute()
        return True

    def run_now(self, name: str) -> Job:
        """Enqueue the schedule's job now, outside its timetable."""
        d = self.get(name)
        if d is None:
            raise KeyError(name)
        return self.queue.enqueue(d.task, *d.args, kwargs=d.kwargs, queue=d.queue,
                                  priority=d.priority, **d.options)

    def list(self) -> list[dict[str, Any]]:
        """Every schedule with its next and last run, the last job's status, the leader."""
        defs = self.redis.hgetall(self.k["defs"])
        due = dict(self.redis.zrange(self.k["due"], 0, -1, withscores=True))
        last = self.redis.hgetall(self.k["last"])
        leader = self.redis.get(self.k["leader"])
        out = []
        for name in sorted(defs):
            d = serialization.loads(defs[name])
            fired = serialization.loads(last[name]) if name in last else {}
            job_id = fired.get("job")
            d.update(next_run=due[name] / 1000 if name in due else None,
                     last_run=fired.get("fired"), last_job=job_id,
                     last_status=self.queue.get_status(job_id) if job_id else None,
                     leader=leader.rsplit(".", 2)[0] if leader else None)
            out.append(d)
        return out

    def leader(self) -> str | None:
        """The host (and pid) of the scheduler that leads, if any."""
        token = self.redis.get(self.k["leader"])
        return token.rsplit(".", 1)[0] if token else None

    # -- the tutorial's lifecycle ----------------------------------------------------------
    def start(self) -> Scheduler:
        """Schedules fire as soon as they are stored; kept for the tutorial's API."""
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
    for name, raw in queue.redis.hgetall(sched.k["defs"]).items():
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
        opts = {k: t.pop(k) for k in ("max_retries", "timeout", "result_ttl") if k in t}
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
    wanted = config_schedules(config)
    sched = Scheduler(queue)
    names = {d.name for d in wanted}
    for name, raw in queue.redis.hgetall(sched.k["defs"]).items():
        if serialization.loads(raw).get("source") == "config" and name not in names:
            sched.cancel(name)
    for d in wanted:
        current = sched.get(d.name)
        if current is not None and current.source == "config" and current.paused:
            d.paused = True  # an operator paused it: a reload does not resume it
        sched.add(d)


# -- the scheduler process --------------------------------------------------------------------
class SchedulerProcess:
    """The loop of one scheduler process; it does the leader's work only while it leads."""

    def __init__(self, config: Config, url: str, config_path: str | None = None,
                 overrides: dict[str, Any] | None = None) -> None:
        self.config = config
        self.url = url
        self.config_path = config_path
        self.overrides = overrides or {}
        self.redis = connect(url)
        self.scripts = Scripts(self.redis)
        self.keys = Keys(config.prefix)
        self.k = sched_keys(self.keys)
        self.token = f"{socket.gethostname()}.{os.getpid()}.{os.urandom(3).hex()}"
        self.leading = False
        self.stopping = False
        self.blocking = False
        self.reload = False
        self.next_owner_check = 0.0
        self.next_snapshot = 0.0

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGHUP, self._on_hup)
        set_title("jobq scheduler")
        self._apply_config()
        parent = os.getppid()
        while not self.stopping:
            if os.getppid() != parent:
                log.warning("scheduler %s: its master is gone; stopping", self.token)
                break
            try:
                wake_at = self.step(time.time())
            except redis.RedisError as exc:
                log.warning("scheduler: %s", describe_error(exc, self.url))
                self.leading = False
                wake_at = time.time() + self.config.scheduler_tick
            if self.reload:
                self.reload = False
                self._reload()
            self._sleep(wake_at)
        if self.leading:
            self._resign()
        return 0

    def step(self, now: float) -> float:
        """One pass: keep or take the lead, then (leading) promote, fire, reap.
        Returns when to look again."""
        lease_ms = int(self.config.leader_lease * 1000)
        leading = bool(self.scripts.run("leader", [self.k["leader"]], [self.token, lease_ms]))
        if leading != self.leading:
            self.leading = leading
            log.info("scheduler %s %s", self.token, "leads" if leading else "stands by")
        renew_at = now + min(self.config.scheduler_tick, self.config.leader_lease / 3)
        if not leading:
            return renew_at
        next_job = self.promote(now)
        next_fire = self.fire_due(now)
        recovery.reap(self.redis, self.scripts, self.keys, self.config, now)
        if now >= self.next_owner_check:
            self.next_owner_check = now + OWNER_CHECK_EVERY
            self.drop_orphaned_schedules(now)
        if now >= self.next_snapshot:
            self.next_snapshot = now + info.SNAPSHOT_EVERY
            info.snapshot(self.redis, self.keys, now)
        return min(x for x in (renew_at, next_job, next_fire) if x is not None)

    def promote(self, now: float) -> float | None:
        """Move due delayed jobs to their queues; return the next one's due time."""
        while True:
            moved, nxt = self.scripts.run("promote", [self.keys.jobs], [
                self.keys.base, int(now * 1000), PROMOTE_BATCH, WAKE_CAP])
            if moved < PROMOTE_BATCH:
                return None if nxt < 0 else nxt / 1000

    def fire_due(self, now: float) -> float | None:
        """Fire every schedule that is due; return the next due time."""
        due = self.redis.zrangebyscore(self.k["due"], "-inf", int(now * 1000), withscores=True)
        for name, due_ms in due:
            raw = self.redis.hget(self.k["defs"], name)
            if raw is None:
                self.redis.zrem(self.k["due"], name)
                continue
            try:
                d = ScheduleDef.from_json(serialization.loads(raw)).validate()
                plan = plan_fire(d, due_ms / 1000, now)
                specs = [self._job_spec(d, name, run) for run in plan.runs]
            except (ScheduleError, ValueError, TypeError) as exc:
                log.error("schedule %s is broken and was paused: %s", name, exc)
                self.redis.zrem(self.k["due"], name)
                continue
            expected = int(due_ms)
            runs: list[float | None] = list(plan.runs) or [None]
            for i, run in enumerate(runs):
                last = i == len(runs) - 1
                nxt = plan.next_due if last else runs[i + 1]
                next_ms = int(nxt * 1000) if nxt is not None else -1
                job_args = specs[i] if run is not None else []
                fired = self.scripts.run("fire", [self.keys.jobs], [
                    self.keys.base, name, expected, next_ms, int(now * 1000), WAKE_CAP,
                    *job_args])
                if not fired:
                    break  # another scheduler fired this run: it has moved the due time on
                if run is not None:
                    log.info("schedule %s fired (due %s)", name,
                             time.strftime("%H:%M:%S", time.localtime(run)))
                expected = next_ms
        nxt = self.redis.zrange(self.k["due"], 0, 0, withscores=True)
        return nxt[0][1] / 1000 if nxt else None

    def _job_spec(self, d: ScheduleDef, name: str, run: float) -> list[Any]:
        """The enqueue arguments of one run: its job id is the (name, due time) key."""
        job = Job(d.task, d.args, d.kwargs, id=f"{name}@{int(run * 1000)}", queue=d.queue,
                  priority=d.priority, **d.options)
        spec = serialization.encode_spec(job.spec(), max_bytes=self.config.max_payload_bytes)
        return [job.id, d.queue, d.priority, spec]

    def drop_orphaned_schedules(self, now: float) -> None:
        """Schedules of a ``__main__`` task die with the pool that could run it."""
        owners = set()
        for master, raw in self.redis.hgetall(self.k["masters"]).items():
            described = serialization.loads(raw)
            age = now - described.get("ts", 0)
            if age < MASTER_STALE:
                owners.add(described.get("owner"))
            elif age > MASTER_FORGOTTEN:
                self.redis.hdel(self.k["masters"], master)
        for name, raw in self.redis.hgetall(self.k["defs"]).items():
            owner = serialization.loads(raw).get("owner")
            if owner and owner not in owners:
                log.info("schedule %s removed: the pool that owned it is gone", name)
                self.redis.pipeline().hdel(self.k["defs"], name).zrem(self.k["due"], name).execute()

    def _sleep(self, wake_at: float) -> None:
        timeout = max(0.001, wake_at - time.time())
        if self.stopping:
            return
        if not self.leading:
            _interruptible_sleep(timeout, lambda: self.stopping)
            return
        self.blocking = True
        try:
            self.redis.blpop([self.k["wake"]], timeout=timeout)
        except _Wake:
            self.redis.connection_pool.disconnect()  # a reply may be half read
        except redis.RedisError:
            _interruptible_sleep(min(timeout, 1.0), lambda: self.stopping)
        finally:
            self.blocking = False

    def _on_term(self, signum: int, frame: Any) -> None:
        self.stopping = True
        if self.blocking:  # leave BLPOP at once; anywhere else the loop sees the flag
            raise _Wake()

    def _on_hup(self, signum: int, frame: Any) -> None:
        self.reload = True

    def _apply_config(self) -> None:
        if not self.config.schedules and not self._has_config_schedules():
            return
        try:
            apply_config_schedules(JobQueue(redis_url=self.url, config=self.config,
                                            connection=self.redis), self.config)
        except (ScheduleError, redis.RedisError) as exc:
            log.error("config schedules not applied: %s", exc)

    def _has_config_schedules(self) -> bool:
        try:
            return any(serialization.loads(raw).get("source") == "config"
                       for raw in self.redis.hvals(self.k["defs"]))
        except redis.RedisError:
            return False

    def _reload(self) -> None:
        try:
            self.config = load_config(self.config_path, **self.overrides)
        except Exception as exc:
            log.error("scheduler: reload refused: %s", exc)
            return
        self._apply_config()

    def _resign(self) -> None:
        """Give up the lead at once on a clean stop, so a standby takes over quickly."""
        try:
            self.redis.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then "
                            "return redis.call('DEL', KEYS[1]) end return 0", 1,
                            self.k["leader"], self.token)
        except redis.RedisError:
            pass


class _Wake(BaseException):
    """Raised by the TERM handler to leave a blocking wait at once."""


def _interruptible_sleep(seconds: float, stop: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while not stop():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.1))


def scheduler_main(config: Config, url: str, options: Any = None) -> int:
    """Entry point of the scheduler process forked by the master."""
    config_path = getattr(options, "config_path", None)
    overrides = getattr(options, "overrides", None)
    return SchedulerProcess(config, url, config_path, overrides).run()
