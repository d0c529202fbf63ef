"""The bench at a tiny size: every scenario runs against a real master and reports every
figure (the figures themselves are not asserted: they are measured, not tested)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from jobq import bench
from jobq.cli import main
from jobq.connection import connect

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
