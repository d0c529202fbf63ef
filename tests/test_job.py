"""Unit tests of the job model, its JSON encoding and the worker's task allow-list.

No server: everything here is pure Python.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import jobq_testtasks as tasks
import pytest

from jobq import job as jobs
from jobq import registry, serialization
from jobq.exceptions import PayloadTooLarge, SerializationError, TaskImportError, TaskNotAllowed
from jobq.job import Job, JobStatus, new_id, task_name
from jobq.registry import TaskResolver
from jobq.wire import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_PRIORITY,
    DEFAULT_QUEUE,
    DEFAULT_TIMEOUT,
    BadJob,
    encode_spec,
)
from jobq.wire import decode_json as decode


def encode(job: Job, max_bytes: int = 1 << 20) -> str:
    return encode_spec(job, max_bytes=max_bytes)


# -- construction and validation ---------------------------------------------------------------

def test_job_defaults_and_task_name_from_function() -> None:
    job = Job(tasks.add, (1, 2))
    assert job.task == "jobq_testtasks:add"
    assert job.args == (1, 2)
    assert job.kwargs == {}
    assert job.priority == DEFAULT_PRIORITY == 0
    assert job.max_retries == DEFAULT_MAX_RETRIES == 3
    assert job.timeout == DEFAULT_TIMEOUT == 300.0
    assert job.queue is None  # set when enqueued
    assert job.result_ttl is None
    assert job.status is JobStatus.PENDING
    assert job.retry_count == job.attempts == 0
    assert len(job.id) == 24


def test_job_options_are_kept() -> None:
    job = Job(tasks.echo, [1, "x"], {"k": [1, 2]}, id="my-id", priority=-5, max_retries=0,
              timeout=2, queue="high", result_ttl=60)
    assert (job.id, job.priority, job.max_retries, job.timeout, job.queue, job.result_ttl) == (
        "my-id", -5, 0, 2.0, "high", 60)
    assert job.args == (1, "x")
    assert job.kwargs == {"k": [1, 2]}


def test_module_function_string_is_a_task_name() -> None:
    assert Job("some.pkg.module:function").task == "some.pkg.module:function"
    assert task_name("m:f") == "m:f"


@pytest.mark.parametrize("name", ["nocolon", "a:b:c", "mod:Class.method", "mod:", ":func",
                                  "1mod:f", "mod:f()", "os.system", "", "mod :f", "mod:f\n"])
def test_malformed_task_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not of the form"):
        Job(name)


def test_registered_task_uses_its_registered_name_and_queue() -> None:
    job = Job(tasks.registered, (3,))
    assert job.task == "jobq_testtasks:registered"
    assert job.queue == "default"


def test_lambda_is_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="not a module-level function.*top level of a module"):
        Job(lambda: 1)


def test_nested_function_is_refused_with_a_clear_message() -> None:
    def inner() -> None:
        pass

    with pytest.raises(ValueError, match=r"inner' is not a module-level function"):
        Job(inner)


def test_method_is_refused() -> None:
    class C:
        def m(self) -> None:
            pass

    with pytest.raises(ValueError, match="not a module-level function"):
        Job(C().m)


@pytest.mark.parametrize("func", [5, None, object()])
def test_non_callable_is_refused(func: object) -> None:
    with pytest.raises(TypeError, match="needs a function"):
        Job(func)  # type: ignore[arg-type]


@pytest.mark.parametrize("priority", ["high", 1.5, None, True])
def test_bad_priority_type(priority: object) -> None:
    with pytest.raises(TypeError, match="priority must be an integer"):
        Job(tasks.add, (1, 2), priority=priority)  # type: ignore[arg-type]


def test_negative_priority_is_fine() -> None:
    assert Job(tasks.add, (1, 2), priority=-100).priority == -100


def test_negative_max_retries() -> None:
    with pytest.raises(ValueError, match="max_retries must be >= 0"):
        Job(tasks.add, (1, 2), max_retries=-1)


@pytest.mark.parametrize("max_retries", ["3", 2.0, False])
def test_bad_max_retries_type(max_retries: object) -> None:
    with pytest.raises(TypeError, match="max_retries must be an integer"):
        Job(tasks.add, max_retries=max_retries)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [0, -1, -0.5])
def test_non_positive_timeout(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout must be > 0"):
        Job(tasks.add, timeout=timeout)


def test_timeout_must_be_a_number() -> None:
    with pytest.raises(TypeError, match="timeout must be a number"):
        Job(tasks.add, timeout="5")  # type: ignore[arg-type]


@pytest.mark.parametrize("queue", ["a b", "a:b", "{x}", "x" * 65, "q\n", "é"])
def test_bad_queue_name(queue: str) -> None:
    with pytest.raises(ValueError, match="queue name"):
        Job(tasks.add, queue=queue)


@pytest.mark.parametrize("queue", ["high", "a.b-c_d", "x" * 64, "0"])
def test_good_queue_name(queue: str) -> None:
    assert Job(tasks.add, queue=queue).queue == queue


@pytest.mark.parametrize("args", ["ab", b"ab", 5, {"a": 1}])
def test_args_must_be_a_sequence(args: object) -> None:
    with pytest.raises(TypeError, match="args must be a tuple or list"):
        Job(tasks.echo, args)  # type: ignore[arg-type]


@pytest.mark.parametrize("job_id", ["x" * 129, "a\nb", "tab\there"])
def test_bad_job_id(job_id: str) -> None:
    with pytest.raises(ValueError, match="job id"):
        Job(tasks.add, id=job_id)


def test_negative_result_ttl() -> None:
    with pytest.raises(ValueError, match="result_ttl must be >= 0"):
        Job(tasks.add, result_ttl=-1)


def test_new_ids_are_unique_and_sort_by_creation_time() -> None:
    ids = [new_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(i) == 24 for i in ids)
    # the first 11 hex digits are milliseconds: never decreasing
    assert [i[:11] for i in ids] == sorted(i[:11] for i in ids)


# -- spec and round trip -----------------------------------------------------------------------

def test_spec_omits_defaults() -> None:
    spec = Job(tasks.add, (1, 2)).spec()
    assert set(spec) == {"t", "a", "c"}
    # options given explicitly but equal to the defaults are left out as well
    spec = Job(tasks.add, (1, 2), priority=0, max_retries=3, timeout=300, queue="default").spec()
    assert set(spec) == {"t", "a", "c"}


def test_spec_carries_every_non_default_option() -> None:
    job = Job(tasks.echo, (1,), {"x": 2}, priority=7, max_retries=1, timeout=2.5, queue="high",
              result_ttl=0)
    spec = job.spec()
    assert spec["t"] == "jobq_testtasks:echo"
    assert list(spec["a"]) == [1]
    assert spec["k"] == {"x": 2}
    assert spec["p"] == 7
    assert spec["r"] == 1
    assert spec["to"] == 2.5
    assert spec["q"] == "high"
    assert spec["ttl"] == 0  # zero is meaningful (keep no result), not a default


def test_spec_is_compact_json() -> None:
    text = encode(Job(tasks.add, (1, 2)))
    assert " " not in text
    assert json.loads(text)["a"] == [1, 2]


def test_from_spec_round_trip() -> None:
    job = Job(tasks.echo, (1, "two", [3], {"four": None}), {"k": "v"}, id="rt-1", priority=-3,
              max_retries=0, timeout=1.5, queue="high", result_ttl=9)
    back = Job.from_spec("rt-1", json.loads(encode(job)))
    assert back.id == "rt-1"
    assert back.task == job.task
    assert back.args == job.args
    assert back.kwargs == job.kwargs
    assert (back.priority, back.max_retries, back.timeout, back.queue, back.result_ttl) == (
        -3, 0, 1.5, "high", 9)
    assert abs((back.created_at - job.created_at).total_seconds()) < 0.001


def test_from_spec_round_trip_of_defaults() -> None:
    job = Job(tasks.noop)
    back = Job.from_spec(job.id, json.loads(encode(job)))
    assert back.args == ()
    assert back.kwargs == {}
    assert (back.priority, back.max_retries, back.timeout, back.queue, back.result_ttl) == (
        0, 3, 300.0, DEFAULT_QUEUE, None)


def test_from_spec_accepts_lua_empty_object_for_empty_args() -> None:
    # cjson (in the Lua scripts) encodes an empty Lua table as {}, never []
    assert Job.from_spec("x", {"t": "m:f", "a": {}}).args == ()


@pytest.mark.parametrize("spec, message", [
    ([1, 2], "JSON list, not an object"),
    ("m:f", "JSON str, not an object"),
    (None, "JSON NoneType, not an object"),
    (42, "JSON int, not an object"),
    ({}, "no valid task name"),
    ({"t": 5}, "no valid task name"),
    ({"t": "os.system"}, "no valid task name"),
    ({"t": "m:f\n"}, "no valid task name"),
    ({"t": "m:f", "a": "abc"}, "args .* must be a list"),
    ({"t": "m:f", "a": {"x": 1}}, "args .* must be a list"),
    ({"t": "m:f", "a": 3}, "args .* must be a list"),
    ({"t": "m:f", "k": [1]}, "kwargs .* must be an object"),
    ({"t": "m:f", "p": "high"}, "bad option: priority"),
    ({"t": "m:f", "p": True}, "bad option: priority"),
    ({"t": "m:f", "r": -1}, "bad option: max_retries"),
    ({"t": "m:f", "to": 0}, "bad option: timeout"),
    ({"t": "m:f", "ttl": "x"}, "bad option: result_ttl"),
    ({"t": "m:f", "g": 5}, "job group"),
])
def test_from_spec_refuses_garbage(spec: object, message: str) -> None:
    with pytest.raises(BadJob, match=message):
        Job.from_spec("x", spec)


def test_from_spec_drops_malformed_informational_fields() -> None:
    # the worker runs such a job (it does not use these fields), so it reads back as a job
    # too, as if the field were absent: one set of rules for both (jobq.wire)
    job = Job.from_spec("j1", {"t": "m:f", "q": "a b", "c": "yesterday", "ro": 5,
                               "dep": "x", "gi": "x", "k": None})
    assert (job.task, job.queue, job.retry_on, job.depends_on) == ("m:f", DEFAULT_QUEUE, [], [])
    assert job.kwargs == {} and job.group_index is None
    assert abs(job.created_at.timestamp() - time.time()) < 60  # unknown: read as now



@pytest.mark.parametrize("raw", ["{not json", "", b"\xff\xfe", "[1,"])
def test_decode_refuses_invalid_json(raw: str | bytes) -> None:
    with pytest.raises(BadJob, match="not valid JSON"):
        decode(raw)


def test_bad_job_is_a_value_error() -> None:
    assert issubclass(BadJob, ValueError)


# -- status ------------------------------------------------------------------------------------

def test_job_status_values() -> None:
    tutorial = {"pending", "processing", "completed", "failed", "retry"}
    assert tutorial <= {s.value for s in JobStatus}
    assert {s.value for s in JobStatus} == tutorial | {"scheduled", "deferred", "cancelled"}
    assert JobStatus("completed") is JobStatus.COMPLETED
    assert JobStatus.PENDING == "pending"  # a str enum: compares with plain strings


def test_finished_statuses() -> None:
    assert {s for s in JobStatus if s.finished} == {
        JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED}


def test_apply_state_folds_a_final_record() -> None:
    job = Job(tasks.boom)
    job.apply_state({"s": "failed", "n": 2, "d": 1, "st": 10.0, "fin": 11.5, "w": "w1",
                     "e": [{"type": "ValueError", "msg": "first", "tb": "tb1"},
                           {"type": "ValueError", "msg": "second", "tb": "tb2"}],
                     "err": {"type": "ValueError", "msg": "second", "tb": "tb2"}})
    assert job.status is JobStatus.FAILED
    # two attempts, both failed ("n"), so one retry; a holder lost once ("d") was one of them
    assert (job.attempts, job.retries, job.retry_count, job.deliveries, job.worker) == (
        2, 1, 1, 2, "w1")
    assert job.error == "ValueError: second"
    assert job.traceback == "tb2"
    assert job.started_at == datetime.fromtimestamp(10.0, UTC)
    assert job.completed_at == datetime.fromtimestamp(11.5, UTC)
    assert len(job.errors) == 2
    assert job.final_error == {"type": "ValueError", "msg": "second", "tb": "tb2"}


def test_apply_state_rejects_unknown_status() -> None:
    with pytest.raises(ValueError):
        Job(tasks.noop).apply_state({"s": "exploded"})


# -- serialization -----------------------------------------------------------------------------

def test_unserializable_positional_argument_is_named() -> None:
    with pytest.raises(SerializationError, match=r"^argument 1: object is not JSON-serializable"):
        encode(Job(tasks.echo, ("fine", object())))


def test_unserializable_first_argument_is_named() -> None:
    with pytest.raises(SerializationError, match=r"^argument 0: set is not JSON-serializable"):
        encode(Job(tasks.echo, ({1, 2},)))


def test_unserializable_keyword_argument_is_named() -> None:
    with pytest.raises(SerializationError, match=r"^keyword argument 'x': bytes is not JSON"):
        encode(Job(tasks.echo, (1,), {"ok": 1, "x": b"raw"}))


def test_nan_is_not_json() -> None:
    with pytest.raises(SerializationError, match=r"^argument 0: float"):
        encode(Job(tasks.echo, (float("nan"),)))


def test_serialization_error_is_a_type_error() -> None:
    assert issubclass(SerializationError, TypeError)


def test_tuples_arrive_as_lists() -> None:
    assert json.loads(encode(Job(tasks.echo, ((1, 2),))))["a"] == [[1, 2]]


def test_unicode_survives() -> None:
    job = Job(tasks.echo, ("żółw 🐢",))
    assert Job.from_spec(job.id, json.loads(encode(job))).args == ("żółw 🐢",)


def test_payload_too_large() -> None:
    job = Job(tasks.echo, ("x" * 2000,))
    with pytest.raises(PayloadTooLarge, match=r"is \d+ bytes encoded, over the limit of 1000 "
                                              r"\(max_payload_bytes\)"):
        encode(job, max_bytes=1000)
    assert encode(job, max_bytes=3000)


def test_payload_size_counts_bytes_not_characters() -> None:
    job = Job(tasks.echo, ("é" * 600,))  # 600 characters, 1200 bytes
    text = encode(job)
    assert len(text) < 1000 < len(text.encode())
    with pytest.raises(PayloadTooLarge):
        encode(job, max_bytes=1000)


def test_payload_too_large_is_a_value_error() -> None:
    assert issubclass(PayloadTooLarge, ValueError)


def test_unserializable_result() -> None:
    with pytest.raises(SerializationError, match="returned a object, which JSON cannot carry"):
        serialization.encode_result(object())
    assert serialization.encode_result({"a": [1, None]}) == '{"a":[1,null]}'


# -- the allow-list ----------------------------------------------------------------------------

@pytest.fixture
def resolver() -> TaskResolver:
    return TaskResolver(["jobq_testtasks"])


def test_resolver_accepts_module_function_in_allowed_module(resolver: TaskResolver) -> None:
    assert resolver.resolve("jobq_testtasks:add") is tasks.add
    assert resolver.resolve("jobq_testtasks:add")(2, 3) == 5


def test_resolver_accepts_registered_task(resolver: TaskResolver) -> None:
    fn = resolver.resolve("jobq_testtasks:registered")
    assert fn is tasks.registered.fn
    assert fn(21) == 42


@pytest.mark.parametrize("name", ["os:system", "builtins:eval", "builtins:exec",
                                  "builtins:__import__", "subprocess:run", "posix:system",
                                  "jobq.connection:connect"])
def test_resolver_refuses_modules_not_imported_by_the_worker(resolver: TaskResolver,
                                                              name: str) -> None:
    with pytest.raises(TaskNotAllowed, match=r"is not allowed: module .* is not among this "
                                             r"worker's imports \(jobq_testtasks\)"):
        resolver.resolve(name)


@pytest.mark.parametrize("name", ["__import__", "eval", "os.system", "jobq_testtasks:add()",
                                  "jobq_testtasks:echo.__globals__", "jobq_testtasks:add\n"])
def test_resolver_refuses_malformed_names(resolver: TaskResolver, name: str) -> None:
    with pytest.raises(TaskNotAllowed, match="not of the form"):
        resolver.resolve(name)


@pytest.mark.parametrize("name", ["jobq_testtasks:_private", "jobq_testtasks:__import__",
                                  "jobq_testtasks:__builtins__", "jobq_testtasks:__loader__"])
def test_resolver_refuses_private_names(resolver: TaskResolver, name: str) -> None:
    with pytest.raises(TaskNotAllowed, match="private names never run"):
        resolver.resolve(name)


@pytest.mark.parametrize("attr", [
    "os",          # a module imported by the task module
    "connect",     # a function imported from elsewhere (from jobq.connection import connect)
    "task",        # likewise (from jobq.registry import task)
    "nonexistent",
])
def test_resolver_refuses_names_not_defined_in_the_module(resolver: TaskResolver,
                                                          attr: str) -> None:
    with pytest.raises(TaskNotAllowed, match=f"has no function '{attr}' defined in it"):
        resolver.resolve(f"jobq_testtasks:{attr}")


def test_resolver_refuses_imported_names_of_an_allowed_module(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"jobq_imports_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "from os import system\n"
        "from os.path import join\n"
        "from subprocess import run as sh\n"
        "import shutil\n"
        "rmtree = shutil.rmtree\n"
        "def mine(x):\n"
        "    return x\n"
        "class Klass:\n"
        "    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        resolver = TaskResolver([name])
        for attr in ("system", "join", "sh", "shutil", "rmtree", "Klass"):
            with pytest.raises(TaskNotAllowed, match="not allowed"):
                resolver.resolve(f"{name}:{attr}")
        assert resolver.resolve(f"{name}:mine")(7) == 7
    finally:
        sys.modules.pop(name, None)


def test_resolver_with_os_allowed_still_refuses_os_system() -> None:
    # os.system is a builtin re-exported by os, not a function defined in it
    with pytest.raises(TaskNotAllowed, match="has no function 'system' defined in it"):
        TaskResolver(["os"]).resolve("os:system")


def test_resolver_never_imports_a_module_named_by_a_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"jobq_trap_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "def f():\n"
        "    return 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TaskNotAllowed, match="not allowed"):
        TaskResolver(["jobq_testtasks"]).resolve(f"{name}:f")
    assert name not in sys.modules
    assert not marker.exists()


def test_resolver_caches(resolver: TaskResolver) -> None:
    assert resolver.resolve("jobq_testtasks:noop") is resolver.resolve("jobq_testtasks:noop")


def test_resolver_import_error_names_the_module() -> None:
    with pytest.raises(TaskImportError, match="'jobq_no_such_module_anywhere'") as info:
        TaskResolver(["jobq_no_such_module_anywhere"])
    assert isinstance(info.value.__cause__, ImportError)


def test_main_tasks_are_refused_at_enqueue_unless_allowed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "main_tasks_allowed", False)
    with pytest.raises(TaskNotAllowed, match=r"__main__ script.*-I that\.module"):
        jobs.check_enqueueable("__main__:work")
    jobs.check_enqueueable("jobq_testtasks:add")
    monkeypatch.setattr(jobs, "main_tasks_allowed", True)
    jobs.check_enqueueable("__main__:work")


def test_task_decorator_refuses_unknown_options() -> None:
    with pytest.raises(TypeError, match="unknown task option"):
        registry.task(retries=3)
    with pytest.raises(TypeError, match="unknown job option"):
        tasks.registered.options(retries=3)
    with pytest.raises(TypeError, match=r"size: did you mean \.delay\(\.\.\., size=1\)\?"):
        tasks.registered.options(size=1)
    with pytest.raises(TypeError, match=r"unknown task option\(s\): size \(task options: "
                                        r"concurrency, dont_retry_on, limits, max_retries, "
                                        r"priority, queue, "):
        registry.task(size=1)
    with pytest.raises(TypeError, match=r"limit: did you mean limits\?"):
        registry.task(limit=1)
    with pytest.raises(TypeError, match=r"priorty: did you mean priority\?"):
        registry.task(priorty=1)


def test_task_options_variant_keeps_the_name() -> None:
    variant = tasks.registered.options(priority=-1)
    assert variant.task_name == "jobq_testtasks:registered"
    assert variant.job_options["priority"] == -1
    assert tasks.registered.job_options["priority"] == 0
    assert variant(5) == 10
