"""Process plumbing shared by jobq's processes: titles, signals, death with the parent, and a
blocking call that a signal handler can cut short."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Callable
from typing import Any, TypeVar

import psutil
import setproctitle

#: ``prctl`` option asking Linux to signal us when our parent dies.
_PR_SET_PDEATHSIG = 1

#: The death signal a master's workers ask for (see :func:`die_with_parent`): a signal of
#: their own, so that they never take it for the master's SIGTERM. Linux sends it when the
#: thread that forked the worker exits, and a master killed whole may lose its main thread
#: before its other threads: the worker is then the child of one of those for a moment, and
#: ``getppid()`` still names the dead master (measured: 4 times in 200). A worker that took
#: the signal for a graceful stop would finish its job and give back the others, as if the
#: master were there to see to it.
PARENT_DIED: int = getattr(signal, "SIGRTMIN", signal.SIGTERM)

_T = TypeVar("_T")


def set_title(title: str) -> None:
    """What ``ps`` and ``top`` show for this process."""
    setproctitle.setproctitle(title)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send us ``sig`` when our parent dies (even by SIGKILL): an orphaned
    worker dies at once (:data:`PARENT_DIED`), a scheduler or a pool's master stops,
    instead of running on with nobody renewing their leases or stopping them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        pass  # not Linux: the getppid() checks of the worker and scheduler loops remain


def send_signal(pid: int, sig: int) -> None:
    """Signal ``pid``; a process that is gone already is not an error."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def kill_group(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads (a worker and whatever it forked)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        send_signal(pid, signal.SIGKILL)


#: How long a worker's unique memory may go unread while its RSS is under every limit (s).
USS_EVERY = 10.0


def worker_memory(pid: int, last_mb: float | None, uss_at: float, now: float,
                  bound_mb: float | None) -> tuple[float, float]:
    """A worker's memory in MiB as its limits need it, and when its USS was last read.

    The USS (its unique memory: what it frees when it exits, not the pages it shares with
    the master it was forked from) is the figure reported and held to the limits, but
    reading it walks the process's page tables (/proc/PID/smaps_rollup: ~0.5 ms of the
    master per worker, every read). The RSS is a cheap bound of it (/proc/PID/statm), and
    never below it. So the USS is read again only when the RSS is over ``bound_mb`` (the
    lowest memory limit, None without one: the limit may be crossed, and the USS decides), or
    every USS_EVERY seconds; in between the last USS stands, capped by the RSS (still a
    bound, and the limits act only above the RSS)."""
    proc = psutil.Process(pid)
    rss = float(proc.memory_info().rss) / 2**20
    if last_mb is None or now - uss_at >= USS_EVERY or (bound_mb is not None and rss > bound_mb):
        try:
            return float(proc.memory_full_info().uss) / 2**20, now
        except (psutil.AccessDenied, AttributeError):  # no USS here: the RSS stands for it
            return rss, now
    return min(last_mb, rss), uss_at


class Interrupted(BaseException):
    """Raised by :meth:`BlockingCall.interrupt` inside a blocking call (a BaseException, so
    that no ``except Exception`` of a library on the way swallows it)."""


class BlockingCall:
    """Lets a signal handler cut a blocking server call short, at once.

    The loop makes a call that may block for long (BLPOP) through :meth:`call`; the handler
    calls :meth:`interrupt`, which raises inside the call only while one runs (anywhere
    else the loop sees the flag the handler set). ``on_interrupt`` cleans up after an
    interrupted call, e.g. drops the connection, whose reply may be half read.
    """

    def __init__(self, on_interrupt: Callable[[], None]) -> None:
        self._on_interrupt = on_interrupt
        self.active = False

    def interrupt(self) -> None:
        if self.active:
            self.active = False
            raise Interrupted()

    def call(self, fn: Callable[..., _T], *args: Any) -> _T | None:
        """``fn(*args)`` as the interruptible call: its result, or None when a signal cut
        it short. The span opens and closes inside the ``try``: a signal that lands as the
        call returns (between two bytecodes, where Python runs handlers) is caught here
        too, not raised into the caller (a context manager's ``__exit__`` would leave
        that window open); and it closes when ``fn`` raises (a lost server), or the next
        signal would raise wherever the loop then is."""
        try:
            try:
                self.active = True
                return fn(*args)
            finally:  # also when ``fn`` fails: a later signal must not raise elsewhere
                self.active = False
        except Interrupted:
            self._on_interrupt()
            return None
