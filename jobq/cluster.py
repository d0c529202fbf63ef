"""Redis/Valkey Cluster: the ``redis+cluster://`` URL, and clients that each talk to the primary
serving one hash slot.

::

    redis+cluster://[[user]:password@]host[:port][,host[:port]...][?options]
      │              │                   │
      │              │                   some nodes of the cluster (6379): any that answers
      │              │                   tells where the others are
      │              the nodes' credentials (an ACL user, or requirepass)
      rediss+ (TLS to every node); valkey+ and valkeys+ are aliases

Every key of a jobq namespace carries the namespace as its hash tag (``{jobq:etl}:jobs``, see
:mod:`jobq.keys`), so a namespace lives in one slot and its scripts stay atomic. On a Cluster,
each queue group is a namespace of its own (:meth:`jobq.config.Config.namespace`): the groups
spread over the shards, the queues of one group share a slot.

So a jobq client never needs redis-py's cluster client: it is a plain :class:`redis.Redis`
whose connections go to the primary serving its namespace's slot, asked of the cluster
(``CLUSTER SLOTS``) each time one connects. A reply that says the slot is elsewhere or not
served (``MOVED`` after a failover, ``ASK``/``TRYAGAIN`` while it migrates, ``CLUSTERDOWN``)
closes the connection and becomes a :class:`redis.ConnectionError`: the caller's usual
reconnect with back-off then asks the cluster again, as for a server that went away.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.connection import Connection, SSLConnection
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, TryAgainError
from redis.retry import Retry

from .urls import has_scheme, host_ports, node_options, split_nodes_url

#: URL scheme -> whether its connections use TLS.
SCHEMES = {"redis+cluster": False, "rediss+cluster": True,
           "valkey+cluster": False, "valkeys+cluster": True}
#: A node's port when the URL names none.
DEFAULT_PORT = 6379
#: Client options the slot lookups share with the data connections (timeouts, TLS, auth).
_SHARED_PREFIXES = ("socket_", "ssl", "username", "password")


@dataclass(frozen=True)
class ClusterTarget:
    """What a cluster URL names: some nodes, and the options of every connection to them."""

    nodes: list[tuple[str, int]]
    tls: bool
    #: username, password, TLS options, ...
    options: dict[str, Any] = field(default_factory=dict)


def is_cluster_url(url: str) -> bool:
    return has_scheme(url, SCHEMES)


def parse(url: str) -> ClusterTarget:
    """Read a cluster URL (see the module docstring); ValueError, without the password, if
    it is not one."""
    scheme, userinfo, hosts, path, query, where = split_nodes_url(url, SCHEMES, "cluster")
    if path.strip("/"):
        raise ValueError(f"{where}: a cluster has no databases but 0: nothing may follow the "
                         f"nodes but ?options, got /{path}")
    nodes = host_ports(hosts, where, DEFAULT_PORT, "no node address")
    options = node_options(userinfo, query, where)
    if options.get("db"):
        raise ValueError(f"{where}: a cluster has no databases but 0, got db={options['db']}")
    options.pop("db", None)
    return ClusterTarget(nodes, SCHEMES[scheme], options)


class SlotMap:
    """Where the primary of one slot is, asked of the cluster's nodes when a connection is
    made and forgotten when one fails; any node will do when ``slot`` is None."""

    def __init__(self, target: ClusterTarget, options: dict[str, Any], slot: int | None) -> None:
        self.slot = slot
        #: the URL's nodes first, then every node a lookup told of
        self.known = list(target.nodes)
        shared = {k: v for k, v in options.items() if k.startswith(_SHARED_PREFIXES)}
        if target.tls:
            shared["ssl"] = True
        # one answer per node: the next node is asked, the caller retries with back-off
        self._lookup = {**shared, "retry": Retry(NoBackoff(), 0), "decode_responses": True}
        self._address: tuple[str, int] | None = None

    def primary(self) -> tuple[str, int]:
        """The address of the primary serving the slot (a node that answers, with no slot);
        :class:`redis.ConnectionError` naming what each node said when none can tell."""
        address = self._address
        if address is not None:
            return address
        problems = []
        for host, port in list(self.known):
            node = redis.Redis(host=host, port=port, **self._lookup)
            try:
                if self.slot is None:
                    node.ping()
                    address = (host, port)
                else:
                    address = self._find(host, node.execute_command("CLUSTER", "SLOTS"))
            except (redis.RedisError, OSError) as exc:
                problems.append(f"{host}:{port}: {exc}")
                continue
            finally:
                node.close()
            if address is not None:
                self._address = address
                self.known.remove((host, port))  # asked first next time: it answers
                self.known.insert(0, (host, port))
                return address
            problems.append(f"{host}:{port}: no node serves slot {self.slot}")
        raise redis.ConnectionError("no node of the cluster tells where slot "
                                    f"{self.slot} is served ({'; '.join(problems)})")

    def forget(self) -> None:
        self._address = None

    def _find(self, asked: str, ranges: Any) -> tuple[str, int] | None:
        """The primary serving the slot in a CLUSTER SLOTS reply (learning every node)."""
        found = None
        for start, end, primary, *replicas in ranges:
            for node in (primary, *replicas):
                where = (str(node[0]) or asked, int(node[1]))  # '': the node asked
                if where[0] != "?" and where not in self.known:
                    self.known.append(where)
            if int(start) <= (self.slot or 0) <= int(end) and str(primary[0]) != "?":
                found = (str(primary[0]) or asked, int(primary[1]))
        return found


class SlotConnection(Connection):
    """A connection to whichever node its :class:`SlotMap` names when it connects (again)."""

    def __init__(self, **kwargs: Any) -> None:
        self.slot_map: SlotMap = kwargs.pop("slot_map")
        super().__init__(**kwargs)

    def connect_check_health(self, check_health: bool = True,
                             retry_socket_connect: bool = True) -> None:
        # every way to (re)connect comes here: connect(), and a command sent on a closed one
        if self._sock:
            return
        self.host, self.port = self.slot_map.primary()
        try:
            super().connect_check_health(check_health, retry_socket_connect)
        except (redis.ConnectionError, redis.TimeoutError):
            self.slot_map.forget()  # gone: ask again next time
            raise

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except (AskError, TryAgainError, ClusterDownError) as exc:  # MOVED is an AskError
            self.disconnect()
            self.slot_map.forget()
            raise redis.ConnectionError(f"slot {self.slot_map.slot} is not served at "
                                        f"{self.host}:{self.port} now: {exc}") from exc


class SlotSSLConnection(SlotConnection, SSLConnection):
    """:class:`SlotConnection` over TLS."""


def slot_client(url: str, options: dict[str, Any], route: str | None) -> redis.Redis:
    """A client of the primary serving the slot of key ``route`` (any node if None) on the
    cluster ``url`` names, with client ``options`` (timeouts, decoding; the URL's own options
    win). No connection is made yet."""
    target = parse(url)
    merged = {**options, **target.options}
    slot_map = SlotMap(target, merged, None if route is None else key_slot(route.encode()))
    host, port = target.nodes[0]
    pool = redis.ConnectionPool(
        connection_class=SlotSSLConnection if target.tls else SlotConnection,
        slot_map=slot_map, host=host, port=port, **merged)
    return redis.Redis(connection_pool=pool)


def slot_map_of(client: redis.Redis) -> SlotMap | None:
    """The slot map behind a client made by :func:`slot_client` (None for others)."""
    found = client.connection_pool.connection_kwargs.get("slot_map")
    return found if isinstance(found, SlotMap) else None
