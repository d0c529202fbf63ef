"""The master's pidfile: refuse to start twice, see through a stale one.

The master holds an exclusive ``flock`` on the pidfile for its whole life: a second master
fails to take it (atomically: no read-check-write race), and a pidfile left by a master that
died holds no lock, so it is simply taken over.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class PidfileError(RuntimeError):
    """The pidfile names a master that is still running."""


class Pidfile:
    def __init__(self, path: str) -> None:
        self.path = Path(path).expanduser()
        self.fd = -1

    def acquire(self) -> Pidfile:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise PidfileError(f"pidfile {self.path} names a running master (pid {holder})") \
                from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = -1


def acquire(path: str) -> Pidfile:
    return Pidfile(path).acquire()


def release(pidfile: Pidfile) -> None:
    pidfile.release()
