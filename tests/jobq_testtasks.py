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


@task(queue="high", timeout=2, max_retries=0, priority=-3, retry_on=[KeyError])
def declared(seconds: float, *, label: str = "") -> str:
    """Sleeps, then says so: a task with declared options, for the catalog's tests."""
    time.sleep(seconds)
    return f"{label}slept {seconds}"


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


def death_signal() -> int:
    """The signal this process asked Linux for when its parent dies (``PR_GET_PDEATHSIG``;
    0 for none)."""
    import ctypes

    sig = ctypes.c_int(0)
    ctypes.CDLL(None, use_errno=True).prctl(2, ctypes.byref(sig))  # PR_GET_PDEATHSIG
    return sig.value


def exit_process(code: int) -> None:
    """End the worker process at once with ``code`` (as a C extension or a careless
    library might)."""
    os._exit(code)


# -- for test_workflows.py and test_cli.py ---------------------------------------------------


def parents() -> dict[str, object]:
    """The results of this job's parents, by parent id (``current_job().parent_results()``)."""
    import jobq

    ctx = jobq.current_job()
    if ctx is None:
        raise RuntimeError("not inside a jobq job")
    return ctx.parent_results()


def parents_sum_plus(n: int) -> int:
    """The sum of the parents' results, plus ``n`` (a parent not finished yet has no result:
    a TypeError then)."""
    return sum(parents().values()) + n  # type: ignore[arg-type]


def chain_link(key: str, hang_first_seconds: float = 0) -> int:
    """One link of a chain: its parent's result + 1 (1 without a parent), recorded under
    ``key``. With ``hang_first_seconds``, the first run records its pid under ``key:pid`` and
    then sleeps that long (a run to kill)."""
    client = _redis()
    if hang_first_seconds and client.incr(f"test:{key}:runs") == 1:
        client.rpush(f"test:{key}:pid", str(os.getpid()))
        time.sleep(hang_first_seconds)
    found = parents()
    if len(found) > 1:
        raise ValueError(f"a chain link has one parent, got {len(found)}")
    value = (int(next(iter(found.values()))) + 1) if found else 1  # type: ignore[call-overload]
    client.rpush(f"test:{key}", str(value))
    return value


def gated(key: str, gate: str, fail: bool = False, result: object = "opened",
          seconds: float = 30) -> object:
    """Record each run under ``key``, then wait for a token on ``test:<gate>`` (one per
    run); then fail (ValueError) or return ``result``."""
    client = _redis()
    client.rpush(f"test:{key}", str(os.getpid()))
    if client.blpop([f"test:{gate}"], timeout=seconds) is None:
        raise TimeoutError(f"nobody opened the gate {gate!r} within {seconds} s")
    if fail:
        raise ValueError(f"gated job {key} fails as asked")
    return result


def count_parents() -> list[int]:
    """[how many parents, the sum of their results]."""
    found = parents()
    return [len(found), sum(found.values())]  # type: ignore[arg-type]


def item_after(item: list[object]) -> object:
    """A map item ``[value, seconds]``: sleep, then return the value."""
    value, seconds = item
    time.sleep(float(seconds))  # type: ignore[arg-type]
    return value


def item_or_fail(item: list[object]) -> object:
    """A map item ``[value, fail]``: raise ValueError naming the value when ``fail``."""
    value, fail = item
    if fail:
        raise ValueError(f"item with value {value} fails")
    return value


