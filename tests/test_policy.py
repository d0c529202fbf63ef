"""The master's decisions (:mod:`jobq.master.policy`), driven with a fake clock.

No server, no processes: every function takes ``now`` and what the master knows, and returns
what to do.
"""

from __future__ import annotations

import os
import random
import signal

import pytest

from jobq import exitcodes
from jobq.config import Config
from jobq.master.policy import (
    BOOT_BACKOFF_CAP,
    BOOT_BACKOFF_FIRST,
    BREAKER_COUNT,
    BREAKER_WINDOW,
    STABLE_AFTER,
    CrashBreaker,
    Kill,
    Limits,
    Retire,
    SlotHistory,
    SpawnPacer,
    WorkerState,
    check_workers,
    describe_exit,
    max_jobs_for,
    next_check,
    on_exit,
    resize,
)

NOW = 1_000_000.0
LIMITS = Limits(hard_timeout_grace=5.0, heartbeat_timeout=60.0, memory_soft_mb=200,
                memory_hard_mb=500, graceful_timeout=30.0)


def exited(code: int) -> int:
    """A waitpid status for a process that called exit(code)."""
    status = code << 8
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == code
    return status


def killed(sig: int) -> int:
    """A waitpid status for a process killed by ``sig``."""
    assert os.WIFSIGNALED(sig) and os.WTERMSIG(sig) == sig
    return sig


def worker(pid: int = 100, **fields: object) -> WorkerState:
    """A healthy idle worker that has been up for a while."""
    values: dict[str, object] = {"slot": 0, "pid": pid, "name": f"host.1.0.{pid}",
                                 "born": NOW - 100, "ready": True, "heartbeat": NOW - 1,
                                 "memory_mb": 50.0}
    values.update(fields)
    return WorkerState(**values)  # type: ignore[arg-type]


def busy(pid: int = 100, *, started: float, timeout: float, **fields: object) -> WorkerState:
    return worker(pid, busy=True, job_id="job-1", job_started=started,
                  deadline=started + timeout, heartbeat=started, **fields)


# -- check_workers -------------------------------------------------------------------------------

def test_healthy_workers_are_left_alone() -> None:
    workers = [worker(1),
               busy(2, started=NOW - 10, timeout=300),
               worker(3, memory_mb=199.0),  # just under the soft limit
               busy(4, started=NOW - 500, timeout=3600, memory_mb=None)]  # busy: no heartbeat
    assert check_workers(NOW, workers, LIMITS) == []


def test_a_job_past_its_deadline_plus_grace_gets_its_worker_killed() -> None:
    w = busy(7, started=NOW - 10, timeout=4.0)  # deadline NOW-6, + 5 s grace = NOW-1
    [action] = check_workers(NOW, [w], LIMITS)
    assert isinstance(action, Kill) and action.pid == 7
    assert action.cause.startswith("hard time limit: job job-1 ran 10.0 s")
    assert "5 s grace" in action.cause and "SIGALRM" in action.cause


def test_a_job_within_its_grace_is_not_killed_yet() -> None:
    w = busy(7, started=NOW - 8, timeout=4.0)  # deadline + grace = NOW + 1
    assert check_workers(NOW, [w], LIMITS) == []
    assert [type(a) for a in check_workers(NOW + 1.001, [w], LIMITS)] == [Kill]


def test_by_default_a_job_stuck_past_its_limit_frees_its_slot_within_a_second() -> None:
    # the SIGALRM path is tried first (JobTimeout inside the job); a job that does not stop
    # (stuck in C) has its worker killed 0.5 s after the limit, from the config's default
    limits = Limits.from_config(Config())
    w = busy(7, started=NOW - 2.0, timeout=2.0)  # at its limit now
    assert check_workers(NOW + 0.499, [w], limits) == []
    [action] = check_workers(NOW + 0.501, [w], limits)
    assert isinstance(action, Kill) and "0.5 s grace" in action.cause
    assert next_check(NOW, [w], limits) <= NOW + 0.52


