"""Tests of jobq.server against the real valkey-server binary: no mocks."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from jobq.connection import connect
from jobq.server import EmbeddedServer, ServerError, default_home, ensure_server


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
