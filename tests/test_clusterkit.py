"""The test harness of tests/clusterkit.py against the real thing: a Valkey Cluster forms
from the bare binary, and a killed primary's replica takes over its slots with its data."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest
import redis
from conftest import figure

if TYPE_CHECKING:  # imported by pytest_plugins, first: so that its asserts are rewritten
    from clusterkit import Cluster

pytest_plugins = ["clusterkit"]


def test_a_cluster_forms_three_primaries_with_a_replica_each_over_every_slot(
        cluster: Cluster) -> None:
    primaries = cluster.primaries()
    assert len(primaries) == 3 and len(cluster.nodes) == 6
    for primary in primaries:
        replicas = cluster.replicas_of(primary)
        assert [r.role for r in replicas] == ["replica"]
        assert replicas[0].info("replication")["master_link_status"] == "up"
    # every node gives the same map: three ranges, end to end, each with its replica
    ranges = cluster.slot_map()
    assert ranges is not None and [(first, last) for first, last, _, _ in ranges] == \
        [(0, 5460), (5461, 10921), (10922, 16383)]
    assert sum(last - first + 1 for first, last, _, _ in ranges) == 16384
    assert [primary for _, _, primary, _ in ranges] == [p.port for p in primaries]
    for node in cluster.nodes:
        info = node.client.execute_command("CLUSTER", "INFO")
        assert "cluster_state:ok" in info and "cluster_known_nodes:6" in info
    assert cluster.url == "redis+cluster://" + ",".join(
        f"127.0.0.1:{n.port}" for n in cluster.nodes)
    assert {n.url for n in cluster.nodes} == {f"redis://127.0.0.1:{n.port}" for n in cluster.nodes}

    # redis-py's cluster client, given one node, finds the rest and routes by slot
    client = cluster.client()
    try:
        for i in range(30):
            client.set(f"k{i}", f"v{i}")
        assert [client.get(f"k{i}") for i in range(30)] == [f"v{i}" for i in range(30)]
    finally:
        client.close()
    for key in ("k7", "job:{q1}:a", "job:{q1}:b"):
        owner = cluster.primary_for_key(key)
        assert cluster.slot_of(key) == owner.client.execute_command("CLUSTER", "KEYSLOT", key)
        if key == "k7":
            assert owner.client.get(key) == "v7"  # on that node itself: no MOVED
    assert cluster.slot_of("job:{q1}:a") == cluster.slot_of("job:{q1}:b")


@pytest.mark.chaos
def test_a_killed_primarys_replica_takes_its_slots_and_has_what_it_confirmed(
        cluster: Cluster) -> None:
    key = "job:{failover}:1"
    primary = cluster.primary_for_key(key)
    [replica] = cluster.replicas_of(primary)
    primary.client.set(key, "confirmed")
    assert primary.client.execute_command("WAIT", 1, 1000) == 1

    started = time.monotonic()
    cluster.kill(primary)
    assert primary.role == "down"
    heir = cluster.wait_failover(primary)
    figure(f"cluster failover after SIGKILL of a primary (node timeout "
           f"{cluster.node_timeout} ms): {time.monotonic() - started:.2f} s")

    assert heir is replica and heir.role == "primary"
    assert heir.client.get(key) == "confirmed"  # the slot is its own now: no MOVED
    assert cluster.primary_for_key(key) is heir
    assert len(cluster.primaries()) == 3 and cluster.replicas_of(heir) == []
    for node in cluster.live_nodes():
        assert "cluster_state:ok" in node.client.execute_command("CLUSTER", "INFO")
    client = cluster.client()
    try:
        assert client.get(key) == "confirmed"
        client.set(key, "after")
    finally:
        client.close()
    assert heir.client.get(key) == "after"


def test_a_failed_start_kills_every_node_and_names_the_logs(tmp_path_factory:
                                                            pytest.TempPathFactory) -> None:
    """A node that cannot start (a bad option) fails ``start()`` quickly, with no node left."""
    from clusterkit import Cluster

    cluster = Cluster(tmp_path_factory.mktemp("ck"), 1, 1, "--no-such-option", "x")
    with pytest.raises(AssertionError, match="exited"):
        cluster.start()
    assert not cluster.live_nodes()
    assert "no-such-option" in cluster.nodes[0].log.read_text()
    for node in cluster.nodes:
        with pytest.raises(redis.ConnectionError):
            node.client.ping()
