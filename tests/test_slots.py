"""The slots' seqlock (jobq.slots) under a real race: a forked writer begins and ends jobs as
fast as it can in shared memory while this process reads the slot; every copy the reader
says is whole must be one the writer wrote whole, never the start of one write and the rest
of another. (A copy of a writer stopped within a write, not scheduled for a while on a busy
machine, is said not to be whole: the master reads that slot again on its next tick.)"""

from __future__ import annotations

import os
import signal
import time

from jobq.slots import BUSY, IDLE, SlotTable, SlotView


def whole(v: SlotView) -> bool:
    """Job n begins at n, is due at n + 0.5, after n jobs done; an idle slot names none."""
    if v.state == BUSY:
        return (v.job_id == f"{int(v.job_started):016d}" and v.deadline == v.job_started + 0.5
                and v.jobs_done == int(v.job_started))
    return v.state == IDLE and v.job_id is None and v.job_started == v.deadline == 0.0


def test_a_slot_read_while_its_worker_writes_is_always_one_whole_write() -> None:
    table = SlotTable(1)
    slot = table.slot(0)
    slot.boot(os.getpid())
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        try:
            os.close(ready_r)
            n = 0
            while True:
                slot.begin(f"{n:016d}", float(n), n + 0.5)
                slot.end()
                if n == 0:
                    os.write(ready_w, b"1")
                n += 1
        finally:
            os._exit(0)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1"
        torn: list[SlotView] = []
        reads = busy = partial = 0
        end = time.monotonic() + 2.0  # how long the race runs, not a timing asserted
        while time.monotonic() < end and len(torn) < 5:
            view = table.read(0)
            reads += 1
            if not view.whole:
                partial += 1
                continue
            busy += view.state == BUSY
            if not whole(view):
                torn.append(view)
        assert not torn, (f"{len(torn)} torn copies said whole, in {reads} reads "
                          f"({partial} said not whole): {torn[:3]}")
        assert 0 < busy < reads - partial  # it saw the slot busy and idle: the writer ran
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
