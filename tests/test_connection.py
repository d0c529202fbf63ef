"""Tests of jobq.connection: URL handling, redaction, error lines, against a real server."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import redis

from jobq.config import Config
from jobq.connection import DEFAULT_LEASE, connect, describe_error
from jobq.server import EmbeddedServer, resolve_url
from jobq.urls import redact


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://app:s3cret@host:6379/0", "redis://app:***@host:6379/0"),
        ("redis://:s3cret@host:6379", "redis://:***@host:6379"),
        ("rediss://default:p%40ss@host:6380/1?ssl_cert_reqs=none",
         "rediss://default:***@host:6380/1?ssl_cert_reqs=none"),
        ("valkey://:pw@[::1]:6379/0", "valkey://:***@[::1]:6379/0"),
        ("redis://app@host:6379", "redis://app@host:6379"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://localhost", "redis://localhost"),
        ("unix:///run/valkey.sock?db=2", "unix:///run/valkey.sock?db=2"),
        ("unix://:pw@/run/valkey.sock?db=2", "unix://:***@/run/valkey.sock?db=2"),
        ("unix:///run/valkey.sock?db=2&password=pw", "unix:///run/valkey.sock?db=2&password=***"),
        ("unix:///run/v.sock?password=pw&db=1", "unix:///run/v.sock?password=***&db=1"),
        # Unescaped specials in the password: everything up to the last '@' is credentials.
        ("redis://:pa/ss?w@rd@host:6379", "redis://:***@host:6379"),
        ("", ""),
        ("not a url", "not a url"),
        ("://", "://"),
        ("@@@:::", "@@@:::"),
        ("redis://", "redis://"),
    ],
)
def test_redact(url: str, expected: str) -> None:
    assert redact(url) == expected


def test_redact_never_raises() -> None:
    assert redact(None) == "None"  # type: ignore[arg-type]
    assert redact("redis://:\udcff@h") == "redis://:***@h"


def test_connect_over_unix_socket(server: EmbeddedServer) -> None:
    client = connect(server.url)
    assert client.ping() is True
    client.set("k", "v")
    assert client.get("k") == "v"  # decode_responses=True by default
    raw = connect(server.url, decode_responses=False)
    assert raw.get("k") == b"v"
    assert client.blpop(["empty"], timeout=0.1) is None
    other_db = connect(server.url + "?db=3")
    assert other_db.get("k") is None
    for c in (client, raw, other_db):
        c.close()


@pytest.mark.parametrize(
    ("url", "connection_class", "host", "port"),
    [
        ("redis://app:pw@example.com:6390/2", redis.Connection, "example.com", 6390),
        ("valkey://example.com", redis.Connection, "example.com", 6379),
        ("valkeys://example.com:6380", redis.SSLConnection, "example.com", 6380),
        ("rediss://example.com:6380/0?ssl_cert_reqs=none", redis.SSLConnection,
         "example.com", 6380),
    ],
)
def test_connect_url_shapes(url: str, connection_class: type, host: str, port: int) -> None:
    client = connect(url)  # connects lazily: nothing listens at these addresses
    pool = client.connection_pool
    assert pool.connection_class is connection_class
    kwargs = pool.connection_kwargs
    assert (kwargs["host"], kwargs.get("port", 6379)) == (host, port)  # 6379: redis-py default
    assert kwargs["health_check_interval"] == 30
    # reads time out after a lease (blocking commands wait at most half of that per call)
    assert kwargs["socket_timeout"] == DEFAULT_LEASE
    assert kwargs["socket_keepalive"] is True and kwargs["socket_keepalive_options"]
    assert kwargs["socket_keepalive"] is True
    if "ssl_cert_reqs" in url:
        assert kwargs["ssl_cert_reqs"] == "none"
    if "app:pw" in url:
        assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("app", "pw", 2)


def test_connect_rejects_other_schemes_without_leaking() -> None:
    with pytest.raises(ValueError, match="unsupported redis URL") as info:
        connect("http://:topsecret@host")
    assert "topsecret" not in str(info.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_describe_refused_connection() -> None:
    port = _free_port()
    url = f"redis://:hunter22@127.0.0.1:{port}/0"
    with pytest.raises(redis.ConnectionError) as info:
        connect(url).ping()
    line = describe_error(info.value, url)
    assert line == f"cannot connect to redis://:***@127.0.0.1:{port}/0: Connection refused"


def test_describe_missing_socket(tmp_path: Path) -> None:
    url = f"unix://{tmp_path}/none.sock"
    with pytest.raises(redis.ConnectionError) as info:
        connect(url).ping()
    assert describe_error(info.value, url) == (
        f"cannot connect to {url}: No such file or directory")


def test_describe_wrong_password(home: Path) -> None:
    server = EmbeddedServer(home)
    server.start(extra={"requirepass": "right-pw-123"})
    good = connect(f"unix://:right-pw-123@{server.socket_path}")
    assert good.ping() is True
    good.close()

    for url in (f"unix://:wrong-pw-456@{server.socket_path}",
                f"unix://app:wrong-pw-456@{server.socket_path}",
                f"unix://{server.socket_path}?password=wrong-pw-456"):
        with pytest.raises(redis.AuthenticationError) as info:
            connect(url).ping()
        line = describe_error(info.value, url)
        assert line.startswith(f"authentication failed for {redact(url)}: ")
        assert "wrong-pw-456" not in line and "right-pw-123" not in line
        assert "\n" not in line


def test_describe_scrubs_an_echoed_password() -> None:
    url = "redis://:hunter22@host:6379"
    line = describe_error(redis.ResponseError("WRONGPASS hunter22 is wrong"), url)
    assert line == "authentication failed for redis://:***@host:6379: WRONGPASS *** is wrong"
    line = describe_error(RuntimeError("odd\nfailure hunter22"), url)
    assert line == "error talking to redis://:***@host:6379: RuntimeError: odd failure ***"


def test_resolve_url(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_url(Config(redis_url="redis://example.com:6379/0")) == (
        "redis://example.com:6379/0")
    monkeypatch.setenv("JOBQ_HOME", str(home))
    url = resolve_url(Config())
    assert url == EmbeddedServer(home).url
    client = connect(url)
    assert client.ping() is True
    client.close()
