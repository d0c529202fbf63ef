"""The names of jobq's Redis keys: one place, so Python and the Lua scripts agree.

Every key of a namespace starts with ``{prefix}``: the braces are a Redis Cluster hash tag,
so all keys of one namespace live in one slot and a Lua script may touch any of them.

=========================  ======  ==========================================================
key                        type    holds
=========================  ======  ==========================================================
{ns}:jobs                  hash    id -> job spec (JSON), while the job is not finished
{ns}:state                 hash    id -> mutable state (attempts, errors, status), if any
{ns}:q:<queue>             zset    the non-empty priority levels of a queue
{ns}:q:<queue>:<prio>      list    ids waiting at one priority level, FIFO
{ns}:wake:<queue>          list    wake tokens; idle workers block on them (BLPOP)
{ns}:idle:<queue>          zset    idle workers of a queue -> when they registered (ms)
{ns}:ilease:<worker>       string  an idle worker's lease length (ms), while its registration
                                   is fresh (3 s): the lease of a job handed to it
{ns}:hand:<worker>         list    jobs handed straight to an idle worker ("id\nqueue\nspec")
{ns}:queues                set     every queue name ever used
{ns}:suspended             set     queues that workers do not claim from
{ns}:held:<worker>         hash    id -> queue, the jobs one worker holds (lib.lua's holder()
                                   finds a job's worker among those with a lease)
{ns}:leases                zset    worker id -> lease deadline (ms)
{ns}:scheduled             zset    id -> due time (ms): delayed jobs and retries
{ns}:r:<id>                string  final record (completed/failed/cancelled), with a TTL
{ns}:dlq:<queue>           zset    id -> time failed: the dead-letter queue
{ns}:recent:<queue>        list    the latest finished ids, capped
{ns}:stats:<queue>         hash    counters: pending, processing, completed, failed, ...
{ns}:waiting               hash    id -> number of clients blocked on its completion
{ns}:cancel                hash    id -> reason, for running jobs asked to stop
{ns}:deps                  hash    deferred id -> how many parents it still waits for
{ns}:waits:<parent>        set     the deferred jobs waiting for a parent
{ns}:parents               set     ids that have deferred jobs waiting for them
{ns}:u:<key>               string  the job holding a unique key, with a TTL
{ns}:g:<group>             hash    a queue.map group: total, done, failed (jobs), items;
                                   with chunks: chunk, last, lastn, done_items, failed_items;
                                   while jobs wait for it: dep_ttl, dep_wake (enqueue_one.lua)
{ns}:gi:<group>            list    a group's job ids in input order
{ns}:gwaits:<group>        set     the deferred jobs waiting for a group (depends_on=group)
{ns}:gw:<group>            list    tokens for whoever waits on a group's progress
{ns}:groups                zset    group id -> when map() made it (s): the index of recent
                                   groups (jobq web); trimmed at each map() to a day
                                   (GROUP_TTL) and GROUP_INDEX_CAP entries, and by its reader
                                   of the ids whose {ns}:g:<group> expired
{ns}:done:<id>             list    a token per waiter, pushed when the job finishes
{ns}:masters               hash    master id -> its description and its workers' jobs (JSON)
{ns}:catalog               set     who announced tasks: master ids, lone workers' names
{ns}:tasks:<announcer>     hash    task name -> what it is (JSON), with a TTL (catalog.py)
{ns}:ctl:<master>          list    requests to one master (JSON, jobq.control), oldest first
{ns}:sched:defs            hash    schedule name -> definition (JSON)
{ns}:sched:due             zset    schedule name -> next due time (ms)
{ns}:sched:last            hash    schedule name -> last fire (JSON)
{ns}:sched:leader          string  the leading scheduler's token, with a TTL (the lease)
{ns}:sched:wake            list    tokens that wake the leading scheduler early
{ns}:stats:history         list    snapshots of every queue's counters, newest first (rates)
{ns}:reaper                hash    when a reaper last ran, and until when none may reap
{ns}:epoch                 string  a token written when the namespace is first used
{ns}:limits                hash    limit name -> definition (JSON, jobq.limits.Limit.to_json)
{ns}:lim:rate:<name>       hash    a rate's GCRA time "tat" (ms), and "keeper": when the idle
                                   worker keeping its time wakes (ms); see claim.lua
{ns}:lim:run:<name>        hash    id -> worker: the jobs holding one of its slots
{ns}:acked:<worker>        string  the token of the last batch of acknowledgements ack.lua
                                   settled for a worker, and the ids it found stale ("token\n
                                   id\n..."), an hour: the same batch sent again after a lost
                                   reply is answered as the first time, not settled twice
{ns}:limheld:<worker>      hash    id -> the concurrency limits whose slots the job it holds
                                   took ("\n"): what to free when it stops holding it
{ns}:lim:wait:<name>       set     queues (routes) where it holds jobs back (woken when it
                                   frees)
=========================  ======  ==========================================================

The Lua scripts (``jobq/lua``) build the same names from the key base they are given.
"""

