"""The producer's side: enqueue jobs, read them back, wait for them, cancel them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import redis

from .broker import Broker, NewJob
from .catalog import Catalog, TaskInfo
from .config import Config, load_config
from .connection import connect
from .exceptions import ReplicationTimeout, SerializationError, UnknownJob, UnknownTask
from .groups import CHUNK_TASK, GROUP_TTL, Group, GroupSummary, item_error, recent_groups
from .job import (
    MAX_TTL,
    QUEUE_NAME,
    BadJob,
    Job,
    JobStatus,
    check_enqueueable,
    new_id,
    task_name,
    unknown_options,
)
from .keys import Keys
from .limits import Limit, LimitError, from_config, tokens
from .schedule import to_epoch
from .serialization import dumps
from .server import resolve_url
from .wire import decode_json, encode_spec, read_record, requeued, route, spec_json

#: Job options ``enqueue`` accepts as keywords (anything else is an error).
JOB_OPTIONS = frozenset({"id", "priority", "max_retries", "timeout", "result_ttl", "queue",
                         "retry_on", "dont_retry_on", "delay", "at", "depends_on",
                         "on_parent_failure", "unique_key", "unique_ttl", "strict"})
# (limits are declared on the task, @task(concurrency=..., limits=[...]), not per call: a limit
# guards what the task uses, whoever enqueues it)
#: How long enqueue polls for the server's reply before it sleeps (see Scripts.run_many),
#: when it follows another enqueue by less than SPIN_WITHIN seconds. A reply to enqueues
#: that follow each other comes in tens of microseconds, and polling saves the sleep and the
#: wake-up. An enqueue that comes alone (a server and a worker both woken from sleep) is
#: answered after the polling would have ended, and the core it takes may be the one the
#: worker that starts the job needs: measured, polling then delayed the job's start
#: (enqueue-to-start p50 0.02-0.06 ms more, 3 paired runs of 600 jobs 10 ms apart).
REPLY_SPIN = 0.0002
SPIN_WITHIN = 0.001
#: How long a unique key holds by default (seconds).
UNIQUE_TTL = 3600
#: Functions a producer keeps what enqueue(func, *args) builds for (see JobQueue._plain).
PLAIN_CACHE = 256


_UNSEEN = object()


class _Plain(NamedTuple):
    """What ``enqueue(func, *args)`` builds for a function, but for the job's own fields."""
    shared: dict[str, Any]  #: the job's attributes but its id, arguments and time
    fresh: list[str]  #: those of them each job gets a copy of (lists, dicts)
    spec: dict[str, Any]  #: its spec (wire.spec_json), to fill with arguments and time
    route: str  #: where it waits
    main: bool  #: a task of __main__ (check_enqueueable on each call)

_STATUS_COUNTERS = ("pending", "processing", "scheduled", "deferred", "completed", "failed",
                    "cancelled", "retried", "enqueued", "requeued")


