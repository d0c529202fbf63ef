"""What ``jobq info`` and ``jobq top`` show, read from counters and small structures only
(no scans): queues with counts and rates, masters and their workers, the scheduler leader."""

from __future__ import annotations

import time
from typing import Any

from . import serialization
from .broker import Broker

#: The scheduler leader snapshots the counters this often (seconds), for rates.
SNAPSHOT_EVERY = 5.0
#: How often a master describes itself, its heartbeat (seconds; master/duties.py).
HEARTBEAT_EVERY = 2.0
#: A master is gone once its heartbeat is older than its lease plus this many heartbeats:
#: its workers' leases have lapsed, and the leader gives their jobs back.
STALE_HEARTBEATS = 2
#: A master that does not say its lease (an older jobq) is gone after this long (seconds).
MASTER_STALE = 15.0
#: A gone master is forgotten (dropped from ``jobq info``, and by the leader from the server)
#: this many leases after its last heartbeat, and after MASTER_FORGOTTEN seconds at most:
#: 10 minutes with the default lease of 15 s, less with a short lease.
FORGOTTEN_LEASES = 40
MASTER_FORGOTTEN = 600.0
COUNTERS = ("pending", "processing", "scheduled", "deferred", "completed", "failed",
            "cancelled", "retried", "enqueued")


def snapshot(broker: Broker, now: float | None = None) -> None:
    """Remember the counters now (the leader calls this every SNAPSHOT_EVERY seconds)."""
    now = time.time() if now is None else now
    broker.add_snapshot(serialization.dumps({"ts": now, "q": broker.counters()}))


def rates(current: dict[str, dict[str, int]], history: list[dict[str, Any]], now: float,
          window: float = 60.0) -> dict[str, dict[str, float]]:
    """Per queue, completed and failed per second over (about) the last ``window`` seconds."""
    past = None
    for snap in history:  # newest first: take the oldest one within the window
        if now - snap["ts"] <= window + SNAPSHOT_EVERY:
            past = snap
    out: dict[str, dict[str, float]] = {}
    for q, now_counts in current.items():
        if past is None or now - past["ts"] < 1:
            out[q] = {"completed_per_s": 0.0, "failed_per_s": 0.0}
            continue
        then = past["q"].get(q, {})
        span = now - past["ts"]
        out[q] = {f"{k}_per_s": round((now_counts.get(k, 0) - then.get(k, 0)) / span, 2)
                  for k in ("completed", "failed")}
    return out


def master_state(described: dict[str, Any], now: float) -> str:
    """What became of a master, from its description (its heartbeat): "alive", "gone" (no
    heartbeat since its lease lapsed: a host that died or was cut off), or "forgotten"."""
    age = now - float(described.get("ts", 0))
    lease = described.get("lease_time")
    if isinstance(lease, int | float) and lease > 0:
        stale = lease + STALE_HEARTBEATS * HEARTBEAT_EVERY
        forgotten = max(stale, min(MASTER_FORGOTTEN, FORGOTTEN_LEASES * lease))
    else:
        stale, forgotten = MASTER_STALE, MASTER_FORGOTTEN
    if age <= stale:
        return "alive"
    return "gone" if age <= forgotten else "forgotten"


def collect(broker: Broker, now: float | None = None) -> dict[str, Any]:
    """Everything ``jobq info`` shows, as one JSON-able dict."""
    now = time.time() if now is None else now
    current = broker.counters()
    history = [serialization.loads(x) for x in broker.snapshots()]
    rate = rates(current, history, now)
    suspended = broker.suspended_queues()
    queues = []
    dead = broker.dlq_counts(list(current))
    for (q, counts), dlq in zip(current.items(), dead, strict=True):
        queues.append({"queue": q, **{k: counts.get(k, 0) for k in COUNTERS},
                       "dead": dlq, "suspended": q in suspended, **rate[q]})
    masters = []
    for mid, raw in sorted(broker.masters().items()):
        info = serialization.loads(raw)
        state = master_state(info, now)
        if state == "forgotten":  # the leader deletes it at its next look
            continue
        for w in info.get("workers", []):
            w["age_s"] = round(now - w["since"], 1) if w.get("since") else None
        masters.append({"id": mid, "alive": state == "alive", "state": state,
                        "seen_s_ago": round(now - info.get("ts", 0), 1), **info})
    token = broker.leader_token()
    leader = token.rsplit(".", 1)[0] if token else None
    return {"time": now, "queues": queues, "masters": masters, "scheduler_leader": leader}
