"""jobq on a Redis/Valkey Cluster: ``redis+cluster://`` URLs, queue groups as namespaces of
their own (one hash slot each), and a real cluster (tests/clusterkit.py: three primaries, a
replica each) losing a primary while jobs flow, every job counted."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jobq_testtasks as tasks
import psutil
import pytest
import redis
from conftest import figure, kill_processes, subprocess_env, wait_until
from redis.crc import key_slot

from jobq import cluster
from jobq.config import Config, ConfigError, load_config
from jobq.connection import connect
from jobq.exceptions import ReplicationTimeout
from jobq.job import Job, JobStatus
from jobq.keys import Keys
from jobq.queue import JobQueue
from jobq.schedule import ScheduleError
from jobq.scheduler import Scheduler, config_schedules

if TYPE_CHECKING:  # imported by pytest as a plugin, below: not before, or it warns
    from clusterkit import Cluster

pytest_plugins = ["clusterkit"]

SEED = "redis+cluster://127.0.0.1:7000"


# -- URLs and queue groups: no server needed -------------------------------------------------

def test_a_cluster_url_names_nodes_credentials_and_tls() -> None:
    target = cluster.parse("redis+cluster://app:s3cret@10.0.0.1,10.0.0.2:7001?socket_timeout=3")
    assert target.nodes == [("10.0.0.1", 6379), ("10.0.0.2", 7001)]
    assert target.options == {"username": "app", "password": "s3cret", "socket_timeout": 3.0}
    assert not target.tls
    assert cluster.parse("valkeys+cluster://[::1]:7000").tls
    assert cluster.parse("valkeys+cluster://[::1]:7000").nodes == [("::1", 7000)]


@pytest.mark.parametrize(("url", "problem"), [
    ("redis+cluster://:pw@/", "no node address"),
    ("redis+cluster://:s3cret@h1:port", "bad node address"),
    ("redis+cluster://:s3cret@h1:7000/2", "no databases but 0"),
    ("redis+cluster://:s3cret@h1:7000?db=3", "no databases but 0"),
    ("redis+cluster://:s3?cret@h1:port", "bad node address 'h1:port'"),  # '?' in a password
])
def test_a_bad_cluster_url_is_one_clear_error_without_its_password(url: str,
                                                                   problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as info:
        cluster.parse(url)
    assert "s3cret" not in str(info.value)


def test_one_server_keeps_one_namespace_whatever_the_groups() -> None:
    config = Config(queue_groups={"etl": ["extract", "load"]}, queues=["extract", "mail"])
    assert config.namespace() == "jobq"  # the single-server layout, unchanged
    assert Config(redis_url="redis+sentinel://h/svc", queues=["a", "b"]).namespace() == "jobq"


def test_on_a_cluster_each_queue_group_is_a_namespace_of_its_own() -> None:
    config = Config(redis_url=SEED, prefix="app", queue_groups={"etl": ["extract", "load"]},
                    queues=["extract", "load"])
    assert config.cluster
    assert config.namespace() == "app:etl"
    assert config.namespace(["mail"]) == "app:mail"  # in no group: a group of its own
    slots = {key_slot(Keys(config.namespace([q])).route.encode())
             for q in ("extract", "load", "mail")}
    assert len(slots) == 2  # extract and load share one
    with pytest.raises(ConfigError, match="must share a queue group") as info:
        config.namespace(["extract", "mail"])
    assert "extract (etl), mail (mail)" in str(info.value)


@pytest.mark.parametrize(("groups", "problem"), [
    ({"a": ["q1"], "b": ["q1"]}, "queue 'q1' is in two groups: a and b"),
    ({"a": []}, "a: expected a non-empty list of queue names"),
    ({"a:b": ["q1"]}, "expected a queue name"),
    ({"a": "q1"}, "a: expected a non-empty list"),
    (["q1"], "expected a table of group = [queue, ...]"),
])
def test_bad_queue_groups_are_config_errors(groups: Any, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        Config(queue_groups=groups)


def test_a_master_whose_queues_span_groups_refuses_to_start(tmp_path: Path) -> None:
    config = tmp_path / "jobq.toml"
    config.write_text('queue_groups = { etl = ["extract", "load"] }\n'
                      'imports = ["jobq_testtasks"]\n')
    done = subprocess.run(
        [sys.executable, "-m", "jobq.cli.master", "--config", str(config), "-q", "extract,mail",
         "--redis-url", "redis+cluster://:s3cret@127.0.0.1:1"],
        capture_output=True, text=True, timeout=30, env=subprocess_env())
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "must share a queue group" in lines[0]
    assert "s3cret" not in done.stderr


def test_the_bench_refuses_a_cluster_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "jobq.cli", "bench", "-s", "noop", "--redis-url",
         "redis+cluster://:s3cret@127.0.0.1:1"],
        capture_output=True, text=True, timeout=30, env=subprocess_env())
    assert done.returncode == 2
    assert "measures one server" in done.stderr and "s3cret" not in done.stderr


def test_a_job_queue_refuses_what_another_group_holds() -> None:
    config = Config(redis_url=SEED, queue_groups={"etl": ["extract", "load"]})
    extract = JobQueue("extract", config=config)  # no connection is made for any of this
    assert extract.keys.prefix == "jobq:etl"
    extract._build(tasks.add, (1, 2), None, {"queue": "load"})  # one group: fine
    with pytest.raises(ValueError, match="queue 'mail' is in queue group 'mail'"):
        extract.enqueue(tasks.add, 1, 2, queue="mail")
    other = Job(tasks.add, (1, 2), queue="mail")
    with pytest.raises(ValueError, match="depends_on: queue 'mail'"):
        extract.enqueue(tasks.add, 1, 2, depends_on=[other])
    with pytest.raises(ValueError, match="schedule 'nightly': queue 'mail'"):
        Scheduler(extract).schedule_interval("nightly", tasks.noop, 60, queue="mail")
    # a schedule without a queue would fire into the group of whoever applied it
    with pytest.raises(ScheduleError, match="queue: required on a Cluster"):
        Scheduler(extract).schedule_interval("nightly", tasks.noop, 60)
    tables = [{"name": "pull", "task": "jobq_testtasks:noop", "interval": 60}]
    with pytest.raises(ScheduleError, match="schedule 'pull': queue: required on a Cluster"):
        config_schedules(config.replace(schedules=tables))
    assert config_schedules(Config(schedules=tables))  # one server: the task's queue


# -- a real cluster ---------------------------------------------------------------------------

#: What every master runs with.
MASTER_CONFIG = """
imports = ["jobq_testtasks"]
lease_time = 2.0
leader_lease = 1.0
scheduler_tick = 0.2
retry_backoff_base = 0.05
retry_backoff_cap = 0.5
wait_replicas_timeout = 1.0
"""


def test_a_planned_failover_ends_idle_workers_waits_and_they_follow(
        make_cluster: Any, tmp_path: Path) -> None:
    """CLUSTER FAILOVER on a replica: the primary, alive, is demoted while the workers wait
    on it, blocked in BLPOP (Valkey redirects them: MOVED). They find the new primary and
    take jobs from it, the same processes: none crashes or is restarted."""
    c: Cluster = make_cluster(1, 1)  # one shard: every slot on one primary, one replica
    [primary] = c.primaries()
    [replica] = c.replicas_of(primary)
    config_path = tmp_path / "jobq.toml"
    config_path.write_text(MASTER_CONFIG)
    log = tmp_path / "master.log"
    master = subprocess.Popen(
        [sys.executable, "-m", "jobq.cli.master", "-w", "2", "--log-file", str(log)],
        env=subprocess_env(JOBQ_REDIS_URL=c.url, JOBQ_CONFIG=str(config_path)),
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        q = JobQueue("default", config=load_config(config_path, redis_url=c.url))
        first = q.enqueue(tasks.add, 1, 2)
        assert q.wait(first.id, timeout=30).status == JobStatus.COMPLETED
        workers = wait_until(lambda: [p.pid for p in psutil.Process(master.pid).children()
                                      if "worker" in " ".join(p.cmdline())], 10)
        wait_until(lambda: "idle" in " ".join(
            " ".join(psutil.Process(pid).cmdline()) for pid in workers), 10,
            message="the workers idle, blocked on the primary")
        replica.client.execute_command("CLUSTER", "FAILOVER")
        wait_until(lambda: replica.role == "primary" and primary.role == "replica", 30,
                   message="the replica promoted")
        jobs = enqueue_retrying(q, [Job(tasks.add, (i, 1)) for i in range(50)])
        for job in jobs:
            assert q.wait(job.id, timeout=30).status == JobStatus.COMPLETED
        text = log.read_text()
        assert "crashed" not in text and "UNBLOCKED" not in text.split("answers again")[-1]
        still = [p.pid for p in psutil.Process(master.pid).children()
                 if "worker" in " ".join(p.cmdline())]
        assert sorted(still) == sorted(workers), text[-3000:]  # the same workers
    finally:
        kill_processes([psutil.Process(master.pid), *psutil.Process(master.pid).children(
            recursive=True)] if master.poll() is None else [])
        master.wait(10)


def enqueue_retrying(queue: JobQueue, jobs: list[Job], timeout: float = 30) -> list[Job]:
    """Enqueue ``jobs`` (the same ids each time) until the server takes them."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return queue.enqueue_many(jobs)
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def groups_on_every_shard(c: Cluster, prefix: str = "jobq") -> dict[str, int]:
    """Group names whose namespaces' slots are served by distinct primaries, one per primary:
    group -> the primary's port (picked by name, so the test knows where each one lives)."""
    picked: dict[int, str] = {}
    for i in range(1000):
        name = f"g{i}"
        port = c.primary_for_key(Keys(f"{prefix}:{name}").route).port
        picked.setdefault(port, name)
        if len(picked) == len(c.primaries()):
            break
    return {name: port for port, name in picked.items()}


