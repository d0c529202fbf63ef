"""What becomes of a job that ran: a pure function from what the worker knows to the entry it
acknowledges.

    settle(claimed job, outcome, worker, policy)  ──►  Settlement(entry: AckEntry, ...)

``outcome`` is :class:`Completed` (the task returned) or :class:`Failed` (it raised, timed
out, was cancelled, or could not even start: bad data, a task not allowed). The retry policy
lives here and only here: whether a failure is retried (``max_retries``, ``retry_on``,
``dont_retry_on``, :class:`jobq.Retry`), after which back-off, and what the final record
says. No clock, no Redis, no randomness of its own: the outcome carries its times and the
policy its random generator, so tests drive it with fixed values, as
:mod:`jobq.master.policy` is driven.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from . import serialization
from .config import Config
from .exceptions import JobCancelled, Retry, SerializationError
from .wire import (
    AckEntry,
    Spec,
    add_error,
    completed_record,
    decode_json,
    encode_result,
    error_entry,
    exception_name,
    final_record,
    read_state,
    valid_group,
)


@dataclass(frozen=True)
class RetryPolicy:
    """The config's retry and retention settings, and the random source of the jitter."""

    backoff_base: float = 1.0
    backoff_cap: float = 300.0
    jitter: float = 0.25
    result_ttl: int = 300
    failed_ttl: int = 604800
    rng: random.Random | Any = field(default=random, compare=False)

    @classmethod
    def from_config(cls, config: Config) -> RetryPolicy:
        return cls(config.retry_backoff_base, config.retry_backoff_cap, config.retry_jitter,
                   config.result_ttl, config.failed_ttl)


class Completed(NamedTuple):
    """The task returned ``result`` (started and finished: epoch seconds)."""

    result: Any
    started: float
    finished: float


class Failed(NamedTuple):
    """The job failed with ``exc``; ``permanent`` failures are never retried (bad data, a task
    not allowed, arguments that cannot fit the function)."""

    exc: BaseException
    started: float
    finished: float
    permanent: bool = False


Outcome = Completed | Failed


class Settlement(NamedTuple):
    """What to acknowledge, and what happened, for the worker's log."""

    entry: AckEntry
    status: str  # "completed", "retry", "failed", "cancelled"
    attempts: int = 1
    max_retries: int = 0
    delay: float = 0.0  # before the retry (seconds)
    error: dict[str, Any] | None = None
    permanent: bool = False  # failed without a retry being possible


def settle(job_id: str, queue: str, spec_raw: str | None, spec: Spec | None,
           state_raw: str | None, outcome: Outcome, *, worker: str, worker_json: str,
           policy: RetryPolicy) -> Settlement:
    """The ack entry for a job: ``spec`` is its checked spec (None when it failed the
    checks), ``spec_raw`` and ``state_raw`` what the claim read."""
    if isinstance(outcome, Completed):
        assert spec is not None and spec_raw is not None
        try:
            return _completed(job_id, queue, spec_raw, spec, state_raw, outcome, worker,
                              worker_json, policy)
        except SerializationError as exc:
            outcome = Failed(exc, outcome.started, outcome.finished, permanent=True)
    return _failed(job_id, queue, spec_raw, spec, state_raw, outcome, worker, policy)


def _completed(job_id: str, queue: str, spec_raw: str, spec: Spec, state_raw: str | None,
               outcome: Completed, worker: str, worker_json: str,
               policy: RetryPolicy) -> Settlement:
    ttl = policy.result_ttl if spec.result_ttl is None else spec.result_ttl
    record = ""
    # a retried job keeps its history of attempts; the common case has none
    state = read_state(state_raw) if state_raw else None
    attempts = state.get("n", 0) + 1 if state else 1
    if ttl:
        result = encode_result(outcome.result)
        if state is not None:
            state.update(s="completed", st=round(outcome.started, 6),
                         fin=round(outcome.finished, 6), w=worker)
            record = final_record(spec_raw, state, result)
        else:  # the common case
            record = completed_record(spec_raw, result, outcome.started, outcome.finished,
                                      worker_json)
    return _new(Settlement, (_entry("done", job_id, queue, spec.priority, ttl, record,
                                    spec.group), "completed", attempts, spec.max_retries, 0.0,
                             None, False))


