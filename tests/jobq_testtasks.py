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

# -- for test_master.py ----------------------------------------------------------------------


def hang_first_run(key: str, seconds: float = 30, megabytes: int = 0) -> str:
    """Record the run (with the pid). The first run then holds ``megabytes`` of memory and
    sleeps ``seconds`` (a run for the master to kill); later runs return at once."""
    runs = _redis().rpush(f"test:{key}", str(os.getpid()))
    if runs == 1:
        hog = b"x" * (megabytes << 20)  # every page written: it counts as the worker's own
        time.sleep(seconds)
        del hog
    return f"run {runs}"


def hold_memory_until_sigterm(key: str, megabytes: int, seconds: float = 20) -> str:
    """Record the pid, hold ``megabytes`` until the worker gets SIGTERM (the master retiring
    it) or ``seconds`` pass; the worker's own SIGTERM handler still runs."""
    hog = b"x" * (megabytes << 20)
    got: list[int] = []
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: object) -> None:
        got.append(signum)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_term)
    try:
        _redis().rpush(f"test:{key}", str(os.getpid()))
        deadline = time.monotonic() + seconds
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGTERM, previous)
    del hog
    return "retired" if got else "never asked to stop"


def record_then_sleep(key: str, value: str, seconds: float) -> str:
    """Record ``value`` (the job ran), then take ``seconds``."""
    _redis().rpush(f"test:{key}", value)
    time.sleep(seconds)
    return value


def pid() -> int:
    return os.getpid()


def start_grandchild_and_hang(key: str, seconds: float = 30) -> str:
    """Start a child process that sleeps a minute, record its pid, then hang: a job whose
    worker gets killed while its child lives on."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    _redis().rpush(f"test:{key}", str(child.pid))
    time.sleep(seconds)
    child.kill()
    child.wait()
    return "hung"


def exit_process(code: int) -> None:
    """End the worker process at once with ``code`` (as a C extension or a careless
    library might)."""
    os._exit(code)

