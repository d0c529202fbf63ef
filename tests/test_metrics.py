"""Prometheus metrics (``jobq[metrics]``): the workers' tallies and the restart causes with no
server; a real master scraped during a real run, its counters checked against the queue's
own; ``jobq metrics``; the errors; the sample dashboard and alert rules in ``etc/``."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import jobq_testtasks as tasks
import psutil
import pytest
import redis
import yaml
from conftest import ROOT, free_port, stop_server, subprocess_env, wait_until
from prometheus_client.parser import text_string_to_metric_families
from test_master import finish, start_master, started, wait_status, wait_workers

from jobq.job import JobStatus
from jobq.master import policy
from jobq.master.policy import WorkerState
from jobq.metrics import MISSING, exporter
from jobq.metrics.tally import (
    DUR0,
    INVALID_TASK,
    MAX_TASKS,
    OTHER_TASK,
    TallyTable,
    Totals,
)
from jobq.queue import JobQueue
from jobq.server import EmbeddedServer

Spawn = Callable[..., subprocess.Popen[str]]
#: (sample name, its labels) -> value
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` that carry ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def names(samples: Samples) -> set[str]:
    return {n for n, _ in samples}


# -- the tallies and the causes, without a server ----------------------------------------------

def test_a_workers_counts_are_seen_once_published_and_kept_when_it_exits() -> None:
    table = TallyTable(2)
    totals = Totals(table)
    tally = table.writer(1)
    tally.record("default", "app:f", "completed", 0.003, 0.02)
    tally.record("default", "app:f", "retry", 2.0, None)
    tally.record("default~/srv/x.py", "app:f", "failed", 0.5, None)  # a route: its queue
    assert totals.snapshot() == {}  # not published: their acks are not through yet

    tally.publish()
    [(key, numbers)] = totals.snapshot().items()
    assert key == ("default", "app:f")
    assert numbers[:4] == [1, 1, 1, 0]  # completed, failed, retried, cancelled
    assert sum(numbers[DUR0:DUR0 + 17]) == 3

    totals.worker_gone(1)  # folded, and the slot emptied for its next worker
    assert table.read(1) == {}
    table.writer(1).publish()
    nxt = table.writer(1)
    nxt.record("default", "app:f", "cancelled", 0.1, None)
    nxt.publish()
    assert totals.snapshot()[("default", "app:f")][:4] == [1, 1, 1, 1]


def test_a_worker_tallies_at_most_max_tasks_and_counts_the_rest_as_other() -> None:
    table = TallyTable(1)
    tally = table.writer(0)
    for i in range(MAX_TASKS + 20):
        tally.record("default", f"app:t{i}", "completed", 0.01, None)
    tally.publish()
    seen = table.read(0)
    assert len(seen) == MAX_TASKS
    assert seen[("default", OTHER_TASK)][0] == 21
    assert sum(n[0] for n in seen.values()) == MAX_TASKS + 20


def test_restart_causes() -> None:
    def exited(status: int, **state: object) -> str | None:
        return policy.restart_cause(WorkerState(slot=0, pid=1, name="w", born=0.0,
                                                **state), status)  # type: ignore[arg-type]

    assert exited(signal.SIGKILL) == "killed"  # a waitpid status: killed by signal 9
    assert exited(0) == "max_jobs"  # exited 0 unasked: recycled itself
    assert exited(1 << 8) == "crashed"
    assert exited(signal.SIGKILL, ending="hard_timeout") == "hard_timeout"
    assert exited(0, ending="reload") == "reload"
    assert exited(0, ending="scaled_down") is None
    assert exited(signal.SIGKILL, ending="stopping") is None
    assert set(policy.ENDINGS) - set(policy.NOT_RESTARTS) <= set(policy.RESTART_CAUSES)


def test_the_leader_token_names_host_and_scheduler_pid() -> None:
    assert exporter.leads("web.example.org.4242.a1b2c3", "web.example.org", 4242)
    assert not exporter.leads("web.example.org.4242.a1b2c3", "web", 4242)
    assert not exporter.leads("web.4243.a1b2c3", "web", 4242)
    assert not exporter.leads(None, "web", 4242)


# -- a real master ------------------------------------------------------------------------------

def test_a_scrape_during_a_run_agrees_with_the_queues_counters(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    port = free_port()
    master = start_master(spawn, tmp_path, "--metrics-port", str(port))
    wait_workers(master, 2)
    listening = [c.laddr for c in psutil.Process(master.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening == [("127.0.0.1", port)]
    for child in psutil.Process(master.pid).children():  # workers, scheduler: never the port
        assert child.net_connections(kind="inet") == [], child.cmdline()
    k = key = os.urandom(4).hex()
    hanging = queue.enqueue(tasks.sleep_until_cancelled, k, 30)
    queue.enqueue_many(tasks.noop, [()] * 200)
    queue.enqueue_many(tasks.add, [(i, i) for i in range(10)])
    for _ in range(3):
        queue.enqueue(tasks.boom, max_retries=0)
    retried = [queue.enqueue(tasks.fail_times, f"{key}{i}", 1) for i in range(2)]
    bad = queue.enqueue("os:system", "true", max_retries=0)  # a task no worker may run
    during = scrape(port)  # while it runs
    started(r, k)
    queue.cancel(hanging.id)
    for job in [*retried, hanging, bad]:
        wait_status(queue, job.id, JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)
    wait_until(lambda: queue.get_stats()["pending"] == 0 and not queue.get_stats()[
        "processing"], message="the queue to drain")

    def agrees() -> Samples | None:
        s, stats = scrape(port), queue.get_stats()
        ok = all(total(s, f"jobq_jobs_{what}_total", queue="default") == stats[what] ==
                 total(s, f"jobq_queue_{what}_total", queue="default")
                 for what in ("completed", "failed", "retried", "cancelled"))
        return s if ok and total(s, "jobq_scheduler_leading") == 1 else None

    after = wait_until(agrees, 10, interval=0.1, message="the metrics to agree with get_stats")
    stats = queue.get_stats()
    assert (stats["completed"], stats["failed"], stats["retried"], stats["cancelled"]) == (
        212, 4, 2, 1)
    for sample, value in during.items():  # counters only go up
        if sample[0].endswith(("_total", "_count", "_bucket")):
            assert after.get(sample, 0) >= value, sample
    noop = {"queue": "default", "task": "jobq_testtasks:noop"}
    assert total(after, "jobq_jobs_completed_total", **noop) == 200
    assert total(after, "jobq_job_duration_seconds_count", **noop) == 200
    assert total(after, "jobq_job_duration_seconds_bucket", le="+Inf", **noop) == 200
    assert total(after, "jobq_job_wait_seconds_count", **noop) == 200
    assert total(after, "jobq_jobs_failed_total", task="jobq_testtasks:boom") == 3
    assert total(after, "jobq_jobs_failed_total", task=INVALID_TASK) == 1  # not "os:system"
    assert total(after, "jobq_jobs_retried_total", task="jobq_testtasks:fail_times") == 2
    assert total(after, "jobq_jobs_cancelled_total",
                 task="jobq_testtasks:sleep_until_cancelled") == 1
    # attempts that ran: every outcome counted once in the duration histogram
    assert total(after, "jobq_job_duration_seconds_count") == 212 + 4 + 2 + 1
    for gauge, counter in (("pending", "pending"), ("running", "processing"),
                           ("scheduled", "scheduled"), ("deferred", "deferred")):
        assert total(after, f"jobq_queue_{gauge}_jobs", queue="default") == stats[counter]
    assert total(after, "jobq_queue_dead_letter_jobs", queue="default") == 4
    assert total(after, "jobq_server_up") == 1 and total(after, "jobq_server_rtt_seconds") > 0
    assert total(after, "jobq_scheduler_leader") == 1
    assert total(after, "jobq_workers") == 2 == total(after, "jobq_workers_target")
    assert not {"job_id", "id", "args"} & {label for _, ls in after for label, _ in ls}

    # a worker killed -9: a restart of cause "killed", and its counts stay
    victim = wait_workers(master, 2)[0]
    os.kill(victim, signal.SIGKILL)
    wait_workers(master, 2, without={victim})
    gone = wait_until(lambda: (s := scrape(port)) and total(
        s, "jobq_worker_restarts_total", cause="killed") == 1 and s, message="a restart")
    assert total(gone, "jobq_worker_restarts_total") == 1
    assert total(gone, "jobq_jobs_completed_total") == 212
    wait_until(lambda: total(scrape(port), "jobq_worker_memory_bytes") > 0, 5,
               message="the workers' memory")

    # a reload: applied, both workers replaced, still no count lost; new workers count
    master.send_signal(signal.SIGHUP)
    wait_until(lambda: total(scrape(port), "jobq_worker_restarts_total", cause="reload") == 2,
               message="the reload's restarts")
    queue.enqueue_many(tasks.noop, [()] * 10)
    s = wait_until(lambda: (s := scrape(port)) and total(
        s, "jobq_jobs_completed_total", **noop) == 210 and s, message="new workers' counts")
    assert total(s, "jobq_reloads_total", result="applied") == 1
    assert total(s, "jobq_reloads_total", result="refused") == 0
    master.terminate()
    assert finish(master)[0] == 0


def test_a_dead_server_shows_in_the_metrics_and_stalls_no_supervision(
        spawn: Spawn, tmp_path: Path, server: EmbeddedServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBQ_REDIS_URL", server.url)  # a server of this test's own
    port = free_port()
    master = start_master(spawn, tmp_path, "--metrics-port", str(port), workers=1)
    [victim] = wait_workers(master, 1)
    assert total(scrape(port), "jobq_server_up") == 1

    stop_server(server)
    t0 = time.monotonic()
    down = scrape(port)
    assert time.monotonic() - t0 < exporter.SCRAPE_TIMEOUT + 1
    assert total(down, "jobq_server_up") == 0
    assert not [n for n, _ in down if n.startswith("jobq_queue_")]  # unknown: not shown as 0
    os.kill(victim, signal.SIGKILL)  # the master goes on supervising meanwhile
    wait_workers(master, 1, without={victim})
    assert total(scrape(port), "jobq_worker_restarts_total", cause="killed") == 1


def test_jobq_metrics_serves_the_queues_of_a_server_with_no_master(
        redis_url: str, spawn: Spawn) -> None:
    q = JobQueue("mq", redis_url=redis_url)
    q.enqueue_many(tasks.noop, [()] * 5)
    q.enqueue(tasks.noop, delay=600)
    port = free_port()
    proc = spawn("metrics", "--port", str(port))
    s = wait_until(lambda: _try_scrape(port), 10, interval=0.05, message="jobq metrics")
    assert total(s, "jobq_queue_pending_jobs", queue="mq") == 5
    assert total(s, "jobq_queue_scheduled_jobs", queue="mq") == 1
    assert total(s, "jobq_queue_enqueued_total", queue="mq") == 6
    assert total(s, "jobq_queue_dead_letter_jobs", queue="mq") == 0
    assert total(s, "jobq_server_up") == 1 and total(s, "jobq_scheduler_leader") == 0
    assert not {n for n in names(s) if n.startswith(("jobq_jobs_", "jobq_worker"))}
    proc.terminate()
    assert finish(proc)[0] == 0


def _try_scrape(port: int) -> Samples | None:
    try:
        return scrape(port)
    except OSError:
        return None


def test_metrics_are_off_by_default_and_prometheus_client_is_not_imported(
        spawn: Spawn, tmp_path: Path) -> None:
    master = start_master(spawn, tmp_path, workers=1)
    wait_workers(master, 1)
    assert psutil.Process(master.pid).net_connections(kind="inet") == []
    code = ("import sys, jobq, jobq.cli, jobq.cli.master, jobq.master.arbiter, "
            "jobq.worker_loop, jobq.metrics; assert 'prometheus_client' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], env=subprocess_env(), check=True, timeout=30)


def test_a_metrics_port_that_cannot_be_had_stops_in_one_line_with_exit_2(
        spawn: Spawn, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for proc in (start_master(spawn, tmp_path, "--metrics-port", str(port)),
                     spawn("metrics", "--port", str(port))):
            code, err = finish(proc)
            assert code == 2, err
            [line] = err.splitlines()
            assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in line
    code, err = finish(start_master(spawn, tmp_path, "--metrics-port", "70000"))
    assert code == 2 and "metrics_port: expected a TCP port (1-65535)" in err
    assert len(err.splitlines()) == 1
    code, err = finish(spawn("metrics"))
    assert code == 2 and "--port" in err


def test_metrics_without_the_extra_say_what_to_install(spawn: Spawn, tmp_path: Path) -> None:
    env = subprocess_env(JOBQ_CONFIG=str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")
    code = ("import sys; sys.modules['prometheus_client'] = None  # as if not installed\n"
            "from jobq.cli.master import main; main()")
    done = subprocess.run([sys.executable, "-c", code, "-I", "jobq_testtasks", "-w", "1",
                           "--metrics-port", str(free_port())], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"jobq-master: error: {MISSING}"


# -- etc/: the sample dashboard and alert rules ---------------------------------------------------

METRIC = re.compile(r"\bjobq_[a-z0-9_]+")


def test_the_dashboard_and_alert_rules_use_only_metrics_jobq_exports() -> None:
    exported = exporter.metric_names()
    dashboard = json.loads((ROOT / "etc" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    rules = yaml.safe_load((ROOT / "etc" / "prometheus-alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    exprs += [rule["expr"] for rule in alerts]
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    assert used and used <= exported, used - exported
    assert {"JobqQueueBackingUp", "JobqDeadLetterGrowing", "JobqWorkersCrashLooping",
            "JobqNoSchedulerLeader"} <= {rule["alert"] for rule in alerts}
