"""Pure tests of jobq.schedule (and config_schedules): fire times, misfires, back-off, errors.

No server and no clock: every function takes ``now``/``after``, and these tests pass fixed
times, so each case is exact and instant."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from jobq.config import load_config
from jobq.schedule import (
    MAX_BURST,
    ON_TIME,
    ScheduleDef,
    ScheduleError,
    check_cron,
    first_due,
    next_fire,
    plan_fire,
    to_epoch,
)
from jobq.scheduler import config_schedules
from jobq.settle import backoff

PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")
#: A fixed "now": 2024-05-01 12:00:00 UTC.
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC).timestamp()


def once(at: float, **kw: Any) -> ScheduleDef:
    return ScheduleDef(name="one", task="m:f", kind="once", at=at, **kw).validate()


def every(interval: float, start: float | None = NOW, **kw: Any) -> ScheduleDef:
    return ScheduleDef(name="tick", task="m:f", kind="interval", interval=interval, start=start,
                       **kw).validate()


def cron(expr: str, tz: str = "UTC", **kw: Any) -> ScheduleDef:
    return ScheduleDef(name="cron", task="m:f", kind="cron", cron=expr, timezone=tz,
                       **kw).validate()


def fires(d: ScheduleDef, start: float, end: float) -> list[float]:
    """Every fire time in (start, end], as the scheduler walks them: due after due."""
    out = []
    t = next_fire(d, start)
    while t is not None and t <= end:
        out.append(t)
        t = next_fire(d, t)
    return out


def ts(tz: ZoneInfo, *parts: int, fold: int = 0) -> float:
    return datetime(*parts, tzinfo=tz, fold=fold).timestamp()  # type: ignore[misc]


def local(t: float, tz: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(t, tz)


# -- next fire times ---------------------------------------------------------------------------

def test_once_fires_at_its_time_then_never() -> None:
    d = once(NOW + 60)
    assert first_due(d, NOW) == NOW + 60
    assert next_fire(d, NOW) == NOW + 60
    assert next_fire(d, NOW + 60) is None  # strictly after: its own time is done
    assert next_fire(d, NOW + 3600) is None


def test_once_keeps_whole_milliseconds() -> None:
    d = once(NOW + 1.23456789)
    assert d.at == round(NOW + 1.23456789, 3)


def test_interval_fire_times_come_from_the_anchor_not_from_when_runs_end() -> None:
    d = every(10.0)
    assert first_due(d, NOW + 3) == NOW  # the start, even if asked later
    assert next_fire(d, NOW - 100) == NOW  # before the start: the start
    assert next_fire(d, NOW) == NOW + 10
    # a run that ended late (7.3 s after its due time) does not push the grid
    assert next_fire(d, NOW + 7.3) == NOW + 10
    assert next_fire(d, NOW + 10 + 9.99) == NOW + 20
    # walking due after due for a long time stays exactly on the grid (no float creep)
    d = every(0.1)
    t = NOW
    for _ in range(10_000):
        nxt = next_fire(d, t)
        assert nxt is not None
        t = nxt
    assert t == round(NOW + 1000.0, 3)
    walked = fires(d, NOW, NOW + 1)
    assert walked == [round(NOW + 0.1 * i, 3) for i in range(1, 11)]


def test_interval_without_start_begins_now_and_does_not_drift() -> None:
    # a [[schedule]] table without start: due times chain from the first, exactly
    d = every(5.0, start=None)
    assert first_due(d, NOW) == NOW
    assert next_fire(d, NOW) == NOW + 5
    due = NOW
    for _ in range(1000):
        plan = plan_fire(d, due, due + 0.25)  # each fired a little late
        assert plan.runs == [due]
        due = plan.next_due  # type: ignore[assignment]
    assert due == NOW + 5000


def test_cron_five_fields_in_utc() -> None:
    d = cron("*/15 * * * *")
    assert next_fire(d, NOW + 7 * 60) == NOW + 15 * 60
    assert next_fire(d, NOW) == NOW + 15 * 60  # strictly after
    assert first_due(d, NOW - 60) == NOW
    assert fires(d, NOW, NOW + 3600) == [NOW + 900 * i for i in range(1, 5)]


def test_cron_six_fields_have_seconds_last() -> None:
    d = cron("* * * * * */10")
    assert next_fire(d, NOW + 3) == NOW + 10
    assert fires(d, NOW, NOW + 60) == [NOW + 10 * i for i in range(1, 7)]


def test_cron_in_a_timezone_follows_its_wall_clock() -> None:
    d = cron("0 9 * * *", "America/New_York")
    summer = next_fire(d, ts(UTC, 2024, 7, 1))
    winter = next_fire(d, ts(UTC, 2024, 12, 1))
    assert summer == ts(UTC, 2024, 7, 1, 13)  # 09:00 EDT = 13:00 UTC
    assert winter == ts(UTC, 2024, 12, 1, 14)  # 09:00 EST = 14:00 UTC
    assert summer is not None and winter is not None
    assert local(summer, NEW_YORK).hour == local(winter, NEW_YORK).hour == 9


def test_spring_forward_daily_0230_fires_once_on_that_day_paris() -> None:
    # 2024-03-31 in Paris: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist that day
    d = cron("30 2 * * *", "Europe/Paris")
    got = fires(d, ts(PARIS, 2024, 3, 29, 12), ts(PARIS, 2024, 4, 2, 12))
    days = [local(t, PARIS).date() for t in got]
    assert days == [datetime(2024, 3, d).date() for d in (30, 31)] + [
        datetime(2024, 4, d).date() for d in (1, 2)], [local(t, PARIS) for t in got]
    on_the_day = got[1]
    assert ts(PARIS, 2024, 3, 31, 3) <= on_the_day < ts(PARIS, 2024, 3, 31, 4)
    assert local(got[2], PARIS).time() == datetime(2024, 1, 1, 2, 30).time()


def test_spring_forward_daily_0230_fires_once_on_that_day_new_york() -> None:
    d = cron("30 2 * * *", "America/New_York")
    got = fires(d, ts(NEW_YORK, 2024, 3, 9, 12), ts(NEW_YORK, 2024, 3, 11, 12))
    assert [local(t, NEW_YORK).day for t in got] == [10, 11]


def test_fall_back_daily_0130_fires_once_new_york() -> None:
    # 2024-11-03 in New York: 01:00-02:00 happens twice (EDT, then EST)
    d = cron("30 1 * * *", "America/New_York")
    got = fires(d, ts(NEW_YORK, 2024, 11, 2, 12), ts(NEW_YORK, 2024, 11, 4, 12))
    shown = [local(t, NEW_YORK).isoformat() for t in got]
    assert [local(t, NEW_YORK).day for t in got] == [3, 4], shown
    assert got[0] == ts(NEW_YORK, 2024, 11, 3, 1, 30, fold=0), shown  # the first 01:30


def test_fall_back_daily_0230_fires_once_paris() -> None:
    # 2024-10-27 in Paris: 02:00-03:00 happens twice
    d = cron("30 2 * * *", "Europe/Paris")
    got = fires(d, ts(PARIS, 2024, 10, 26, 12), ts(PARIS, 2024, 10, 28, 12))
    assert [local(t, PARIS).day for t in got] == [27, 28], [local(t, PARIS) for t in got]


def test_frequent_cron_keeps_real_time_spacing_across_both_transitions() -> None:
    d = cron("*/30 * * * *", "America/New_York")
    for day in ((2024, 3, 10), (2024, 11, 3)):
        got = fires(d, ts(NEW_YORK, *day), ts(NEW_YORK, *day, 6))
        gaps = {b - a for a, b in zip(got, got[1:], strict=False)}
        assert gaps == {1800.0}, [local(t, NEW_YORK).isoformat() for t in got]


# -- misfires and on-time fires ----------------------------------------------------------------

def test_a_fire_within_on_time_fires_once_whatever_the_policy() -> None:
    for policy in ("skip", "catch_up", "all"):
        d = every(60.0, misfire=policy)
        plan = plan_fire(d, NOW, NOW + ON_TIME)
        assert plan.runs == [NOW]
        assert plan.next_due == NOW + 60


def test_on_time_fires_of_a_fast_interval_each_fire_in_turn() -> None:
    d = every(1.0, misfire="skip")
    plan = plan_fire(d, NOW, NOW + 3.5)  # a little late: runs due since are still on time
    assert plan.runs == [NOW]
    assert plan.next_due == NOW + 1


def test_skip_runs_nothing_and_moves_to_the_future() -> None:
    d = every(60.0, misfire="skip")
    now = NOW + 3600 + 17
    plan = plan_fire(d, NOW, now)
    assert plan.runs == []
    assert plan.next_due == NOW + 3660
    assert plan.next_due > now  # type: ignore[operator]


def test_catch_up_runs_once_for_the_latest_missed_time() -> None:
    d = every(60.0, misfire="catch_up")
    now = NOW + 3600 + 17
    plan = plan_fire(d, NOW, now)
    assert plan.runs == [NOW + 3600]
    assert plan.next_due == NOW + 3660


def test_all_runs_every_missed_time_in_order() -> None:
    d = every(60.0, misfire="all")
    now = NOW + 3600 + 17
    plan = plan_fire(d, NOW, now)
    assert plan.runs == [NOW + 60 * i for i in range(61)]
    assert plan.next_due == NOW + 3660


def test_all_is_capped() -> None:
    d = every(1.0, misfire="all")
    plan = plan_fire(d, NOW, NOW + 5 * MAX_BURST)
    assert len(plan.runs) == MAX_BURST
    assert plan.runs == [NOW + i for i in range(MAX_BURST)]


@pytest.mark.parametrize("policy,runs", [("skip", 0), ("catch_up", 1)])
def test_long_downtime_past_the_burst_cap_still_fires_at_most_once(policy: str,
                                                                   runs: int) -> None:
    # more missed runs than MAX_BURST: skip must still run nothing, catch_up once, and
    # the next due time must be in the future (a past one would fire as "on time")
    d = every(1.0, misfire=policy)
    now = NOW + 3 * MAX_BURST + 0.5
    plan = plan_fire(d, NOW, now)
    assert len(plan.runs) == runs
    if runs:
        assert plan.runs == [NOW + 3 * MAX_BURST]  # the latest missed time
    assert plan.next_due == NOW + 3 * MAX_BURST + 1
    assert plan.next_due > now  # type: ignore[operator]


def test_missed_one_off() -> None:
    late = NOW + 3600
    assert plan_fire(once(NOW, misfire="skip"), NOW, late).runs == []
    assert plan_fire(once(NOW, misfire="skip"), NOW, late).next_due is None
    assert plan_fire(once(NOW, misfire="catch_up"), NOW, late).runs == [NOW]
    assert plan_fire(once(NOW, misfire="all"), NOW, late).runs == [NOW]
    assert plan_fire(once(NOW), NOW, NOW + 1).runs == [NOW]


def test_missed_cron_catch_up() -> None:
    d = cron("0 * * * *", misfire="catch_up")  # hourly
    plan = plan_fire(d, NOW, NOW + 5 * 3600 + 60)
    assert plan.runs == [NOW + 5 * 3600]
    assert plan.next_due == NOW + 6 * 3600


# -- back-off ----------------------------------------------------------------------------------

def test_backoff_doubles_up_to_the_cap_without_jitter() -> None:
    rng = random.Random(1)
    got = [backoff(n, 0.5, 10.0, 0.0, rng) for n in range(1, 8)]
    assert got == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff(0, 0.5, 10.0, 0.0, rng) == 0.5  # attempt 0 counts as the first


def test_backoff_jitter_stays_within_its_bounds_and_is_seeded() -> None:
    a, b = random.Random(42), random.Random(42)
    for n in range(1, 12):
        full = min(30.0, 0.2 * 2 ** (n - 1))
        for _ in range(200):
            delay = backoff(n, 0.2, 30.0, 0.25, a)
            assert full * 0.75 <= delay <= full
            assert delay == backoff(n, 0.2, 30.0, 0.25, b)  # same seed, same delays
    spread = {backoff(3, 1.0, 30.0, 0.5, a) for _ in range(50)}
    assert len(spread) > 1 and min(spread) >= 2.0 and max(spread) <= 4.0


# -- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("expr,field", [
    ("61 * * * *", "field 1 (minute)"),
    ("0 25 * * *", "field 2 (hour)"),
    ("0 0 32 * *", "field 3 (day of month)"),
    ("0 0 * 13 *", "field 4 (month)"),
    ("0 0 * * 9", "field 5 (day of week)"),
    ("0 0 * * mon-xyz", "field 5 (day of week)"),
    ("* * * * * 61", "field 6 (second)"),
    ("0 24 * * * 0", "field 2 (hour)"),
])
def test_cron_errors_name_the_field(expr: str, field: str) -> None:
    with pytest.raises(ScheduleError) as err:
        check_cron(expr, "schedule 'x'")
    assert field in str(err.value)
    assert str(err.value).startswith("schedule 'x': cron:")


@pytest.mark.parametrize("expr,words", [
    ("* * *", "has 3 fields"),
    ("* * * * * * *", "has 7 fields"),
    ("", "expected a cron expression"),
    (None, "expected a cron expression"),
])
def test_cron_errors_of_shape(expr: Any, words: str) -> None:
    with pytest.raises(ScheduleError, match=words):
        check_cron(expr)


def test_a_valid_cron_passes() -> None:
    check_cron("*/5 9-17 * * mon-fri")
    check_cron("0 0 1 1 * 30")


@pytest.mark.parametrize("changes,words", [
    ({"name": "has space"}, "schedule name 'has space'"),
    ({"name": ""}, "schedule name ''"),
    ({"task": "nocolon"}, "task: 'nocolon'"),
    ({"queue": "a:b"}, "queue: 'a:b'"),
    ({"priority": "1"}, "priority: expected an integer"),
    ({"priority": True}, "priority: expected an integer"),
    ({"args": "x"}, "args must be a list"),
    ({"kwargs": []}, "kwargs a table"),
    ({"misfire": "later"}, "misfire: expected one of skip, catch_up, all"),
    ({"timezone": "Mars/Olympus"}, "timezone: unknown time zone 'Mars/Olympus'"),
    ({"kind": "once", "at": None}, "at: a time is required"),
    ({"kind": "once", "at": float("nan")}, "at: a time is required"),
    ({"kind": "interval", "interval": 0}, "interval: expected seconds > 0"),
    ({"kind": "interval", "interval": -1.0}, "interval: expected seconds > 0"),
    ({"kind": "interval", "interval": "5"}, "interval: expected seconds > 0"),
    ({"kind": "interval", "interval": 5, "start": "now"}, "start: expected a time"),
    ({"kind": "cron", "cron": "0 99 * * *"}, "field 2 (hour)"),
    ({"kind": "weekly"}, "one of at, interval or cron is required"),
    ({"options": {"max_retries": -1}}, "max_retries"),
    ({"options": {"timeout": 0}}, "timeout"),
    ({"options": {"result_ttl": "long"}}, "result_ttl"),
])
def test_schedule_def_validate_errors(changes: dict[str, Any], words: str) -> None:
    fields: dict[str, Any] = {"name": "nightly", "task": "m:f", "kind": "interval",
                              "interval": 5.0}
    fields.update(changes)
    with pytest.raises(ScheduleError) as err:
        ScheduleDef(**fields).validate()
    assert words in str(err.value)
    if "name" not in changes:
        assert str(err.value).startswith("schedule 'nightly': ")


def test_schedule_def_round_trips_through_json() -> None:
    d = cron("0 3 * * *", "Europe/Paris", args=[1, "a"], kwargs={"k": 2}, misfire="all",
             options={"max_retries": 1})
    data = d.to_json()
    data["added_later"] = True  # a field of a newer version is ignored
    assert ScheduleDef.from_json(data) == d


def test_to_epoch() -> None:
    assert to_epoch(datetime(2024, 5, 1, 12, tzinfo=UTC)) == NOW
    assert to_epoch(NOW) == NOW
    naive = datetime(2024, 5, 1, 12)
    assert to_epoch(naive) == naive.timestamp()  # naive: local time
    with pytest.raises(TypeError):
        to_epoch("2024-05-01")  # type: ignore[arg-type]


# -- [[schedule]] tables of the config -----------------------------------------------------------

def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "jobq.toml"
    path.write_text(text)
    return str(path)


def test_config_schedules_parse_every_kind(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
[[schedule]]
name = "nightly"
task = "app.jobs:report"
cron = "0 3 * * *"
timezone = "Europe/Paris"
args = [1, "two"]
kwargs = {verbose = true}
queue = "reports"
priority = -5
misfire = "catch_up"
max_retries = 1
timeout = 60.0
result_ttl = 0

[[schedule]]
name = "heartbeat"
task = "app.jobs:ping"
interval = 30
start = 2024-05-01T12:00:00Z

[[schedule]]
name = "launch"
task = "app.jobs:launch"
at = 2030-01-01T00:00:00+01:00
"""))
    nightly, heartbeat, launch = config_schedules(config)
    assert nightly == ScheduleDef(
        name="nightly", task="app.jobs:report", kind="cron", cron="0 3 * * *",
        timezone="Europe/Paris", args=[1, "two"], kwargs={"verbose": True}, queue="reports",
        priority=-5, misfire="catch_up", source="config",
        options={"max_retries": 1, "timeout": 60.0, "result_ttl": 0})
    assert heartbeat.kind == "interval" and heartbeat.interval == 30
    assert heartbeat.start == NOW and heartbeat.source == "config"
    # no queue given: the task's declared one (from the catalog at each fire), else default
    assert heartbeat.misfire == "skip" and heartbeat.queue is None
    assert launch.kind == "once"
    assert launch.at == datetime(2029, 12, 31, 23, tzinfo=UTC).timestamp()
    assert config_schedules(load_config(write(tmp_path, 'prefix = "x"\n'))) == []