from __future__ import annotations


class Keys:
    """Key names of one namespace."""

    __slots__ = ("prefix", "base", "jobs", "state", "queues", "suspended", "leases",
                 "scheduled", "waiting", "masters", "cancel", "deps", "sched_defs", "sched_due",
                 "sched_last", "sched_leader", "sched_wake", "history", "epoch", "catalog",
                 "limits", "groups")

    def __init__(self, prefix: str = "jobq") -> None:
        self.prefix = prefix
        self.base = "{" + prefix + "}"
        b = self.base
        self.jobs = f"{b}:jobs"
        self.state = f"{b}:state"
        self.queues = f"{b}:queues"
        self.suspended = f"{b}:suspended"
        self.leases = f"{b}:leases"
        self.scheduled = f"{b}:scheduled"
        self.waiting = f"{b}:waiting"
        self.masters = f"{b}:masters"
        self.cancel = f"{b}:cancel"
        self.deps = f"{b}:deps"
        self.sched_defs = f"{b}:sched:defs"
        self.sched_due = f"{b}:sched:due"
        self.sched_last = f"{b}:sched:last"
        self.sched_leader = f"{b}:sched:leader"
        self.sched_wake = f"{b}:sched:wake"
        self.history = f"{b}:stats:history"
        self.epoch = f"{b}:epoch"
        self.catalog = f"{b}:catalog"
        self.limits = f"{b}:limits"
        self.groups = f"{b}:groups"

    @property
    def route(self) -> str:
        """A key in the namespace's slot: where a Cluster client sends everything it does for
        this namespace (see :func:`jobq.connection.connect`)."""
        return self.base

    @property
    def pattern(self) -> str:
        """A SCAN pattern matching every key of the namespace (for tools, never the job
        path)."""
        return f"{self.base}:*"

    def tasks(self, announcer: str) -> str:
        return f"{self.base}:tasks:{announcer}"

    def levels(self, queue: str) -> str:
        return f"{self.base}:q:{queue}"

    def queue_of_levels(self, key: str) -> str:
        """The queue (or route) whose :meth:`levels` key ``key`` is."""
        return key[len(self.levels("")):]

    def level(self, queue: str, priority: int) -> str:
        return f"{self.base}:q:{queue}:{priority}"

    def wake(self, queue: str) -> str:
        return f"{self.base}:wake:{queue}"

    def idle(self, queue: str) -> str:
        return f"{self.base}:idle:{queue}"

    def hand(self, worker: str) -> str:
        return f"{self.base}:hand:{worker}"

    def held(self, worker: str) -> str:
        return f"{self.base}:held:{worker}"

    def result(self, job_id: str) -> str:
        return f"{self.base}:r:{job_id}"

    def dlq(self, queue: str) -> str:
        return f"{self.base}:dlq:{queue}"

    def recent(self, queue: str) -> str:
        return f"{self.base}:recent:{queue}"

    def stats(self, queue: str) -> str:
        return f"{self.base}:stats:{queue}"

    def done(self, job_id: str) -> str:
        return f"{self.base}:done:{job_id}"

    def waits(self, parent: str) -> str:
        return f"{self.base}:waits:{parent}"

    def group(self, group_id: str) -> str:
        return f"{self.base}:g:{group_id}"

    def group_ids(self, group_id: str) -> str:
        return f"{self.base}:gi:{group_id}"

    def group_wake(self, group_id: str) -> str:
        return f"{self.base}:gw:{group_id}"

    def group_waits(self, group_id: str) -> str:
        return f"{self.base}:gwaits:{group_id}"

    # the kind first, then the name: a name may hold ":" (a task's), and "X:run" must not be
    # X's running set
    def limit_state(self, name: str) -> str:
        return f"{self.base}:lim:rate:{name}"

    def limit_running(self, name: str) -> str:
        return f"{self.base}:lim:run:{name}"

    def limit_waiting(self, name: str) -> str:
        return f"{self.base}:lim:wait:{name}"

    def limits_held(self, worker: str) -> str:
        return f"{self.base}:limheld:{worker}"

    def control(self, master_id: str) -> str:
        return f"{self.base}:ctl:{master_id}"
