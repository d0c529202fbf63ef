"""The ``jobq`` command line (click): :mod:`.app` holds what every command shares, the
commands live in :mod:`.run`, :mod:`.ops`, :mod:`.workers`, :mod:`.limits`, :mod:`.metrics`,
:mod:`.web` and :mod:`.bench`, and ``jobq-master``'s command line in :mod:`.master`."""

# each registers its commands on the group
from . import bench, limits, metrics, ops, run, web, workers  # noqa: F401
from .app import main

__all__ = ["main", "master_main"]


def master_main(argv: list[str] | None = None) -> None:
    """Entry point of ``jobq-master``."""
    from .master import main as run_master  # lazy: ``jobq`` itself needs no master

    run_master(argv)
