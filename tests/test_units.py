"""The systemd units in ``etc/``, checked without systemd: their commands are jobq's installed
entry points with options jobq's command line accepts, and the two units and the sample config
agree on users, paths and the server's socket; ``systemd-analyze verify`` checks their syntax
where it is installed."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import click
import pytest
from conftest import ROOT

from jobq import exitcodes
from jobq.cli import main as jobq_main
from jobq.cli.master import master_command

ETC = ROOT / "etc"
UNITS = ("jobq.service", "jobq-server.service")
#: The click command behind each console script a unit may start.
COMMANDS: dict[str, click.Command] = {"jobq": jobq_main, "jobq-master": master_command}

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """section -> key -> values, in order (a key may repeat); comments and continuations as
    systemd reads them."""
    unit: Unit = {}
    section: dict[str, list[str]] = {}
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("["):
            section = unit.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


@pytest.fixture(scope="module")
def units() -> dict[str, Unit]:
    return {name: parse_unit(ETC / name) for name in UNITS}


def one(unit: Unit, section: str, key: str) -> str:
    [value] = unit[section][key]
    return value


def words(unit: Unit, section: str, key: str) -> list[str]:
    return [word for value in unit[section].get(key, []) for word in value.split()]


def environment(unit: Unit) -> dict[str, str]:
    pairs = [shlex.split(value) for value in unit["Service"].get("Environment", [])]
    return dict(item.split("=", 1) for group in pairs for item in group)


def exec_start(unit: Unit) -> list[str]:
    return shlex.split(one(unit, "Service", "ExecStart"))


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def parse_command_line(command: click.Command, prog: str, args: list[str]) -> click.Context:
    """Parse ``args`` as the command would, down to the subcommand they name, without running
    anything; a bad option, value or command name raises click's UsageError."""
    ctx = command.make_context(prog, list(args))
    while isinstance(ctx.command, click.Group):
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]  # click 8 keeps them apart
        name, sub, rest = ctx.command.resolve_command(ctx, rest)
        assert name is not None and sub is not None
        ctx = sub.make_context(name, rest, parent=ctx)
    return ctx


@pytest.mark.parametrize("name", UNITS)
def test_exec_start_is_an_installed_jobq_command_with_valid_options(
        units: dict[str, Unit], name: str) -> None:
    argv = exec_start(units[name])
    script = Path(argv[0]).name
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get(script, "").startswith("jobq."), f"{script} is no jobq entry point"
    ctx = parse_command_line(COMMANDS[script], script, argv[1:])
    assert ctx.find_root().params["config_path"] == "/etc/jobq/jobq.toml"
    # ... and the installed script takes them (--help after them: nothing is started)
    installed = Path(sys.executable).parent / script
    done = subprocess.run([str(installed), *argv[1:], "--help"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Usage: {script} {' '.join(ctx.command_path.split()[1:])}")


def test_the_server_unit_runs_the_embedded_server_in_the_foreground(
        units: dict[str, Unit]) -> None:
    server = units["jobq-server.service"]
    ctx = parse_command_line(jobq_main, "jobq", exec_start(server)[1:])
    assert ctx.command_path == "jobq server run"
    assert one(server, "Service", "Type") == "exec"  # valkey itself is the main process
    assert one(server, "Service", "KillSignal") == "SIGTERM"  # valkey's clean shutdown
    # the unit owns the data directory: systemd creates /var/lib/<StateDirectory>
    home = environment(server)["JOBQ_HOME"]
    assert home == "/var/lib/" + one(server, "Service", "StateDirectory")


def test_a_master_restart_never_reaches_the_server(units: dict[str, Unit]) -> None:
    master, server = units["jobq.service"], units["jobq-server.service"]
    assert one(master, "Service", "KillMode") == "mixed"  # why the server needs its own unit
    assert "jobq-server.service" in words(master, "Unit", "Wants")
    assert "jobq-server.service" in words(master, "Unit", "After")  # stops before the server
    # nothing ties the server to the master: no stop or restart of it propagates
    for key in ("Requires", "BindsTo", "PartOf", "Requisite"):
        assert "jobq.service" not in words(server, "Unit", key), key
        assert "jobq-server.service" not in words(master, "Unit", key), key
    assert "StateDirectory" not in master["Service"]  # one owner of the directory's mode


def test_the_units_and_the_sample_config_agree(units: dict[str, Unit]) -> None:
    master, server = units["jobq.service"], units["jobq-server.service"]
    for key in ("User", "Group"):
        assert one(master, "Service", key) == one(server, "Service", key), key
    master_argv, server_argv = exec_start(master), exec_start(server)
    assert Path(master_argv[0]).parent == Path(server_argv[0]).parent  # one venv
    assert option(master_argv, "--config") == option(server_argv, "--config")
    home = environment(server)["JOBQ_HOME"]
    assert environment(master)["JOBQ_HOME"] == home
    # the socket every client is told to use is the one the server unit serves
    socket_url = f'redis_url = "unix://{home}/valkey.sock"'
    sample = (ETC / "jobq.toml").read_text()
    for text in (sample, (ETC / "jobq.service").read_text()):
        assert socket_url in " ".join(text.replace("#", " ").split())
    group = one(server, "Service", "Group")
    for text in (sample, (ETC / "jobq-server.service").read_text()):
        assert f'"{group}"' in text
    # the exit codes no restart can fix are jobq's
    assert words(master, "Service", "RestartPreventExitStatus") == [
        str(exitcodes.USAGE), str(exitcodes.IMPORT), str(exitcodes.PIDFILE)]


def test_the_readme_sets_up_what_the_units_expect(units: dict[str, Unit]) -> None:
    master, server = units["jobq.service"], units["jobq-server.service"]
    readme = (ROOT / "README.md").read_text()
    production = readme[readme.index("## Production"):readme.index("## Benchmarks")]
    home = environment(server)["JOBQ_HOME"]
    assert f'redis_url = "unix://{home}/valkey.sock"' in production
    assert f'server_socket_group = "{one(server, "Service", "Group")}"' in production
    assert f"useradd --system --no-create-home {one(master, 'Service', 'User')}" in production
    config, group = option(exec_start(master), "--config"), one(master, "Service", "Group")
    assert f"install -D -m 0640 -g {group} etc/jobq.toml {config}" in production
    # logrotate: the file is in the directory the unit creates; USR1 to the master alone
    logs = f"/var/log/{one(master, 'Service', 'LogsDirectory')}/"
    assert f'log_file = "{logs}jobq.log"' in " ".join(production.split())
    assert f"{logs}jobq.log {{" in production
    assert "systemctl kill --kill-who=main --signal=USR1 jobq.service" in production


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian: apt-get install systemd): "
                           "the units' syntax is not verified; the other tests here still "
                           "check their commands and paths")
def test_systemd_analyze_verifies_the_units(units: dict[str, Unit], tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at this test's venv
    venv_bin = Path(exec_start(units["jobq.service"])[0]).parent
    for name in UNITS:
        text = (ETC / name).read_text().replace(f"{venv_bin}/", f"{Path(sys.executable).parent}/")
        (tmp_path / name).write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / n) for n in UNITS)],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
