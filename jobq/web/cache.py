"""A cache of the dashboard's reads: each key is read from the server at most once per
``ttl`` seconds, whoever asks, so that N viewers polling cost the server what one does."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

#: How long a read stays fresh (seconds): the live pages poll every 2 s.
TTL = 1.0
#: At most this many keys are kept (a job page each, a dead-letter queue each, ...).
MAX_KEYS = 512


class TtlCache:
    """``get(key, read)``: ``read()``'s value, at most ``ttl`` seconds old.

    Viewers asking for a key that is being read wait for that read instead of making their
    own (a lock per key). ``clock`` is a parameter for the tests."""

    def __init__(self, ttl: float = TTL, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = MAX_KEYS) -> None:
        self.ttl, self.clock, self.max_keys = ttl, clock, max_keys
        self._values: dict[Hashable, tuple[float, Any]] = {}
        #: a lock per key being read, and how many viewers hold or wait for it: dropped when
        #: none does, so the table holds only the reads in flight (any ?id= is a key)
        self._locks: dict[Hashable, tuple[threading.Lock, int]] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, read: Callable[[], Any], ttl: float | None = None) -> Any:
        """``ttl``: this key's own, instead of the cache's (a costlier read kept longer)."""
        with self._lock:
            lock, users = self._locks.get(key) or (threading.Lock(), 0)
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                hit = self._values.get(key)
                if hit is not None and \
                        self.clock() - hit[0] < (self.ttl if ttl is None else ttl):
                    return hit[1]
                value = read()  # an exception is not cached: the next viewer reads again
                with self._lock:
                    if len(self._values) >= self.max_keys and key not in self._values:
                        self._values.clear()  # crude, and rare: keys are pages people look at
                    self._values[key] = (self.clock(), value)
                return value
        finally:
            with self._lock:
                lock, users = self._locks[key]
                if users > 1:
                    self._locks[key] = (lock, users - 1)
                else:
                    del self._locks[key]

    def clear(self) -> None:
        """Forget every value (after an action: the next page shows what it did)."""
        with self._lock:
            self._values.clear()
