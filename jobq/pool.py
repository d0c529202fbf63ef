"""``WorkerPool``: a supervised pool of worker processes started from a Python script.

``WorkerPool(queue, num_workers=2).start()`` forks a jobq master from the script, so the
functions the script defines (``__main__``) can be enqueued and run: the master's workers are
forked from it and have them. ``stop()`` stops the pool gracefully (running jobs finish).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import psutil

from . import job as jobs
from .master.arbiter import Master, Options
from .process import die_with_parent
from .queue import JobQueue
from .scheduler import drop_owned_schedules, owner_id

log = logging.getLogger("jobq.pool")


class WorkerPool:
    """A supervised pool of worker processes, started from Python.

    ``WorkerPool(queue, num_workers=2).start()`` forks a jobq master from this process, so
    functions defined in this script (``__main__``) can be enqueued and run: the workers are
    forked from it. ``stop()`` stops it gracefully (running jobs finish) and waits.
    """

    def __init__(self, queue: JobQueue, num_workers: int = 4, *,
                 queues: Sequence[str] | None = None, imports: Sequence[str] = ()) -> None:
        self.queue = queue
        self.num_workers = num_workers
        self.queues = list(queues or [queue.name])
        self.imports = list(imports)
        self.pid = 0

    @property
    def workers(self) -> list[int]:
        """Pids of the live worker processes."""
        if not self.pid:
            return []
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        return [p.pid for p in children if "jobq worker" in " ".join(p.cmdline())]

    def start(self, timeout: float = 30.0) -> None:
        """Fork the master and wait until its workers are up."""
        if self.pid:
            raise RuntimeError("this pool is already started")
        config = self.queue.config.replace(
            workers=self.num_workers, queues=self.queues,
            imports=list(dict.fromkeys([*self.queue.config.imports, *self.imports])),
            redis_url=self.queue.url)
        owner = owner_id()
        jobs.main_tasks_allowed, jobs.main_owner = True, owner
        script = os.getpid()
        ready_r, ready_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the master
            code = 1
            try:
                os.close(ready_r)
                os.setsid()  # Ctrl-C in the terminal reaches the script, which stops us
                # ... and the pool dies with the script, however it ends (return, exception,
                # Ctrl-C, TERM, kill -9): SIGTERM, a graceful stop, when the script is gone
                die_with_parent(signal.SIGTERM)
                if os.getppid() != script:
                    return  # it died before that took effect (finally: exit)

                def ready() -> None:
                    os.write(ready_w, b"1")

                options = Options(allow_main=True, owner=owner, on_ready=ready)
                code = Master(config, options).run()
            finally:
                os._exit(code)
        os.close(ready_w)
        self.pid = pid
        readable, _, _ = select.select([ready_r], [], [], timeout)
        got = os.read(ready_r, 1) if readable else b""
        os.close(ready_r)
        if got != b"1":
            self.stop(timeout=5)
            raise RuntimeError("the worker pool did not start (see its log)")
        log.info("started %d workers", self.num_workers)

    def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully: running jobs finish (killed and re-queued after ``timeout``)."""
        if not self.pid:
            return
        pid, self.pid = self.pid, 0
        wait = self.queue.config.graceful_timeout + 5 if timeout is None else timeout
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.02)
        else:
            os.kill(pid, signal.SIGQUIT)  # the master re-queues what still runs
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        drop_owned_schedules(self.queue)
        log.info("all workers stopped")

    def __enter__(self) -> WorkerPool:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
