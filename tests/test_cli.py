"""The ``jobq`` operator commands, through click's CliRunner, against the real server (and a
real master where jobs must run); and once through the installed console script."""

from __future__ import annotations

import grp
import json
import os
import pty
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import jobq_testtasks as tasks
import psutil
import pytest
import redis
from click.testing import CliRunner, Result
from conftest import subprocess_env, wait_until

from jobq import exitcodes
from jobq.cli import main
from jobq.config import load_config
from jobq.connection import connect
from jobq.groups import Progress
from jobq.job import JobStatus
from jobq.queue import JobQueue
from jobq.registry import TaskResolver
from jobq.schedule import ScheduleError, local_time
from jobq.scheduler import Scheduler
from jobq.scheduler_daemon import SchedulerProcess
from jobq.server import EmbeddedServer
from jobq.worker_loop import Worker

Spawn = Callable[..., subprocess.Popen[str]]

CONFIG = {"lease_time": 2.0, "graceful_timeout": 5.0, "retry_backoff_base": 0.05,
          "retry_jitter": 0.0, "scheduler_tick": 0.1}


def key() -> str:
    return uuid.uuid4().hex[:12]


def runs(r: redis.Redis, name: str) -> list[str]:
    return r.lrange(f"test:{name}", 0, -1)


@pytest.fixture
def jobq(redis_url: str) -> Callable[..., Result]:
    """``jobq("info", "--json", code=0)``: run a command against the test server; check its
    exit code, and that an error is one ``jobq: error:`` line on stderr (no traceback; with
    ``error_line=False``, commands that report per job id)."""

    def run(*args: str, code: int = 0, url: str | None = None, error_line: bool = True
            ) -> Result:
        result = CliRunner().invoke(main, ["--redis-url", url or redis_url, *args])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        assert result.exit_code == code, (result.stdout, result.stderr)
        if code not in (0, exitcodes.FAILURE) and error_line:
            assert result.stdout == ""
            assert len(result.stderr.splitlines()) == 1, result.stderr
            assert result.stderr.startswith("jobq: error: ")
        assert "Traceback" not in result.stderr
        return result

    return run


@pytest.fixture(autouse=True)
def announced(redis_url: str) -> None:
    """The test tasks are in the task catalog, as if a worker that imports them were up (the
    CLI refuses to enqueue a task no running worker announced)."""
    config = load_config(redis_url=redis_url)
    Worker(["default"], config=config, url=redis_url, resolver=TaskResolver(["jobq_testtasks"]),
           announcer="testhost.1")._announce()


def as_json(result: Result) -> Any:
    return json.loads(result.stdout)


def start_master(spawn: Spawn, tmp_path: Path, workers: int = 2,
                 **config: Any) -> subprocess.Popen[str]:
    path = tmp_path / "jobq.toml"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in {**CONFIG, **config}.items()))
    return spawn("-I", "jobq_testtasks", "-w", str(workers),
                 env=subprocess_env(JOBQ_CONFIG=str(path)), module="jobq.cli.master")


def fail_jobs(queue: JobQueue, spawn: Spawn, count: int) -> list[str]:
    """``count`` jobs failed for good into the dead-letter queue (by a real burst worker)."""
    ids = [queue.enqueue(tasks.boom, f"failure {n}", max_retries=0).id for n in range(count)]
    worker = spawn("worker", "-I", "jobq_testtasks", "--burst")
    assert worker.wait(timeout=30) == 0, worker.communicate()[1]
    assert [queue.get_status(i) for i in ids] == ["failed"] * count
    return ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- enqueue and job ---------------------------------------------------------------------------

def test_enqueue_prints_the_id_and_job_shows_the_record(
        jobq: Callable[..., Result], queue: JobQueue) -> None:
    out = jobq("enqueue", "jobq_testtasks:echo", "[1, \"two\"]", "--kwargs", '{"x": 3}',
               "--priority", "4", "--max-retries", "1").stdout
    job_id = out.strip()
    assert out == f"{job_id}\n"
    job = queue.get_job(job_id)
    assert (job.task, job.args, job.kwargs, job.priority, job.max_retries, job.status) == \
        ("jobq_testtasks:echo", (1, "two"), {"x": 3}, 4, 1, JobStatus.PENDING)
    bare = jobq("enqueue", "jobq_testtasks:registered", "21", "-q", "other").stdout.strip()
    assert queue.get_job(bare).args == (21,) and queue.get_job(bare).queue == "other"

    human = jobq("job", job_id).stdout
    fields = {name: value for name, _, value in
              (line.strip().partition(" ") for line in human.splitlines())}
    fields = {name: value.strip() for name, value in fields.items()}
    assert fields["id"] == job_id
    assert fields["task"] == "jobq_testtasks:echo"
    assert fields["status"] == "pending"
    assert fields["priority"] == "4" and fields["worker"] == ""
    record = as_json(jobq("job", job_id, "--json"))
    assert record["id"] == job_id and record["status"] == "pending"
    assert record["args"] == [1, "two"] and record["kwargs"] == {"x": 3}
    assert record["priority"] == 4 and record["max_retries"] == 1


def test_enqueue_refuses_bad_json_with_one_line_and_exit_2(
        jobq: Callable[..., Result], queue: JobQueue) -> None:
    err = jobq("enqueue", "jobq_testtasks:add", "[1,", code=exitcodes.USAGE).stderr
    assert "ARGS_JSON is not valid JSON" in err
    err = jobq("enqueue", "jobq_testtasks:add", "--kwargs", "[1]", code=exitcodes.USAGE).stderr
    assert "--kwargs must be a JSON object" in err
    err = jobq("enqueue", "not a task", code=exitcodes.USAGE).stderr
    assert "not a task" in err
    assert queue.get_stats()["enqueued"] == 0


