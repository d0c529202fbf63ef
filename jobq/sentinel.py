"""Redis/Valkey behind Sentinel: the ``redis+sentinel://`` URL, and a client that always talks
to the current primary.

::

    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db][?options]
      │               │                   │                         │
      │               │                   the sentinels (26379)      the name they monitor
      │               the data nodes' credentials (primary, replicas; an ACL user or
      │               requirepass)
      rediss+ (TLS to every node, sentinels too); valkey+ and valkeys+ are aliases

Options: ``sentinel_username`` and ``sentinel_password`` (the sentinels' own credentials,
when they have ``requirepass``), ``db``, and what redis-py's URLs take (``ssl_ca_certs``,
``ssl_cert_reqs``, ...). Discovery and failover are redis-py's
(:class:`redis.sentinel.Sentinel`, :class:`~redis.sentinel.SentinelConnectionPool`): a new
connection asks the sentinels for the primary's address; a connection to a node that is no
longer the primary fails (READONLY becomes a ConnectionError) and the caller's usual
reconnect with back-off finds the new one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import redis
from redis.backoff import NoBackoff
from redis.connection import SSLConnection
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelManagedConnection

from .urls import has_scheme, host_ports, node_options, split_nodes_url

#: URL scheme -> whether its connections use TLS.
SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True,
           "valkey+sentinel": False, "valkeys+sentinel": True}
#: The sentinels' port when a host names none.
DEFAULT_PORT = 26379
#: Query options for the sentinels themselves, not for the data nodes.
SENTINEL_OPTIONS = {"sentinel_username": "username", "sentinel_password": "password"}
#: Client options the sentinels' connections share with the data nodes' (timeouts, TLS).
_SHARED_PREFIXES = ("socket_", "ssl")


@dataclass(frozen=True)
class SentinelTarget:
    """What a sentinel URL names: the sentinels, the service, and the options of the
    connections to the data nodes and to the sentinels."""

    sentinels: list[tuple[str, int]]
    service: str
    tls: bool
    #: for the primary's connections: db, username, password, TLS options, ...
    options: dict[str, Any] = field(default_factory=dict)
    #: for the sentinels' connections: their own username and password
    sentinel_options: dict[str, Any] = field(default_factory=dict)


def is_sentinel_url(url: str) -> bool:
    return has_scheme(url, SCHEMES)


def parse(url: str) -> SentinelTarget:
    """Read a sentinel URL (see the module docstring); ValueError, without the password, if
    it is not one."""
    scheme, userinfo, hosts, path, query, where = split_nodes_url(url, SCHEMES, "sentinel")
    service, _, db = path.partition("/")
    if not service:
        raise ValueError(f"{where}: no service name: expected .../SERVICE, the name the "
                         "sentinels monitor (sentinel monitor SERVICE ...)")
    sentinels = host_ports(hosts, where, DEFAULT_PORT, "no sentinel host")
    options = node_options(userinfo, query, where)
    sentinel_options = {SENTINEL_OPTIONS[k]: options.pop(k) for k in list(options)
                        if k in SENTINEL_OPTIONS}
    if db and "db" not in options:
        if not db.strip("/").isdigit():
            raise ValueError(f"{where}: the database after the service must be a number, "
                             f"got {db!r}")
        options["db"] = int(db.strip("/"))
    tls = SCHEMES[scheme]
    return SentinelTarget(sentinels, unquote(service), tls, options, sentinel_options)


class PrimaryConnection(SentinelManagedConnection):
    """A connection to the service's primary that asks the sentinels where it is whenever
    it connects again.

    redis-py's own asks only when the pool hands it out: one that reconnects by itself (a
    command sent on it after it was closed, as on the connection jobq's scripts keep) goes
    back to the address it had, the dead primary's, forever (redis-py issue #3874)."""

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if self._sock is None:
            self.connect()  # through the sentinels
        super().send_packed_command(command, check_health)


class PrimarySSLConnection(PrimaryConnection, SSLConnection):
    """:class:`PrimaryConnection` over TLS (as redis-py's SentinelManagedSSLConnection)."""


def master_client(url: str, options: dict[str, Any]) -> redis.Redis:
    """A client of the current primary of the service ``url`` names, with client
    ``options`` (timeouts, decoding; the URL's own options win, as in redis-py's URLs).
    No connection is made yet."""
    target = parse(url)
    primary = {**options, **target.options}
    shared = {k: v for k, v in primary.items() if k.startswith(_SHARED_PREFIXES)}
    if target.tls:
        shared["ssl"] = True
    # no retry in redis-py: a sentinel that refuses or is gone is one answer, the next one is
    # asked (redis-py's default for a client made this way retries 3 times, up to 7 s)
    shared["retry"] = Retry(NoBackoff(), 0)
    sentinel = Sentinel(target.sentinels, sentinel_kwargs={**shared, **target.sentinel_options})
    return sentinel.master_for(target.service, **primary, connection_class=(
        PrimarySSLConnection if target.tls else PrimaryConnection))


def sentinels_of(client: redis.Redis) -> list[redis.Redis]:
    """The sentinel clients behind a client made by :func:`master_client` (none for others)."""
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    return list(manager.sentinels) if isinstance(manager, Sentinel) else []


def refused_credentials(exc: BaseException) -> bool:
    """Whether no primary was found because the sentinels refused our credentials (redis-py
    reports that as "no master found", which waiting would not cure)."""
    text = str(exc)
    return isinstance(exc, MasterNotFoundError) and (
        "AuthenticationError" in text or "WRONGPASS" in text or "invalid username-password"
        in text)


#: In redis-py's "no master found" message: one sentinel's address and what went wrong with it
#: (after the repr of its client, which is long and says nothing more).
_SENTINEL_ERROR = re.compile(r"host=([^,>]+),port=(\d+).*?\)> - (.*?)(?=, <redis\.|$)")


def explain(exc: BaseException) -> str | None:
    """A short reason for redis-py's MasterNotFoundError (None for another error): what each
    sentinel said, or that those that answered know no live primary."""
    if not isinstance(exc, MasterNotFoundError):
        return None
    text = str(exc)
    service = text.partition(" : ")[0].removeprefix("No master found for ")
    errors = [f"{host}:{port}: {error}" for host, port, error in _SENTINEL_ERROR.findall(text)]
    if not errors:
        return (f"the sentinels know no live primary of {service} (it is down and not yet "
                "replaced, or they do not monitor it)")
    return f"no sentinel named a primary of {service} ({'; '.join(errors)})"
