"""The operator's commands: enqueue, job, cancel, requeue, empty, suspend/resume, queue
delete, info, top, dlq and schedule. Every read command takes ``--json``."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from typing import Any

import click
from tabulate import tabulate

from .. import exitcodes
from .. import info as info_mod
from ..exceptions import JobFailed, ReplicationTimeout, UnknownJob, UnknownTask
from ..job import QUEUE_NAME
from ..queue import JobQueue
from ..schedule import ScheduleDef, ScheduleError, iso_time, local_time
from ..scheduler import Scheduler
from .app import CliError, State, jobq_command, main


def _queue(state: State, name: str | None = None, must_exist: bool = False) -> JobQueue:
    if name is not None and not QUEUE_NAME.match(name):
        raise CliError(f"bad queue name {name!r}: use 1-64 of A-Z a-z 0-9 _ . -", exitcodes.USAGE)
    queue = state.queue(name)
    if must_exist and not queue.exists():
        known = ", ".join(queue.queues()) or "none"
        raise CliError(f"unknown queue {queue.name!r} (known: {known})", exitcodes.NOT_FOUND)
    return queue


def _json_arg(text: str | None, what: str, kind: type) -> Any:
    if text is None:
        return kind()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{what} is not valid JSON: {exc.msg} at column {exc.colno}",
                       exitcodes.USAGE) from None
    if kind is list and not isinstance(value, list):
        value = [value]  # a single argument may be given bare: 42, "x"
    if kind is dict and not isinstance(value, dict):
        raise CliError(f"{what} must be a JSON object, got {type(value).__name__}",
                       exitcodes.USAGE)
    return value


def _when(ts: float | None) -> str:
    """A time for a person: local, with its zone; "-" for none."""
    return "-" if ts is None else local_time(ts)


def _confirm(yes: bool, what: str) -> None:
    """Ask before ``what`` (a deletion) on a terminal; without one, only ``--yes`` goes on:
    a script or a pipe never deletes by default (exit 2)."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise CliError(f"not going to {what} without confirmation: pass --yes (there is no "
                       "terminal to ask on)", exitcodes.USAGE)
    click.confirm(f"{what}?", abort=True)


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


# -- jobs -----------------------------------------------------------------------------------------
def _unknown_task(queue: JobQueue, task: str) -> CliError:
    """A task name no running worker announced: say what its module has, and the way out."""
    module = task.split(":")[0]
    near = [name for name in queue.tasks() if name.startswith(module + ":")]
    hint = f"; {module} has {', '.join(near[:8])}{' ...' if len(near) > 8 else ''}" if near else ""
    return CliError(f"unknown task {task!r}: no running worker announced it{hint} (jobq tasks "
                    "lists what they can run; --force goes ahead anyway)", exitcodes.NOT_FOUND)


def _positional(text: str | None) -> list[Any]:
    """ARGS_JSON: a JSON array (a single argument may be given bare), never an object."""
    args = _json_arg(text, "ARGS_JSON", list)
    if len(args) == 1 and isinstance(args[0], dict) and text and text.lstrip()[:1] == "{":
        raise CliError(f"ARGS_JSON is the positional arguments (a JSON array); give keyword "
                       f"arguments with --kwargs '{text.strip()}'", exitcodes.USAGE)
    return args


@jobq_command(main)
@click.argument("task")
@click.argument("args_json", required=False)
@click.option("--kwargs", "kwargs_json", metavar="JSON", help="The task's keyword arguments.")
@click.option("-q", "--queue", "queue_name", default=None,
              help="The queue (default: the task's declared queue, else 'default').")
@click.option("--priority", type=int, default=None, help="Lower runs first (default: the "
              "task's declared priority, else 0).")
@click.option("--delay", type=float, default=None, metavar="SECONDS",
              help="Run after this many seconds.")
@click.option("--at", "at_", default=None, metavar="TIME",
              help="Run at this ISO date-time (without a zone: local time).")
@click.option("--depends-on", "depends_on", multiple=True, metavar="ID",
              help="Run once this job, or every job of this queue.map group, finished "
                   "(repeat, or separate ids by commas).")
@click.option("--unique-key", default=None, metavar="KEY",
              help="Enqueue nothing while a job with this key is alive.")
@click.option("--timeout", type=float, default=None, help="The job's time limit (seconds).")
@click.option("--max-retries", type=int, default=None)
@click.option("--force", is_flag=True,
              help="Enqueue even if no running worker announced the task.")
