"""jobq's configuration: one frozen dataclass, loaded from TOML, the environment and overrides.

Precedence, highest first: explicit overrides (the command line) > ``JOBQ_REDIS_URL`` (for
``redis_url`` only) > the TOML file > the defaults. Every value is checked against one table,
:data:`_RULES`, the file's values too where the environment or an override replaces them; any
problem raises :class:`ConfigError` with a one-line message that names the source, the key and
the problem.

The keys the command lines take too (``--workers``, ``--log-level``, ...) are spelled and explained
once, in :data:`FLAGS`; their type and choices are those of their rule.
"""

from __future__ import annotations

import dataclasses
import difflib
import grp
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import cluster, sentinel
from .limits import LimitError, from_config
from .urls import redact

#: Environment variable naming the config file when ``load_config`` gets no path.
CONFIG_ENV = "JOBQ_CONFIG"
#: Environment variable overriding ``redis_url`` from the file.
REDIS_URL_ENV = "JOBQ_REDIS_URL"
#: URL schemes :func:`jobq.connection.connect` understands.
URL_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys", *sentinel.SCHEMES,
               *cluster.SCHEMES)
#: A queue name: it becomes part of Redis key names, so no ':', braces or spaces.
QUEUE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: A host name label (``hostname``): it becomes part of master ids and worker names
#: (``host.pid...``, split on dots), so letters, digits, '_' and '-' only.
HOSTNAME_RE = re.compile(r"[A-Za-z0-9_-]{1,63}")
#: A key prefix: like a queue name, plus ':' for namespaces such as ``app:jobq``.
PREFIX_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
#: Allowed ``log_level`` values.
LOG_LEVELS = ("debug", "info", "warning", "error")
#: Allowed ``log_format`` values.
LOG_FORMATS = ("text", "json")
#: The TOML key of a field whose name differs in the file: ``[[schedule]]`` tables.
TOML_NAMES = {"schedules": "schedule"}


class ConfigError(ValueError):
    """A configuration problem; the message is one line: ``source: key: problem``."""


