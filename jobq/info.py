"""What ``jobq info`` and ``jobq top`` show, read from counters and small structures only
(no scans): queues with counts and rates, masters and their workers, the scheduler leader."""

from __future__ import annotations

import time
from typing import Any

import redis

from . import serialization
from .keys import Keys

#: Counter snapshots kept for rates (the scheduler leader adds one every SNAPSHOT_EVERY s).
SNAPSHOT_EVERY = 5.0
SNAPSHOTS_KEPT = 30
#: A master whose heartbeat is older than this is shown as gone (seconds).
STALE = 15.0
COUNTERS = ("pending", "processing", "scheduled", "deferred", "completed", "failed",
            "cancelled", "retried", "enqueued")


def history_key(keys: Keys) -> str:
    return f"{keys.base}:stats:history"


def counters(client: redis.Redis, keys: Keys) -> dict[str, dict[str, int]]:
    queues = sorted(client.smembers(keys.queues))
    pipe = client.pipeline(transaction=False)
    for q in queues:
        pipe.hgetall(keys.stats(q))
    return {q: {k: max(0, int(v)) for k, v in raw.items()}
            for q, raw in zip(queues, pipe.execute(), strict=True)}


def snapshot(client: redis.Redis, keys: Keys, now: float | None = None) -> None:
    """Remember the counters now (the leader calls this every SNAPSHOT_EVERY seconds)."""
    now = time.time() if now is None else now
    entry = serialization.dumps({"ts": now, "q": counters(client, keys)})
    client.pipeline(transaction=False).lpush(history_key(keys), entry).ltrim(
        history_key(keys), 0, SNAPSHOTS_KEPT - 1).execute()


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


def collect(client: redis.Redis, keys: Keys, now: float | None = None) -> dict[str, Any]:
    """Everything ``jobq info`` shows, as one JSON-able dict."""
    now = time.time() if now is None else now
    current = counters(client, keys)
    history = [serialization.loads(x) for x in client.lrange(history_key(keys), 0, -1)]
    rate = rates(current, history, now)
    suspended = client.smembers(keys.suspended)
    pipe = client.pipeline(transaction=False)
    for q in current:
        pipe.zcard(keys.dlq(q))
    dlq_sizes = pipe.execute()
    queues = []
    for (q, counts), dlq in zip(current.items(), dlq_sizes, strict=True):
        queues.append({"queue": q, **{k: counts.get(k, 0) for k in COUNTERS},
                       "dead": dlq, "suspended": q in suspended, **rate[q]})
    masters = []
    for mid, raw in sorted(client.hgetall(keys.masters).items()):
        info = serialization.loads(raw)
        alive = now - info.get("ts", 0) < STALE
        for w in info.get("workers", []):
            w["age_s"] = round(now - w["since"], 1) if w.get("since") else None
        masters.append({"id": mid, "alive": alive, **info})
    token = client.get(f"{keys.base}:sched:leader")
    leader = token.rsplit(".", 1)[0] if token else None
    return {"time": now, "queues": queues, "masters": masters, "scheduler_leader": leader}
