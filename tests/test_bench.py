"""The bench at a tiny size: every scenario runs against a real master and reports every
figure, each reference beside its figure, and their ratio (the figures themselves are not
asserted: they are measured, not tested)."""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import kill_processes, process_tree, title, wait_dead, wait_until

from jobq import bench, benchref
from jobq.cli import main
from jobq.cli.bench import HEADLINE
from jobq.connection import connect
from jobq.queue import JobQueue

#: What the bare loop and the jobq scenario measured beside it report.
VERSUS_BARE = {"jobs_per_s", "server_us_per_job", "bare_jobs_per_s", "bare_server_us_per_job",
               "jobs_per_s_ratio", "server_us_per_job_ratio", "ackeach_jobs_per_s",
               "ackeach_server_us_per_job", "jobs_per_s_vs_ackeach",
               "server_us_per_job_vs_ackeach", "floor_jobs_per_s", "floor_server_us_per_job",
               "jobs_per_s_vs_floor", "server_us_per_job_vs_floor"}
KEYS = {
    "noop": VERSUS_BARE | {"startup_s"},
    "noop_ttl0": VERSUS_BARE | {"startup_s"},
    "incr": VERSUS_BARE,
    "cpu": {"jobs_per_s", "pool_jobs_per_s", "efficiency", "server_us_per_job",
            "bare_jobs_per_s", "bare_efficiency", "jobs_per_s_ratio"},
    "latency": {f"{side}{q}_ms" for side in ("", "bare_", "floor_")
                for q in ("p50", "p90", "p99", "max")}
    | {"first_ms", "rtt_ms", "p50_ms_ratio", "p99_ms_ratio", "p50_ms_vs_floor",
       "p99_ms_vs_floor"},
    "delayed": {f"{phase}_{q}_ms" for phase in ("idle", "busy")
                for q in ("p50", "p90", "p99", "max")},
    "enqueue": {"single_per_s", "bulk_per_s", "rtt_per_s", "single_per_s_ratio",
                "single_server_us_per_job", "bulk_server_us_per_job"},
    "memory": {"bytes_per_job"},
    "backlog": {"ratio", "server_us_per_job"},
    "tail": {"efficiency"},
    "limited": {"jobs_per_s", "unlimited_jobs_per_s", "ratio", "server_us_per_job",
                "unlimited_server_us_per_job"},
    "metrics": {"metrics_jobs_per_s", "plain_jobs_per_s", "metrics_jobs_per_s_ratio",
                "metrics_server_us_per_job", "plain_server_us_per_job", "scrape_ms"},
}
#: Figures that cannot be 0 whatever the machine: a reference, the server's CPU for work.
POSITIVE = {"bare_jobs_per_s", "bare_server_us_per_job", "ackeach_jobs_per_s",
            "ackeach_server_us_per_job", "floor_jobs_per_s", "floor_server_us_per_job",
            "server_us_per_job", "rtt_ms", "bare_p50_ms", "rtt_per_s", "single_server_us_per_job",
            "bulk_server_us_per_job"}


