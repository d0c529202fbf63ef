"""``jobq bench``: jobq's figures on this machine (see :mod:`jobq.bench`)."""

from __future__ import annotations

import json

import click
from tabulate import tabulate

from .. import exitcodes
from .app import State, jobq_command, main

#: The figure shown for each scenario in the table, and the target it is held to.
HEADLINE = {
    "noop": ("jobs_per_s", ">= 20000"),
    "incr": ("jobs_per_s", ">= 5000"),
    "cpu": ("efficiency", ">= 0.98"),
    "latency": ("p50_ms", "<= 1.0 (p99 <= 3.0)"),
    "enqueue": ("single_per_s", ">= 8000 (bulk >= 50000)"),
    "memory": ("bytes_per_job", "<= 200"),
    "backlog": ("ratio", ">= 0.9"),
    "tail": ("efficiency", ">= 0.95"),
}


@jobq_command(main)
@click.option("-w", "--workers", type=int, default=2, show_default=True)
@click.option("-s", "--scenario", "scenarios", multiple=True,
              type=click.Choice(list(HEADLINE)), help="Repeatable; all by default.")
@click.option("--repeat", type=int, default=3, show_default=True,
              help="Runs per scenario; figures are medians.")
@click.option("--scale", type=float, default=1.0, show_default=True,
              help="Scale job counts and sizes (0.01 for a quick check).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per scenario.")
def bench(state: State, workers: int, scenarios: tuple[str, ...], repeat: int, scale: float,
          as_json: bool) -> int:
    """Measure throughput, latency, fairness and memory against a real jobq-master."""
    from ..bench import run

    if workers < 1 or repeat < 1 or scale <= 0:
        raise click.UsageError("--workers and --repeat must be >= 1, --scale > 0")
    names = list(scenarios) or list(HEADLINE)
    results = run(state.url(), workers, names, repeat, scale,
                  log=lambda s: click.echo(s, err=True) if not as_json else None)
    if as_json:
        for r in results:
            click.echo(json.dumps(r))
        return exitcodes.OK
    rows = []
    for r in results:
        key, target = HEADLINE[r["scenario"]]
        details = ", ".join(f"{k}={v}" for k, v in r.items()
                            if k not in ("scenario", key, "workers", "repeat"))
        rows.append((r["scenario"], f"{key}={r[key]}", target, details))
    click.echo(tabulate(rows, headers=("scenario", "figure", "target", "details")))
    click.echo(f"\n{workers} workers, medians of {repeat} runs")
    return exitcodes.OK
