"""``jobq-master``'s command line: parse options, load and check the config, run the
master."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from .. import exitcodes
from .. import log as jobq_log
from ..config import CONFIG_ENV, ConfigError, load_config
from ..master.arbiter import NO_TASK_MODULE, Master, Options
from ..schedule import ScheduleError
from ..scheduler import config_schedules
from .app import QuietCommand, config_file_option, config_option, one_line_errors


@click.command(cls=QuietCommand, context_settings={"help_option_names": ["-h", "--help"]})
@config_option("workers")
@config_option("queues")
@config_option("imports")
@config_file_option()
@config_option("redis_url")
@config_option("pidfile")
@config_option("log_file")
@config_option("log_level")
@config_option("log_format")
@config_option("metrics_port")
@config_option("metrics_host")
@config_option("hostname")
@click.version_option(package_name="jobq")
def master_command(workers: int | None, queues: list[str] | None, imports: tuple[str, ...],
                   config_path: str | None, redis_url: str | None, pidfile: str | None,
                   log_file: str | None, log_level: str | None, log_format: str | None,
                   metrics_port: int | None, metrics_host: str | None,
                   hostname: str | None) -> None:
    """Run the jobq master: a supervised pool of worker processes and a scheduler.

    Signals: HUP reload, TERM/INT graceful stop, QUIT immediate stop (jobs re-queued),
    TTIN/TTOU one worker more/fewer, USR1 reopen log files.
    """
    overrides: dict[str, Any] = {
        "workers": workers, "queues": queues, "redis_url": redis_url, "pidfile": pidfile,
        "log_file": log_file, "log_level": log_level, "log_format": log_format,
        "metrics_port": metrics_port, "metrics_host": metrics_host, "hostname": hostname,
    }
    try:
        config = load_config(config_path, **overrides)
        if imports:
            overrides["imports"] = list(dict.fromkeys([*config.imports, *imports]))
            config = config.replace(imports=overrides["imports"])
        config_schedules(config)  # [[schedule]] tables are checked before anything starts
        config.namespace()  # on a Cluster, its queues must share a queue group
        if not config.imports:  # every job would fail: say so now, not once per job
            source = config_path or os.environ.get(CONFIG_ENV)
            raise ConfigError(f"{source}: {NO_TASK_MODULE}" if source else NO_TASK_MODULE)
    except (ConfigError, ScheduleError) as exc:
        where = f"{config_path}: " if isinstance(exc, ScheduleError) and config_path else ""
        click.echo(f"jobq-master: error: {where}{exc}", err=True)
        sys.exit(exitcodes.USAGE)
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


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``jobq-master`` (and ``python -m jobq.cli.master``)."""
    one_line_errors(master_command.main, argv, "jobq-master")


if __name__ == "__main__":
    main()
