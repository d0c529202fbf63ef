"""Each shard's CPU per job with queue groups spread over 3 shards, against the same groups all
on one shard of the same cluster (not a test).

    .venv/bin/python tests/cluster_bench.py [--jobs 30000] [--runs 3]

A cluster of 3 primaries (no replicas: what is measured is the primaries' own work) made by
tests/clusterkit.py. Three queue groups (one queue each) are picked by name so that their
slots land either on 3 distinct shards ("spread") or all on one ("one shard"); the two
layouts alternate, ``--runs`` times each. A run: ``--jobs`` empty jobs
(``jobq_testtasks:noop``), a third per group, are enqueued, then 3 masters (one per group,
``-w 1``) drain them. Measured over the drain (first master started to the last job
completed): jobs/s, and each primary's CPU (``INFO cpu``, all threads) per job of the groups
it serves, and the cluster's CPU per job in all. Medians over the runs.

On the 2-core VM of the README, 3 primaries and 3 masters share 2 cores: spreading cannot
raise the throughput here. What it shows is that a shard's CPU per job does not grow when
the work is split, so each shard carries its share, and how much one shard core carries.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import jobq_testtasks as tasks  # noqa: E402
from clusterkit import Cluster  # noqa: E402

from jobq.config import Config  # noqa: E402
from jobq.keys import Keys  # noqa: E402
from jobq.queue import JobQueue  # noqa: E402


def cpu(node: object) -> float:
    info = node.client.info("cpu")  # type: ignore[attr-defined]
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def pick_groups(c: Cluster, spread: bool) -> dict[str, int]:
    """Three group names: on 3 distinct primaries, or all on the first one (name -> port)."""
    primaries = [p.port for p in c.primaries()]
    picked: dict[str, int] = {}
    for i in range(10_000):
        name = f"{'s' if spread else 'o'}{i}"
        port = c.primary_for_key(Keys(f"jobq:{name}").route).port
        if (spread and port not in picked.values()) or (not spread and port == primaries[0]):
            picked[name] = port
        if len(picked) == 3:
            return picked
    raise RuntimeError("no such names")


def run(c: Cluster, groups: dict[str, int], jobs: int, workdir: Path) -> dict[str, float]:
    config = Config(redis_url=c.url, result_ttl=300)
    queues = {g: JobQueue(g, config=config) for g in groups}
    for q in queues.values():
        for start in range(0, jobs // 3, 5000):
            q.enqueue_many(tasks.noop, [()] * min(5000, jobs // 3 - start))
    nodes = {p.port: p for p in c.primaries()}
    before = {port: cpu(n) for port, n in nodes.items()}
    env = dict(os.environ, JOBQ_REDIS_URL=c.url, PYTHONPATH=f"{HERE}:{HERE.parent}")
    t0 = time.monotonic()
    masters = [subprocess.Popen(
        [sys.executable, "-m", "jobq.cli.master", "-w", "1", "-q", g, "-I", "jobq_testtasks",
         "--log-file", str(workdir / f"{g}.log")], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT) for g in groups]
    try:
        while any(q.get_stats()["completed"] < jobs // 3 for q in queues.values()):
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        after = {port: cpu(n) for port, n in nodes.items()}
    finally:
        for m in masters:
            m.terminate()
        for m in masters:
            m.wait(30)
    for q in queues.values():
        q.delete()
    served = {port: sum(jobs // 3 for p in groups.values() if p == port) for port in nodes}
    out = {"jobs_per_s": 3 * (jobs // 3) / elapsed,
           "cluster_us_per_job": sum(after[p] - before[p] for p in nodes) * 1e6 / (
               3 * (jobs // 3))}
    busy = [p for p in nodes if served[p]]
    out["shard_us_per_job"] = statistics.median(
        (after[p] - before[p]) * 1e6 / served[p] for p in busy)
    out["idle_shard_cpu_s"] = sum(after[p] - before[p] for p in nodes if not served[p])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=30_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="jobq-cluster-bench-"))
    c = Cluster(workdir, 3, 0)
    c.start()
    try:
        layouts = {"spread over 3 shards": pick_groups(c, True),
                   "all on one shard": pick_groups(c, False)}
        results: dict[str, list[dict[str, float]]] = {name: [] for name in layouts}
        for i in range(args.runs):
            order = list(layouts) if i % 2 == 0 else list(reversed(layouts))
            for name in order:
                got = run(c, layouts[name], args.jobs, workdir)
                results[name].append(got)
                print(f"run {i + 1} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in got.items()),
                      flush=True)
        for name, runs in results.items():
            print(f"median, {name}: " + ", ".join(
                f"{k} {statistics.median(r[k] for r in runs):.2f}" for k in runs[0]))
    finally:
        c.kill_all()


if __name__ == "__main__":
    main()
