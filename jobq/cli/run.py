"""The commands that run something in the foreground: ``jobq worker``, ``jobq server ...``
and ``jobq demo``."""

from __future__ import annotations

import json
import os
import sys

import click

from .. import exitcodes
from .. import log as jobq_log
from ..exceptions import TaskImportError
from ..registry import TaskResolver
from ..server import EmbeddedServer, ServerError
from ..worker_loop import Worker
from .app import CliError, State, config_option, jobq_command, main, run_guarded


# -- jobq worker --------------------------------------------------------------------------------
@jobq_command(main)
@config_option("queues")
@config_option("imports")
@click.option("--burst", is_flag=True, help="Exit 0 once the queues are empty.")
def worker(state: State, queues: list[str] | None, imports: tuple[str, ...], burst: bool) -> int:
    """Run one worker in the foreground (jobq-master runs a supervised pool of them)."""
    cfg = state.config(queues=queues)
    jobq_log.setup(cfg.log_level, cfg.log_format, cfg.log_file)
    all_imports = list(dict.fromkeys([*cfg.imports, *imports]))
    sys.path.insert(0, os.getcwd())
    try:
        resolver = TaskResolver(all_imports)
    except TaskImportError as exc:
        raise CliError(str(exc), exitcodes.IMPORT) from exc
    # a burst worker gives up on a server that does not answer; a long-running one waits for
    # it (saying so); neither waits on a wrong password or an address that is no server
    url = state.url(wait=burst)
    return Worker(cfg.queues, config=cfg, url=url, resolver=resolver, burst=burst).run()


# -- jobq server --------------------------------------------------------------------------------
@main.group()
def server() -> None:
    """The embedded Valkey server (used when no Redis URL is configured)."""


@server.command("status")
@click.option("--json", "as_json", is_flag=True)
def server_status(as_json: bool) -> None:
    """Is the embedded server running, where, with which pid."""
    srv = EmbeddedServer()
    running = srv.is_running()
    info = {"running": running, "url": srv.url, "pid": srv.pid() if running else None,
            "home": str(srv.home)}
    if as_json:
        click.echo(json.dumps(info))
    else:
        click.echo(f"{'running' if running else 'stopped'}  {srv.url}"
                   + (f"  pid {info['pid']}" if running else "") + f"  home {srv.home}")
    sys.exit(0 if running else 1)


def _embedded(state: State) -> EmbeddedServer:
    """The embedded server of ``$JOBQ_HOME``, set up as the config says
    (``server_socket_group``); a bad config is one line, exit 2."""
    config = run_guarded(state.config, state)
    return EmbeddedServer(socket_group=config.server_socket_group)


@server.command("start")
@click.pass_obj
def server_start(state: State) -> None:
    """Start the embedded server (detached); nothing happens if it runs."""
    srv = _embedded(state)
    try:
        url = srv.start()
    except ServerError as exc:
        raise CliError(str(exc), exitcodes.SERVER) from exc
    click.echo(url)


@server.command("run")
@click.pass_obj
def server_run(state: State) -> None:
    """Run the embedded server in the foreground, for a service manager (it becomes this
    process: logs to standard output, TERM stops it cleanly)."""
    srv = _embedded(state)
    try:
        srv.run()
    except ServerError as exc:
        raise CliError(str(exc), exitcodes.SERVER) from exc


@server.command("stop")
def server_stop() -> None:
    """Stop the embedded server (its AOF keeps the queued jobs for the next start)."""
    try:
        EmbeddedServer().stop()
    except ServerError as exc:
        raise CliError(str(exc), exitcodes.SERVER) from exc
    click.echo("stopped")


# -- jobq demo ----------------------------------------------------------------------------------
@jobq_command(main)
@click.option("--jobs", default=40, show_default=True, help="How many jobs the batch has.")
@click.option("--workers", default=2, show_default=True)
def demo(state: State, jobs: int, workers: int) -> int:
    """Run jobq's main job: a CPU-heavy batch with a few failing jobs, then a report."""
    from ..demo import run_demo  # its tasks register (and become runnable) only when it runs

    return run_demo(state.config(), state.url(), jobs, workers)