@dataclass(frozen=True)
class Config:
    """The validated settings of a jobq deployment (see ``etc/jobq.toml`` for each key)."""

    redis_url: str = ""
    prefix: str = "jobq"
    server_socket_group: str = ""
    queues: list[str] = field(default_factory=lambda: ["default"])
    imports: list[str] = field(default_factory=list)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    log_level: str = "info"
    log_file: str = ""
    log_format: str = "text"
    pidfile: str = ""
    hostname: str = ""

    default_timeout: float = 300.0
    default_max_retries: int = 3
    result_ttl: int = 300
    failed_ttl: int = 604800
    dlq_max: int = 10000
    max_payload_bytes: int = 1048576
    wait_replicas: int = 0
    wait_replicas_timeout: float = 0.5

    lease_time: float = 15.0
    connect_timeout: float = 10.0
    max_deliveries: int = 5

    graceful_timeout: float = 30.0
    hard_timeout_grace: float = 0.5
    memory_soft_limit_mb: int = 0
    memory_hard_limit_mb: int = 0
    heartbeat_timeout: float = 60.0
    max_jobs_per_worker: int = 0
    max_jobs_jitter: float = 0.1

    scheduler_tick: float = 1.0
    leader_lease: float = 5.0

    retry_backoff_base: float = 1.0
    retry_backoff_cap: float = 300.0
    retry_jitter: float = 0.25

    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"

    schedules: list[dict[str, Any]] = field(default_factory=list)
    #: on a Cluster, queues that share a slot: ``[queue_groups]`` group = [queues] (a queue
    #: in none is a group of its own); see :meth:`namespace`
    queue_groups: dict[str, list[str]] = field(default_factory=dict)
    #: named limits, ``[limits.NAME]`` tables: concurrency, rate, burst (jobq.limits)
    limits: dict[str, dict[str, Any]] = field(default_factory=dict)

    #: the token ``jobq web --allow-actions`` asks for ('': a new one each start); never shown
    web_token: str = field(default="", repr=False)
    #: more names the dashboard answers to (a proxy's), besides loopback and ``jobq web --host``
    web_allowed_hosts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        values = _validate({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, {})
        for name, value in values.items():
            object.__setattr__(self, name, value)  # store normalized values (floats, copies)

    @property
    def cluster(self) -> bool:
        """Whether ``redis_url`` names a Redis/Valkey Cluster (``redis+cluster://``)."""
        return cluster.is_cluster_url(self.redis_url)

    def group_of(self, queue: str) -> str:
        """The queue group of ``queue``: the ``[queue_groups]`` entry listing it, else its own
        name."""
        for group, queues in self.queue_groups.items():
            if queue in queues:
                return group
        return queue

    def namespace(self, queues: Sequence[str] | None = None) -> str:
        """The key prefix of the jobs of ``queues`` (default: this config's ``queues``).

        On one server (or behind Sentinel) it is ``prefix``: one namespace, one hash tag. On
        a Cluster every queue group is a namespace of its own, ``prefix:group``, so the groups
        spread over the shards while what must stay atomic shares a slot: a queue's jobs and
        records, a group's jobs, dependencies, one worker's claim across its queues, a
        group's schedules, limits and scheduler. ``queues`` in several groups raise
        :class:`ConfigError` (one worker claims from one slot)."""
        if not self.cluster:
            return self.prefix
        names = list(self.queues if queues is None else queues)
        groups = sorted({self.group_of(q) for q in names})
        if len(groups) != 1:
            spread = ", ".join(f"{q} ({self.group_of(q)})" for q in names)
            raise ConfigError(
                f"on a Cluster, the queues one worker serves must share a queue group (a "
                f"slot), got {spread or 'none'}: list them under one name in [queue_groups]")
        return f"{self.prefix}:{groups[0]}"

    def replace(self, **changes: Any) -> Config:
        """Return a validated copy with ``changes`` applied."""
        for name in changes:
            if name not in _RULES:
                raise ConfigError(f"Config.replace: {_unknown(name, _RULES)}")
        return dataclasses.replace(self, **changes)


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Config:
    """Load the configuration from ``path`` (default: ``$JOBQ_CONFIG``, else no file).

    ``overrides`` are field names (usually command-line options); those that are None are
    ignored. Raises :class:`ConfigError` on any problem.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    if path is None:
        path = os.environ.get(CONFIG_ENV) or None
    if path is not None:
        source = os.fspath(path)
        for name, value in _read_toml(source).items():
            values[name] = value
            sources[name] = source

        # every value of the file is checked, also those the environment or the command
        # line replace: a bad value in the file stops every command, whatever its options
        _validate(values, sources)

    env_url = os.environ.get(REDIS_URL_ENV)
    if env_url:
        values["redis_url"] = env_url
        sources["redis_url"] = REDIS_URL_ENV

    for name, value in overrides.items():
        if value is None:
            continue
        if name not in _RULES:
            raise ConfigError(f"command line: {_unknown(name, _RULES)}")
        values[name] = value
        sources[name] = "command line"

    return Config(**_validate(values, sources))


def host_name(config: Config, *, short: bool = True) -> str:
    """The name this host goes by in master ids, worker names, the scheduler's leader token
    and metrics: the ``hostname`` key, else the machine's host name (its first label when
    ``short``). Hosts that share a machine name (containers, network namespaces) set it."""
    if config.hostname:
        return config.hostname
    name = socket.gethostname()
    return (name.split(".")[0] or "host") if short else name


def _read_toml(path: str) -> dict[str, Any]:
    """Parse the file into field name -> raw value; reject unknown keys."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc.reason}") from None

    by_toml_name = {TOML_NAMES.get(name, name): name for name in _RULES}
    values = {}
    for key, value in data.items():
        if key not in by_toml_name:
            raise ConfigError(f"{path}: {_unknown(key, by_toml_name)}")
        values[by_toml_name[key]] = value
    return values


def _unknown(key: str, known: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r}{hint}"


def _validate(values: dict[str, Any], sources: Mapping[str, str]) -> dict[str, Any]:
    """Check and normalize each value by its rule, then the rules that tie fields together."""
    out = {}
    for name, value in values.items():
        label = TOML_NAMES.get(name, name) if name in sources and _is_file(sources[name]) else name
        try:
            out[name] = _RULES[name](value)
        except _Invalid as exc:
            raise ConfigError(f"{sources.get(name, 'Config')}: {label}: {exc}") from None
    for names, check in _CROSS_RULES:
        problem = check(*(out.get(n, _DEFAULTS[n]) for n in names))
        if problem:
            name = next((n for n in reversed(names) if n in sources), names[-1])
            raise ConfigError(f"{sources.get(name, 'Config')}: {name}: {problem}")
    return out


def _is_file(source: str) -> bool:
    return source not in (REDIS_URL_ENV, "command line")


# --- the rules -------------------------------------------------------------------------------


class _Invalid(Exception):
    """A value broke its rule; the message is the problem, e.g. 'expected ..., got ...'."""


