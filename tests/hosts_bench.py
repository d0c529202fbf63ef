"""Throughput with 1, 2 and 3 hosts on one server, and the server's CPU per job (not a test).

    sudo .venv/bin/python tests/hosts_bench.py [--jobs 20000] [--runs 3] [--hosts 1,2,3]

Each host is a network namespace (tests/netns.py) running ``jobq-master -w 2`` under its own
name, reaching one valkey-server (AOF on, ``appendfsync everysec``, as the embedded server
runs) over its own veth link. A run: the queue is suspended, ``--jobs`` empty jobs
(``jobq_testtasks:noop``) are enqueued from the root namespace, the queue is resumed, and the
hosts drain it. Measured: the drain's jobs/s (resume to the last completed), and the server's
CPU (``INFO cpu``: all threads, and its main thread, which runs every command and script) per
job, for the enqueue and for the drain (claim, ack, records), and before that what the
hosts cost the server while idle (``--idle`` seconds: lease renewals, heartbeats, control
polls, the standby schedulers). Medians over ``--runs``.

On a machine with fewer cores than processes (the 2-core VM of the README: the server, and
per host a master, a scheduler and 2 workers), more hosts cannot run more jobs: they share
the same cores. What this shows there is the cost of more hosts (more connections, smaller
batches per worker), not their gain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import redis

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import netns  # noqa: E402
from conftest import Valkey, subprocess_env, wait_until  # noqa: E402

from jobq.job import Job  # noqa: E402
from jobq.queue import JobQueue  # noqa: E402


def cpu(r: redis.Redis) -> tuple[float, float]:
    """The server's CPU seconds so far: (all threads, main thread)."""
    info = r.info("cpu")
    return (info["used_cpu_user"] + info["used_cpu_sys"],
            info["used_cpu_user_main_thread"] + info["used_cpu_sys_main_thread"])


def start_host(host: netns.Host, url: str, workdir: Path, workers: int) -> subprocess.Popen[bytes]:
    config = workdir / f"{host.name}.toml"
    config.write_text(f'lease_time = 5.0\nlog_file = "{workdir / host.name}.log"\n'
                      f'log_level = "warning"\n')
    argv = [sys.executable, "-m", "jobq.cli.master", "-w", str(workers), "-I", "jobq_testtasks",
            "--config", str(config), "--hostname", host.name]
    return subprocess.Popen(host.command(argv), env=subprocess_env(JOBQ_REDIS_URL=url),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def ready(proc: subprocess.Popen[bytes], workers: int) -> bool:
    try:
        kids = [" ".join(p.cmdline()) for p in psutil.Process(proc.pid).children()]
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    booted = [t for t in kids if "jobq worker" in t and "booting" not in t]
    return len(booted) == workers and any("jobq scheduler" in t for t in kids)


def one_run(n_hosts: int, jobs: int, workers: int, idle: float) -> dict[str, Any]:
    net = netns.Network().open()
    workdir = Path(tempfile.mkdtemp(prefix="jobq-hosts-bench-"))
    server = Valkey(workdir / "server", None, "--bind", net.server_address, "127.0.0.1",
                    "--protected-mode", "no", "--appendonly", "yes",
                    "--appendfsync", "everysec")
    try:
        server.start()
        url = f"redis://{net.server_address}:{server.port}"
        r = redis.Redis.from_url(url, decode_responses=True)
        q = JobQueue("default", redis_url=url)
        masters = [start_host(net.add_host(f"host-{chr(97 + i)}"), url, workdir, workers)
                   for i in range(n_hosts)]
        for proc in masters:
            wait_until(lambda p=proc: ready(p, workers), 60, interval=0.05,  # type: ignore
                       message="a master ready")
        idle_cpu = cpu(r)
        time.sleep(idle)  # what idle hosts cost the server: renewals, heartbeats, schedulers
        idle_cpu_s = (cpu(r)[1] - idle_cpu[1]) / idle if idle else 0.0
        q.suspend()
        before = cpu(r)
        for start in range(0, jobs, 1000):
            q.enqueue_many([Job("jobq_testtasks:noop") for _ in range(min(1000, jobs - start))])
        enqueued = cpu(r)
        t0 = time.perf_counter()
        q.resume()
        wait_until(lambda: q.get_stats()["completed"] >= jobs, 600, interval=0.01,
                   message="the jobs to complete")
        elapsed = time.perf_counter() - t0
        after = cpu(r)
        return {
            "hosts": n_hosts, "workers": n_hosts * workers, "jobs": jobs,
            "jobs_per_s": jobs / elapsed,
            "enqueue_us_per_job": (enqueued[0] - before[0]) / jobs * 1e6,
            "drain_us_per_job": (after[0] - enqueued[0]) / jobs * 1e6,
            "server_us_per_job": (after[0] - before[0]) / jobs * 1e6,
            "main_thread_us_per_job": (after[1] - before[1]) / jobs * 1e6,
            "server_cpu_share_of_drain": (after[0] - enqueued[0]) / elapsed,
            "idle_server_cpu_ms_per_s_per_host": idle_cpu_s * 1000 / n_hosts,
        }
    finally:
        net.close()  # kills every host's processes
        server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hosts", default="1,2,3")
    parser.add_argument("--workers", type=int, default=2, help="workers per host")
    parser.add_argument("--idle", type=float, default=5.0,
                        help="seconds the hosts stay idle first, to measure what they cost")
    args = parser.parse_args()
    reason = netns.unavailable()
    if reason:
        sys.exit(f"hosts_bench: {reason}")
    results = []
    for n in (int(x) for x in args.hosts.split(",")):
        runs = []
        for _ in range(args.runs):
            runs.append(one_run(n, args.jobs, args.workers, args.idle))
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v
                              for k, v in runs[-1].items()}), flush=True)
        median = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        median["carry_jobs_per_s_per_server_core"] = 1e6 / median["main_thread_us_per_job"]
        results.append(median)
    print("\nmedians:")
    for m in results:
        print(f"{int(m['hosts'])} host(s) x {args.workers} workers: {m['jobs_per_s']:,.0f} jobs/s; "
              f"server CPU {m['server_us_per_job']:.1f} us/job (enqueue "
              f"{m['enqueue_us_per_job']:.1f} + drain {m['drain_us_per_job']:.1f}; main thread "
              f"{m['main_thread_us_per_job']:.1f}) -> one server core carries "
              f"~{m['carry_jobs_per_s_per_server_core']:,.0f} jobs/s; server busy "
              f"{m['server_cpu_share_of_drain']:.0%} of the drain; an idle host costs it "
              f"{m['idle_server_cpu_ms_per_s_per_host']:.2f} ms/s")


if __name__ == "__main__":
    main()
