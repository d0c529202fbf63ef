"""``jobq demo``: jobq's main job, end to end on the embedded server.

A CPU-heavy batch (counting primes) where a few inputs fail on purpose, run by real worker
processes, then a report of what happened to every job.

It runs in a key namespace of its own (:data:`PREFIX`), deleted before it starts (a demo
interrupted earlier may have left it) and once it is done: the user's own queues, jobs and
records on the same server, a ``demo`` queue included, are never touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from .config import Config
from .job import JobStatus
from .queue import JobQueue
from .registry import task
from .urls import redact

QUEUE = "demo"
#: The key prefix of the demo's namespace (as the bench has its own).
PREFIX = "jobqdemo"


@task(queue=QUEUE, max_retries=1, timeout=60)
def count_primes(limit: int) -> int:
    """Count the primes below ``limit`` (pure-Python CPU work); some limits fail on purpose."""
    if limit % 7 == 3:
        raise ValueError(f"refusing unlucky limit {limit}")
    sieve = bytearray([1]) * limit
    sieve[0:2] = b"\x00\x00"
    for i in range(2, int(limit ** 0.5) + 1):
        if sieve[i]:
            sieve[i * i::i] = bytes(len(range(i * i, limit, i)))
    total = 0
    for i in range(limit):  # the slow, honest part: a pure-Python loop
        total += sieve[i]
    return total


def run_demo(config: Config, url: str, jobs: int, workers: int) -> int:
    queue = JobQueue(QUEUE, redis_url=url, config=config.replace(prefix=PREFIX))
    queue.broker.delete_namespace()
    try:
        with tempfile.TemporaryDirectory(prefix="jobq-demo-") as tmp:
            return _run(queue, url, jobs, workers, Path(tmp))
    finally:
        queue.broker.delete_namespace()


def _run(queue: JobQueue, url: str, jobs: int, workers: int, tmp: Path) -> int:
    limits = [600_000 + 10_000 * i for i in range(jobs)]
    started = time.time()
    batch = queue.enqueue_many(count_primes, [(n,) for n in limits])
    click.echo(f"enqueued {len(batch)} jobs on queue {QUEUE!r} at {_where(url)} (in a key "
               f"namespace of their own, {PREFIX!r}, deleted afterwards); running them on a "
               f"jobq-master with {workers} workers")
    master = _start_master(url, workers, tmp)
    try:
        done = [queue.wait(job.id, timeout=300) for job in batch]
    finally:
        master.terminate()  # SIGTERM: a graceful stop
        master.wait(timeout=60)
    elapsed = time.time() - started
    ok = [j for j in done if j.status is JobStatus.COMPLETED]
    failed = [j for j in done if j.status is JobStatus.FAILED]
    click.echo(f"\n{'job':>26}  {'limit':>8}  {'status':<9}  {'attempts':>8}  result")
    for job in done:
        shown = job.return_value if job.status is JobStatus.COMPLETED else job.error
        click.echo(f"{job.id:>26}  {job.args[0]:>8}  {job.status.value:<9}  "
                   f"{job.attempts:>8}  {shown}")
    click.echo(f"\n{len(ok)} completed, {len(failed)} failed (after their retry), "
               f"in {elapsed:.2f} s ({len(done) / elapsed:.1f} jobs/s)")
    return 0 if len(ok) + len(failed) == len(done) else 1


def _start_master(url: str, workers: int, tmp: Path) -> subprocess.Popen[bytes]:
    """The same jobq-master users run, as a child process, in the demo's namespace."""
    config = tmp / "demo.toml"
    config.write_text(f'prefix = "{PREFIX}"\n')
    env = {**os.environ, "JOBQ_REDIS_URL": url}
    cmd = [sys.executable, "-m", "jobq.cli.master", "--config", str(config), "--workers",
           str(workers), "-q", QUEUE, "-I", __name__, "--log-level", "error"]
    return subprocess.Popen(cmd, env=env)


def _where(url: str) -> str:

    return redact(url)
