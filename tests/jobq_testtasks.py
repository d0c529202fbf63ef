"""Tasks the tests enqueue. Side effects go to Redis (``JOBQ_REDIS_URL``), so a test can
count how often each job really ran, even across killed processes."""

from __future__ import annotations

import os
import signal
import time

from jobq.connection import connect
from jobq.registry import task

_client = None


def _redis():  # type: ignore[no-untyped-def]
    global _client
    if _client is None or _client[0] != os.getpid():
        _client = (os.getpid(), connect(os.environ["JOBQ_REDIS_URL"]))
    return _client[1]


def noop() -> None:
    return None


def add(a: int, b: int) -> int:
    return a + b


def record(key: str, value: str) -> str:
    """RPUSH ``value`` to ``key``: how tests see that (and how often) a job ran."""
    _redis().rpush(f"test:{key}", value)
    return value


def boom(message: str = "boom") -> None:
    raise ValueError(message)


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def spin(seconds: float, key: str = "") -> str:
    """Pure-Python busy loop for ``seconds``; records 'timeout' if JobTimeout interrupts it."""
    deadline = time.time() + seconds
    try:
        while time.time() < deadline:
            pass
    except BaseException as exc:
        if key:
            _redis().rpush(f"test:{key}", type(exc).__name__)
        raise
    return "spun"


def mark_then_sleep(key: str, seconds: float) -> str:
    """Record that the job started (with the pid), then sleep: a job to kill mid-run."""
    _redis().rpush(f"test:{key}", str(os.getpid()))
    time.sleep(seconds)
    return "slept"


def block_alarm(seconds: float) -> str:
    """Block SIGALRM and sleep: a job the soft timeout cannot reach."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(seconds)
    return "not interrupted"


def unserializable() -> object:
    return object()


def echo(*args: object, **kwargs: object) -> dict[str, object]:
    return {"args": list(args), "kwargs": kwargs}


@task(name="jobq_testtasks:registered", queue="default", priority=0)
def registered(x: int) -> int:
    return x * 2


def _private() -> str:
    return "never"


def mark_first_run_hangs(key: str, seconds: float) -> str:
    """Record the start (with the pid); the first run then sleeps ``seconds`` (a run to kill),
    later runs return at once."""
    runs = _redis().rpush(f"test:{key}", str(os.getpid()))
    if runs == 1:
        time.sleep(seconds)
    return f"run {runs}"


def mark_then_wait(key: str, gate: str, seconds: float = 30) -> str:
    """Record the start (with the pid), then block until the test pushes to ``test:<gate>``:
    a job that runs exactly as long as the test wants."""
    client = _redis()
    client.rpush(f"test:{key}", str(os.getpid()))
    if client.blpop([f"test:{gate}"], timeout=seconds) is None:
        raise TimeoutError(f"nobody opened the gate {gate!r} within {seconds} s")
    return "released"
