"""The scheduler process: one per master; across all hosts sharing a server exactly one leads.

Leadership is a lease in Redis (``leader.lua``: take it when free, extend it when ours, never
overwrite another's). The leader:

* promotes delayed jobs and retries whose time has come (``promote.lua``), sleeping until the
  next due time (timed on its own clock: an idle server times a blocked client out only at
  its ``hz`` ticks) and woken early when a sooner one arrives (``{ns}:sched:wake``);
* fires schedules (``fire.lua``): a fire is keyed by (schedule, due time) and moves the due
  time on atomically, so two schedulers that both believe they lead never fire one run twice;
* drops the schedules of a ``WorkerPool`` script that is gone, and snapshots the counters for
  ``jobq info``'s rates.

Every scheduler, leading or not, gives back the jobs of workers whose lease lapsed (their host
or master died; ``reap.lua``, then ``release.lua`` checks each lease again): a host whose
scheduler led gets its jobs back within the lease, not after the leader lease as well.

Signals: TERM stops it (a leader resigns at once, so a standby takes over quickly); HUP
re-reads the config and re-applies its ``[[schedule]]`` tables; USR1 and HUP reopen the log
file (logrotate moved it).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import redis

from . import info, serialization
from . import log as jobq_log
from .broker import Broker, NewJob
from .catalog import Catalog
from .config import Config, host_name, load_config
from .connection import connect, describe_error
from .job import Job
from .keys import Keys
from .log import Trouble
from .process import BlockingCall, set_title
from .queue import JobQueue
from .schedule import ScheduleDef, ScheduleError, local_time, plan_fire
from .scheduler import apply_config_schedules
from .wire import DEFAULT_QUEUE, encode_spec, route

log = logging.getLogger("jobq.scheduler")

#: How often the leader drops schedules whose owning pool is gone (seconds).
OWNER_CHECK_EVERY = 10.0
#: How long a scheduler that does not lead sleeps at most between its looks (seconds).
STANDBY_NAP = 0.1


class SchedulerProcess:
    """The loop of one scheduler process; it does the leader's work only while it leads."""

    def __init__(self, config: Config, url: str, config_path: str | None = None,
                 overrides: dict[str, Any] | None = None) -> None:
        self.config = config
        self.url = url
        self.config_path = config_path
        self.overrides = overrides or {}
        self.keys = Keys(config.namespace())
        self.redis = connect(url, lease_time=config.lease_time, route=self.keys.route)
        self.broker = Broker(self.redis, self.keys, config)
        self.catalog = Catalog(self.broker)
        self.token = f"{host_name(config, short=False)}.{os.getpid()}.{os.urandom(3).hex()}"
        self.leading = False
        self.epoch: str | None = None
        self.stopping = False
        self.sleeping = BlockingCall(on_interrupt=self.broker.disconnect)
        self.reload = False
        self.reopen_logs = False
        self.next_owner_check = 0.0
        self.next_snapshot = 0.0

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGUSR1, self._on_usr1)
        set_title("jobq scheduler")
        self._apply_config()
        parent = os.getppid()
        trouble: Trouble | None = None
        while not self.stopping:
            if os.getppid() != parent:
                log.warning("scheduler %s: its master is gone; stopping", self.token)
                break
            if self.reopen_logs:
                self.reopen_logs = False
                jobq_log.reopen()
            try:
                wake_at = self.step(time.time())
                if trouble is not None:
                    trouble.over()
                    trouble = None
            except redis.RedisError as exc:
                if trouble is None:
                    trouble = Trouble(log, f"scheduler: {describe_error(exc, self.url)}")
                trouble.again()
                self.leading = False
                wake_at = time.time() + self.tick
            if self.reload:
                self.reload = False
                self._reload()
            self._sleep(wake_at)
        if self.leading:
            self._resign()
        return 0

    @property
    def tick(self) -> float:
        """How often the scheduler looks again at the latest (seconds): within a third of
        its leader lease (to keep it), and a sixth of the workers' lease (so that a gap of
        half a lease between two reaps means the server stalled, see Broker.reap)."""
        c = self.config
        return min(c.scheduler_tick, c.leader_lease / 3, c.lease_time / 6)

    def step(self, now: float) -> float:
        """One pass: keep or take the lead, reap, then (leading) promote and fire.
        Returns when to look again."""
        leading = self.broker.lead(self.token, self.config.leader_lease)
        if leading != self.leading:
            self.leading = leading
            log.info("scheduler %s %s", self.token, "leads" if leading else "stands by")
        renew_at = now + self.tick
        # every scheduler reaps, leading or not: the jobs of a host that died come back
        # within its lease even when that host's scheduler led (its leader lease lapses
        # later). Reaping is atomic and checks each lease again (release.lua), so two
        # reapers never give a worker's jobs back twice; and the stall guard (reap.lua)
        # then sees a gap only when no scheduler anywhere could reach the server.
        for worker, released in self.broker.reap(self.tick, now):
            message = released.describe(worker, "lease expired")
            if message:
                log.warning("%s", message)
        if not leading:
            return renew_at
        next_job = self.broker.promote(now)
        next_fire = self.fire_due(now)
        if now >= self.next_owner_check:
            self.next_owner_check = now + OWNER_CHECK_EVERY
            self.drop_orphaned_schedules(now)
        if now >= self.next_snapshot:
            self.next_snapshot = now + info.SNAPSHOT_EVERY
            info.snapshot(self.broker, now)
            self._check_epoch()
        return min(x for x in (renew_at, next_job, next_fire) if x is not None)

    def fire_due(self, now: float) -> float | None:
        """Fire every schedule that is due; return the next due time."""
        for name, due_ms in self.broker.schedules_due(now):
            raw = self.broker.schedule_def(name)
            if raw is None:
                self.broker.unschedule(name)
                continue
            try:
                d = ScheduleDef.from_json(serialization.loads(raw)).validate()
                plan = plan_fire(d, due_ms / 1000, now)
                jobs = [self._job(d, name, run) for run in plan.runs]
            except (ScheduleError, ValueError, TypeError) as exc:
                log.error("schedule %s is broken and was paused: %s", name, exc)
                self.broker.unschedule(name)
                continue
            expected = due_ms
            runs: list[float | None] = list(plan.runs) or [None]
            for i, run in enumerate(runs):
                last = i == len(runs) - 1
                nxt = plan.next_due if last else runs[i + 1]
                next_ms = int(nxt * 1000) if nxt is not None else -1
                fired = self.broker.fire(name, expected, next_ms,
                                         jobs[i] if run is not None else None, now)
                if not fired:
                    break  # another scheduler fired this run: it has moved the due time on
                if run is not None:
                    log.info("schedule %s fired (due %s)", name, local_time(run))
                expected = next_ms
        return self.broker.next_schedule_due()

    def _job(self, d: ScheduleDef, name: str, run: float) -> NewJob:
        """The job of one run: its id is the (name, due time) key. Its options are the
        schedule's, then those its task declared (as the catalog says now), then the
        config's defaults."""
        declared = self.catalog.get(d.task) if not d.owner else None
        options = {"timeout": self.config.default_timeout,
                   "max_retries": self.config.default_max_retries,
                   **(declared.job_options() if declared is not None else {}), **d.options}
        if d.queue is not None:
            options["queue"] = d.queue
        if d.priority is not None:
            options["priority"] = d.priority
        options.setdefault("queue", DEFAULT_QUEUE)
        job = Job(d.task, d.args, d.kwargs, id=f"{name}@{int(run * 1000)}", **options)
        job.owner = d.owner or None  # a task of a script's __main__: for its pool alone
        spec = encode_spec(job, max_bytes=self.config.max_payload_bytes)
        return NewJob(job.id, route(job.queue or DEFAULT_QUEUE, job.owner), job.priority, 0,
                      spec)

    def drop_orphaned_schedules(self, now: float) -> None:
        """Schedules of a ``__main__`` task die with the pool that could run it."""
        owners = set()
        for master, raw in self.broker.masters().items():
            described = serialization.loads(raw)
            state = info.master_state(described, now)
            if state == "alive":
                owners.add(described.get("owner"))
            elif state == "forgotten":
                self.broker.forget_master(master)
        for name, raw in self.broker.schedule_defs().items():
            owner = serialization.loads(raw).get("owner")
            if owner and owner not in owners:
                log.info("schedule %s removed: the pool that owned it is gone", name)
                self.broker.remove_schedule(name)

    def _check_epoch(self) -> None:
        """The server lost its data (restarted empty): the schedules of the config are gone
        with it; put them back (the master says what else was lost)."""
        epoch = self.broker.epoch()
        if self.epoch is not None and epoch != self.epoch and self.config.schedules:
            log.warning("the server lost its data: applying the config's schedules again")
            self._apply_config()
        self.epoch = epoch

    def _sleep(self, wake_at: float) -> None:
        timeout = max(0.001, wake_at - time.time())
        if self.stopping or self.reload or self.reopen_logs:
            return  # a signal came during the step: act on it first
        if not self.leading:
            self._nap(timeout)
            return
        try:
            self.sleeping.call(self._wait_for_wake, timeout)
        except redis.RedisError:
            self._nap(min(timeout, 1.0))

    def _wait_for_wake(self, timeout: float) -> None:
        if not (self.stopping or self.reload or self.reopen_logs):  # a signal came before
            self.broker.wait_for_wake(timeout)

    def _nap(self, seconds: float) -> None:
        """Sleep without the server, but wake at once when told to stop, reload or reopen
        the log."""
        deadline = time.monotonic() + seconds
        while not (self.stopping or self.reload or self.reopen_logs):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, STANDBY_NAP))

    def _on_term(self, signum: int, frame: Any) -> None:
        self.stopping = True
        self.sleeping.interrupt()  # leave BLPOP at once; anywhere else the loop sees the flag

    def _on_hup(self, signum: int, frame: Any) -> None:
        self.reload = self.reopen_logs = True
        self.sleeping.interrupt()  # leave BLPOP: reload now, not at the next tick

    def _on_usr1(self, signum: int, frame: Any) -> None:
        self.reopen_logs = True  # done in the loop: a handler never touches the log
        self.sleeping.interrupt()

    def _apply_config(self) -> None:
        if not self.config.schedules and not self._has_config_schedules():
            return
        try:
            apply_config_schedules(JobQueue(redis_url=self.url, config=self.config,
                                            prefix=self.keys.prefix, connection=self.redis),
                                   self.config)
        except (ScheduleError, redis.RedisError) as exc:
            log.error("config schedules not applied: %s", exc)

    def _has_config_schedules(self) -> bool:
        try:
            return any(serialization.loads(raw).get("source") == "config"
                       for raw in self.broker.schedule_defs().values())
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
            self.broker.resign(self.token)
        except redis.RedisError:
            pass


def scheduler_main(config: Config, url: str, options: Any = None) -> int:
    """Entry point of the scheduler process forked by the master."""
    config_path = getattr(options, "config_path", None)
    overrides = getattr(options, "overrides", None)
    return SchedulerProcess(config, url, config_path, overrides).run()
