"""``jobq limit``: define, delete and list the limits tasks share (see :mod:`jobq.limits`)."""

from __future__ import annotations

import json

import click
from tabulate import tabulate

from .. import exitcodes
from .app import CliError, State, jobq_command, main


@main.group("limit")
def limit_group() -> None:
    """Limits that tasks share: at most N running at once, at most N starts per s/m/h."""


@jobq_command(limit_group, "set")
@click.argument("name")
@click.option("--concurrency", type=int, default=None, metavar="N",
              help="At most N of its jobs running at once, across all hosts.")
@click.option("--rate", default=None, metavar="N/UNIT",
              help="At most N starts per second, minute or hour: 10/s, 100/m, 5/h.")
@click.option("--burst", type=int, default=None, metavar="N",
              help="Starts allowed back to back after a quiet time (default 1).")
def limit_set(state: State, name: str, concurrency: int | None, rate: str | None,
              burst: int | None) -> int:
    """Define (or redefine) limit NAME; tasks name it with @task(limits=[NAME]). A master
    writes the config's [limits.NAME] again when it starts or reloads."""
    limit = state.queue().set_limit(name, concurrency=concurrency, rate=rate, burst=burst)
    click.echo(f"limit {name}: {limit.describe()}")
    return exitcodes.OK


@jobq_command(limit_group, "delete")
@click.argument("name")
def limit_delete(state: State, name: str) -> int:
    """Forget limit NAME: the jobs it held back run as if it did not exist."""
    if not state.queue().delete_limit(name):
        raise CliError(f"unknown limit {name!r}", exitcodes.NOT_FOUND)
    click.echo(f"deleted limit {name}")
    return exitcodes.OK


@jobq_command(limit_group, "list")
@click.option("--json", "as_json", is_flag=True)
def limit_list(state: State, as_json: bool) -> int:
    """Every limit: its definition, its jobs running now, the starts its rate allows now,
    and the queues where it holds jobs back."""
    use = state.queue().limit_use()
    if as_json:
        click.echo(json.dumps(use, indent=2))
        return exitcodes.OK
    rows = [(name, "-" if u["concurrency"] is None else u["concurrency"],
             "-" if u["rate"] is None else u["rate"] + (f" burst {u['burst']}"
                                                         if u["burst"] > 1 else ""),
             u["running"], "-" if u["tokens"] is None else u["tokens"],
             ",".join(u["waiting"]) or "-") if u["defined"] else
            (name, "(deleted)", "", u["running"], "-", ",".join(u["waiting"]) or "-")
            for name, u in use.items()]
    click.echo(tabulate(rows, headers=("limit", "concurrency", "rate", "running", "tokens",
                                       "holding back in")) if rows else "no limits")
    return exitcodes.OK
