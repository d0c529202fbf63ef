"""The Prometheus side of jobq's metrics: what a scrape reads, as metric families, and the
HTTP server that serves them (see :mod:`jobq.metrics` for the design).

Every metric, by where it comes from:

* the server (a master's ``/metrics`` and ``jobq metrics`` alike): ``jobq_server_up``,
  ``jobq_server_rtt_seconds``, per queue ``jobq_queue_{pending,running,scheduled,deferred,
  dead_letter}_jobs`` and ``jobq_queue_{enqueued,completed,failed,retried,cancelled}_total``
  (the server's counters: every master's work), ``jobq_scheduler_leader``;
* the master's workers (their tallies): ``jobq_jobs_{completed,failed,retried,
  cancelled}_total{queue,task}``, ``jobq_job_duration_seconds`` and ``jobq_job_wait_seconds``
  histograms ``{queue,task}``;
* the master itself: ``jobq_workers{state}``, ``jobq_workers_target``,
  ``jobq_worker_memory_bytes{slot}``, ``jobq_worker_restarts_total{cause}``,
  ``jobq_reloads_total{result}``, ``jobq_scheduler_leading``; and prometheus_client's
  ``process_*`` metrics of the master process.
"""

from __future__ import annotations

import os
import socket
import threading
import weakref
from collections.abc import Iterator, Sequence
from socketserver import ThreadingMixIn
from typing import Any, NamedTuple, Protocol, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from prometheus_client import make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from ..broker import Broker
from ..config import Config, host_name
from ..connection import connect
from ..exceptions import MetricsError
from ..keys import Keys
from .tally import (
    DUR0,
    DUR_SUM,
    DURATION_BUCKETS,
    OUTCOMES,
    WAIT0,
    WAIT_BUCKETS,
    WAIT_SUM,
    Table,
    Totals,
)

#: The longest a scrape waits for the server (seconds), to connect and for each reply.
SCRAPE_TIMEOUT = 2.0
#: The server's current counts of a queue: (metric name, its counter in the stats hash, help).
QUEUE_GAUGES = (
    ("jobq_queue_pending_jobs", "pending", "Jobs waiting in the queue to be claimed."),
    ("jobq_queue_running_jobs", "processing",
     "Jobs workers hold: running, or claimed and about to start."),
    ("jobq_queue_scheduled_jobs", "scheduled", "Jobs waiting for a later time: delayed, "
                                               "or retrying after a back-off."),
    ("jobq_queue_deferred_jobs", "deferred", "Jobs waiting for their parents (depends_on)."),
)
#: The server's totals of a queue since it was first used (every master's work).
QUEUE_COUNTERS = ("enqueued", "completed", "failed", "retried", "cancelled")
#: The tallies' outcomes, as the per-task counters name them.
OUTCOME_METRICS = {"completed": "jobq_jobs_completed", "failed": "jobq_jobs_failed",
                   "retry": "jobq_jobs_retried", "cancelled": "jobq_jobs_cancelled"}
OUTCOME_TEXT = {"completed": "completed", "failed": "failed for good",
                "retry": "failed, to be retried", "cancelled": "cancelled"}
RELOAD_RESULTS = ("applied", "refused")


class ServerReading(NamedTuple):
    """What one scrape read from the server; ``rtt`` None when it did not answer."""

    rtt: float | None
    counters: dict[str, dict[str, int]]
    dead: dict[str, int]
    leader: str | None


def read_server(broker: Broker) -> ServerReading:
    try:
        rtt = broker.round_trip()
        counters = broker.counters()
        dead = dict(zip(counters, broker.dlq_counts(list(counters)), strict=True))
        leader = broker.leader_token()
    except (redis.RedisError, OSError):
        return ServerReading(None, {}, {}, None)
    return ServerReading(rtt, counters, dead, leader)


