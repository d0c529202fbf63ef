"""Shared fixtures: one real valkey-server for the session (jobq's own embedded server, in a
temporary home), a clean database per test, and helpers to run real worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from jobq.config import load_config
from jobq.connection import connect
from jobq.queue import JobQueue
from jobq.server import EmbeddedServer

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01,
               message: str = "condition") -> Any:
    """Poll ``condition`` until it returns a truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def server_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("jq")
    server = EmbeddedServer(home)
    server.start()
    yield home
    server.stop()


@pytest.fixture(scope="session")
def server_url(server_home: Path) -> str:
    return EmbeddedServer(server_home).url


@pytest.fixture
def redis_url(server_url: str, server_home: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The session server's URL, with an empty database; also set for subprocesses."""
    client = connect(server_url)
    client.flushall()
    client.close()
    monkeypatch.setenv("JOBQ_REDIS_URL", server_url)
    monkeypatch.setenv("JOBQ_HOME", str(server_home))
    monkeypatch.delenv("JOBQ_CONFIG", raising=False)
    return server_url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = connect(redis_url)
    yield client
    client.close()


@pytest.fixture
def queue(redis_url: str) -> JobQueue:
    return JobQueue("default", redis_url=redis_url)


@pytest.fixture
def config(redis_url: str) -> Any:
    return load_config(redis_url=redis_url)


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (workers live in their own groups)."""
    import psutil

    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)


@pytest.fixture
def spawn(redis_url: str) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start ``jobq`` CLI processes (``spawn("worker", "-I", "jobq_testtasks")``); every one
    left running is killed at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str] | None = None, module: str = "jobq.cli",
              **kw: Any) -> subprocess.Popen[str]:
        cmd = [sys.executable, "-m", module, *args]
        proc = subprocess.Popen(cmd, env=env or subprocess_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, **kw)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        kill_tree(proc.pid)
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
