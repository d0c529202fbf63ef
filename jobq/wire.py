"""The job on the wire: the one module that knows how a job is written in Redis.

Four things travel, each encoded and decoded here and nowhere else (the Lua scripts read
the spec's ``q``/``p``/``r``/``opf``/``g``/``dep``/``dg`` fields and build two kinds of final
record; the defaults they need are handed to them from this module, see
:data:`LUA_CONSTANTS`):

=============  ==========================================================================
the spec       what to run, written once at enqueue (``{ns}:jobs``): a compact JSON object;
               options equal to their default are left out
the state      what became of the attempts of a job that ran before (``{ns}:state``)
a final record the spec (its JSON text, untouched) and the state, plus the result, when the
               job ended (``{ns}:r:<id>``)
an ack entry   what a worker tells ``ack.lua`` about a job it ran: seven fields
=============  ==========================================================================

Spec fields::

    t  task name ("module:function")      ttl  result_ttl (s), absent: the config's
    a  positional arguments (list)        ro   retry only on these exception names
    k  keyword arguments (object)         dro  never retry on these exception names
    q  queue ("default")                  dep  parent job ids (depends_on)
    p  priority (0; lower runs first)     dg   parent queue.map group ids (depends_on)
                                          opf  "run": run even if a parent failed
    r  max_retries (3)                    g    queue.map group id   gi  index in the group
    to timeout, seconds (300)             c    created, epoch seconds
    o  owner: the pool that alone can run it (a task of a script's ``__main__``), see route()
    lm the limits the job is subject to (names, see :mod:`jobq.limits`); always written
       first, so that claim.lua and enqueue.lua tell a limited job by the spec's first bytes
       (``{"lm":``) without decoding the spec of every job

State fields (all optional; a final record carries them too)::

    s   status ("retry", "pending", ... in a final record "completed", "failed", "cancelled")
    n   attempts that ended without completing (failed, timed out, cancelled, worker lost)
    d   times the job's holder vanished (its worker died, or its lease lapsed): poison at
        ``max_deliveries``
    u   of those, the times no one knew whether it had started (the lease lapsed)
    e   errors of the latest attempts (at most MAX_ERRORS_KEPT), each with its attempt
        number ``n`` and the requeues before it ``rq``
    rq  times the job was requeued (``jobq requeue``): the counts above start again, ``e``
        is kept
    due when a retry is due (epoch seconds)

What users read is computed from them, once, in :class:`Facts`: attempts are ``n``, plus
one for the attempt that completed; deliveries are the attempts plus ``u``.

A field present with the value ``null`` counts as absent, but for ``t`` and ``a``, which
jobq always writes. What the worker needs to run a job (``t a k p r to ttl g``) must be
well formed, or the job fails; the rest (``q ro dro dep dg opf gi c``) is informational to
the worker, and a malformed value there is dropped: the job runs and reads back as if it
were absent.

Data read from Redis is never trusted: :meth:`Spec.from_json` raises :class:`BadJob` saying
what is wrong, and the worker fails such a job into the dead-letter queue instead of
crashing on it.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple, NoReturn, Protocol

from . import serialization
from .exceptions import PayloadTooLarge, SerializationError

#: Defaults of a job's options; a spec omits options equal to these.
DEFAULT_QUEUE = "default"
DEFAULT_PRIORITY = 0
DEFAULT_MAX_RETRIES = 3
DEFAULT_TIMEOUT = 300.0
#: The longest time limit a job may have (30 days, in seconds).
MAX_TIMEOUT = 30 * 86400
#: The longest a job's record may be kept (100 years, in seconds): Redis refuses an expiry
#: much longer than that (SET EX 10**16 is an error, which would fail the whole settle script).
MAX_TTL = 100 * 365 * 86400
#: Errors kept in a job's state (the latest ones); the attempt count keeps counting.
MAX_ERRORS_KEPT = 10

#: What a queue name may look like (it becomes part of Redis key names).
QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}\Z")
#: "package.module:function" (``module:Class.method`` is not a task name).
#: ``\Z``, not ``$``: ``$`` also matches before a trailing newline.
TASK_NAME = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*\Z")

#: The first creation time a datetime cannot show (the year 10000), in epoch seconds.
_YEAR_10000 = 253402300800
#: Fields of a state that belong to the final record only: a state holding them is not
#: trusted with them (a second "res" would replace the job's result).
_RECORD_ONLY = ("spec", "res", "st", "fin")


class BadJob(ValueError):
    """Data found in Redis where a job should be is not a valid job; the text says why."""


# -- the spec -----------------------------------------------------------------------------------
class Spec(NamedTuple):
    """What to run and how: the immutable part of a job, as stored at enqueue (a tuple: the
    worker decodes one per job)."""

    task: str
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = MappingProxyType({})
    queue: str = DEFAULT_QUEUE
    priority: int = DEFAULT_PRIORITY
    max_retries: int = DEFAULT_MAX_RETRIES
    timeout: float = DEFAULT_TIMEOUT
    result_ttl: int | None = None
    retry_on: Sequence[str] = ()
    dont_retry_on: Sequence[str] = ()
    depends_on: Sequence[str] = ()
    on_parent_failure: str = "cancel"
    group: str | None = None
    group_index: int | None = None
    created: float | None = None
    owner: str | None = None
    depends_on_groups: Sequence[str] = ()
    limits: Sequence[str] = ()

    def to_json(self) -> dict[str, Any]:
        """The compact object stored in Redis: options equal to their defaults left out."""
        return spec_json(self)

    def encode(self, *, max_bytes: int) -> str:
        """The spec as JSON text (see :func:`encode_spec`)."""
        return encode_spec(self, max_bytes=max_bytes)

    @classmethod
    def decode(cls, raw: str | bytes | None) -> Spec:
        """Parse and check a spec read from Redis (:class:`BadJob` says what is wrong)."""
        if raw is None:
            raise BadJob("job data is missing (the id was queued without a job record)")
        return cls.from_json(decode_json(raw))

    @classmethod
    def from_json(cls, data: Any) -> Spec:
        """Check a decoded spec field by field (:class:`BadJob` says what is wrong).

        Only the fields present are looked at (most specs carry three or four): this runs
        once per job in the worker."""
        if not isinstance(data, dict):
            raise BadJob(f"job data is a JSON {type(data).__name__}, not an object")
        task = data.get("t")
        if not isinstance(task, str) or not task:  # its form is the allow-list's to judge
            raise BadJob(f"job data has no valid task name (field 't' is {task!r:.80})")
        args = data.get("a", [])
        if args == {}:  # Lua's cjson cannot tell an empty array from an empty object
            args = []
        if not isinstance(args, list):  # jobq always writes it: null is no list either
            raise BadJob(f"job args (field 'a') must be a list, got {type(args).__name__}")
        kwargs: Mapping[str, Any] = _NO_KWARGS
        queue, priority, retries = DEFAULT_QUEUE, DEFAULT_PRIORITY, DEFAULT_MAX_RETRIES
        timeout: float = DEFAULT_TIMEOUT
        ttl = group = index = created = owner = None
        retry_on: Sequence[str] = ()
        dont_retry_on: Sequence[str] = ()
        depends_on: Sequence[str] = ()
        depends_on_groups: Sequence[str] = ()
        on_parent_failure = "cancel"
        limits: Sequence[str] = ()
        for code, value in data.items():
            if value is None or code == "t" or code == "a":
                continue
            if code == "c":  # informational (see below); in every spec, so looked at first
                if _is_number(value) and 0 < value < _YEAR_10000:
                    created = float(value)
            # what the worker needs to run the job must be well formed ...
            elif code == "k":
                if not isinstance(value, dict):
                    raise BadJob(f"job kwargs (field 'k') must be an object, got "
                                 f"{type(value).__name__}")
                kwargs = value
            elif code == "to":
                if not _is_number(value) or not 0 < value <= MAX_TIMEOUT:
                    _bad_option("timeout", value,
                                f"must be a number of seconds in (0, {MAX_TIMEOUT}]")
                timeout = float(value)
            elif code == "p":
                if type(value) is not int:
                    _bad_option("priority", value, "must be an integer")
                priority = value
            elif code == "r":
                if type(value) is not int or value < 0:
                    _bad_option("max_retries", value, "must be an integer >= 0")
                retries = value
            elif code == "ttl":
                if type(value) is not int or not 0 <= value <= MAX_TTL:
                    _bad_option("result_ttl", value, f"must be seconds in [0, {MAX_TTL}]")
                ttl = value
            elif code == "g":
                if not valid_group(value):
                    raise BadJob(f"job group (field 'g') must be a short printable string, "
                                 f"got {value!r:.80}")
                group = value
            # ... the rest is informational to it: a malformed value is dropped, so the job
            # runs, and reads back, as if the field were absent
            elif code == "q":
                if isinstance(value, str) and QUEUE_NAME.match(value):
                    queue = value
            elif code == "gi":
                if type(value) is int:
                    index = value
            elif code == "ro":
                retry_on = _names(value)
            elif code == "dro":
                dont_retry_on = _names(value)
            elif code == "dep":
                depends_on = _ids(value)
            elif code == "dg":
                depends_on_groups = _ids(value)
            elif code == "opf":
                on_parent_failure = "run" if value == "run" else "cancel"
            elif code == "o":
                if isinstance(value, str) and value and ROUTE not in value:
                    owner = value
            elif code == "lm":
                limits = _names(value)
        # tuple.__new__: the NamedTuple without its Python-level __new__ (one per job run)
        return tuple.__new__(cls, (task, args, kwargs, queue, priority, retries, timeout, ttl,
                                   retry_on, dont_retry_on, depends_on, on_parent_failure,
                                   group, index, created, owner, depends_on_groups, limits))


#: A spec's keyword arguments when it has none (read-only: shared by every such spec).
_NO_KWARGS: Mapping[str, Any] = MappingProxyType({})


class SpecFields(Protocol):
    """What a spec is made of: :class:`Spec` has these, and so has :class:`jobq.Job`."""

    @property
    def task(self) -> str: ...
    @property
    def args(self) -> Sequence[Any]: ...
    @property
    def kwargs(self) -> Mapping[str, Any]: ...
    @property
    def queue(self) -> str | None: ...
    @property
    def priority(self) -> int: ...
    @property
    def max_retries(self) -> int: ...
    @property
    def timeout(self) -> float: ...
    @property
    def result_ttl(self) -> int | None: ...
    @property
    def retry_on(self) -> Sequence[str]: ...
    @property
    def dont_retry_on(self) -> Sequence[str]: ...
    @property
    def depends_on(self) -> Sequence[str]: ...
    @property
    def on_parent_failure(self) -> str: ...
    @property
    def group(self) -> str | None: ...
    @property
    def group_index(self) -> int | None: ...
    @property
    def created(self) -> float | None: ...
    @property
    def owner(self) -> str | None: ...
    @property
    def depends_on_groups(self) -> Sequence[str]: ...
    @property
    def limits(self) -> Sequence[str]: ...


def spec_json(s: SpecFields) -> dict[str, Any]:
    """The compact object stored in Redis for a spec: options equal to their defaults left
    out (the Lua scripts fill the defaults back in from :data:`LUA_CONSTANTS`)."""
    # "lm" first: see the module docstring (LIMITED_PREFIX)
    spec: dict[str, Any] = {"lm": list(s.limits)} if s.limits else {}
    spec["t"] = s.task
    spec["a"] = s.args
    if s.kwargs:
        spec["k"] = s.kwargs
    if s.queue and s.queue != DEFAULT_QUEUE:
        spec["q"] = s.queue
    if s.priority != DEFAULT_PRIORITY:
        spec["p"] = s.priority
    if s.max_retries != DEFAULT_MAX_RETRIES:
        spec["r"] = s.max_retries
    if s.timeout != DEFAULT_TIMEOUT:
        spec["to"] = s.timeout
    if s.result_ttl is not None:
        spec["ttl"] = s.result_ttl
    if s.retry_on:
        spec["ro"] = list(s.retry_on)
    if s.dont_retry_on:
        spec["dro"] = list(s.dont_retry_on)
    if s.depends_on:
        spec["dep"] = list(s.depends_on)
    if s.depends_on_groups:
        spec["dg"] = list(s.depends_on_groups)
    if s.depends_on or s.depends_on_groups:
        if s.on_parent_failure != "cancel":
            spec["opf"] = s.on_parent_failure
    if s.group is not None:
        spec["g"] = s.group
        spec["gi"] = s.group_index
    if s.created is not None:
        spec["c"] = round(s.created, 3)
    if s.owner:
        spec["o"] = s.owner
    return spec


#: Separates a queue from the owner in a route (no queue name holds it).
ROUTE = "~"


def route(queue: str, owner: str | None) -> str:
    """Where a job waits: its queue, or for a job only one pool can run (a task of the
    ``__main__`` of the script that started it) ``queue~owner``, which only that pool's workers
    claim from. The scripts count and dead-letter a route's jobs under its queue."""
    return f"{queue}{ROUTE}{owner}" if owner else queue


