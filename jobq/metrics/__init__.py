"""Prometheus metrics (the ``jobq[metrics]`` extra): the master's ``/metrics``, and
``jobq metrics`` for a host that runs no master.

::

    worker 0 ─┐ per-task tallies (tally.py:            ┌─ master ─────────────────────────┐
    worker 1 ─┼─ shared memory, published when ──────► │ arbiter: restarts, reloads,      │
    worker … ─┘ their acks reach the server)           │ workers and memory (its ticks)   │
                                                       │ HTTP thread (exporter.py): on    │
                                                       │ each scrape, reads the tallies,  │
    Redis / Valkey ◄── PING, queue counters, DLQ ───── │ the arbiter's last view, and the │
                       sizes, the scheduler lease      │ server, with a short timeout     │
                                                       └──────────────────────────────────┘

Why the master's own collector, not prometheus_client's multiprocess mode: the master
already knows what its workers do without asking them (:mod:`jobq.slots`), and its workers
are forked and replaced all the time. Multiprocess mode would have every worker write one
mmap file per metric into a directory that must be wiped at each start and whose dead
workers' files pile up (or be merged by hand), and it would import prometheus_client into
every worker. Here a worker keeps plain counters in its own memory (a few list increments per
job) and copies them to its shared slot once per batch of acknowledgements; the master folds
a dead worker's last counts into its totals before the slot is reused, so counters never go
back. Nothing is imported, counted or served unless ``metrics_port`` is set.

The HTTP server runs in threads of its own (prometheus_client's): a slow scrape, or a server
that does not answer (its reads time out after ``exporter.SCRAPE_TIMEOUT``, and
``jobq_server_up`` says 0), never delays the arbiter's loop.
"""

from __future__ import annotations

from types import ModuleType

from ..exceptions import MetricsError

__all__ = ["MISSING", "MetricsError", "load_exporter"]

#: What to install when metrics are asked for without the extra.
MISSING = ("metrics need prometheus_client, which is not installed: "
           "pip install 'jobq[metrics]'")


def load_exporter() -> ModuleType:
    """:mod:`jobq.metrics.exporter`, which imports prometheus_client: loaded only when
    metrics are on. :class:`MetricsError` when the extra is not installed."""
    try:
        from . import exporter as module
    except ImportError as exc:
        if (exc.name or "").split(".")[0] == "prometheus_client":
            raise MetricsError(MISSING) from None
        raise
    return module
