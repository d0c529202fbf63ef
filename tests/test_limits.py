"""Limits (jobq.limits, claim.lua): the parser and bad input; the claim against a real server
(a held-back job stays in its place, every way a job stops being held frees its slot, rates
keep their time); and real masters whose jobs record their own start and end times."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jobq_testtasks as tasks
import pytest
import redis
from click.testing import CliRunner
from conftest import Valkey, figure, kill_tree, subprocess_env, wait_until

from jobq import exitcodes
from jobq.cli import main
from jobq.config import ConfigError, load_config
from jobq.connection import connect
from jobq.limits import Limit, LimitError, Rate, parse_rate, task_limits, tokens
from jobq.queue import JobQueue
from jobq.registry import task
from jobq.wire import AckEntry

ONE = "jobq_testtasks:one_at_a_time"
TWO = "jobq_testtasks:two_at_a_time"
Spawn = Callable[..., subprocess.Popen[str]]


# -- the pure core ------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "rate"), [
    ("10/s", Rate(10, 1)), ("100/m", Rate(100, 60)), ("5/h", Rate(5, 3600)),
    (" 7 / s ", Rate(7, 1)),
])
def test_a_rate_is_n_per_second_minute_or_hour(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate
    assert parse_rate(text, 5) == Rate(rate.count, rate.per, 5)


@pytest.mark.parametrize("text", ["10/fortnight", "0/s", "-1/s", "ten/s", "10", "10/s, burst 2",
                                  "", "1.5/s", 10, None])
def test_a_malformed_rate_is_one_clear_error(text: Any) -> None:
    with pytest.raises(LimitError) as err:
        parse_rate(text)
    assert "\n" not in str(err.value)
    assert "rate" in str(err.value)


@pytest.mark.parametrize(("options", "says"), [
    ({"concurrency": 0}, "concurrency must be an integer from 1"),
    ({"concurrency": -2}, "concurrency must be an integer from 1"),
    ({"concurrency": 1.5}, "concurrency must be an integer from 1"),
    ({"concurrency": True}, "concurrency must be an integer from 1"),
    ({"rate_limit": "10/fortnight"}, "is not of the form N/s, N/m or N/h"),
    ({"rate_limit": "10/s", "rate_burst": 0}, "burst must be an integer from 1"),
    ({"rate_burst": 3}, "rate_burst needs a rate_limit"),
    ({"concurrency": 2, "rate_burst": 3}, "rate_burst needs a rate_limit"),
    ({"limits": "gpu"}, "limits must be a list of limit names"),
    ({"limits": ["no spaces"]}, "limit name 'no spaces'"),
])
def test_a_bad_limit_is_refused_at_declaration(options: dict[str, Any], says: str) -> None:
    with pytest.raises(LimitError, match=says):
        task(name="jobq_testtasks:never_declared", **options)(tasks.noop)


def test_a_task_declares_its_own_limit_first_then_the_named_ones() -> None:
    own, names = task_limits("m:f", concurrency=3, rate_limit="10/s", rate_burst=4,
                             limits=["gpu", "db", "gpu"])
    assert own == Limit("m:f", 3, Rate(10, 1, 4))
    assert names == ["m:f", "gpu", "db"]
    assert task_limits("m:f", limits=["gpu"]) == (None, ["gpu"])
    assert tasks.one_at_a_time.job_options["limits"] == [ONE]
    assert tasks.one_at_a_time.own_limit == Limit(ONE, 1)
    assert "limits" not in tasks.noop.__dict__


def test_the_stored_form_round_trips() -> None:
    limit = Limit.build("gpu", concurrency=2, rate="10/s", burst=3)
    assert json.loads(limit.to_json()) == {"c": 2, "n": 10, "per": 1, "b": 3}
    assert Limit.from_json("gpu", limit.to_json()) == limit
    with pytest.raises(LimitError, match="needs a concurrency, a rate, or both"):
        Limit.build("gpu")
    with pytest.raises(LimitError, match="a burst needs a rate"):
        Limit.build("gpu", concurrency=1, burst=2)


def test_tokens_are_the_starts_a_rate_allows_now() -> None:
    rate = Rate(10, 1, 3)  # one start every 0.1 s, three back to back
    assert tokens(rate, None, 100.0) == 3
    assert tokens(rate, 100.0, 100.0) == 3  # quiet since
    assert tokens(rate, 100.3, 100.0) == 0  # three taken at 100.0: the next at 100.1
    assert tokens(rate, 100.3, 100.1) == 1
    assert tokens(rate, 100.3, 100.5) == 3


@pytest.mark.parametrize(("toml", "says"), [
    ("[limits.gpu]\nconcurrency = 0\n", "limits: gpu: concurrency must be an integer from 1"),
    ("[limits.gpu]\nrate = \"10/fortnight\"\n", "limits: gpu: rate '10/fortnight'"),
    ("[limits.gpu]\nconcurency = 2\n", "limits: gpu: unknown key 'concurency'"),
    ("[limits.gpu]\n", "limits: gpu: limit 'gpu' needs a concurrency, a rate, or both"),
    ("limits = 3\n", "limits: expected tables"),
])
def test_a_bad_limit_in_the_config_is_one_line(tmp_path: Path, toml: str, says: str) -> None:
    path = tmp_path / "jobq.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert says in str(err.value)
    assert "\n" not in str(err.value)


# -- the claim, on a real server ------------------------------------------------------------------
def claim(queue: JobQueue, worker: str, count: int = 10) -> list[str]:
    return [job_id for job_id, _, _, _ in queue.broker.exchange(worker, [], ["default"],
                                                                count).claimed]


def holders(r: redis.Redis, name: str) -> dict[str, str]:
    return r.hgetall(f"{{jobq}}:lim:run:{name}")


def test_a_job_over_its_limit_stays_pending_in_its_place(queue: JobQueue,
                                                         r: redis.Redis) -> None:
    a, b = (queue.enqueue(tasks.one_at_a_time, "k") for _ in range(2))
    c = queue.enqueue(tasks.noop)
    d = queue.enqueue(tasks.one_at_a_time, "k")
    e = queue.enqueue(tasks.two_at_a_time, "k")
    assert r.hget("{jobq}:jobs", a.id).startswith('{"lm":["jobq_testtasks:one_at_a_time"]')
    # the first of each limit, and the unlimited job behind the held-back ones
    assert claim(queue, "w1") == [a.id, c.id, e.id]
    assert holders(r, ONE) == {a.id: "w1"}
    assert r.lrange("{jobq}:q:default:0", 0, -1) == [b.id, d.id]  # in their place, in order
    assert queue.broker.stats("default")["pending"] == 2
    assert claim(queue, "w2") == []  # never claimed, spun on or re-queued
    assert r.lrange("{jobq}:q:default:0", 0, -1) == [b.id, d.id]
    assert r.smembers(f"{{jobq}}:lim:wait:{ONE}") == {"default"}
    r.delete("{jobq}:wake:default")
    queue.broker.exchange("w1", list(AckEntry("done", a.id, "default", 0, 0, "{}", "")),
                          [], 0)
    assert holders(r, ONE) == {}
    assert r.llen("{jobq}:wake:default") == 1  # an idle worker is woken for b
    assert claim(queue, "w2") == [b.id]


def test_a_limited_backlog_at_the_head_of_one_queue_never_keeps_a_worker_from_the_next(
        queue: JobQueue, r: redis.Redis) -> None:
    """The claim looks past at most 100 held-back jobs per queue: beyond them a queue's
    jobs wait for its head to drain, but the worker's next queue is looked at all the same
    (the budget used to be shared, and 100 held-back jobs in the first queue kept a worker
    from every other one)."""
    first = queue.enqueue(tasks.one_at_a_time, "k")
    queue.enqueue_many(tasks.one_at_a_time, [("k",)] * 150)
    other = JobQueue("other", redis_url=queue.url).enqueue(tasks.noop)
    assert claim(queue, "w1") == [first.id]  # the one slot
    got = queue.broker.exchange("w2", [], ["default", "other"], 5).claimed
    assert [job_id for job_id, _, _, _ in got] == [other.id]
    assert r.llen("{jobq}:q:default:0") == 150  # all still pending, in their place


def test_a_burst_worker_waits_for_a_job_its_limit_holds_back(queue: JobQueue, r: redis.Redis,
                                                             spawn: Spawn) -> None:
    """A burst worker stops when its queues are empty; a job held back by a limit is not
    gone, so it waits for the slot (it used to exit and leave the job behind)."""
    a = queue.enqueue(tasks.one_at_a_time, "k")
    b = queue.enqueue(tasks.one_at_a_time, "k")
    assert claim(queue, "w1", 1) == [a.id]  # the one slot, held by another worker
    proc = spawn("worker", "-I", "jobq_testtasks", "--burst", env=subprocess_env())
    wait_until(lambda: any(c.get("cmd") == "blpop" for c in r.client_list()),
               message="the burst worker waiting")
    assert proc.poll() is None and queue.get_status(b.id) == "pending"
    queue.broker.exchange("w1", list(AckEntry("done", a.id, "default", 0, 0, "{}", "")), [], 0)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert queue.get_status(b.id) == "completed"


def test_a_named_limit_is_shared_by_the_tasks_that_name_it(queue: JobQueue,
                                                           r: redis.Redis) -> None:
    queue.set_limit("gpu", concurrency=2)
    jobs = [queue.enqueue(tasks.on_the_gpu, "k") for _ in range(3)]
    assert claim(queue, "w1", 1) == [jobs[0].id]
    assert claim(queue, "w2", 5) == [jobs[1].id]
    assert claim(queue, "w3", 5) == []
    assert holders(r, "gpu") == {jobs[0].id: "w1", jobs[1].id: "w2"}
    queue.delete_limit("gpu")  # no limit any more: what it held back runs
    assert claim(queue, "w3", 5) == [jobs[2].id]


def test_an_unknown_named_limit_is_refused_at_enqueue(queue: JobQueue, r: redis.Redis) -> None:
    with pytest.raises(LimitError, match="unknown limit 'gpu': define it in the config"):
        queue.enqueue(tasks.on_the_gpu, "k")
    assert r.hlen("{jobq}:jobs") == 0
    configured = JobQueue("default", redis_url=queue.url, config=queue.config.replace(
        limits={"gpu": {"concurrency": 1}}))
    configured.enqueue(tasks.on_the_gpu, "k")  # the config defines it: written to the server
    assert json.loads(r.hget("{jobq}:limits", "gpu")) == {"c": 1}


def test_enqueue_never_hands_a_limited_job_to_an_idle_worker(queue: JobQueue,
                                                             r: redis.Redis) -> None:
    queue.broker.scripts.run("idle", [], [queue.keys.base, "w9", 15_000, "default"])
    limited = queue.enqueue(tasks.one_at_a_time, "k")
    assert r.llen("{jobq}:hand:w9") == 0
    plain = queue.enqueue(tasks.noop)
    assert r.lrange("{jobq}:hand:w9", 0, -1)[0].startswith(plain.id + "\n")
    assert claim(queue, "w1") == [limited.id]


def test_a_rate_admits_its_burst_then_one_idle_worker_keeps_its_time(queue: JobQueue,
                                                                     r: redis.Redis) -> None:
    jobs = [queue.enqueue(tasks.twenty_a_second, "k") for _ in range(3)]
    first = queue.broker.exchange("w1", [], ["default"], 5)
    assert [c[0] for c in first.claimed] == [jobs[0].id]  # burst 1
    assert first.keep_time is None  # it has work: another keeps the time
    assert r.llen("{jobq}:wake:default") >= 1  # ... woken for that
    keeper = queue.broker.exchange("w2", [], ["default"], 5)
    assert keeper.claimed == []
    assert keeper.keep_time is not None and 0 < keeper.keep_time <= 0.05
    other = queue.broker.exchange("w3", [], ["default"], 5)
    assert (other.claimed, other.keep_time) == ([], None)  # one keeper is enough
    wait_until(lambda: claim(queue, "w2"), timeout=5, message="the next start")


@pytest.mark.parametrize("ending", ["done", "fail", "cancel", "retry", "later", "giveback",
                                    "killed", "killed for good", "lease", "queue deleted"])
def test_every_way_a_job_ends_frees_its_slot(queue: JobQueue, r: redis.Redis,
                                             ending: str) -> None:
    # "killed for good": its worker died and it had no retry left, so the release fails it
    # (and deletes its spec) in the same script that frees its slot
    a = queue.enqueue(tasks.one_at_a_time, "k", max_retries=0 if ending.endswith("good") else 3)
    queue.enqueue(tasks.one_at_a_time, "k")
    assert claim(queue, "w1", 1) == [a.id]
    assert claim(queue, "w2") == []
    r.delete("{jobq}:wake:default")
    broker = queue.broker
    if ending in ("done", "fail", "cancel", "retry", "later"):
        entry = AckEntry(ending, a.id, "default", 0, 10 ** 13 if ending == "later" else 0, "{}",
                         "")
        assert broker.exchange("w1", list(entry), [], 0).stale == []
    elif ending == "giveback":
        assert broker.give_back("w1", [a.id]) == 1
    elif ending.startswith("killed"):  # what the master does when its worker dies
        broker.release("w1", cause="worker killed by signal 9 (SIGKILL)", current=a.id)
        assert (queue.get_status(a.id) == "failed") == ending.endswith("good")
    elif ending == "lease":  # its whole host gone: another master's reaper
        r.zadd("{jobq}:leases", {"w1": 1})
        assert [w for w, _ in broker.reap(0.1)] == ["w1"]
    else:
        queue.delete()
    assert holders(r, ONE) == {}
    assert not r.keys("{jobq}:limheld:*")
    if ending != "queue deleted":
        assert r.llen("{jobq}:wake:default") >= 1  # whoever waited for the slot is woken
        assert len(claim(queue, "w3")) == 1  # a or b: one slot, taken again
        assert len(holders(r, ONE)) == 1


def test_limits_from_python_and_the_command_line(queue: JobQueue, r: redis.Redis) -> None:
    def jobq(*args: str, code: int = 0) -> str:
        result = CliRunner().invoke(main, ["--redis-url", queue.url, *args])
        assert result.exit_code == code, (result.stdout, result.stderr)
        if code == exitcodes.USAGE:
            assert result.stderr.startswith("jobq: error: ")
            assert len(result.stderr.splitlines()) == 1
        return result.stdout

    assert "limit gpu: concurrency 2, rate 10/s (burst 3)" in jobq(
        "limit", "set", "gpu", "--concurrency", "2", "--rate", "10/s", "--burst", "3")
    jobq("limit", "set", "gpu", "--rate", "10/fortnight", code=exitcodes.USAGE)
    jobq("limit", "set", "gpu", "--concurrency", "0", code=exitcodes.USAGE)
    jobq("limit", "set", "bad name", "--concurrency", "1", code=exitcodes.USAGE)
    jobq("limit", "set", "gpu", code=exitcodes.USAGE)
    queue.enqueue(tasks.on_the_gpu, "k")
    queue.enqueue(tasks.on_the_gpu, "k")
    queue.set_limit("gpu", concurrency=1, rate="10/s", burst=3)
    assert len(claim(queue, "w1")) == 1
    use = json.loads(jobq("limit", "list", "--json"))["gpu"]
    assert use == {"defined": True, "concurrency": 1, "rate": "10/s", "burst": 3,
                   "running": 1, "tokens": 2, "waiting": ["default"]}
    text = jobq("limit", "list")
    assert "gpu" in text and "10/s burst 3" in text
    assert queue.limits()["gpu"] == Limit.build("gpu", concurrency=1, rate="10/s", burst=3)
    assert "deleted limit gpu" in jobq("limit", "delete", "gpu")
    jobq("limit", "delete", "gpu", code=exitcodes.NOT_FOUND)


# -- real masters --------------------------------------------------------------------------------
CONFIG = {"lease_time": 2.0, "hard_timeout_grace": 0.5, "heartbeat_timeout": 10.0,
          "graceful_timeout": 5.0, "retry_backoff_base": 0.05, "retry_jitter": 0.0}


def start_master(spawn: Spawn, tmp_path: Path, name: str, workers: int = 2,
                 url: str | None = None, **values: Any) -> subprocess.Popen[str]:
    path = tmp_path / f"{name}.toml"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in {**CONFIG, **values}.items()))
    url_args = ("--redis-url", url) if url else ()
    return spawn("-I", "jobq_testtasks", "-w", str(workers), "--config", str(path), *url_args,
                 env=subprocess_env(), module="jobq.cli.master")


def spans(r: redis.Redis, key: str) -> list[tuple[float, float, int]]:
    out = []
    for line in r.lrange(f"test:{key}", 0, -1):
        start, end, pid = line.split()
        out.append((float(start), float(end), int(pid)))
    return sorted(out)


def most_at_once(runs: list[tuple[float, float, int]]) -> int:
    events = sorted([(s, 1) for s, _, _ in runs] + [(e, -1) for _, e, _ in runs])
    now = top = 0
    for _, step in events:  # an end before a start at the same instant
        now += step
        top = max(top, now)
    return top


def test_concurrency_one_holds_across_two_masters(spawn: Spawn, tmp_path: Path,
                                                  queue: JobQueue, r: redis.Redis) -> None:
    masters = [start_master(spawn, tmp_path, f"m{i}") for i in range(2)]
    queue.enqueue_many(tasks.one_at_a_time, [("one", 0.1)] * 12)
    queue.enqueue_many(tasks.two_at_a_time, [("two", 0.05)] * 24)
    wait_until(lambda: r.llen("test:two") == 24, timeout=30, message="the second task's jobs")
    # the second limited task kept flowing meanwhile: it did not wait behind the first
    assert r.llen("test:one") < 12
    wait_until(lambda: r.llen("test:one") == 12, timeout=30, message="every one_at_a_time job")
    one = spans(r, "one")
    assert most_at_once(one) == 1, one
    assert all(a[1] <= b[0] for a, b in zip(one, one[1:], strict=False))
    assert most_at_once(spans(r, "two")) <= 2
    for m in masters:
        assert m.poll() is None
    assert holders(r, ONE) == {} and holders(r, TWO) == {}


def test_a_rate_limit_holds_every_second_and_is_reached(spawn: Spawn, tmp_path: Path,
                                                        queue: JobQueue, r: redis.Redis) -> None:
    start_master(spawn, tmp_path, "m", workers=4)
    wait_until(lambda: r.hexists("{jobq}:limits", "jobq_testtasks:twenty_a_second"), 15,
               message="the workers announced their limits")
    queue.enqueue_many(tasks.twenty_a_second, [("starts",)] * 100)  # 5 s at 20/s
    wait_until(lambda: r.llen("test:starts") == 100, timeout=30, message="100 starts")
    starts = sorted(float(t) for t in r.lrange("test:starts", 0, -1))
    burst = 1
    for i, t in enumerate(starts):
        in_window = sum(1 for u in starts[i:] if u < t + 1.0)
        assert in_window <= 20 + burst, (t, in_window)
    rate = (len(starts) - 1) / (starts[-1] - starts[0])
    gaps = sorted(round(b - a, 3) for a, b in zip(starts, starts[1:], strict=False))
    assert rate >= 0.9 * 20, (rate, gaps[::10], gaps[-5:])


def test_a_killed_worker_frees_its_slot_at_once(spawn: Spawn, tmp_path: Path, queue: JobQueue,
                                                r: redis.Redis) -> None:
    start_master(spawn, tmp_path, "m", workers=2)
    queue.enqueue(tasks.one_at_a_time_marked, "long", 60, max_retries=0)
    queue.enqueue(tasks.one_at_a_time_marked, "next", 0)
    pid = int(wait_until(lambda: r.lindex("test:long:pid", 0), timeout=15, message="the job"))
    assert r.llen("test:next:pid") == 0  # held back by the running one
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    # its master gives its jobs back at once, the slot with them: the next one starts
    wait_until(lambda: r.llen("test:next") == 1, timeout=10, message="the next job")
    # (it could not start while the killed one held the slot; it holds it until it ends)
    wait_until(lambda: holders(r, "jobq_testtasks:one_at_a_time_marked") == {}, timeout=10,
               message="the slot free once the next job ended")
    figure(f"limits: concurrency=1, its worker kill -9'd: the next job started "
           f"{spans(r, 'next')[0][0] - killed_at:.3f} s after the kill")


def test_a_lost_host_frees_its_slot_by_the_lease(spawn: Spawn, tmp_path: Path,
                                                 queue: JobQueue, r: redis.Redis) -> None:
    first = start_master(spawn, tmp_path, "a", workers=1)
    queue.enqueue(tasks.one_at_a_time_marked, "long", 60, max_retries=0)
    queue.enqueue(tasks.one_at_a_time_marked, "next", 0)
    wait_until(lambda: r.llen("test:long:pid") == 1, timeout=15, message="the job")
    start_master(spawn, tmp_path, "b", workers=1)
    wait_until(lambda: r.hlen("{jobq}:masters") == 2, timeout=15, message="the second master")
    killed_at = time.time()
    kill_tree(first.pid)  # the whole tree, at once: nobody gives anything back but the lease
    first.wait(timeout=10)
    # the lease lapses (2 s); the surviving master's scheduler reaps it once it leads (the
    # dead one may have led: its leader lease lapses first) and after a stall guard
    wait_until(lambda: r.llen("test:next") == 1, timeout=30,
               message="the next job, after the lease")
    assert holders(r, "jobq_testtasks:one_at_a_time_marked") == {}
    figure(f"limits: concurrency=1, its whole master tree killed: the next job started "
           f"{spans(r, 'next')[0][0] - killed_at:.3f} s after the kill (lease "
           f"{CONFIG['lease_time']} s)")


@pytest.mark.chaos
def test_a_server_restart_mid_run_leaks_no_slot_and_loses_no_job(
        spawn: Spawn, tmp_path: Path, r: redis.Redis) -> None:


    server = Valkey(tmp_path / "data", None, "--appendonly", "yes", "--appendfsync", "always")
    server.start()
    try:
        queue = JobQueue("default", redis_url=server.url)
        start_master(spawn, tmp_path, "m", workers=3, url=server.url, connect_timeout=1.0)
        ones = queue.enqueue_many(tasks.one_at_a_time, [("one", 0.05)] * 30)
        twos = queue.enqueue_many(tasks.two_at_a_time, [("two", 0.05)] * 30)
        wait_until(lambda: r.llen("test:one") + r.llen("test:two") >= 10, timeout=30,
                   message="the run under way")
        server.kill()  # persisted: every step a script took is in the append-only file
        server.start()
        ids = [j.id for j in ones + twos]
        wait_until(lambda: all(queue.get_status(i) == "completed" for i in ids), timeout=60,
                   message="every job completed")
        check = connect(server.url)
        assert check.hlen(f"{{jobq}}:lim:run:{ONE}") == 0
        assert check.hlen(f"{{jobq}}:lim:run:{TWO}") == 0
        assert not check.keys("{jobq}:limheld:*")
        assert queue.broker.stats("default")["processing"] == 0
        assert most_at_once(spans(r, "one")) == 1
    finally:
        server.kill()