def enqueue_confirmed(queue: JobQueue, jobs: list[Job], deadline: float) -> int:
    """Enqueue ``jobs`` until a replica confirmed them (the same ids each time: enqueueing an
    id already queued does nothing); returns how many tries it took."""
    tries = 0
    while True:
        tries += 1
        try:
            queue.enqueue_many(jobs, wait_replicas=1)
            return tries
        except (redis.ConnectionError, redis.TimeoutError, ReplicationTimeout):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_queues_spread_over_the_shards_and_a_primary_fails_over_with_none_lost(
        make_cluster: Any, tmp_path: Path) -> None:
    c: Cluster = make_cluster()
    groups = groups_on_every_shard(c)
    assert len(set(groups.values())) == 3  # one group per shard
    queues = {g: [f"{g}-a", f"{g}-b"] for g in groups}  # 6 queues
    config_path = tmp_path / "jobq.toml"
    config_path.write_text(MASTER_CONFIG + "queue_groups = { " + ", ".join(
        f'{g} = ["{qs[0]}", "{qs[1]}"]' for g, qs in queues.items()) + " }\n")
    config = load_config(config_path, redis_url=c.url)
    env = subprocess_env(JOBQ_REDIS_URL=c.url, JOBQ_CONFIG=str(config_path))
    logs = [tmp_path / f"master-{g}.log" for g in queues]
    masters = [subprocess.Popen(
        [sys.executable, "-m", "jobq.cli.master", "-w", "1", "-q", ",".join(qs), "--log-file",
         str(log)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        for qs, log in zip(queues.values(), logs, strict=True)]
    victim_group = next(iter(groups))
    victim = c.node(groups[victim_group])
    # the tasks' own record of their runs lives on a shard that stays up: a task whose store
    # is down fails, and that is the task's business, not the queue's
    key = next(k for i in range(1000) if c.primary_for_key(
        "{" + (k := f"cluster-{time.time_ns()}-{i}") + "}") is not victim)
    try:
        handles = {q: JobQueue(q, config=config) for qs in queues.values() for q in qs}
        assert {h.keys.prefix for h in handles.values()} == {f"jobq:{g}" for g in groups}
        jobs = {q: [Job(tasks.cluster_mark, (key,), queue=q) for _ in range(10_000 // 6 + 1)]
                for q in handles}

        def completed() -> int:
            return sum(h.get_stats()["completed"] for h in handles.values())

        # the first half, then the failover while it runs, then the rest
        deadline = time.monotonic() + 120
        for q, q_jobs in jobs.items():
            enqueue_confirmed(handles[q], q_jobs[: len(q_jobs) // 2], deadline)
        wait_until(lambda: completed() >= 2_000, 60, message="2,000 jobs completed")
        others = [h for h in handles.values() if h.keys.prefix != f"jobq:{victim_group}"]

        def others_done() -> int:
            return sum(h.get_stats()["completed"] for h in others)

        before, others_before = completed(), others_done()
        c.kill(victim)
        killed_at = time.monotonic()
        heir = c.wait_failover(victim)
        failed_over = time.monotonic() - killed_at
        # the other shards' groups went on meanwhile (they had a backlog: about 2/3 of their
        # first half was left when the kill came)
        others_during = others_done() - others_before
        assert others_during > 0
        c.restart(victim)  # it comes back as the heir's replica: WAIT 1 can succeed again
        tries: Counter[str] = Counter()
        for q, q_jobs in jobs.items():
            tries[q] = enqueue_confirmed(handles[q], q_jobs[len(q_jobs) // 2:], deadline)
        all_ids = {q: [j.id for j in q_jobs] for q, q_jobs in jobs.items()}
        wait_until(lambda: all(
            handles[q].get_stats()["pending"] == 0 and handles[q].get_stats()["processing"] == 0
            for q in handles), 120, interval=0.2, message="every queue drained")
        total = sum(len(ids) for ids in all_ids.values())
        finished = {q: Counter(getattr(handles[q].get_job(i), "status", None) for i in ids)
                    for q, ids in all_ids.items()}
        done = JobStatus.COMPLETED
        lost = {q: total_q - n[done] for q, n in finished.items()
                if (total_q := len(all_ids[q])) != n[done]}
        assert lost == {}, f"jobs not completed: {lost} ({finished})"
        name = f"test:{{{key}}}"  # every run's id, in one list (one slot)
        runs = Counter(connect(c.url, route=name).lrange(name, 0, -1))
        twice = sum(n - 1 for n in runs.values() if n > 1)
        assert set(runs) == {i for ids in all_ids.values() for i in ids}
        assert all(p.poll() is None for p in masters), "a master exited"
        assert heir.port != victim.port and completed() > before
        # the command line goes to the group of the queue it is given
        other = queues[list(queues)[1]][0]
        done = subprocess.run(
            [sys.executable, "-m", "jobq.cli", "enqueue", "jobq_testtasks:add", "[20, 22]",
             "-q", other, "--force"], capture_output=True, text=True, timeout=30, env=env)
        assert done.returncode == 0, done.stderr
        assert handles[other].wait(done.stdout.strip(), timeout=30).result() == 42
        # a reload that would move a master's queues to another group (slot) is refused:
        # its workers would claim where its duties and scheduler do not look
        first = next(iter(queues))  # masters[0]'s group
        moved = {("elsewhere" if g == first else g): qs for g, qs in queues.items()}
        config_path.write_text(MASTER_CONFIG + "queue_groups = { " + ", ".join(
            f'{g} = ["{qs[0]}", "{qs[1]}"]' for g, qs in moved.items()) + " }\n")
        masters[0].send_signal(signal.SIGHUP)
        wait_until(lambda: "the queue group (Cluster) changed: that takes a restart" in
                   logs[0].read_text(), 10, message="the reload refused")
        assert masters[0].poll() is None
        figure(f"cluster: {total} jobs over 6 queues in 3 groups on 3 shards, primary of "
               f"{victim_group} killed after {before} completed: replica promoted in "
               f"{failed_over:.1f} s ({others_during} jobs of the other groups done meanwhile), "
               f"none lost, {twice} ran twice, enqueue tries after it "
               f"{dict(tries)}")
    except BaseException:
        for log in logs:  # what the masters said, for the failure's report
            print(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-30:]))
        raise
    finally:
        kill_processes([psutil.Process(p.pid) for p in masters if p.poll() is None])
        for p in masters:
            p.wait(10)
