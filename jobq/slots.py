"""Shared memory between the master and its workers: what each worker is doing right now.

The master maps one anonymous shared region before it forks; slot ``i`` belongs to the worker
in pool slot ``i``. A worker writes its state at each job start and end (about a microsecond);
the master reads every slot on its ticks, without asking Redis.

A slot is guarded by a sequence number (a seqlock): the worker makes it odd, writes the
fields, then makes it even again; the master keeps a copy only when it read the same even
sequence before and after the fields, so it never reads a job id with another job's start
time (tests/test_slots.py races a writer against a reader).

Each slot also has an *ack journal*: the worker batches the acknowledgements of short jobs
(sent to Redis every few milliseconds), and writes each one here first. When a worker dies,
the master sends the acknowledgements it had not sent yet, so a job that finished is not run
again: only the job that was running when the worker died is. The journal has two halves: a
worker that sends a batch while it goes on running jobs (jobq.worker_loop) journals the new
acknowledgements in one half while the other holds those sent, until the server confirms
them; the master sends what both hold (ack.lua skips what was settled already).
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

#: A slot: its sequence (8 bytes, first), then pid, state, jobs done, heartbeat, job started,
#: job deadline, job id (len + bytes), boot error message (len + bytes). The sequence is
#: stored and loaded as one aligned 8-byte word (a memoryview's item), never with struct,
#: whose pack_into zeroes its whole span before it writes the fields one by one: a reader
#: would see a sequence of 0, or a part of one.
_FIELDS = struct.Struct("<qiQdddH64sH200s")
SIZE = 8 + _FIELDS.size
#: A reader that finds a slot being written tries this many times at once, then yields the
#: core to the writer for up to READ_PATIENCE seconds before it takes the last copy read.
READ_SPINS = 100
READ_PATIENCE = 0.005
#: A cancel target: length byte + job id.
CANCEL_SIZE = 65
#: The ack journal of a slot: two halves, each a header (entry count and bytes used, in one
#: aligned 8-byte word, stored at once: a worker killed at any point leaves it whole), then
#: length-prefixed entries.
JOURNAL_SIZE = 256 * 1024
_HALF = JOURNAL_SIZE // 2
_HEAD = 8
_ENTRY_LEN = struct.Struct("<I")
#: Separates the fields of a journal entry (JSON text never holds a raw one: it escapes it).
_SEP = "\x1f"

#: Slot states.
FREE, BOOTING, IDLE, BUSY, EXITING = range(5)


@dataclass(frozen=True)
class SlotView:
    """A copy of one slot: consistent when ``whole`` (the same even sequence before and after
    it); else the last copy read of a slot whose writer stopped within a write (dead, or not
    scheduled for READ_PATIENCE)."""

    pid: int
    state: int
    jobs_done: int
    heartbeat: float
    job_started: float
    deadline: float
    job_id: str | None
    message: str
    whole: bool = True


class SlotTable:
    """``capacity`` slots in one shared anonymous mapping (create it before forking)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # the workers' slots, one cancel target per slot (written by the master only), then
        # one ack journal per slot (pages are only touched, so only resident, when used)
        self.mem = mmap.mmap(-1, self._journal_offset(capacity), flags=mmap.MAP_SHARED)
        # the sequences, as words: slot i's is item i * SIZE // 8 (SIZE is a multiple of 8)
        self._seqs = memoryview(self.mem)[:SIZE * capacity].cast("Q")

    def slot(self, index: int) -> Slot:
        if not 0 <= index < self.capacity:
            raise IndexError(f"slot {index} out of range (capacity {self.capacity})")
        return Slot(self.mem, index * SIZE, self._cancel_offset(index),
                    self._journal_offset(index))

    def _cancel_offset(self, index: int) -> int:
        return self.capacity * SIZE + index * CANCEL_SIZE

    def _journal_offset(self, index: int) -> int:
        base = self.capacity * (SIZE + CANCEL_SIZE)
        return base + -base % _HEAD + index * JOURNAL_SIZE  # its headers 8-byte aligned

    def unsent_acks(self, index: int) -> list[list[str]]:
        """The acknowledgements a (dead) worker had journaled and the server had not
        confirmed, both halves, each as its fields (:meth:`jobq.wire.AckEntry.from_fields`
        reads them back)."""
        entries: list[list[str]] = []
        for half in range(2):
            start = self._journal_offset(index) + half * _HALF
            count, used = _unhead(memoryview(self.mem)[start:start + _HEAD].cast("Q")[0])
            pos = start + _HEAD
            end = pos + min(used, _HALF - _HEAD)
            for _ in range(count):
                if pos + _ENTRY_LEN.size > end:
                    break
                (n,) = _ENTRY_LEN.unpack_from(self.mem, pos)
                pos += _ENTRY_LEN.size
                if pos + n > end:
                    break
                entries.append(bytes(self.mem[pos:pos + n]).decode(errors="replace")
                               .split(_SEP))
                pos += n
        return entries

    def set_cancel(self, index: int, job_id: str) -> None:
        """Name the job the master wants interrupted in this slot (before sending USR2)."""
        data = job_id.encode()[:CANCEL_SIZE - 1]
        offset = self._cancel_offset(index)
        self.mem[offset:offset + CANCEL_SIZE] = bytes([len(data)]) + data.ljust(
            CANCEL_SIZE - 1, b"\0")

    def read(self, index: int) -> SlotView:
        offset = index * SIZE
        seq = offset // 8
        tries, give_up, whole = 0, 0.0, True
        while True:
            before = self._seqs[seq]
            values = _FIELDS.unpack_from(self.mem, offset + 8)
            if before % 2 == 0 and self._seqs[seq] == before:
                break  # even, and the same after: no write began or ended in between
            tries += 1
            if tries >= READ_SPINS:
                # the writer is not running (not scheduled, or dead between its two stores):
                # let it run, a while; a dead one leaves the sequence odd for good, and the
                # last copy read is used (the fields of its last write, or of the one before,
                # or, for a writer killed within a store, some of each)
                now = time.monotonic()
                if not give_up:
                    give_up = now + READ_PATIENCE
                elif now > give_up:
                    whole = False
                    break
                os.sched_yield()
        pid, state, done, beat, started, deadline, n, job, m, msg = values
        return SlotView(pid, state, done, beat, started, deadline,
                        job[:n].decode(errors="replace") if n else None,
                        msg[:m].decode(errors="replace"), whole)

    def clear(self, index: int) -> None:
        Slot(self.mem, index * SIZE).write(FREE, 0, 0, 0.0, 0.0, 0.0, b"", b"")
        self.set_cancel(index, "")
        for half in range(2):
            start = self._journal_offset(index) + half * _HALF
            memoryview(self.mem)[start:start + _HEAD].cast("Q")[0] = 0