def test_enqueue_applies_the_declared_options_and_checks_the_arguments(
        jobq: Callable[..., Result], queue: JobQueue) -> None:
    job = queue.get_job(jobq("enqueue", "jobq_testtasks:declared", "[4]").stdout.strip())
    assert (job.queue, job.timeout, job.max_retries, job.priority) == ("high", 2, 0, -3)
    given = queue.get_job(jobq("enqueue", "jobq_testtasks:declared", "[4]", "-q", "low",
                               "--timeout", "9", "--max-retries", "2", "--priority", "1"
                               ).stdout.strip())
    assert (given.queue, given.timeout, given.max_retries, given.priority) == ("low", 9, 2, 1)

    err = jobq("enqueue", "jobq_testtasks:declared", "[1, 2]", code=exitcodes.USAGE).stderr
    assert "jobq_testtasks:declared(seconds: float" in err and "too many positional" in err
    err = jobq("enqueue", "jobq_testtasks:declared", "[1]", "--kwargs", '{"limit": 5}',
               code=exitcodes.USAGE).stderr
    assert "unexpected keyword argument 'limit'" in err
    # an object where the positional arguments go: a hint, not one positional dict
    err = jobq("enqueue", "jobq_testtasks:declared", '{"seconds": 1}', code=exitcodes.USAGE).stderr
    assert "--kwargs '{\"seconds\": 1}'" in err
    assert jobq("enqueue", "jobq_testtasks:declared", "--kwargs", '{"seconds": 1}').stdout
    assert queue.get_stats()["enqueued"] == 0  # "default": every job went to "high" or "low"
    assert JobQueue("high").get_stats()["enqueued"] == 2


def test_enqueue_of_an_unknown_task_exits_5_unless_forced(
        jobq: Callable[..., Result], queue: JobQueue) -> None:
    err = jobq("enqueue", "jobq_testtasks:not_there", "[1]", code=exitcodes.NOT_FOUND).stderr
    assert "unknown task 'jobq_testtasks:not_there': no running worker announced it" in err
    assert "jobq_testtasks:add" in err  # what that module has
    assert "--force" in err
    jobq("enqueue", "elsewhere:task", code=exitcodes.NOT_FOUND)
    assert queue.get_stats()["enqueued"] == 0
    job = queue.get_job(jobq("enqueue", "elsewhere:task", "[1]", "--force").stdout.strip())
    assert (job.task, job.args, job.queue) == ("elsewhere:task", (1,), "default")


def test_enqueue_takes_every_job_option(jobq: Callable[..., Result], queue: JobQueue) -> None:
    parent = jobq("enqueue", "jobq_testtasks:noop").stdout.strip()
    child = queue.get_job(jobq("enqueue", "jobq_testtasks:add", "[1, 2]", "--depends-on",
                               parent, "--unique-key", "nightly-add").stdout.strip())
    assert child.status is JobStatus.DEFERRED
    assert child.depends_on == [parent]
    again = jobq("enqueue", "jobq_testtasks:add", "[1, 2]", "--unique-key",
                 "nightly-add").stdout.strip()
    assert again == child.id  # the key is held: the same job, nothing new
    later = queue.get_job(jobq("enqueue", "jobq_testtasks:noop", "--delay", "3600"
                               ).stdout.strip())
    assert later.status is JobStatus.SCHEDULED and later.due_at > time.time() + 3500
    at = queue.get_job(jobq("enqueue", "jobq_testtasks:noop", "--at",
                            "2100-01-02T03:04:05+00:00").stdout.strip())
    assert at.status is JobStatus.SCHEDULED and at.due_at == 4102542245.0
    err = jobq("enqueue", "jobq_testtasks:noop", "--at", "soon", code=exitcodes.USAGE).stderr
    assert "--at 'soon' is not an ISO date-time" in err
    err = jobq("enqueue", "jobq_testtasks:noop", "--depends-on", "nobody",
               code=exitcodes.NOT_FOUND).stderr
    assert "no job with id 'nobody'" in err


def test_tasks_lists_the_catalog(jobq: Callable[..., Result]) -> None:
    listed = {t["name"]: t for t in as_json(jobq("tasks", "--json"))}
    declared = listed["jobq_testtasks:declared"]
    assert declared["queue"] == "high" and declared["hosts"] == ["testhost.1"]
    assert declared["options"] == {"priority": -3, "max_retries": 0, "timeout": 2,
                                   "retry_on": ["KeyError"]}
    assert declared["signature"] == "(seconds: float, *, label: str = '') -> str"
    assert declared["declared"] is True and listed["jobq_testtasks:add"]["declared"] is False
    text = jobq("tasks").stdout
    assert "jobq_testtasks:add(a: int, b: int) -> int" in text and "testhost.1" in text


def test_attempts_retries_and_deliveries_agree_everywhere_and_a_requeue_restarts_them(
        jobq: Callable[..., Result], queue: JobQueue, spawn: Spawn, tmp_path: Path) -> None:
    config = tmp_path / "no-backoff.toml"
    config.write_text("retry_backoff_base = 0.0\n")

    def burst() -> None:
        worker = spawn("worker", "-I", "jobq_testtasks", "--burst",
                       env=subprocess_env(JOBQ_CONFIG=str(config)))
        assert worker.wait(timeout=30) == 0, worker.communicate()[1]

    def counts(job_id: str) -> tuple[int, int, int, int, int]:
        record = as_json(jobq("job", job_id, "--json"))
        job = queue.get_job(job_id)
        assert (job.attempts, job.retries, job.retry_count, job.deliveries, job.requeues) == (
            record["attempts"], record["retries"], record["retry_count"],
            record["deliveries"], record["requeues"])
        human = dict(line.split(None, 1) for line in jobq("job", job_id).stdout.splitlines()
                     if line[:1].isalpha() and " " in line and ":" not in line.split()[0])
        assert [int(human[k]) for k in ("attempts", "retries", "deliveries", "requeues")] == [
            record["attempts"], record["retries"], record["deliveries"], record["requeues"]]
        return (record["attempts"], record["retries"], record["retry_count"],
                record["deliveries"], record["requeues"])

    failing = queue.enqueue(tasks.boom, "kaput", max_retries=3).id
    ok = queue.enqueue(tasks.add, 1, 2).id
    burst()
    assert queue.get_status(failing) == "failed"
    # four runs: the first attempt and three retries, each delivered once
    assert counts(failing) == (4, 3, 3, 4, 0)
    assert counts(ok) == (1, 0, 0, 1, 0)
    text = jobq("job", failing).stdout
    assert [line for line in text.splitlines() if line.startswith("attempt ")] == [
        f"attempt {n}: ValueError: kaput" for n in (1, 2, 3, 4)]
    assert jobq("dlq", "list").stdout.split("\n")[2].split()[2] == "4"  # the attempts column

    # a requeue starts the counts again and keeps the errors, each saying its attempt
    jobq("requeue", failing)
    assert counts(failing) == (0, 0, 0, 0, 1)
    assert len(queue.get_job(failing).errors) == 4
    burst()
    assert counts(failing) == (4, 3, 3, 4, 1)
    text = jobq("job", failing).stdout
    labels = [line.split(":")[0] for line in text.splitlines() if line.startswith("attempt ")]
    assert labels == [*(f"attempt {n} before requeue 1" for n in (1, 2, 3, 4)),
                      *(f"attempt {n}" for n in (1, 2, 3, 4))]


