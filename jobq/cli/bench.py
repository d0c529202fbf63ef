"""``jobq bench``: jobq's figures on this machine (see :mod:`jobq.bench`)."""

from __future__ import annotations

import json
from typing import Any

import click
from tabulate import tabulate

from .. import exitcodes
from .app import State, jobq_command, main

#: The figures shown for each scenario in the table, each with the target it is held to: a
#: ratio to the figure's reference (measured in the same run) where it has one.
HEADLINE: dict[str, tuple[tuple[str, str], ...]] = {
    "noop": (("jobs_per_s", ">= 0.7 of bare"), ("server_us_per_job", "<= 1.25 of bare")),
    "noop_ttl0": (("jobs_per_s", ">= 0.7 of bare"), ("server_us_per_job", "<= 1.0 of bare")),
    "incr": (("jobs_per_s", ">= 0.85 of bare"),),
    "cpu": (("efficiency", ">= 0.98"),),
    "latency": (("p50_ms", "<= 1.0"), ("p99_ms", "<= 3.0"), ("max_ms", "<= 10")),
    "delayed": (("idle_p50_ms", "<= 5"), ("idle_p99_ms", "<= 15"), ("busy_p50_ms", "<= 5"),
                ("busy_p99_ms", "<= 15")),
    "enqueue": (("single_per_s", ">= 8000"), ("bulk_per_s", ">= 50000")),
    "memory": (("bytes_per_job", "<= 200"),),
    "backlog": (("ratio", ">= 0.9"),),
    "tail": (("efficiency", ">= 0.95"),),
    "limited": (("ratio", ">= 0.8"),),
    "metrics": (("metrics_jobs_per_s", ">= 0.97 of without"),),
}
#: How the table shows a figure's ratio and reference, by the reference's key.
REFERENCE_TEXT = {
    "bare_jobs_per_s": "{ratio} of bare {ref}",
    "bare_server_us_per_job": "{ratio} of bare {ref}",
    "rtt_per_s": "{ratio} of {ref} round trips/s",
    "bare_p50_ms": "{ratio} of bare hand-off {ref}",
    "bare_p99_ms": "{ratio} of bare hand-off {ref}",
    "plain_jobs_per_s": "{ratio} of {ref} without metrics",
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
    """Measure throughput, latency, fairness and memory against a real jobq-master, and
    against bare references measured in the same run."""
    from ..bench import REFERENCES, run

    if workers < 1 or repeat < 1 or scale <= 0:
        raise click.UsageError("--workers and --repeat must be >= 1, --scale > 0")
    if state.config().cluster:  # its references and namespaces live on one server
        raise click.UsageError("jobq bench measures one server: give it one primary's URL "
                               "(redis://host:port), not a cluster's")
    names = list(scenarios) or list(HEADLINE)
    results = run(state.url(), workers, names, repeat, scale,
                  log=lambda s: click.echo(s, err=True) if not as_json else None)
    if as_json:
        for r in results:
            click.echo(json.dumps(r))
        return exitcodes.OK
    rows = []
    for r in results:
        headline = HEADLINE[r["scenario"]]
        # a figure with a reference is shown with it and its ratio, which are not repeated
        referenced = [k for k in REFERENCES if f"{k}_ratio" in r]
        hidden = ({"scenario", "workers", "repeat"} | {k for k, _ in headline}
                  | {f"{k}_ratio" for k in referenced} | {REFERENCES[k] for k in referenced})
        details = [_figure(r, k, REFERENCES) for k in r if k not in hidden]
        for i, (key, target) in enumerate(headline):
            rows.append((r["scenario"] if i == 0 else "", _figure(r, key, REFERENCES), target,
                         ", ".join(details) if i == 0 else ""))
    click.echo(tabulate(rows, headers=("scenario", "figure", "target", "details")))
    click.echo(f"\n{workers} workers, medians of {repeat} runs; a ratio is figure / reference, "
               "both measured in each run (bare: the bare claim/ack loop; for latency, the "
               "bare hand-off, LPUSH to processes in BLPOP)")
    return exitcodes.OK


def _figure(result: dict[str, Any], key: str, references: dict[str, str]) -> str:
    """``key=value``, with its ratio and reference when it has them."""
    text = f"{key}={result[key]}"
    ratio, ref = result.get(f"{key}_ratio"), references.get(key)
    if ratio is None or ref is None or ref not in result:
        return text
    return f"{text} ({REFERENCE_TEXT[ref].format(ratio=ratio, ref=result[ref])})"
