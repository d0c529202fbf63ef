"""Faults of the server, with real servers the tests start, freeze and kill, and real masters
and commands: out of memory, frozen, not a Redis server at all, unreachable, restarted empty.
Every job is counted (its runs are recorded on the session's server, which stays healthy)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import jobq_testtasks as tasks
import psutil
import pytest
import redis
from conftest import Valkey, children, free_port, kill_tree, subprocess_env, wait_until

from jobq import exitcodes
from jobq.connection import connect
from jobq.job import JobStatus
from jobq.queue import JobQueue

pytestmark = pytest.mark.chaos

Spawn = Callable[..., subprocess.Popen[str]]

BASE = {"lease_time": 2.0, "hard_timeout_grace": 0.5, "heartbeat_timeout": 30.0,
        "graceful_timeout": 5.0, "retry_backoff_base": 0.05, "retry_jitter": 0.0,
        "scheduler_tick": 0.2, "connect_timeout": 1.0}


def start_master(spawn: Spawn, tmp_path: Path, url: str, workers: int = 2,
                 **values: Any) -> tuple[subprocess.Popen[str], Path]:
    """A real master on ``url`` (its log in a file); the tasks record on the session server
    (JOBQ_REDIS_URL), which stays healthy whatever happens to ``url``."""
    log = tmp_path / f"master-{len(list(tmp_path.glob('master-*.log')))}.log"
    path = tmp_path / f"{log.stem}.toml"
    merged = {**BASE, "log_file": str(log), **values}
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in merged.items()))
    proc = spawn("-w", str(workers), "-I", "jobq_testtasks", "--config", str(path),
                 "--redis-url", url, module="jobq.cli.master")
    return proc, log


def wait_workers(master: subprocess.Popen[str], count: int, timeout: float = 20,
                 without: set[int] = frozenset()) -> list[int]:
    def check() -> list[int] | None:
        assert master.poll() is None, master.communicate()[1]
        pids = children(master, ready=True)
        return pids if len(pids) == count and not set(pids) & without else None

    return wait_until(check, timeout, interval=0.02, message=f"{count} ready workers")


def runs_per_job(r: redis.Redis, k: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job_id in r.lrange(f"test:{k}", 0, -1):
        counts[job_id] = counts.get(job_id, 0) + 1
    return counts


# -- out of memory ---------------------------------------------------------------------------

def test_a_server_out_of_memory_is_waited_out_no_worker_dies_no_job_runs_twice(
        valkeys: list[Valkey], spawn: Spawn, r: redis.Redis, tmp_path: Path) -> None:
    server = Valkey(tmp_path / "oom", None, "--maxmemory", "8mb",
                    "--maxmemory-policy", "noeviction").start()
    valkeys.append(server)
    queue = JobQueue("default", redis_url=server.url)
    master, log = start_master(spawn, tmp_path, server.url, result_ttl=600)
    before = wait_workers(master, 2)
    k = os.urandom(6).hex()

    # enqueue jobs carrying 1 KB until the server refuses one; their records (kept 600 s)
    # fill it up further while the workers run them, until it refuses the workers' acks
    accepted: list[str] = []
    refused = 0
    deadline = time.monotonic() + 60
    while refused < 3 and time.monotonic() < deadline:
        try:
            accepted.append(queue.enqueue(tasks.chaos_record_payload, k, "x" * 1024).id)
        except redis.exceptions.OutOfMemoryError:
            refused += 1
    assert refused == 3 and len(accepted) > 100
    # and keep it full: how much the records add while they replace the specs is the
    # allocator's business, and a run in which every accepted job had finished before it
    # overflowed would test nothing
    admin = connect(server.url)
    admin.config_set("maxmemory", max(2**20, admin.info("memory")["used_memory"] - 2**18))
    wait_until(lambda: "refuses writes" in text_of(log), 30,
               message="a worker to find its results refused")
    held_while_full = children(master, ready=True)

    admin.config_set("maxmemory", "0")  # the operator makes room
    wait_until(lambda: all(queue.get_status(i) == "completed" for i in accepted), 60,
               interval=0.2, message="every accepted job to complete")

    counts = runs_per_job(r, k)
    assert sorted(counts) == sorted(accepted)  # none lost
    twice = [i for i, n in counts.items() if n > 1]
    assert twice == [], text_of(log)[-3000:]  # none ran twice
    stats = queue.get_stats()
    assert (stats["completed"], stats["failed"], stats["retried"]) == (len(accepted), 0, 0)
    # none died
    assert sorted(held_while_full) == sorted(before) == children(master, ready=True)
    text = text_of(log)
    assert "Traceback" not in text and "crashed" not in text
    assert text.count("refuses writes") <= 2 * 3  # said once per worker and condition, not per try


def test_a_jobs_status_is_read_on_a_server_that_refuses_writes(
        valkeys: list[Valkey], tmp_path: Path) -> None:
    """Reading a job runs a script (who holds it); a script that may write is refused as a
    whole by a server out of memory, so a status read used to fail exactly when an operator
    looks. The read-only one declares it (no-writes) and runs."""
    server = Valkey(tmp_path / "full").start()
    valkeys.append(server)
    queue = JobQueue("default", redis_url=server.url)
    job = queue.enqueue(tasks.add, 1, 2)
    client = connect(server.url)
    client.mset({f"filler:{i}": "x" * 1000 for i in range(4000)})
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1mb")  # far below what it holds: every write is refused
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        queue.enqueue(tasks.add, 3, 4)
    got = queue.get_job(job.id)
    assert got is not None and got.status == JobStatus.PENDING
    assert queue.get_status(job.id) == "pending"


# -- frozen ---------------------------------------------------------------------------------

def test_a_frozen_server_stalls_no_supervision_and_takes_no_live_worker_for_dead(
        valkeys: list[Valkey], spawn: Spawn, r: redis.Redis, tmp_path: Path) -> None:
    server = Valkey(tmp_path / "frozen").start()
    valkeys.append(server)
    queue = JobQueue("default", redis_url=server.url)
    master, log = start_master(spawn, tmp_path, server.url, workers=3)
    first = wait_workers(master, 3)
    k = os.urandom(6).hex()
    ids = [queue.enqueue(tasks.chaos_record_sleep, k, 0.05).id for _ in range(300)]
    stuck = queue.enqueue(tasks.block_alarm, 60, timeout=1.0, max_retries=0)
    wait_until(lambda: queue.get_status(stuck.id) == "processing", 10,
               message="the stuck job to start")
    stuck_worker = next(pid for pid in first if stuck.id in _title(pid))

    os.kill(server.pid, signal.SIGSTOP)  # a paused VM, a fork stalling the server
    frozen_at = time.monotonic()
    try:
        # the job stuck in C is killed at its hard limit: the master does not wait on the server
        wait_until(lambda: _gone(stuck_worker), 5,
                   message="the stuck job's worker killed at its hard limit, server frozen")
        victim = next(pid for pid in children(master, ready=True) if pid != stuck_worker)
        os.kill(victim, signal.SIGKILL)
        wait_workers(master, 3, timeout=5, without={victim, stuck_worker})  # replaced
        while time.monotonic() - frozen_at < 3 * BASE["lease_time"]:  # the freeze goes on
            time.sleep(0.1)
    finally:
        os.kill(server.pid, signal.SIGCONT)

    wait_until(lambda: all(queue.get_status(i) == "completed" for i in ids), 60, interval=0.2,
               message="every job to complete")
    counts = runs_per_job(r, k)
    assert sorted(counts) == sorted(ids)
    twice = [i for i, n in counts.items() if n > 1]
    # only the job the killed worker ran may run again; no live worker's job was reaped
    assert len(twice) <= 1, twice
    assert queue.get_job(stuck.id).status is JobStatus.FAILED  # type: ignore[union-attr]
    assert "hard time limit" in queue.get_job(stuck.id).final_error["msg"]  # type: ignore
    assert master.poll() is None


def text_of(path: Path) -> str:
    """A log file's text so far ("" before the process opened it)."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _title(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


