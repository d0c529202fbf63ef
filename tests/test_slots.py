"""The slots' seqlock (jobq.slots) under a real race: a forked writer begins and ends jobs as
fast as it can in shared memory while this process reads the slot; every copy the reader
says is whole must be one the writer wrote whole, never the start of one write and the rest
of another. (A copy of a writer stopped within a write, not scheduled for a while on a busy
machine, is said not to be whole: the master reads that slot again on its next tick.)"""

from __future__ import annotations

import os
import signal
import time

import pytest

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


def test_the_ack_journal_keeps_the_half_sent_until_it_is_settled() -> None:
    """A worker sends the acks of one half while it journals new ones in the other: its
    master reads both until the server confirmed the half sent."""
    table = SlotTable(2)
    slot = table.slot(1)
    assert slot.journal_ack(["done", "a", "q", 0, 300, "{}", ""])
    sent = slot.journal_switch()  # "a" is on its way to the server
    assert slot.journal_ack(["done", "b", "q", 0, 300, "{}", ""])
    assert sorted(e[1] for e in table.unsent_acks(1)) == ["a", "b"]
    assert table.unsent_acks(0) == []  # another slot's journal is its own
    slot.journal_settled(sent)  # confirmed: only what came after is left
    assert [e[1] for e in table.unsent_acks(1)] == ["b"]
    sent = slot.journal_switch()
    assert slot.journal_ack(["fail", "c", "q", 0, 300, "{}", ""])
    # the half sent is settled before the next switch: never two batches in flight
    with pytest.raises(AssertionError):
        slot.journal_switch()
    slot.journal_sent()  # everything confirmed (a round trip of its own)
    assert table.unsent_acks(1) == []
    assert slot.journal_ack(["done", "d", "q", 0, 300, "{}", ""])
    table.clear(1)
    assert table.unsent_acks(1) == []


def test_a_full_half_refuses_an_ack() -> None:
    table = SlotTable(1)
    slot = table.slot(0)
    big = "x" * 60_000
    assert slot.journal_ack(["done", "a", "q", 0, 300, big, ""])
    assert slot.journal_ack(["done", "b", "q", 0, 300, big, ""])
    assert not slot.journal_ack(["done", "c", "q", 0, 300, big, ""])  # the worker sends
    slot.journal_switch()
    assert slot.journal_ack(["done", "c", "q", 0, 300, big, ""])  # the other half is empty
    assert [e[1] for e in table.unsent_acks(0)] == ["a", "b", "c"]