def _show(value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict):
        text = "a table"
    else:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Number:
    """An int (``integer=True``) or a float (which also accepts an int) within bounds."""

    def __init__(self, expect: str, *, integer: bool, low: float | None = None,
                 high: float | None = None, low_open: bool = False) -> None:
        self.expect, self.integer = expect, integer
        self.low, self.high, self.low_open = low, high, low_open

    def __call__(self, value: Any) -> int | float:
        types: tuple[type, ...] = (int,) if self.integer else (int, float)
        ok = isinstance(value, types) and not isinstance(value, bool)
        if ok and not self.integer:
            ok = math.isfinite(value)
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value <= self.high
        if not ok:
            raise _Invalid(f"expected {self.expect}, got {_show(value)}")
        return int(value) if self.integer else float(value)


class _Str:
    """A string, optionally one of ``choices`` or matching ``check``."""

    def __init__(self, expect: str = "a string", *, choices: tuple[str, ...] = (),
                 check: Callable[[str], bool] | None = None, secret: bool = False) -> None:
        self.expect, self.choices, self.check, self.secret = expect, choices, check, secret

    def __call__(self, value: Any) -> str:
        ok = isinstance(value, str)
        if ok and self.choices:
            ok = value in self.choices
        if ok and self.check is not None:
            ok = self.check(value)
        if not ok:
            shown = _show(value)
            if self.secret and isinstance(value, str):
                shown = _show(redact(value))
            raise _Invalid(f"expected {self.expect}, got {shown}")
        return str(value)


class _StrList:
    """A list of strings, each checked by ``item``; optionally non-empty and unique."""

    def __init__(self, expect: str, item: _Str, *, nonempty: bool = False) -> None:
        self.expect, self.item, self.nonempty = expect, item, nonempty

    def __call__(self, value: Any) -> list[str]:
        if not isinstance(value, list | tuple) or (self.nonempty and not value):
            raise _Invalid(f"expected {self.expect}, got {_show(value)}")
        for i, entry in enumerate(value):
            try:
                self.item(entry)
            except _Invalid as exc:
                raise _Invalid(f"item {i + 1}: {exc}") from None
        dupes = sorted({v for v in value if list(value).count(v) > 1})
        if dupes:
            raise _Invalid(f"duplicate entry {dupes[0]!r}")
        return list(value)


class _Schedules:
    """A list of tables, each with a non-empty string ``name`` (the scheduler checks the rest)."""

    def __call__(self, value: Any) -> list[dict[str, Any]]:
        if not isinstance(value, list | tuple):
            raise _Invalid(f"expected an array of tables ([[schedule]]), got {_show(value)}")
        for i, entry in enumerate(value):
            if not isinstance(entry, dict):
                raise _Invalid(f"entry {i + 1}: expected a table, got {_show(entry)}")
            if "name" not in entry:
                raise _Invalid(f"entry {i + 1}: missing 'name'")
            if not isinstance(entry["name"], str) or not entry["name"]:
                raise _Invalid(f"entry {i + 1}: name: expected a non-empty string, "
                               f"got {_show(entry['name'])}")
        return [dict(entry) for entry in value]


class _Limits:
    """``[limits.NAME]`` tables, each checked as a limit (:func:`jobq.limits.from_config`)."""

    def __call__(self, value: Any) -> dict[str, dict[str, Any]]:
        if not isinstance(value, Mapping):
            raise _Invalid(f"expected tables ([limits.NAME]), got {_show(value)}")
        try:
            from_config(value)
        except LimitError as exc:
            raise _Invalid(str(exc)) from None
        return {name: dict(table) for name, table in value.items()}


class _QueueGroups:
    """``[queue_groups]``: group name -> a non-empty list of queue names, each queue in one
    group at most."""

    def __call__(self, value: Any) -> dict[str, list[str]]:
        if not isinstance(value, Mapping):
            raise _Invalid(f"expected a table of group = [queue, ...], got {_show(value)}")
        owner: dict[str, str] = {}
        out = {}
        for group, queues in value.items():
            try:
                _QUEUE_NAME(group)
                out[group] = _StrList("a non-empty list of queue names", _QUEUE_NAME,
                                      nonempty=True)(queues)
            except _Invalid as exc:
                raise _Invalid(f"{group}: {exc}") from None
            for queue in out[group]:
                if queue in owner:
                    raise _Invalid(f"queue {queue!r} is in two groups: {owner[queue]} and "
                                   f"{group}")
                owner[queue] = group
        return out


class _Secret(_Str):
    """A string that is a secret: a bad value is described, never shown."""

    def __call__(self, value: Any) -> str:
        try:
            return super().__call__(value)
        except _Invalid:
            shown = f"{len(value)} characters" if isinstance(value, str) else _show(value)
            raise _Invalid(f"expected {self.expect}, got {shown}") from None


