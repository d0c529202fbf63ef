"""The task catalog: workers announce what they can run; enqueue by name applies it."""

from __future__ import annotations

import signal
from typing import Any

import jobq_testtasks
import pytest
from click.testing import CliRunner
from conftest import run_in_this_process, subprocess_env, wait_until

from jobq import JobQueue, exitcodes
from jobq.broker import Broker
from jobq.catalog import Catalog, TaskInfo
from jobq.cli import main
from jobq.config import Config
from jobq.keys import Keys
from jobq.registry import TaskResolver
from jobq.scheduler import Scheduler
from jobq.worker_loop import Worker

TASK = "jobq_testtasks:declared"


def info_of(fn: Any, name: str = "m:f", **options: Any) -> TaskInfo:
    return TaskInfo.describe(name, fn, options, declared=True, now=1.0)


# -- what a task says of itself (no server) -------------------------------------------------------
def test_a_description_survives_the_wire() -> None:
    info = info_of(jobq_testtasks.declared.fn, TASK, **jobq_testtasks.declared.job_options)
    back = TaskInfo.from_json(TASK, info.to_json(), ["h.1"])
    assert back == info._replace(hosts=("h.1",))
    assert back.queue == "high"
    assert back.options == {"priority": -3, "max_retries": 0, "timeout": 2,
                            "retry_on": ["KeyError"]}
    assert back.job_options()["queue"] == "high"
    assert back.signature == "(seconds: float, *, label: str = '') -> str"
    assert back.doc.startswith("Sleeps, then says so")


@pytest.mark.parametrize("args, kwargs, error", [
    ((1,), {}, None),
    ((1,), {"label": "x"}, None),
    ((), {"seconds": 1}, None),
    ((), {}, "missing a required argument: 'seconds'"),
    ((1, 2), {}, "too many positional arguments"),
    ((1,), {"limit": 5}, "got an unexpected keyword argument 'limit'"),
])
def test_arguments_are_checked_against_the_signature(args: tuple[Any, ...],
                                                     kwargs: dict[str, Any],
                                                     error: str | None) -> None:
    check = info_of(jobq_testtasks.declared.fn, TASK).checker()
    if error is None:
        check(args, kwargs)
    else:
        with pytest.raises(TypeError, match=error) as caught:
            check(args, kwargs)
        assert str(caught.value).startswith(f"{TASK}(seconds: float")


def test_positional_only_tasks_are_checked_by_count() -> None:
    def f(a: int, b: int = 2) -> None: ...
    check = info_of(f).checker()
    check((1,), {})
    check((1, 2), {})
    for bad in ((), (1, 2, 3)):
        with pytest.raises(TypeError):
            check(bad, {})


def test_a_variadic_task_takes_anything() -> None:
    check = info_of(jobq_testtasks.echo).checker()
    check((1, 2, 3), {"x": 1})


def test_an_entry_another_version_wrote_is_ignored() -> None:
    assert TaskInfo.from_json("m:f", "{not json") is None
    assert TaskInfo.from_json("m:f", '{"q": null}') is None
    # parameters out of order cannot make a signature: no entry rather than a wrong check
    bad = info_of(jobq_testtasks.declared.fn)._replace(params=[("a", 1, True), ("b", 1, False)])
    assert TaskInfo.from_json("m:f", bad.to_json()) is None


def test_a_worker_describes_what_it_may_run() -> None:
    found = TaskResolver(["jobq_testtasks"]).describe(5.0)
    assert found[TASK].declared and found[TASK].queue == "high"
    assert found["jobq_testtasks:registered"].declared  # registered under its own name
    assert not found["jobq_testtasks:add"].declared  # a plain function of an allowed module
    assert found["jobq_testtasks:add"].signature == "(a: int, b: int) -> int"
    assert not any(name.endswith(":_private") for name in found)
    assert "jobq_testtasks:connect" not in found  # imported there, not defined there
    assert "jobq_testtasks:task" not in found


