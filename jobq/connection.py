"""Connecting to Redis/Valkey from a URL: timeouts sized to the lease, a check that the
server is one jobq can use, and errors that name the problem in one line without a secret."""

from __future__ import annotations

import logging
import socket
import time
import weakref
from collections.abc import Sequence
from typing import Any

import redis

from . import cluster, sentinel
from .exceptions import JobqError
from .urls import redact, scrub

log = logging.getLogger("jobq")

#: URL scheme -> the scheme redis-py understands; ``valkey(s)://`` are aliases.
SCHEMES = {
    "redis": "redis",
    "rediss": "rediss",
    "unix": "unix",
    "valkey": "redis",
    "valkeys": "rediss",
    **{scheme: "sentinel" for scheme in sentinel.SCHEMES},  # see jobq.sentinel
    **{scheme: "cluster" for scheme in cluster.SCHEMES},  # see jobq.cluster
}
#: Client defaults; any of them can be overridden through ``connect(**kw)``.
DEFAULTS: dict[str, Any] = {
    "health_check_interval": 30,
    "retry_on_timeout": False,
    "socket_connect_timeout": 5,
}
#: The lease a client is sized for when its caller has no config (seconds).
DEFAULT_LEASE = 15.0
#: The shortest read timeout (seconds): a busy server may take a while on a big script.
MIN_SOCKET_TIMEOUT = 1.0
#: The oldest Redis jobq runs on: its scripts declare themselves (#!lua) and read the server's
#: clock (TIME), both Redis 7.0 (every Valkey reports 7.2 or later).
MIN_REDIS = (7, 0)


class ServerProblem(JobqError):
    """The server at a URL cannot be used: unreachable, not a Redis/Valkey server, refusing
    our credentials, or too old. The message is one line without a secret."""

    def __init__(self, message: str, *, lasting: bool) -> None:
        super().__init__(message)
        #: waiting will not help (not a Redis server, wrong password, too old)
        self.lasting = lasting


def client_options(lease_time: float, *, tcp: bool) -> dict[str, Any]:
    """Read timeout and TCP keepalive sized to the lease: a call to a server that froze or
    vanished fails within about a lease instead of never (a frozen master, a stuck worker),
    and so does a dead TCP peer (the kernel's default keepalive waits two hours)."""
    options: dict[str, Any] = {"socket_timeout": max(MIN_SOCKET_TIMEOUT, lease_time)}
    if tcp:
        options["socket_keepalive"] = True
        options["socket_keepalive_options"] = {
            socket.TCP_KEEPIDLE: max(1, int(lease_time / 3)),
            socket.TCP_KEEPINTVL: max(1, int(lease_time / 6)),
            socket.TCP_KEEPCNT: 3,
        }
    return options


def block_limit(client: redis.Redis) -> float:
    """The longest a blocking command (BLPOP) of ``client`` may wait in one call: half its read
    timeout (a longer one would be taken for a dead server)."""
    timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
    return float(timeout) / 2 if timeout else 3600.0


def blpop_by(client: redis.Redis, keys: Sequence[str], timeout: float, *,
             server_timeout: float | None = None) -> list[Any] | None:
    """BLPOP ``keys`` for ``timeout`` seconds measured on this client's clock; returns
    ``[key, value]``, or None when the time is up.

    A server times a blocked client out only at its ``hz`` ticks when nothing else wakes it
    (10 a second by default: an idle server answers up to 100 ms late). So the client waits
    for the reply itself (poll on the socket) until its deadline, then unblocks its
    connection with CLIENT UNBLOCK sent on another one, and reads the reply: nil, or what
    the pop took in the meantime, which is never lost; the connection stays usable. The
    server's own timeout (``server_timeout``, by default ``timeout``; 0 is forever) is a
    backup: a user the server does not allow CLIENT UNBLOCK waits for it (said once). A
    server that does not answer fails the call within the client's read timeout, as any
    other call."""
    pool = client.connection_pool
    deadline = time.monotonic() + timeout
    conn = pool.get_connection()
    try:
        conn.send_packed_command(conn.pack_commands([
            ("CLIENT", "ID"), ("BLPOP", *keys, timeout if server_timeout is None
                               else server_timeout)]))
        client_id = conn.read_response()
        if not conn.can_read(timeout=max(0.0, deadline - time.monotonic())):
            _unblock(client, int(client_id))
        reply = conn.read_response()
    except BaseException:
        conn.disconnect()  # a reply may be half read, or the pop still waiting: not reusable
        raise
    finally:
        pool.release(conn)
    return list(reply) if reply else None