class JobQueue:
    """A named queue on a Redis/Valkey server: ``JobQueue("default", redis_url=None)``.

    With no URL, the URL comes from ``JOBQ_REDIS_URL``, then the config file
    (``JOBQ_CONFIG``), else jobq's embedded server is used (and started if needed).
    """

    def __init__(self, name: str = "default", redis_url: str | None = None, *,
                 config: Config | None = None, prefix: str | None = None,
                 connection: redis.Redis | None = None) -> None:
        if not isinstance(name, str) or not QUEUE_NAME.match(name):
            raise ValueError(f"queue name {name!r} must be 1-64 of A-Z a-z 0-9 _ . -")
        self.name = name
        self.config = config or load_config()
        if redis_url:
            self.config = self.config.replace(redis_url=redis_url)
        self.url = resolve_url(self.config)
        # on a Cluster, the namespace of this queue's group (jobq.config.Config.namespace)
        self.keys = Keys(prefix or self.config.namespace([name]))
        self.redis = connection or connect(self.url, lease_time=self.config.lease_time,
                                           route=self.keys.route)
        self.broker = Broker(self.redis, self.keys, self.config)
        self.catalog = Catalog(self.broker)
        #: limit names known to be defined on the server (a producer checks each once)
        self._limits_known: set[str] = set()
        #: function -> what enqueue(function, *args) builds (see _plain)
        self._plains: dict[Any, _Plain | None] = {}
        self._last_enqueue = 0.0  # time.monotonic() of the last enqueue (see REPLY_SPIN)

    def __repr__(self) -> str:
        return f"<JobQueue {self.name}>"

    # -- enqueue -----------------------------------------------------------------------------
    def enqueue(self, job: Job | Callable[..., Any] | str, *args: Any,
                kwargs: dict[str, Any] | None = None, wait_replicas: int | None = None,
                **options: Any) -> Job:
        """Enqueue a :class:`Job`, or ``func(*args, **kwargs)`` with job ``options``.

        Positional arguments go to the task, its keyword arguments in ``kwargs=``; every
        other keyword is a job option (priority, timeout, max_retries, result_ttl, queue, id).
        Returns the job. Enqueueing an id that is already queued does nothing (idempotent).
        ``depends_on`` takes jobs, ``queue.map`` groups (all their jobs), their ids, or a list
        of them: the job waits as deferred until they ended (see the README's workflows).

        The options a task declared (``@task(queue=..., timeout=...)``) apply unless given
        here; a task given by name gets those its workers announced (:mod:`jobq.catalog`),
        and its arguments are checked against its signature (TypeError). A name no running
        worker announced is enqueued as given, with the config's defaults, or with
        ``strict=True`` refused (:class:`~jobq.exceptions.UnknownTask`).

        ``wait_replicas=N`` (default: the config's ``wait_replicas``) returns only once N
        replicas have the job (WAIT), else raises
        :class:`~jobq.exceptions.ReplicationTimeout`: the job was enqueued on the primary,
        but a failover now could lose it (see the README's Sentinel section).
        """
        replicas = self._replicas(wait_replicas)
        if not (kwargs or options) and not isinstance(job, Job | str):
            plain = self._plain(job)
            if plain is not None:
                return self._enqueue_plain(plain, args, replicas)
        job = self._build(job, args, kwargs, options)
        new = self._new_job(job)
        try:
            if job.depends_on or job.depends_on_groups or getattr(job, "_unique", None):
                return self._enqueue_one(job, new, replicas)
            self.broker.enqueue(new, spin=self._spin(time.monotonic()), replicas=replicas)
        except ReplicationTimeout as exc:
            raise _unconfirmed(exc, [job]) from None
        return job

    def _plain(self, func: Any) -> _Plain | None:
        """What every ``enqueue(func, *args)`` of a function builds, but for the job's id,
        arguments and time: built (and checked) in full once per function and producer, so
        that the common call does none of it again. Its Python runs cold when jobs come one
        at a time (several times slower than back to back), and it is on the path of the
        job's latency. None for what this does not cover: a task that names limits (each
        enqueue makes sure they are defined), or a function that cannot key a dict."""
        try:
            plain = self._plains.get(func, _UNSEEN)
        except TypeError:
            return None
        if plain is _UNSEEN:
            job = self._build(func, (), None, {})
            plain = None
            if not job.limits:
                shared = {k: v for k, v in job.__dict__.items()
                          if k not in ("id", "args", "created")}
                plain = _Plain(shared, [k for k, v in shared.items() if type(v) in (list, dict)],
                               spec_json(job), route(job.queue or self.name, job.owner),
                               job.task.startswith("__main__:"))
            if len(self._plains) >= PLAIN_CACHE:  # tasks made anew per call (.options())
                self._plains.clear()
            self._plains[func] = plain
        return plain  # type: ignore[return-value]

    def _enqueue_plain(self, plain: _Plain, args: tuple[Any, ...], replicas: int) -> Job:
        """``enqueue(func, *args)`` from :meth:`_plain`: the same job, spec and checks as
        :meth:`_build` and :meth:`_new_job` make."""
        job = Job.__new__(Job)
        fields = job.__dict__
        fields.update(plain.shared)
        for name in plain.fresh:  # a job's own lists and dicts
            fields[name] = plain.shared[name].copy()
        job.id = new_id()
        job.args = args
        job.created = time.time()
        if plain.main:
            check_enqueueable(job.task)  # whether this process runs a pool may change
        spec = plain.spec.copy()
        spec["a"] = args
        spec["c"] = round(job.created, 3)
        try:
            text = dumps(spec)
        except (TypeError, ValueError):
            text = ""
        if not text or len(text) > self.config.max_payload_bytes // 4:
            # the exact size check, and the error that names what JSON cannot carry
            text = encode_spec(job, max_bytes=self.config.max_payload_bytes)
        try:
            self.broker.enqueue(tuple.__new__(NewJob, (job.id, plain.route, job.priority, 0,
                                                       text)),
                                spin=self._spin(time.monotonic()), replicas=replicas)
        except ReplicationTimeout as exc:
            raise _unconfirmed(exc, [job]) from None
        return job

    def _spin(self, now: float) -> float:
        """How long an enqueue sent at ``now`` (time.monotonic()) polls for its reply (see
        :data:`REPLY_SPIN`)."""
        after, self._last_enqueue = now - self._last_enqueue, now
        return REPLY_SPIN if after < SPIN_WITHIN else 0.0

    def _replicas(self, wait_replicas: int | None) -> int:
        """The replicas an enqueue waits for: the call's, else the config's."""
        if wait_replicas is None:
            return self.config.wait_replicas
        if isinstance(wait_replicas, bool) or not isinstance(wait_replicas, int) or \
                wait_replicas < 0:
            raise ValueError(f"wait_replicas must be an integer >= 0, got {wait_replicas!r}")
        return wait_replicas

    def _new_job(self, job: Job) -> NewJob:
        """The job as the broker enqueues it, its spec encoded (and checked: JSON, size); its
        queue is set by :meth:`_build`."""
        spec = encode_spec(job, max_bytes=self.config.max_payload_bytes)
        # tuple.__new__ is NewJob._make without its Python-level call: one per job enqueued
        where = route(job.queue or self.name, job.owner)
        return tuple.__new__(NewJob, (job.id, where, job.priority, _due_ms(job), spec))

    def _enqueue_one(self, job: Job, new: NewJob, replicas: int = 0) -> Job:
        """A job with parents or a unique key (enqueue_one.lua).

        A parent given by id is taken for a job's (the common case costs nothing more); an
        id the script finds no job of but that names a ``queue.map`` group is moved to the
        groups the job waits for, and the job is sent again (nothing was written): its spec
        says which parents are groups, for the scripts and for ``current_job()``."""
        ukey, uttl = getattr(job, "_unique", None) or ("", 0)
        while True:
            outcome, ref = self.broker.enqueue_one(new, unique_key=ukey, unique_ttl=uttl,
                                                   parents=job.depends_on,
                                                   groups=job.depends_on_groups,
                                                   replicas=replicas)
            if outcome != "unknown_parent" or not self.broker.group_exists(ref):
                break
            job.depends_on = [p for p in job.depends_on if p != ref]
            job.depends_on_groups = [*job.depends_on_groups, ref]
            new = self._new_job(job)
        kept = f"a group is kept {GROUP_TTL // 3600} h after its last job ended"
        if outcome == "unknown_parent":
            raise UnknownJob(f"depends_on: no job with id {ref!r}, nor a queue.map group "
                             "(never enqueued, or expired: a parent that finished must keep "
                             f"its record, result_ttl > 0; {kept})")
        if outcome == "unknown_group":
            raise UnknownJob(f"depends_on: no queue.map group with id {ref!r} (never created, "
                             f"or expired: {kept})")
        if outcome == "duplicate":
            raise ValueError(f"a job with id {job.id!r} already exists")
        if outcome == "exists":
            existing = self.get_job(ref)
            if existing is not None:
                return existing
            job.id = ref  # its record expired: the key still holds for the unique TTL
            return job
        job.status = {"deferred": JobStatus.DEFERRED, "cancelled": JobStatus.CANCELLED}.get(
            outcome, job.status)
        return job

    def enqueue_many(self, jobs: Iterable[Job] | Callable[..., Any] | str,
                     arg_list: Iterable[Sequence[Any]] | None = None, *,
                     wait_replicas: int | None = None, **options: Any) -> list[Job]:
        """Enqueue many jobs in few round trips.

        Either ``enqueue_many([job, ...])`` or ``enqueue_many(func, [args, ...], **options)``.
        Jobs are sent in chunks; each chunk is added atomically. ``wait_replicas``: as for
        :meth:`enqueue`, once for all of them.
        """
        replicas = self._replicas(wait_replicas)
        if arg_list is not None:
            built = self._build_many(jobs, arg_list, options)
        else:
            if options:
                raise TypeError("job options go on the Job objects when enqueueing Jobs")
            built = [self._build(j, (), None, {}) for j in jobs]  # type: ignore[union-attr]
        special = [j for j in built
                   if j.depends_on or j.depends_on_groups or getattr(j, "_unique", None)]
        if special:
            if len(special) != len(built):
                raise TypeError("enqueue_many: jobs with depends_on or unique_key go through "
                                "enqueue(), one by one")
            # one WAIT, after the last: replication is one ordered stream
            last = len(built) - 1
            try:
                return [self._enqueue_one(j, self._new_job(j), replicas if i == last else 0)
                        for i, j in enumerate(built)]
            except ReplicationTimeout as exc:
                raise _unconfirmed(exc, built) from None
        new = [self._new_job(job) for job in built]  # all checked before anything is sent
        try:
            self.broker.enqueue_many(new, replicas=replicas)
        except ReplicationTimeout as exc:
            raise _unconfirmed(exc, built) from None
        return built

    def _build_many(self, func: Any, arg_list: Iterable[Sequence[Any]],
                    options: dict[str, Any]) -> list[Job]:
        """Jobs of one function and options: the options are checked once, on a template,
        and each job is a copy of it with its own id and arguments (bulk enqueue is mostly
        this loop)."""
        template = self._build(func, (), None, options, check=False)
        shared = {k: v for k, v in template.__dict__.items() if k not in ("id", "args")}
        check = self._declared(func)[1]
        built = []
        for args in arg_list:
            if not isinstance(args, tuple | list):
                if isinstance(args, str | bytes) or not isinstance(args, Sequence):
                    raise TypeError(f"each item of arg_list must be a tuple or list of "
                                    f"arguments, got {type(args).__name__}")
            if check is not None:
                check(args, {})
            job = Job.__new__(Job)
            job.__dict__.update(shared)
            job.id = new_id()
            job.args = tuple(args)
            built.append(job)
        return built

    def _declared(self, func: Any) -> tuple[dict[str, Any], Any]:
        """The job options a task declared (with @task; announced in the catalog for a task
        given by name), and the check of its arguments (None: not checked here)."""
        if isinstance(func, str):
            if func == CHUNK_TASK:
                return {}, None
            info, check = self.catalog.lookup(func)
            return (info.job_options() if info is not None else {}), check
        return dict(getattr(func, "job_options", {})), None

    def _build(self, job: Any, args: Sequence[Any], kwargs: dict[str, Any] | None,
               options: dict[str, Any], *, check: bool = True) -> Job:
        if isinstance(job, Job):
            if args or kwargs or options:
                raise TypeError("pass arguments and options to Job(...), not to enqueue()")
        else:
            unknown = set(options) - JOB_OPTIONS
            if unknown:
                raise unknown_options(options, JOB_OPTIONS)
            declared, checker = self._declared(job)
            defaults = {"timeout": self.config.default_timeout,
                        "max_retries": self.config.default_max_retries, **declared}
            defaults.update(options)
            strict = defaults.pop("strict", False)
            delay, at = defaults.pop("delay", None), defaults.pop("at", None)
            depends_on = defaults.pop("depends_on", None)
            on_parent_failure = defaults.pop("on_parent_failure", "cancel")
            unique_key = defaults.pop("unique_key", None)
            unique_ttl = defaults.pop("unique_ttl", UNIQUE_TTL)
            job = Job(job, args, kwargs, **defaults)
            if strict and checker is None and isinstance(job.func, str):
                raise UnknownTask(f"unknown task {job.task!r}: no running worker announced it")
            if check and checker is not None:
                checker(job.args, job.kwargs)
            job.due_at = _due(delay, at)
            if self.config.cluster and depends_on is not None:
                self._parents_share_slot(depends_on)
            job.depends_on, job.depends_on_groups = _parent_ids(depends_on)
            if (job.depends_on or job.depends_on_groups) and (delay or at is not None):
                # a deferred job is queued when its last parent completes: a due time would
                # be dropped silently
                raise ValueError("depends_on cannot be combined with delay or at")
            if on_parent_failure not in ("cancel", "run"):
                raise ValueError(f"on_parent_failure must be 'cancel' or 'run', got "
                                 f"{on_parent_failure!r}")
            job.on_parent_failure = on_parent_failure
            if unique_key is not None:
                if not isinstance(unique_key, str) or not 0 < len(unique_key) <= 200:
                    raise ValueError(f"unique_key must be a string of 1-200 characters, got "
                                     f"{unique_key!r}")
                if isinstance(unique_ttl, bool) or not isinstance(unique_ttl, int) or \
                        not 0 < unique_ttl <= MAX_TTL:
                    raise ValueError(f"unique_ttl must be seconds in (0, {MAX_TTL}], got "
                                     f"{unique_ttl!r}")
            job._unique = (unique_key, unique_ttl) if unique_key is not None else None
        check_enqueueable(job.task)
        if job.limits:
            self._check_limits(job.limits, getattr(job.func, "own_limit", None))
        if job.queue is None:
            job.queue = self.name
        elif self.config.cluster and job.queue != self.name:
            self.check_same_slot(job.queue, "queue")
        job._queue = self
        return job

    def check_same_slot(self, queue: str, what: str) -> None:
        """On a Cluster, refuse what another queue group's namespace (another slot) holds."""
        if self.config.namespace([queue]) != self.keys.prefix:
            raise ValueError(
                f"{what}: queue {queue!r} is in queue group {self.config.group_of(queue)!r}, "
                f"another slot of the Cluster than this JobQueue's ({self.keys.prefix!r}): "
                f"use JobQueue({queue!r}), or put both queues in one [queue_groups] entry")

    def _parents_share_slot(self, parents: Any) -> None:
        """On a Cluster, a job depends only on jobs and groups of its own queue group (the
        bookkeeping is atomic, in one slot); a parent given by id is looked for there."""
        for p in parents if isinstance(parents, list | tuple) else [parents]:
            if isinstance(p, Job) and p.queue:
                self.check_same_slot(p.queue, "depends_on")
            elif isinstance(p, Group) and (theirs := p.queue.broker.keys.prefix) != \
                    self.keys.prefix:
                raise ValueError(f"depends_on: group {p.id} is in namespace {theirs!r}, another "
                                 f"slot of the Cluster than this JobQueue's "
                                 f"({self.keys.prefix!r})")

    def _check_limits(self, names: Sequence[str], own: Limit | None) -> None:
        """Make sure every limit a job names is defined on the server, once per name and
        producer: a task's own limit is written from its declaration, a named one from the
        config if it is there and the server lacks it; an unknown name is a
        :class:`~jobq.limits.LimitError` (a job that could never run is not enqueued)."""
        todo = [n for n in names if n not in self._limits_known]
        if not todo:
            return
        if own is not None and own.name in todo:
            self.broker.define_limits({own.name: own.to_json()})
            self._limits_known.add(own.name)
            todo.remove(own.name)
        configured = from_config(self.config.limits)
        missing = [n for n, ok in zip(todo, self.broker.limits_defined(todo), strict=True)
                   if not ok]
        from_file = {n: configured[n].to_json() for n in missing if n in configured}
        self.broker.define_limits(from_file, keep=True)
        unknown = [n for n in missing if n not in from_file]
        if unknown:
            raise LimitError(
                f"unknown limit {unknown[0]!r}: define it in the config ([limits.{unknown[0]}]), "
                f"with 'jobq limit set {unknown[0]} --concurrency N' or JobQueue.set_limit()")
        self._limits_known.update(todo)

    # -- limits --------------------------------------------------------------------------------
    def set_limit(self, name: str, *, concurrency: int | None = None, rate: str | None = None,
                  burst: int | None = None) -> Limit:
        """Define (or redefine) a named limit shared by the tasks that name it:
        ``set_limit("gpu", concurrency=2, rate="10/s")``. Every host sees it at its next
        claim. :class:`~jobq.limits.LimitError` for a bad value."""
        limit = Limit.build(name, concurrency=concurrency, rate=rate, burst=burst)
        self.broker.define_limits({name: limit.to_json()})
        return limit

    def delete_limit(self, name: str) -> bool:
        """Forget a limit: its jobs run unlimited from now on. True if it was defined."""
        self._limits_known.discard(name)
        return self.broker.delete_limit(name)

    def limit_use(self, in_use: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """Every limit defined or in use, by name: its definition (concurrency, rate, burst;
        None when it has none: it limits nothing), its jobs running now, the starts its rate
        allows now (tokens), and the queues where it holds jobs back. ``in_use``: the names
        of the limits with state on the server, when the caller has them (a SCAN finds them:
        the dashboard keeps its answer for a while); the definitions are read every time."""
        defined = self.limits()
        if in_use is None:
            in_use = self.broker.limit_names_in_use()
        names = sorted(set(defined) | set(in_use))
        now = time.time()
        out = {}
        for name, use in self.broker.limit_use(names).items():
            limit = defined.get(name)
            rate = limit.rate if limit else None
            out[name] = {
                "defined": limit is not None,
                "concurrency": limit.concurrency if limit else None,
                "rate": rate.text if rate else None,
                "burst": rate.burst if rate else None,
                "running": use.running,
                "tokens": tokens(rate, use.tat, now) if rate else None,
                "waiting": use.waiting,
            }
        return out

    def limits(self) -> dict[str, Limit]:
        """Every limit defined on the server, by name."""
        out = {}
        for name, raw in self.broker.limit_definitions().items():
            try:
                out[name] = Limit.from_json(name, raw)
            except (ValueError, KeyError, TypeError):
                continue  # not written by jobq: claim.lua ignores it too
        return out

    def map(self, func: Callable[..., Any] | str, iterable: Iterable[Any], *,
            chunksize: int | None = None, wait_replicas: int | None = None,
            **options: Any) -> Group:
        """Enqueue ``func(item)`` for each item (or a job per ``chunksize`` items), pipelined;
        returns a :class:`~jobq.groups.Group`: ``progress()``, ``wait(progress=True)``,
        ``results()`` in input order. Job options (priority, timeout, ...) apply to each;
        ``wait_replicas``: as for :meth:`enqueue`, once for the group and all its jobs."""
        replicas = self._replicas(wait_replicas)
        items = list(iterable)
        size = chunksize or 1
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"chunksize must be a positive integer, got {chunksize!r}")
        # refused, not dropped: a group's jobs go in one pipelined batch, which waits for no
        # parent, and one key cannot be unique to every item
        if options.get("depends_on"):
            raise TypeError("map does not take depends_on: call map from a job that depends "
                            "on those parents")
        if options.get("unique_key"):
            raise TypeError("map does not take unique_key: one key cannot be unique to every "
                            "item")
        name = task_name(func)
        group_id = new_id()
        options.setdefault("result_ttl", GROUP_TTL)
        declared, check = self._declared(func)
        chunk_options = {**declared, **options}  # a chunk runs as its items' task would
        jobs = []
        for index, start in enumerate(range(0, len(items), size)):
            chunk = items[start:start + size]
            for offset, item in enumerate(chunk if check is not None else ()):
                try:
                    check((item,), {})
                except TypeError as exc:
                    raise TypeError(f"item {start + offset}: {exc}") from None
            if size == 1:
                job = self._build(func, (chunk[0],), None, dict(options), check=False)
            else:
                job = self._build(CHUNK_TASK, (name, chunk, start), None, dict(chunk_options))
            job.group, job.group_index = group_id, index
            jobs.append(job)
        new = []  # refuse a bad item before anything is written
        for job in jobs:
            try:
                new.append(self._new_job(job))
            except SerializationError as exc:
                raise item_error(exc, items, size, job.group_index or 0) from None
        meta = {"total": len(jobs), "items": len(items), "chunk": size, "done": 0, "failed": 0,
                "task": name, "created": time.time(), "ttl": GROUP_TTL}
        if size > 1 and jobs:  # progress counts items: the last chunk may hold fewer
            meta.update(last=jobs[-1].id, lastn=len(items) - (len(jobs) - 1) * size,
                        done_items=0, failed_items=0)
        self.broker.create_group(group_id, meta, [j.id for j in jobs], GROUP_TTL)
        if new:
            try:
                self.broker.enqueue_many(new, replicas=replicas)
            except ReplicationTimeout as exc:
                raise _unconfirmed(exc, jobs) from None
        return Group(self, group_id)

    def task_info(self, name: str) -> TaskInfo | None:
        """Task ``name`` as the running workers announced it; None if none did."""
        return self.catalog.get(name)

    def tasks(self) -> dict[str, TaskInfo]:
        """Every task the running workers announced, by name (the catalog)."""
        return self.catalog.all()

    def group(self, group_id: str) -> Group:
        """The handle of a ``map`` group by id."""
        return Group(self, group_id)

    def recent_groups(self, limit: int = 50) -> list[GroupSummary]:
        """The ``limit`` groups ``map`` made last (on any queue of this namespace, within
        the group TTL) that still exist, newest first: id, task, when, progress."""
        return recent_groups(self.broker, limit)

    # -- read --------------------------------------------------------------------------------
    def get_job(self, job_id: str) -> Job | None:
        """The job with its current status, attempts, errors and result; None if unknown."""
        parts = self.broker.job_parts(job_id)
        job = read_job(job_id, parts.final, parts.spec, parts.state, parts.holder, parts.due_ms)
        if job is not None and parts.deferred and not parts.holder:
            job.status = JobStatus.DEFERRED
        if job is not None:
            job._queue = self
        return job

    def get_status(self, job_id: str) -> str | None:
        """The job's status as a string ("pending", "completed", ...), None if unknown."""
        job = self.get_job(job_id)
        return job.status.value if job else None

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block (on the server, not polling) until the job finishes; return it.

        Raises :class:`TimeoutError` after ``timeout`` seconds, :class:`UnknownJob` if no such
        job exists.
        """
        self.broker.watch(job_id)
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                job = self.get_job(job_id)
                if job is None:
                    raise UnknownJob(f"no job with id {job_id!r}")
                if job.status.finished:
                    return job
                left = 0.0 if deadline is None else deadline - time.monotonic()
                if deadline is not None and left <= 0:
                    raise TimeoutError(f"job {job_id} did not finish within {timeout} s")
                # BLPOP timeout 0 blocks for good; the token is pushed when the job finishes
                self.broker.wait_done(job_id, max(left, 0.01) if deadline else 0)
        finally:
            self.broker.unwatch(job_id)

    def wait_for_completion(self, job_id: str, timeout: float | None = None) -> bool:
        """True once the job finished (completed, failed or cancelled), False on timeout."""
        try:
            self.wait(job_id, timeout)
        except (TimeoutError, UnknownJob):
            return False
        return True

    def get_stats(self) -> dict[str, int]:
        """Counts for this queue: current pending/processing/scheduled/deferred, and totals
        since the queue was created for completed/failed/cancelled/retried/enqueued.
        ``retry`` is the same total of retries, under an older name."""
        raw = self.broker.stats(self.name)
        stats = {name: raw.get(name, 0) for name in _STATUS_COUNTERS}
        stats["retry"] = stats["retried"]
        return stats

    def size(self) -> int:
        """Jobs waiting in this queue (pending, including retries waiting for a worker)."""
        return self.broker.counter(self.name, "pending")

    __len__ = size

    # -- cancel ------------------------------------------------------------------------------
    def cancel(self, job_id: str, reason: str = "cancelled by request") -> bool:
        """Cancel a job: one that has not started never runs; a running one is interrupted
        (``jobq.JobCancelled`` is raised inside it). False if it finished or is unknown."""
        return self.cancel_job(job_id, reason) in ("cancelled", "interrupting")

    def cancel_job(self, job_id: str, reason: str = "cancelled by request") -> str:
        """Like :meth:`cancel`; returns "cancelled", "interrupting" (it was running: its
        master signals its worker), "finished" or "unknown"."""
        outcome = self.broker.cancel(job_id, reason)
        return "interrupting" if outcome == "running" else outcome

    # -- operations: dead letters, requeue, empty, suspend ------------------------------------
    def failed_jobs(self, limit: int = 100, offset: int = 0) -> list[Job]:
        """This queue's dead-letter queue, newest first."""
        ids = self.broker.dlq_ids(self.name, offset, offset + limit - 1, newest_first=True)
        jobs = [self.get_job(i) for i in ids]
        return [j for j in jobs if j is not None]

    def failed_count(self) -> int:
        return self.broker.dlq_count(self.name)

    def requeue(self, job_id: str) -> bool:
        """Put a failed (or cancelled, or completed) job back in its queue with fresh attempts;
        its history of errors is kept. False if it is unknown, live, or gone."""
        raw = self.broker.final_record(job_id)
        if raw is None:
            return False
        try:
            spec, record = read_record(raw)
        except BadJob:
            return False
        plan = requeued(spec, record)
        if plan is None:
            return False
        return self.broker.requeue(job_id, raw, *plan)

    def requeue_failed(self) -> int:
        """Requeue the jobs in this queue's dead-letter queue now, each once; returns how many.

        The queue is read once: a job that fails again while this runs comes back to the
        dead-letter queue and stays there (requeueing until it is empty would loop as long
        as the workers keep failing them)."""
        count = 0
        snapshot = self.broker.dlq_ids(self.name)
        for start in range(0, len(snapshot), 1000):
            ids = snapshot[start:start + 1000]
            moved = [i for i in ids if self.requeue(i)]
            gone = [i for i in ids if i not in set(moved) and self.broker.final_record(i) is None]
            self.broker.drop_from_dlq(self.name, gone)  # their records expired
            count += len(moved)
        return count

    def purge_failed(self) -> int:
        """Delete this queue's dead-letter queue and the records of its jobs."""
        return self.broker.purge_dlq(self.name)

    def empty(self) -> int:
        """Delete every pending job of this queue (running jobs finish); returns how many."""
        return self.broker.empty(self.name)

    def delete(self) -> dict[str, int]:
        """Delete this queue and everything in it: its pending, scheduled (delayed, retrying)
        and deferred jobs, its dead-letter queue, the records of its failed jobs and of its
        latest completed ones, its counters and its suspend flag; the queue is forgotten.

        Jobs that workers hold at that moment are taken from them and interrupted
        (``jobq.JobCancelled``); whatever they return is dropped, nothing of them is written
        back. Jobs of other queues that depend on a deleted job are settled as if it had
        failed (cancelled, or run with ``on_parent_failure="run"``). Returns how many jobs
        were deleted: ``running``, ``pending``, ``scheduled``, ``deferred``, ``dead``."""
        return self.broker.delete_queue(self.name)._asdict()

    def suspend(self) -> None:
        """Workers stop claiming from this queue (running jobs finish)."""
        self.broker.suspend(self.name)

    def resume(self) -> None:
        """Workers claim from this queue again (idle ones are woken at once)."""
        self.broker.resume(self.name)

    @property
    def suspended(self) -> bool:
        return self.broker.is_suspended(self.name)

    def exists(self) -> bool:
        """Whether this queue was ever used on this server."""
        return self.broker.queue_exists(self.name)

    def queues(self) -> list[str]:
        """Every queue name used on this server."""
        return self.broker.queue_names()