# -- announced on the server ---------------------------------------------------------------------
def announce(config: Config, url: str, announcer: str, generation: int = 0) -> Worker:
    worker = Worker(["default"], config=config, url=url,
                    resolver=TaskResolver(["jobq_testtasks"]), announcer=announcer,
                    generation=generation)
    worker._announce()
    assert worker._announced
    return worker


def test_enqueue_by_name_gets_the_declared_options(config: Config, redis_url: str,
                                                   queue: JobQueue) -> None:
    assert queue.task_info(TASK) is None
    queue.catalog = Catalog(queue.broker)  # no cached "unknown"
    announce(config, redis_url, "host.1")
    job = queue.enqueue(TASK, 0.1)
    assert (job.queue, job.timeout, job.max_retries, job.priority) == ("high", 2, 0, -3)
    assert job.retry_on == ["KeyError"]
    stored = queue.get_job(job.id)
    assert stored is not None
    assert (stored.queue, stored.timeout, stored.max_retries) == ("high", 2, 0)
    # given options win over declared ones
    other = queue.enqueue(TASK, 0.1, queue="low", timeout=9)
    assert (other.queue, other.timeout, other.max_retries) == ("low", 9, 0)
    # as they do for the Task object itself
    assert queue.enqueue(jobq_testtasks.declared, 0.1).queue == "high"


def test_bad_arguments_for_a_known_task_write_nothing(config: Config, redis_url: str,
                                                      queue: JobQueue) -> None:
    announce(config, redis_url, "host.1")
    high = JobQueue("high", redis_url=redis_url)
    with pytest.raises(TypeError, match="unexpected keyword argument 'limit'"):
        queue.enqueue(TASK, 1, kwargs={"limit": 5})
    with pytest.raises(TypeError, match="missing a required argument"):
        queue.enqueue_many(TASK, [(1,), ()])
    with pytest.raises(TypeError, match="too many positional"):
        queue.enqueue(TASK, 1, 2)
    with pytest.raises(TypeError, match="^item 0: .*missing a required argument"):
        queue.map("jobq_testtasks:add", [1, 2])
    with pytest.raises(TypeError, match="^item 0: .*missing a required argument"):
        queue.map("jobq_testtasks:add", [1, 2, 3], chunksize=2)
    assert high.size() == 0 and queue.size() == 0


def test_chunks_of_a_map_run_where_the_task_is_declared(config: Config, redis_url: str,
                                                        queue: JobQueue) -> None:
    announce(config, redis_url, "host.1")
    group = queue.map(TASK, [0.0, 0.0, 0.0], chunksize=2)
    assert JobQueue("high", redis_url=redis_url).size() == 2
    assert group.progress().total >= 2


def test_an_unknown_name_is_enqueued_as_given(config: Config, queue: JobQueue) -> None:
    job = queue.enqueue("jobq_testtasks:not_deployed_yet", 1, 2)
    assert (job.queue, job.timeout, job.max_retries) == (
        "default", config.default_timeout, config.default_max_retries)


def test_the_catalog_is_the_union_of_live_announcers(config: Config, redis_url: str,
                                                     queue: JobQueue) -> None:
    announce(config, redis_url, "alpha.1")
    announce(config, redis_url, "beta.2")
    tasks = queue.tasks()
    assert tasks[TASK].hosts == ("alpha.1", "beta.2")
    broker = Broker(queue.redis, Keys(config.prefix), config)
    broker.withdraw_tasks("alpha.1")
    assert queue.tasks()[TASK].hosts == ("beta.2",)
    # an announcement its master stopped renewing lapses, and leaves the catalog
    queue.redis.pexpire(queue.keys.tasks("beta.2"), 1)
    wait_until(lambda: queue.tasks() == {}, timeout=5, message="the announcement to lapse")
    assert queue.redis.smembers(queue.keys.catalog) == set()