def server_families(r: ServerReading) -> list[Metric]:
    up = GaugeMetricFamily("jobq_server_up", "Whether the server answered this scrape "
                           "(1) or not (0).", value=0 if r.rtt is None else 1)
    rtt = GaugeMetricFamily("jobq_server_rtt_seconds", "Round-trip time of one PING to the "
                            "server, measured at this scrape.", unit="seconds")
    if r.rtt is not None:
        rtt.add_metric([], r.rtt)
    out: list[Metric] = [up, rtt]
    for name, counter, doc in QUEUE_GAUGES:
        g = GaugeMetricFamily(name, doc, labels=["queue"])
        for q, counts in r.counters.items():
            g.add_metric([q], counts.get(counter, 0))
        out.append(g)
    dead = GaugeMetricFamily("jobq_queue_dead_letter_jobs", "Jobs in the queue's dead-letter "
                             "queue.", labels=["queue"])
    for q, n in r.dead.items():
        dead.add_metric([q], n)
    out.append(dead)
    for counter in QUEUE_COUNTERS:
        c = CounterMetricFamily(f"jobq_queue_{counter}", f"Jobs {counter} in the queue since "
                                "it was first used, as the server counts them (every master).",
                                labels=["queue"])
        for q, counts in r.counters.items():
            c.add_metric([q], counts.get(counter, 0))
        out.append(c)
    leader = GaugeMetricFamily("jobq_scheduler_leader", "Whether a scheduler (of any host) "
                               "holds the leader lease (1) or none does (0).")
    if r.rtt is not None:
        leader.add_metric([], 1 if r.leader else 0)
    out.append(leader)
    return out


def tally_families(table: Table) -> list[Metric]:
    """The per-task counters and histograms of a master's workers."""
    counters = {status: CounterMetricFamily(
        name, f"Attempts of the task's jobs that ended {OUTCOME_TEXT[status]}, in this "
        "master's workers.", labels=["queue", "task"]) for status, name in OUTCOME_METRICS.items()}
    duration = HistogramMetricFamily(
        "jobq_job_duration_seconds", "How long each attempt of the task's jobs ran, any "
        "outcome.", labels=["queue", "task"], unit="seconds")
    wait = HistogramMetricFamily(
        "jobq_job_wait_seconds", "From a job's enqueue (its creation time, on the enqueuing "
        "host's clock) to the start of its first attempt; a delayed job's includes its "
        "delay.", labels=["queue", "task"], unit="seconds")
    for (queue, task), numbers in sorted(table.items()):
        labels = [queue, task]
        for i, status in enumerate(OUTCOMES):
            counters[status].add_metric(labels, numbers[i])
        duration.add_metric(labels, _buckets(DURATION_BUCKETS, numbers[DUR0:DUR_SUM]),
                            numbers[DUR_SUM])
        if any(numbers[WAIT0:WAIT_SUM]):
            wait.add_metric(labels, _buckets(WAIT_BUCKETS, numbers[WAIT0:WAIT_SUM]),
                            numbers[WAIT_SUM])
    return [*counters.values(), duration, wait]


def _buckets(bounds: Sequence[float], counts: Sequence[float]) -> list[tuple[str, float]]:
    """Per-bucket counts as Prometheus's cumulative ``le`` buckets, +Inf last."""
    out, total = [], 0.0
    for bound, n in zip([*(repr(float(b)) for b in bounds), "+Inf"], counts, strict=True):
        total += n
        out.append((bound, total))
    return out


class Supervised(Protocol):
    """What the collector reads of a master (:class:`jobq.master.arbiter.Master`): values the
    arbiter's loop replaces or counts, read here without a lock (a scrape may be a tick
    behind)."""

    target: int
    scheduler_pid: int
    #: the live workers as the last tick saw them (:class:`jobq.master.duties.Seen`)
    seen_now: list[Any]
    #: worker restarts by cause (every cause of master.policy.RESTART_CAUSES, from the start)
    restarts: dict[str, int]
    #: reloads by result: applied, refused
    reloads: dict[str, int]
    totals: Totals | None


def master_families(master: Supervised, leader: str | None, host: str) -> list[Metric]:
    seen = list(master.seen_now)
    workers = GaugeMetricFamily("jobq_workers", "This master's live workers, busy (running a "
                                "job) or idle (or starting).", labels=["state"])
    busy = sum(1 for w in seen if w.busy)
    workers.add_metric(["busy"], busy)
    workers.add_metric(["idle"], len(seen) - busy)
    target = GaugeMetricFamily("jobq_workers_target", "How many workers this master keeps.",
                               value=master.target)
    memory = GaugeMetricFamily("jobq_worker_memory_bytes", "Each worker's memory (unique set "
                               "size, else resident), by its slot.", labels=["slot"],
                               unit="bytes")
    for w in sorted(seen, key=lambda w: w.slot):
        if w.memory_mb:
            memory.add_metric([str(w.slot)], round(w.memory_mb * 2**20))
    restarts = CounterMetricFamily("jobq_worker_restarts", "Workers this master replaced, by "
                                   "why the one before exited.", labels=["cause"])
    for cause, n in master.restarts.items():  # every cause, from the start (the arbiter's)
        restarts.add_metric([cause], n)
    reloads = CounterMetricFamily("jobq_reloads", "Reloads (HUP) of this master, applied or "
                                  "refused.", labels=["result"])
    for result in RELOAD_RESULTS:
        reloads.add_metric([result], master.reloads.get(result, 0))
    leading = GaugeMetricFamily("jobq_scheduler_leading", "Whether this master's scheduler "
                                "holds the leader lease (1) or not (0).",
                                value=int(leads(leader, host, master.scheduler_pid)))
    return [workers, target, memory, restarts, reloads, leading]