def test_job_of_an_unknown_id_exits_5(jobq: Callable[..., Result]) -> None:
    assert "no-such-job" in jobq("job", "no-such-job", code=exitcodes.NOT_FOUND).stderr
    jobq("job", "no-such-job", "--json", code=exitcodes.NOT_FOUND)


# -- cancel, requeue, empty, the dead-letter queue ---------------------------------------------

def test_cancel(jobq: Callable[..., Result], queue: JobQueue) -> None:
    a, b = queue.enqueue(tasks.noop), queue.enqueue(tasks.noop, delay=3600)

    assert jobq("cancel", a.id, b.id).stdout == f"{a.id}: cancelled\n{b.id}: cancelled\n"

    assert queue.get_status(a.id) == queue.get_status(b.id) == "cancelled"
    assert as_json(jobq("job", a.id, "--json"))["status"] == "cancelled"
    assert jobq("cancel", a.id, code=exitcodes.FAILURE).stdout == f"{a.id}: finished\n"
    assert jobq("cancel", "nope", code=exitcodes.NOT_FOUND,
                error_line=False).stdout == "nope: unknown\n"
    stats = queue.get_stats()
    assert (stats["pending"], stats["scheduled"], stats["cancelled"]) == (0, 0, 2)


def test_requeue_by_id_and_failed(jobq: Callable[..., Result], queue: JobQueue,
                                  spawn: Spawn) -> None:
    first, second = fail_jobs(queue, spawn, 2)
    live = queue.enqueue(tasks.noop).id

    assert jobq("requeue", first).stdout == f"{first}: requeued\n"
    job = queue.get_job(first)
    assert job.status is JobStatus.PENDING
    assert [e["type"] for e in job.errors] == ["ValueError"]  # its history is kept
    assert queue.failed_count() == 1

    assert jobq("requeue", "--failed").stdout == "requeued 1 job(s) from default\n"
    assert queue.get_status(second) == "pending" and queue.failed_count() == 0
    result = jobq("requeue", live, code=exitcodes.FAILURE)
    assert result.stderr == f"{live}: not requeued (it is pending)\n"
    result = jobq("requeue", "nope", code=exitcodes.NOT_FOUND, error_line=False)
    assert result.stderr == "nope: not requeued (unknown job)\n"
    assert "give job ids or --failed" in jobq("requeue", code=exitcodes.USAGE).stderr
    jobq("requeue", "--failed", "-q", "nosuch", code=exitcodes.NOT_FOUND)
    assert queue.get_stats()["requeued"] == 2


def test_empty(jobq: Callable[..., Result], queue: JobQueue) -> None:
    for _ in range(3):
        queue.enqueue(tasks.noop)
    later = queue.enqueue(tasks.noop, delay=3600)

    assert jobq("empty", "default").stdout == "deleted 3 pending job(s)\n"

    stats = queue.get_stats()
    assert (stats["pending"], stats["scheduled"]) == (0, 1)
    assert queue.get_status(later.id) == "scheduled"
    assert jobq("empty", "default").stdout == "deleted 0 pending job(s)\n"
    assert "unknown queue 'nosuch'" in jobq("empty", "nosuch", code=exitcodes.NOT_FOUND).stderr


def test_dlq_requeue_all_requeues_what_is_there_once_while_workers_fail_them_again(
        jobq: Callable[..., Result], queue: JobQueue, r: redis.Redis, spawn: Spawn,
        tmp_path: Path) -> None:
    ids = fail_jobs(queue, spawn, 8)
    start_master(spawn, tmp_path, workers=2)
    wait_until(lambda: r.zcard(queue.keys.idle("default")) == 2, message="2 idle workers")

    # each requeued job fails again at once (max_retries 0) and is back in the dead-letter
    # queue while the command still runs: it must not be requeued a second time
    assert jobq("dlq", "requeue", "--all").stdout == "requeued 8 job(s) from default\n"
    wait_until(lambda: queue.get_stats()["failed"] >= 16 and queue.failed_count() == 8,
               message="the 8 requeued jobs failed again")
    assert queue.get_stats()["failed"] == 16  # 8 first runs + 8 requeued runs, no more
    assert queue.get_stats()["requeued"] == 8
    assert sorted(j.id for j in queue.failed_jobs()) == sorted(ids)


