"""Shared fixtures: one real valkey-server for the session (jobq's own embedded server, in a
temporary home), a clean database per test, and helpers to run real worker processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
import setproctitle

from jobq.config import load_config
from jobq.connection import connect
from jobq.queue import JobQueue
from jobq.server import EmbeddedServer, ServerError, binary_path
from jobq.worker_loop import Worker

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
def quick_connect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config (``JOBQ_CONFIG``) whose commands give up on an unreachable server after half
    a second instead of ten: for tests that try many."""
    path = tmp_path / "quick-connect.toml"
    path.write_text("connect_timeout = 0.5\n")
    monkeypatch.setenv("JOBQ_CONFIG", str(path))
    return path


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


def figure(text: str) -> None:
    """Report a measured figure: printed (``-s``), and kept in $JOBQ_TEST_FIGURES if set."""
    print(f"\n[figure] {text}")
    path = os.environ.get("JOBQ_TEST_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text + "\n")


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def key() -> str:
    """A unique name for what one test records."""
    return uuid.uuid4().hex[:12]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for "cannot connect" cases)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (collected while the parent still lives)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def title(p: psutil.Process) -> str:
    """A process's title (its command line, as setproctitle sets it); "" once it is gone."""
    try:
        return " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ""


def children(master: int | subprocess.Popen[str], what: str = "jobq worker", *,
             ready: bool = False, up: bool = False) -> list[int]:
    """Pids of a master's live (not zombie) children whose title has ``what``, sorted.
    ``ready``: only workers past "booting" (forked, not yet running jobq's worker code).
    ``up``: past "starting" too (their connections, until their slot first says idle or
    busy): a worker killed before that is a crash at boot for the master, which backs off
    from those, not a kill of a worker that was up."""
    pid = master if isinstance(master, int) else master.pid
    skip = ("booting", "starting") if up else ("booting",) if ready else ()
    try:
        kids = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    return sorted(k.pid for k in kids if what in (name := title(k))
                  and name.rstrip().rpartition(": ")[2] not in skip)


def kill_processes(procs: list[psutil.Process], *, wait: bool = True) -> None:
    """SIGCONT (a stopped process cannot die otherwise), then SIGKILL, every one; wait for
    them (with ``wait``, see :func:`wait_dead`)."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
    if wait:
        wait_dead(procs)


def wait_dead(procs: list[psutil.Process], timeout: float = 10) -> None:
    """Wait until each process is reaped or a zombie: dead, its sockets and namespaces
    released, only waiting for its parent, or for init when its parent died too (this VM's
    init reaps orphans only every second or two)."""
    deadline = time.monotonic() + timeout
    alive = list(procs)
    while alive and time.monotonic() < deadline:
        _, alive = psutil.wait_procs(alive, timeout=0.02)  # reaps our own children
        alive = [p for p in alive if not _dead(p)]


def _dead(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (workers live in their own groups)."""
    kill_processes(process_tree(pid))


@pytest.fixture
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh data directory for a server of the test's own (short: unix socket paths are
    limited); whatever server runs there is stopped at teardown."""
    path = tmp_path_factory.mktemp("h")
    yield path
    stop_server(EmbeddedServer(path))


@pytest.fixture
def server(home: Path) -> EmbeddedServer:
    """A server of the test's own, started in ``home``."""
    srv = EmbeddedServer(home)
    srv.start()
    return srv


def stop_server(server: EmbeddedServer) -> None:
    """Stop a server a test started; kill it if it will not stop."""
    pid = server.pid()
    try:
        server.stop(timeout=5)
    except ServerError:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)


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


def run_in_this_process(worker: Worker) -> int:
    """Run a worker here, to its end; put back what it changes in the process: the signal
    handlers and the timer it replaces (pytest-timeout's SIGALRM among them), the title."""
    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGUSR1, signal.SIGUSR2)
    saved = {s: signal.getsignal(s) for s in signums}
    timer = signal.getitimer(signal.ITIMER_REAL)
    title = setproctitle.getproctitle()
    try:
        return worker.run()
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        if timer[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, *timer)
        setproctitle.setproctitle(title)
        worker.redis.connection_pool.disconnect()


class Valkey:
    """A valkey-server of the test's own on a TCP port, in the foreground (so the test can
    freeze it with SIGSTOP, kill it, and start it again empty on the same port)."""

    def __init__(self, workdir: Path, port: int | None = None, *extra: str) -> None:
        self.workdir, self.port, self.extra = workdir, port or free_port(), extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}"

    def start(self) -> Valkey:
        self.workdir.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [str(binary_path()), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1)
        wait_until(lambda: _answers(client), 10, message=f"valkey on port {self.port}")
        client.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def valkeys(tmp_path: Path) -> Iterator[list[Valkey]]:
    started: list[Valkey] = []
    yield started
    for v in started:
        v.kill()