@click.option("--wait", is_flag=True, help="Wait for the job and print its result.")
@click.option("--wait-timeout", type=float, default=None, metavar="SECONDS")
@click.option("--wait-replicas", type=click.IntRange(min=0), default=None, metavar="N",
              help="Return once N replicas have the job (WAIT), else exit 1 saying it was "
              "enqueued on the primary only (default: the config's wait_replicas).")
def enqueue(state: State, task: str, args_json: str | None, kwargs_json: str | None,
            queue_name: str | None, priority: int | None, delay: float | None,
            at_: str | None, depends_on: tuple[str, ...], unique_key: str | None,
            timeout: float | None, max_retries: int | None, force: bool, wait: bool,
            wait_timeout: float | None, wait_replicas: int | None) -> int:
    """Enqueue TASK (module:function) with ARGS_JSON (a JSON array); print the job id.

    The task's declared options (queue, timeout, retries, ...) apply unless given here, as
    its workers announced them (jobq tasks); its arguments are checked against its
    signature."""
    args = _positional(args_json)
    kwargs = _json_arg(kwargs_json, "--kwargs", dict)
    queue = _queue(state, queue_name)  # on a Cluster, its queue group's namespace
    given = {"queue": queue_name, "priority": priority, "delay": delay, "timeout": timeout,
             "max_retries": max_retries, "unique_key": unique_key,
             "at": _iso_time(at_, "--at") if at_ is not None else None,
             "depends_on": [i for ids in depends_on for i in ids.split(",") if i] or None}
    options: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    try:
        job = queue.enqueue(task, *args, kwargs=kwargs, strict=not force,
                            wait_replicas=wait_replicas, **options)
    except ReplicationTimeout as exc:
        click.echo(exc.job_ids[0])  # it was enqueued: its id, for whoever acts on it
        raise CliError(str(exc), exitcodes.FAILURE) from None
    except UnknownTask:
        raise _unknown_task(queue, task) from None
    except UnknownJob as exc:
        raise CliError(str(exc), exitcodes.NOT_FOUND) from None
    except (TypeError, ValueError) as exc:
        raise CliError(str(exc), exitcodes.USAGE) from None
    if not wait:
        click.echo(job.id)
        return exitcodes.OK
    try:
        click.echo(json.dumps(job.result(timeout=wait_timeout)))
    except JobFailed as exc:
        raise CliError(str(exc), exitcodes.FAILURE) from None
    except TimeoutError as exc:
        raise CliError(str(exc), exitcodes.FAILURE) from None
    return exitcodes.OK


def _iso_time(text: str, what: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"{what} {text!r} is not an ISO date-time (e.g. 2026-12-01T09:30 or "
                       "2026-12-01T09:30+01:00)", exitcodes.USAGE) from None


@jobq_command(main)
@click.option("--json", "as_json", is_flag=True)
def tasks(state: State, as_json: bool) -> int:
    """The task catalog: every task the running workers can run, with its declared options
    and signature, and the masters (or lone workers) that can run it."""
    found = _queue(state).tasks()
    if as_json:
        _echo_json([{"name": t.name, "queue": t.queue, "options": t.options,
                     "signature": t.signature, "doc": t.doc, "declared": t.declared,
                     "announced": t.announced, "hosts": list(t.hosts)}
                    for t in found.values()])
        return exitcodes.OK
    if not found:
        click.echo("no tasks: no running worker announced any (is a jobq-master up?)")
        return exitcodes.OK
    rows = [(t.name + t.signature if len(t.signature) <= 60 else t.name + "(...)",
             t.queue or "-", " ".join(f"{k}={v}" for k, v in t.options.items()) or "-",
             ", ".join(t.hosts)) for t in found.values()]
    click.echo(tabulate(rows, headers=("task", "queue", "options", "hosts")))
    return exitcodes.OK


@jobq_command(main, "job")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
def job_command(state: State, job_id: str, as_json: bool) -> int:
    """The whole record of a job: status, attempts with errors and tracebacks, result."""
    return _show_job(state, job_id, as_json)