def encode_spec(s: SpecFields, *, max_bytes: int) -> str:
    """A spec as the JSON text stored in Redis. :class:`SerializationError` names the
    argument JSON cannot carry; :class:`PayloadTooLarge` refuses a job over ``max_bytes``."""
    spec = spec_json(s)
    try:
        text = serialization.dumps(spec)
    except (TypeError, ValueError):
        serialization.encode_args(s.args, s.kwargs)
        raise SerializationError(f"job options are not JSON-serializable: {spec!r:.200}") from None
    size = len(text.encode("utf-8")) if not text.isascii() else len(text)
    if size > max_bytes:
        raise PayloadTooLarge(
            f"job for {s.task!r} is {size} bytes encoded, over the limit of {max_bytes} "
            "(max_payload_bytes): pass a reference (a path, a key) instead of the data"
        )
    return text


def _bad_option(name: str, value: Any, rule: str) -> NoReturn:
    raise BadJob(f"job data has a bad option: {name} {value!r:.60} ({rule})")


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and value == value  # not NaN


def _names(value: Any) -> list[str]:
    """Exception names (``ro``, ``dro``): the strings of a list, nothing from anything else."""
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _ids(value: Any) -> list[str]:
    """Parent ids (``dep``, ``dg``): a list's items as strings, nothing from anything else."""
    return [str(v) for v in value] if isinstance(value, list) else []


