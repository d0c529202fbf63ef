"""Load jobq's Lua scripts (``jobq/lua/*.lua``) and call them by name; only
:mod:`jobq.broker` calls them.

Each script is sent as the constants :mod:`jobq.wire` shares with Lua, then the helpers of
``lib.lua`` it uses, then the script itself: one atomic EVALSHA.

``scripts.run("claim", keys, args)`` is the hot path: one EVALSHA on a pooled connection,
without redis-py's per-command machinery (about a third of a round trip's cost here), and
EVAL once when the server does not know the script (a restarted server, a fresh replica).
:meth:`Scripts.queue_sha` adds a call to a redis-py pipeline instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

import redis
from redis.exceptions import NoScriptError

from .wire import LUA_CONSTANTS

try:  # the C packer redis-py itself packs with when hiredis is installed (the "fast" extra)
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - the test extra installs it
    _hiredis_pack = None  # type: ignore[assignment]

#: Scripts that run on a server out of memory: an operator deletes pending jobs (jobq empty)
#: or a whole queue (jobq queue delete) to make room.
FREE_MEMORY = frozenset({"empty", "delete_queue"})
#: Scripts that only read: they run on a server that refuses writes (out of memory, short of
#: replicas under min-replicas-to-write), so a job's status can still be read there.
READ_ONLY = frozenset({"holder"})
NAMES = ("enqueue", "claim", "ack", "release", "cancel", "promote", "fire", "leader",
         "resign", "requeue", "empty", "enqueue_one", "giveback", "idle", "renew", "reap",
         "announce", "tasks", "delete_queue", "holder")


def _constants() -> str:
    lines = []
    for name, value in LUA_CONSTANTS.items():
        literal = str(value) if isinstance(value, int) else json.dumps(value)  # a Lua string too
        lines.append(f"local {name} = {literal}\n")
    return "".join(lines)


#: A top-level definition in lib.lua: ``local function name(``, ``local name = ...``, the
#: forward declaration ``local name`` and its later ``name = function(``.
_DEFINITION = re.compile(r"^(?:local\s+function\s+(\w+)|local\s+(\w+)|(\w+)\s*=\s*function\b)",
                         re.M)
#: A Lua string (skipped whole) or a comment (dropped): what is left names what code uses.
_STRING_OR_COMMENT = re.compile(r"""'(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*"|--[^\n]*""")
_WORD = re.compile(r"\b[A-Za-z_]\w*\b")


def used_names(lua: str) -> set[str]:
    """The identifiers Lua code uses (and any word in its strings): more than it calls,
    never less."""
    code = _STRING_OR_COMMENT.sub(lambda m: "" if m.group().startswith("--") else m.group(),
                                  lua)
    return set(_WORD.findall(code))


def split_lib(lib: str) -> tuple[str, list[tuple[str, str]]]:
    """lib.lua as its preamble (what comes before its first definition: always sent) and its
    top-level definitions in order, each (name, text up to the next one).

    After the preamble, a line that starts at the margin opens a definition of one name, or
    is a comment or a function's closing ``end``: anything else (a statement, ``local a, b``)
    would be sent with a helper only when a script uses it, or define a name this does not
    see, so it is refused (ValueError)."""
    starts = list(_DEFINITION.finditer(lib))
    if not starts:
        return lib, []
    units = []
    for m, end in zip(starts, [n.start() for n in starts[1:]] + [len(lib)], strict=True):
        text = lib[m.start():end]
        head, *body = text.split("\n")
        odd = head if re.match(r"local\s+\w+\s*,", head) else next(
            (line for line in body
             if line[:1] not in ("", " ", "\t", "-") and line.rstrip() != "end"), None)
        if odd is not None:
            raise ValueError(f"lib.lua: {odd.strip()!r} is not one top-level definition "
                             "(see jobq.scripts.split_lib)")
        units.append((next(g for g in m.groups() if g), text))
    return lib[:starts[0].start()], units


def shake(lib: str, script: str) -> str:
    """lib.lua with only the definitions ``script`` needs, and those they need in turn, in
    their order. A script run cold (the common case for an idle pool's enqueue, or a long
    job's acknowledgement) pays for each helper defined: all of lib.lua cost ~25 µs of the
    server's time per call, against ~4 µs once warm."""
    preamble, units = split_lib(lib)
    defined = {name for name, _ in units}
    needed = used_names(script) & defined
    uses: dict[str, set[str]] = {}
    for name, text in units:
        uses.setdefault(name, set()).update(used_names(text) & defined - {name})
    todo = list(needed)
    while todo:
        for dep in uses[todo.pop()] - needed:
            needed.add(dep)
            todo.append(dep)
    return preamble + "".join(text for name, text in units if name in needed)