def _show_job(state: State, job_id: str, as_json: bool) -> int:
    job = _queue(state).get_job(job_id)
    if job is None:
        raise CliError(f"unknown job {job_id!r} (never enqueued, or its record expired)",
                       exitcodes.NOT_FOUND)
    record = job.to_dict()
    if as_json:
        _echo_json(record)
        return exitcodes.OK
    rows = [(k, record[k]) for k in ("id", "task", "queue", "status", "priority", "args",
                                     "kwargs", "attempts", "retries", "max_retries",
                                     "deliveries", "requeues", "timeout", "worker",
                                     "created_at", "started_at", "completed_at", "due_at",
                                     "result", "error")]
    click.echo(tabulate(rows, tablefmt="plain"))
    for i, err in enumerate(job.errors, 1):
        click.echo(f"\n{_attempt(err, i, job.requeues)}: {err.get('type')}: {err.get('msg')}")
        if err.get("tb"):
            click.echo(err["tb"].rstrip())
    return exitcodes.OK


def _attempt(error: dict[str, Any], position: int, requeues: int) -> str:
    """Which attempt an error ended: "attempt 2", or "attempt 4 before requeue 1" for one of
    the history a requeue kept. (An error recorded before errors carried their attempt's
    number is numbered by its place in the list.)"""
    n, rq = error.get("n"), error.get("rq", 0)
    label = f"attempt {n if type(n) is int else position}"
    if type(rq) is int and rq < requeues:
        label += f" before requeue {rq + 1}"
    return label


@jobq_command(main)
@click.argument("job_ids", nargs=-1, required=True)
def cancel(state: State, job_ids: tuple[str, ...]) -> int:
    """Cancel jobs: one not started never runs; a running one is interrupted."""
    queue = _queue(state)
    code = exitcodes.OK
    for job_id in job_ids:
        outcome = queue.cancel_job(job_id)
        click.echo(f"{job_id}: {outcome}")
        if outcome == "unknown":
            code = exitcodes.NOT_FOUND
        elif outcome not in ("cancelled", "interrupting"):
            code = max(code, exitcodes.FAILURE)
    return code


@jobq_command(main)
@click.argument("job_ids", nargs=-1)
@click.option("--failed", is_flag=True, help="Requeue every job of the queue's dead-letter queue.")
@click.option("-q", "--queue", "queue_name", default=None,
              help="With --failed, the queue (default: the config's first queue).")
def requeue(state: State, job_ids: tuple[str, ...], failed: bool, queue_name: str | None) -> int:
    """Put failed jobs back in their queue, with fresh attempts (their history is kept)."""
    return _requeue(state, job_ids, failed, queue_name)


def _requeue(state: State, job_ids: tuple[str, ...], failed: bool,
             queue_name: str | None) -> int:
    if bool(job_ids) == failed:
        raise CliError("give job ids or --failed", exitcodes.USAGE)
    queue = _queue(state, queue_name, must_exist=failed)
    if failed:
        click.echo(f"requeued {queue.requeue_failed()} job(s) from {queue.name}")
        return exitcodes.OK
    code = exitcodes.OK
    for job_id in job_ids:
        if queue.requeue(job_id):
            click.echo(f"{job_id}: requeued")
        else:
            job = queue.get_job(job_id)
            why = "unknown job" if job is None else f"it is {job.status.value}"
            click.echo(f"{job_id}: not requeued ({why})", err=True)
            code = exitcodes.NOT_FOUND if job is None else exitcodes.FAILURE
    return code


@jobq_command(main)
@click.argument("queue_name")
def empty(state: State, queue_name: str) -> int:
    """Delete every pending job of QUEUE (running jobs finish)."""
    click.echo(f"deleted {_queue(state, queue_name, must_exist=True).empty()} pending job(s)")
    return exitcodes.OK


def _suspend_or_resume(state: State, names: tuple[str, ...], suspend: bool) -> int:
    queue = _queue(state)
    targets = list(names) or queue.queues()
    for name in targets:
        q = _queue(state, name, must_exist=True)
        q.suspend() if suspend else q.resume()
        click.echo(f"{name}: {'suspended' if suspend else 'resumed'}")
    return exitcodes.OK


@jobq_command(main)
@click.argument("queue_names", nargs=-1)
def suspend(state: State, queue_names: tuple[str, ...]) -> int:
    """Workers stop claiming from QUEUE (all queues if none given); running jobs finish."""
    return _suspend_or_resume(state, queue_names, True)


@jobq_command(main)
@click.argument("queue_names", nargs=-1)
def resume(state: State, queue_names: tuple[str, ...]) -> int:
    """Workers claim from QUEUE again (all queues if none given)."""
    return _suspend_or_resume(state, queue_names, False)


