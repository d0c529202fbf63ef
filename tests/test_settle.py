"""The settle step (jobq.settle): what a worker acknowledges for a job that ran, as a pure
function of the spec, the state, the outcome and the policy. No server, no process, no clock:
times are given, and the jitter's random source is a fixed one."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from jobq.exceptions import JobCancelled, JobTimeout, Retry, TaskNotAllowed
from jobq.settle import (
    Completed,
    Failed,
    RetryPolicy,
    backoff,
    exception_matches,
    retryable,
    settle,
)
from jobq.wire import MAX_ERRORS_KEPT, AckEntry, BadJob, Facts, Spec, requeued

T0 = 1_800_000_000.0  # started
T1 = T0 + 2.5  # finished
NO_JITTER = RetryPolicy(backoff_base=1.0, backoff_cap=60.0, jitter=0.0, result_ttl=300,
                        failed_ttl=604800)


class AppError(Exception):
    pass


def spec_of(**fields: Any) -> tuple[str, Spec]:
    raw = json.dumps({"t": "app.tasks:work", "a": [1], **fields})
    return raw, Spec.decode(raw)


def run(spec_raw: str | None, spec: Spec | None, outcome: Completed | Failed,
        state: dict[str, Any] | None = None, policy: RetryPolicy = NO_JITTER,
        job_id: str = "j1") -> Any:
    return settle(job_id, "default", spec_raw, spec,
                  json.dumps(state) if state is not None else None, outcome,
                  worker="w1", worker_json='"w1"', policy=policy)


def record(entry: AckEntry) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(entry.payload)
    return data


# -- completed ---------------------------------------------------------------------------------

def test_a_completed_job_acks_done_with_its_record_kept_result_ttl() -> None:
    raw, spec = spec_of(p=4, g="grp")
    s = run(raw, spec, Completed({"n": 1}, T0, T1))
    assert s.status == "completed"
    assert s.entry[:5] == ("done", "j1", "default", 4, 300)
    assert s.entry.group == "grp"
    rec = record(s.entry)
    assert rec == {"spec": json.loads(raw), "res": {"n": 1}, "s": "completed",
                   "st": pytest.approx(T0), "fin": pytest.approx(T1), "w": "w1"}


def test_the_job_own_result_ttl_wins_and_zero_keeps_no_record() -> None:
    raw, spec = spec_of(ttl=0)
    s = run(raw, spec, Completed(object(), T0, T1))  # not JSON: never encoded, no record
    assert (s.entry.kind, s.entry.ttl, s.entry.payload) == ("done", 0, "")
    raw, spec = spec_of(ttl=9)
    assert run(raw, spec, Completed(1, T0, T1)).entry.ttl == 9


def test_a_retried_job_that_completes_keeps_its_history() -> None:
    raw, spec = spec_of()
    history = {"n": 2, "d": 1, "e": [{"type": "AppError", "msg": "x"}], "s": "retry"}
    rec = record(run(raw, spec, Completed(5, T0, T1), state=history).entry)
    assert (rec["res"], rec["s"], rec["n"], rec["d"], len(rec["e"])) == (5, "completed", 2, 1, 1)


def test_a_result_json_cannot_carry_fails_the_job_for_good() -> None:
    raw, spec = spec_of(r=5)
    s = run(raw, spec, Completed({1, 2}, T0, T1))
    assert (s.status, s.entry.kind, s.permanent) == ("failed", "fail", True)
    assert record(s.entry)["err"]["type"] == "SerializationError"


# -- failed: retried or not ---------------------------------------------------------------------

def test_a_failure_with_retries_left_comes_back_after_the_backoff() -> None:
    raw, spec = spec_of(r=3, p=-2)
    s = run(raw, spec, Failed(AppError("boom"), T0, T1))
    assert (s.status, s.attempts, s.max_retries, s.delay) == ("retry", 1, 3, 1.0)
    assert s.entry[:5] == ("later", "j1", "default", -2, int((T1 + 1.0) * 1000))
    state = json.loads(s.entry.payload)
    assert (state["s"], state["n"], state["due"]) == ("retry", 1, round(T1 + 1.0, 3))
    assert state["e"][0]["type"] == "AppError" and state["e"][0]["msg"] == "boom"
    assert state["e"][0]["w"] == "w1" and "boom" in state["e"][0]["tb"]


def test_the_backoff_doubles_with_each_attempt_and_a_zero_delay_retries_at_once() -> None:
    raw, spec = spec_of(r=10)
    delays = [run(raw, spec, Failed(AppError(), T0, T1), state={"n": n}).delay
              for n in range(5)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0]
    s = run(raw, spec, Failed(AppError(), T0, T1), policy=RetryPolicy(backoff_base=0.0,
                                                                        jitter=0.0))
    assert (s.entry.kind, s.entry.ttl) == ("retry", 0)


def test_the_jitter_comes_from_the_policy_random_source() -> None:
    raw, spec = spec_of()
    a = RetryPolicy(backoff_base=10.0, jitter=0.5, rng=random.Random(7))
    b = RetryPolicy(backoff_base=10.0, jitter=0.5, rng=random.Random(7))
    da = [run(raw, spec, Failed(AppError(), T0, T1), policy=a).delay for _ in range(5)]
    db = [run(raw, spec, Failed(AppError(), T0, T1), policy=b).delay for _ in range(5)]
    assert da == db and all(5.0 <= d <= 10.0 for d in da) and len(set(da)) > 1


def test_retry_with_a_delay_overrides_the_backoff() -> None:
    raw, spec = spec_of(r=1)
    s = run(raw, spec, Failed(Retry(delay=42), T0, T1))
    assert (s.status, s.delay, s.entry.ttl) == ("retry", 42, int((T1 + 42) * 1000))


def test_out_of_attempts_the_job_fails_into_the_dead_letter_queue() -> None:
    raw, spec = spec_of(r=2)
    s = run(raw, spec, Failed(AppError("last"), T0, T1), state={"n": 2, "e": []})
    assert (s.status, s.attempts, s.permanent) == ("failed", 3, False)
    assert s.entry[:5] == ("fail", "j1", "default", 0, 604800)
    rec = record(s.entry)
    assert (rec["s"], rec["n"], rec["err"]["msg"], rec["w"]) == ("failed", 3, "last", "w1")
    assert rec["spec"] == json.loads(raw)


def test_retry_on_and_dont_retry_on_decide_by_exception_name() -> None:
    raw, spec = spec_of(ro=["ValueError"], r=3)
    assert run(raw, spec, Failed(ValueError(), T0, T1)).status == "retry"
    assert run(raw, spec, Failed(AppError(), T0, T1)).status == "failed"
    raw, spec = spec_of(dro=[f"{__name__}.AppError"], r=3)
    assert run(raw, spec, Failed(AppError(), T0, T1)).status == "failed"
    assert run(raw, spec, Failed(KeyError(), T0, T1)).status == "retry"
    assert retryable(Retry(), [], ["jobq.exceptions.Retry"])  # Retry always retries
    assert exception_matches(JobTimeout(), ["JobqError"])  # a base class matches


def test_a_timeout_counts_as_an_attempt_like_any_failure() -> None:
    raw, spec = spec_of(r=0)
    s = run(raw, spec, Failed(JobTimeout("job exceeded its time limit of 2 s"), T0, T1))
    assert (s.status, record(s.entry)["err"]["type"]) == ("failed", "JobTimeout")


def test_a_permanent_failure_is_never_retried() -> None:
    raw, spec = spec_of(r=5)
    s = run(raw, spec, Failed(TaskNotAllowed("not allowed"), T0, T1, permanent=True))
    assert (s.status, s.permanent, s.attempts) == ("failed", True, 1)


def test_errors_kept_are_capped_while_attempts_keep_counting() -> None:
    raw, spec = spec_of(r=100)
    state = {"n": 30, "e": [{"type": "E", "msg": str(i)} for i in range(MAX_ERRORS_KEPT)]}
    s = run(raw, spec, Failed(AppError("new"), T0, T1), state=state)
    kept = json.loads(s.entry.payload)
    assert kept["n"] == 31 and len(kept["e"]) == MAX_ERRORS_KEPT
    assert kept["e"][-1]["msg"] == "new" and kept["e"][0]["msg"] == "1"


def test_a_state_cannot_forge_the_record() -> None:
    raw, spec = spec_of(r=0)
    forged = {"res": "forged", "spec": {"t": "os:system"}, "st": 1, "fin": 2, "n": "many",
              "e": "not a list"}
    rec = record(run(raw, spec, Failed(AppError(), T0, T1), state=forged).entry)
    assert "res" not in rec and rec["spec"] == json.loads(raw)
    assert rec["n"] == 1 and len(rec["e"]) == 1 and rec["st"] == pytest.approx(T0)


# -- what the records say: attempts, retries, deliveries ------------------------------------------

def test_attempts_count_the_one_that_completed_and_each_error_says_its_attempt() -> None:
    raw, spec = spec_of(r=3)
    first = run(raw, spec, Completed(1, T0, T1))
    assert first.attempts == 1
    facts = Facts.from_json(record(first.entry))
    assert (facts.attempts, facts.deliveries, facts.requeues) == (1, 1, 0)

    state = None
    for n in (1, 2, 3):
        s = run(raw, spec, Failed(AppError(f"run {n}"), T0, T1), state=state)
        assert (s.status, s.attempts) == ("retry", n)
        state = json.loads(s.entry.payload)
        assert Facts.from_json(state).attempts == n
    done = run(raw, spec, Completed(4, T0, T1), state=state)
    assert done.attempts == 4
    rec = record(done.entry)
    facts = Facts.from_json(rec)
    assert (facts.attempts, facts.deliveries) == (4, 4)
    assert [(e["n"], e["msg"]) for e in facts.errors] == [(1, "run 1"), (2, "run 2"),
                                                          (3, "run 3")]

    # a lease that lapsed twice with the job held: two deliveries, not attempts
    assert Facts.from_json({**rec, "u": 2}).deliveries == 6


def test_a_requeue_starts_the_counts_again_and_later_errors_say_so() -> None:
    raw, spec = spec_of(r=0)
    failed = record(run(raw, spec, Failed(AppError("first"), T0, T1)).entry)
    assert Facts.from_json(failed).attempts == 1
    _, _, _, state_json = requeued(json.loads(raw), failed)
    state = json.loads(state_json)
    facts = Facts.from_json(state)
    assert (facts.attempts, facts.deliveries, facts.requeues) == (0, 0, 1)
    assert [e["n"] for e in facts.errors] == [1]

    again = record(run(raw, spec, Failed(AppError("second"), T0, T1), state=state).entry)
    facts = Facts.from_json(again)
    assert (facts.attempts, facts.requeues) == (1, 1)
    assert [(e["n"], e.get("rq", 0), e["msg"]) for e in facts.errors] == [
        (1, 0, "first"), (1, 1, "second")]


# -- cancelled, and jobs that could not start ----------------------------------------------------

def test_a_cancelled_job_acks_cancel_with_its_record() -> None:
    raw, spec = spec_of(r=5, g="grp")
    s = run(raw, spec, Failed(JobCancelled("job j1 was cancelled"), T0, T1))
    assert (s.status, s.entry.kind, s.entry.ttl, s.entry.group) == (
        "cancelled", "cancel", 604800, "grp")
    assert record(s.entry)["s"] == "cancelled"


def test_bad_data_fails_at_once_keeping_what_can_be_read() -> None:
    raw = json.dumps({"t": "app.tasks:work", "a": "not a list", "p": 7, "g": "grp"})
    with pytest.raises(BadJob) as bad:
        Spec.decode(raw)
    s = run(raw, None, Failed(bad.value, T0, T1, permanent=True))
    assert (s.status, s.entry.kind, s.entry.priority, s.entry.group) == ("failed", "fail", 7,
                                                                        "grp")
    assert record(s.entry)["spec"] == json.loads(raw)  # shown as it was
    s = run("not json", None, Failed(BadJob("not valid JSON"), T0, T1, permanent=True))
    assert (s.entry.priority, s.entry.group, record(s.entry)["spec"]) == (0, "", None)


def test_an_id_that_is_not_utf8_goes_back_as_its_bytes() -> None:
    raw, spec = spec_of()
    s = run(raw, spec, Completed(1, T0, T1), job_id="bad\udcff")
    assert s.entry.job_id == b"bad\xff"


def test_an_ack_entry_survives_the_journal_round_trip() -> None:
    raw, spec = spec_of(p=3, g="grp")
    entry = run(raw, spec, Completed([1, "x"], T0, T1)).entry
    fields = [str(f) for f in entry]  # what the journal in shared memory keeps
    assert AckEntry.from_fields(fields) == entry
    assert AckEntry.from_fields(fields[:-1]) is None
    assert AckEntry.from_fields(["nope", *fields[1:]]) is None


def test_backoff_is_capped() -> None:
    assert [backoff(n, 1.0, 5.0, 0.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 5.0]