class Slot:
    """The worker's end of one slot."""

    __slots__ = ("mem", "offset", "cancel_offset", "journal", "pid", "jobs_done", "_seq",
                 "_seqs", "_count", "_used", "_half", "_heads")

    def __init__(self, mem: mmap.mmap, offset: int, cancel_offset: int = -1,
                 journal: int = -1) -> None:
        self.mem = mem
        self.offset = offset
        self.cancel_offset = cancel_offset
        self.journal = journal
        #: the half new acknowledgements go to; its entries and bytes; the halves' headers
        self._half = 0
        self._count = [0, 0]
        self._used = [0, 0]
        self._heads = [memoryview(mem)[h:h + _HEAD].cast("Q")
                       for h in (journal, journal + _HALF)] if journal >= 0 else []
        self.pid = 0
        self.jobs_done = 0
        self._seqs = memoryview(mem)[offset:offset + 8].cast("Q")
        self._seq = self._seqs[0] & ~1

    def write(self, state: int, pid: int, jobs: int, beat: float, started: float,
              deadline: float, job: bytes, message: bytes) -> None:
        seq = self._seq + 1
        self._seqs[0] = seq  # odd: being written
        _FIELDS.pack_into(self.mem, self.offset + 8, pid, state, jobs, beat, started, deadline,
                          len(job), job, len(message), message)
        self._seqs[0] = seq + 1  # even: written whole
        self._seq = seq + 1

    def boot(self, pid: int) -> None:
        self.pid = pid
        self.write(BOOTING, pid, 0, time.time(), 0.0, 0.0, b"", b"")

    def begin(self, job_id: str, started: float, deadline: float) -> None:
        self.write(BUSY, self.pid, self.jobs_done, started, started, deadline,
                   job_id.encode()[:64], b"")

    def end(self) -> None:
        self.jobs_done += 1
        self.write(IDLE, self.pid, self.jobs_done, time.time(), 0.0, 0.0, b"", b"")

    def idle(self) -> None:
        self.write(IDLE, self.pid, self.jobs_done, time.time(), 0.0, 0.0, b"", b"")

    def cancel_target(self) -> str:
        """The job id the master asked to interrupt (see SlotTable.set_cancel)."""
        if self.cancel_offset < 0:
            return ""
        n = self.mem[self.cancel_offset]
        return bytes(self.mem[self.cancel_offset + 1:self.cancel_offset + 1 + n]).decode(
            errors="replace")

    def journal_ack(self, fields: Sequence[object]) -> bool:
        """Record an acknowledgement not yet sent, in the current half; False when it is full
        (the worker then sends its acknowledgements at once)."""
        if self.journal < 0:
            return True
        data = _SEP.join(map(str, fields)).encode()
        h = self._half
        used = self._used[h]
        if used + _ENTRY_LEN.size + len(data) > _HALF - _HEAD:
            return False
        start = self.journal + h * _HALF + _HEAD + used
        _ENTRY_LEN.pack_into(self.mem, start, len(data))
        self.mem[start + _ENTRY_LEN.size:start + _ENTRY_LEN.size + len(data)] = data
        self._used[h] = used = used + _ENTRY_LEN.size + len(data)
        self._count[h] = count = self._count[h] + 1
        # the entry is complete before the header counts it (one 8-byte store)
        self._heads[h][0] = count | used << 32
        return True

    def journal_switch(self) -> int:
        """The current half's acknowledgements are being sent: new ones go to the other half
        (empty: what it held was confirmed). Returns the half sent, to settle once the server
        confirms it (:meth:`journal_settled`)."""
        sent = self._half
        if self.journal >= 0:
            assert not self._count[1 - sent], "the other half holds unconfirmed acks"
        self._half = 1 - sent
        return sent

    def journal_settled(self, half: int) -> None:
        """The server confirmed the acknowledgements of ``half``: forget them."""
        if self.journal >= 0 and self._count[half]:
            self._heads[half][0] = 0  # one store: the master sees all of them or none
            self._count[half] = self._used[half] = 0

    def journal_sent(self) -> None:
        """Every journaled acknowledgement reached Redis: forget them all."""
        self.journal_settled(0)
        self.journal_settled(1)

    def fail_boot(self, message: str) -> None:
        self.write(EXITING, self.pid, 0, time.time(), 0.0, 0.0, b"",
                   message.encode(errors="replace")[:200])


def _unhead(word: int) -> tuple[int, int]:
    """A journal half's header word: (entries, bytes used)."""
    return word & 0xFFFFFFFF, word >> 32