def test_dlq_list_show_requeue_purge(jobq: Callable[..., Result], queue: JobQueue,
                                     spawn: Spawn) -> None:
    ids = fail_jobs(queue, spawn, 3)

    listed = as_json(jobq("dlq", "list", "--json"))
    assert sorted(j["id"] for j in listed) == sorted(ids)
    assert {j["status"] for j in listed} == {"failed"}
    assert all(j["error"].startswith("ValueError: failure ") for j in listed)
    human = jobq("dlq", "list").stdout
    assert all(i in human for i in ids)
    assert "3 job(s) in the dead-letter queue of default" in human
    assert len(as_json(jobq("dlq", "list", "--limit", "2", "--json"))) == 2

    shown = as_json(jobq("dlq", "show", ids[0], "--json"))
    assert shown["id"] == ids[0] and shown["status"] == "failed"
    assert shown["errors"][0]["type"] == "ValueError"
    text = jobq("dlq", "show", ids[0]).stdout
    assert "attempt 1: ValueError: failure 0" in text and "Traceback" in text
    jobq("dlq", "show", "nope", code=exitcodes.NOT_FOUND)

    assert jobq("dlq", "requeue", ids[0]).stdout == f"{ids[0]}: requeued\n"
    assert queue.get_status(ids[0]) == "pending"
    assert jobq("dlq", "requeue", "--all").stdout == "requeued 2 job(s) from default\n"
    assert queue.failed_count() == 0
    assert as_json(jobq("dlq", "list", "--json")) == []

    queue.empty()
    fail_jobs(queue, spawn, 2)
    assert jobq("dlq", "purge", "--yes").stdout == "purged 2 job(s)\n"
    assert as_json(jobq("dlq", "list", "--json")) == [] and queue.failed_count() == 0
    jobq("dlq", "list", "-q", "nosuch", code=exitcodes.NOT_FOUND)


def answering(spawn: Spawn, answer: str, *args: str) -> tuple[int, str, str]:
    """Run ``jobq ARGS`` with a terminal (a pty) as its standard input, answer its question
    with ``answer``; its exit code, stdout and stderr."""
    controller, terminal = pty.openpty()
    try:
        proc = spawn(*args, stdin=terminal)
        os.close(terminal)
        os.write(controller, answer.encode() + b"\n")
        out, err = proc.communicate(timeout=30)
    finally:
        os.close(controller)
    return proc.returncode, out, err


def test_dlq_purge_asks_on_a_terminal_and_without_one_wants_yes(
        jobq: Callable[..., Result], queue: JobQueue, spawn: Spawn) -> None:
    fail_jobs(queue, spawn, 2)

    # no terminal (a script, a pipe, cron): nothing is deleted without --yes
    err = jobq("dlq", "purge", code=exitcodes.USAGE).stderr
    assert "pass --yes" in err and "2 failed job(s) of default" in err
    assert queue.failed_count() == 2

    code, out, err = answering(spawn, "n", "dlq", "purge")
    assert (code, err) == (exitcodes.FAILURE, "jobq: aborted\n"), (out, err)
    assert "delete the 2 failed job(s) of default? [y/N]" in out
    assert queue.failed_count() == 2

    code, out, err = answering(spawn, "y", "dlq", "purge")
    assert code == 0, err
    assert out.endswith("purged 2 job(s)\n")
    assert queue.failed_count() == 0


def test_queue_delete_asks_on_a_terminal_and_without_one_wants_yes(
        jobq: Callable[..., Result], redis_url: str, spawn: Spawn) -> None:
    doomed = JobQueue("doomed", redis_url=redis_url)
    doomed.enqueue(tasks.noop)
    doomed.enqueue(tasks.noop, delay=3600)

    err = jobq("queue", "delete", "doomed", code=exitcodes.USAGE).stderr
    assert "delete queue doomed, its 2 live job(s)" in err and "pass --yes" in err
    code, out, err = answering(spawn, "n", "queue", "delete", "doomed")
    assert (code, err) == (exitcodes.FAILURE, "jobq: aborted\n"), (out, err)
    assert doomed.exists() and doomed.get_stats()["scheduled"] == 1  # untouched

    code, out, err = answering(spawn, "y", "queue", "delete", "doomed")
    assert code == 0, err
    assert out.endswith("deleted queue doomed: 1 pending, 1 scheduled, 0 deferred, 0 running "
                        "(interrupted) and 0 dead-letter job(s)\n")
    assert not doomed.exists()
    jobq("queue", "delete", "doomed", "--yes", code=exitcodes.NOT_FOUND)

    doomed.enqueue(tasks.noop)
    assert jobq("queue", "delete", "doomed", "--yes").stdout.startswith(
        "deleted queue doomed: 1 pending")


# -- with a master running ----------------------------------------------------------------------

def test_enqueue_wait_prints_the_result(jobq: Callable[..., Result], spawn: Spawn,
                                        tmp_path: Path) -> None:
    start_master(spawn, tmp_path)

    assert jobq("enqueue", "jobq_testtasks:add", "[2, 3]", "--wait",
                "--wait-timeout", "30").stdout == "5\n"
    assert as_json(jobq("enqueue", "jobq_testtasks:echo", '["a"]', "--kwargs", '{"k": 1}',
                        "--wait", "--wait-timeout", "30")) == {"args": ["a"], "kwargs": {"k": 1}}
    failed = jobq("enqueue", "jobq_testtasks:boom", '["bad input"]', "--max-retries", "0",
                  "--wait", "--wait-timeout", "30", code=exitcodes.FAILURE)
    assert failed.stdout == ""
    assert failed.stderr.startswith("jobq: error: job ") and failed.stderr.count("\n") == 1
    assert "failed: ValueError: bad input" in failed.stderr


def test_enqueue_depends_on_a_group(jobq: Callable[..., Result], queue: JobQueue,
                                    spawn: Spawn, tmp_path: Path) -> None:
    k = key()
    queue.suspend()
    group = queue.map(tasks.square, range(4))
    parent = queue.enqueue(tasks.add, 1, 1)
    child = queue.get_job(jobq("enqueue", "jobq_testtasks:group_report", json.dumps(k),
                               "--depends-on", f"{group.id},{parent.id}").stdout.strip())
    assert child.status is JobStatus.DEFERRED
    assert (child.depends_on, child.depends_on_groups) == ([parent.id], [group.id])
    err = jobq("enqueue", "jobq_testtasks:noop", "--depends-on", group.id, "--depends-on",
               "nobody", code=exitcodes.NOT_FOUND).stderr
    assert "no job with id 'nobody', nor a queue.map group" in err
    assert queue.get_stats()["enqueued"] == 6  # 4 items, the parent, the child
    start_master(spawn, tmp_path)

    queue.resume()
    out = as_json(jobq("enqueue", "jobq_testtasks:group_report", json.dumps(f"{k}:2"),
                       "--depends-on", group.id, "--wait", "--wait-timeout", "30"))

    assert out == {"groups": {group.id: [0, 1, 4, 9]}, "parents": {}}
    assert queue.wait(child.id, timeout=30).return_value == {
        "groups": {group.id: [0, 1, 4, 9]}, "parents": {parent.id: 2}}


