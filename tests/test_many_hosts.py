"""Many hosts on one server, for real: each host is a network namespace (tests/netns.py) with
its own address and link to the server, running its own ``jobq-master`` under its own name.
A host is killed whole, cut off past its lease, and cut off while its scheduler leads; every
job is counted by its own records (the task RPUSHes its id on each run, with its host's name),
as test_chaos.py counts them.

Needs root and iproute2 (``ip netns``): elsewhere every test here is skipped, saying why.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jobq_testtasks as tasks
import netns
import psutil
import pytest
import redis
from conftest import Valkey, figure, subprocess_env, wait_dead, wait_until
from test_chaos import eventually, final_records, report, runs, tally, title, wait_finished

from jobq.job import Job
from jobq.keys import Keys
from jobq.queue import JobQueue
from jobq.scheduler import Scheduler

pytestmark = pytest.mark.chaos

KEYS = Keys()
#: What every host's master runs with (each test adds what its fault needs).
BASE_CONFIG: dict[str, Any] = {
    "lease_time": 2.0, "leader_lease": 1.0, "scheduler_tick": 0.2,
    "retry_backoff_base": 0.05, "retry_backoff_cap": 0.5, "retry_jitter": 0.0,
    "graceful_timeout": 5.0, "heartbeat_timeout": 30.0, "max_deliveries": 50,
    "log_level": "info",
}


class Hosts:
    """Hosts on one network, each running a ``jobq-master`` (``python -m jobq.cli.master``) in
    its namespace, named by ``hostname``, logging to ``<name>.log``."""

    def __init__(self, net: netns.Network, url: str, tmp_path: Path) -> None:
        self.net, self.url, self.tmp_path = net, url, tmp_path
        self.hosts: dict[str, netns.Host] = {}
        self.masters: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, workers: int = 2, **config: Any) -> subprocess.Popen[bytes]:
        host = self.net.add_host(name)
        self.hosts[name] = host
        path = self.tmp_path / f"{name}.toml"
        values = {**BASE_CONFIG, "log_file": str(self.log_path(name)), **config}
        path.write_text("".join(f"{k} = {v!r}\n" for k, v in values.items()))
        argv = [sys.executable, "-m", "jobq.cli.master", "-w", str(workers), "-I", "jobq_testtasks",
                "--config", str(path), "--hostname", name]
        with open(self.tmp_path / f"{name}.stderr", "wb") as err:
            proc = subprocess.Popen(host.command(argv), stdout=subprocess.DEVNULL, stderr=err,
                                    env=subprocess_env(JOBQ_REDIS_URL=self.url,
                                                       JOBQ_TEST_HOST=name),
                                    start_new_session=True)
        self.masters[name] = proc
        return proc

    def wait_ready(self, name: str, workers: int = 2, timeout: float = 30) -> None:
        proc = self.masters[name]

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"master of {name} exited: {self.log(name)[-3000:]}")
            try:
                kids = [title(p) for p in psutil.Process(proc.pid).children()]
            except psutil.NoSuchProcess:
                return False
            booted = [t for t in kids if "jobq worker" in t and "booting" not in t]
            return len(booted) == workers and any("jobq scheduler" in t for t in kids)

        wait_until(ready, timeout, interval=0.05, message=f"the master of {name} ready")

    def log_path(self, name: str) -> Path:
        return self.tmp_path / f"{name}.log"

    def log(self, name: str) -> str:
        text = ""
        for path in (self.log_path(name), self.tmp_path / f"{name}.stderr"):
            if path.exists():
                text += path.read_text()
        return text

    def kill(self, name: str) -> list[psutil.Process]:
        """SIGKILL every process of the host at once (the master's whole tree, and anything
        else in its namespace): nothing gets to give anything back. Returns them (dead, or
        about to be: wait for them with ``conftest.wait_dead``)."""
        return self.net.kill(self.hosts[name])


@pytest.fixture
def net() -> Iterator[netns.Network]:
    reason = netns.unavailable()
    if reason:
        pytest.skip(f"many-hosts tests need network namespaces: {reason}")
    network = netns.Network()
    try:
        yield network.open()
    finally:
        network.close()


@pytest.fixture
def server(net: netns.Network, tmp_path: Path) -> Iterator[str]:
    """A valkey-server listening on the network's server address (and on 127.0.0.1 for its
    start check); yields its URL."""
    valkey = Valkey(tmp_path / "server", None, "--bind", net.server_address, "127.0.0.1",
                    "--protected-mode", "no")
    valkey.start()
    try:
        yield f"redis://{net.server_address}:{valkey.port}"
    finally:
        valkey.kill()


@pytest.fixture
def hosts(net: netns.Network, server: str, tmp_path: Path) -> Iterator[Hosts]:
    h = Hosts(net, server, tmp_path)
    yield h  # net's teardown kills every process of every host


@pytest.fixture
def r(server: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server, decode_responses=True, socket_timeout=10)
    yield client
    client.close()


@pytest.fixture
def q(server: str) -> JobQueue:
    return JobQueue("default", redis_url=server)


def start_hosts(hosts: Hosts, names: list[str], workers: int, **config: Any) -> None:
    for name in names:
        hosts.start(name, workers, **config)
    for name in names:
        hosts.wait_ready(name, workers)


def held_by(r: redis.Redis, host: str) -> dict[str, list[str]]:
    """The jobs the server says the workers of ``host`` hold: {worker's held key: ids}."""
    return {name: r.hkeys(name) for name in r.scan_iter(f"{KEYS.base}:held:{host}.*")}


def ran_on(r: redis.Redis, key: str) -> dict[str, list[str]]:
    """Each job's runs, by the hosts that ran them, in order."""
    out: dict[str, list[str]] = {}
    for entry in r.lrange(f"test:{key}:host", 0, -1):
        job_id, host = entry.split()
        out.setdefault(job_id, []).append(host)
    return out


def completed_by(r: redis.Redis, ids: list[str]) -> dict[str, Any]:
    """The host each job's final record says completed it: the task's result (its host's
    name), which the worker's name in the record ("w": host.pid.slot...) must agree with."""
    out = {}
    for job_id, rec in final_records(r, ids).items():
        host = (rec or {}).get("res")
        worker = str((rec or {}).get("w", ""))
        out[job_id] = host if host and worker.startswith(f"{host}.") else None
    return out


def three_hosts_busy(hosts: Hosts, r: redis.Redis, q: JobQueue, config: dict[str, float], *,
                     jobs: int, seconds: float, runs_first: int) -> tuple[str, list[str]]:
    """Start host-a, host-b and host-c (2 workers each), enqueue ``jobs`` jobs of ``seconds``
    each, and wait until ``runs_first`` ran and host-c holds some: the moment to hurt it.
    Returns the jobs' record key and their ids."""
    start_hosts(hosts, ["host-a", "host-b", "host-c"], 2, **config)
    k = netns.secrets.token_hex(6)
    batch = [Job(tasks.hosts_record, (k, seconds), max_retries=10) for _ in range(jobs)]
    q.enqueue_many(batch)

    def victim_busy() -> bool:
        return len(runs(r, k)) >= runs_first and any(held_by(r, "host-c").values())

    wait_until(victim_busy, 30, interval=0.005,
               message=f"{runs_first} runs, host-c holding jobs")
    return k, [j.id for j in batch]


# == 1. a whole host killed =======================================================================

def test_a_host_killed_whole_its_jobs_come_back_within_the_lease_and_complete_elsewhere(
        hosts: Hosts, r: redis.Redis, q: JobQueue) -> None:
    config = {"lease_time": 2.0, "leader_lease": 1.0, "scheduler_tick": 0.2}
    k, ids = three_hosts_busy(hosts, r, q, config, jobs=3000, seconds=0.002, runs_first=600)
    victims = hosts.kill("host-c")
    killed_at = time.monotonic()
    held = held_by(r, "host-c")  # at once: the lease (2 s) may lapse while init reaps them
    wait_dead(victims)
    for name, ids_ in held_by(r, "host-c").items():  # a claim sent just before the kill may
        held.setdefault(name, []).extend(ids_)        # land after the first look
    interrupted = sorted({job_id for ids_ in held.values() for job_id in ids_})
    assert len(victims) == 4, [v.pid for v in victims]  # master, 2 workers, scheduler
    assert interrupted, "host-c held no job when it was killed"

    wait_until(lambda: not any(r.exists(name) for name in held), 30, interval=0.01,
               message="host-c's jobs given back")
    back_after = time.monotonic() - killed_at
    finished = wait_finished(r, ids, 60)
    t = tally(r, ids, k)
    done_by = completed_by(r, interrupted)
    stats = q.get_stats()
    bound = config["lease_time"] + config["scheduler_tick"]
    report("SIGKILL every process of one host of 3 (2 workers each)", 1, t, back_after,
           interrupted=len(interrupted), bound_s=bound, hosts=3)
    assert finished, str(t)
    assert t.lost == 0 and t.failed == 0, str(t)
    assert stats["completed"] == len(ids) and stats["enqueued"] == len(ids), stats
    # only the jobs host-c held ran again, each at most once, and on another host
    assert set(t.twice_ids) <= set(interrupted) and t.twice <= len(interrupted), str(t)
    assert all(done_by[j] in ("host-a", "host-b") for j in interrupted), done_by
    # how soon they came back (within the lease and a tick: every scheduler reaps) is
    # reported above, not asserted: a test does not time a shared machine


# == 2. a host cut off past its lease ===========================================================

def test_a_host_cut_off_past_its_lease_its_jobs_run_elsewhere_and_its_late_results_drop(
        hosts: Hosts, net: netns.Network, r: redis.Redis, q: JobQueue) -> None:
    config = {"lease_time": 2.0, "leader_lease": 1.0, "scheduler_tick": 0.2}
    k, ids = three_hosts_busy(hosts, r, q, config, jobs=1500, seconds=0.003, runs_first=300)
    cut = hosts.hosts["host-c"]
    net.cut(cut)
    cut_at = time.monotonic()
    try:
        # what host-c holds, as the server sees it until it gives them back: a claim of
        # host-c's sent before the cut may land after a first look (its reply already on
        # its way), so every look counts
        seen: set[str] = set()

        def given_back() -> bool:
            held = held_by(r, "host-c")
            seen.update(job_id for ids_ in held.values() for job_id in ids_)
            return not any(held.values())

        wait_until(given_back, 30, interval=0.01, message="host-c's jobs given back")
        back_after = time.monotonic() - cut_at
        interrupted = sorted(seen)
        assert interrupted, "host-c held no job when it was cut off"
        # they run elsewhere while host-c is still cut off
        wait_until(lambda: all(completed_by(r, interrupted).values()), 30, interval=0.02,
                   message="host-c's jobs completed elsewhere")
    finally:
        net.heal(cut)
    cut_for = time.monotonic() - cut_at

    finished = wait_finished(r, ids, 60)
    log = hosts.log("host-c")
    noticed = eventually(lambda: "leases lapsed" in hosts.log("host-c"), 30)
    log = hosts.log("host-c")
    t = tally(r, ids, k)
    done_by = completed_by(r, ids)
    stats = q.get_stats()
    report("one host of 3 cut off (link down) past its lease, then back", 1, t, back_after,
           interrupted=len(interrupted), cut_for_s=round(cut_for, 2), hosts=3)
    assert finished, str(t)
    # what jobq promises: none lost, and one final record each, completed once (counted once
    # by the server); a job may have run twice (at-least-once): only those host-c held
    assert t.lost == 0 and t.failed == 0, str(t)
    assert stats["completed"] == len(ids) and stats["enqueued"] == len(ids), stats
    assert stats["pending"] == stats["processing"] == 0, stats
    assert set(t.twice_ids) <= set(interrupted), str(t)
    # the jobs host-c held were completed elsewhere; its own late results were dropped
    assert all(done_by[j] in ("host-a", "host-b") for j in interrupted), \
        {j: done_by[j] for j in interrupted}
    assert noticed, f"host-c's master did not say its leases lapsed: {log[-3000:]}"
    # host-c's workers drop their results of the jobs they ran that were given back (the runs
    # host-c recorded; a run blocked by the cut in the task's own write lands later, its result
    # after it); a job in a claim's reply that the cut lost never ran there and has no result
    # to drop, and acks sent again after a lost reply are not taken for stale
    def dropped_ids() -> set[str]:
        return {i for line in re.findall(r"dropped: given back when their lease lapsed.*\((.*)\)",
                                         hosts.log("host-c")) for i in line.split(", ")}

    def ran_by_c() -> set[str]:
        runs = ran_on(r, k)
        return {j for j in interrupted if "host-c" in runs.get(j, [])}

    eventually(lambda: ran_by_c() <= dropped_ids(), 30)
    ran_there, dropped, log = ran_by_c(), dropped_ids(), hosts.log("host-c")
    assert dropped <= set(interrupted) and ran_there <= dropped, \
        (dropped, ran_there, interrupted, log[-3000:])
    figure(f"host-c's late results: {len(dropped)} dropped, of {len(ran_there)} jobs it ran "
           f"that were given back ({len(interrupted)} it held)")
    # and host-c works again once it is back
    more = [Job(tasks.hosts_record, (k, 0.003)) for _ in range(300)]
    q.enqueue_many(more)
    assert wait_finished(r, [j.id for j in more], 30)
    assert "host-c" in {h for j in more for h in ran_on(r, k).get(j.id, [])}


# == 3. the scheduler leader's host cut off =====================================================

def test_the_leaders_host_cut_off_another_host_leads_and_no_fire_is_missed_or_doubled(
        hosts: Hosts, net: netns.Network, r: redis.Redis, q: JobQueue) -> None:
    config = {"lease_time": 2.0, "leader_lease": 1.0, "scheduler_tick": 0.2}
    names = ["host-a", "host-b", "host-c"]
    start_hosts(hosts, names, 1, **config)
    k = netns.secrets.token_hex(6)
    interval = 0.5
    Scheduler(q).schedule_interval("hosts-tick", "jobq_testtasks:hosts_record", interval,
                                   args=(k,))
    wait_until(lambda: len(runs(r, k)) >= 3, 20, message="three fires")

    def leader() -> str | None:
        token = r.get(KEYS.sched_leader)
        return token.split(".", 1)[0] if token else None

    first = wait_until(leader, 10, message="a leader")
    cut = hosts.hosts[first]
    net.cut(cut)
    cut_at = time.monotonic()
    try:
        second = wait_until(lambda: (lambda h: h if h and h != first else None)(leader()), 20,
                            interval=0.01, message="another host to lead")
        failover = time.monotonic() - cut_at
        count = len(set(runs(r, k)))
        wait_until(lambda: len(set(runs(r, k))) >= count + 4, 20, message="fires after it")
    finally:
        net.heal(cut)
    count = len(set(runs(r, k)))
    wait_until(lambda: len(set(runs(r, k))) >= count + 4, 20,
               message="fires after the old leader's host came back")
    assert Scheduler(q).pause("hosts-tick")
    wait_until(lambda: (lambda s: s["pending"] == 0 and s["processing"] == 0)(q.get_stats()),
               30, message="the fired jobs to finish")

    ran = Counter(runs(r, k))
    dues = sorted(int(job_id.rsplit("@", 1)[1]) for job_id in ran)
    step = int(interval * 1000)
    expected = list(range(dues[0], dues[-1] + 1, step))
    missing = sorted(set(expected) - set(dues))
    stats = q.get_stats()
    records = final_records(r, list(ran))
    report(f"the scheduler leader's host cut off (1 of 3), interval {interval} s, "
           f"leader_lease {config['leader_lease']} s", 1,
           tally(r, list(ran), k), failover, fires=len(ran), missing=len(missing))
    assert second != first
    assert failover < config["leader_lease"] + config["scheduler_tick"] + 1.0, failover
    assert len(expected) >= 10, expected
    assert not missing, f"due times never fired: {missing}"
    assert stats["enqueued"] == len(ran), stats  # each due time enqueued (fired) once
    assert stats["completed"] == len(ran), stats
    assert all((rec or {}).get("s") == "completed" for rec in records.values()), records
