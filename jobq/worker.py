"""The worker side of jobq, as scripts import it: :class:`Worker` (the loop of one worker
process, in :mod:`jobq.worker_loop`) and :class:`WorkerPool`.

``from jobq.worker import WorkerPool`` is how scripts that start their own pool have always
imported it; it lives in :mod:`jobq.pool`, above the master that it forks, which itself forks
workers from :mod:`jobq.worker_loop`, below it. This face sits above them all: nothing in jobq
imports it.
"""

from .pool import WorkerPool
from .worker_loop import Worker, worker_name

__all__ = ["Worker", "WorkerPool", "worker_name"]
