"""Per-task tallies of what each worker ran, in shared memory, for the master's metrics.

Only made when metrics are on (``metrics_port``). Like :mod:`jobq.slots`, one anonymous shared
region mapped by the master before it forks, one part per worker slot::

    worker (per job, in its own memory)          master (on a scrape, or when a worker exits)
    record(queue, task, status, duration, wait)   Totals.snapshot(): the dead workers' folded
        │ a few list increments, no system call        totals + every live slot's table
        ▼                                         ▲
    publish() when its acks reach the server ─────┘ TallyTable.read(slot) (a seqlock)
      (once per batch of acks: one pack_into per task that ran since)

A worker counts per (queue, task): the outcomes of its attempts (completed, failed for good,
retried, cancelled) and two histograms: how long each attempt ran, and how long a job waited
from its enqueue to the start of its first attempt. It publishes its table when the
acknowledgements of those jobs reached the server, so the counts follow the server's own
(``get_stats``). When a worker exits, the master folds its last table into its totals before
the slot is used again, so counters never go back.

What this does not count: the counts of a worker killed between two publishes (at most the
``FLUSH_INTERVAL`` of acks the master sends for it), and the attempts that end without their
worker settling them (its worker died under it: the master gives the job back, and the
server counts it as retried or failed).
"""

from __future__ import annotations

import mmap
import struct
import threading
from bisect import bisect_left
from collections.abc import Iterable

from ..wire import ROUTE

#: Upper bounds (seconds) of the buckets of the job duration histogram (and +Inf).
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 300.0, 1800.0)
#: Upper bounds (seconds) of the buckets of the enqueue-to-start histogram (and +Inf).
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0, 3600.0)
#: The outcomes counted, as :class:`jobq.settle.Settlement` names them, in table order.
OUTCOMES = ("completed", "failed", "retry", "cancelled")
#: Distinct (queue, task) a worker tallies; beyond, its jobs count under OTHER_TASK.
MAX_TASKS = 64
#: The task label of jobs beyond MAX_TASKS, and of jobs whose task could not be run (bad
#: data, a task not allowed: their name is whatever the job said, not a task of ours).
OTHER_TASK, INVALID_TASK = "(other)", "(invalid)"
#: Bytes of an entry's name (queue, 0x1f, task; a longer one is cut).
NAME_SIZE = 192

_N_OUT, _N_DUR, _N_WAIT = len(OUTCOMES), len(DURATION_BUCKETS) + 1, len(WAIT_BUCKETS) + 1
#: Offsets in an entry's numbers: outcomes, duration buckets, duration sum, wait buckets,
#: wait sum.
DUR0 = _N_OUT
DUR_SUM = DUR0 + _N_DUR
WAIT0 = DUR_SUM + 1
WAIT_SUM = WAIT0 + _N_WAIT
WIDTH = WAIT_SUM + 1
_FLOATS = (DUR_SUM, WAIT_SUM)
_ENTRY = struct.Struct(f"<H{NAME_SIZE}s" + "".join(
    "d" if i in _FLOATS else "Q" for i in range(WIDTH)))
#: A slot's header: sequence number (odd while written), entries in use.
_HEAD = struct.Struct("<QI")
SLOT_SIZE = _HEAD.size + MAX_TASKS * _ENTRY.size
_SEP = "\x1f"
_INDEX = {status: i for i, status in enumerate(OUTCOMES)}
_ZERO = [0.0 if i in _FLOATS else 0 for i in range(WIDTH)]

#: (queue, task) -> its numbers (WIDTH of them, laid out as the offsets above say).
Table = dict[tuple[str, str], list[float]]


class TallyTable:
    """``capacity`` slots' tallies in one shared anonymous mapping (made before forking)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.mem = mmap.mmap(-1, SLOT_SIZE * capacity, flags=mmap.MAP_SHARED)

    def writer(self, index: int) -> Tally:
        """The worker's end of slot ``index`` (made in the worker, after fork)."""
        return Tally(self.mem, self._offset(index))

    def _offset(self, index: int) -> int:
        if not 0 <= index < self.capacity:
            raise IndexError(f"slot {index} out of range (capacity {self.capacity})")
        return index * SLOT_SIZE

    def read(self, index: int) -> Table:
        """A consistent copy of slot ``index``'s table (the last one read if its worker was
        killed in the middle of a publish)."""
        offset = self._offset(index)
        table: Table = {}
        for _ in range(100):
            seq, count = _HEAD.unpack_from(self.mem, offset)
            table = {}
            for i in range(min(count, MAX_TASKS)):
                n, name, *numbers = _ENTRY.unpack_from(self.mem,
                                                       offset + _HEAD.size + i * _ENTRY.size)
                queue, _, task = name[:n].decode(errors="replace").partition(_SEP)
                table[(queue, task)] = numbers
            if seq % 2 == 0 and _HEAD.unpack_from(self.mem, offset)[0] == seq:
                break
        return table

    def clear(self, index: int) -> None:
        seq = _HEAD.unpack_from(self.mem, self._offset(index))[0]
        _HEAD.pack_into(self.mem, self._offset(index), (seq | 1) + 1, 0)