def _unblock(client: redis.Redis, client_id: int) -> None:
    """End a blocking call of connection ``client_id`` as if its time were up (nothing, if
    its reply is on its way already)."""
    if client in _unblock_refused:
        return  # the blocked call ends at the server's own timeout
    try:
        client.client_unblock(client_id)
    except redis.ResponseError as exc:  # NOPERM: an ACL without +client|unblock
        _unblock_refused.add(client)
        log.warning("the server refuses CLIENT UNBLOCK (%s): blocking waits end at its own "
                    "timeout, up to 1/hz late (100 ms at hz 10); delayed jobs may start that "
                    "late. Allow it to this user: +client|unblock", exc)


#: Clients whose server refused CLIENT UNBLOCK (see :func:`blpop_by`).
_unblock_refused: weakref.WeakSet[redis.Redis] = weakref.WeakSet()


def connect(url: str, *, lease_time: float = DEFAULT_LEASE, decode_responses: bool = True,
            route: str | None = None, **kw: Any) -> redis.Redis:
    """Return a client for ``url`` (``redis://``, ``rediss://``, ``unix://``, ``valkey[s]://``,
    ``redis+sentinel://`` & co: the current primary, see :mod:`jobq.sentinel`; and
    ``redis+cluster://`` & co: the primary serving the slot of key ``route``, any node if
    None, see :mod:`jobq.cluster`) with timeouts sized to ``lease_time`` (see
    :func:`client_options`). ``route`` means nothing on a single server.

    Query parameters (``db``, ``ssl_cert_reqs``, ``ssl_ca_certs``, ...) pass through to
    redis-py's ``from_url``; ``kw`` overrides :data:`DEFAULTS`. No connection is made yet.
    """
    scheme, sep, rest = url.partition("://")
    target = SCHEMES.get(scheme.lower()) if sep else None
    if target is None:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise ValueError(f"unsupported redis URL {redact(url)!r}: expected one of {known}")
    options = {**DEFAULTS, "decode_responses": decode_responses,
               **client_options(lease_time, tcp=target != "unix")}
    options.update(kw)
    if target == "sentinel":
        client = sentinel.master_client(url, options)
    elif target == "cluster":
        client = cluster.slot_client(url, options, route)
    else:
        client = redis.Redis.from_url(f"{target}://{rest}", **options)
    _clients.add(client)
    return client


#: Every client this process made, so it can tell its own connections from others' at exit.
_clients: weakref.WeakSet[redis.Redis] = weakref.WeakSet()


def close_all() -> None:
    """Close every connection this process holds (see :func:`jobq.server.ensure_server`)."""
    for client in list(_clients):
        try:
            client.connection_pool.disconnect()
            for node in sentinel.sentinels_of(client):
                node.connection_pool.disconnect()
        except Exception:
            pass


def describe_error(exc: BaseException, url: str) -> str:
    """One line explaining a connection or authentication failure, without the password."""
    where = redact(url)
    if _is_auth_error(exc):
        line = f"authentication failed for {where}: {_reason(exc)}"
    elif refuses_writes(exc):
        line = f"{where} refuses writes for now: {_reason(exc)}"
    elif isinstance(exc, redis.ConnectionError | redis.TimeoutError | OSError):
        line = f"cannot connect to {where}: {_reason(exc)}"
    else:
        line = f"error talking to {where}: {type(exc).__name__}: {_reason(exc)}"
    return scrub(line, url)