def _source(name: str) -> str:
    """A script with the shared constants and the helpers of lib.lua it needs in front (each
    call stays atomic).

    It opens with ``#!lua`` (Redis 7, Valkey): a script that may write is then refused as a
    whole, before it runs, while the server is out of memory, instead of running until its
    first write that adds memory (claim.lua's first write is an LPOP, which frees some, so a
    legacy script went on claiming). The caller keeps what it wanted written and tries again.
    Scripts that free memory run all the same (:data:`FREE_MEMORY`), and so do those that
    only read (:data:`READ_ONLY`)."""
    lua = resources.files("jobq").joinpath("lua")
    shebang = ("#!lua flags=allow-oom\n" if name in FREE_MEMORY
               else "#!lua flags=no-writes\n" if name in READ_ONLY else "#!lua\n")
    script = lua.joinpath(f"{name}.lua").read_text("utf-8")
    return shebang + _constants() + shake(lua.joinpath("lib.lua").read_text("utf-8"), script) \
        + script


#: Every script's source, read from disk once, when jobq is imported: processes forked from a
#: master (its workers, those of a HUP included) run the scripts of the jobq the master loaded,
#: like its Python code, even after a newer jobq was installed under it; that one runs from the
#: master's next start.
SOURCES = {name: _source(name) for name in NAMES}


def pack(conn: Any, commands: list[tuple[Any, ...]]) -> list[bytes]:
    """``commands`` as one buffer to send on ``conn``: hiredis's packer called straight,
    without the pass redis-py makes over every argument first (for an exchange that
    acknowledges 128 empty jobs: 112 µs against 232 here, a worker's largest cost per job
    after its wait for the server). Arguments are str, bytes, int or float, which both pack
    alike; anything else (and a str that is not UTF-8) goes through redis-py's own packing,
    which raises what it always did. Without hiredis, redis-py packs."""
    if _hiredis_pack is not None:
        try:
            return [b"".join([_hiredis_pack(command) for command in commands])]
        except (TypeError, ValueError):  # UnicodeEncodeError is a ValueError
            pass
    return conn.pack_commands(commands)


