"""Connecting to Redis/Valkey from a URL, and talking about URLs without leaking secrets."""

from __future__ import annotations

import re
import weakref
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import redis

if TYPE_CHECKING:
    from jobq.config import Config

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

#: Query parameters whose values are secrets (``?password=`` is redis-py's unix-socket form).
_SECRET_PARAM_RE = re.compile(r"([?&;][^=&#?;]*(?:pass|secret|token)[^=&#?;]*=)[^&#;]*", re.I)


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


def redact(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (the user name is kept).

    Everything before the last ``@`` counts as credentials, so a password with an unescaped
    ``/``, ``?`` or ``@`` is still hidden. Never raises.
    """
    try:
        text = str(url)
        text = _SECRET_PARAM_RE.sub(r"\1***", text)
        scheme, sep, rest = text.partition("://")
        if not sep or "@" not in rest:
            return text
        userinfo, _, hostpart = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        return f"{scheme}://{user}{':***' if colon else ''}@{hostpart}"
    except Exception:  # redaction must never be the thing that fails
        return "<unprintable url>"


def describe_error(exc: BaseException, url: str) -> str:
    """One line explaining a connection or authentication failure, without the password."""
    where = redact(url)
    if _is_auth_error(exc):
        line = f"authentication failed for {where}: {_reason(exc)}"
    elif isinstance(exc, redis.ConnectionError | redis.TimeoutError | OSError):
        line = f"cannot connect to {where}: {_reason(exc)}"
    else:
        line = f"error talking to {where}: {type(exc).__name__}: {_reason(exc)}"
    return _scrub(line, url)


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


def resolve_url(cfg: Config) -> str:
    """The URL to use for ``cfg``: ``cfg.redis_url``, else the embedded server (started if
    needed)."""
    if cfg.redis_url:
        return cfg.redis_url
    from jobq.server import ensure_server  # lazy: only the embedded case needs it

    return ensure_server()


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


def _scrub(line: str, url: str) -> str:
    """Collapse to one line and remove any secret of ``url``, should a library echo one."""
    line = " ".join(line.split())
    for secret in _secrets(url):
        line = line.replace(secret, "***")
    return line


def _secrets(url: str) -> list[str]:
    """The password and secret query values of ``url``, raw and percent-decoded."""
    rest = url.partition("://")[2]
    found = [rest.rpartition("@")[0].partition(":")[2]]
    found += [m.group(0)[len(m.group(1)):] for m in _SECRET_PARAM_RE.finditer(url)]
    found += [unquote(s) for s in found]
    # Replacing a one- or two-letter string would garble the message more than it protects.
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)