def test_suspended_queue_is_not_claimed_from_until_resumed(
        jobq: Callable[..., Result], queue: JobQueue, r: redis.Redis, spawn: Spawn,
        tmp_path: Path) -> None:
    # default is claimed from first: a job there goes before any job of "other"
    start_master(spawn, tmp_path, workers=1, queues=["default", "other"])
    warm = queue.enqueue(tasks.noop)
    assert queue.wait(warm.id, timeout=20).status is JobStatus.COMPLETED
    k = key()

    assert jobq("suspend", "default").stdout == "default: suspended\n"
    held = jobq("enqueue", "jobq_testtasks:record", f'["{k}", "held"]').stdout.strip()
    sentinel = jobq("enqueue", "jobq_testtasks:record", f'["{k}", "sentinel"]',
                    "-q", "other").stdout.strip()
    assert queue.wait(sentinel, timeout=20).status is JobStatus.COMPLETED
    assert queue.get_status(held) == "pending" and runs(r, k) == ["sentinel"]
    queues = {q["queue"]: q for q in as_json(jobq("info", "--json"))["queues"]}
    assert queues["default"]["suspended"] is True and queues["other"]["suspended"] is False
    assert "default (suspended)" in jobq("info").stdout

    assert jobq("resume", "default").stdout == "default: resumed\n"

    assert queue.wait(held, timeout=20).status is JobStatus.COMPLETED
    assert runs(r, k) == ["sentinel", "held"]
    assert jobq("suspend").stdout == "default: suspended\nother: suspended\n"  # all queues
    assert jobq("resume").stdout == "default: resumed\nother: resumed\n"
    jobq("suspend", "nosuch", code=exitcodes.NOT_FOUND)


def test_cancel_of_a_running_job_interrupts_it(
        jobq: Callable[..., Result], queue: JobQueue, r: redis.Redis, spawn: Spawn,
        tmp_path: Path) -> None:
    start_master(spawn, tmp_path)
    k = key()
    job = queue.enqueue(tasks.sleep_until_cancelled, k, 30)
    wait_until(lambda: runs(r, k) == ["started"], 20, message="the job to start")

    assert jobq("cancel", job.id).stdout == f"{job.id}: interrupting\n"

    assert queue.wait(job.id, timeout=20).status is JobStatus.CANCELLED
    assert runs(r, k) == ["started", "JobCancelled"]


def test_info_and_top_show_queues_masters_workers_and_the_leader(
        jobq: Callable[..., Result], queue: JobQueue, spawn: Spawn, tmp_path: Path) -> None:
    master = start_master(spawn, tmp_path)
    queue.enqueue(tasks.noop, delay=3600)

    def ready() -> dict[str, Any] | None:
        data = as_json(jobq("info", "--json"))
        masters = data["masters"]
        if data["scheduler_leader"] and len(masters) == 1 and len(masters[0]["workers"]) == 2:
            return data
        return None

    data = wait_until(ready, 20, interval=0.1, message="the master in jobq info")

    [m] = data["masters"]
    assert m["pid"] == master.pid and m["alive"] is True and m["target"] == 2
    assert m["queues"] == ["default"]
    assert {w["slot"] for w in m["workers"]} == {0, 1}
    assert all(w["state"] in ("idle", "busy") and w["pid"] > 0 for w in m["workers"])
    assert data["scheduler_leader"].startswith(m["host"])
    [q] = data["queues"]
    assert (q["queue"], q["scheduled"], q["pending"], q["suspended"]) == \
        ("default", 1, 0, False)

    text = jobq("info").stdout
    assert f"master {m['id']} on {m['host']}: 2/2 workers, queues default" in text
    assert f"scheduler leader: {data['scheduler_leader']}" in text
    header, _, row = text.splitlines()[:3]
    assert header.split()[:5] == ["queue", "pending", "running", "scheduled", "deferred"]
    assert row.split()[:5] == ["default", "0", "0", "1", "0"]
    for w in m["workers"]:
        assert str(w["pid"]) in text

    top = jobq("top", "--iterations", "1", "--interval", "0").stdout
    assert top.startswith("jobq top ")
    assert f"master {m['id']} on {m['host']}: 2/2 workers" in top
    assert "scheduler leader: " in top
    assert top.count("jobq top ") == 1


def ready_workers(master: subprocess.Popen[str]) -> int:
    """How many workers of the master are up (their title says so once booted)."""
    titles = []
    for child in psutil.Process(master.pid).children():
        try:
            titles.append(" ".join(child.cmdline()))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return sum(1 for t in titles if "jobq worker" in t and "booting" not in t)


def test_workers_add_remove_set_change_a_master_exactly(
        jobq: Callable[..., Result], queue: JobQueue, r: redis.Redis, spawn: Spawn,
        tmp_path: Path) -> None:
    assert "no live master" in jobq("workers", "add", "1", code=exitcodes.NOT_FOUND).stderr
    master = start_master(spawn, tmp_path, workers=2)
    mid = wait_until(lambda: list(as_json(jobq("info", "--json"))["masters"]), 20,
                     message="the master in jobq info")[0]["id"]
    wait_until(lambda: ready_workers(master) == 2, 20, message="2 workers")

    assert jobq("workers", "add", "2").stdout == f"master {mid}: 4 workers (was 2)\n"
    wait_until(lambda: ready_workers(master) == 4, 20, message="4 workers")
    assert jobq("workers", "remove", "3", "--master", mid).stdout == \
        f"master {mid}: 1 worker (was 4)\n"
    assert jobq("workers", "remove", "5").stdout == \
        f"master {mid}: 1 worker (was 1; never fewer than one)\n"
    assert jobq("workers", "set", "3").stdout == f"master {mid}: 3 workers (was 1)\n"
    wait_until(lambda: ready_workers(master) == 3, 20, message="3 workers")
    [m] = as_json(jobq("info", "--json"))["masters"]
    assert m["target"] == 3
    assert queue.enqueue(tasks.add, 1, 2).result(timeout=15) == 3

    # bad input: one line, nothing sent
    err = jobq("workers", "set", "0", code=exitcodes.USAGE, error_line=False).stderr
    assert "Invalid value for 'N': 0 is not in the range x>=1" in err and err.count("\n") == 1
    err = jobq("workers", "add", "1", "--master", "nosuch.1", code=exitcodes.NOT_FOUND).stderr
    assert f"no live master 'nosuch.1' (live: {mid})" in err
    # another live master (as its heartbeat says): which one must be named
    other = "elsewhere.4242"
    r.hset(queue.keys.masters, other, json.dumps({"ts": time.time(), "target": 1}))
    err = jobq("workers", "add", "1", code=exitcodes.USAGE).stderr
    assert f"2 masters are alive: name one with --master ({other}, {mid})" in err
    # one that never takes the request: it is withdrawn at the timeout, nothing changes
    err = jobq("workers", "add", "1", "--master", other, "--timeout", "0.3",
               code=exitcodes.FAILURE).stderr
    assert f"master {other} did not apply it within 0.3 s; the request is withdrawn" in err
    assert r.llen(queue.keys.control(other)) == 0
    assert ready_workers(master) == 3