def test_a_worker_over_the_memory_hard_limit_is_killed_even_while_busy() -> None:
    w = busy(8, started=NOW - 1, timeout=300, memory_mb=512.4)
    [action] = check_workers(NOW, [w], LIMITS)
    assert action == Kill(8, "memory hard limit: worker used 512 MB, over 500 MB; it was killed",
                          "memory_hard_limit")


def test_no_memory_limits_when_they_are_zero() -> None:
    limits = Limits(memory_soft_mb=0, memory_hard_mb=0)
    assert check_workers(NOW, [worker(1, memory_mb=10_000.0)], limits) == []


def test_an_idle_worker_without_heartbeat_is_killed() -> None:
    hung = worker(9, heartbeat=NOW - 61)
    fresh = worker(10, heartbeat=NOW - 59)
    actions = check_workers(NOW, [hung, fresh], LIMITS)
    assert actions == [Kill(9, "no heartbeat for 61 s while idle (hung?); killed", "heartbeat")]


def test_a_booting_worker_is_not_judged_by_heartbeat() -> None:
    booting = worker(11, ready=False, heartbeat=NOW - 600)
    assert check_workers(NOW, [booting], LIMITS) == []


def test_over_the_soft_limit_the_worker_is_retired_once() -> None:
    w = busy(12, started=NOW - 1, timeout=300, memory_mb=250.0)
    [action] = check_workers(NOW, [w], LIMITS)
    assert isinstance(action, Retire) and action.pid == 12
    assert action.reason.startswith("memory soft limit: 250 MB > 200 MB")
    w.retiring_since = NOW
    assert check_workers(NOW + 1, [w], LIMITS) == []  # asked once; it finishes its job


def test_a_retiring_worker_that_does_not_stop_is_killed() -> None:
    w = worker(13, retiring_since=NOW - 35.5)  # graceful 30 + grace 5
    [action] = check_workers(NOW, [w], LIMITS)
    assert isinstance(action, Kill) and "graceful_timeout" in action.cause
    w.retiring_since = NOW - 34.5
    assert check_workers(NOW, [w], LIMITS) == []


def test_a_worker_already_being_killed_gets_no_second_action() -> None:
    w = busy(14, started=NOW - 100, timeout=1, memory_mb=900.0, killing="hard time limit")
    assert check_workers(NOW, [w], LIMITS) == []


def test_each_worker_gets_its_own_action() -> None:
    workers = [busy(1, started=NOW - 100, timeout=1), worker(2, memory_mb=300.0), worker(3)]
    assert [(type(a), a.pid) for a in check_workers(NOW, workers, LIMITS)] == [
        (Kill, 1), (Retire, 2)]


# -- next_check ----------------------------------------------------------------------------------

def test_next_check_is_the_tick_without_deadlines() -> None:
    assert next_check(NOW, [worker(1), worker(2)], LIMITS) == NOW + 1.0
    assert next_check(NOW, [], LIMITS, tick=0.5) == NOW + 0.5


def test_next_check_picks_the_earliest_hard_deadline() -> None:
    limits = Limits(hard_timeout_grace=0.05)
    workers = [busy(1, started=NOW, timeout=0.1), busy(2, started=NOW, timeout=0.03),
               busy(3, started=NOW, timeout=5), worker(4)]
    assert next_check(NOW, workers, limits) == pytest.approx(NOW + 0.03 + 0.05 + 0.01, abs=1e-6)
    assert next_check(NOW, workers[::-1], limits) == pytest.approx(NOW + 0.09, abs=1e-6)


def test_next_check_looks_often_while_jobs_run() -> None:
    # a running job may be cancelled: the master looks for requests every 0.25 s
    assert next_check(NOW, [busy(1, started=NOW, timeout=300)], LIMITS) == pytest.approx(
        NOW + 0.25, abs=1e-6)


def test_next_check_never_in_the_past() -> None:
    overdue = busy(1, started=NOW - 100, timeout=1)
    assert next_check(NOW, [overdue], LIMITS) == pytest.approx(NOW + 0.01, abs=1e-6)


# -- describe_exit -------------------------------------------------------------------------------

