"""Connecting to Redis/Valkey from a URL, and talking about URLs without leaking secrets."""

from __future__ import annotations

import weakref
from typing import Any

import redis

from .urls import redact, scrub

#: URL scheme -> the scheme redis-py understands; ``valkey(s)://`` are aliases.
SCHEMES = {
    "redis": "redis",
    "rediss": "rediss",
    "unix": "unix",
    "valkey": "redis",
    "valkeys": "rediss",
}
#: Client defaults; any of them can be overridden through ``connect(**kw)``.
DEFAULTS: dict[str, Any] = {
    "health_check_interval": 30,
    "retry_on_timeout": False,
    # No read timeout: redis-py's default (5 s) would break BLPOP & co. blocking for longer.
    # A dead TCP peer is caught by keepalive and the health check instead.
    "socket_timeout": None,
    "socket_connect_timeout": 5,
}
#: Added for TCP URLs only: redis-py's unix socket connection rejects it.
TCP_DEFAULTS: dict[str, Any] = {"socket_keepalive": True}



def connect(url: str, *, decode_responses: bool = True, **kw: Any) -> redis.Redis:
    """Return a client for ``url`` (``redis://``, ``rediss://``, ``unix://``, ``valkey[s]://``).

    Query parameters (``db``, ``ssl_cert_reqs``, ``ssl_ca_certs``, ...) pass through to
    redis-py's ``from_url``; ``kw`` overrides :data:`DEFAULTS`. No connection is made yet.
    """
    scheme, sep, rest = url.partition("://")
    target = SCHEMES.get(scheme.lower()) if sep else None
    if target is None:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise ValueError(f"unsupported redis URL {redact(url)!r}: expected one of {known}")
    options = {**DEFAULTS, "decode_responses": decode_responses}
    if target != "unix":
        options.update(TCP_DEFAULTS)
    options.update(kw)
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
        except Exception:
            pass


def describe_error(exc: BaseException, url: str) -> str:
    """One line explaining a connection or authentication failure, without the password."""
    where = redact(url)
    if _is_auth_error(exc):
        line = f"authentication failed for {where}: {_reason(exc)}"
    elif isinstance(exc, redis.ConnectionError | redis.TimeoutError | OSError):
        line = f"cannot connect to {where}: {_reason(exc)}"
    else:
        line = f"error talking to {where}: {type(exc).__name__}: {_reason(exc)}"
    return scrub(line, url)


def refused_credentials(url: str) -> str | None:
    """One line (password hidden) if the server at ``url`` refuses our credentials, else None;
    also None when it cannot be reached (long-running processes wait for the server)."""
    client = connect(url)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        return describe_error(exc, url) if _is_auth_error(exc) else None
    finally:
        client.close()
    return None


def _is_auth_error(exc: BaseException) -> bool:
    if isinstance(exc, redis.AuthenticationError):
        return True
    text = str(exc)
    return isinstance(exc, redis.ResponseError) and text.startswith(("NOAUTH", "WRONGPASS"))


def _reason(exc: BaseException) -> str:
    """The most specific text: the OS error under a redis-py wrapper if there is one."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and not isinstance(cause, redis.RedisError):
            return cause.strerror or str(cause) or type(cause).__name__
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__
