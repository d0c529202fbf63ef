"""Many hosts on one server, without network namespaces: each host's name (``hostname``), and
what ``jobq info`` shows of every host's master: alive, gone once its lease lapsed, then
forgotten. (test_many_hosts.py makes real hosts out of network namespaces.)"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jobq_testtasks as tasks
import pytest
import redis
from click.testing import CliRunner
from conftest import figure, process_tree, subprocess_env, wait_dead, wait_until

from jobq import serialization
from jobq.cli import main
from jobq.config import ConfigError, host_name, load_config
from jobq.info import FORGOTTEN_LEASES, MASTER_FORGOTTEN, MASTER_STALE, master_state
from jobq.queue import JobQueue
from jobq.scheduler_daemon import SchedulerProcess

Spawn = Callable[..., subprocess.Popen[str]]


# -- the host's name ---------------------------------------------------------------------------

def test_hostname_names_the_host_else_the_machine_does() -> None:
    assert host_name(load_config(hostname="rack3-b")) == "rack3-b"
    assert host_name(load_config(hostname="rack3-b"), short=False) == "rack3-b"
    machine = host_name(load_config())
    assert machine and "." not in machine
    for bad in ("a.b", "with space", "x" * 64, "a:b"):
        with pytest.raises(ConfigError, match="hostname: expected a host name"):
            load_config(hostname=bad)


# -- alive, gone, forgotten (pure) ---------------------------------------------------------------

def test_a_master_is_gone_after_its_lease_and_forgotten_40_leases_later() -> None:
    now = 10_000.0

    def state(age: float, lease: float | None) -> str:
        described: dict[str, Any] = {"ts": now - age}
        if lease is not None:
            described["lease_time"] = lease
        return master_state(described, now)

    # lease + two heartbeats (2 s each): 19 s with the default lease of 15 s
    assert state(18.9, 15.0) == "alive" and state(19.1, 15.0) == "gone"
    assert state(5.9, 2.0) == "alive" and state(6.1, 2.0) == "gone"
    # forgotten 40 leases after its last heartbeat: 10 minutes at the default lease, at most
    assert state(599, 15.0) == "gone" and state(601, 15.0) == "forgotten"
    assert state(FORGOTTEN_LEASES * 0.5 - 1, 0.5) == "gone"
    assert state(FORGOTTEN_LEASES * 0.5 + 1, 0.5) == "forgotten"
    assert state(MASTER_FORGOTTEN - 1, 300.0) == "gone"
    assert state(MASTER_FORGOTTEN + 1, 300.0) == "forgotten"
    # a description without its lease (an older master): the fixed times
    assert state(MASTER_STALE - 0.1, None) == "alive" and state(MASTER_STALE + 0.1, None) == "gone"
    assert state(MASTER_FORGOTTEN + 1, None) == "forgotten"


def test_the_leader_forgets_a_master_gone_for_40_leases(redis_url: str) -> None:
    config = load_config(redis_url=redis_url, lease_time=1.0)
    scheduler = SchedulerProcess(config, redis_url)
    now = time.time()
    for mid, age in (("host-a.1", 0.0), ("host-b.2", 10.0), ("host-c.3", 41.0)):
        scheduler.broker.describe_master(mid, serialization.dumps(
            {"host": mid.split(".")[0], "ts": now - age, "lease_time": 1.0, "workers": []}), 5)
    scheduler.drop_orphaned_schedules(now)
    assert sorted(scheduler.broker.masters()) == ["host-a.1", "host-b.2"]  # gone, still shown


# -- jobq info, with real masters ------------------------------------------------------------------

def jobq_info(redis_url: str, *args: str) -> str:
    result = CliRunner().invoke(main, ["--redis-url", redis_url, "info", *args])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout


def start_host(spawn: Spawn, tmp_path: Path, name: str, **config: Any) -> subprocess.Popen[str]:
    """A master that goes by ``name``, as one would on a host of that name."""
    path = tmp_path / f"{name}.toml"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in config.items()))
    return spawn("-I", "jobq_testtasks", "-w", "1", "--hostname", name, "--config", str(path),
                 env=subprocess_env(), module="jobq.cli.master")


def test_info_shows_every_hosts_master_and_work_then_a_vanished_host_gone_then_forgotten(
        redis_url: str, queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    lease = 0.4  # gone 4.4 s after its last heartbeat
    config = {"lease_time": lease, "scheduler_tick": 0.1, "leader_lease": 1.0,
              "retry_backoff_base": 0.05, "retry_jitter": 0.0}
    hosts = {name: start_host(spawn, tmp_path, name, **config) for name in ("host-a", "host-b")}
    jobs = [queue.enqueue(tasks.sleep, 30, max_retries=5) for _ in range(2)]

    def both_busy() -> dict[str, Any] | None:
        data = json.loads(jobq_info(redis_url, "--json"))
        by_host = {m["host"]: m for m in data["masters"]}
        running = {w.get("job") for m in by_host.values() for w in m["workers"]}
        if set(by_host) == set(hosts) and running == {j.id for j in jobs}:
            return by_host
        return None

    by_host = wait_until(both_busy, 30, interval=0.1, message="both hosts running a job")
    text = jobq_info(redis_url)
    for name, proc in hosts.items():
        m = by_host[name]
        assert m["id"] == f"{name}.{proc.pid}" and m["state"] == "alive"
        [w] = m["workers"]
        assert w["name"].startswith(f"{name}.{proc.pid}.0.") and w["state"] == "busy"
        assert f"master {m['id']} on {name}: 1/1 workers, queues default\n" in text
        assert w["job"] in text
    leader = json.loads(jobq_info(redis_url, "--json"))["scheduler_leader"]
    assert leader.split(".")[0] in hosts

    victim = hosts["host-b"]
    victim_id = by_host["host-b"]["id"]
    procs = process_tree(victim.pid)
    for p in procs:  # the whole host at once: nothing gets to say goodbye
        p.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    wait_dead(procs)

    def shown(state: str) -> bool:
        masters = {m["id"]: m for m in json.loads(jobq_info(redis_url, "--json"))["masters"]}
        return masters.get(victim_id, {}).get("state") == state

    assert shown("alive") or shown("gone")
    wait_until(lambda: shown("gone"), 15, interval=0.1, message="host-b shown as gone")
    gone_after = time.monotonic() - killed
    assert gone_after >= lease  # never before its lease lapsed
    text = jobq_info(redis_url)
    assert f"master {victim_id} on host-b: 1/1 workers, queues default  (gone: " in text
    assert f"master {by_host['host-a']['id']} on host-a: 1/1 workers, queues default\n" in text
    # its job comes back and runs on host-a (which is busy with its own: it is pending)
    victim_job = by_host["host-b"]["workers"][0]["job"]
    # (a job given back to run again is "retry": pending, not for the first time)
    wait_until(lambda: queue.get_status(victim_job) == "retry"
               and queue.get_stats()["pending"] == 1, 15, message="host-b's job given back")

    # forgotten FORGOTTEN_LEASES leases after its last heartbeat (the rule is
    # master_state's, tested above with a fake clock): here its heartbeat is aged past that
    # on the server rather than waited for, and jobq info leaves it out
    assert victim_id in jobq_info(redis_url)
    beat = json.loads(r.hget("{jobq}:masters", victim_id))
    beat["ts"] = time.time() - FORGOTTEN_LEASES * lease - 1
    r.hset("{jobq}:masters", victim_id, json.dumps(beat))
    assert victim_id not in jobq_info(redis_url)
    assert [m["host"] for m in json.loads(jobq_info(redis_url, "--json"))["masters"]] == \
        ["host-a"]
    figure(f"hosts: a killed host's master shown as gone {gone_after:.1f} s after the kill "
           f"(lease {lease} s)")
