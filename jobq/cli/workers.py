"""``jobq workers add|remove|set N``: change a running master's number of workers exactly,
from any host (see :mod:`jobq.control`)."""

from __future__ import annotations

import click

from .. import exitcodes
from ..control import NoMaster, NotApplied, Resize, WhichMaster, pick_master, resize
from .app import CliError, State, jobq_command, main

#: How long the command waits for the master to apply the change, by default (seconds).
DEFAULT_TIMEOUT = 10.0


@main.group()
def workers() -> None:
    """Change a running master's number of workers: exact, unlike TTIN/TTOU (the kernel
    merges a signal sent again before the first was handled)."""


def _workers_command(op: str, help: str) -> click.Command:
    """``jobq workers OP N``: the three commands differ in their op only."""

    @jobq_command(workers, op, help=help)
    @click.argument("n", type=click.IntRange(min=1))
    @click.option("--master", "master_id", default=None, metavar="ID",
                  help="The master (an id `jobq info` shows); needed when several run.")
    @click.option("--timeout", type=click.FloatRange(min=0), default=DEFAULT_TIMEOUT,
                  show_default=True, metavar="SECONDS",
                  help="How long to wait for the master to apply it.")
    def command(state: State, n: int, master_id: str | None, timeout: float) -> int:
        broker = state.queue().broker
        try:
            master = pick_master(broker, master_id)
        except NoMaster as exc:
            raise CliError(str(exc), exitcodes.NOT_FOUND) from None
        except WhichMaster as exc:
            raise CliError(str(exc), exitcodes.USAGE) from None
        try:
            applied = resize(broker, master, Resize(op, n), timeout)
        except NotApplied as exc:
            raise CliError(str(exc), exitcodes.FAILURE) from None
        click.echo(applied.describe())
        return exitcodes.OK

    return command


_workers_command("add", "Start N more workers.")
_workers_command("remove", "Stop N workers (never fewer than one is left).")
_workers_command("set", "Run N workers.")
