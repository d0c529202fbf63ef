"""Tests of jobq.server against the real valkey-server binary: no mocks."""

from __future__ import annotations

import grp
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import stop_server

from jobq.config import Config
from jobq.connection import connect
from jobq.server import EmbeddedServer, ServerError, default_home, ensure_server, resolve_url

#: The uid and primary gid the "other user" of the socket-group tests runs as.
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="running a child as another user needs root")


def _servers_for(srv: EmbeddedServer) -> list[psutil.Process]:
    """Live valkey processes serving ``srv``'s socket (their title names it)."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE or "valkey" not in (proc.info["name"] or ""):
            continue
        if any(str(srv.socket_path) in arg for arg in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def _wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_start_serves_on_the_unix_socket(server: EmbeddedServer, home: Path) -> None:
    assert server.url == f"unix://{home}/valkey.sock"
    assert server.is_running()
    pid = server.pid()
    assert pid is not None and psutil.Process(pid).is_running()
    client = connect(server.url)
    assert client.ping() is True
    client.set("k", "v")
    assert client.get("k") == "v"
    client.close()
    for name in ("valkey.sock", "valkey.conf", "valkey.pid", "valkey.log", "appendonlydir"):
        assert (home / name).exists(), name


def test_start_is_idempotent(server: EmbeddedServer) -> None:
    pid = server.pid()
    assert server.start() == server.url
    assert EmbeddedServer(server.home).ensure_running() == server.url
    assert server.pid() == pid
    assert [p.pid for p in _servers_for(server)] == [pid]


def test_files_are_private(server: EmbeddedServer, home: Path) -> None:
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE(server.socket_path.stat().st_mode) == 0o700
    assert stat.S_IMODE(server.conf_path.stat().st_mode) == 0o600


def test_wide_home_is_tightened(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    home.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="jobq.server"):
        EmbeddedServer(home).start()
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert "mode 755" in caplog.text


def test_no_tcp_listener(server: EmbeddedServer) -> None:
    pid = server.pid()
    assert pid is not None
    proc = psutil.Process(pid)
    assert [c for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN] == []
    assert any(c.laddr == str(server.socket_path) for c in proc.net_connections(kind="unix"))


def test_server_is_detached(server: EmbeddedServer) -> None:
    pid = server.pid()
    assert pid is not None
    assert os.getsid(pid) != os.getsid(0)
    assert os.getpgid(pid) != os.getpgid(0)
    assert psutil.Process(pid).ppid() != os.getpid()


def _start_in_child(home: str, barrier: Any, results: Any) -> None:
    barrier.wait()
    try:
        results.put(EmbeddedServer(home).start())
    except Exception as exc:  # report, do not hang the parent
        results.put(f"error: {exc}")


def test_concurrent_starts_yield_one_server(home: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    n = 3
    barrier, results = ctx.Barrier(n), ctx.Queue()
    children = [ctx.Process(target=_start_in_child, args=(str(home), barrier, results))
                for _ in range(n)]
    for child in children:
        child.start()
    urls = [results.get(timeout=20) for _ in range(n)]
    for child in children:
        child.join(timeout=10)
        assert child.exitcode == 0
    server = EmbeddedServer(home)
    assert urls == [server.url] * n
    # The starters have exited; the one server they share outlives them.
    assert server.is_running()
    assert [p.pid for p in _servers_for(server)] == [server.pid()]


def test_stop(server: EmbeddedServer) -> None:
    pid = server.pid()
    assert pid is not None
    server.stop()
    assert not server.is_running()
    assert server.pid() is None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not server.socket_path.exists()
    server.stop()  # stopping a stopped server is fine


def test_data_survives_stop_and_start(server: EmbeddedServer) -> None:
    client = connect(server.url)
    client.set("durable", "yes")
    client.rpush("list", "a", "b")
    client.close()
    server.stop()
    server.start()
    client = connect(server.url)
    assert client.get("durable") == "yes"
    assert client.lrange("list", 0, -1) == ["a", "b"]
    client.close()


def test_stale_socket_and_pidfile_do_not_block_start(home: Path) -> None:
    server = EmbeddedServer(home)
    # What a crashed server leaves: a socket file nobody listens on, a pidfile of a dead pid.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(server.socket_path))
    sock.close()
    dead = psutil.Popen(["true"])
    dead.wait()
    server.pid_path.write_text(f"{dead.pid}\n")
    assert server.socket_path.exists() and not server.is_running()
    assert server.pid() is None

    assert server.start() == server.url
    assert server.is_running()
    assert server.pid() not in (None, dead.pid)


def test_crashed_server_is_restarted(server: EmbeddedServer) -> None:
    pid = server.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert _wait_until(lambda: not server.is_running())
    server.start()
    assert server.is_running() and server.pid() != pid


def test_stop_with_requirepass_falls_back_to_sigterm(home: Path) -> None:
    server = EmbeddedServer(home)
    server.start(extra={"requirepass": "s3cret-pw"})
    assert server.is_running()  # it answers (NOAUTH) even without the password
    client = connect(f"unix://:s3cret-pw@{server.socket_path}")
    assert client.ping() is True
    client.close()
    pid = server.pid()
    server.stop()
    assert not server.is_running()
    assert pid is not None and not EmbeddedServer(home).pid()


def test_start_failure_quotes_the_log(home: Path) -> None:
    with pytest.raises(ServerError, match=r"exit code 1[\s\S]*Bad directive"):
        EmbeddedServer(home).start(extra={"no-such-directive": "1"})
    assert not EmbeddedServer(home).is_running()


def test_bad_extra_is_refused(home: Path) -> None:
    with pytest.raises(ServerError, match="line break"):
        EmbeddedServer(home).start(extra={"requirepass": "a\nport 6379"})


def test_too_long_socket_path(tmp_path: Path) -> None:
    with pytest.raises(ServerError, match="longer than 107 bytes"):
        EmbeddedServer(tmp_path / ("x" * 120)).start()


def test_default_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JOBQ_HOME", str(tmp_path / "jh"))
    assert default_home() == tmp_path / "jh"
    monkeypatch.delenv("JOBQ_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_home() == tmp_path / "xdg" / "jobq"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_home() == tmp_path / ".local" / "share" / "jobq"
    assert EmbeddedServer().home == tmp_path / ".local" / "share" / "jobq"


def test_ensure_server_uses_jobq_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBQ_HOME", str(home))
    url = ensure_server()
    assert url == EmbeddedServer(home).url
    assert ensure_server() == url
    client = connect(url)
    assert client.ping() is True
    client.close()


# -- another local user (server_socket_group) ---------------------------------------------------

@pytest.fixture
def shared_home() -> Iterator[Path]:
    """A data directory whose parents anybody may pass through, as /var/lib's are (pytest's
    temporary directories are private to their owner); its server is stopped at teardown."""
    parent = Path(tempfile.mkdtemp(prefix="jq", dir="/tmp"))
    parent.chmod(0o755)
    home = parent / "h"
    yield home
    stop_server(EmbeddedServer(home))
    shutil.rmtree(parent)


def _a_group() -> grp.struct_group:
    """A group of this host that is neither ours nor the other user's."""
    return next(g for g in grp.getgrall() if g.gr_gid not in (0, NOBODY, os.getgid()))


