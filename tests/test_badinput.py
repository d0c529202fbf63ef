"""Bad input everywhere it can come from: garbage in Redis where a job should be (written by
hand, and fuzzed with hypothesis), task names nobody allowed, arguments and results that do
not fit, oversized payloads, bad options, bad cron expressions, bad config files and bad
command lines. Real server, real worker and master processes; the worker must survive all of
it, fail each bad job into the dead-letter queue with a reason, and leave nothing held."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jobq_testtasks as tasks
import psutil
import pytest
import redis
from conftest import free_port, key, run_in_this_process, subprocess_env, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobq import exitcodes, serialization
from jobq.config import Config, load_config
from jobq.connection import connect
from jobq.exceptions import PayloadTooLarge, SerializationError
from jobq.job import JobStatus
from jobq.keys import Keys
from jobq.queue import JobQueue
from jobq.registry import TaskResolver
from jobq.schedule import ScheduleError
from jobq.scheduler import Scheduler
from jobq.server import EmbeddedServer, ServerError
from jobq.wire import MAX_TIMEOUT, MAX_TTL
from jobq.worker import Worker

pytestmark = pytest.mark.chaos

Spawn = Callable[..., subprocess.Popen[str]]
K = Keys()
QUEUE = "default"
#: The tasks a fuzzed job may name and that may complete: they never fail in a way that is
#: retried (a bad call of them is a permanent failure), so every fuzzed job ends at once.
FUZZ_OK_TASKS = ("jobq_testtasks:noop", "jobq_testtasks:echo")





def strict_json(text: str) -> Any:
    """Parse as standard JSON (no NaN/Infinity): what jobq must write to Redis."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


# -- planting garbage and running a worker on it ----------------------------------------------

def plant(r: redis.Redis, job_id: str | bytes, spec: str | bytes | None, *,
          state: str | bytes | None = None) -> None:
    """Put ``job_id`` in the default queue with ``spec`` as its record (None: no record),
    as the enqueue script would, counters included, but with whatever data we like."""
    pipe = r.pipeline(transaction=False)
    pipe.rpush(K.level(QUEUE, 0), job_id)
    pipe.zadd(K.levels(QUEUE), {"0": 0})
    pipe.sadd(K.queues, QUEUE)
    pipe.hincrby(K.stats(QUEUE), "pending", 1)
    if spec is not None:
        pipe.hset(K.jobs, job_id, spec)
    if state is not None:
        pipe.hset(K.state, job_id, state)
    pipe.execute()


def run_worker(config: Config, url: str) -> Worker:
    """A burst Worker in this process, run to the end: it must return normally (a crash is the
    bug these tests look for). Puts back what it changes in the process: signal handlers,
    pytest-timeout's alarm, the process title."""
    worker = Worker([QUEUE], config=config, url=url,
                    resolver=TaskResolver(["jobq_testtasks"]), burst=True)
    assert run_in_this_process(worker) == 0
    return worker


def record(r: redis.Redis, job_id: str) -> dict[str, Any]:
    raw = r.get(K.result(job_id))
    assert raw is not None, f"job {job_id} has no final record"
    rec = strict_json(raw)  # whatever the worker writes is plain JSON, readable by anyone
    assert isinstance(rec, dict)
    return rec


def assert_failed(r: redis.Redis, queue: JobQueue, job_id: str, reason: str,
                  types: tuple[str, ...] = ("BadJob",)) -> dict[str, Any]:
    """The job failed for good (one attempt, no retry) into the DLQ, its error naming
    ``reason``; and a reader (JobQueue.get_job) can show it."""
    rec = record(r, job_id)
    assert rec["s"] == "failed", rec
    err = rec["err"]
    assert err["type"] in types, err
    assert reason in err["msg"], err["msg"]
    assert rec["n"] == 1, rec  # failed at once, never retried
    assert r.zscore(K.dlq(QUEUE), job_id) is not None
    job = queue.get_job(job_id)
    assert job is not None and job.status is JobStatus.FAILED
    assert job.error is not None and reason in job.error
    return rec


def assert_nothing_held(r: redis.Redis) -> None:
    """No job left held, processing, pending or half-settled."""
    assert r.hlen(K.jobs) == 0
    assert r.hlen(K.state) == 0
    assert r.keys(f"{K.base}:held:*") == []
    assert r.llen(K.level(QUEUE, 0)) == 0
    stats = r.hgetall(K.stats(QUEUE))
    assert int(stats.get("processing", 0)) == 0, stats
    assert int(stats.get("pending", 0)) == 0, stats
    assert int(stats.get("scheduled", 0)) == 0, stats


@pytest.fixture
def fast_config(redis_url: str) -> Config:
    return load_config(redis_url=redis_url, retry_backoff_base=0.0, retry_jitter=0.0)


def deep(n: int, leaf: str = "") -> str:
    return "[" * n + leaf + "]" * n


def spec(**fields: Any) -> str:
    return json.dumps({"t": "jobq_testtasks:echo", "a": [], **fields})