Queue = JobQueue


def _unconfirmed(exc: ReplicationTimeout, jobs: list[Job]) -> ReplicationTimeout:
    """The broker's ReplicationTimeout, for every job of the call, with the Jobs."""
    out = ReplicationTimeout([j.id for j in jobs], exc.wanted, exc.acknowledged, exc.timeout)
    out.jobs = jobs
    return out


def _parent_ids(parents: Any) -> tuple[list[str], list[str]]:
    """``depends_on`` (a Job, a ``queue.map`` Group, an id, or a list of them) as (job ids,
    group ids); an id is taken for a job's until enqueue finds it is a group's."""
    if parents is None:
        return [], []
    if isinstance(parents, Job | Group | str):
        parents = [parents]
    ids, groups = [], []
    for p in parents:
        if isinstance(p, Job):
            ids.append(p.id)
        elif isinstance(p, Group):
            groups.append(p.id)
        elif isinstance(p, str) and p:
            ids.append(p)
        else:
            raise TypeError(f"depends_on takes Jobs, queue.map groups or their ids, got {p!r}")
    return list(dict.fromkeys(ids)), list(dict.fromkeys(groups))


def _due(delay: float | None, at: Any) -> float | None:
    """The due time of ``delay=seconds`` or ``at=datetime`` (naive: local time)."""
    if delay is not None and at is not None:
        raise TypeError("give either delay or at, not both")
    if delay is not None:
        if isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0:
            raise ValueError(f"delay must be a number of seconds >= 0, got {delay!r}")
        return time.time() + delay if delay > 0 else None
    if at is not None:
        return to_epoch(at)
    return None


