"""The worker side of jobq: :mod:`.loop` is the loop of one worker process.

``WorkerPool`` is importable from here too (``from jobq.worker import WorkerPool`` is how
scripts that start their own pool have always imported it); it lives in :mod:`jobq.pool`,
above the master that it forks, which itself forks these workers.
"""

from typing import Any

from .loop import Worker, worker_name

__all__ = ["Worker", "WorkerPool", "worker_name"]


def __getattr__(name: str) -> Any:
    if name == "WorkerPool":
        from ..pool import WorkerPool  # lazy: the pool imports the master, which imports us

        return WorkerPool
    raise AttributeError(f"module 'jobq.worker' has no attribute {name!r}")