def square(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x * x


def timed_item(item: dict[str, object]) -> object:
    """A map item ``{"key", "value", "seconds", "gate", "fail", "fail_first", "hang"}``: sleep
    ``seconds``, wait for a token on ``test:<gate>`` if given, then fail (ValueError) when
    ``fail``, or on its first run when ``fail_first``; else record "<value> <when it ended>"
    under ``key`` and return the value.
    With ``hang``, its first run records its pid under ``key:pid`` and sleeps 30 s (a run to
    kill)."""
    client = _redis()
    key, value = item["key"], item["value"]
    first = client.incr(f"test:{key}:{value}:runs") == 1
    if item.get("hang") and first:
        client.rpush(f"test:{key}:pid", str(os.getpid()))
        time.sleep(30)
    time.sleep(float(item.get("seconds", 0)))  # type: ignore[arg-type]
    if item.get("gate") and client.blpop([f"test:{item['gate']}"], timeout=30) is None:
        raise TimeoutError(f"nobody opened the gate {item['gate']!r} within 30 s")
    if item.get("fail") or (item.get("fail_first") and first):
        raise ValueError(f"item {value} fails as asked")
    client.rpush(f"test:{key}", f"{value} {time.time()!r}")
    return value


def group_report(key: str) -> dict[str, object]:
    """Record when it starts under ``key:report``; return the results of the groups it waited
    for (``current_job().group_results``, by group id; a failed item as "failed <index>:
    <the error>") and of its parent jobs."""
    import jobq

    _redis().rpush(f"test:{key}:report", repr(time.time()))
    ctx = jobq.current_job()
    if ctx is None:
        raise RuntimeError("not inside a jobq job")
    groups = {gid: [f"failed {r.index}: {r}" if isinstance(r, Exception) else r
                    # one group: the default, else by id
                    for r in (ctx.group_results() if len(ctx.parent_groups) == 1
                              else ctx.group_results(gid))]
              for gid in ctx.parent_groups}
    return {"groups": groups, "parents": ctx.parent_results()}


def sleep_until_cancelled(key: str, seconds: float) -> str:
    """Record "started", then sleep ``seconds``; record the name of whatever interrupts it
    (JobCancelled), or "finished" when the sleep ran to its end."""
    client = _redis()
    client.rpush(f"test:{key}", "started")
    try:
        time.sleep(seconds)
    except BaseException as exc:
        client.rpush(f"test:{key}", type(exc).__name__)
        raise
    client.rpush(f"test:{key}", "finished")
    return "slept"


# -- for test_scheduler.py -------------------------------------------------------------------


def record_job_id(key: str) -> str:
    """Record "<this job's id> <pid>" under ``key`` (schedule fires are "<name>@<due ms>")."""
    import jobq

    ctx = jobq.current_job()
    job_id = ctx.id if ctx is not None else "?"
    _redis().rpush(f"test:{key}", f"{job_id} {os.getpid()}")
    return job_id


def fail_times(key: str, times: int, exc: str = "ValueError") -> str:
    """Record the run (its time); the first ``times`` runs raise the builtin exception named
    ``exc``, later runs return."""
    import builtins

    runs = _redis().rpush(f"test:{key}", repr(time.time()))
    if runs <= times:
        raise getattr(builtins, exc)(f"run {runs} of {key} fails")
    return f"run {runs}"


def record_attempt(key: str, times: int) -> str:
    """Record what ``current_job()`` says of this attempt, and the attempts the job's record
    shows meanwhile (JSON); the first ``times`` runs raise ValueError."""
    import json

    import jobq

    ctx = jobq.current_job()
    assert ctx is not None
    seen = jobq.JobQueue(redis_url=os.environ["JOBQ_REDIS_URL"]).get_job(ctx.id)
    runs = _redis().rpush(f"test:{key}", json.dumps({
        "attempt": ctx.attempt, "retries": ctx.retries, "max_retries": ctx.max_retries,
        "deliveries": ctx.deliveries, "requeues": ctx.requeues, "id": ctx.id,
        "task": ctx.task, "queue": ctx.queue,
        "record": [seen.attempts, seen.retries, seen.deliveries] if seen else None}))
    if runs <= times:
        raise ValueError(f"run {runs} of {key} fails")
    return f"run {runs}"


def retry_once(key: str, delay: float) -> str:
    """Record the run (its time); the first run asks for another attempt in ``delay`` s."""
    import jobq

    runs = _redis().rpush(f"test:{key}", repr(time.time()))
    if runs == 1:
        raise jobq.Retry(delay=delay)
    return f"run {runs}"


# -- for test_chaos.py -----------------------------------------------------------------------


def _chaos_mark(key: str) -> str:
    """RPUSH this job's id to ``test:<key>`` (one entry per run) and the worker's pid to
    ``test:<key>:pid``; return the id."""
    import jobq

    ctx = jobq.current_job()
    job_id = ctx.id if ctx is not None else "?"
    _redis().pipeline(transaction=False).rpush(f"test:{key}", job_id).rpush(
        f"test:{key}:pid", f"{job_id} {os.getpid()}").execute()
    return job_id


def chaos_record(key: str) -> str:
    """A short job: record the run (its job id), nothing else."""
    return _chaos_mark(key)


def chaos_record_payload(key: str, payload: str) -> str:
    """A short job carrying a payload (to fill a server): record the run."""
    return _chaos_mark(key)


def chaos_record_sleep(key: str, seconds: float) -> str:
    """Record the run, then sleep ``seconds``."""
    job_id = _chaos_mark(key)
    time.sleep(seconds)
    return job_id


def chaos_cpu(key: str, seconds: float) -> str:
    """A CPU-heavy job: record the run, then burn ``seconds`` of this thread's CPU time in
    pure Python (arithmetic, no sleeping: the GIL is never released on purpose)."""
    job_id = _chaos_mark(key)
    deadline = time.thread_time() + seconds
    x = 0
    while time.thread_time() < deadline:
        for i in range(500):
            x += i * i
    return job_id


def chaos_sleep(key: str, seconds: float) -> str:
    """Record the run, then sleep ``seconds``: a job that is running when the fault hits."""
    job_id = _chaos_mark(key)
    time.sleep(seconds)
    return job_id


def chaos_hog(key: str, chunk_mb: int = 10, pause: float = 0.025) -> str:
    """Record the run, then allocate without bound: a ``chunk_mb`` chunk (every page written)
    every ``pause`` seconds, until something kills the process."""
    _chaos_mark(key)
    hog = []
    while True:
        hog.append(b"x" * (chunk_mb << 20))
        time.sleep(pause)


def chaos_grandchildren(key: str, block_alarm: bool = False) -> str:
    """Start two grandchildren that would sleep five minutes (``subprocess.Popen`` of
    ``sleep 300``, and an ``os.fork`` child), record their pids under ``test:<key>:kids``,
    then hang (with ``block_alarm``: deaf to the soft timeout, for the master's hard limit)."""
    import subprocess

    _chaos_mark(key)
    if block_alarm:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    popen = subprocess.Popen(["sleep", "300"])
    forked = os.fork()
    if forked == 0:  # the forked grandchild: sleep, then leave without any cleanup
        try:
            time.sleep(300)
        finally:
            os._exit(0)
    _redis().rpush(f"test:{key}:kids", str(popen.pid), str(forked))
    time.sleep(300)
    return "never"


def chaos_die_mid_slot_write(key: str) -> str:
    """Record the run; the first run then dies like a worker SIGKILLed in the middle of
    writing its slot in the master's shared memory: after the first store of the seqlock
    (the sequence made odd, "being written") and before the second. Later runs return."""
    import struct

    from jobq import context

    job_id = _chaos_mark(key)
    if len(_redis().lrange(f"test:{key}", 0, -1)) == 1:
        slot = context.worker.slot if context.worker is not None else None
        if slot is not None:
            seq = struct.unpack_from("<Q", slot.mem, slot.offset)[0]
            struct.pack_into("<Q", slot.mem, slot.offset, seq | 1)
        os.kill(os.getpid(), signal.SIGKILL)
    return job_id


def chaos_die_in_flight(key: str, when: str = "flight") -> str:
    """Record the run; the first run at the moment ``when`` then SIGKILLs its worker. Later
    runs return. "flight": the worker's next exchange is sent and its reply not read yet
    (jobq.worker_loop: _send_ahead): acks sent but unconfirmed, acks after them, jobs claimed
    unseen. "landed": an exchange sent ahead was read, and acks journaled while it flew are
    not sent yet."""
    from jobq import context

    job_id = _chaos_mark(key)
    worker = context.worker
    if worker is None:
        return job_id
    now = (worker._flight is not None if when == "flight"
           else worker.sent_ahead > 0 and worker._flight is None and bool(worker._acks))
    if now and _redis().set(f"test:{key}:killed", job_id, nx=True):
        os.kill(os.getpid(), signal.SIGKILL)
    return job_id


def chaos_cut_in_flight(key: str) -> str:
    """Record the run; the first run that finds its worker's next exchange in flight cuts
    the worker's connection under it (the reply is lost: did the server run it?). Later runs
    return."""
    import socket

    from jobq import context

    job_id = _chaos_mark(key)
    worker = context.worker
    if worker is not None and worker._flight is not None and \
            _redis().set(f"test:{key}:cut", job_id, nx=True):
        conn = worker.broker.scripts._conn
        conn._sock.shutdown(socket.SHUT_RDWR)
    return job_id


# -- for test_limits.py ----------------------------------------------------------------------


def _span(key: str, seconds: float) -> str:
    """Record this run's own start and end times (and pid) in ``test:<key>``: the limits'
    tests judge overlaps and rates by them, not by the machine's timings."""
    start = time.time()
    time.sleep(seconds)
    _redis().rpush(f"test:{key}", f"{start:.6f} {time.time():.6f} {os.getpid()}")
    return "ok"


@task(concurrency=1)
def one_at_a_time(key: str, seconds: float = 0.0) -> str:
    """At most one runs at once, across every host."""
    return _span(key, seconds)


@task(concurrency=2)
def two_at_a_time(key: str, seconds: float = 0.0) -> str:
    return _span(key, seconds)


@task(rate_limit="20/s")
def twenty_a_second(key: str) -> str:
    """Records its start time: at most 20 starts a second (burst 1)."""
    _redis().rpush(f"test:{key}", f"{time.time():.6f}")
    return "ok"


@task(limits=["gpu"])
def on_the_gpu(key: str, seconds: float = 0.0) -> str:
    """Shares the named limit "gpu" (defined by the test)."""
    return _span(key, seconds)


@task(concurrency=1)
def one_at_a_time_marked(key: str, seconds: float = 30) -> str:
    """One at a time; records its pid first (a run to kill), then its span. Only the first
    run takes ``seconds`` (a job given back when its host is lost runs again)."""
    runs = _redis().rpush(f"test:{key}:pid", str(os.getpid()))
    return _span(key, seconds if runs == 1 else 0)


@task(concurrency=1000)
def limited_noop() -> None:
    """A limit too high to bind: what a limit costs (bench, tests)."""
    return None


# -- for test_many_hosts.py ------------------------------------------------------------------


def hosts_record(key: str, seconds: float = 0.0) -> str:
    """Record the run (its job id to ``test:<key>``, as the chaos tasks do, and "<id> <host>"
    to ``test:<key>:host``), sleep ``seconds``, and return the host's name ($JOBQ_TEST_HOST):
    the final record says which host completed the job."""
    import jobq

    ctx = jobq.current_job()
    job_id = ctx.id if ctx is not None else "?"
    host = os.environ.get("JOBQ_TEST_HOST", "?")
    _redis().pipeline(transaction=False).rpush(f"test:{key}", job_id).rpush(
        f"test:{key}:host", f"{job_id} {host}").execute()
    if seconds:
        time.sleep(seconds)
    return host


# -- for test_cluster.py -----------------------------------------------------------------------

_routed: dict[tuple[int, str], object] = {}


def cluster_mark(key: str) -> str:
    """RPUSH this job's id to ``test:{<key>}`` (hash-tagged: one slot, also on a Cluster,
    through a client routed to it); return the id."""
    import jobq

    ctx = jobq.current_job()
    job_id = ctx.id if ctx is not None else "?"
    name = f"test:{{{key}}}"
    client = _routed.get((os.getpid(), key))
    if client is None:
        client = _routed[(os.getpid(), key)] = connect(os.environ["JOBQ_REDIS_URL"], route=name)
    client.rpush(name, job_id)  # type: ignore[attr-defined]
    return job_id