def _due_ms(job: Job) -> int:
    if job.due_at is None or job.due_at <= time.time():
        return 0
    job.status = JobStatus.SCHEDULED
    return int(job.due_at * 1000)


def read_job(job_id: str, final: str | None, spec: str | None, state: str | None,
             holder: str | None, due: float | None = None) -> Job | None:
    """Assemble a Job from what Redis holds about it (see :mod:`jobq.keys`)."""
    if final is not None and spec is None:  # a live spec wins: the id was enqueued again
        try:
            spec_data, record = read_record(final)
        except BadJob as exc:
            raise BadJob(f"final record of {job_id}: {exc}") from None
        job = _job_from(job_id, spec_data)
        job.apply_state(record)
        return job
    if spec is None:
        return None
    job = _job_from(job_id, decode_json(spec))
    if state is not None:
        job.apply_state(decode_json(state))
    if holder:
        job.status = JobStatus.PROCESSING
        job.worker = holder
        # a worker holds it: its attempt counts from when it is claimed (a job claimed
        # ahead of its turn counts as started a few milliseconds early)
        job.attempts += 1
        job.deliveries += 1
    elif due is not None:
        job.due_at = due / 1000
        if job.status is not JobStatus.RETRY:
            job.status = JobStatus.SCHEDULED
    return job


def _job_from(job_id: str, spec: Any) -> Job:
    try:
        return Job.from_spec(job_id, spec)
    except BadJob as exc:
        job = Job("jobq.invalid:job", (), id=job_id)
        job.error = str(exc)
        return job


_default_queues: dict[str | None, JobQueue] = {}


def default_queue(name: str | None = None) -> JobQueue:
    """A shared JobQueue for ``Task.delay``: configured from the environment."""
    queue = _default_queues.get(name)
    if queue is None:
        queue = _default_queues[name] = JobQueue(name or "default")
    return queue