#: (case, what is written where the job's record should be, what its error must say)
BAD_SPECS: list[tuple[str, str | bytes | None, str]] = [
    ("random-bytes", b"\x80\xff\xfe\x00\x01garbage\xc3\x28", "not valid UTF-8"),
    ("all-byte-values", bytes(range(256)), "not valid UTF-8"),
    ("utf8-then-bad-byte", spec()[:-1].encode() + b',"k":{"\xff":1}}', "not valid UTF-8"),
    ("empty", "", "not valid JSON"),
    ("not-json", "hello {world", "not valid JSON"),
    ("truncated-json", '{"t": "jobq_testtasks:echo", "a": [', "not valid JSON"),
    ("python-repr", "{'t': 'jobq_testtasks:echo', 'a': ()}", "not valid JSON"),
    ("json-list", '["jobq_testtasks:echo", [1, 2]]', "is a JSON list, not an object"),
    ("json-int", "42", "is a JSON int, not an object"),
    ("json-float", "4.5e300", "is a JSON float, not an object"),
    ("json-string", '"jobq_testtasks:echo"', "is a JSON str, not an object"),
    ("json-null", "null", "not an object"),
    ("json-true", "true", "is a JSON bool, not an object"),
    ("no-t", '{"a": [1]}', "no valid task name (field 't' is None)"),
    ("t-null", '{"t": null, "a": []}', "field 't' is None"),
    ("t-number", '{"t": 42, "a": []}', "field 't' is 42"),
    ("t-list", '{"t": ["jobq_testtasks", "echo"]}', "field 't' is ["),
    ("t-object", '{"t": {"m": "os", "f": "system"}}', "field 't' is {"),
    ("a-string", spec(a="abc"), "args (field 'a') must be a list"),
    ("a-number", spec(a=3), "args (field 'a') must be a list"),
    ("a-object", spec(a={"x": 1}), "args (field 'a') must be a list"),
    ("a-null", spec(a=None), "args (field 'a') must be a list"),
    ("k-list", spec(k=[1, 2]), "kwargs (field 'k') must be an object"),
    ("k-string", spec(k="x=1"), "kwargs (field 'k') must be an object"),
    ("p-string", spec(p="high"), "priority 'high'"),
    ("p-float", spec(p=1.5), "priority 1.5"),
    ("p-bool", spec(p=True), "priority True"),
    ("p-nan-string", spec(p="NaN"), "priority 'NaN'"),
    ("r-negative", spec(r=-1), "max_retries -1"),
    ("r-string", spec(r="3"), "max_retries '3'"),
    ("r-list", spec(r=[3]), "max_retries [3]"),
    ("ttl-negative", spec(ttl=-5), "result_ttl -5"),
    ("ttl-float", spec(ttl=1.5), "result_ttl 1.5"),
    ("ttl-huge", spec(ttl=10**20), "result_ttl 100000000000000000000"),
    ("ttl-2**62", spec(ttl=2**62), f"result_ttl {2**62}"),
    ("to-zero", spec(to=0), "timeout 0 (must be a number of seconds"),
    ("to-negative", spec(to=-1), "timeout -1 (must be a number of seconds"),
    ("to-string", spec(to="fast"), "timeout 'fast'"),
    ("to-nan-string", spec(to="NaN"), "timeout 'NaN'"),
    ("to-bool", spec(to=True), "timeout True"),
    ("to-over-30-days", spec(to=MAX_TIMEOUT + 1), f"timeout {MAX_TIMEOUT + 1}"),
    ("to-1e308", spec(to=1e308), "timeout 1e+308"),
    ("to-huge-int", spec(to=10**400), "(must be a number of seconds"),
    ("nan-literal", spec()[:-1] + ', "to": NaN}', "NaN"),
    ("infinity-literal", spec()[:-1] + ', "p": Infinity}', "Infinity"),
    ("minus-infinity-in-args", '{"t": "jobq_testtasks:echo", "a": [-Infinity]}', "Infinity"),
    ("int-of-5000-digits", '{"t": "jobq_testtasks:echo", "a": [' + "9" * 5000 + "]}",
     "not valid JSON"),
    ("g-number", spec(g=5), "job group (field 'g') must be a short printable string"),
    ("deep-array-100k", deep(100_000), "nested too deeply"),
    ("deep-args-5000", '{"t": "jobq_testtasks:echo", "a": ' + deep(5000) + "}",
     "nested too deeply"),
    ("deep-object-5000", '{"x":' * 5000 + "1" + "}" * 5000, "nested too deeply"),
    ("missing-record", None, "job data is missing"),
]