def test_describe_exit() -> None:
    assert describe_exit(killed(signal.SIGKILL)) == (
        "killed by signal 9 (SIGKILL) (out of memory?)", None, 9)
    assert describe_exit(killed(signal.SIGSEGV)) == ("killed by signal 11 (SIGSEGV)", None, 11)
    assert describe_exit(exited(0)) == ("exited with code 0", 0, None)
    assert describe_exit(exited(3)) == ("exited with code 3", 3, None)


# -- on_exit -------------------------------------------------------------------------------------

def test_import_failure_stops_the_master_with_the_import_exit_code() -> None:
    w = worker(1, ready=False)
    decision = on_exit(NOW, w, exited(exitcodes.IMPORT), SlotHistory(), CrashBreaker(),
                       stopping=False, boot_error="cannot import task module 'x': boom")
    assert decision.respawn_at is None
    assert decision.stop_master == (exitcodes.IMPORT, "cannot import task module 'x': boom")


def test_import_failure_without_a_message_still_has_a_reason() -> None:
    decision = on_exit(NOW, worker(1, ready=False), exited(exitcodes.IMPORT), SlotHistory(),
                       CrashBreaker(), stopping=False)
    assert decision.stop_master is not None
    code, reason = decision.stop_master
    assert code == exitcodes.IMPORT and "import" in reason


def test_exit_code_of_import_from_a_worker_that_was_up_is_just_a_crash() -> None:
    # a job's os._exit(4) must not pass for an import failure and stop the whole master
    decision = on_exit(NOW, worker(1), exited(exitcodes.IMPORT), SlotHistory(), CrashBreaker(),
                       stopping=False)
    assert decision.stop_master is None
    assert decision.respawn_at == NOW + BOOT_BACKOFF_FIRST and decision.unexpected
    assert decision.cause.startswith("worker exited with code 4")

def test_exits_of_one_kind_are_one_kind_whatever_memory_each_was_seen_using() -> None:
    # the master says a kind of exit once, then counts it: a memory reading in the cause must
    # not make every crash a kind of its own
    decisions = [on_exit(NOW, worker(i, ready=False, memory_mb=mb), killed(signal.SIGKILL),
                         SlotHistory(), CrashBreaker(), stopping=False)
                 for i, mb in enumerate((None, 31.0, 57.0))]
    assert len({d.cause for d in decisions}) == 3
    assert {d.kind for d in decisions} == {"worker killed by signal 9 (SIGKILL) (out of memory?)"}


def test_boot_failures_back_off_exponentially_up_to_the_cap() -> None:
    history = SlotHistory()
    breaker = CrashBreaker(count=1000)
    delays = []
    for i in range(12):
        now = NOW + i
        decision = on_exit(now, worker(i, ready=False), killed(signal.SIGSEGV), history,
                           breaker, stopping=False)
        assert decision.stop_master is None and decision.unexpected
        assert decision.respawn_at is not None and history.not_before == decision.respawn_at
        delays.append(round(decision.respawn_at - now, 6))
    assert delays[:4] == [BOOT_BACKOFF_FIRST, 2 * BOOT_BACKOFF_FIRST, 4 * BOOT_BACKOFF_FIRST,
                          8 * BOOT_BACKOFF_FIRST]
    assert all(b == min(BOOT_BACKOFF_CAP, 2 * a) for a, b in zip(delays, delays[1:], strict=False))
    assert delays[-1] == BOOT_BACKOFF_CAP
    assert history.failures == 12


def test_back_off_resets_once_a_worker_of_the_slot_stayed_up() -> None:
    history = SlotHistory()
    breaker = CrashBreaker()
    for i in range(3):
        on_exit(NOW + i, worker(i, ready=False), exited(1), history, breaker, stopping=False)
    assert history.failures == 3
    history.seen_up(NOW + 10, ready_since=NOW + 10 - STABLE_AFTER + 0.1)  # not long enough
    assert history.failures == 3
    history.seen_up(NOW + 10, ready_since=NOW + 10 - STABLE_AFTER)
    assert (history.failures, history.not_before) == (0, 0.0)
    decision = on_exit(NOW + 11, worker(6, ready=False), exited(1), history, breaker,
                       stopping=False)
    assert decision.respawn_at == pytest.approx(NOW + 11 + BOOT_BACKOFF_FIRST, abs=1e-6)