@main.group("queue")
def queue_group() -> None:
    """Queues as a whole."""


@jobq_command(queue_group, "delete")
@click.argument("queue_name")
@click.option("--yes", is_flag=True, help="Do not ask.")
def queue_delete(state: State, queue_name: str, yes: bool) -> int:
    """Delete QUEUE and everything in it: pending, scheduled, retrying, deferred and
    dead-letter jobs, their records, its counters and its suspend flag. Jobs running in it
    are interrupted and their outcome dropped; jobs of other queues that depend on its jobs
    are settled as if those had failed."""
    queue = _queue(state, queue_name, must_exist=True)
    stats = queue.get_stats()
    live = sum(stats[k] for k in ("pending", "processing", "scheduled", "deferred"))
    _confirm(yes, f"delete queue {queue_name}, its {live} live job(s) and the "
                  f"{queue.failed_count()} of its dead-letter queue")
    done = queue.delete()
    click.echo(f"deleted queue {queue_name}: {done['pending']} pending, {done['scheduled']} "
               f"scheduled, {done['deferred']} deferred, {done['running']} running "
               f"(interrupted) and {done['dead']} dead-letter job(s)")
    return exitcodes.OK


# -- info and top -----------------------------------------------------------------------------
def _info_text(data: dict[str, Any]) -> str:
    rows = [(q["queue"] + (" (suspended)" if q["suspended"] else ""), q["pending"],
             q["processing"], q["scheduled"], q["deferred"], q["completed"], q["failed"],
             q["dead"], q["completed_per_s"], q["failed_per_s"]) for q in data["queues"]]
    out = [tabulate(rows, headers=("queue", "pending", "running", "scheduled", "deferred",
                                   "completed", "failed", "dead", "done/s", "failed/s"))]
    for m in data["masters"]:
        state = "" if m["alive"] else (f"  (gone: no heartbeat for {m['seen_s_ago']:.0f} s; "
                                        f"what its workers held is given back)")
        out.append(f"\nmaster {m['id']} on {m['host']}: {len(m['workers'])}/{m['target']} "
                   f"workers, queues {','.join(m['queues'])}{state}")
        workers = [(w["slot"], w["pid"], w["state"], w.get("job") or "-",
                    f"{w['age_s']:.1f}s" if w.get("age_s") is not None else "-",
                    f"{w['memory_mb']:.0f} MB" if w.get("memory_mb") else "-", w["jobs_done"])
                   for w in m["workers"]]
        out.append(tabulate(workers, headers=("slot", "pid", "state", "job", "age", "memory",
                                              "done")))
    out.append(f"\nscheduler leader: {data['scheduler_leader'] or 'none'}")
    return "\n".join(out)


@jobq_command(main)
@click.option("--json", "as_json", is_flag=True)
def info(state: State, as_json: bool) -> int:
    """Queues (counts, rates over the last minute), masters and their workers, the leader."""
    queue = _queue(state)
    data = info_mod.collect(queue.broker)
    if as_json:
        _echo_json(data)
    else:
        click.echo(_info_text(data))
    return exitcodes.OK


@jobq_command(main)
@click.option("--interval", type=float, default=1.0, show_default=True)
@click.option("--iterations", type=int, default=0, help="Stop after N refreshes (0: never).")
@click.option("--json", "as_json", is_flag=True,
              help="Print what `jobq info --json` does, one document per line and refresh.")
def top(state: State, interval: float, iterations: int, as_json: bool) -> int:
    """`jobq info`, refreshed live until Ctrl-C."""
    queue = _queue(state)
    n = 0
    try:
        while True:
            data = info_mod.collect(queue.broker)
            if as_json:  # for a pipe: no screen to clear, one line per document
                click.echo(json.dumps(data, default=str))
            else:
                click.clear()
                click.echo(f"jobq top  {time.strftime('%H:%M:%S')}  (Ctrl-C to quit)\n")
                click.echo(_info_text(data))
            n += 1
            if iterations and n >= iterations:
                return exitcodes.OK
            time.sleep(interval)
    except KeyboardInterrupt:
        return exitcodes.OK


# -- the dead-letter queue --------------------------------------------------------------------
@main.group()
def dlq() -> None:
    """The dead-letter queue: jobs failed for good (retries exhausted, refused, poison)."""