def exception_name(t: type[BaseException]) -> str:
    """How a spec names an exception class: ``ValueError``, ``package.module.MyError``."""
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def valid_group(group: Any) -> bool:
    """A group id ack.lua can carry: short printable ASCII."""
    return type(group) is str and 0 < len(group) <= 128 and group.isascii() and \
        group.isprintable()


def decode_json(raw: str | bytes) -> Any:
    """JSON read from Redis; :class:`BadJob` if it is not valid UTF-8 JSON."""
    if isinstance(raw, str) and not raw.isascii():
        # a worker reads with errors="surrogateescape": a byte that is not UTF-8 arrives as a
        # lone surrogate (valid UTF-8 never decodes to one)
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = raw[exc.start]
            what = f"byte 0x{ord(bad) - 0xDC00:02x}" if "\udc80" <= bad <= "\udcff" else repr(bad)
            raise BadJob(f"job data is not valid UTF-8 ({what} at character {exc.start})"
                         ) from None
    try:
        return serialization.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadJob(f"job data is not valid JSON ({exc})") from None
    except RecursionError:
        raise BadJob("job data is nested too deeply to decode") from None


def undecodable(text: str) -> bool:
    """True if ``text`` was read from bytes that are not UTF-8 (they arrive as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# -- the state and the final record -------------------------------------------------------------
def read_state(raw: str | None) -> dict[str, Any]:
    """A job's state (``n`` attempts, ``d`` deliveries, ``e`` errors, ``s`` status, ...);
    ``{}`` when absent or unreadable.

    It goes into the job's final record, so what jobq would never have written there is
    dropped: the record's own fields, and counts or errors of the wrong type (readers count
    on them)."""
    if not raw:
        return {}
    try:
        state = decode_json(raw)
    except BadJob:
        return {}
    if not isinstance(state, dict):
        return {}
    for name in _RECORD_ONLY:
        state.pop(name, None)
    for name in ("n", "d", "u", "rq"):
        if name in state and type(state[name]) is not int:
            del state[name]
    if "e" in state:
        errors = state["e"]
        state["e"] = [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []
    return state


def error_entry(exc: BaseException, when: float, worker: str, attempt: int,
                requeues: int = 0) -> dict[str, Any]:
    """One failed attempt as kept in a job's state: type, message, traceback, time, worker,
    the attempt's number and the requeues before it."""
    entry = {"type": type(exc).__name__, "msg": str(exc)[:2000],
             "tb": "".join(traceback.format_exception(exc))[-8000:], "t": round(when, 3),
             "w": worker, "n": attempt}
    if requeues:
        entry["rq"] = requeues
    return entry


