"""Operators' requests to a running master, through the server: change its number of workers
exactly (``jobq workers add|remove|set N``), on any host.

::

    jobq workers add 2 ──RPUSH──► {ns}:ctl:<master>   a Resize (JSON): id, op, n
                                       │ read with the cancel requests (4 times a second)
                                       ▼
                       master: duties thread ──► arbiter: new target, as TTIN/TTOU do
                                                      │ heartbeat at once
    "master h.42: 4 workers (was 2)" ◄── {ns}:masters: its target, and "resized": the
                                         latest requests it applied (id, target, was, note)

Signals cannot do this: the kernel merges a signal sent again while the first is still
pending, so two quick TTINs may add one worker. A request is applied once, whole.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from . import serialization
from .broker import Broker
from .info import master_state

#: What a request does to a master's number of workers.
OPS = ("add", "remove", "set")
#: A request no master took is dropped after this long (seconds).
REQUEST_TTL = 600
#: How often the command looks at the master's heartbeat while it waits (seconds).
POLL_EVERY = 0.05


class NoMaster(LookupError):
    """No live master, or none with the id given."""


class WhichMaster(ValueError):
    """Several masters are alive and none was named."""


class NotApplied(RuntimeError):
    """The master did not apply the request (it is stopping, or did not answer in time)."""


@dataclass(frozen=True)
class Resize:
    """Change a master's number of workers: ``add`` or ``remove`` ``n``, or ``set`` it to
    ``n`` (never below one)."""

    op: str
    n: int
    id: str = field(default_factory=lambda: os.urandom(8).hex())

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {', '.join(OPS)}, got {self.op!r}")
        if type(self.n) is not int or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")

    def encode(self) -> str:
        return serialization.dumps({"id": self.id, "op": self.op, "n": self.n})

    @classmethod
    def decode(cls, raw: str) -> Resize | None:
        """A request read from the server; None if it is not one."""
        try:
            data = serialization.loads(raw)
            return cls(data["op"], data["n"], str(data["id"]))
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True)
class Applied:
    """What a master did with a request: its number of workers before and after, and why it
    differs from what was asked, if it does."""

    master: str
    target: int
    was: int
    note: str = ""

    def describe(self) -> str:
        s = "" if self.target == 1 else "s"
        note = f"; {self.note}" if self.note else ""
        return f"master {self.master}: {self.target} worker{s} (was {self.was}{note})"


def live_masters(broker: Broker, now: float | None = None) -> dict[str, dict[str, Any]]:
    """The masters whose heartbeat is recent, by id (the ids `jobq info` shows)."""
    now = time.time() if now is None else now
    out = {}
    for master_id, raw in sorted(broker.masters().items()):
        info = serialization.loads(raw)
        if master_state(info, now) == "alive":
            out[master_id] = info
    return out


def pick_master(broker: Broker, master_id: str | None) -> str:
    """The master named, or the only live one; :class:`NoMaster` or :class:`WhichMaster`."""
    alive = live_masters(broker)
    if master_id is not None:
        if master_id not in alive:
            raise NoMaster(f"no live master {master_id!r} (live: {', '.join(alive) or 'none'})")
        return master_id
    if not alive:
        raise NoMaster("no live master (is jobq-master running on this server and prefix?)")
    if len(alive) > 1:
        raise WhichMaster(f"{len(alive)} masters are alive: name one with --master "
                          f"({', '.join(alive)})")
    return next(iter(alive))


def resize(broker: Broker, master_id: str, request: Resize, timeout: float) -> Applied:
    """Send ``request`` to a master and wait until its heartbeat shows it applied; what it
    did. :class:`NotApplied` when it is stopping, or did not apply it within ``timeout``
    seconds (the request is then withdrawn if the master had not taken it yet)."""
    raw = request.encode()
    broker.request_control(master_id, raw, REQUEST_TTL)
    deadline = time.monotonic() + timeout
    while True:
        info = live_masters(broker).get(master_id)
        done = _applied(info, request.id) if info is not None else None
        if done is not None:
            if done.get("note") == "stopping":
                raise NotApplied(f"master {master_id} is stopping: nothing changed")
            return Applied(master_id, int(done["target"]), int(done["was"]),
                           str(done.get("note") or ""))
        if info is None or time.monotonic() >= deadline:
            withdrawn = broker.withdraw_control(master_id, raw)
            what = "stopped" if info is None else f"did not apply it within {timeout:g} s"
            outcome = ("the request is withdrawn: nothing changed" if withdrawn else
                       "it took the request and may still apply it (see jobq info)")
            raise NotApplied(f"master {master_id} {what}; {outcome}")
        time.sleep(POLL_EVERY)


def _applied(info: dict[str, Any], request_id: str) -> dict[str, Any] | None:
    for done in info.get("resized") or ():
        if isinstance(done, dict) and done.get("id") == request_id:
            return done
    return None