def _valid_url(url: str) -> bool:
    scheme, sep, _ = url.partition("://")
    return url == "" or (bool(sep) and scheme.lower() in URL_SCHEMES)


def _group_or_empty(name: str) -> bool:
    """'' or the name of a group of this host (the key only means something where the
    embedded server runs, so it is checked there, before anything starts)."""
    if name == "":
        return True
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _dotted_name(name: str) -> bool:
    return all(part.isidentifier() for part in name.split("."))


def _positive_int() -> _Number:
    return _Number("a positive integer", integer=True, low=1)


def _count() -> _Number:
    return _Number("an integer >= 0", integer=True, low=0)


class _Ttl(_Number):
    """Seconds a record is kept: an integer >= 0 and at most 100 years (Redis refuses an
    expiry much longer: SET EX 10**16 fails, and with it the script settling the job)."""

    MAX = 100 * 365 * 86400

    def __init__(self) -> None:
        super().__init__("an integer >= 0", integer=True, low=0)

    def __call__(self, value: Any) -> int:
        seconds = int(super().__call__(value))
        if seconds > self.MAX:
            raise _Invalid(f"expected at most {self.MAX} (100 years, in seconds), "
                           f"got {_show(value)}")
        return seconds


def _seconds(*, zero: bool) -> _Number:
    return _Number("a number of seconds >= 0" if zero else "a number of seconds > 0",
                   integer=False, low=0, low_open=not zero)


def _fraction() -> _Number:
    return _Number("a number between 0 and 1", integer=False, low=0, high=1)


_QUEUE_NAME = _Str("a queue name (1-64 chars of A-Za-z0-9_.-)",
                   check=lambda s: QUEUE_NAME_RE.fullmatch(s) is not None)

#: Field name -> the rule that checks and normalizes its value.
_RULES: dict[str, Callable[[Any], Any]] = {
    "redis_url": _Str(f"a URL with scheme {', '.join(s + '://' for s in URL_SCHEMES)} or ''",
                      check=_valid_url, secret=True),
    "prefix": _Str("a key prefix (1-64 chars of A-Za-z0-9_.:-)",
                   check=lambda s: PREFIX_RE.fullmatch(s) is not None),
    "server_socket_group": _Str("the name of a group of this host, or ''",
                                check=_group_or_empty),
    "queues": _StrList("a non-empty list of queue names", _QUEUE_NAME, nonempty=True),
    "imports": _StrList("a list of module names",
                        _Str("a dotted module name", check=_dotted_name)),
    "workers": _positive_int(),
    "log_level": _Str(f"one of {', '.join(LOG_LEVELS)}", choices=LOG_LEVELS),
    "log_file": _Str(),
    "log_format": _Str(f"one of {', '.join(LOG_FORMATS)}", choices=LOG_FORMATS),
    "pidfile": _Str(),
    "hostname": _Str("a host name (1-63 chars of A-Za-z0-9_-), or '' for the machine's",
                     check=lambda s: s == "" or HOSTNAME_RE.fullmatch(s) is not None),
    "default_timeout": _seconds(zero=False),
    "default_max_retries": _count(),
    "result_ttl": _Ttl(),
    "failed_ttl": _Ttl(),
    "dlq_max": _count(),
    "max_payload_bytes": _positive_int(),
    "wait_replicas": _count(),
    "wait_replicas_timeout": _seconds(zero=False),
    "connect_timeout": _seconds(zero=False),
    "lease_time": _Number("a number of seconds > 0 and <= 300", integer=False, low=0, high=300,
                          low_open=True),
    "max_deliveries": _positive_int(),
    "graceful_timeout": _seconds(zero=True),
    "hard_timeout_grace": _seconds(zero=True),
    "memory_soft_limit_mb": _count(),
    "memory_hard_limit_mb": _count(),
    "heartbeat_timeout": _seconds(zero=False),
    "max_jobs_per_worker": _count(),
    "max_jobs_jitter": _fraction(),
    "scheduler_tick": _seconds(zero=False),
    "leader_lease": _seconds(zero=False),
    "retry_backoff_base": _seconds(zero=True),
    "retry_backoff_cap": _seconds(zero=True),
    "retry_jitter": _fraction(),
    "metrics_port": _Number("a TCP port (1-65535), or 0 for no metrics", integer=True, low=0,
                            high=65535),
    "metrics_host": _Str("a host name or address to listen on", check=bool),
    "schedules": _Schedules(),
    "limits": _Limits(),
    "queue_groups": _QueueGroups(),
    "web_allowed_hosts": _StrList("a list of host names", _Str(
        "a host name or address", check=lambda s: bool(s) and s.isprintable() and " " not in s
        and "/" not in s)),
    "web_token": _Secret("'' or a token of 16 to 256 printable characters without spaces",
                         check=lambda s: s == "" or (16 <= len(s) <= 256 and s.isprintable()
                                                     and " " not in s)),
}