@pytest.mark.parametrize(("case", "garbage", "reason"), BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_garbage_job_record_fails_into_the_dlq_and_the_worker_goes_on(
        case: str, garbage: str | bytes | None, reason: str, queue: JobQueue, r: redis.Redis,
        fast_config: Config) -> None:
    before = queue.enqueue(tasks.add, 1, 2)
    bad = f"bad-{case}"
    plant(r, bad, garbage)
    after = queue.enqueue(tasks.add, 3, 4)

    worker = run_worker(fast_config, queue.url)

    assert_failed(r, queue, bad, reason)
    # the valid jobs on either side ran as usual
    assert queue.get_job(before.id).return_value == 3  # type: ignore[union-attr]
    assert queue.get_job(after.id).return_value == 7  # type: ignore[union-attr]
    assert worker.jobs_done == 2
    stats = queue.get_stats()
    assert (stats["completed"], stats["failed"], stats["retried"]) == (2, 1, 0)
    assert_nothing_held(r)


#: Fields the worker does not use, with values no producer writes: the job runs, and its
#: record must stay readable (JobQueue.get_job, `jobq job`) all the same.
ODD_FIELDS: list[tuple[str, dict[str, Any]]] = [
    ("c-1e300", {"c": 1e300}),
    ("c-1e18", {"c": 1e18}),
    ("c-10**400", {"c": 10**400}),
    ("c-string", {"c": "yesterday"}),
    ("q-number", {"q": 5}),
    ("q-bad-name", {"q": "no such queue!"}),
    ("ro-number", {"ro": 5}),
    ("dro-list-of-junk", {"dro": [1, None, {}]}),
    ("dep-string", {"dep": "x"}),
    ("opf-number", {"opf": 5}),
    ("g-unknown-group", {"g": "no-such-group", "gi": "x"}),
    ("unknown-fields", {"zz": [1], "": None}),
]


def test_jobs_with_odd_fields_the_worker_does_not_use_run_and_stay_readable(
        queue: JobQueue, r: redis.Redis, fast_config: Config) -> None:
    for case, extra in ODD_FIELDS:
        plant(r, case, json.dumps({"t": "jobq_testtasks:add", "a": [1, 2], **extra}))
    run_worker(fast_config, queue.url)
    for case, _ in ODD_FIELDS:
        rec = record(r, case)
        assert (rec["s"], rec["res"]) == ("completed", 3), (case, rec)
        job = queue.get_job(case)
        assert job is not None, case
        assert (job.status, job.return_value) == (JobStatus.COMPLETED, 3), case
    assert queue.get_stats()["completed"] == len(ODD_FIELDS)
    assert_nothing_held(r)


def test_lone_surrogates_in_planted_records_travel_escaped(queue: JobQueue, r: redis.Redis,
                                                          fast_config: Config) -> None:
    # valid UTF-8 (the JSON escapes are ASCII), but they decode to lone surrogates, which a
    # result or an error message then carries back: UTF-8 cannot, so they must stay escaped
    plant(r, "echo", '{"t": "jobq_testtasks:echo", "a": ["a\\ud800"]}')
    plant(r, "boom", '{"t": "jobq_testtasks:boom", "a": ["b\\udfff"], "r": 0}')
    plant(r, "name", '{"t": "os:\\ud800", "a": []}')
    after = queue.enqueue(tasks.add, 1, 1)
    run_worker(fast_config, queue.url)
    assert record(r, "echo")["res"] == {"args": ["a\ud800"], "kwargs": {}}
    assert queue.get_job("echo").return_value == {  # type: ignore[union-attr]
        "args": ["a\ud800"], "kwargs": {}}
    assert_failed(r, queue, "boom", "b\udfff", types=("ValueError",))
    assert_failed(r, queue, "name", "is not of the form", types=("TaskNotAllowed",))
    assert queue.get_job(after.id).return_value == 2  # type: ignore[union-attr]
    assert_nothing_held(r)


def test_garbage_job_id_with_invalid_utf8_fails_into_the_dlq(
        queue: JobQueue, r: redis.Redis, redis_url: str, fast_config: Config) -> None:
    bad_id = b"id-\xff\xfe-" + os.urandom(4).hex().encode()
    plant(r, bad_id, b"\xc3\x28 not a job")
    after = queue.enqueue(tasks.add, 2, 2)
    run_worker(fast_config, queue.url)
    raw = connect(redis_url, decode_responses=False)
    assert raw.zrange(K.dlq(QUEUE), 0, -1) == [bad_id]  # the id came back byte for byte
    rec = strict_json(raw.get(K.result("").encode() + bad_id).decode())
    raw.close()
    assert rec["s"] == "failed" and rec["err"]["msg"] == "job id is not valid UTF-8", rec
    assert rec["n"] == 1
    assert queue.get_job(after.id).return_value == 4  # type: ignore[union-attr]
    assert_nothing_held(r)


#: Garbage where a valid job's state (attempts, errors) should be.
BAD_STATES: list[tuple[str, str | bytes]] = [
    ("random-bytes", b"\xff\xfe\x00\x80"),
    ("not-json", "attempts: 2"),
    ("json-list", "[1, 2, 3]"),
    ("json-number", "7"),
    ("n-and-e-of-wrong-types", '{"n": "two", "e": "no list", "s": 5}'),
    ("e-of-non-objects", '{"n": 1, "e": [1, "x", null]}'),
    ("nan-in-state", '{"n": 1, "x": NaN}'),
    ("infinity-in-errors", '{"n": 1, "e": [{"type": "X", "msg": Infinity}]}'),
    ("deep", deep(100_000)),
    ("final-record-fields", '{"res": "forged", "spec": {"t": "os:system"}, "st": "x", '
                            '"fin": [1], "err": 5, "w": {"x": 1}}'),
]


@pytest.mark.parametrize(("case", "state"), BAD_STATES, ids=[c[0] for c in BAD_STATES])
def test_garbage_state_of_a_valid_job_does_not_break_the_worker(
        case: str, state: str | bytes, queue: JobQueue, r: redis.Redis,
        fast_config: Config) -> None:
    # the state is a job's history, kept beside its spec: unreadable history is dropped
    # (the job itself is valid), and whatever the worker writes back is plain JSON
    ok = f"ok-{case}"
    plant(r, ok, json.dumps({"t": "jobq_testtasks:add", "a": [20, 22]}), state=state)
    failing = f"failing-{case}"
    plant(r, failing, json.dumps({"t": "jobq_testtasks:boom", "a": ["kaput"], "r": 0}),
          state=state)
    after = queue.enqueue(tasks.add, 1, 1)

    run_worker(fast_config, queue.url)

    done = record(r, ok)
    assert done["s"] == "completed" and done["res"] == 42
    failed = record(r, failing)
    assert failed["s"] == "failed"
    assert failed["err"]["type"] == "ValueError" and failed["err"]["msg"] == "kaput"
    assert r.zscore(K.dlq(QUEUE), failing) is not None
    for job_id in (ok, failing):
        job = queue.get_job(job_id)
        assert job is not None and job.status.finished
    assert queue.get_job(after.id).return_value == 2  # type: ignore[union-attr]
    assert_nothing_held(r)


def test_nesting_depths_around_the_recursion_limit(queue: JobQueue, r: redis.Redis,
                                                   fast_config: Config) -> None:
    """A ladder of nested args across the depth where decoding the spec (or encoding the
    echoed result, a little deeper) stops working: each job completes or fails; none breaks
    the worker."""
    depths = list(range(850, 1010, 4)) + [200, 5000]
    for d in depths:
        plant(r, f"depth-{d}", '{"t": "jobq_testtasks:echo", "a": [' + deep(d) + "]}")
    run_worker(fast_config, queue.url)
    outcomes = {d: record(r, f"depth-{d}") for d in depths}
    assert outcomes[200]["s"] == "completed"
    assert outcomes[200]["res"] == {"args": [json.loads(deep(200))], "kwargs": {}}
    assert outcomes[5000]["s"] == "failed"
    for d, rec in outcomes.items():
        assert rec["s"] in ("completed", "failed"), (d, rec)
        if rec["s"] == "failed":
            assert rec["n"] == 1
            assert rec["err"]["type"] in ("BadJob", "SerializationError"), (d, rec["err"])
    assert_nothing_held(r)


def test_a_standalone_worker_process_survives_every_kind_of_garbage(
        queue: JobQueue, r: redis.Redis, spawn: Spawn) -> None:
    proc = spawn("worker", "-I", "jobq_testtasks")
    first = queue.enqueue(tasks.add, 1, 1)
    wait_until(lambda: queue.get_status(first.id) == "completed", timeout=20,
               message="the worker to run a first job")
    bad_ids = []
    for case, garbage, _ in BAD_SPECS:
        plant(r, f"bad-{case}", garbage)
        bad_ids.append(f"bad-{case}")
    for case, state in BAD_STATES:
        plant(r, f"state-{case}", json.dumps({"t": "jobq_testtasks:noop", "a": []}),
              state=state)
    r.lpush(K.wake(QUEUE), "1")
    last = queue.enqueue(tasks.add, 20, 22)
    wait_until(lambda: queue.get_status(last.id) == "completed", timeout=30,
               message="the job after the garbage to complete")
    assert queue.get_job(last.id).return_value == 42  # type: ignore[union-attr]
    assert proc.poll() is None, proc.communicate()[1]  # still running
    for job_id in bad_ids:
        assert queue.get_status(job_id) == "failed", job_id
    assert r.zcard(K.dlq(QUEUE)) == len(bad_ids)
    assert_nothing_held(r)
    # the operator can list it all
    dlq = subprocess.run([sys.executable, "-m", "jobq.cli", "dlq", "list", "--json",
                          "--limit", "1000"], env=subprocess_env(), capture_output=True,
                         text=True, timeout=30)
    assert dlq.returncode == 0, dlq.stderr
    assert {j["id"] for j in json.loads(dlq.stdout)} == set(bad_ids)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


# -- fuzzing the decoder -----------------------------------------------------------------------

_leaves = (st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
           | st.sampled_from(["\ud800", "x\udfff", "NaN", "Infinity", "1e999", "", "\x00"]))
json_values = st.recursive(
    _leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=4), inner, max_size=4), max_leaves=12)