def test_wait_for_a_group(jobq: Callable[..., Result], queue: JobQueue, spawn: Spawn,
                          tmp_path: Path) -> None:
    start_master(spawn, tmp_path)
    good = queue.map(tasks.square, range(6))

    assert as_json(jobq("wait", good.id, "--json", "--timeout", "30")) == \
        {"group": good.id, "done": 6, "failed": 0, "total": 6, "finished": True}
    result = jobq("wait", good.id, "--timeout", "30")
    assert result.stdout == "6 done, 0 failed, of 6\n"
    assert result.stderr.splitlines()[-1] == "6/6 done, 0 failed"  # the progress lines

    bad = queue.map(tasks.square, [1, -2, 3], max_retries=0)
    result = jobq("wait", bad.id, "--json", "--timeout", "30", code=exitcodes.FAILURE)
    assert as_json(result) == {"group": bad.id, "done": 2, "failed": 1, "total": 3,
                               "finished": True}
    jobq("wait", "no-such-group", "--json", code=exitcodes.NOT_FOUND)


def test_progress_of_a_chunked_map_counts_its_items(
        jobq: Callable[..., Result], queue: JobQueue, spawn: Spawn) -> None:
    # 10 items in chunks of 4: 4, 4, then 2; the short last chunk fails
    group = queue.map(tasks.square, [*range(8), 8, -9], chunksize=4, max_retries=0)
    assert group.progress() == Progress(0, 0, 10)
    assert as_json(jobq("wait", group.id, "--json", "--timeout", "0.1",
                        code=exitcodes.FAILURE)) == {
        "group": group.id, "done": 0, "failed": 0, "total": 10, "finished": False}

    worker = spawn("worker", "-I", "jobq_testtasks", "--burst")
    assert worker.wait(timeout=30) == 0, worker.communicate()[1]

    assert group.progress() == Progress(8, 2, 10)
    assert as_json(jobq("wait", group.id, "--json", code=exitcodes.FAILURE)) == {
        "group": group.id, "done": 8, "failed": 2, "total": 10, "finished": True}
    result = jobq("wait", group.id, code=exitcodes.FAILURE)
    assert result.stdout == "8 done, 2 failed, of 10\n"
    assert result.stderr.splitlines()[-1] == "10/10 done, 2 failed"  # the progress line


# -- schedules ------------------------------------------------------------------------------------

def test_top_json_prints_one_document_per_refresh(jobq: Callable[..., Result],
                                                 queue: JobQueue) -> None:
    queue.enqueue(tasks.noop)
    out = jobq("top", "--json", "--iterations", "3", "--interval", "0").stdout
    documents = [json.loads(line) for line in out.splitlines()]  # a line each, nothing else
    assert len(documents) == 3
    info = as_json(jobq("info", "--json"))
    assert all(set(d) == set(info) for d in documents)
    assert [(q["queue"], q["pending"]) for q in documents[-1]["queues"]] == [("default", 1)]


def test_global_options_work_after_the_command_too(queue: JobQueue, spawn: Spawn) -> None:
    job = queue.enqueue(tasks.add, 1, 2)
    # given twice, the one after the command's name wins
    worker = spawn("--log-format", "text", "worker", "-I", "jobq_testtasks", "--burst",
                   "--log-format", "json", "--log-level", "debug")
    _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines()]  # every line is JSON
    assert {line["level"] for line in lines} >= {"debug", "info"}
    assert any(line.get("job_id") == job.id for line in lines)
    assert queue.get_status(job.id) == "completed"
    # the commands of a group too (an unknown job: exit 5, not 2 for an unknown option)
    for args in (["dlq", "show", "nosuchjob"], ["dlq", "requeue", "nosuchjob"]):
        result = CliRunner().invoke(main, [*args, "--redis-url", queue.url, "--debug"])
        assert result.exit_code == exitcodes.NOT_FOUND, (args, result.stderr)


