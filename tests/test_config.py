"""Tests of jobq.config: defaults, precedence, strict one-line errors, the sample file."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from jobq.config import Config, ConfigError, load_config
from jobq.schedule import MISFIRE
from jobq.scheduler import config_schedules

SAMPLE = Path(__file__).resolve().parent.parent / "etc" / "jobq.toml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOBQ_CONFIG", raising=False)
    monkeypatch.delenv("JOBQ_REDIS_URL", raising=False)


Writer = Callable[[str], str]


@pytest.fixture
def write(tmp_path: Path) -> Writer:
    """Write a config file; return its path."""

    def write(text: str) -> str:
        path = tmp_path / "jobq.toml"
        path.write_text(text)
        return str(path)

    return write


def test_defaults() -> None:
    cfg = Config()
    assert cfg.redis_url == ""
    assert cfg.prefix == "jobq"
    assert cfg.queues == ["default"]
    assert cfg.imports == []
    assert cfg.workers == (os.cpu_count() or 1)
    assert (cfg.log_level, cfg.log_format) == ("info", "text")
    assert cfg.default_timeout == 300 and isinstance(cfg.default_timeout, float)
    assert (cfg.result_ttl, cfg.failed_ttl, cfg.dlq_max) == (300, 604800, 10000)
    assert (cfg.lease_time, cfg.max_deliveries) == (15, 5)
    assert cfg.schedules == []
    assert load_config() == cfg


def test_config_is_frozen_and_replace_validates() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.workers = 2  # type: ignore[misc]
    assert cfg.replace(workers=2).workers == 2
    assert cfg.workers == (os.cpu_count() or 1)
    with pytest.raises(ConfigError, match=r"^Config: workers: expected a positive integer"):
        cfg.replace(workers=0)
    with pytest.raises(ConfigError, match=r"unknown key 'wrokers' \(did you mean 'workers'\?\)"):
        cfg.replace(wrokers=2)


def test_default_lists_are_not_shared() -> None:
    a, b = Config(), Config()
    a.queues.append("x")
    assert b.queues == ["default"]


def test_int_is_accepted_for_float(write: Writer) -> None:
    cfg = load_config(write("default_timeout = 10\nmax_jobs_jitter = 0\n"))
    assert cfg.default_timeout == 10.0 and isinstance(cfg.default_timeout, float)
    assert isinstance(cfg.max_jobs_jitter, float)


def test_precedence(write: Writer, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write('redis_url = "redis://file:6379/0"\nworkers = 2\nprefix = "fromfile"\n')
    assert load_config(path).redis_url == "redis://file:6379/0"

    monkeypatch.setenv("JOBQ_REDIS_URL", "redis://env:6379/0")
    cfg = load_config(path, workers=None, redis_url=None)
    assert cfg.redis_url == "redis://env:6379/0"  # env beats file
    assert cfg.workers == 2  # None overrides are ignored
    assert cfg.prefix == "fromfile"
    assert cfg.log_level == "info"  # default where nobody sets it

    cfg = load_config(path, redis_url="redis://cli:6379/0", workers=7)
    assert (cfg.redis_url, cfg.workers) == ("redis://cli:6379/0", 7)  # override beats all


def test_config_env_names_the_file(write: Writer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBQ_CONFIG", write("workers = 3\n"))
    assert load_config().workers == 3


def test_schedules_are_read_from_schedule_tables(write: Writer) -> None:
    cfg = load_config(write('[[schedule]]\nname = "a"\ncron = "* * * * *"\n'
                            '[[schedule]]\nname = "b"\ninterval = 60\n'))
    assert cfg.schedules == [{"name": "a", "cron": "* * * * *"}, {"name": "b", "interval": 60}]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("wrokers = 3", "unknown key 'wrokers' (did you mean 'workers'?)"),
        ("zzz = 3", "unknown key 'zzz'"),
        ("schedules = []", "unknown key 'schedules' (did you mean 'schedule'?)"),
        ("[redis]\nurl = 'x'", "unknown key 'redis' (did you mean 'redis_url'?)"),
        ("workers = -3", "workers: expected a positive integer, got -3"),
        ("workers = true", "workers: expected a positive integer, got true"),
        ("workers = 2.5", "workers: expected a positive integer, got 2.5"),
        ("workers = '4'", "workers: expected a positive integer, got '4'"),
        ("default_timeout = 0", "default_timeout: expected a number of seconds > 0, got 0"),
        ("default_timeout = nan", "default_timeout: expected a number of seconds > 0, got nan"),
        ("graceful_timeout = -1", "graceful_timeout: expected a number of seconds >= 0, got -1"),
        ("lease_time = 301", "lease_time: expected a number of seconds > 0 and <= 300, got 301"),
        ("max_deliveries = 0", "max_deliveries: expected a positive integer, got 0"),
        ("result_ttl = -1", "result_ttl: expected an integer >= 0, got -1"),
        ("retry_jitter = 1.5", "retry_jitter: expected a number between 0 and 1, got 1.5"),
        ("log_level = 'verbose'", "log_level: expected one of debug, info, warning, error"),
        ("log_format = 'xml'", "log_format: expected one of text, json, got 'xml'"),
        ("queues = 'default'", "queues: expected a non-empty list of queue names, got 'default'"),
        ("queues = []", "queues: expected a non-empty list of queue names, got []"),
        ("queues = ['ok', 'a:b']", "queues: item 2: expected a queue name"),
        ("queues = ['" + "q" * 65 + "']", "queues: item 1: expected a queue name"),
        ("queues = ['a', 'a']", "queues: duplicate entry 'a'"),
        ("imports = ['app.tasks', 'bad-name']", "imports: item 2: expected a dotted module name"),
        ("prefix = '{jobq}'", "prefix: expected a key prefix"),
        ("server_socket_group = 'no-such-group-jq'",
         "server_socket_group: expected the name of a group of this host, or '', "
         "got 'no-such-group-jq'"),
        ("server_socket_group = 0", "server_socket_group: expected the name of a group"),
        ("redis_url = 'http://host'", "redis_url: expected a URL with scheme redis://"),
        ("schedule = 3", "schedule: expected an array of tables ([[schedule]]), got 3"),
        ("[[schedule]]\ntask = 'x'", "schedule: entry 1: missing 'name'"),
        ("[[schedule]]\nname = 3", "schedule: entry 1: name: expected a non-empty string, got 3"),
        ("memory_soft_limit_mb = 100\nmemory_hard_limit_mb = 50",
         "memory_hard_limit_mb: must be >= memory_soft_limit_mb (100) when both are set, got 50"),
        ("retry_backoff_base = 10\nretry_backoff_cap = 5",
         "retry_backoff_cap: must be >= retry_backoff_base (10), got 5"),
        ("workers = ", "TOML syntax error: Invalid value"),
        ("workers = 1\nworkers = 2", "TOML syntax error"),
    ],
)
def test_file_errors_are_one_line(write: Writer, text: str, message: str) -> None:
    path = write(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    error = str(info.value)
    assert error.startswith(f"{path}: ")
    assert message in error
    assert "\n" not in error
    assert isinstance(info.value, ValueError)


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"^.*nope\.toml: cannot read: No such file"):
        load_config(missing)
    with pytest.raises(ConfigError, match=r": cannot read: Is a directory$"):
        load_config(tmp_path)


def test_missing_file_named_by_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JOBQ_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError, match="gone.toml: cannot read"):
        load_config()


def test_override_and_env_errors_name_their_source(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"^command line: workers: expected a positive"):
        load_config(workers=-1)
    with pytest.raises(ConfigError, match=r"^command line: unknown key 'wrkers' \(did you mean"):
        load_config(wrkers=1)
    monkeypatch.setenv("JOBQ_REDIS_URL", "http://:topsecret@host")
    with pytest.raises(ConfigError, match=r"^JOBQ_REDIS_URL: redis_url: ") as info:
        load_config()
    assert "topsecret" not in str(info.value)
    assert "http://:***@host" in str(info.value)


def test_a_bad_value_in_the_file_stops_whatever_replaces_it(
        write: Writer, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write('workers = "four"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, workers=1)  # jobq-master --config FILE -w 1
    assert str(info.value) == f"{path}: workers: expected a positive integer, got 'four'"

    path = write('redis_url = "http://:topsecret@host"\n')
    monkeypatch.setenv("JOBQ_REDIS_URL", "redis://env:6379/0")
    with pytest.raises(ConfigError) as info:
        load_config(path, redis_url="redis://cli:6379/0")
    assert str(info.value).startswith(f"{path}: redis_url: expected a URL")
    assert "topsecret" not in str(info.value)


def test_sample_config_loads_as_defaults() -> None:
    assert load_config(SAMPLE) == Config()


def test_sample_config_mentions_every_key() -> None:
    text = SAMPLE.read_text()
    for f in dataclasses.fields(Config):
        if f.name == "schedules":
            assert re.search(r"^#\[\[schedule\]\]$", text, re.M)
        else:
            assert re.search(rf"^#{f.name} = ", text, re.M), f"{f.name} is not in {SAMPLE}"
            # ... with a description just above it.
            assert re.search(rf"^# .+\n#{f.name} = ", text, re.M), f"{f.name} has no comment"


#: A setting of the sample, commented out: ``#key = value`` or the ``#[[schedule]]`` header.
SETTING_LINE = re.compile(r"^#(\[\[schedule\]\]$|[a-z_]+ = )")


def test_sample_config_documents_the_true_defaults(tmp_path: Path) -> None:
    # Uncomment every setting line ("#key = ..." and the table header; prose is "# ..."): the
    # file must still load through the real loader, give the defaults (workers aside: its
    # default depends on the machine), and hold an example schedule the master accepts.
    text = SAMPLE.read_text()
    lines = [line[1:] if SETTING_LINE.match(line) else line for line in text.splitlines()]
    left = [line for line in lines if re.match(r"^#\s*(\[|[A-Za-z_]+\s*=)", line)]
    assert left == [], f"settings the pattern does not uncomment: {left}"
    path = tmp_path / "uncommented.toml"
    path.write_text("\n".join(lines) + "\n")
    cfg = load_config(path)
    assert cfg.replace(workers=Config().workers, schedules=[]) == Config()
    [table] = cfg.schedules
    assert table["name"] == "nightly-report"
    assert set(table) == {"name", "task", "cron", "args", "kwargs", "queue", "priority",
                          "timezone", "misfire"}
    [schedule] = config_schedules(cfg)  # what jobq-master checks before it starts
    assert (schedule.task, schedule.kind) == ("myapp.tasks:build_report", "cron")
    for policy in MISFIRE:
        assert f'"{policy}"' in text, f"misfire {policy!r} is not documented"
