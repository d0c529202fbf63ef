"""The master as a real process (``python -m jobq.cli.master``): it forks real workers and a
scheduler, and gets real signals. Jobs are counted in Redis (see ``jobq_testtasks``)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import jobq_testtasks as tasks
import psutil
import pytest
import redis
from conftest import ROOT, children, kill_processes, process_tree, subprocess_env, title, wait_until

from jobq import exitcodes
from jobq.job import Job, JobStatus
from jobq.process import PARENT_DIED, USS_EVERY, worker_memory
from jobq.queue import JobQueue
from jobq.scheduler import Scheduler

Spawn = Callable[..., subprocess.Popen[str]]

#: Small limits, so that every supervision path fires within a second or two.
CONFIG = {"lease_time": 2.0, "hard_timeout_grace": 0.5, "heartbeat_timeout": 5.0,
          "graceful_timeout": 5.0, "retry_backoff_base": 0.05, "retry_jitter": 0.0}


def key() -> str:
    return uuid.uuid4().hex[:12]


def runs(r: redis.Redis, name: str) -> list[str]:
    return r.lrange(f"test:{name}", 0, -1)


def write_config(tmp_path: Path, **values: Any) -> Path:
    path = tmp_path / "jobq.toml"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in {**CONFIG, **values}.items()))
    return path


def start_master(spawn: Spawn, tmp_path: Path, *args: str, workers: int = 2,
                 imports: tuple[str, ...] = ("jobq_testtasks",), pythonpath: Path | None = None,
                 **config: Any) -> subprocess.Popen[str]:
    env = subprocess_env(JOBQ_CONFIG=str(write_config(tmp_path, **config)))
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env["PYTHONPATH"]])
    options = [opt for module in imports for opt in ("-I", module)]
    return spawn(*options, "-w", str(workers), *args, env=env, module="jobq.cli.master")


def wait_workers(master: subprocess.Popen[str], count: int, *, without: set[int] = frozenset(),
                 timeout: float = 15) -> list[int]:
    """Wait until the master has exactly ``count`` ready workers, none of them in
    ``without``; return their pids."""
    def check() -> list[int] | None:
        assert master.poll() is None, f"the master exited: {master.communicate()[1]}"
        pids = children(master, ready=True)
        if len(pids) == count and len(children(master)) == count and not set(pids) & without:
            return pids
        return None

    return wait_until(check, timeout, interval=0.02,
                      message=f"{count} ready worker(s) (not {sorted(without)})")


def finish(proc: subprocess.Popen[str], timeout: float = 20) -> tuple[int, str]:
    """Wait for the process to exit; its exit code and stderr."""
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def wait_status(queue: JobQueue, job_id: str, *statuses: JobStatus,
                timeout: float = 15) -> Job:
    def check() -> Job | None:
        job = queue.get_job(job_id)
        return job if job is not None and job.status in statuses else None

    return wait_until(check, timeout, message=f"job {job_id} to be {statuses}")


def started(r: redis.Redis, name: str, count: int = 1, timeout: float = 15) -> list[str]:
    """Wait until a recording task ran ``count`` times; the pids (or values) it recorded."""
    return wait_until(lambda: len(runs(r, name)) >= count and runs(r, name), timeout,
                      message=f"{count} run(s) recorded under {name}")


# -- losing workers ------------------------------------------------------------------------------

def test_a_worker_killed_mid_job_is_replaced_and_its_job_completes_on_retry(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    master = start_master(spawn, tmp_path)
    before = wait_workers(master, 2)
    k = key()
    job = queue.enqueue(tasks.hang_first_run, k, 30)
    [victim] = started(r, k)
    assert int(victim) in before

    os.kill(int(victim), signal.SIGKILL)

    done = wait_status(queue, job.id, JobStatus.COMPLETED, JobStatus.FAILED)
    assert done.status is JobStatus.COMPLETED, done.errors
    assert done.return_value == "run 2"
    assert len(runs(r, k)) == 2 and runs(r, k)[1] != victim  # the side effect, twice
    # two attempts (the killed one and the one that completed), each delivered once
    assert (done.attempts, done.retries, done.deliveries) == (2, 1, 2)
    [error] = done.errors
    assert error["type"] == "WorkerLost"
    assert "killed by signal 9 (SIGKILL)" in error["msg"]
    after = wait_workers(master, 2, without={int(victim)})
    assert set(after) & set(before) == set(before) - {int(victim)}


@pytest.mark.parametrize("how", ["SIGKILL", "its master's death signal"])
def test_what_a_job_started_dies_with_its_worker(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path, how: str) -> None:
    """Killed, the worker takes what its job started with it. So it does on its master's
    death signal, sent here while the master runs on: Linux sends it when the thread that
    forked the worker exits, and a master killed whole may lose that thread before its
    others, so that for a moment getppid() still names the master. The worker must die at
    once all the same, not stop gracefully (finish its job, give back the others) as if its
    master were there to renew its lease."""
    master = start_master(spawn, tmp_path, workers=1)
    [worker] = wait_workers(master, 1)
    sig = signal.SIGKILL
    if how != "SIGKILL":
        asked = wait_status(queue, queue.enqueue(tasks.death_signal).id, JobStatus.COMPLETED)
        assert asked.return_value == PARENT_DIED != signal.SIGTERM  # not the master's stop
        sig = PARENT_DIED
    k = key()
    job = queue.enqueue(tasks.start_grandchild_and_hang, k, 30, max_retries=0)
    grandchild = psutil.Process(int(started(r, k)[0]))
    try:
        assert grandchild.ppid() == worker and psutil.Process(worker).ppid() == master.pid

        os.kill(worker, sig)

        def gone() -> bool:
            try:
                return grandchild.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_until(gone, 10, message="the job's child process to be killed with its worker")
        done = wait_status(queue, job.id, JobStatus.FAILED)
        # on the death signal too: the worker killed itself and its group (a graceful stop
        # would still be in the job's 30 s; the signal's default action would name itself)
        assert "killed by signal 9 (SIGKILL)" in done.final_error["msg"]
        wait_workers(master, 1, without={worker})
    finally:
        try:
            grandchild.kill()
        except psutil.NoSuchProcess:
            pass


# -- time limits -----------------------------------------------------------------------------------

def test_a_job_over_its_timeout_gets_job_timeout_raised_inside(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    master = start_master(spawn, tmp_path, workers=1)
    [worker] = wait_workers(master, 1)
    k = key()
    job = queue.enqueue(tasks.spin, 30, k, timeout=0.3, max_retries=1)

    done = wait_status(queue, job.id, JobStatus.FAILED, JobStatus.COMPLETED)

    assert done.status is JobStatus.FAILED
    assert runs(r, k) == ["JobTimeout", "JobTimeout"]  # raised inside the task, each attempt
    assert (done.attempts, done.retries) == (2, 1)
    assert [e["type"] for e in done.errors] == ["JobTimeout", "JobTimeout"]
    assert "time limit of 0.3 s" in done.errors[-1]["msg"]
    assert done.final_error["type"] == "JobTimeout"
    # the soft limit was enough: the master did not have to kill the worker
    assert wait_workers(master, 1) == [worker]


def test_a_job_that_blocks_sigalrm_is_killed_at_the_hard_limit(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    master = start_master(spawn, tmp_path)
    before = wait_workers(master, 2)
    job = queue.enqueue(tasks.block_alarm, 30, timeout=0.3, max_retries=0)
    running = wait_status(queue, job.id, JobStatus.PROCESSING)
    assert running.status is JobStatus.PROCESSING

    done = wait_status(queue, job.id, JobStatus.FAILED, JobStatus.COMPLETED)

    assert done.status is JobStatus.FAILED
    assert done.final_error["type"] == "WorkerLost"
    assert done.final_error["msg"].startswith(f"hard time limit: job {job.id} ran ")
    assert "did not stop on SIGALRM" in done.final_error["msg"]
    after = wait_workers(master, 2)
    assert len(set(before) - set(after)) == 1  # exactly that worker was replaced


# -- memory limits ---------------------------------------------------------------------------------

def test_a_worker_over_the_memory_soft_limit_is_recycled_after_its_job(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    master = start_master(spawn, tmp_path, workers=1, memory_soft_limit_mb=150)
    [worker] = wait_workers(master, 1)
    k = key()
    job = queue.enqueue(tasks.hold_memory_until_sigterm, k, 250)

    # the task holds the memory until its worker is asked to stop (SIGTERM from the master)
    assert job.result(timeout=30) == "retired"
    assert runs(r, k) == [str(worker)]
    [new] = wait_workers(master, 1, without={worker})
    assert queue.enqueue(tasks.pid).result(timeout=15) == new
    assert queue.get_stats()["failed"] == 0


def test_a_worker_over_the_memory_hard_limit_is_killed_and_its_job_retried(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    master = start_master(spawn, tmp_path, workers=1, memory_hard_limit_mb=150)
    [worker] = wait_workers(master, 1)
    k = key()
    job = queue.enqueue(tasks.hang_first_run, k, 30, 250)

    done = wait_status(queue, job.id, JobStatus.COMPLETED, JobStatus.FAILED, timeout=30)

    assert done.status is JobStatus.COMPLETED and done.return_value == "run 2"
    assert runs(r, k)[0] == str(worker) != runs(r, k)[1]
    [error] = done.errors
    assert error["msg"].startswith("memory hard limit: worker used ")
    assert "over 150 MB" in error["msg"]
    wait_workers(master, 1, without={worker})


def test_a_workers_unique_memory_is_read_when_a_limit_may_be_crossed_or_it_is_old() -> None:
    """Reading a process's USS walks its page tables; its RSS, a bound of it, is cheap. The
    master reads the USS again only when the RSS is over the lowest limit, or when the last
    reading is USS_EVERY old; between them the last one stands, capped by the RSS."""
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a process that holds 64 MiB of its own (written: resident, not shared)
        os.close(ready_r)
        os.close(stop_w)
        held = bytearray(os.urandom(1024)) * (64 * 1024)
        os.write(ready_w, b"1")
        os.read(stop_r, 1)  # until the test closes its end
        os._exit(0 if held else 1)
    os.close(ready_w)
    os.close(stop_r)
    try:
        assert os.read(ready_r, 1) == b"1"
        rss = psutil.Process(pid).memory_info().rss / 2**20
        assert rss > 64
        # the first reading is its USS
        first, at = worker_memory(pid, None, 0.0, 100.0, None)
        assert first > 60 and at == 100.0
        # under every limit, within USS_EVERY: no new reading (a stale 1 MiB stands)
        assert worker_memory(pid, 1.0, 100.0, 100.0 + USS_EVERY / 2, 10_000.0) == (1.0, 100.0)
        assert worker_memory(pid, 1.0, 100.0, 101.0, None) == (1.0, 100.0)
        # capped by the RSS: never more than the process has resident
        capped, at = worker_memory(pid, 10_000.0, 100.0, 101.0, None)
        assert capped <= psutil.Process(pid).memory_info().rss / 2**20 and at == 100.0
        # its RSS is over a limit: read again, the USS decides
        over, at = worker_memory(pid, 1.0, 100.0, 101.0, 50.0)
        assert over > 60 and at == 101.0
        # USS_EVERY passed: read again
        again, at = worker_memory(pid, 1.0, 100.0, 100.0 + USS_EVERY, None)
        assert again > 60 and at == 100.0 + USS_EVERY
    finally:
        os.close(stop_w)
        os.waitpid(pid, 0)
        os.close(ready_r)


# -- signals ---------------------------------------------------------------------------------------

def test_hup_reloads_new_code_without_losing_or_failing_a_job(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    module = code / "hupmod.py"
    module.write_text("def version():\n    return 1\n")
    master = start_master(spawn, tmp_path, imports=("jobq_testtasks", "hupmod"),
                          pythonpath=code)
    old = wait_workers(master, 2)
    assert queue.enqueue("hupmod:version").result(timeout=15) == 1
    k = key()
    queue.enqueue_many(tasks.record_then_sleep, [(k, str(i), 0.003) for i in range(1000)])
    # new code: a different size too, so a stale .pyc can never pass for it
    module.write_text("# reloaded\ndef version():\n    return 2\n")
    assert queue.get_stats()["pending"] > 0  # the reload happens while the jobs run

    os.kill(master.pid, signal.SIGHUP)

    versions = []

    def new_code_runs() -> bool:
        versions.append(queue.enqueue("hupmod:version", priority=-1).result(timeout=15))
        return versions[-1] == 2

    wait_until(new_code_runs, 30, message="a job to run the reloaded code")
    wait_until(lambda: len(runs(r, k)) >= 1000, 30, message="the 1000 jobs to run")
    stats = queue.get_stats()
    assert stats["failed"] == 0 and stats["retried"] == 0
    assert sorted(runs(r, k), key=int) == [str(i) for i in range(1000)]  # each exactly once
    assert wait_until(lambda: queue.get_stats()["completed"] == 1001 + len(versions), 10,
                      message="every job to be completed")
    new = wait_workers(master, 2, without=set(old))
    assert "gen=1" in title(psutil.Process(master.pid))
    assert len(new) == 2


def test_a_jobq_upgraded_under_a_running_master_waits_for_its_restart(
        queue: JobQueue, spawn: Spawn, tmp_path: Path) -> None:
    # jobq installed in a directory of its own, as pip would
    site = tmp_path / "site"
    shutil.copytree(ROOT / "jobq", site / "jobq", ignore=shutil.ignore_patterns("__pycache__"))
    env = subprocess_env(JOBQ_CONFIG=str(write_config(tmp_path)))
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    where = subprocess.run([sys.executable, "-c", "import jobq; print(jobq.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert where.stdout.strip() == str(site / "jobq" / "__init__.py")
    master = spawn("-I", "jobq_testtasks", "-w", "1", env=env, cwd=tmp_path,
                   module="jobq.cli.master")
    old = wait_workers(master, 1)

    # "pip install" of a jobq whose scripts the running code cannot use, then a HUP
    (site / "jobq" / "lua" / "lib.lua").write_text("do return redis.error_reply('newer') end\n")
    os.kill(master.pid, signal.SIGHUP)
    wait_workers(master, 1, without=set(old))
    # the new worker runs the jobq its master loaded, Lua and Python alike
    assert queue.enqueue(tasks.add, 1, 2).result(timeout=15) == 3


def open_logs(pid: int, directory: Path) -> set[str]:
    """The names of the files in ``directory`` a process has open (a renamed file shows
    under its new name)."""
    try:
        return {Path(f.path).name for f in psutil.Process(pid).open_files()
                if Path(f.path).parent == directory}
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return set()


def test_usr1_and_hup_reopen_the_log_file_in_the_master_its_workers_and_its_scheduler(
        queue: JobQueue, spawn: Spawn, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    log_file = logs / "master.log"
    master = start_master(spawn, tmp_path, workers=1, log_file=str(log_file))
    wait_workers(master, 1)
    [scheduler] = wait_until(lambda: [p.pid for p in psutil.Process(master.pid).children()
                                      if "jobq scheduler" in title(p)],
                             message="the scheduler")

    for signum, rotated in ((signal.SIGUSR1, "master.log.1"), (signal.SIGHUP, "master.log.2")):
        log_file.rename(logs / rotated)  # what logrotate does, before it signals the master
        os.kill(master.pid, signum)

        def reopened() -> bool:
            writers = [master.pid, scheduler, *children(master, ready=True)]
            return all(open_logs(pid, logs) == {"master.log"} for pid in writers)

        wait_until(reopened, 20, message=f"every process to reopen the log after {signum!r}")
        assert scheduler in [p.pid for p in psutil.Process(master.pid).children()]

    # what the scheduler says now lands in the new file
    Scheduler(queue).schedule_once("after-rotation", tasks.noop, datetime.now())
    wait_until(lambda: "schedule after-rotation fired" in log_file.read_text(), 20,
               message="the scheduler's line in the new log file")
    for rotated in ("master.log.1", "master.log.2"):
        assert "after-rotation" not in (logs / rotated).read_text()


def test_ttin_and_ttou_change_the_number_of_workers(spawn: Spawn, queue: JobQueue,
                                                    tmp_path: Path) -> None:
    master = start_master(spawn, tmp_path)
    first = wait_workers(master, 2)

    os.kill(master.pid, signal.SIGTTIN)
    three = wait_workers(master, 3)
    assert set(first) < set(three)
    assert "workers=3" in title(psutil.Process(master.pid))

    os.kill(master.pid, signal.SIGTTOU)
    two = wait_workers(master, 2)
    assert set(two) < set(three)
    assert "workers=2" in title(psutil.Process(master.pid))

    os.kill(master.pid, signal.SIGTTOU)
    os.kill(master.pid, signal.SIGTTOU)  # never below one
    wait_workers(master, 1)
    assert "workers=1" in title(psutil.Process(master.pid))
    assert queue.enqueue(tasks.add, 1, 2).result(timeout=15) == 3


def test_term_lets_the_running_job_finish_and_exits_0(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    master = start_master(spawn, tmp_path)
    wait_workers(master, 2)
    k = key()
    job = queue.enqueue(tasks.mark_then_sleep, k, 1.5)
    started(r, k)

    os.kill(master.pid, signal.SIGTERM)

    code, err = finish(master)
    assert code == 0, err
    done = queue.get_job(job.id)
    assert done is not None and done.status is JobStatus.COMPLETED, done and done.errors
    assert done.return_value == "slept" and done.errors == []


def test_quit_stops_at_once_and_requeues_the_running_job(
        queue: JobQueue, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    # a graceful stop would wait for the job far longer than the test does
    master = start_master(spawn, tmp_path, graceful_timeout=120.0)
    pool = wait_workers(master, 2)
    k = key()
    job = queue.enqueue(tasks.hang_first_run, k, 60)
    started(r, k)

    os.kill(master.pid, signal.SIGQUIT)

    code, err = finish(master, timeout=15)  # far sooner than the job or graceful_timeout
    assert code == 0, err
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                   for p in pool)
    back = queue.get_job(job.id)
    assert back is not None and back.status in (JobStatus.PENDING, JobStatus.RETRY)
    assert queue.get_stats()["failed"] == 0

    second = start_master(spawn, tmp_path)
    done = wait_status(queue, job.id, JobStatus.COMPLETED, JobStatus.FAILED)
    assert done.status is JobStatus.COMPLETED and done.return_value == "run 2"
    os.kill(second.pid, signal.SIGTERM)
    assert finish(second)[0] == 0


# -- boot failures ---------------------------------------------------------------------------------

def test_a_master_with_no_task_module_refuses_to_start_in_one_line(spawn: Spawn) -> None:
    # the sample config as shipped (what etc/jobq.service starts) names no task module
    sample = ROOT / "etc" / "jobq.toml"
    refused = spawn("--config", str(sample), module="jobq.cli.master")
    _, err = refused.communicate(timeout=30)
    assert refused.returncode == exitcodes.USAGE
    assert err == (f"jobq-master: error: {sample}: imports: no task module: name the modules "
                   f'that define your tasks (imports = ["myapp.tasks"] in the config, or -I '
                   f"myapp.tasks)\n")


#: A task module that cannot be imported: (its source, or None for no such module; what
#: jobq-master's one line says after the module's name).
BROKEN_MODULES = {
    "missing": (None, "ModuleNotFoundError: No module named 'brokenmod'"),
    "raises": ("raise RuntimeError('broken on purpose')\n",
               "RuntimeError: broken on purpose"),
    "syntax-error": ("def f(:\n    pass\n", "SyntaxError: "),
}


@pytest.mark.parametrize("breakage", list(BROKEN_MODULES))
def test_a_task_module_that_fails_to_import_stops_the_master_in_one_line(
        breakage: str, r: redis.Redis, spawn: Spawn, tmp_path: Path) -> None:
    source, says = BROKEN_MODULES[breakage]
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    if source is not None:
        (code_dir / "brokenmod.py").write_text(source)
    master = start_master(spawn, tmp_path, "--log-level", "debug",
                          imports=("jobq_testtasks", "brokenmod"), pythonpath=code_dir)

    code, err = finish(master)

    assert code == exitcodes.IMPORT, err
    # exactly one line on stderr, even at the debug level: nothing started before it
    assert err.count("\n") == 1, err
    assert err.startswith(f"jobq-master: error: cannot import task module 'brokenmod': {says}")
    assert r.dbsize() == 0  # no master, worker or scheduler ever reached the server


def test_a_job_that_exits_with_the_import_code_does_not_stop_the_master(
        queue: JobQueue, spawn: Spawn, tmp_path: Path) -> None:
    master = start_master(spawn, tmp_path, workers=1)
    [worker] = wait_workers(master, 1)
    job = queue.enqueue(tasks.exit_process, exitcodes.IMPORT, max_retries=0)

    done = wait_status(queue, job.id, JobStatus.FAILED)

    assert done.final_error["msg"].startswith(f"worker exited with code {exitcodes.IMPORT}")
    wait_workers(master, 1, without={worker})
    assert master.poll() is None
    assert queue.enqueue(tasks.add, 1, 1).result(timeout=15) == 2


# -- what ps shows ---------------------------------------------------------------------------------

def test_process_titles(spawn: Spawn, queue: JobQueue, tmp_path: Path) -> None:
    master = start_master(spawn, tmp_path, "-q", "high,default")
    pool = wait_workers(master, 2)

    def scheduler() -> list[psutil.Process]:
        return [c for c in psutil.Process(master.pid).children()
                if "jobq scheduler" in title(c)]

    [sched] = wait_until(scheduler, message="the scheduler's title")
    name = title(psutil.Process(master.pid))
    assert "jobq-master" in name and "high,default" in name and "workers=2" in name
    children = psutil.Process(master.pid).children()
    assert sorted(c.pid for c in children) == sorted([*pool, sched.pid])
    for pid in pool:
        assert title(psutil.Process(pid)).startswith("jobq worker ")
    assert sorted(title(psutil.Process(p)).split(":")[0] for p in pool) == [
        "jobq worker 0", "jobq worker 1"]


# -- the tutorial's script -------------------------------------------------------------------------

#: main.py of the tutorial jobq grew from (its "Testing" section), byte for byte.
SEED_MAIN = '''\
# main.py
from jobq.queue import JobQueue
from jobq.worker import WorkerPool
from jobq.job import Job
from jobq.scheduler import Scheduler
from datetime import datetime, timedelta
import time

# Define some tasks
def send_email(to, subject):
    print(f"Sending email to ${to}: ${subject}")
    time.sleep(2)
    return "Email sent"

def process_data(data):
    print(f"Processing data: ${data}")
    time.sleep(1)
    return f"Processed ${data} successfully"

# Create queue and workers
queue = JobQueue()
pool = WorkerPool(queue, num_workers=2)
pool.start()

# Enqueue some jobs
job1 = Job(send_email, ("user@example.com", "Hello"), priority=1)
job2 = Job(process_data, ("report.csv",), priority=2)
job3 = Job(process_data, ("image.png",), priority=3)

queue.enqueue(job1)
queue.enqueue(job2)
queue.enqueue(job3)

# Schedule a job
scheduler = Scheduler(queue)
scheduler.schedule_interval("periodic_task", process_data, interval=10, args=("scheduled",))
scheduler.start()

# Wait for jobs to complete
time.sleep(5)

# Print stats
print("\\nQueue stats:", queue.get_stats())

# Stop everything
pool.stop()
scheduler.stop()
'''


def test_the_seed_main_py_runs_unchanged(redis_url: str, tmp_path: Path) -> None:
    script = tmp_path / "main.py"
    script.write_text(SEED_MAIN)
    env = subprocess_env()
    env.pop("JOBQ_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "main.py"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    seen: dict[int, float] = {}  # every process it started: pid -> create time
    try:
        def pool_up() -> bool:
            try:
                family = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                return True
            for p in family:
                try:
                    seen.setdefault(p.pid, p.create_time())
                except psutil.NoSuchProcess:
                    pass
            names = " ".join(title(p) for p in family)
            return proc.poll() is not None or (
                "jobq-master" in names and names.count("jobq worker") == 2
                and "jobq scheduler" in names)

        wait_until(pool_up, 20, interval=0.02, message="the script's worker pool")
        out, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err
    assert len(seen) >= 4, seen  # master, two workers, scheduler
    stats_line = next(line for line in out.splitlines() if line.startswith("Queue stats:"))
    assert "'completed': 4" in stats_line and "'failed': 0" in stats_line, out
    assert "Sending email to $user@example.com: $Hello" in out
    assert "Processing data: $scheduled" in out

    def alive(pid: int, created: float) -> bool:
        try:
            p = psutil.Process(pid)
            return p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def all_gone() -> bool:
        return not [pid for pid, created in seen.items() if alive(pid, created)]

    # nothing it started outlives it (orphans would be reparented: look them up by pid too)
    wait_until(all_gone, 10, message=f"the script's processes {sorted(seen)} to exit")
    leftovers = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        if p.info["cwd"] == str(tmp_path) and "jobq" in " ".join(p.info["cmdline"] or []):
            leftovers.append((p.pid, p.info["cmdline"]))
    assert leftovers == []


# -- pidfile ---------------------------------------------------------------------------------------

def test_pidfile_refuses_a_second_master_and_takes_over_a_stale_one(
        spawn: Spawn, tmp_path: Path) -> None:
    pidfile = tmp_path / "jobq.pid"
    first = start_master(spawn, tmp_path, "--pidfile", str(pidfile), workers=1)
    wait_workers(first, 1)
    assert pidfile.read_text().strip() == str(first.pid)

    second = start_master(spawn, tmp_path, "--pidfile", str(pidfile), workers=1)
    code, err = finish(second)
    assert code == exitcodes.PIDFILE, err
    assert str(first.pid) in err and str(pidfile) in err
    assert first.poll() is None and pidfile.read_text().strip() == str(first.pid)

    os.kill(first.pid, signal.SIGTERM)
    assert finish(first)[0] == 0
    assert not pidfile.exists()  # a clean stop removes it

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pidfile.write_text(f"{dead.pid}\n")
    third = start_master(spawn, tmp_path, "--pidfile", str(pidfile), workers=1)
    wait_workers(third, 1)
    assert pidfile.read_text().strip() == str(third.pid)
    os.kill(third.pid, signal.SIGTERM)
    assert finish(third)[0] == 0


def test_an_idle_pool_gets_jobs_handed_straight_to_a_worker(
        spawn: Spawn, queue: JobQueue, r: redis.Redis, tmp_path: Path) -> None:
    master = start_master(spawn, tmp_path, workers=1)
    (pid,) = wait_workers(master, 1)
    wait_until(lambda: r.zcard(queue.keys.idle("default")) == 1, message="an idle worker")
    name = r.zrange(queue.keys.idle("default"), 0, 0)[0]
    os.kill(pid, signal.SIGSTOP)  # frozen while idle: what enqueue did stays visible
    try:
        job = queue.enqueue(tasks.add, 2, 3)
        # handed over, not queued: held by that worker (its blocked BLPOP got it, even
        # frozen: the server answers it), no longer idle, nothing pending, no wake token
        assert queue.get_stats()["pending"] == 0
        assert queue.broker.active_holder(job.id) == name
        assert r.zcard(queue.keys.idle("default")) == 0
        assert r.llen(queue.keys.level("default", 0)) == 0
    finally:
        os.kill(pid, signal.SIGCONT)
    assert job.result(timeout=10) == 5
    assert queue.get_job(job.id).worker == name  # type: ignore[union-attr]


def test_an_idle_worker_registers_in_one_round_trip_and_after_the_server_lost_its_scripts(
        spawn: Spawn, queue: JobQueue, r: redis.Redis, tmp_path: Path) -> None:
    def asked() -> int:  # how often a client asked the server whether it holds a script
        return int(r.info("commandstats").get("cmdstat_script|exists", {}).get("calls", 0))

    def registered() -> float:
        return r.zscore(queue.keys.idle("default"), name) or 0.0

    master = start_master(spawn, tmp_path, workers=1)
    pids = wait_workers(master, 1)
    wait_until(lambda: r.zcard(queue.keys.idle("default")) == 1, message="an idle worker")
    name = r.zrange(queue.keys.idle("default"), 0, 0)[0]
    before = asked()
    for i in range(5):
        since = registered()
        assert queue.enqueue(tasks.add, i, 1).result(timeout=10) == i + 1
        wait_until(lambda: registered() > since, message="idle again")  # noqa: B023
    # each wait said idle and blocked in one round trip: redis-py's script objects would
    # have asked the server for the script first (SCRIPT EXISTS), on every wait; nor did
    # reading a job's result ask
    assert asked() == before

    r.script_flush()  # the server lost its scripts while the worker waits
    since = registered()
    assert queue.enqueue(tasks.add, 2, 2).result(timeout=10) == 4
    # its next wait found the idle script gone: it loaded it, and the wait after registers
    assert queue.enqueue(tasks.add, 3, 3).result(timeout=10) == 6
    wait_until(lambda: registered() > since, message="registered again")
    assert wait_workers(master, 1) == pids  # the same worker throughout
    r.script_flush()  # and reading a job: its parts are read again once the script is back
    assert queue.get_job(queue.enqueue(tasks.add, 4, 4).id) is not None


def test_a_job_handed_to_a_worker_that_dies_before_starting_it_runs_once_elsewhere(
        spawn: Spawn, queue: JobQueue, r: redis.Redis, tmp_path: Path) -> None:
    master = start_master(spawn, tmp_path, workers=1)
    (first,) = wait_workers(master, 1)
    wait_until(lambda: r.zcard(queue.keys.idle("default")) == 1, message="an idle worker")
    os.kill(first, signal.SIGSTOP)  # registered as idle, but it will never take the job
    k = key()
    job = queue.enqueue(tasks.record, k, "ran")
    assert queue.broker.active_holder(job.id) is not None  # handed to the frozen worker
    os.kill(first, signal.SIGKILL)
    assert job.result(timeout=15) == "ran"
    assert runs(r, k) == ["ran"]  # exactly once: it never started in the killed worker
    assert wait_workers(master, 1, without={first})


#: A script that starts its own pool, with an interval schedule of one of its own functions,
#: enqueues a job, says where the pool is, and waits to be ended.
POOL_SCRIPT = '''
import signal, sys, time
from jobq import JobQueue, task

# Ctrl-C raises KeyboardInterrupt, as in a terminal, even when whoever started this script
# runs it with SIGINT ignored (a background job of a non-interactive shell)
signal.signal(signal.SIGINT, signal.default_int_handler)
from jobq.scheduler import Scheduler
from jobq.worker import WorkerPool

def tick(key):
    import redis, os
    redis.Redis.from_url(os.environ["JOBQ_REDIS_URL"]).rpush("test:" + key, "tick")

queue = JobQueue()
pool = WorkerPool(queue, num_workers=2)
pool.start()
Scheduler(queue).schedule_interval("tick-" + sys.argv[1], tick, 0.2, args=(sys.argv[1],))
print(pool.pid, flush=True)
time.sleep(300)
'''


@pytest.mark.parametrize("ending", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
                         ids=["ctrl-c", "term", "kill-9"])
def test_a_worker_pool_dies_with_the_script_that_started_it(
        ending: signal.Signals, redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    k = key()
    (tmp_path / "pool_script.py").write_text(POOL_SCRIPT)
    env = subprocess_env(JOBQ_REDIS_URL=redis_url)
    env.pop("JOBQ_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "pool_script.py", k], cwd=tmp_path, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        master_pid = int(proc.stdout.readline())  # type: ignore[union-attr]
        family = process_tree(master_pid)
        assert len(family) == 4, [title(p) for p in family]  # master, 2 workers, scheduler
        wait_until(lambda: len(runs(r, k)) >= 2, message="the pool's schedule firing")

        proc.send_signal(ending)  # what Ctrl-C, a TERM or a kill -9 do to the script
        proc.wait(timeout=30)
        _, still = psutil.wait_procs(family, timeout=20)
        assert still == [], [title(p) for p in still]  # nothing left to fire the schedule
    finally:
        kill_processes(process_tree(proc.pid))


@pytest.mark.parametrize("breakage", ["syntax-error", "unknown-import", "bad-schedule",
                                      "no-imports", "new-prefix"])
def test_a_reload_that_would_break_the_pool_is_refused_and_the_pool_runs_on(
        breakage: str, queue: JobQueue, spawn: Spawn, tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    module = code / "hupcheck.py"
    module.write_text("def version():\n    return 1\n")
    log_file = tmp_path / "master.log"
    settings = {"imports": ["jobq_testtasks", "hupcheck"], "log_file": str(log_file)}
    env = subprocess_env(JOBQ_CONFIG=str(write_config(tmp_path, **settings)))
    env["PYTHONPATH"] = os.pathsep.join([str(code), env["PYTHONPATH"]])
    master = spawn("-w", "2", env=env, module="jobq.cli.master")
    old = wait_workers(master, 2)
    assert queue.enqueue("hupcheck:version").result(timeout=15) == 1

    if breakage == "syntax-error":  # the code the workers would import no longer compiles
        module.write_text("# broken\ndef version(:\n    return 2\n")
    elif breakage == "unknown-import":  # the config gained a module that does not exist
        write_config(tmp_path, **{**settings, "imports": [*settings["imports"], "nosuchmod"]})
    elif breakage == "bad-schedule":  # the config gained a [[schedule]] table that cannot work
        path = write_config(tmp_path, **settings)
        path.write_text(path.read_text() + '[[schedule]]\nname = "bad"\n'
                        'task = "hupcheck:version"\ncron = "not a cron"\n')
    elif breakage == "no-imports":  # the config lost its task modules: every job would fail
        write_config(tmp_path, **{**settings, "imports": []})
    else:  # new key names: the master's lease renewals and the scheduler would miss the jobs
        write_config(tmp_path, **{**settings, "prefix": "other"})
    os.kill(master.pid, signal.SIGHUP)

    wait_until(lambda: "reload refused" in log_file.read_text(), 20,
               message="the reload to be refused")
    [line] = [ln for ln in log_file.read_text().splitlines() if "reload refused" in ln]
    assert {"syntax-error": "SyntaxError", "unknown-import": "'nosuchmod'",
            "bad-schedule": "cron", "no-imports": "imports: no task module",
            "new-prefix": "prefix changed: that takes a restart"}[breakage] in line
    assert master.poll() is None
    assert sorted(wait_workers(master, 2)) == sorted(old)  # the very same workers run on
    assert queue.enqueue("hupcheck:version").result(timeout=15) == 1
    assert "gen=0" in title(psutil.Process(master.pid))


#: A script with its own pool of one worker, running a function of its own ``__main__``.
MAIN_JOBS_SCRIPT = '''
from jobq import JobQueue
from jobq.worker import WorkerPool

def square(x):
    return x * x

queue = JobQueue()
pool = WorkerPool(queue, num_workers=1)
pool.start()
jobs = [queue.enqueue(square, i) for i in range(40)]
print(sum(job.result(timeout=60) for job in jobs), flush=True)
pool.stop()
'''


def test_jobs_of_a_scripts_main_run_only_in_the_pool_it_started(
        redis_url: str, queue: JobQueue, spawn: Spawn, tmp_path: Path) -> None:
    # another master serves the same queue, its workers idle (producers hand jobs straight to
    # idle workers): it has no such function, and must never take those jobs
    other = start_master(spawn, tmp_path, workers=2)
    wait_workers(other, 2)
    (tmp_path / "main_jobs.py").write_text(MAIN_JOBS_SCRIPT)
    env = subprocess_env(JOBQ_REDIS_URL=redis_url)
    env.pop("JOBQ_CONFIG", None)
    proc = subprocess.run([sys.executable, "main_jobs.py"], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(sum(i * i for i in range(40)))
    stats = queue.get_stats()
    assert (stats["completed"], stats["failed"]) == (40, 0)
    assert queue.failed_count() == 0


def test_a_task_module_that_kills_its_worker_at_import_stops_the_master_with_exit_7(
        spawn: Spawn, tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "killself.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    log_file = tmp_path / "master.log"
    master = start_master(spawn, tmp_path, imports=("killself",), pythonpath=code,
                          log_file=str(log_file))
    exit_code, err = finish(master, timeout=60)
    assert exit_code == exitcodes.WORKER_BOOT, err
    assert err.count("\n") == 1 and "crashing at boot" in err and "signal 9" in err, err
    # the crash is logged once, then counted; not a line per fork
    crashes = [ln for ln in log_file.read_text().splitlines() if "killed by signal 9" in ln]
    assert 1 <= len(crashes) <= 3, crashes