def test_schedule_add_list_pause_resume_run_now_remove(
        jobq: Callable[..., Result], queue: JobQueue) -> None:
    assert jobq("schedule", "add", "hourly", "jobq_testtasks:add", "[1, 2]", "--interval",
                "3600").stdout == "schedule hourly added\n"
    assert jobq("schedule", "add", "nightly", "jobq_testtasks:noop", "--cron",
                "30 2 * * *", "-q", "other").stdout == "schedule nightly added\n"

    listed = as_json(jobq("schedule", "list", "--json"))
    assert listed["leader"] is None
    by_name = {s["name"]: s for s in listed["schedules"]}
    assert set(by_name) == {"hourly", "nightly"}
    assert by_name["hourly"]["kind"] == "interval" and by_name["hourly"]["interval"] == 3600
    assert by_name["nightly"]["cron"] == "30 2 * * *" and by_name["nightly"]["queue"] == "other"
    assert by_name["hourly"]["paused"] is False and by_name["hourly"]["next_run"] is not None
    text = jobq("schedule", "list").stdout
    assert "hourly" in text and "every 3600.0 s" in text and "30 2 * * *" in text
    assert "scheduler leader: none" in text

    assert jobq("schedule", "pause", "hourly").stdout == "schedule hourly: paused\n"
    paused = {s["name"]: s for s in as_json(jobq("schedule", "list", "--json"))["schedules"]}
    assert paused["hourly"]["paused"] is True and paused["hourly"]["next_run"] is None
    assert "paused" in jobq("schedule", "list").stdout
    assert jobq("schedule", "resume", "hourly").stdout == "schedule hourly: resumed\n"
    resumed = {s["name"]: s for s in as_json(jobq("schedule", "list", "--json"))["schedules"]}
    assert resumed["hourly"]["paused"] is False and resumed["hourly"]["next_run"] is not None

    job_id = jobq("schedule", "run-now", "hourly").stdout.strip()
    job = queue.get_job(job_id)
    assert (job.task, job.args, job.status) == ("jobq_testtasks:add", (1, 2), JobStatus.PENDING)

    assert jobq("schedule", "remove", "hourly").stdout == "schedule hourly: removed\n"
    names = [s["name"] for s in as_json(jobq("schedule", "list", "--json"))["schedules"]]
    assert names == ["nightly"]
    for op in ("remove", "pause", "resume", "run-now"):
        assert "unknown schedule 'hourly'" in jobq("schedule", op, "hourly",
                                                   code=exitcodes.NOT_FOUND).stderr