# -- not a Redis server; nothing at all -------------------------------------------------------

@pytest.fixture
def http_port() -> Iterator[int]:
    """A port that answers HTTP (what a wrong port in a URL often finds)."""

    class Quiet(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()


def test_an_address_that_is_not_a_redis_server_is_one_line_and_exit_3(
        http_port: int, spawn: Spawn, tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{http_port}"
    for args, module in ((["info"], "jobq.cli"), (["worker", "-I", "jobq_testtasks"], "jobq.cli"),
                         (["-w", "2", "-I", "jobq_testtasks"], "jobq.cli.master")):
        proc = spawn("--redis-url", url, *args, module=module)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == exitcodes.CONNECT, (args, err)
        assert err.count("\n") == 1 and "is not a Redis/Valkey server" in err, (args, err)
        assert "Traceback" not in err


def test_an_unreachable_server_commands_give_up_the_master_waits_and_is_ready_only_after(
        valkeys: list[Valkey], spawn: Spawn, tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}"
    for args in (["info"], ["worker", "-I", "jobq_testtasks", "--burst"]):
        proc = spawn("--redis-url", url, *args, env=subprocess_env(
            JOBQ_CONFIG=str(_config(tmp_path, connect_timeout=1.0))))
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == exitcodes.CONNECT, (args, err)
        assert err.count("\n") == 1 and "cannot connect to" in err and "refused" in err

    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(0.2)
    env = subprocess_env(NOTIFY_SOCKET=str(notify))
    log = tmp_path / "master.log"
    path = _config(tmp_path, log_file=str(log))
    master = spawn("-w", "2", "-I", "jobq_testtasks", "--config", str(path), "--redis-url", url,
                   module="jobq.cli.master", env=env)
    try:
        wait_until(lambda: "waiting for the server" in text_of(log), 10,
                   message="the master to say it waits for the server")
        assert master.poll() is None
        assert children(master) == []  # nothing forked
        assert _datagrams(sock) == []  # systemd is not told READY=1
        os.kill(master.pid, signal.SIGTTIN)  # acted on once it runs, not lost meanwhile
        valkeys.append(Valkey(tmp_path / "late", port).start())
        wait_until(lambda: "READY=1" in _datagrams(sock), 20, interval=0,
                   message="READY=1 once the server answers")
        assert len(children(master, ready=True)) == 3
        assert text_of(log).count("waiting for the server") == 1  # said once, not per try
    finally:
        sock.close()
        kill_tree(master.pid)


def _config(tmp_path: Path, **values: Any) -> Path:
    path = tmp_path / f"cfg-{os.urandom(3).hex()}.toml"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in {**BASE, **values}.items()))
    return path