task_names = st.sampled_from([
    *FUZZ_OK_TASKS, "jobq_testtasks:_private", "jobq_testtasks:no_such_task",
    "jobq_testtasks:connect", "os:system", "builtins:eval", "subprocess:run", "__import__",
    "../../etc:passwd", "os: system", "jobq_testtasks:echo\n", "", ":", "a:b:c",
]) | json_values
option = (st.integers(-3, 3) | st.sampled_from([10**30, -(10**30), 2**62, 0.5, "1", True])
          | json_values)


def _not_a_short_time_limit(value: Any) -> bool:
    # a valid limit that a fast task could hit would be retried (JobTimeout is an ordinary
    # failure), up to max_retries times: not garbage, and not what this property is about
    return not (isinstance(value, int | float) and not isinstance(value, bool)
                and 0 < value < 1)


timeouts = (st.sampled_from([0, -1, 1, 300, MAX_TIMEOUT, MAX_TIMEOUT + 1, 1e308, "5", True])
            | json_values.filter(_not_a_short_time_limit))
specs = st.fixed_dictionaries({}, optional={
    "t": task_names, "a": st.lists(json_values, max_size=3) | json_values,
    "k": st.dictionaries(st.text(max_size=4), json_values, max_size=3) | json_values,
    "p": option, "r": option, "ttl": option, "to": timeouts, "g": json_values,
    "ro": json_values, "dro": json_values, "q": json_values, "c": json_values,
    "dep": json_values, "opf": json_values})