def check_server(url: str, *, timeout: float) -> None:
    """Make sure a Redis/Valkey server jobq can use answers at ``url``: raise
    :class:`ServerProblem` at once if the address answers but is not one (or refuses our
    credentials, or is too old), or after ``timeout`` seconds of trying if nothing answers."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    target_is_cluster = cluster.is_cluster_url(url)
    while True:
        client = connect(url, socket_connect_timeout=max(0.5, min(5.0, timeout)),
                         socket_timeout=max(1.0, min(5.0, timeout)))
        try:
            version = _version(client)
            if target_is_cluster:  # one that is not in cluster mode says so (ResponseError)
                client.execute_command("CLUSTER", "MYID")
            break
        except redis.AuthenticationError as exc:
            raise ServerProblem(describe_error(exc, url), lasting=True) from exc
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            if sentinel.refused_credentials(exc):
                raise ServerProblem(describe_error(exc, url), lasting=True) from exc
            if time.monotonic() + delay > deadline:
                raise ServerProblem(describe_error(exc, url), lasting=False) from exc
        except redis.ResponseError as exc:
            if _is_auth_error(exc):
                raise ServerProblem(describe_error(exc, url), lasting=True) from exc
            raise ServerProblem(f"{redact(url)} answers, but not as a Redis/Valkey server jobq "
                                f"can use: {scrub(str(exc), url)}", lasting=True) from exc
        except redis.RedisError as exc:  # InvalidResponse & co: it speaks another protocol
            raise ServerProblem(f"{redact(url)} is not a Redis/Valkey server (it does not "
                                "answer in the Redis protocol)", lasting=True) from exc
        finally:
            client.close()
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    numbers = tuple(int(p) if p.isdigit() else 0 for p in version.split(".")[:2])
    if version and numbers < MIN_REDIS:
        raise ServerProblem(f"{redact(url)} runs Redis {version}; jobq needs Redis "
                            f"{'.'.join(map(str, MIN_REDIS))} or later, or Valkey",
                            lasting=True)


#: How a server says it takes no writes now: out of memory (maxmemory, noeviction), a
#: replica, unable to persist (stop-writes-on-bgsave-error), or a primary with fewer
#: replicas than its min-replicas-to-write (cut off from them: see the README's Sentinel).
_REFUSED_WRITES = ("OOM ", "READONLY ", "MISCONF ", "command not allowed when used memory",
                   "NOREPLICAS ")


def refuses_writes(exc: BaseException) -> bool:
    """Whether ``exc`` is the server refusing writes for now: a condition of the server, to
    wait out, not a failure of what was sent."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError | redis.exceptions.ReadOnlyError):
        return True
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(_REFUSED_WRITES)


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the server cannot be used now (lost, timed out, refusing writes):
    a condition to wait out with back-off, keeping what was to be written."""
    return isinstance(exc, redis.ConnectionError | redis.TimeoutError | OSError) or \
        refuses_writes(exc)


def _version(client: redis.Redis) -> str:
    """The server's Redis version ("7.2.4"; Valkey reports the Redis version it matches), or
    "" when our user may not ask (an ACL without INFO): then it just has to answer PING."""
    try:
        return str(client.info("server").get("redis_version", "0"))
    except redis.ResponseError as exc:
        if not str(exc).startswith("NOPERM"):
            raise
    client.ping()
    return ""


def _is_auth_error(exc: BaseException) -> bool:
    if isinstance(exc, redis.AuthenticationError) or sentinel.refused_credentials(exc):
        return True
    text = str(exc)
    return isinstance(exc, redis.ResponseError) and text.startswith(("NOAUTH", "WRONGPASS"))


def _reason(exc: BaseException) -> str:
    """The most specific text: the OS error under a redis-py wrapper if there is one."""
    explained = sentinel.explain(exc)
    if explained is not None:
        return explained
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and not isinstance(cause, redis.RedisError):
            return cause.strerror or str(cause) or type(cause).__name__
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__