def test_a_worker_that_was_up_and_was_killed_is_replaced_at_once_and_is_no_crash() -> None:
    # a kill storm (the OOM killer, an operator, our own hard limit) must not stop the master
    history = SlotHistory(failures=2, not_before=NOW + 1)
    breaker = CrashBreaker()
    for i in range(3 * BREAKER_COUNT):
        decision = on_exit(NOW + i * 0.01, worker(i), killed(signal.SIGKILL), history, breaker,
                           stopping=False)
        assert decision.stop_master is None and decision.respawn_at == NOW + i * 0.01
    assert history.failures == 2 and breaker.times == []


def test_breaker_trips_on_repeated_boot_exits() -> None:
    breaker = CrashBreaker()
    histories = [SlotHistory() for _ in range(4)]
    decisions = [on_exit(NOW + i, worker(i, slot=i % 4, ready=False), exited(1),
                         histories[i % 4], breaker, stopping=False, boot_error="bad db url")
                 for i in range(BREAKER_COUNT)]
    assert all(d.stop_master is None for d in decisions[:-1])
    code, reason = decisions[-1].stop_master  # type: ignore[misc]
    assert code == exitcodes.WORKER_BOOT
    assert f"{BREAKER_COUNT} within" in reason and "exited with code 1" in reason
    assert reason.endswith(": bad db url")
    assert decisions[-1].respawn_at is None


def test_breaker_forgets_exits_older_than_its_window() -> None:
    breaker = CrashBreaker()
    history = SlotHistory()
    step = BREAKER_WINDOW / (BREAKER_COUNT - 1) + 0.1  # never BREAKER_COUNT within the window
    for i in range(3 * BREAKER_COUNT):
        decision = on_exit(NOW + i * step, worker(i, ready=False), exited(1), history, breaker,
                           stopping=False)
        assert decision.stop_master is None


def test_deaths_by_a_signal_at_boot_are_crashes_too() -> None:
    # a task module that SIGKILLs itself at import: back off, then stop the master (exit 7)
    breaker = CrashBreaker()
    history = SlotHistory()
    decisions = [on_exit(NOW + i * 0.01, worker(i, ready=False), killed(signal.SIGKILL),
                         history, breaker, stopping=False) for i in range(BREAKER_COUNT)]
    assert all(d.stop_master is None for d in decisions[:-1])
    assert decisions[1].respawn_at == pytest.approx(NOW + 0.01 + 2 * BOOT_BACKOFF_FIRST)
    code, reason = decisions[-1].stop_master  # type: ignore[misc]
    assert code == exitcodes.WORKER_BOOT and "crashing at boot" in reason
    assert "killed by signal 9" in reason


def test_a_worker_that_fails_after_it_was_up_is_a_crash_too() -> None:
    # workers that come up, then die of an error of their own (a server refusing writes used
    # to do that, 14 times a second): backed off, and the breaker stops the master
    breaker = CrashBreaker()
    history = SlotHistory()
    decisions = [on_exit(NOW + i * 0.01, worker(i), exited(1), history, breaker,
                         stopping=False) for i in range(BREAKER_COUNT)]
    delays = [round(d.respawn_at - (NOW + i * 0.01), 6)  # type: ignore[operator]
              for i, d in enumerate(decisions[:3])]
    assert delays == [BOOT_BACKOFF_FIRST, 2 * BOOT_BACKOFF_FIRST, 4 * BOOT_BACKOFF_FIRST]
    code, reason = decisions[-1].stop_master  # type: ignore[misc]
    assert code == exitcodes.WORKER_BOOT and "crashing right after they start" in reason


def test_the_spawn_pacer_lets_a_burst_through_then_a_few_a_second() -> None:
    pacer = SpawnPacer(rate=4.0, burst=2.0)
    assert [pacer.next_spawn(NOW), pacer.next_spawn(NOW)] == [NOW, NOW]
    assert pacer.next_spawn(NOW) == pytest.approx(NOW + 0.25)
    assert pacer.next_spawn(NOW + 0.25) == NOW + 0.25
    forks = 0
    t = NOW + 1.0
    while t < NOW + 11.0:  # ten seconds of asking all the time
        if pacer.next_spawn(t) == t:
            forks += 1
        t += 0.01
    assert 38 <= forks <= 42  # about 4 a second


