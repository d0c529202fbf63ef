"""The pre-fork master: :mod:`.arbiter` supervises, :mod:`.policy` decides, :mod:`.cli` parses."""

from .arbiter import Master

__all__ = ["Master"]