def _encode(value: Any) -> str:
    return json.dumps(value)  # NaN/Infinity come out as bare literals: not standard JSON


garbage = st.one_of(
    st.binary(max_size=48),
    st.text(max_size=48),
    json_values.map(_encode),
    specs.map(_encode),
    specs.map(_encode),
    specs.map(lambda s: _encode(s)[: max(1, len(_encode(s)) // 2)]),  # truncated
    st.integers(1, 3000).map(lambda d: '{"t": "jobq_testtasks:echo", "a": ' + deep(d) + "}"),
    st.none(),  # the id is queued without a record
)


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(batch=st.lists(st.tuples(garbage, st.none() | st.binary(max_size=16) | json_values.map(
    _encode)), min_size=1, max_size=6))
def test_fuzzed_job_records_end_failed_or_completed_and_never_break_the_worker(
        r: redis.Redis, redis_url: str, fast_config: Config,
        batch: list[tuple[str | bytes | None, str | None]]) -> None:
    r.flushall()
    queue = JobQueue(QUEUE, redis_url=redis_url)
    ids = []
    for i, (raw, state) in enumerate(batch):
        ids.append(f"fuzz-{i}")
        plant(r, ids[-1], raw, state=state)
    canary = queue.enqueue(tasks.add, 2, 3)

    worker = run_worker(fast_config, redis_url)  # raises if the worker broke

    completed = failed = 0
    for job_id in ids:
        raw_spec = batch[int(job_id.split("-")[1])][0]
        if r.exists(K.result(job_id)):
            rec = record(r, job_id)
            assert rec["s"] in ("completed", "failed"), rec
        else:  # completed with result_ttl 0: no record kept, but it is among the recent
            assert job_id in r.lrange(K.recent(QUEUE), 0, -1), (job_id, raw_spec)
            rec = {"s": "completed"}
        if rec["s"] == "failed":
            failed += 1
            assert r.zscore(K.dlq(QUEUE), job_id) is not None
            assert rec["err"]["msg"], rec  # it says why
        else:
            completed += 1
            spec_ = json.loads(raw_spec)  # type: ignore[arg-type]
            assert spec_["t"] in FUZZ_OK_TASKS, (job_id, raw_spec)  # nothing else ever runs
    assert queue.get_job(canary.id).return_value == 5  # type: ignore[union-attr]
    assert worker.jobs_done == completed + 1
    stats = queue.get_stats()
    assert (stats["completed"], stats["failed"]) == (completed + 1, failed)
    assert stats["retried"] == 0
    assert_nothing_held(r)


# -- task names nobody allowed, arguments and results that do not fit ---------------------------

def test_forbidden_and_malformed_task_names_never_run(queue: JobQueue, r: redis.Redis,
                                                      spawn: Spawn, tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    # names the producer accepts (module:function): refused by the worker's allow-list
    accepted = {
        "os:system": queue.enqueue("os:system", f"touch {target}"),
        "builtins:eval": queue.enqueue("builtins:eval", f"open({str(target)!r}, 'w')"),
        "builtins:exec": queue.enqueue("builtins:exec", f"open({str(target)!r}, 'w')"),
        "subprocess:run": queue.enqueue("subprocess:run", ["touch", str(target)]),
        "jobq_testtasks:_private": queue.enqueue("jobq_testtasks:_private"),
        "jobq_testtasks:os": queue.enqueue("jobq_testtasks:os"),  # a module, not a function
        "jobq_testtasks:connect": queue.enqueue("jobq_testtasks:connect", "redis://x"),
        "builtins:__import__": queue.enqueue("builtins:__import__", "os"),
    }
    # names the producer refuses: written straight into Redis
    refused = ["__import__", "../../etc:passwd", "jobq_testtasks/../os:system",
               "os: system", "os:system ", "jobq_testtasks:noop\n", "os.path:join()", ""]
    for name in refused:
        with pytest.raises(ValueError, match="is not of the form"):
            queue.enqueue(name, "x")
    assert r.hlen(K.jobs) == len(accepted)  # the refused ones wrote nothing
    for i, name in enumerate(refused):
        plant(r, f"raw-{i}", json.dumps({"t": name, "a": [f"touch {target}"]}))
    r.lpush(K.wake(QUEUE), "1")
    # the module named is imported by nobody: `os` only if this worker allowed it
    code = subprocess.run([sys.executable, "-m", "jobq.cli", "worker", "-I", "jobq_testtasks",
                           "--burst"], env=subprocess_env(), capture_output=True, text=True,
                          timeout=60)
    assert code.returncode == 0, code.stderr
    assert not target.exists()
    for name, job in accepted.items():
        rec = assert_failed(r, queue, job.id, "not allowed", types=("TaskNotAllowed",))
        assert name in rec["err"]["msg"]
    assert "module 'os' is not among this worker's imports" in record(
        r, accepted["os:system"].id)["err"]["msg"]
    assert "private names never run" in record(
        r, accepted["jobq_testtasks:_private"].id)["err"]["msg"]
    for i, name in enumerate(refused):
        rec = record(r, f"raw-{i}")
        assert rec["s"] == "failed" and rec["n"] == 1
        msg = rec["err"]["msg"]
        assert "not of the form" in msg or "not allowed" in msg or "no valid task name" in msg \
            or "no task name" in msg, (name, msg)
    assert_nothing_held(r)


def test_arguments_that_do_not_fit_the_signature_fail_without_retries(
        queue: JobQueue, r: redis.Redis, fast_config: Config) -> None:
    jobs = [
        queue.enqueue(tasks.add, 1, max_retries=5),  # missing
        queue.enqueue(tasks.add, 1, 2, 3, max_retries=5),  # too many
        queue.enqueue(tasks.add, 1, 2, kwargs={"c": 3}, max_retries=5),  # unknown keyword
        queue.enqueue(tasks.add, 1, kwargs={"a": 1, "b": 2}, max_retries=5),  # twice
        queue.enqueue(tasks.noop, [], max_retries=5),
    ]
    after = queue.enqueue(tasks.add, 5, 5)
    run_worker(fast_config, queue.url)
    for job in jobs:
        assert_failed(r, queue, job.id, "argument", types=("TypeError",))
    assert queue.get_job(after.id).return_value == 10  # type: ignore[union-attr]
    assert queue.get_stats()["retried"] == 0
    assert_nothing_held(r)


def test_results_and_errors_that_json_cannot_carry_as_is(queue: JobQueue, r: redis.Redis,
                                                         fast_config: Config) -> None:
    unserializable = queue.enqueue(tasks.unserializable, max_retries=5)
    # a lone surrogate is not UTF-8: it must travel escaped, as arguments, results and errors
    lone = queue.enqueue(tasks.echo, "a\ud800b", kwargs={"k": "\udfff"})
    lone_error = queue.enqueue(tasks.boom, "bad \udc80 message", max_retries=0)
    after = queue.enqueue(tasks.add, 1, 2)
    run_worker(fast_config, queue.url)
    rec = assert_failed(r, queue, unserializable.id, "which JSON cannot carry",
                        types=("SerializationError",))
    assert rec["err"]["msg"].startswith("the task returned a object")
    assert queue.get_job(lone.id).return_value == {  # type: ignore[union-attr]
        "args": ["a\ud800b"], "kwargs": {"k": "\udfff"}}
    assert_failed(r, queue, lone_error.id, "bad \udc80 message", types=("ValueError",))
    assert queue.get_job(after.id).return_value == 3  # type: ignore[union-attr]
    assert_nothing_held(r)


def test_a_result_nested_too_deeply_to_encode_is_a_serialization_error() -> None:
    # what the worker does with a task's return value (the echo ladder above cannot get
    # there: a spec that deep fails to decode first)
    value: list[Any] = []
    for _ in range(100_000):
        value = [value]
    with pytest.raises(SerializationError, match="the task returned a list, which JSON cannot"):
        serialization.encode_result(value)


def test_payload_over_max_payload_bytes_is_refused_and_nothing_is_written(
        redis_url: str, r: redis.Redis) -> None:
    small = JobQueue(QUEUE, redis_url=redis_url,
                     config=load_config(redis_url=redis_url, max_payload_bytes=1000))
    with pytest.raises(PayloadTooLarge, match=r"over the limit of 1000 \(max_payload_bytes\)"):
        small.enqueue(tasks.echo, "x" * 1000)
    with pytest.raises(PayloadTooLarge):
        small.enqueue(tasks.echo, kwargs={"blob": "é" * 600})  # 1200 bytes in UTF-8
    with pytest.raises(PayloadTooLarge):  # one too large in a batch: none is sent
        small.enqueue_many(tasks.echo, [["a"], ["b"], ["x" * 2000], ["c"]])
    assert r.dbsize() == 0
    small.enqueue(tasks.echo, "x" * 900)  # under the limit: fine
    assert r.hlen(K.jobs) == 1


@pytest.mark.parametrize("priority", ["1", 1.5, None, True, [1], float("nan")])
def test_a_priority_that_is_not_an_integer_is_a_type_error(priority: Any, queue: JobQueue,
                                                           r: redis.Redis) -> None:
    with pytest.raises(TypeError, match="priority must be an integer"):
        queue.enqueue(tasks.add, 1, 2, priority=priority)
    assert r.dbsize() == 0


def test_a_result_ttl_redis_cannot_keep_is_refused_at_enqueue(queue: JobQueue, r: redis.Redis,
                                                              fast_config: Config) -> None:
    for ttl in (MAX_TTL + 1, 10**16, 10**20):
        with pytest.raises(ValueError, match="result_ttl must be at most"):
            queue.enqueue(tasks.add, 1, 2, result_ttl=ttl)
    for ttl in (-1, 1.5, "60"):
        with pytest.raises((TypeError, ValueError), match="result_ttl"):
            queue.enqueue(tasks.add, 1, 2, result_ttl=ttl)
    assert r.dbsize() == 0
    kept = queue.enqueue(tasks.add, 1, 2, result_ttl=MAX_TTL)  # the longest allowed works
    run_worker(fast_config, queue.url)
    assert queue.get_job(kept.id).return_value == 3  # type: ignore[union-attr]
    assert r.ttl(K.result(kept.id)) > MAX_TTL - 60


CRONS = [
    ("61 * * * *", "field 1 (minute) '61'"),
    ("* 24 * * *", "field 2 (hour) '24'"),
    ("* * 32 * *", "field 3 (day of month) '32'"),
    ("* * * 13 *", "field 4 (month) '13'"),
    ("* * * * funday", "field 5 (day of week) 'funday'"),
    ("* * * * * 61", "field 6 (second) '61'"),
    ("*/0 * * * *", "field 1 (minute) '*/0'"),
    ("* * *", "has 3 fields"),
    ("", "expected a cron expression"),
    ("@every 5s", "has 2 fields"),
]


@pytest.mark.parametrize(("cron", "named"), CRONS, ids=[c[0] or "empty" for c in CRONS])
def test_an_invalid_cron_expression_names_the_field(cron: str, named: str, queue: JobQueue,
                                                    r: redis.Redis) -> None:
    with pytest.raises(ScheduleError) as info:
        Scheduler(queue).schedule_cron("nightly", tasks.noop, cron)
    assert named in str(info.value)
    assert "cron" in str(info.value)
    assert r.dbsize() == 0  # nothing stored


def test_schedule_add_with_invalid_cron_exits_2_with_one_line(redis_url: str, r: redis.Redis,
                                                              spawn: Spawn) -> None:
    procs = [(named, spawn("schedule", "add", "nightly", "jobq_testtasks:noop", "--cron", cron))
             for cron, named in CRONS[:5]]
    for named, proc in procs:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == exitcodes.USAGE, err
        assert err.count("\n") == 1 and err.startswith("jobq: error: "), err
        assert named in err and "Traceback" not in err
        assert out == ""
    assert r.dbsize() == 0


# -- bad config files ------------------------------------------------------------------------

#: (TOML text, the key the error must name, what it must say about it)
BAD_CONFIGS = [
    ("wrokers = 2\n", "unknown key 'wrokers'", "did you mean 'workers'?"),
    ("[redis]\nurl = 'redis://x'\n", "unknown key 'redis'", "unknown key"),
    ('workers = "two"\n', "workers:", "expected a positive integer, got 'two'"),
    ("workers = 0\n", "workers:", "got 0"),
    ("lease_time = 1000\n", "lease_time:", "<= 300, got 1000"),
    ("default_timeout = nan\n", "default_timeout:", "got nan"),
    ('log_level = "loud"\n', "log_level:", "expected one of debug, info, warning, error"),
    ("queues = []\n", "queues:", "expected a non-empty list of queue names"),
    ('queues = ["ok", "bad name"]\n', "queues:", "item 2"),
    ('imports = "jobq_testtasks"\n', "imports:", "expected a list of module names"),
    ('redis_url = "http://:TOPSECRETCFG@example.com"\n', "redis_url:", "http://:***@example.com"),
    ("max_jobs_jitter = 2.0\n", "max_jobs_jitter:", "between 0 and 1"),
    ("retry_backoff_base = 10.0\nretry_backoff_cap = 1.0\n", "retry_backoff_cap:",
     "must be >= retry_backoff_base (10)"),
    ("result_ttl = -1\n", "result_ttl:", "expected an integer >= 0, got -1"),
    ("result_ttl = 100000000000000000\n", "result_ttl:",
     "expected at most 3153600000 (100 years, in seconds), got 100000000000000000"),
    ("failed_ttl = 10000000000000000\n", "failed_ttl:",
     "expected at most 3153600000 (100 years, in seconds), got 10000000000000000"),
    ("workers = 2\nworkers = 3\n", "TOML syntax error", "line 2"),
]


@pytest.fixture
def marker(monkeypatch: pytest.MonkeyPatch) -> str:
    """A value put in the environment of every process a test starts, to find them all."""
    mark = key()
    monkeypatch.setenv("JOBQ_TEST_MARK", mark)
    return mark


def marked_processes(mark: str) -> list[str]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get("JOBQ_TEST_MARK") == mark:
                found.append(" ".join(proc.info["cmdline"] or []))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def test_bad_config_files_stop_master_and_cli_with_one_line_and_exit_2(
        tmp_path: Path, redis_url: str, r: redis.Redis, spawn: Spawn, marker: str) -> None:
    schedule = ('[[schedule]]\nname = "nightly"\ntask = "jobq_testtasks:noop"\n'
                'cron = "61 * * * *"\n')
    clients_before = len(r.client_list())
    env = subprocess_env()
    del env["JOBQ_REDIS_URL"]  # it would override the file's redis_url
    # options that set the same keys as the file: a bad value in the file stops the command
    # all the same (an option must not hide it)
    options = ["--redis-url", redis_url, "--log-level", "info", "--log-format", "text"]
    runs = []
    for i, (text, names, says) in enumerate(BAD_CONFIGS):
        path = tmp_path / f"bad{i}.toml"
        path.write_text(text)
        runs.append((path, names, says, "jobq-master",
                     spawn("--config", str(path), "-I", "jobq_testtasks", "-w", "1",
                           "-q", "default", *options, env=env, module="jobq.cli.master")))
        runs.append((path, names, says, "jobq",
                     spawn("--config", str(path), *options, "info", env=env)))
    path = tmp_path / "schedule.toml"
    path.write_text(schedule)
    runs.append((path, "cron:", "field 1 (minute) '61'", "jobq-master",
                 spawn("--config", str(path), env=env, module="jobq.cli.master")))
    for path, names, says, prog, proc in runs:
        out, err = proc.communicate(timeout=30)
        where = f"{prog} with {path.read_text()!r}"
        assert proc.returncode == exitcodes.USAGE, (where, err)
        assert err.count("\n") == 1, (where, err)  # exactly one line
        assert err.startswith(f"{prog}: error: {path}: "), (where, err)
        assert names in err and says in err, (where, err)
        assert "Traceback" not in err and out == "", (where, err)
        assert "TOPSECRETCFG" not in err
    # nothing was started: no process of ours is left (no worker, no scheduler), none of
    # them ever connected to the server or registered there
    assert marked_processes(marker) == []
    assert len(r.client_list()) == clients_before
    assert r.dbsize() == 0


# -- bad command lines ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """A second real server that wants a password."""
    server = EmbeddedServer(tmp_path_factory.mktemp("pw"))
    server.start(extra={"requirepass": "s3cret-pw"})
    yield server
    pid = server.pid()
    try:
        server.stop()
    except ServerError:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)


def test_bad_command_lines_are_one_line_with_the_documented_exit_code(
        redis_url: str, r: redis.Redis, spawn: Spawn, auth_server: EmbeddedServer,
        quick_connect: Path) -> None:
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    wrong_pw = f"unix://:WRONG-pw-77@{auth_server.socket_path}"
    no_pw = auth_server.url
    usage, connect_ = exitcodes.USAGE, exitcodes.CONNECT
    cases: list[tuple[list[str], int, str]] = [
        (["enqueue", "jobq_testtasks:add", "[1, 2"], usage, "ARGS_JSON is not valid JSON"),
        (["enqueue", "jobq_testtasks:add", "{'a': 1}"], usage, "ARGS_JSON is not valid JSON"),
        (["enqueue", "jobq_testtasks:add", "[1]", "--kwargs", "[2]"], usage,
         "--kwargs must be a JSON object, got list"),
        (["enqueue", "jobq_testtasks:add", "[1]", "--kwargs", "{b: 2}"], usage,
         "--kwargs is not valid JSON"),
        (["enqueue", "not a task", "[]"], usage, "is not of the form"),
        (["enqueue", "jobq_testtasks:add", "[1, 2]", "--priority", "high"], usage,
         "'high' is not a valid integer"),
        (["enqueue", "jobq_testtasks:add", "[1, 2]", "--timeout", "-3"], usage,
         "timeout must be > 0"),
        (["enqueue", "jobq_testtasks:add", "[1, 2]", "-q", "bad queue"], usage,
         "bad queue name 'bad queue': use 1-64 of"),
        (["enqueue"], usage, "Missing argument 'TASK'"),
        (["job"], usage, "Missing argument 'JOB_ID'"),
        (["requeue"], usage, "give job ids or --failed"),
        (["info", "--bogus"], usage, "No such option '--bogus'"),
        (["--bogus", "info"], usage, "No such option '--bogus'"),
        (["frobnicate"], usage, "No such command 'frobnicate'"),
        (["schedule", "add", "n", "jobq_testtasks:noop"], usage,
         "give exactly one of --cron, --interval, --at"),
        (["schedule", "add", "n", "jobq_testtasks:noop", "--at", "tomorrow-ish"], usage,
         "is not an ISO date-time"),
        (["--redis-url", "http://example.com", "info"], usage, "redis_url"),
        (["--redis-url", unreachable, "info"], connect_,
         f"cannot connect to {unreachable}: Connection refused"),
        (["--redis-url", unreachable, "enqueue", "jobq_testtasks:add", "[1, 2]"], connect_,
         "Connection refused"),
        (["--redis-url", wrong_pw, "info"], connect_, "authentication failed for unix://:***@"),
        (["--redis-url", no_pw, "info"], connect_, "uthentication required"),
        (["--redis-url", no_pw, "enqueue", "jobq_testtasks:add", "[1, 2]"], connect_,
         "uthentication required"),
    ]
    procs = [(args, code, says, spawn(*args)) for args, code, says in cases]
    debug = spawn("--debug", "--redis-url", unreachable, "info")
    debug_auth = spawn("--debug", "--redis-url", wrong_pw, "info")
    for args, code, says, proc in procs:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == code, (args, err)
        assert err.count("\n") == 1, (args, err)  # one readable line
        assert err.startswith("jobq: error: "), (args, err)
        assert says in err, (args, err)
        assert "Traceback" not in err, (args, err)
        assert "WRONG-pw-77" not in err and out == ""
    for proc, says in ((debug, "Connection refused"), (debug_auth, "authentication failed")):
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == connect_, err
        assert err.startswith("Traceback (most recent call last):"), err
        last = err.splitlines()[-1]
        assert last.startswith("jobq: error: ") and says in last, err
        assert "WRONG-pw-77" not in err
    assert r.dbsize() == 0  # none of it enqueued anything