def test_planned_exits_respawn_at_once() -> None:
    history = SlotHistory(failures=4, not_before=NOW + 5)
    retired = worker(1, retiring_since=NOW - 1)
    decision = on_exit(NOW, retired, exited(0), history, CrashBreaker(), stopping=False)
    assert decision.respawn_at == NOW and not decision.unexpected
    assert decision.stop_master is None
    # recycled after max_jobs: exits 0 by itself
    decision = on_exit(NOW, worker(2), exited(0), SlotHistory(), CrashBreaker(), stopping=False)
    assert decision.respawn_at == NOW and not decision.unexpected
    # retired before it was even up (a reload right after a spawn): not a boot failure
    booting = worker(3, ready=False, retiring_since=NOW - 0.1)
    history = SlotHistory()
    decision = on_exit(NOW, booting, killed(signal.SIGTERM), history, CrashBreaker(),
                       stopping=False)
    assert decision.respawn_at == NOW and history.failures == 0


def test_unexpected_exit_of_a_worker_that_was_up_is_restarted_at_once() -> None:
    decision = on_exit(NOW, worker(1, memory_mb=321.0), killed(signal.SIGKILL), SlotHistory(),
                       CrashBreaker(), stopping=False)
    assert decision.respawn_at == NOW and decision.unexpected
    assert decision.cause == ("worker killed by signal 9 (SIGKILL) (out of memory?); "
                              "last memory reading 321 MB")


def test_a_worker_we_killed_keeps_our_cause() -> None:
    w = worker(1, killing="hard time limit: job j ran 9.0 s")
    decision = on_exit(NOW, w, killed(signal.SIGKILL), SlotHistory(), CrashBreaker(),
                       stopping=False)
    assert decision.cause == "hard time limit: job j ran 9.0 s"
    assert decision.respawn_at == NOW


def test_no_respawn_while_stopping() -> None:
    for status in (exited(0), killed(signal.SIGKILL), exited(exitcodes.IMPORT)):
        decision = on_exit(NOW, worker(1), status, SlotHistory(), CrashBreaker(), stopping=True)
        assert decision.respawn_at is None and decision.stop_master is None
        assert not decision.unexpected


# -- max_jobs_for --------------------------------------------------------------------------------

def test_max_jobs_zero_means_unlimited() -> None:
    assert max_jobs_for(0, 0.5, random.Random(1)) == 0


def test_max_jobs_jitter_bounds() -> None:
    rng = random.Random(42)
    values = [max_jobs_for(1000, 0.1, rng) for _ in range(2000)]
    assert min(values) >= 900 and max(values) <= 1100
    assert min(values) < 920 and max(values) > 1080  # really spread over the range
    assert {max_jobs_for(1000, 0.0, rng) for _ in range(50)} == {1000}


def test_max_jobs_is_never_below_one() -> None:
    rng = random.Random(7)
    assert {max_jobs_for(1, 0.5, rng) for _ in range(50)} == {1}
    values = [max_jobs_for(3, 1.0, rng) for _ in range(500)]
    assert min(values) == 1 and max(values) == 6



# -- resize (TTIN, TTOU, jobq workers) -----------------------------------------------------------

def test_resize_adds_removes_and_sets_never_below_one_nor_above_the_slots() -> None:
    assert resize(2, "add", 3, 64) == (5, "")
    assert resize(5, "remove", 3, 64) == (2, "")
    assert resize(2, "set", 7, 64) == (7, "")
    assert resize(2, "remove", 1, 64) == (1, "")
    assert resize(2, "remove", 5, 64) == (1, "never fewer than one")
    assert resize(1, "remove", 1, 64) == (1, "never fewer than one")
    assert resize(60, "add", 10, 64) == (
        64, "at most 64: the worker slots this master made at start")
    assert resize(2, "set", 64, 64) == (64, "")
