"""The pre-fork master: :mod:`.arbiter` supervises processes, :mod:`.policy` decides,
:mod:`.duties` does what the master owes the server, in a thread of its own."""

from .arbiter import Master

__all__ = ["Master"]