@pytest.fixture
def paris() -> Iterator[None]:
    """This process's local time is Paris's (times are shown in the local zone)."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/Paris"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


def test_schedule_times_show_their_zone_a_past_at_is_refused_and_a_skip_is_no_run(
        jobq: Callable[..., Result], queue: JobQueue, redis_url: str, paris: None) -> None:
    err = jobq("schedule", "add", "gone", "jobq_testtasks:noop", "--at", "2020-01-15T03:00:00",
               code=exitcodes.USAGE).stderr
    assert "schedule 'gone': at: 2020-01-15 03:00:00 CET has passed" in err
    with pytest.raises(ScheduleError, match="has passed"):
        Scheduler(queue).schedule_once("gone", tasks.noop, datetime(2020, 1, 15, 3))
    assert as_json(jobq("schedule", "list", "--json"))["schedules"] == []

    jobq("schedule", "add", "later", "jobq_testtasks:noop", "--at", "2030-07-15T03:00:00+02:00")
    # an interval whose first run is long past: that run is skipped (misfire "skip")
    start = time.time() - 600
    Scheduler(queue).schedule_interval("late", tasks.noop, 3600, start=start)
    # one that runs, then misses its next runs (downtime): it keeps its last run
    Scheduler(queue).schedule_interval("ran", tasks.noop, 60, start=start + 480)
    leader = SchedulerProcess(load_config(redis_url=redis_url), redis_url)
    leader.step(start + 480.01)  # its first run, on time (due times are kept in ms)
    [ran] = [s for s in Scheduler(queue).list() if s["name"] == "ran"]
    assert ran["last_run"] == pytest.approx(start + 480.01, abs=0.001) and ran["last_job"]
    leader.step(time.time())

    listed = {s["name"]: s for s in as_json(jobq("schedule", "list", "--json"))["schedules"]}
    assert listed["later"]["at"] == listed["later"]["next_run"] == "2030-07-15T03:00:00.000+02:00"
    assert listed["later"]["last_run"] is None and listed["later"]["last_skipped"] is None
    late = listed["late"]
    assert late["last_run"] is None and late["last_job"] is None  # it never ran
    assert datetime.fromisoformat(late["last_skipped"]).timestamp() == pytest.approx(start,
                                                                                     abs=0.001)
    assert datetime.fromisoformat(late["next_run"]).timestamp() == pytest.approx(start + 3600,
                                                                                 abs=0.001)
    assert late["last_skipped"].endswith(("+01:00", "+02:00"))
    ran = listed["ran"]
    assert datetime.fromisoformat(ran["last_run"]).timestamp() == pytest.approx(
        start + 480.01, abs=0.001)
    assert ran["last_job"] and ran["last_skipped"] is not None
    rows = {line.split()[0]: line for line in jobq("schedule", "list").stdout.splitlines()[2:]
            if line.strip()}
    assert "at 2030-07-15 03:00:00 CEST" in rows["later"]
    # no last run ("-"), the skipped one said
    assert f" -; skipped the run due {local_time(start)}" in rows["late"]
    assert local_time(start).endswith((" CET", " CEST"))


def test_schedule_ops_report_the_name_as_given(jobq: Callable[..., Result]) -> None:
    # a schedule whose name holds an op's verb: only the op is put in the past tense
    jobq("schedule", "add", "resume-digest", "jobq_testtasks:noop", "--interval", "3600")
    for op, done in (("pause", "paused"), ("resume", "resumed"), ("remove", "removed")):
        assert jobq("schedule", op, "resume-digest").stdout == \
            f"schedule resume-digest: {done}\n"


def test_schedule_add_refuses_bad_definitions(jobq: Callable[..., Result]) -> None:
    err = jobq("schedule", "add", "x", "jobq_testtasks:noop", "--cron", "61 * * * *",
               code=exitcodes.USAGE).stderr
    assert "minute" in err and "61" in err
    err = jobq("schedule", "add", "x", "jobq_testtasks:noop", "--cron", "0 25 * * *",
               code=exitcodes.USAGE).stderr
    assert "hour" in err and "25" in err
    err = jobq("schedule", "add", "x", "jobq_testtasks:noop", "--cron", "* * *",
               code=exitcodes.USAGE).stderr
    assert "cron" in err
    err = jobq("schedule", "add", "x", "jobq_testtasks:noop", code=exitcodes.USAGE).stderr
    assert "exactly one of --cron, --interval, --at" in err
    err = jobq("schedule", "add", "x", "jobq_testtasks:noop", "--at", "tomorrow",
               code=exitcodes.USAGE).stderr
    assert "ISO" in err
    assert as_json(jobq("schedule", "list", "--json"))["schedules"] == []


# -- errors ----------------------------------------------------------------------------------

def test_an_unreachable_server_is_one_line_exit_3_without_the_password(
        jobq: Callable[..., Result], quick_connect: Path) -> None:
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    for args in (["info"], ["info", "--json"], ["job", "x"], ["enqueue", "jobq_testtasks:noop"],
                 ["dlq", "list"], ["schedule", "list"]):
        err = jobq(*args, code=exitcodes.CONNECT, url=url).stderr
        assert "s3cret-pw" not in err
        assert "cannot connect to redis://:***@127.0.0.1:" in err
    # --redis-url after the command name works too
    result = CliRunner().invoke(main, ["info", "--redis-url", url])
    assert result.exit_code == exitcodes.CONNECT
    assert "s3cret-pw" not in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("where", ["before the command", "after the command"])
def test_debug_shows_the_traceback(where: str, redis_url: str, quick_connect: Path) -> None:
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    options = ["--debug", "--redis-url", url]
    args = [*options, "info"] if where == "before the command" else ["info", *options]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == exitcodes.CONNECT
    assert "Traceback (most recent call last)" in result.stderr
    assert "redis.exceptions.ConnectionError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("jobq: error: cannot connect to ")
    assert "s3cret-pw" not in result.stderr


# -- jobq server --------------------------------------------------------------------------------

def test_server_start_applies_the_configs_socket_group(home: Path, tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name  # one the server's user (us) belongs to
    config = tmp_path / "jobq.toml"
    config.write_text(f'server_socket_group = "{group}"\n')
    env = {"JOBQ_HOME": str(home), "JOBQ_CONFIG": None, "JOBQ_REDIS_URL": None}
    result = CliRunner().invoke(main, ["--config", str(config), "server", "start"], env=env)
    assert result.exit_code == 0, result.output
    sock = home / "valkey.sock"
    assert result.stdout == f"unix://{sock}\n"
    assert stat.S_IMODE(home.stat().st_mode) == 0o710
    assert (stat.S_IMODE(sock.stat().st_mode), sock.stat().st_gid) == (0o770, os.getgid())

    config.write_text('server_socket_group = "no-such-group-jq"\n')
    result = CliRunner().invoke(main, ["--config", str(config), "server", "start"], env=env)
    assert result.exit_code == exitcodes.USAGE
    assert result.stderr == (f"jobq: error: {config}: server_socket_group: expected the name "
                             f"of a group of this host, or '', got 'no-such-group-jq'\n")


def test_server_run_is_the_server_in_the_foreground(spawn: Spawn, home: Path) -> None:
    env = subprocess_env(JOBQ_HOME=str(home))
    proc = spawn("server", "run", env=env)
    server = EmbeddedServer(home)
    wait_until(server.is_running, message="the server to answer")
    assert server.pid() == proc.pid  # it became the server: systemd's main process
    client = connect(server.url)
    client.set("kept", "yes")
    client.close()

    second = spawn("server", "run", env=env)
    _, err = second.communicate(timeout=30)
    assert second.returncode == exitcodes.SERVER
    assert err == f"jobq: error: a server already runs on {server.socket_path} (pid {proc.pid})\n"

    proc.terminate()  # what systemctl stop sends
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "Ready to accept connections" in out  # its log goes to the journal
    assert not server.is_running()
    server.start()  # a clean shutdown lost nothing
    client = connect(server.url)
    assert client.get("kept") == "yes"
    client.close()


def test_a_reader_that_stops_reading_is_no_error(redis_url: str, queue: JobQueue) -> None:
    # `jobq dlq list | head -1`: once head exits, every write fails with EPIPE. The reader
    # is gone here before anything is written, so that every command meets it, however
    # short its output.
    job = queue.enqueue(tasks.add, 1, 2)
    commands = [["dlq", "list"], ["info"], ["info", "--json"], ["job", job.id],
                ["schedule", "list"], ["top", "--iterations", "1"], ["server", "status"],
                ["--help"], ["dlq", "--help"]]
    read, write = os.pipe()
    os.close(read)
    try:
        procs = [(args, subprocess.Popen([sys.executable, "-m", module, *args],
                                         stdout=write, stderr=subprocess.PIPE, text=True,
                                         env=subprocess_env()))
                 for module, args in [*(("jobq.cli", c) for c in commands),
                                      ("jobq.cli.master", ["--help"])]]
    finally:
        os.close(write)
    for args, proc in procs:
        _, err = proc.communicate(timeout=30)
        assert (proc.returncode, err) == (0, ""), args


def test_demo_leaves_the_users_data_as_it_was_and_nothing_of_its_own(
        redis_url: str, r: redis.Redis) -> None:
    mine = JobQueue("demo", redis_url=redis_url)  # a user's queue that happens to be "demo"
    job = mine.enqueue(tasks.add, 1, 2)
    mine.enqueue(tasks.add, 3, 4, delay=3600)
    before = {k: r.dump(k) for k in r.keys()}

    done = subprocess.run([sys.executable, "-m", "jobq.cli", "demo", "--jobs", "8"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert "7 completed, 1 failed (after their retry)" in done.stdout, done.stdout
    assert {k: r.dump(k) for k in r.keys()} == before  # the demo's own keys are gone too
    assert mine.get_status(job.id) == "pending"


# -- the installed console script ------------------------------------------------------------

def test_the_installed_jobq_script(redis_url: str, queue: JobQueue) -> None:
    script = Path(sys.executable).parent / "jobq"
    assert script.exists(), script
    env = subprocess_env()
    done = subprocess.run([str(script), "enqueue", "jobq_testtasks:add", "[1, 2]", "-q", "cli"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert JobQueue("cli", redis_url=redis_url).get_status(job_id) == "pending"

    shown = subprocess.run([str(script), "info", "--json"], env=env, capture_output=True,
                           text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert [(q["queue"], q["pending"], q["enqueued"]) for q in data["queues"]] == \
        [("cli", 1, 1)]
    assert data["masters"] == [] and data["scheduler_leader"] is None
