"""Load jobq's Lua scripts (``jobq/lua/*.lua``) and call them by name.

``scripts.run("claim", keys, args)`` is the hot path: one EVALSHA on a pooled connection,
without redis-py's per-command machinery (about a third of a round trip's cost here), and
EVAL once when the server does not know the script (a restarted server, a fresh replica).
The redis-py ``Script`` objects (``scripts.claim(...)``) serve pipelines.
"""

from __future__ import annotations

import hashlib
import os
import threading
from importlib import resources
from typing import Any

import redis
from redis.exceptions import NoScriptError

NAMES = ("enqueue", "claim", "ack", "release", "cancel", "promote", "fire", "leader",
         "requeue", "empty", "enqueue_one", "giveback")


def _source(name: str) -> str:
    """A script with the shared helpers of lib.lua in front (each call stays atomic)."""
    lua = resources.files("jobq").joinpath("lua")
    return lua.joinpath("lib.lua").read_text("utf-8") + lua.joinpath(f"{name}.lua").read_text(
        "utf-8")


class Scripts:
    """The scripts registered on one client."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._conn: Any = None
        self._pid = 0
        self._source: dict[str, str] = {}
        self._sha: dict[str, str] = {}
        for name in NAMES:
            source = _source(name)
            self._source[name] = source
            self._sha[name] = hashlib.sha1(source.encode()).hexdigest()
            setattr(self, name, client.register_script(source))

    def run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        with self._lock:
            conn = self._connection()
            try:
                try:
                    conn.send_command("EVALSHA", self._sha[name], len(keys), *keys, *args)
                    return conn.read_response()
                except NoScriptError:
                    conn.send_command("EVAL", self._source[name], len(keys), *keys, *args)
                    return conn.read_response()
            except BaseException:
                conn.disconnect()  # a reply may be half read: never reuse this socket as is
                raise

    def _connection(self) -> Any:
        """A connection of our own, made anew in a forked child (sockets are not shared)."""
        if self._conn is None or self._pid != os.getpid():
            self._conn = self.client.connection_pool.get_connection()  # kept, never released
            self._pid = os.getpid()
        return self._conn

    enqueue: Any
    claim: Any
    ack: Any
    release: Any
    cancel: Any
    promote: Any
    fire: Any
    leader: Any
    requeue: Any
    empty: Any
    enqueue_one: Any
    giveback: Any
