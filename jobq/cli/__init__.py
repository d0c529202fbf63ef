"""The ``jobq`` command line (click): :mod:`.app` holds what every command shares, the
commands live in :mod:`.run`, :mod:`.ops`, :mod:`.workers`, :mod:`.bench` and :mod:`.web`, and
``jobq-master``'s command line in :mod:`.master`."""

from . import bench, ops, run, web, workers  # noqa: F401  (each registers its commands on the group)
from .app import main

__all__ = ["main", "master_main"]


def master_main(argv: list[str] | None = None) -> None:
    """Entry point of ``jobq-master``."""
    from .master import main as run_master  # lazy: ``jobq`` itself needs no master

    run_master(argv)
