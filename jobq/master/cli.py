"""``jobq-master``: parse options, load the config, run the master."""

from __future__ import annotations

import sys
from typing import Any

import click

from .. import exitcodes
from .. import log as jobq_log
from ..config import ConfigError, load_config
from ..connection import refused_credentials
from ..schedule import ScheduleError
from ..scheduler import config_schedules
from .arbiter import Master, Options


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-w", "--workers", type=int, default=None, help="Worker processes (default: CPUs).")
@click.option("-q", "--queues", default=None, metavar="Q1,Q2",
              help="Queues to take jobs from, highest priority first.")
@click.option("-I", "--import", "imports", multiple=True, metavar="MODULE",
              help="Module whose tasks may run (repeatable; adds to the config's imports).")
@click.option("--config", "config_path", default=None, metavar="FILE",
              help="TOML config file (default: $JOBQ_CONFIG).")
@click.option("--redis-url", default=None, metavar="URL",
              help="Default: $JOBQ_REDIS_URL, the config, else the embedded server.")
@click.option("--pidfile", default=None, metavar="FILE")
@click.option("--log-file", default=None, metavar="FILE")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default=None)
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None)
@click.version_option(package_name="jobq")
def master_command(workers: int | None, queues: str | None, imports: tuple[str, ...],
                   config_path: str | None, redis_url: str | None, pidfile: str | None,
                   log_file: str | None, log_level: str | None, log_format: str | None) -> None:
    """Run the jobq master: a supervised pool of worker processes and a scheduler.

    Signals: HUP reload, TERM/INT graceful stop, QUIT immediate stop (jobs re-queued),
    TTIN/TTOU one worker more/fewer, USR1 reopen log files.
    """
    overrides: dict[str, Any] = {
        "workers": workers, "redis_url": redis_url, "pidfile": pidfile, "log_file": log_file,
        "log_level": log_level, "log_format": log_format,
        "queues": [q.strip() for q in queues.split(",") if q.strip()] if queues else None,
    }
    try:
        config = load_config(config_path, **overrides)
        if imports:
            overrides["imports"] = list(dict.fromkeys([*config.imports, *imports]))
            config = config.replace(imports=overrides["imports"])
        config_schedules(config)  # [[schedule]] tables are checked before anything starts
    except (ConfigError, ScheduleError) as exc:
        where = f"{config_path}: " if isinstance(exc, ScheduleError) and config_path else ""
        click.echo(f"jobq-master: error: {where}{exc}", err=True)
        sys.exit(exitcodes.USAGE)
    refused = refused_credentials(config.redis_url) if config.redis_url else None
    if refused:  # waiting never fixes a wrong password: say so, start nothing
        click.echo(f"jobq-master: error: {refused}", err=True)
        sys.exit(exitcodes.CONNECT)
    try:
        jobq_log.setup(config.log_level, config.log_format, config.log_file)
    except OSError as exc:
        click.echo(f"jobq-master: error: cannot open log file: {exc}", err=True)
        sys.exit(exitcodes.USAGE)
    sys.path.insert(0, "")  # task modules are found from the working directory, like python -m
    options = Options(config_path=config_path,
                      overrides={k: v for k, v in overrides.items() if v is not None},
                      pidfile=config.pidfile)
    sys.exit(Master(config, options).run())