def test_an_older_generation_never_replaces_a_newer_one(config: Config, redis_url: str,
                                                        queue: JobQueue) -> None:
    broker = Broker(queue.redis, Keys(config.prefix), config)
    entry = info_of(jobq_testtasks.add, "jobq_testtasks:new_code").to_json()
    assert broker.announce_tasks("m.1", 2, {"jobq_testtasks:new_code": entry}, 30)
    assert not broker.announce_tasks("m.1", 1, {"jobq_testtasks:old_code": entry}, 30)
    assert set(queue.tasks()) == {"jobq_testtasks:new_code"}
    # the next generation replaces it whole: a task the new code dropped is gone
    assert broker.announce_tasks("m.1", 3, {"jobq_testtasks:newer_code": entry}, 30)
    assert set(queue.tasks()) == {"jobq_testtasks:newer_code"}


def test_a_lone_worker_withdraws_its_tasks_when_it_stops(config: Config, redis_url: str,
                                                         queue: JobQueue) -> None:
    worker = Worker(["default"], config=config, url=redis_url,
                    resolver=TaskResolver(["jobq_testtasks"]), burst=True)
    assert run_in_this_process(worker) == 0
    assert worker._announced
    assert queue.tasks() == {}
    assert not queue.redis.exists(queue.keys.tasks(worker.name))


# -- a real master ------------------------------------------------------------------------------
def test_a_master_announces_its_tasks_and_every_way_by_name_applies_them(
        spawn: Any, tmp_path: Any, redis_url: str, queue: JobQueue) -> None:
    path = tmp_path / "jobq.toml"
    path.write_text('queues = ["default", "high"]\nlease_time = 2.0\nscheduler_tick = 0.1\n')
    master = spawn("-I", "jobq_testtasks", "-w", "2", module="jobq.cli.master",
                   env=subprocess_env(JOBQ_CONFIG=str(path)))
    wait_until(lambda: TASK in queue.tasks(), timeout=30)
    (master_id,) = queue.tasks()[TASK].hosts
    assert master_id.endswith(f".{master.pid}")

    # the CLI: the task's own time limit (2 s) and retries (none), not the defaults
    result = CliRunner().invoke(main, ["--redis-url", redis_url, "enqueue", TASK, "[4]",
                                       "--wait", "--wait-timeout", "30"])
    assert result.exit_code == exitcodes.FAILURE, result.stderr
    assert "JobTimeout" in result.stderr

    # a schedule: each run gets the declared options as the catalog says at its fire
    scheduler = Scheduler(queue)
    scheduler.schedule_interval("every-hour", TASK, 3600, [0.0], kwargs={"label": "s"})
    wait_until(lambda: scheduler.list()[0]["last_job"], timeout=30)
    run = queue.get_job(scheduler.list()[0]["last_job"])
    assert run is not None
    assert (run.queue, run.timeout, run.max_retries, run.priority) == ("high", 2, 0, -3)
    assert run.result(timeout=30) == "sslept 0.0"

    master.send_signal(signal.SIGTERM)
    assert master.wait(timeout=30) == 0
    assert queue.tasks() == {}  # a master that stops withdraws what it announced


def test_a_reload_announces_the_new_code_and_drops_what_it_removed(
        spawn: Any, tmp_path: Any, queue: JobQueue) -> None:
    module = tmp_path / "reloaded_tasks.py"
    module.write_text("from jobq import task\n\n@task(timeout=5)\ndef old(x): return x\n")
    master = spawn("-I", "reloaded_tasks", "-w", "1", module="jobq.cli.master",
                   env=subprocess_env(PYTHONPATH=f"{tmp_path}:{subprocess_env()['PYTHONPATH']}"))
    # only what the module declares: nothing jobq itself registers (the demo's tasks)
    wait_until(lambda: set(queue.tasks()) == {"reloaded_tasks:old"}, timeout=30)
    module.write_text("from jobq import task\n\n@task(timeout=7)\ndef new(x, y): return x\n")
    master.send_signal(signal.SIGHUP)
    wait_until(lambda: set(queue.tasks()) == {"reloaded_tasks:new"}, timeout=30)
    assert queue.tasks()["reloaded_tasks:new"].options == {"timeout": 7}