@pytest.mark.timeout(150)
def test_every_scenario_reports_its_figures(redis_url: str) -> None:
    result = CliRunner().invoke(main, ["--redis-url", redis_url, "bench", "--scale", "0.01",
                                       "--repeat", "1", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["scenario"] for r in lines] == list(bench.SCENARIOS) == list(HEADLINE)
    for r in lines:
        name = r["scenario"]
        missing = KEYS[name] - set(r)
        assert not missing, f"{name} lacks {missing}"
        for key in KEYS[name]:
            assert isinstance(r[key], int | float) and math.isfinite(r[key]), (name, key)
            if name != "delayed":  # a job may start a hair before its due time
                assert r[key] >= 0, (name, key)
            if key in POSITIVE:
                assert r[key] > 0, (name, key)
        for key, _ in HEADLINE[name]:
            assert key in r, (name, key)
        _assert_ratios(r)
    # percentiles of the jobs observed: never beyond the slowest (one run: no medians)
    latency = next(r for r in lines if r["scenario"] == "latency")
    assert latency["first_ms"] <= latency["max_ms"]  # the first job is one of those observed
    delayed = next(r for r in lines if r["scenario"] == "delayed")
    for r, prefix in ((latency, ""), (latency, "bare_"), (latency, "floor_"), (delayed, "idle_"),
                      (delayed, "busy_")):
        p50, p90, p99, most = (r[f"{prefix}{q}_ms"] for q in ("p50", "p90", "p99", "max"))
        assert p50 <= p90 <= p99 <= most, prefix


def _assert_ratios(r: dict[str, Any]) -> None:
    """Each ratio is its figure over its reference, both as reported (rounded to 3 places)."""
    ratios = [k for k in r if k.endswith("_ratio")]
    for key in ratios:
        figure = key.removesuffix("_ratio")
        reference = r[bench.REFERENCES[figure]]
        assert r[key] == pytest.approx(r[figure] / reference, abs=0.0006), (r["scenario"], key)
    expected = {f"{f}_ratio" for f in bench.REFERENCES if f in KEYS[r["scenario"]]
                and bench.REFERENCES[f] in KEYS[r["scenario"]]}
    assert set(ratios) == expected, r["scenario"]


def test_the_table_shows_figures_beside_their_references(redis_url: str) -> None:
    client = connect(redis_url)
    client.set("user:data", "kept")
    result = CliRunner().invoke(main, ["--redis-url", redis_url, "bench", "-s", "incr",
                                       "-s", "enqueue", "-s", "memory", "--scale", "0.01",
                                       "--repeat", "1"])
    assert result.exit_code == 0, result.output
    assert "single_per_s" in result.stdout and "bytes_per_job" in result.stdout
    incr = next(line for line in result.stdout.splitlines() if line.startswith("incr"))
    assert "jobs_per_s=" in incr and " of bare " in incr and ">= 0.85 of bare" in incr
    assert "server_us_per_job=" in incr
    assert " round trips/s)" in result.stdout
    assert set(client.keys("*")) == {"user:data"}  # only the user's key: the bench cleaned up


@pytest.mark.parametrize("acks", benchref.ACKS)
def test_the_bare_loop_runs_every_job_once(redis_url: str, acks: str) -> None:
    client = connect(redis_url)
    queue = JobQueue("bench", redis_url=redis_url)
    client.delete(*benchref.KEYS)
    calls = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    got = benchref.bare_loop(redis_url, client, queue.broker.server_cpu, jobs=1234, workers=2,
                             task="incr", acks=acks)
    assert got.jobs_per_s > 0 and got.server_us_per_job > 0
    assert client.zcard(benchref.PENDING) == 0 and client.zcard(benchref.ACTIVE) == 0
    assert client.hlen(benchref.PAYLOADS) == 0  # acknowledged: claimed and acked, no leftovers
    assert int(client.get(benchref.COUNTER) or 0) == 1234  # each job's task ran once
    scripts = client.info("commandstats")["cmdstat_evalsha"]["calls"] - calls
    # claims of 50, then an ack per job, or an ack per batch (with the next claim)
    assert scripts > 1234 if acks == "each" else scripts < 1234 // 10
    with pytest.raises(ValueError, match="task must be one of"):
        benchref.bare_loop(redis_url, client, queue.broker.server_cpu, jobs=10, workers=1,
                           task="sleep")


def test_the_bare_loop_takes_one_job_at_a_time_with_batch_1(redis_url: str) -> None:
    """The CPU scenario's reference: one claim per job (with the last one's ack), as jobq's
    workers do with long jobs, running the same work as jobq.bench's cpu task."""
    client = connect(redis_url)
    queue = JobQueue("bench", redis_url=redis_url)
    client.delete(*benchref.KEYS)
    calls = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    got = benchref.bare_loop(redis_url, client, queue.broker.server_cpu, jobs=40, workers=2,
                             task="cpu", batch=1, size=1000)
    assert got.jobs_per_s > 0
    assert client.zcard(benchref.PENDING) == 0 and client.hlen(benchref.PAYLOADS) == 0
    scripts = client.info("commandstats")["cmdstat_evalsha"]["calls"] - calls
    # a claim per job, an ack with each claim but the first, and one empty claim each
    assert scripts >= 2 * 40
    with pytest.raises(ValueError, match="batch must be 1 or more"):
        benchref.bare_loop(redis_url, client, queue.broker.server_cpu, jobs=10, workers=1,
                           task="cpu", batch=0)


@pytest.mark.parametrize("keep", [True, False])
def test_the_least_real_queue_runs_every_task_and_keeps_every_result(redis_url: str,
                                                                     keep: bool) -> None:
    client = connect(redis_url)
    queue = JobQueue("bench", redis_url=redis_url)
    client.delete(*benchref.KEYS)
    got = benchref.bare_loop(redis_url, client, queue.broker.server_cpu, jobs=1234, workers=2,
                             task="incr", real=True, keep=keep)
    assert got.jobs_per_s > 0 and got.server_us_per_job > 0
    assert client.zcard(benchref.PENDING) == 0 and client.zcard(benchref.ACTIVE) == 0
    assert client.hlen(benchref.PAYLOADS) == 0
    assert int(client.get(benchref.COUNTER) or 0) == 1234  # each task called once, by name
    results = list(client.scan_iter(match=benchref.RESULTS + "*", count=10_000))
    if keep:  # what each INCR returned, as JSON, for RESULT_TTL: 1 to 1234, once each
        assert sorted(int(v) for v in client.mget(results)) == list(range(1, 1235))
        assert 0 < client.ttl(results[0]) <= benchref.RESULT_TTL
        benchref.clear(client)
        assert not list(client.scan_iter(match=benchref.RESULTS + "*"))
    else:
        assert results == []
    client.delete(*benchref.KEYS)
    with pytest.raises(ValueError, match="acknowledges in batches"):
        benchref.bare_loop(redis_url, client, queue.broker.server_cpu, jobs=10, workers=1,
                           task="empty", acks="each", real=True)


def test_the_bare_handoff_times_every_push(redis_url: str) -> None:
    client = connect(redis_url)
    client.set("user:data", "kept")
    delays = benchref.handoff(redis_url, client, workers=2, count=30, spacing=0.002)
    assert len(delays) == 30 and all(d > 0 for d in delays)
    assert set(client.keys("*")) == {"user:data"}  # its lists are gone


def test_the_least_at_least_once_handoff_records_hands_and_acknowledges_every_job(
        redis_url: str) -> None:
    client = connect(redis_url)
    client.set("user:data", "kept")
    calls = client.info("commandstats").get("cmdstat_hsetnx", {}).get("calls", 0)
    delays = benchref.held_handoff(redis_url, client, workers=2, count=30, spacing=0.002)
    assert len(delays) == 30 and all(d > 0 for d in delays)
    # each job recorded once; its keys are gone after (acknowledged, then deleted)
    assert client.info("commandstats")["cmdstat_hsetnx"]["calls"] - calls == 30
    assert set(client.keys("*")) == {"user:data"}


def test_round_trips_are_counted(redis_url: str) -> None:
    assert benchref.round_trips(redis_url, 200) > 0


def test_a_scenario_and_its_reference_alternate_over_runs(redis_url: str) -> None:
    """Reference first in even runs, last in odd ones: a drift weighs on both."""
    b = bench.Bench(redis_url, workers=1)
    order: list[str] = []
    for i in (0, 1, 2):
        b.run_index = i
        got = b._interleave(lambda: order.append("ref") or "r",
                            lambda: order.append("jobq") or "j")
        assert got == ("j", "r")
    assert order == ["ref", "jobq", "jobq", "ref", "ref", "jobq"]
    b.close()


def test_the_master_runs_in_the_benchs_session_as_the_references_do(redis_url: str) -> None:
    """A session of its own would be an autogroup of its own for Linux's scheduler, which
    shares the cores between autogroups first: the bare loop and Pool run in the bench's.
    A process group of its own, though: a terminal's Ctrl-C is the bench's to handle."""
    b = bench.Bench(redis_url, workers=1)
    master = b.start_master()
    try:
        b.wait_ready(master)
        assert os.getsid(master.pid) == os.getsid(0)
        assert os.getpgid(master.pid) == master.pid != os.getpgid(0)
    finally:
        b.stop_master(master)
        b.cleanup()
        b.close()


class LateBench(bench.Bench):
    """A bench that looks at the counter only once its workers ran the whole first backlog:
    what a bench descheduled for a few milliseconds sees (it hung a CI run)."""

    def drain(self, n: int, before: int = 0, *args: Any, **kwargs: Any) -> bench.Drained:
        if before == 0:  # the warm-up
            n = self.broker.counter("bench", "enqueued")
        return super().drain(n, before, *args, **kwargs)


@pytest.mark.timeout(60)
def test_a_late_bench_still_measures_the_small_backlog_kept_topped_up(redis_url: str) -> None:
    b = LateBench(redis_url, workers=1)
    try:
        # a backlog larger than the measure, as at --scale 0.01 (1000 jobs, 500 measured)
        rate, server_us = b._rate_with_backlog(100, 50, top_up=True)
        assert rate > 0 and server_us > 0
    finally:
        b.cleanup()
        b.close()


@pytest.mark.timeout(60)
def test_a_late_bench_says_its_large_backlog_ran_out_instead_of_waiting(
        redis_url: str) -> None:
    b = LateBench(redis_url, workers=1)
    try:
        with pytest.raises(RuntimeError, match="100 of the backlog's 100 jobs ran before"):
            b._rate_with_backlog(100, 50, top_up=False)
    finally:
        b.cleanup()
        b.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_a_bench_stopped_by_a_signal_stops_its_master(
        spawn: Callable[..., subprocess.Popen[str]], signum: int) -> None:
    """Its master runs in a process group of its own, which no signal sent to the bench
    reaches: a bench that just died would leave it running, its workers taking the next
    bench's jobs."""
    proc = spawn("bench", "-s", "tail", "--repeat", "1")  # one master for seconds

    def master_with_workers() -> list[Any]:
        tree = [p for p in process_tree(proc.pid)[1:] if "jobq" in title(p)]
        return tree if len(tree) >= 1 + 2 else []  # the master, its workers (and scheduler)

    tree = wait_until(master_with_workers, timeout=30, message="the bench's master's workers")
    try:
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == 128 + signum
        wait_dead(tree)
        assert [p.pid for p in tree if p.is_running() and p.status() != "zombie"] == []
    finally:
        kill_processes(tree)


def test_latencies_are_timed_with_the_benchs_own_heap_frozen(redis_url: str) -> None:
    """A full collection of the bench's heap (the jobs of the scenarios before) took 10-60 ms,
    and one between a job's timestamp and its enqueue counted as its latency."""

    class Watching(bench.Bench):
        frozen: list[int] = []

        def _latencies(self) -> list[float]:
            self.frozen.append(gc.get_freeze_count())
            return super()._latencies()

    b = Watching(redis_url, workers=1, scale=0.01)
    try:
        result = b.latency()
    finally:
        b.cleanup()
        b.close()
    assert result["jobs"] == 50 and Watching.frozen and Watching.frozen[0] > 0
    assert gc.get_freeze_count() == 0  # and thawed after
