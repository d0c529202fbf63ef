"""The master's duties towards the server, in a thread of their own.

The arbiter supervises processes; what it owes the server it hands to :class:`Duties`:

* renew the leases of its live workers (every ``lease_time / 3``);
* look for cancel requests of the jobs its workers run, and tell the arbiter which worker
  to interrupt (it signals; this thread never touches a process); in the same round trip,
  take the control requests sent to this master (``jobq workers``, :mod:`jobq.control`) and
  hand them to the arbiter, which applies them and has the next heartbeat say so;
* describe the master and its workers for ``jobq info`` and the scheduler (heartbeat);
* settle what a dead worker had journaled but not sent, and give back the jobs it held,
  with the cause (retried with back-off while the server cannot be reached);
* restart the embedded server if it went away.

Why a thread, not a child process: these duties read what the arbiter knows (its workers,
their slots) every tick, and a thread shares that for free; a call that blocks on a slow or
hung server blocks only this thread (redis-py waits in socket calls, which release the GIL),
so the arbiter keeps reaping, spawning and killing on time. The thread has its own
connection and holds no lock a forked child could inherit: workers and the scheduler build
their own clients after fork, and the logging module re-creates its locks in a child.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis

from .. import catalog, info, limits, serialization
from ..broker import Broker
from ..config import Config
from ..connection import connect, describe_error
from ..control import Resize
from ..keys import Keys
from ..log import Trouble
from ..server import EmbeddedServer, ServerError
from ..urls import redact
from ..wire import AckEntry

log = logging.getLogger("jobq.master")

#: How often the master looks for cancel requests of the jobs its workers run, and for
#: control requests (seconds).
CANCEL_CHECK_EVERY = 0.25
#: How often the master describes itself and its workers in Redis (``jobq info``).
HEARTBEAT_EVERY = info.HEARTBEAT_EVERY
#: How often the embedded server is checked (seconds).
SERVER_EVERY = 5.0
#: Retry back-off for giving back a dead worker's jobs while the server is away (seconds).
RELEASE_RETRY_FIRST, RELEASE_RETRY_CAP = 0.1, 5.0


class Seen(NamedTuple):
    """One live worker as the arbiter saw it on its last tick."""

    pid: int
    slot: int
    name: str
    busy: bool
    job_id: str | None
    job_started: float
    memory_mb: float | None
    jobs_done: int


class Interrupt(NamedTuple):
    """Ask the arbiter to interrupt ``job_id`` in the worker ``pid`` (USR2)."""

    pid: int
    slot: int
    job_id: str
    reason: str


@dataclass
class _Gone:
    """A worker that died: what it had not acknowledged, and its jobs to give back."""

    name: str
    current: str  # the job it was running, "-" for none
    cause: str
    acks: list[AckEntry]
    queues: list[str]
    tries: int = 0
    next_try: float = field(default=0.0)


class Duties:
    """Runs the master's server duties in a daemon thread; see the module docstring."""

    def __init__(self, config: Config, url: str, master_id: str, *,
                 describe: Callable[[list[Seen], float], dict[str, Any]],
                 wake: Callable[[], None], embedded: bool) -> None:
        self.config = config
        self.url = url
        self.master_id = master_id
        keys = Keys(config.namespace())
        self.broker = Broker(connect(url, lease_time=config.lease_time, route=keys.route), keys,
                             config)
        self.interrupts: queue.SimpleQueue[Interrupt] = queue.SimpleQueue()
        #: control requests for the arbiter, in the order they were sent
        self.controls: queue.SimpleQueue[Resize] = queue.SimpleQueue()
        self._describe = describe
        self._wake = wake
        self._embedded = embedded
        self._events: queue.SimpleQueue[_Gone] = queue.SimpleQueue()
        self._gone: list[_Gone] = []
        self._seen: list[Seen] = []
        self._stopping = threading.Event()
        self._interrupted: set[tuple[int, str]] = set()
        self._trouble: Trouble | None = None  # the server, as lease renewals find it
        #: when the latest renewal that reached the server was sent (monotonic): the leases
        #: last until at least then plus the lease time
        self._renewed = time.monotonic()
        self._epoch: str | None = None
        self._thread = threading.Thread(target=self._run, name="jobq-duties", daemon=True)
        self._next_renew = self._next_cancel = self._next_beat = self._next_server = 0.0
        #: whether the config's limits ([limits.NAME]) are written to the server yet
        self._limits_defined = False

    # -- what the arbiter calls -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def seen(self, workers: list[Seen]) -> None:
        """The live workers now (the arbiter calls this every tick; a cheap assignment)."""
        self._seen = workers

    def reconfigure(self, config: Config) -> None:
        """A reload: the new config's lease time and retention apply from now on."""
        self.config = config
        self.broker.config = config
        self._limits_defined = False  # the new config's limits replace the old ones

    def beat_now(self) -> None:
        """Describe the master at once (the arbiter applied a control request: its sender
        waits to see it)."""
        self._next_beat = 0.0
        self._events.put(_Gone("", "", "", [], []))  # wake the thread

    def worker_gone(self, name: str, current: str, cause: str, acks: Sequence[AckEntry],
                    queues: Sequence[str]) -> None:
        """A worker died: send its unsent acknowledgements, then give back what it held."""
        self._events.put(_Gone(name, current, cause, list(acks), list(queues)))

    def stop(self, timeout: float) -> None:
        """Finish what is queued (dead workers' jobs are given back), forget this master's
        description, and end the thread; waits at most ``timeout`` seconds."""
        self._stopping.set()
        self._events.put(_Gone("", "", "", [], []))  # wake the thread
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the server did not answer within %g s: the jobs of workers that "
                        "died come back when their lease lapses", timeout)

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                self._due(time.time())
            except Exception:  # a bug here must not end the renewals of every lease
                log.exception("master duties: unexpected error; going on")
            if self._stopping.is_set() and not self._gone and self._events.empty():
                break
            try:
                event = self._events.get(timeout=max(0.0, self._next_wake() - time.time()))
            except queue.Empty:
                continue
            if event.name:
                self._gone.append(event)
        self._forget_master()

    def _next_wake(self) -> float:
        if self._stopping.is_set():  # only the dead workers' jobs are left to give back
            return min((g.next_try for g in self._gone), default=time.time() + 0.1)
        wakes = [self._next_renew, self._next_cancel, self._next_beat]
        if self._embedded:
            wakes.append(self._next_server)
        if self._gone:
            wakes.append(min(g.next_try for g in self._gone))
        return min(wakes)

    def _due(self, now: float) -> None:
        if self._gone:
            self._settle_gone(now)
        if self._stopping.is_set():
            return
        if now >= self._next_renew:
            self._next_renew = now + self.config.lease_time / 3
            self._renew()
        if now >= self._next_cancel:
            self._next_cancel = now + CANCEL_CHECK_EVERY
            self._poll()
        if now >= self._next_beat:
            self._next_beat = now + HEARTBEAT_EVERY
            self._heartbeat(now)
        if self._embedded and now >= self._next_server:
            self._next_server = now + SERVER_EVERY
            self._supervise_server()

    def _settle_gone(self, now: float) -> None:
        for gone in list(self._gone):
            if gone.next_try > now:
                continue
            try:
                if gone.acks:
                    stale = self.broker.send_acks(gone.name, gone.acks)
                    log.info("sent %d acknowledgement(s) worker %s had not seen settled "
                             "(%d of them settled already, or no longer its)",
                             len(gone.acks), gone.name, len(stale))
                    gone.acks = []
                released = self.broker.release(gone.name, cause=gone.cause,
                                               current=gone.current, queues=gone.queues)
            except redis.RedisError as exc:
                gone.tries += 1
                gone.next_try = now + min(RELEASE_RETRY_FIRST * 2 ** gone.tries,
                                          RELEASE_RETRY_CAP)
                if gone.tries == 1:
                    log.warning("cannot give back the jobs of %s yet (%s); will retry",
                                gone.name, describe_error(exc, self.url))
                continue
            self._gone.remove(gone)
            message = released.describe(gone.name, gone.cause) if released else None
            if message:
                log.warning("%s", message)

    def _renew(self) -> None:
        """Extend the lease of every live worker (a released lease is never re-created).
        Says so when no renewal got through for longer than a lease (a partition, a frozen
        host): the leader may have given back what the workers held, to run elsewhere."""
        sent = time.monotonic()
        try:
            self.broker.renew_leases([w.name for w in self._seen])
        except redis.RedisError as exc:
            if self._trouble is None:
                self._trouble = Trouble(log, f"cannot renew leases: "
                                             f"{describe_error(exc, self.url)}")
            self._trouble.again()
        else:
            if self._trouble is not None:
                self._trouble.over()
                self._trouble = None
            gap = sent - self._renewed
            if self._seen and gap > self.config.lease_time:
                log.warning("leases lapsed: no renewal reached the server for %.1f s, longer "
                            "than the lease (%g s): the jobs its %d worker(s) held may have been "
                            "given back to run elsewhere, and their results here are dropped",
                            gap, self.config.lease_time, len(self._seen))
            self._renewed = sent

    def _poll(self) -> None:
        """Tell the arbiter which workers run a job that was asked to stop, and hand it the
        control requests sent to this master (one round trip for both)."""
        busy = [w for w in self._seen if w.busy and w.job_id]
        try:
            asked, controls = self.broker.master_requests(
                self.master_id, [w.job_id for w in busy if w.job_id])
        except redis.RedisError:
            return
        for raw in controls:
            request = Resize.decode(raw)
            if request is None:
                log.warning("ignored a control request that is not one: %.200s", raw)
                continue
            self.controls.put(request)
        if controls:
            self._wake()
        current = set()
        for w, reason in zip(busy, asked, strict=True):
            assert w.job_id is not None
            current.add((w.pid, w.job_id))
            if reason is not None and (w.pid, w.job_id) not in self._interrupted:
                self._interrupted.add((w.pid, w.job_id))
                self.interrupts.put(Interrupt(w.pid, w.slot, w.job_id, reason))
                self._wake()
        self._interrupted &= current

    def _heartbeat(self, now: float) -> None:
        try:
            self.broker.describe_master(self.master_id, serialization.dumps(
                self._describe(self._seen, now)), catalog.ttl(self.config.lease_time))
            self._check_epoch()
            if not self._limits_defined:
                self.broker.define_limits({name: limit.to_json() for name, limit in
                                           limits.from_config(self.config.limits).items()})
                self._limits_defined = True
        except redis.RedisError as exc:
            log.debug("heartbeat failed: %s", exc)

    def _check_epoch(self) -> None:
        """Say so, once, when the server lost its data (restarted empty): the jobs queued,
        scheduled and running are gone from it, and nothing else would tell."""
        epoch = self.broker.epoch()
        if self._epoch is not None and epoch != self._epoch:
            running = sum(1 for w in self._seen if w.busy)
            log.error("the server at %s lost its data (restarted without persistence?): every "
                      "job it held is gone: queued, scheduled, deferred, and the %d running "
                      "here, whose results will be dropped; counters start again from zero",
                      redact(self.url), running)
        if epoch != self._epoch:
            self._limits_defined = False  # a server that lost its data lost them too
        self._epoch = epoch

    def _forget_master(self) -> None:
        try:
            self.broker.forget_master(self.master_id)
        except redis.RedisError:
            pass

    def _supervise_server(self) -> None:
        server = EmbeddedServer(socket_group=self.config.server_socket_group)
        if server.is_running():
            return
        log.warning("the embedded server is not running; starting it")
        try:
            server.start()
        except ServerError as exc:
            log.error("cannot start the embedded server: %s", exc)