@jobq_command(dlq, "list")
@click.option("-q", "--queue", "queue_name", default="default", show_default=True)
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def dlq_list(state: State, queue_name: str, limit: int, as_json: bool) -> int:
    """Failed jobs of a queue, newest first."""
    queue = _queue(state, queue_name, must_exist=True)
    jobs = queue.failed_jobs(limit=limit)
    if as_json:
        _echo_json([j.to_dict() for j in jobs])
        return exitcodes.OK
    rows = [(j.id, j.task, j.attempts, _when(j.completed_at.timestamp()
                                                 if j.completed_at else None),
             (j.error or "")[:60]) for j in jobs]
    click.echo(tabulate(rows, headers=("job", "task", "attempts", "failed at", "error")))
    click.echo(f"\n{queue.failed_count()} job(s) in the dead-letter queue of {queue_name}")
    return exitcodes.OK


@jobq_command(dlq, "show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
def dlq_show(state: State, job_id: str, as_json: bool) -> int:
    """The whole record of a failed job (same as `jobq job`)."""
    return _show_job(state, job_id, as_json)


@jobq_command(dlq, "requeue")
@click.argument("job_ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Requeue the whole dead-letter queue.")
@click.option("-q", "--queue", "queue_name", default="default", show_default=True)
def dlq_requeue(state: State, job_ids: tuple[str, ...], all_: bool, queue_name: str) -> int:
    """Requeue failed jobs with fresh attempts (their history is kept)."""
    return _requeue(state, job_ids, all_, queue_name)


@jobq_command(dlq, "purge")
@click.option("-q", "--queue", "queue_name", default="default", show_default=True)
@click.option("--yes", is_flag=True, help="Do not ask.")
def dlq_purge(state: State, queue_name: str, yes: bool) -> int:
    """Delete the dead-letter queue of a queue and its jobs' records."""
    queue = _queue(state, queue_name, must_exist=True)
    _confirm(yes, f"delete the {queue.failed_count()} failed job(s) of {queue_name}")
    click.echo(f"purged {queue.purge_failed()} job(s)")
    return exitcodes.OK


# -- schedules --------------------------------------------------------------------------------
@main.group()
def schedule() -> None:
    """Named schedules (once, interval, cron), stored in Redis for every host."""


#: The times of ``jobq schedule list --json`` (epoch seconds in the API).
_SCHEDULE_TIMES = ("at", "start", "next_run", "last_run", "last_skipped")


@jobq_command(schedule, "list")
@click.option("--json", "as_json", is_flag=True)
def schedule_list(state: State, as_json: bool) -> int:
    """Every schedule with its next and last run, its last job's status, and the leader."""
    sched = Scheduler(_queue(state))
    items = sched.list()
    if as_json:
        for s in items:  # times in ISO 8601, with the offset
            for name in _SCHEDULE_TIMES:
                if s.get(name) is not None:
                    s[name] = iso_time(s[name])
        _echo_json({"leader": sched.leader(), "schedules": items})
        return exitcodes.OK
    rows = []
    for s in items:
        when = {"cron": f"{s.get('cron')} ({s.get('timezone')})",
                "interval": f"every {s.get('interval')} s",
                "once": f"at {_when(s.get('at'))}"}[s["kind"]]
        last = _when(s["last_run"])
        if s["last_skipped"] is not None and (s["last_run"] or 0) < s["last_skipped"]:
            last += f"; skipped the run due {_when(s['last_skipped'])}"
        rows.append((s["name"], s["task"], when, s["queue"] or "(task's)",
                     "paused" if s["paused"] else _when(s["next_run"]),
                     last, s["last_status"] or "-"))
    click.echo(tabulate(rows, headers=("name", "task", "when", "queue", "next run",
                                       "last run", "last job")))
    click.echo(f"\nscheduler leader: {sched.leader() or 'none'}")
    return exitcodes.OK


@jobq_command(schedule, "add")
@click.argument("name")
@click.argument("task")
@click.argument("args_json", required=False)
@click.option("--kwargs", "kwargs_json", metavar="JSON")
@click.option("--cron", default=None, help="5 or 6 field cron expression.")
@click.option("--interval", type=float, default=None, help="Seconds between runs.")
@click.option("--at", "at_", default=None, help="ISO time of a one-off run.")
@click.option("--timezone", default="UTC", show_default=True)
@click.option("--misfire", type=click.Choice(["skip", "catch_up", "all"]), default="skip",
              show_default=True)
@click.option("-q", "--queue", "queue_name", default=None,
              help="The queue (default: the task's declared queue, else 'default').")
@click.option("--priority", type=int, default=None,
              help="Lower runs first (default: the task's declared priority, else 0).")
@click.option("--force", is_flag=True,
              help="Add it even if no running worker announced the task.")
def schedule_add(state: State, name: str, task: str, args_json: str | None,
                 kwargs_json: str | None, cron: str | None, interval: float | None,
                 at_: str | None, timezone: str, misfire: str, queue_name: str | None,
                 priority: int | None, force: bool) -> int:
    """Add (or replace) schedule NAME running TASK with ARGS_JSON.

    Each run gets the task's declared options as its workers announce them then, unless
    given here."""
    given = [x for x in (cron, interval, at_) if x is not None]
    if len(given) != 1:
        raise CliError("give exactly one of --cron, --interval, --at", exitcodes.USAGE)
    args = _positional(args_json)
    kwargs = _json_arg(kwargs_json, "--kwargs", dict)
    queue = _queue(state, queue_name)  # on a Cluster, its queue group's namespace
    fields: dict[str, Any] = {}
    if cron is not None:
        fields = {"kind": "cron", "cron": cron}
    elif interval is not None:
        fields = {"kind": "interval", "interval": interval, "start": time.time()}
    else:
        try:
            fields = {"kind": "once", "at": datetime.fromisoformat(str(at_)).timestamp()}
        except ValueError:
            raise CliError(f"--at {at_!r} is not an ISO date-time", exitcodes.USAGE) from None

    d = ScheduleDef(name=name, task=task, args=args, kwargs=kwargs, queue=queue_name,
                    priority=priority, timezone=timezone, misfire=misfire, source="cli", **fields)
    try:
        d.validate()
        check = queue.catalog.checker(task)
        if check is not None:
            check(args, kwargs)
        elif not force:
            raise _unknown_task(queue, task)
        Scheduler(queue).add(d)
    except (ScheduleError, TypeError) as exc:
        raise CliError(str(exc), exitcodes.USAGE) from None
    click.echo(f"schedule {name} added")
    return exitcodes.OK


#: What ``jobq schedule OP NAME`` prints once done: ``schedule NAME: <past tense of OP>``.
_PAST_TENSE = {"remove": "removed", "pause": "paused", "resume": "resumed"}


def _schedule_op(state: State, name: str, op: str) -> int:
    sched = Scheduler(_queue(state))
    if op == "run-now":
        try:
            job = sched.run_now(name)
        except KeyError:
            raise CliError(f"unknown schedule {name!r}", exitcodes.NOT_FOUND) from None
        click.echo(job.id)
        return exitcodes.OK
    done = {"remove": sched.cancel, "pause": sched.pause, "resume": sched.resume}[op](name)
    if not done:
        raise CliError(f"unknown schedule {name!r}", exitcodes.NOT_FOUND)
    click.echo(f"schedule {name}: {_PAST_TENSE[op]}")
    return exitcodes.OK


def _schedule_op_command(op: str) -> click.Command:
    """``jobq schedule OP NAME``: the four commands differ in their op only."""

    @jobq_command(schedule, op, help=f"{op.capitalize().replace('-', ' ')} schedule NAME.")
    @click.argument("name")
    def command(state: State, name: str) -> int:
        return _schedule_op(state, name, op)

    return command


for _op in ("remove", "pause", "resume", "run-now"):
    _schedule_op_command(_op)


@jobq_command(main, "wait")
@click.argument("group_id")
@click.option("--timeout", type=float, default=None, metavar="SECONDS")
@click.option("--json", "as_json", is_flag=True, help="Print the final progress as JSON.")
def wait_command(state: State, group_id: str, timeout: float | None, as_json: bool) -> int:
    """Wait for a queue.map group, with a progress bar; exit 1 if any of its jobs failed."""
    try:
        group = _queue(state).group(group_id)
    except UnknownJob:
        raise CliError(f"unknown group {group_id!r}", exitcodes.NOT_FOUND) from None
    finished = group.wait(timeout=timeout, progress=not as_json)
    p = group.progress()
    if as_json:
        _echo_json({"group": group_id, "done": p.done, "failed": p.failed,
                    "total": p.total, "finished": finished})
    else:
        click.echo(f"{p.done} done, {p.failed} failed, of {p.total}")
    if not finished:
        raise CliError(f"group {group_id} not finished within {timeout} s", exitcodes.FAILURE)
    return exitcodes.FAILURE if p.failed else exitcodes.OK