def _hard_over_soft(soft: int, hard: int) -> str | None:
    if soft and hard and hard < soft:
        return f"must be >= memory_soft_limit_mb ({soft}) when both are set, got {hard}"
    return None


def _cap_over_base(base: float, cap: float) -> str | None:
    return f"must be >= retry_backoff_base ({base:g}), got {cap:g}" if cap < base else None


def _wait_within_read(lease: float, wait: float) -> str | None:
    """WAIT blocks the connection: it must end well within the client's read timeout (the
    lease, at least 1 s; see jobq.connection.client_options), or the wait is taken for a
    dead server."""
    limit = max(1.0, lease) / 2
    return f"must be <= {limit:g} (half of lease_time, at least 0.5), got {wait:g}" \
        if wait > limit else None


#: Rules that tie fields together: (field names, check returning a problem or None).
_CROSS_RULES: list[tuple[tuple[str, ...], Callable[..., str | None]]] = [
    (("memory_soft_limit_mb", "memory_hard_limit_mb"), _hard_over_soft),
    (("retry_backoff_base", "retry_backoff_cap"), _cap_over_base),
    (("lease_time", "wait_replicas_timeout"), _wait_within_read),
]

_DEFAULTS: dict[str, Any] = {
    f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    for f in dataclasses.fields(Config)
}

if set(_RULES) != set(_DEFAULTS):  # a field added without a rule, or the reverse
    raise RuntimeError(f"config rules out of sync: {set(_RULES) ^ set(_DEFAULTS)}")


# --- the command line ------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """How a config key is given on the command line, by every command that takes it."""

    #: The option's names, e.g. ``("-w", "--workers")``.
    flags: tuple[str, ...]
    help: str
    metavar: str | None = None
    #: A list key given one flag per item (``-I a -I b``) rather than comma-separated.
    repeat: bool = False


#: Config key -> its command-line twin, for ``jobq`` and ``jobq-master`` alike.
FLAGS: dict[str, Flag] = {
    "redis_url": Flag(("--redis-url",), f"redis://, rediss://, unix://, redis+sentinel://; "
                      f"default: ${REDIS_URL_ENV}, "
                      "the config, else the embedded server.", metavar="URL"),
    "queues": Flag(("-q", "--queues"), "Queues to take jobs from, highest priority first "
                   "(default: the config's).", metavar="Q1,Q2"),
    "imports": Flag(("-I", "--import"), "Module whose tasks may run (repeatable; adds to the "
                    "config's imports).", metavar="MODULE", repeat=True),
    "workers": Flag(("-w", "--workers"), "Worker processes (default: CPUs)."),
    "pidfile": Flag(("--pidfile",), "File the master writes its pid to; a second master given "
                    "the same file refuses to start.", metavar="FILE"),
    "log_file": Flag(("--log-file",), "Log to FILE instead of standard error (reopened on "
                     "USR1 and HUP).", metavar="FILE"),
    "log_level": Flag(("--log-level",), "Lowest level logged (default: info)."),
    "log_format": Flag(("--log-format",), "Log line format; json writes one object per line "
                       "(default: text)."),
    "hostname": Flag(("--hostname",), "The name this host goes by in master ids, worker names "
                     "and `jobq info` (default: the machine's host name).", metavar="NAME"),
    "metrics_port": Flag(("--metrics-port",), "Serve Prometheus metrics on this port (needs "
                         "jobq[metrics]; default: off).", metavar="PORT"),
    "metrics_host": Flag(("--metrics-host",), "Address the metrics listen on (default: "
                         "127.0.0.1).", metavar="HOST"),
}


def value_type(key: str) -> type:
    """What a value of config key ``key`` is, as its rule checks it: int, float, str or list."""
    rule = _RULES[key]
    if isinstance(rule, _Number):
        return int if rule.integer else float
    return str if isinstance(rule, _Str) else list


def choices(key: str) -> tuple[str, ...]:
    """The values config key ``key`` is limited to; empty if its rule names none."""
    rule = _RULES[key]
    return rule.choices if isinstance(rule, _Str) else ()


if not set(FLAGS) <= set(_RULES):  # a flag for a key that does not exist
    raise RuntimeError(f"command-line flags without a config key: {set(FLAGS) - set(_RULES)}")
