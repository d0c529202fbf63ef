"""The master's pidfile: refuse to start twice, see through a stale one."""

from __future__ import annotations

import os
from pathlib import Path

import psutil


class PidfileError(RuntimeError):
    """The pidfile names a master that is still running."""


def acquire(path: str) -> Path:
    file = Path(path).expanduser()
    try:
        old = int(file.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        old = 0
    if old and old != os.getpid() and _is_master(old):
        raise PidfileError(f"pidfile {file} names a running master (pid {old})")
    tmp = file.with_name(f".{file.name}.{os.getpid()}")
    tmp.write_text(f"{os.getpid()}\n")
    tmp.replace(file)  # atomic: a reader never sees a half-written pid
    return file


def release(file: Path) -> None:
    try:
        if int(file.read_text().strip() or 0) == os.getpid():
            file.unlink()
    except (FileNotFoundError, ValueError):
        pass


def _is_master(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        text = " ".join(proc.cmdline()) + " " + proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return "jobq" in text