class Tally:
    """A worker's tallies: counted in its own memory, published to its slot in batches."""

    __slots__ = ("mem", "offset", "_entries", "_dirty", "_seq")

    def __init__(self, mem: mmap.mmap, offset: int) -> None:
        self.mem = mem
        self.offset = offset
        #: (queue, task) -> [its index in the slot, then its WIDTH numbers]
        self._entries: dict[tuple[str, str], list[float]] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._seq = _HEAD.unpack_from(mem, offset)[0] & ~1

    def record(self, queue: str, task: str, status: str, duration: float,
               wait: float | None) -> None:
        """One attempt ended (``status``: completed, failed, retry or cancelled); ``wait``
        is its job's enqueue-to-start time, None when not observed."""
        key = (queue, task)
        e = self._entries.get(key)
        if e is None:
            key = self._place(key)
            e = self._entries[key]
        e[1 + _INDEX[status]] += 1
        e[1 + DUR0 + bisect_left(DURATION_BUCKETS, duration)] += 1
        e[1 + DUR_SUM] += duration
        if wait is not None:
            wait = max(0.0, wait)  # the enqueuing host's clock may be a little ahead
            e[1 + WAIT0 + bisect_left(WAIT_BUCKETS, wait)] += 1
            e[1 + WAIT_SUM] += wait
        self._dirty.add(key)

    def _place(self, key: tuple[str, str]) -> tuple[str, str]:
        """Where a (queue, task) seen for the first time is counted: an entry of its own
        while there is room (the last place is kept for OTHER_TASK), else its queue's
        OTHER_TASK entry, or the first one made once the table is full."""
        if len(self._entries) < MAX_TASKS - 1:
            self._entries[key] = [len(self._entries), *_ZERO]
            return key
        other = (key[0], OTHER_TASK)
        if other not in self._entries:
            if len(self._entries) >= MAX_TASKS:
                return next(k for k in self._entries if k[1] == OTHER_TASK)
            self._entries[other] = [len(self._entries), *_ZERO]
        return other

    def publish(self) -> None:
        """Write what changed since the last publish to the slot (the worker calls this once
        its acknowledgements reached the server)."""
        if not self._dirty:
            return
        base = self.offset
        self._seq += 1  # odd: being written
        _HEAD.pack_into(self.mem, base, self._seq, len(self._entries))
        for key in self._dirty:
            e = self._entries[key]
            name = f"{key[0]}{_SEP}{key[1]}".encode(errors="replace")[:NAME_SIZE]
            _ENTRY.pack_into(self.mem, base + _HEAD.size + int(e[0]) * _ENTRY.size,
                             len(name), name, *e[1:])
        self._seq += 1
        _HEAD.pack_into(self.mem, base, self._seq, len(self._entries))
        self._dirty.clear()


def add_into(total: Table, table: Table) -> None:
    """Add ``table``'s numbers into ``total``, a route's jobs under their queue."""
    for (queue, task), numbers in table.items():
        key = (queue.partition(ROUTE)[0], task)
        have = total.get(key)
        if have is None:
            total[key] = list(numbers)
        else:
            for i, n in enumerate(numbers):
                have[i] += n


class Totals:
    """The master's sums: the tallies of its workers that exited, plus the live ones'.

    The arbiter folds a worker that exited (:meth:`worker_gone`) and a scrape reads
    (:meth:`snapshot`) under one lock, held for memory copies only, so a scrape never sees a
    worker's counts twice or not at all."""

    def __init__(self, table: TallyTable) -> None:
        self.table = table
        self._gone: Table = {}
        self._lock = threading.Lock()

    def worker_gone(self, index: int) -> None:
        """Fold slot ``index``'s last table into the totals and clear it (before the slot's
        next worker starts)."""
        with self._lock:
            add_into(self._gone, self.table.read(index))
            self.table.clear(index)

    def snapshot(self, slots: Iterable[int] | None = None) -> Table:
        total: Table = {}
        with self._lock:
            add_into(total, self._gone)
            for index in range(self.table.capacity) if slots is None else slots:
                add_into(total, self.table.read(index))
        return total