class Scripts:
    """The scripts registered on one client."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._conn: Any = None
        self._pid = 0
        #: scripts this connection's server is known to hold (see :meth:`run_many`)
        self._loaded: set[str] = set()
        #: calls sent by :meth:`send_many` whose replies are not read yet
        self._pending: list[tuple[str, list[str], list[Any]]] | None = None
        self._source: dict[str, str] = {}
        self._sha: dict[str, str] = {}
        for name in NAMES:
            source = SOURCES[name]
            self._source[name] = source
            self._sha[name] = hashlib.sha1(source.encode()).hexdigest()

    def run(self, name: str, keys: list[str], args: list[Any], spin: float = 0.0) -> Any:
        """One script call; see :meth:`run_many` for ``spin``."""
        return self.run_many([(name, keys, args)], spin)[0]

    def run_and_wait(self, name: str, keys: list[str], args: list[Any], *, replicas: int,
                     timeout: float, spin: float = 0.0) -> tuple[Any, int]:
        """One script call, then ``WAIT replicas timeout`` on the same connection, in the same
        round trip: the script's reply, and how many replicas acknowledged its writes (and
        every write before them: replication is one ordered stream)."""
        replies = self.run_many([(name, keys, args)], spin,
                                then=("WAIT", replicas, max(1, int(timeout * 1000))))
        return replies[0], int(replies[1])

    def run_many(self, calls: list[tuple[str, list[str], list[Any]]],
                 spin: float = 0.0, then: tuple[Any, ...] = ()) -> list[Any]:
        """Several script calls in one round trip, their replies in order.

        With ``spin`` (seconds), wait for the reply by polling the socket that long before
        sleeping in ``recv``: a process that sleeps is woken a few hundred microseconds after
        its reply arrives on the virtual machines jobq runs on, which is most of a round
        trip. Only used while a reply is imminent, never to wait for work.

        The calls run in the order given: a script the server does not hold would fail and
        be sent again after the calls behind it had run (an ack after the claim that should
        have found what it put back), so the scripts of a batch are loaded first, once per
        connection (again after the connection or the server's scripts were lost).

        ``then``: a command sent after the calls (WAIT), its reply last; sent again after a
        script the server did not hold, so that it follows every call's writes.
        """
        with self._lock:
            conn = self._connection()
            try:
                self._send(conn, calls, then)
                if spin:
                    deadline = time.perf_counter() + spin
                    while not conn.can_read(timeout=0) and time.perf_counter() < deadline:
                        # give our core to the server if it is waiting for one (it is, when
                        # the workers keep every core busy): no core is taken from a job
                        os.sched_yield()
                return self._read(conn, calls, then)
            except BaseException:
                self._lost(conn)
                raise

    def send_many(self, calls: list[tuple[str, list[str], list[Any]]]) -> None:
        """Send script calls as :meth:`run_many` does, without waiting for their replies:
        :meth:`read_many` reads them, and nothing else is sent on this connection until it
        has. A worker sends its next exchange so while it still runs jobs."""
        with self._lock:
            conn = self._connection()
            try:
                self._send(conn, calls, ())
            except BaseException:
                self._lost(conn)
                raise
            self._pending = calls

    def read_many(self) -> list[Any]:
        """The replies of the calls :meth:`send_many` sent, in order."""
        with self._lock:
            calls, self._pending = self._pending, None
            if calls is None:
                raise RuntimeError("no script calls were sent to read the replies of")
            conn = self._connection()
            try:
                return self._read(conn, calls, ())
            except BaseException:
                self._lost(conn)
                raise

    def _send(self, conn: Any, calls: list[tuple[str, list[str], list[Any]]],
              then: tuple[Any, ...]) -> None:
        if self._pending is not None:
            raise RuntimeError("the replies of script calls sent before are not read yet")
        if len(calls) > 1:
            self._load(conn, {name for name, _, _ in calls} - self._loaded)
        commands = [("EVALSHA", self._sha[name], len(keys), *keys, *args)
                    for name, keys, args in calls]
        if then:
            commands.append(then)
        conn.send_packed_command(pack(conn, commands))

    def _read(self, conn: Any, calls: list[tuple[str, list[str], list[Any]]],
              then: tuple[Any, ...]) -> list[Any]:
        replies: list[Any] = []
        unknown = []
        for i in range(len(calls)):
            try:
                replies.append(conn.read_response())
            except NoScriptError:  # a restarted server: nothing ran, send the source
                replies.append(None)
                unknown.append(i)
        if unknown:
            self._loaded.clear()  # the server lost its scripts (flushed, restarted)
        if then:
            replies.append(conn.read_response())
        for i in unknown:
            name, keys, args = calls[i]
            conn.send_command("EVAL", self._source[name], len(keys), *keys, *args)
            replies[i] = conn.read_response()
        if then and unknown:
            conn.send_command(*then)
            replies[-1] = conn.read_response()
        return replies

    def _lost(self, conn: Any) -> None:
        conn.disconnect()  # a reply may be half read: never reuse this socket as is
        self._loaded.clear()  # it may reconnect to a server that lost its scripts
        self._pending = None  # their replies went with the socket

    def _load(self, conn: Any, names: set[str]) -> None:
        """SCRIPT LOAD ``names`` in one round trip (a no-op for scripts the server holds)."""
        if not names:
            return
        conn.send_packed_command(conn.pack_commands(
            [("SCRIPT", "LOAD", self._source[name]) for name in names]))
        for _ in names:
            conn.read_response()
        self._loaded |= names

    def _connection(self) -> Any:
        """A connection of our own, made anew in a forked child (sockets are not shared)."""
        if self._conn is None or self._pid != os.getpid():
            self._conn = self.client.connection_pool.get_connection()  # kept, never released
            self._pid = os.getpid()
            self._loaded = set()
            self._pending = None
        return self._conn

    def queue_sha(self, pipe: Any, name: str, keys: list[str], args: list[Any]) -> None:
        """Add a call to a redis-py pipeline as a bare EVALSHA (redis-py's own script objects
        ask the server whether it holds them, SCRIPT EXISTS, in a round trip of their own
        before each execute): :meth:`execute` runs such a pipeline; a caller that runs its
        own executes it with ``raise_on_error=False``, and where its reply is a
        ``NoScriptError`` (a server that lost its scripts: that call did nothing), calls
        :meth:`load` and decides what to send again."""
        pipe.execute_command("EVALSHA", self._sha[name], len(keys), *keys, *args)

    def execute(self, fill: Callable[[Any], None], name: str) -> list[Any]:
        """A pipeline that ``fill`` fills, its script calls added with :meth:`queue_sha` (all
        of them ``name``): its replies, or its first error raised. A call refused by a server
        that lost the script ran nothing: the script is loaded and the whole pipeline sent
        again, so what ``fill`` adds must be safe to send twice (reads; enqueue.lua, which
        skips an id already there)."""
        for _ in range(2):
            pipe = self.client.pipeline(transaction=False)
            fill(pipe)
            replies: list[Any] = pipe.execute(raise_on_error=False)
            if not any(isinstance(reply, NoScriptError) for reply in replies):
                break
            self.load(name)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def load(self, name: str) -> None:
        """SCRIPT LOAD one script, on a connection of the client's pool."""
        self.client.script_load(self._source[name])
