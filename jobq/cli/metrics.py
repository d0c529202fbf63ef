"""``jobq metrics``: serve the server's queue-level metrics, for a host that runs no master
(see :mod:`jobq.metrics`)."""

from __future__ import annotations

import signal
import threading
from typing import Any

import click

from .. import exitcodes, metrics
from ..urls import redact
from .app import CliError, State, jobq_command, main


@jobq_command(main, "metrics")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="Port to serve /metrics on (default: the config's metrics_port).")
@click.option("--host", default=None, metavar="HOST",
              help="Address to listen on (default: the config's metrics_host, 127.0.0.1).")
def metrics_command(state: State, port: int | None, host: str | None) -> int:
    """Serve Prometheus metrics of the server's queues (pending, running, scheduled,
    deferred, dead-letter; the server's counters; the scheduler leader) until stopped.
    A master's own --metrics-port serves these too, and its workers'."""
    config = state.config()
    port = port or config.metrics_port
    if not port:
        raise CliError("give --port (or metrics_port in the config)", exitcodes.USAGE)
    try:
        exporter = metrics.load_exporter()
        url = state.url()
        served = exporter.serve(exporter.JobqCollector(exporter.scrape_broker(config, url)),
                                host or config.metrics_host, port)
    except metrics.MetricsError as exc:
        raise CliError(str(exc), exitcodes.USAGE) from None
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    click.echo(f"serving the metrics of the queues on {redact(url)} at "
               f"http://{host or config.metrics_host}:{served.port}/metrics", err=True)
    while not stop.wait(1.0):
        pass
    served.close()
    return exitcodes.OK