@pytest.mark.parametrize("table,words", [
    ('task = "m:f"', "schedule 'bad': one of cron, interval or at is required"),
    ('task = "m:f"\ninterval = 5\ncolour = "red"', "schedule 'bad': unknown key(s) colour"),
    ('interval = 5', "schedule 'bad': task: required"),
    ('task = "m:f"\ncron = "0 0 * 13 *"', "field 4 (month)"),
    ('task = "m:f"\ninterval = -2', "schedule 'bad': interval: expected seconds > 0"),
    ('task = "m:f"\ninterval = 5\nmisfire = "never"', "schedule 'bad': misfire:"),
    ('task = "m:f"\ninterval = 5\ntimezone = "Nowhere/Land"', "schedule 'bad': timezone:"),
    ('task = "m:f"\ninterval = 5\nmax_retries = -1', "schedule 'bad': max_retries"),
    ('task = "m:f"\ninterval = 5\ntimeout = "soon"', "schedule 'bad': timeout"),
    ('task = "m:f"\nat = "tomorrow"', "schedule 'bad': at:"),
    ('task = "m:f"\nat = 2030-01-01', "schedule 'bad': at:"),
    ('task = "m:f"\ninterval = 5\nstart = "now"', "schedule 'bad': start:"),
])
def test_config_schedule_errors_name_the_schedule_and_the_key(tmp_path: Path, table: str,
                                                              words: str) -> None:
    config = load_config(write(tmp_path, f'[[schedule]]\nname = "bad"\n{table}\n'))
    with pytest.raises(ScheduleError) as err:
        config_schedules(config)
    assert words in str(err.value)


def test_interval_fires_stay_on_grid_when_a_run_is_late() -> None:
    # the scheduler fires due D at D + lateness; the next due is from D, not from the fire
    d = every(2.0)
    due = NOW
    for lateness in (0.0, 1.9, 0.3, 4.0, 0.01):
        plan = plan_fire(d, due, due + lateness)
        assert plan.runs == [due]
        due = plan.next_due  # type: ignore[assignment]
        assert (due - NOW) % 2.0 == 0
    assert due == NOW + 10.0


def test_an_interval_start_is_its_anchor_to_the_millisecond() -> None:
    # an interval start given as a datetime is the anchor, to the millisecond
    start = datetime(2024, 5, 1, 12, tzinfo=UTC) + timedelta(milliseconds=10)
    d = every(1.0, start=to_epoch(start))
    assert next_fire(d, NOW) == NOW + 0.01
    assert next_fire(d, NOW + 0.01) == NOW + 1.01