def _as_other_user(groups: list[int], action: Callable[[], str]) -> str:
    """Run ``action`` in a forked child that is uid/gid 65534 with supplementary ``groups``;
    return what it returned, or the name of the OSError it raised."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.setgroups(groups)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                said = action()
            except (OSError, ServerError) as exc:
                said = f"{type(exc).__name__}: {exc}"
            os.write(write, said.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        said = f.read().decode()
    os.waitpid(pid, 0)
    return said


def _ping(path: Path) -> Callable[[], str]:
    def ping() -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            return sock.recv(64).decode().strip()
    return ping


@needs_root
def test_socket_group_lets_its_members_connect_and_nobody_else(
        shared_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    group = _a_group()
    monkeypatch.setenv("JOBQ_HOME", str(shared_home))
    server = EmbeddedServer(shared_home)
    # Private by default: another user cannot reach the socket, even in that group.
    resolve_url(Config())
    assert stat.S_IMODE(shared_home.stat().st_mode) == 0o700
    assert _as_other_user([group.gr_gid], _ping(server.socket_path)).startswith(
        "PermissionError")
    server.stop()

    # server_socket_group, as any jobq process that starts the server applies it
    url = resolve_url(Config(server_socket_group=group.gr_name))
    assert url == server.url
    home, sock = shared_home.stat(), server.socket_path.stat()
    assert (stat.S_IMODE(home.st_mode), home.st_gid) == (0o710, group.gr_gid)
    assert (stat.S_IMODE(sock.st_mode), sock.st_gid) == (0o770, group.gr_gid)
    assert stat.S_IMODE(server.conf_path.stat().st_mode) == 0o600
    assert _as_other_user([group.gr_gid], _ping(server.socket_path)) == "+PONG"
    assert _as_other_user([], _ping(server.socket_path)).startswith("PermissionError")
    # the group may pass through the directory, not list it
    assert _as_other_user([group.gr_gid], lambda: str(os.listdir(shared_home))).startswith(
        "PermissionError")
    server.stop()

    # dropped from the config: private again at the next start
    EmbeddedServer(shared_home).start()
    assert stat.S_IMODE(shared_home.stat().st_mode) == 0o700
    assert stat.S_IMODE(server.socket_path.stat().st_mode) == 0o700
    assert _as_other_user([group.gr_gid], _ping(server.socket_path)).startswith(
        "PermissionError")


@needs_root
def test_socket_group_the_server_user_is_not_in_is_one_clear_error(shared_home: Path) -> None:
    group = _a_group()
    shared_home.mkdir(mode=0o700)
    os.chown(shared_home, NOBODY, NOBODY)
    said = _as_other_user([], lambda: EmbeddedServer(
        shared_home, socket_group=group.gr_name).start())
    assert said == (f"ServerError: server_socket_group: cannot give {shared_home} to group "
                    f"{group.gr_name!r}: Operation not permitted (the user running the server "
                    f"must own it and belong to the group)")
    assert not EmbeddedServer(shared_home).is_running()