def leads(token: str | None, host: str, pid: int) -> bool:
    """Whether the leader token (``host.pid.random``, :mod:`jobq.scheduler_daemon`) is the
    scheduler ``pid``'s of this host."""
    if not token or not pid:
        return False
    parts = token.rsplit(".", 2)
    return len(parts) == 3 and parts[0] == host and parts[1] == str(pid)


class JobqCollector(Collector):
    """Collects on each scrape: the server's view, and with ``master`` its own."""

    def __init__(self, broker: Broker, master: Supervised | None = None) -> None:
        self.broker = broker
        self.master = master
        self.host = host_name(broker.config, short=False)  # as the leader token names it

    def collect(self) -> Iterator[Metric]:
        reading = read_server(self.broker)
        yield from server_families(reading)
        if self.master is not None:
            yield from master_families(self.master, reading.leader, self.host)
            if self.master.totals is not None:
                yield from tally_families(self.master.totals.snapshot())


def scrape_broker(config: Config, url: str) -> Broker:
    """A client of its own for the scrapes, that gives up on the server within
    SCRAPE_TIMEOUT."""
    keys = Keys(config.namespace())
    client = connect(url, socket_timeout=SCRAPE_TIMEOUT, socket_connect_timeout=SCRAPE_TIMEOUT,
                     route=keys.route)
    return Broker(client, keys, config)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every 15 s is no news


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """A thread per scrape; keeps its open connections, which a forked child closes."""

    daemon_threads = True

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.connections: set[socket.socket] = set()
        super().__init__(*args, **kw)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.connections.discard(request)
        super().shutdown_request(request)


#: The metrics servers of this process (one, in a master).
_SERVERS: weakref.WeakSet[_MetricsServer] = weakref.WeakSet()


def _close_in_child() -> None:
    """After a fork: the listening socket and the scrapes being answered are the parent's.
    A worker that kept them would hold the port, and the scrapers' connections, open for as
    long as it lives."""
    for server in list(_SERVERS):
        for sock in [server.socket, *server.connections]:
            try:
                os.close(sock.detach())  # detached: the copy in the child never closes it again
            except OSError:
                pass


os.register_at_fork(after_in_child=_close_in_child)


class Served:
    """The HTTP server of the metrics, serving from threads of its own."""

    def __init__(self, server: _MetricsServer) -> None:
        self._server = server
        self.port = int(server.server_address[1])
        threading.Thread(target=server.serve_forever, name="jobq-metrics", daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve(collector: Collector, host: str, port: int) -> Served:
    """Serve ``collector`` (and the process's own metrics) at ``http://host:port/metrics``;
    :class:`MetricsError` in one line when it cannot listen there."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server_class = cast(type[_MetricsServer], type(
            "MetricsServer", (_MetricsServer,), {"address_family": family}))
        server = make_server(host, port, make_wsgi_app(registry), server_class, _Quiet)
    except OSError as exc:
        raise MetricsError(f"metrics: cannot listen on {host}:{port}: "
                           f"{exc.strerror or exc}") from None
    _SERVERS.add(server)
    return Served(server)


def serve_master(master: Supervised, config: Config, url: str) -> Served:
    """A master's ``/metrics``, on ``metrics_host:metrics_port``."""
    return serve(JobqCollector(scrape_broker(config, url), master), config.metrics_host,
                 config.metrics_port)


def metric_names() -> set[str]:
    """Every sample name jobq exports (``_total``, ``_bucket``, ``_sum``, ``_count``
    included), process_* aside: for checking dashboards and alert rules."""

    class Nothing:
        target: int = 0
        scheduler_pid: int = 0
        seen_now: list[Any] = []
        restarts: dict[str, int] = {}
        reloads: dict[str, int] = {}
        totals: Totals | None = None

    families = [*server_families(ServerReading(0.0, {}, {}, None)),
                *master_families(Nothing(), None, ""), *tally_families({})]
    names: set[str] = set()
    for f in families:
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(
            f.type, ("",))
        names.update(f.name + s for s in suffixes)
    return names
