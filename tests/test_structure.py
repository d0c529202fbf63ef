"""The package's structure, read from its source (no import is run): dependencies point one
way, each protocol has one owner.

* No import cycle among jobq's modules, imports inside functions counted.
* An import inside a function is allowed only where :data:`LAZY` lists it with its reason.
* Lua scripts are called from :mod:`jobq.broker` only (one exception, listed with its reason
  in :data:`LUA_ELSEWHERE`: the bench's reference, which is not jobq's protocol); Redis key
  names are built in :mod:`jobq.keys` only.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jobq"

#: (module, module it imports inside a function): why that import is not at the top.
LAZY: dict[tuple[str, str], str] = {
    ("jobq.cli", "jobq.cli.master"): "`jobq` itself never needs the master's machinery",
    ("jobq.cli.bench", "jobq.bench"): "the bench's own tasks register only when it runs",
    ("jobq.cli.run", "jobq.demo"): "the demo's own tasks register only when it runs",
    ("jobq.cli.web", "jobq.web.server"): "only `jobq web` needs the web extra (Flask, waitress)",
    ("jobq", "jobq.pool"): "`import jobq` stays light: WorkerPool brings the master along",
    ("jobq", "jobq.scheduler"): "`import jobq` stays light: loaded on first use",
    ("jobq", "jobq.store"): "`import jobq` stays light: loaded on first use",
    ("jobq.metrics", "jobq.metrics.exporter"): (
        "prometheus_client (the metrics extra) is imported only when metrics are on"),
}


#: Modules that call Lua scripts of their own, not jobq's: why. jobq's scripts (jobq/lua) are
#: called from jobq.broker only, through jobq.scripts, which loads them.
LUA_ELSEWHERE: dict[str, str] = {
    "jobq.benchref": (
        "the bench's bare claim/ack loop: the yardstick jobq's throughput is measured against, "
        "two tiny scripts of its own on keys of its own, not jobq's protocol"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports_of(name: str, path: Path, modules: set[str]) -> list[tuple[str, bool]]:
    """The jobq modules ``name`` imports, each with whether the import is in a function."""
    is_package = path.name == "__init__.py"
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend((a.name, nested) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(name, is_package, child)
                for alias in child.names:  # "from . import x" imports the module x
                    sub = f"{target}.{alias.name}"
                    found.append((sub if sub in modules else target, nested))
            visit(child, nested)

    visit(ast.parse(path.read_text("utf-8"), str(path)), False)
    return [(t, f) for t, f in found if t in modules and t != name]


def _imports() -> dict[str, list[tuple[str, bool]]]:
    """module -> [(imported jobq module, inside a function?)]."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports_of(name, path, set(modules)) for name, path in modules.items()}


GRAPH = _imports()


def test_the_graph_is_read() -> None:
    assert "jobq.worker_loop" in GRAPH and "jobq.broker" in GRAPH
    assert ("jobq.broker", False) in GRAPH["jobq.worker_loop"]
    assert ("jobq.pool", True) in GRAPH["jobq"]


def test_nothing_in_jobq_imports_the_worker_package_face() -> None:
    """``jobq.worker`` only hands on names for scripts (WorkerPool, above the master, and
    Worker); jobq's own modules import ``jobq.worker_loop``."""
    users = sorted(m for m, targets in GRAPH.items() if any(t == "jobq.worker" for t, _ in targets))
    assert users == []


def test_the_command_line_sits_above_everything_it_runs() -> None:
    """jobq.cli imports the master and the rest; nothing outside it imports jobq.cli (the
    ``python -m`` entry of ``jobq-master`` is jobq.cli.master itself)."""
    users = sorted(m for m, targets in GRAPH.items() if not m.startswith("jobq.cli")
                   and any(t == "jobq.cli" or t.startswith("jobq.cli.") for t, _ in targets))
    assert users == []


def test_no_import_cycle() -> None:
    edges = {m: {t for t, _ in targets} for m, targets in GRAPH.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                walk(t)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            walk(m)


def test_imports_inside_functions_are_listed_with_their_reason() -> None:
    unlisted = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() for t, inside in targets
                      if inside and (m, t) not in LAZY)
    assert not unlisted, f"imports inside functions, not listed in LAZY: {unlisted}"
    stale = sorted(f"{m} -> {t}" for m, t in LAZY if (t, True) not in GRAPH.get(m, []))
    assert not stale, f"LAZY lists imports that are gone: {stale}"


def _calls_to(attribute: str) -> set[str]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == attribute:
                found.add(_module_name(path))
    return found


#: The commands that run Lua, as a raw command names them (``send_command("EVALSHA", ...)``).
LUA_COMMANDS = {"eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro", "script"}


def _commands_sent(name: str) -> set[str]:
    """Modules with a string constant that is exactly a command running Lua."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and node.value.lower() == name):
                found.add(_module_name(path))
    return found


def test_lua_scripts_are_called_from_the_broker_only() -> None:
    assert _calls_to("scripts") <= {"jobq.broker"}
    allowed = {"jobq.broker", "jobq.scripts", *LUA_ELSEWHERE}
    for call in ("eval", "evalsha", "register_script", "run_many", "script_load", "fcall"):
        assert _calls_to(call) <= allowed, call
    for command in LUA_COMMANDS:
        assert _commands_sent(command) <= allowed, command


def test_the_exceptions_to_the_lua_rule_call_lua() -> None:
    """An exception stays listed only while its module runs scripts (not stale)."""
    for module in LUA_ELSEWHERE:
        assert any(module in _commands_sent(c) for c in LUA_COMMANDS), module


#: What a key name built by hand looks like: ``f"{base}:jobs"``, ``f"{b}:q:{queue}"``, or
#: a literal ``"{jobq}:..."``.
KEY_NAME = re.compile(r"^(\{\}|\{[A-Za-z0-9_.:-]+\}):[a-z_]+(:|$)")


def test_key_names_are_built_in_keys_only() -> None:
    """No string shaped like a jobq key name outside keys.py (the broker passes the key base
    to the Lua scripts, which build names from it, as keys.py documents)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "keys.py":
            continue
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            text = None
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "{}"
                               for v in node.values)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
            if text is not None and KEY_NAME.match(text):
                offenders.append(f"{_module_name(path)}:{node.lineno}")
            elif isinstance(node, ast.Attribute) and node.attr == "base" and isinstance(
                    node.value, ast.Attribute) and node.value.attr == "keys":
                offenders.append(f"{_module_name(path)}:{node.lineno} (keys.base)")
    allowed = {o for o in offenders if o.startswith("jobq.broker:") and "keys.base" in o}
    assert sorted(set(offenders) - allowed) == []