def add_error(errors: Any, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """``errors`` (as read from a state) with ``entry`` added, the oldest dropped."""
    kept = errors if isinstance(errors, list) else []
    return [*kept, entry][-MAX_ERRORS_KEPT:]


def final_record(spec_raw: str | None, state: Mapping[str, Any],
                 result_json: str | None = None) -> str:
    """A job's final record: its spec's JSON text untouched (or null), its result's JSON
    text when it completed with a result kept, then the state's fields.

    ``lib.lua``'s ``final_record`` builds the same shape for jobs ended on the server
    (cancelled before they ran, or because a parent failed)."""
    head = f'{{"spec":{spec_raw or "null"},'
    if result_json is not None:
        head += f'"res":{result_json},'
    body = serialization.dumps(dict(state))
    return head + body[1:] if body != "{}" else head[:-1] + "}"


def completed_record(spec_raw: str, result_json: str, started: float, finished: float,
                     worker_json: str) -> str:
    """The final record of a job that completed at its first attempt: the common case, built
    without a dict and a second encode (the same shape as :func:`final_record`)."""
    return (f'{{"spec":{spec_raw},"res":{result_json},"s":"completed","st":{started:.6f},'
            f'"fin":{finished:.6f},"w":{worker_json}}}')


@dataclass(frozen=True)
class Facts:
    """What a state or a final record says of a job (the rest is in its spec)."""

    status: str | None = None
    #: attempts that ended (see the module docstring): the failed ones, and the one that
    #: completed
    attempts: int = 0
    #: times a worker took the job: its attempts, and the lapsed leases of holders that may
    #: not have started it
    deliveries: int = 0
    #: times it was requeued (its counts started again, its errors were kept)
    requeues: int = 0
    #: one entry per failed attempt, the latest last: type, msg, tb, t (when), w (worker),
    #: n (the attempt's number), rq (the requeues before it, when any)
    errors: list[dict[str, Any]] = field(default_factory=list)
    #: the error that ended the job, in a final record (same keys)
    final_error: dict[str, Any] = field(default_factory=dict)
    started: float | None = None
    finished: float | None = None
    result: Any = None
    worker: str | None = None

    @classmethod
    def from_json(cls, state: Mapping[str, Any]) -> Facts:
        errors = state.get("e")
        err = state.get("err")
        status = state.get("s") or None
        # every attempt before the one that completed ended without completing (a completed
        # job's record written at its first attempt has no "n" at all)
        attempts = _count(state, "n") + (status == "completed")
        return cls(status, attempts, attempts + _count(state, "u"), _count(state, "rq"),
                   [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else [],
                   dict(err) if isinstance(err, dict) else {}, state.get("st"), state.get("fin"),
                   state.get("res"), state.get("w"))


def _count(state: Mapping[str, Any], name: str) -> int:
    value = state.get(name)
    return value if type(value) is int and value > 0 else 0


def requeued(spec: Any, record: Mapping[str, Any]) -> tuple[str, int, str, str] | None:
    """How a finished job goes back to its queue: (queue, priority, spec JSON, new state
    JSON: fresh attempts, its errors kept); None if it must not (a cancelled job's id may
    still sit in its queue list as a tombstone: requeueing that id would run it twice)."""
    if not isinstance(spec, dict) or record.get("s") == "cancelled":
        return None
    facts = Facts.from_json(record)
    errors = facts.errors
    if facts.final_error and facts.final_error not in errors:
        errors = [*errors, facts.final_error]
    state = {"s": "pending", "e": errors[-MAX_ERRORS_KEPT:], "rq": facts.requeues + 1}
    queue = spec.get("q")
    priority = spec.get("p")
    owner = spec.get("o")
    queue = queue if isinstance(queue, str) and QUEUE_NAME.match(queue) else DEFAULT_QUEUE
    return (route(queue, owner if isinstance(owner, str) else None),
            priority if type(priority) is int else DEFAULT_PRIORITY,
            serialization.dumps(spec), serialization.dumps(state))


def read_record(raw: str) -> tuple[Any, dict[str, Any]]:
    """A final record as (its spec, decoded, or None; the rest: state and result)."""
    record = decode_json(raw)
    if not isinstance(record, dict):
        raise BadJob("a final record is not a JSON object")
    spec = record.pop("spec", None)
    return spec, record


#: A task's return value as JSON; a SerializationError when JSON cannot carry it.
encode_result = serialization.encode_result


# -- the ack entry ------------------------------------------------------------------------------
class AckEntry(NamedTuple):
    """What a worker tells ``ack.lua`` about one job it ran (see that script's header).

    ``kind`` is "done", "fail", "cancel" (the payload is the final record, kept ``ttl``
    seconds), "retry" or "later" (the payload is the job's new state; for "later", ``ttl``
    holds the due time in ms). ``group`` is "" for a job outside a ``queue.map`` group."""

    kind: str
    job_id: str | bytes
    queue: str
    priority: int
    ttl: int
    payload: str
    group: str

    @classmethod
    def from_fields(cls, fields: Sequence[str]) -> AckEntry | None:
        """An entry read back from a worker's journal; None if it is not one."""
        if len(fields) != ACK_FIELDS or fields[0] not in ACK_KINDS:
            return None
        kind, job_id, queue, priority, ttl, payload, group = fields
        try:
            return cls(kind, job_id, queue, int(priority), int(ttl), payload, group)
        except ValueError:
            return None


#: Fields of an ack entry: ``ack.lua`` reads its ARGV in groups of this many.
ACK_FIELDS = len(AckEntry._fields)
ACK_KINDS = ("done", "fail", "cancel", "retry", "later")

#: How a limited job's spec begins (its "lm" field first): the scripts test this prefix.
LIMITED_PREFIX = '{"lm":'

#: Constants the Lua scripts share with this module (see :mod:`jobq.scripts`).
LUA_CONSTANTS: dict[str, str | int] = {
    "DEFAULT_QUEUE": DEFAULT_QUEUE,
    "DEFAULT_PRIORITY": DEFAULT_PRIORITY,
    "DEFAULT_MAX_RETRIES": DEFAULT_MAX_RETRIES,
    "MAX_ERRORS_KEPT": MAX_ERRORS_KEPT,
    "ACK_FIELDS": ACK_FIELDS,
    "LIMITED_PREFIX": LIMITED_PREFIX,
}
