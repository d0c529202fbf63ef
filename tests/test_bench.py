"""The bench at a tiny size: every scenario runs against a real master and reports every
figure (the figures themselves are not asserted: they are measured, not tested)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from jobq import bench, benchref
from jobq.cli import main
from jobq.connection import connect
from jobq.queue import JobQueue

KEYS = {
    "noop": {"jobs_per_s", "startup_s"},
    "incr": {"jobs_per_s"},
    "cpu": {"jobs_per_s", "pool_jobs_per_s", "efficiency"},
    "latency": {"p50_ms", "p90_ms", "p99_ms", "max_ms"},
    "enqueue": {"single_per_s", "bulk_per_s"},
    "memory": {"bytes_per_job"},
    "backlog": {"ratio"},
    "tail": {"efficiency"},
}


@pytest.mark.timeout(150)
def test_every_scenario_reports_its_figures(redis_url: str) -> None:
    result = CliRunner().invoke(main, ["--redis-url", redis_url, "bench", "--scale", "0.01",
                                       "--repeat", "1", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["scenario"] for r in lines] == list(bench.SCENARIOS)
    for r in lines:
        missing = KEYS[r["scenario"]] - set(r)
        assert not missing, f"{r['scenario']} lacks {missing}"
        for key in KEYS[r["scenario"]]:
            assert isinstance(r[key], int | float) and r[key] >= 0


def test_bench_leaves_nothing_behind(redis_url: str) -> None:
    client = connect(redis_url)
    client.set("user:data", "kept")
    result = CliRunner().invoke(main, ["--redis-url", redis_url, "bench", "-s", "enqueue",
                                       "-s", "memory", "--scale", "0.01", "--repeat", "1"])
    assert result.exit_code == 0, result.output
    assert "single_per_s" in result.stdout and "bytes_per_job" in result.stdout
    assert set(client.keys("*")) == {"user:data"}  # only the user's key: the bench cleaned up


def test_the_bare_loop_runs_every_job_once(redis_url: str) -> None:
    client = connect(redis_url)
    queue = JobQueue("bench", redis_url=redis_url)
    got = benchref.bare_loop(redis_url, client, queue.broker.server_cpu, jobs=1234, workers=2,
                             task="incr")
    assert got.jobs_per_s > 0 and got.server_us_per_job > 0
    assert client.zcard(benchref.PENDING) == 0 and client.zcard(benchref.ACTIVE) == 0
    assert client.hlen(benchref.PAYLOADS) == 0  # acknowledged: claimed and acked, no leftovers
    assert int(client.get(benchref.COUNTER) or 0) == 1234  # each job's task ran once
    with pytest.raises(ValueError, match="task must be one of"):
        benchref.bare_loop(redis_url, client, queue.broker.server_cpu, jobs=10, workers=1,
                           task="sleep")


def test_round_trips_are_counted(redis_url: str) -> None:
    assert benchref.round_trips(redis_url, 200) > 0
