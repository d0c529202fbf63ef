"""Give back the jobs of workers that are gone: released at once, or reaped when leases lapse."""

from __future__ import annotations

import logging
import time
from typing import Any

from .config import Config
from .job import DEFAULT_MAX_RETRIES
from .keys import Keys
from .queue import WAKE_CAP
from .scripts import Scripts

log = logging.getLogger("jobq.recovery")

#: Most expired leases handled per reap call (the rest wait for the next tick).
REAP_BATCH = 32


def release(client: Any, scripts: Scripts, keys: Keys, config: Config, worker: str, *,
            cause: str, current: str | None, only_if_expired: bool = False,
            now: float | None = None,
            queues: list[str] | None = None) -> tuple[list[str], list[str]] | None:
    """Give back what ``worker`` held. ``current`` is the job it was running ("-" for none,
    None if unknown); ``queues`` its queues, whose idle lists it leaves. Returns (requeued
    ids, failed ids), or None if its lease is still live and ``only_if_expired``."""
    now_ms = int((now if now is not None else time.time()) * 1000)
    out = scripts.release(
        keys=[keys.jobs],
        args=[keys.base, worker, now_ms, cause, "" if current is None else current,
              config.max_deliveries, config.failed_ttl, config.dlq_max, WAKE_CAP,
              "1" if only_if_expired else "0", DEFAULT_MAX_RETRIES, *(queues or [])],
        client=client)
    if not out:
        return None
    requeued, failed = list(out[0]), list(out[1])
    if requeued or failed:
        log.warning("gave back the jobs of worker %s (%s): %d requeued, %d failed%s",
                    worker, cause, len(requeued), len(failed),
                    f" ({', '.join(failed[:5])})" if failed else "")
    return requeued, failed


def send_acks(client: Any, scripts: Scripts, keys: Keys, config: Config, worker: str,
              acks: list[list[str]], now: float | None = None) -> None:
    """Send the acknowledgements a dead worker had journaled but not sent (see
    :mod:`jobq.slots`): the jobs it finished are settled, not run again. Those it had sent
    already are no longer held by it, and ack.lua skips them."""
    if not acks:
        return
    from .worker import RECENT_MAX

    now_ms = int((now if now is not None else time.time()) * 1000)
    flat = [field for entry in acks for field in entry]
    scripts.run("ack", [keys.jobs], [keys.base, worker, now_ms, RECENT_MAX, config.dlq_max,
                                     WAKE_CAP, config.failed_ttl, *flat])


def reap(client: Any, scripts: Scripts, keys: Keys, config: Config,
         now: float | None = None) -> int:
    """Release the jobs of every worker whose lease lapsed (its host or master died)."""
    now = time.time() if now is None else now
    expired = client.zrangebyscore(keys.leases, "-inf", int(now * 1000), start=0, num=REAP_BATCH)
    count = 0
    for worker in expired:
        result = release(client, scripts, keys, config, worker, current=None, now=now,
                         only_if_expired=True, cause="lease expired: the worker or its host "
                         "stopped renewing it")
        if result is not None:
            count += 1
    return count