def _datagrams(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except (TimeoutError, BlockingIOError):
            return out


# -- restarted empty --------------------------------------------------------------------------

def test_a_server_that_lost_its_data_is_said_so_once(
        valkeys: list[Valkey], spawn: Spawn, r: redis.Redis, tmp_path: Path) -> None:
    server = Valkey(tmp_path / "volatile").start()
    valkeys.append(server)
    queue = JobQueue("default", redis_url=server.url)
    master, log = start_master(spawn, tmp_path, server.url, workers=2)
    wait_workers(master, 2)
    k = os.urandom(6).hex()
    assert queue.enqueue(tasks.record, k, "before").result(timeout=15) == "before"
    running = queue.enqueue(tasks.record_then_sleep, k, "slow", 3.0)
    wait_until(lambda: queue.get_status(running.id) == "processing", 10,
               message="a job running when the server dies")

    server.kill()  # no persistence: it comes back empty
    valkeys.append(Valkey(tmp_path / "volatile", server.port).start())

    wait_until(lambda: "lost its data (restarted" in text_of(log), 30,
               message=f"the master to say the server lost its data: {text_of(log)[-2000:]}")
    wait_until(lambda: "dropped: the server lost its data" in text_of(log), 30,
               message="the worker to say which result it dropped, and why")
    text = text_of(log)
    assert text.count("lost its data (restarted without persistence?)") == 1, text[-3000:]
    assert "results of 1 job(s) dropped: the server lost its data" in text
    assert "their lease lapsed" not in text
    # and the pool goes on with the new, empty server
    fresh = JobQueue("default", redis_url=server.url)  # the old queue's socket died with it
    assert fresh.enqueue(tasks.record, k, "after").result(timeout=15) == "after"