def _failed(job_id: str, queue: str, spec_raw: str | None, spec: Spec | None,
            state_raw: str | None, outcome: Failed, worker: str,
            policy: RetryPolicy) -> Settlement:
    exc, finished = outcome.exc, outcome.finished
    state = read_state(state_raw)
    attempts = state.get("n", 0) + 1
    error = error_entry(exc, finished, worker, attempts, state.get("rq", 0))
    state.update(n=attempts, e=add_error(state.get("e"), error))
    if spec is not None:
        priority, group, max_retries = spec.priority, spec.group, spec.max_retries
        kept_spec = spec_raw
    else:  # it failed its checks: keep what can be read of it, for the record and its group
        loose = _loose(spec_raw)
        p = loose.get("p")
        priority = p if isinstance(p, int) and not isinstance(p, bool) else 0
        group, max_retries = loose.get("g"), 0
        kept_spec = spec_raw if loose else None
    if isinstance(exc, JobCancelled):
        state.update(s="cancelled", st=round(outcome.started, 6), fin=round(finished, 6),
                     w=worker, err=error)
        record = final_record(kept_spec, state)
        return Settlement(_entry("cancel", job_id, queue, priority, policy.failed_ttl, record,
                                 group), "cancelled", attempts, max_retries, error=error)
    permanent = outcome.permanent or (
        spec is not None and not retryable(exc, spec.retry_on, spec.dont_retry_on))
    if not permanent and attempts <= max_retries:
        if isinstance(exc, Retry) and exc.delay is not None:
            delay = exc.delay
        else:
            delay = backoff(attempts, policy.backoff_base, policy.backoff_cap, policy.jitter,
                            policy.rng)
        state["s"] = "retry"
        if delay > 0:
            due = finished + delay
            state["due"] = round(due, 3)
            entry = _entry("later", job_id, queue, priority, int(due * 1000),
                           serialization.dumps(state), group)
        else:
            entry = _entry("retry", job_id, queue, priority, 0, serialization.dumps(state), group)
        return Settlement(entry, "retry", attempts, max_retries, delay, error)
    state.update(s="failed", st=round(outcome.started, 6), fin=round(finished, 6), w=worker,
                 err=error)
    record = final_record(kept_spec, state)
    return Settlement(_entry("fail", job_id, queue, priority, policy.failed_ttl, record, group),
                      "failed", attempts, max_retries, error=error, permanent=permanent)


def retryable(exc: BaseException, retry_on: Sequence[str], dont_retry_on: Sequence[str]) -> bool:
    """Whether a failure may be retried, by the job's retry_on/dont_retry_on names."""
    if isinstance(exc, Retry):
        return True
    if dont_retry_on and exception_matches(exc, dont_retry_on):
        return False
    if retry_on:
        return exception_matches(exc, retry_on)
    return True


def exception_matches(exc: BaseException, names: Sequence[str]) -> bool:
    """True if ``exc`` is an instance of a class named in ``names`` (or of a subclass)."""
    for cls in type(exc).__mro__:
        if exception_name(cls) in names or cls.__qualname__ in names:
            return True
    return False


def backoff(attempt: int, base: float, cap: float, jitter: float,
            rng: random.Random | Any = None) -> float:
    """Delay before retry number ``attempt`` (1, 2, ...): ``base * 2**(attempt-1)``, at most
    ``cap``, less a random part of up to ``jitter`` of it (so retries of many jobs spread)."""
    delay = min(cap, base * 2 ** max(0, attempt - 1))
    return float(delay * (1 - jitter * (rng or random).random()))


def ack_id(job_id: str) -> str | bytes:
    """A job id as ack.lua must get it: as read, even when it is not UTF-8 (such an id
    arrives with surrogates, and goes back as the original bytes)."""
    return job_id if job_id.isascii() else job_id.encode("utf-8", "surrogateescape")


def _entry(kind: str, job_id: str, queue: str, priority: int, ttl: int, payload: str,
           group: Any) -> AckEntry:
    # tuple.__new__: AckEntry without its Python-level __new__ (one per job)
    return _new(AckEntry, (kind, job_id if job_id.isascii() else ack_id(job_id), queue,
                           priority, ttl, payload, group if valid_group(group) else ""))


_new = tuple.__new__


def _loose(spec_raw: str | None) -> dict[str, Any]:
    """A spec that failed its checks, as far as it reads as a JSON object ({} if not)."""
    if not spec_raw:
        return {}
    try:
        data = decode_json(spec_raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
