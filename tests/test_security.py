"""Security: nothing read from Redis is unpickled or evaluated; AUTH with requirepass and with
an ACL user; TLS end to end (through a TLS terminator: the bundled valkey has no TLS); the
password never shows anywhere; the embedded server is private to its user. Real servers, real
master and worker processes."""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import signal
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jobq_testtasks as tasks
import psutil
import pytest
import redis
from conftest import ROOT, free_port, key, stop_server, subprocess_env, wait_until
from tlsproxy import TLSProxy

from jobq import exitcodes
from jobq.connection import connect
from jobq.job import JobStatus
from jobq.keys import Keys
from jobq.queue import JobQueue
from jobq.server import EmbeddedServer

Spawn = Callable[..., subprocess.Popen[str]]
K = Keys()
PACKAGE = ROOT / "jobq"
#: The password of the protected server: distinctive, so that a leak is found by grep.
PASSWORD = "TOPSECRET-pw-7Qx2Zr"
APP_USER, APP_PASSWORD = "app", "APPSECRET-pw-9Lm4Tk"
#: Small limits, so that masters start and stop quickly.
CONFIG = {"lease_time": 2.0, "graceful_timeout": 5.0, "retry_backoff_base": 0.05,
          "retry_jitter": 0.0, "scheduler_tick": 0.1}








@pytest.fixture(scope="module")
def pw_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """A second real server with requirepass, listening on its unix socket and (for the
    redis:// forms) on 127.0.0.1:<port>; it has an ACL user too. ``.port`` is the TCP port."""
    server = EmbeddedServer(tmp_path_factory.mktemp("pw"))
    port = free_port()
    server.start(extra={"requirepass": PASSWORD, "port": str(port), "bind": "127.0.0.1"})
    server.port = port  # type: ignore[attr-defined]
    admin = connect(f"unix://:{PASSWORD}@{server.socket_path}")
    admin.execute_command("ACL", "SETUSER", APP_USER, "on", f">{APP_PASSWORD}", "~*", "&*",
                          "+@all")
    admin.close()
    yield server
    stop_server(server)


@pytest.fixture
def admin(pw_server: EmbeddedServer) -> Iterator[redis.Redis]:
    """The protected server, emptied, as its default (password) user."""
    client = connect(f"unix://:{PASSWORD}@{pw_server.socket_path}")
    client.flushall()
    yield client
    client.close()


def write_config(tmp_path: Path, **values: Any) -> Path:
    path = tmp_path / f"jobq-{key()}.toml"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in {**CONFIG, **values}.items()))
    return path


def start_master(spawn: Spawn, tmp_path: Path, url: str, *args: str,
                 workers: int = 1) -> subprocess.Popen[str]:
    env = subprocess_env(JOBQ_CONFIG=str(write_config(tmp_path)))
    return spawn("-I", "jobq_testtasks", "-w", str(workers), "--redis-url", url, *args,
                 env=env, module="jobq.cli.master")


def children(proc: subprocess.Popen[str]) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children()
    except psutil.NoSuchProcess:
        return []


def titles(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(" ".join(arg for arg in p.cmdline() if arg))  # setproctitle pads
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
    return out


def wait_master_ready(master: subprocess.Popen[str], workers: int = 1) -> list[str]:
    """Wait until the master runs ``workers`` idle workers and its scheduler; their titles."""
    def ready() -> list[str] | None:
        assert master.poll() is None, f"the master exited: {master.communicate()[1]}"
        names = titles(children(master))
        idle = [t for t in names if t.startswith("jobq worker") and t.endswith(": idle")]
        if len(idle) == workers and any(t.startswith("jobq scheduler") for t in names):
            return names
        return None

    return wait_until(ready, timeout=20, interval=0.05, message="the master to be ready")


def stop_master(master: subprocess.Popen[str]) -> tuple[str, str]:
    master.send_signal(signal.SIGTERM)
    out, err = master.communicate(timeout=30)
    assert master.returncode == 0, err
    return out, err


def run_jobs_through(url: str, spawn: Spawn, tmp_path: Path) -> None:
    """Enqueue over ``url``, let a master on ``url`` run the jobs, read the results back."""
    queue = JobQueue("default", redis_url=url)
    ok = queue.enqueue(tasks.add, 20, 22)
    master = start_master(spawn, tmp_path, url)
    wait_master_ready(master)
    many = queue.enqueue_many(tasks.add, [(i, i) for i in range(20)])
    assert ok.result(timeout=20) == 42
    assert [j.result(timeout=20) for j in many] == [2 * i for i in range(20)]
    stop_master(master)


def one_line(err: str) -> str:
    assert err.count("\n") == 1, err
    assert "Traceback" not in err, err
    return err.strip()


# -- nothing from Redis is unpickled or evaluated -----------------------------------------------

#: Modules that turn bytes into live objects or code.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle",
                  "jsonpickle", "yaml", "ruamel"}
#: Builtins that run code given as data.
UNSAFE_CALLS = {"eval", "exec", "compile", "__import__", "execfile"}


def unsafe_uses(source: str) -> list[str]:
    """Imports of unsafe modules and calls of code-running builtins, found in the syntax tree
    (so comments and docstrings that talk about pickle do not count; code does)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names
                      if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNSAFE_MODULES:
                found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            fn = node.func
            if isinstance(fn, ast.Name) and fn.id in UNSAFE_CALLS:
                found.append(f"{fn.id}(...)")
            elif isinstance(fn, ast.Attribute) and fn.attr in UNSAFE_CALLS | {
                    "loads", "load", "unsafe_load", "full_load"} and isinstance(
                    fn.value, ast.Name) and fn.value.id in UNSAFE_MODULES | {"builtins"}:
                found.append(f"{fn.value.id}.{fn.attr}(...)")
        elif isinstance(node, ast.Name) and node.id in UNSAFE_MODULES | {"eval", "exec"}:
            found.append(f"name {node.id}")
    return found


def test_the_checker_finds_what_it_looks_for() -> None:
    # the static check below is only worth something if it would catch these
    for code in ("import pickle", "from pickle import loads", "import marshal as m",
                 "x = eval(s)", "exec(code)", "yaml.load(s)", "import yaml.constructor",
                 "f = __import__(name)", "builtins.eval(s)", "call(eval)",
                 "compile(src, 'f', 'exec')", "import dill", "from cloudpickle import x"):
        assert unsafe_uses(code), code
    for code in ("json.loads(s)", "'''we never pickle nor eval'''", "# import pickle",
                 "x.evaluate()", "importlib.import_module(name)", "ast.literal_eval(s)"):
        assert not unsafe_uses(code), code


def test_the_package_never_unpickles_or_evaluates() -> None:
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 20 and PACKAGE / "worker_loop.py" in sources
    problems = {}
    for path in sources:
        text = path.read_text("utf-8")
        found = unsafe_uses(text)
        # and the plain text too, for what a syntax tree hides (getattr(builtins, "eval"))
        found += re.findall(r"\bpickle\b|\bmarshal\b|yaml\.(?:unsafe_|full_)?load|"
                            r"['\"](?:eval|exec)['\"]", _code_only(text))
        if found:
            problems[str(path.relative_to(ROOT))] = found
    assert problems == {}
    for path in sorted((PACKAGE / "lua").glob("*.lua")):
        lua = "\n".join(line.split("--", 1)[0] for line in path.read_text().splitlines())
        assert not re.search(r"\bloadstring\b|\bload\s*\(|\bdofile\b|\bloadfile\b", lua), path


def _code_only(source: str) -> str:
    """The source without comments and docstrings (strings that are whole statements)."""
    import io
    import tokenize

    out = []
    prev = tokenize.INDENT
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            continue
        if tok.type == tokenize.STRING and prev in (tokenize.INDENT, tokenize.NEWLINE,
                                                    tokenize.DEDENT, tokenize.NL):
            prev = tok.type
            continue
        out.append(tok.string)
        if tok.type not in (tokenize.NL, tokenize.COMMENT):
            prev = tok.type
    return " ".join(out)


class _Exploit:
    """Unpickling this runs a shell command."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.target}",))


def test_pickle_and_reduce_payloads_are_only_ever_data(queue: JobQueue, r: redis.Redis,
                                                       spawn: Spawn, tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    proto0 = pickle.dumps(_Exploit(target), protocol=0)  # ASCII: a str argument can hold it
    payloads = [
        proto0.decode("ascii"),
        f"cos\nsystem\n(S'touch {target}'\ntR.",
        {"__reduce__": ["os.system", [f"touch {target}"]]},
        {"py/reduce": [{"py/function": "os.system"}, {"py/tuple": [f"touch {target}"]}]},
        {"py/object": "subprocess.Popen", "args": ["touch", str(target)]},
        {"__class__": "os._wrap_close", "__init__": {"__globals__": "system"}},
        "__import__('os').system('touch " + str(target) + "')",
        "!!python/object/apply:os.system ['touch " + str(target) + "']",
    ]
    job = queue.enqueue(tasks.echo, *payloads, kwargs={"k": payloads[2]})
    # the pickles themselves where the job's record should be: bytes, never unpickled
    for i, raw in enumerate([proto0, pickle.dumps(_Exploit(target), protocol=5)]):
        pipe = r.pipeline()
        pipe.rpush(K.level("default", 0), f"pickled-{i}").zadd(K.levels("default"), {"0": 0})
        pipe.hincrby(K.stats("default"), "pending", 1).hset(K.jobs, f"pickled-{i}", raw)
        pipe.execute()
    worker = spawn("worker", "-I", "jobq_testtasks", "--burst")
    _, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
    assert not target.exists()
    done = queue.get_job(job.id)
    assert done is not None and done.status is JobStatus.COMPLETED
    assert done.return_value == {"args": payloads, "kwargs": {"k": payloads[2]}}
    for i, reason in enumerate(["not valid JSON", "not valid UTF-8"]):
        failed = queue.get_job(f"pickled-{i}")
        assert failed is not None and failed.status is JobStatus.FAILED
        assert failed.error is not None and failed.error.startswith("BadJob: ")
        assert reason in failed.error
    assert not target.exists()


# -- AUTH: requirepass and ACL users ------------------------------------------------------------

def test_requirepass_over_unix_socket_and_tcp(pw_server: EmbeddedServer, admin: redis.Redis,
                                              spawn: Spawn, tmp_path: Path) -> None:
    sock = pw_server.socket_path
    port = pw_server.port  # type: ignore[attr-defined]
    for url in (f"unix://:{PASSWORD}@{sock}", f"redis://:{PASSWORD}@127.0.0.1:{port}/0"):
        admin.flushall()
        run_jobs_through(url, spawn, tmp_path)
        assert int(admin.hget(K.stats("default"), "completed") or 0) == 21  # the protected one
    # redis-py's own unix form: the password as a query parameter
    queue = JobQueue("default", redis_url=f"unix://{sock}?password={PASSWORD}")
    assert queue.enqueue(tasks.noop).id in admin.hkeys(K.jobs)


def test_acl_user(pw_server: EmbeddedServer, admin: redis.Redis, spawn: Spawn,
                  tmp_path: Path) -> None:
    url = f"unix://{APP_USER}:{APP_PASSWORD}@{pw_server.socket_path}"
    queue = JobQueue("default", redis_url=url)
    job = queue.enqueue(tasks.add, 1, 2)
    master = start_master(spawn, tmp_path, url, workers=2)
    wait_master_ready(master, workers=2)
    assert job.result(timeout=20) == 3
    # the master, its workers and its scheduler are logged in as the ACL user
    as_app = [c for c in admin.client_list() if c["user"] == APP_USER]
    assert len(as_app) >= 4, admin.client_list()
    stop_master(master)
    tcp = f"redis://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{pw_server.port}/0"  # type: ignore
    assert JobQueue("default", redis_url=tcp).get_job(job.id).return_value == 3  # type: ignore


def test_a_wrong_password_is_exit_3_with_one_line(pw_server: EmbeddedServer,
                                                  admin: redis.Redis, spawn: Spawn,
                                                  tmp_path: Path) -> None:
    sock, port = pw_server.socket_path, pw_server.port  # type: ignore[attr-defined]
    wrong = "WRONG-pw-3Kd8"
    urls = [f"unix://:{wrong}@{sock}", f"unix://{APP_USER}:{wrong}@{sock}",
            f"unix://{sock}?password={wrong}", f"redis://:{wrong}@127.0.0.1:{port}/0",
            f"redis://{APP_USER}:{wrong}@127.0.0.1:{port}/0",
            f"redis://127.0.0.1:{port}/0"]  # no password at all
    procs = []
    for url in urls:
        procs.append((url, "jobq-master", start_master(spawn, tmp_path, url)))
        procs.append((url, "jobq", spawn("--redis-url", url, "info")))
        procs.append((url, "jobq", spawn("--redis-url", url, "worker", "-I", "jobq_testtasks")))
    for url, prog, proc in procs:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == exitcodes.CONNECT, (prog, url, err)
        line = one_line(err)
        assert line.startswith(f"{prog}: error: authentication failed for "), line
        assert wrong not in line and out == ""
        if wrong in url:
            assert "***" in line
    assert admin.dbsize() == 0  # nothing started, nothing written


# -- TLS ------------------------------------------------------------------------------------------

@pytest.fixture
def tls(server_home: Path, tmp_path: Path) -> Iterator[TLSProxy]:
    """TLS in front of the session server."""
    proxy = TLSProxy(EmbeddedServer(server_home).socket_path, tmp_path).start()
    yield proxy
    proxy.stop()


def test_tls_end_to_end_with_a_verified_certificate(tls: TLSProxy, redis_url: str,
                                                    r: redis.Redis, spawn: Spawn,
                                                    tmp_path: Path) -> None:
    url = tls.url()
    assert url.startswith("rediss://127.0.0.1:") and "ssl_ca_certs=" in url
    run_jobs_through(url, spawn, tmp_path)
    assert int(r.hget(K.stats("default"), "completed") or 0) == 21  # the same server behind
    assert tls.sessions >= 3  # producer, master, worker, scheduler: all through TLS
    # the port speaks TLS only: plain text is dropped...
    with pytest.raises(redis.ConnectionError):
        connect(f"redis://127.0.0.1:{tls.port}/0").ping()
    # ...and the certificate is verified: without the test CA it is refused
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        connect(f"rediss://127.0.0.1:{tls.port}/0").ping()
    plain = spawn("--redis-url", f"redis://127.0.0.1:{tls.port}/0", "info")
    _, err = plain.communicate(timeout=30)
    assert plain.returncode == exitcodes.CONNECT, err
    assert one_line(err).startswith("jobq: error: cannot connect to redis://127.0.0.1:")
    info = spawn("--redis-url", url, "info", "--json")
    out, err = info.communicate(timeout=30)
    assert info.returncode == 0, err
    assert json.loads(out)["queues"][0]["completed"] == 21


def test_tls_with_a_password(pw_server: EmbeddedServer, admin: redis.Redis, spawn: Spawn,
                             tmp_path: Path) -> None:
    proxy = TLSProxy(pw_server.socket_path, tmp_path).start()
    try:
        run_jobs_through(proxy.url(password=PASSWORD), spawn, tmp_path)
        assert int(admin.hget(K.stats("default"), "completed") or 0) == 21
        wrong = spawn("--redis-url", proxy.url(password="WRONG-pw-5Vn1"), "info")
        _, err = wrong.communicate(timeout=30)
        assert wrong.returncode == exitcodes.CONNECT, err
        line = one_line(err)
        assert "authentication failed for rediss://:***@127.0.0.1:" in line
        assert "WRONG-pw-5Vn1" not in line
    finally:
        proxy.stop()


# -- the password never shows --------------------------------------------------------------------

def dump_redis(server: EmbeddedServer) -> str:
    """Every key and value of the server's database 0, as text."""
    raw = connect(f"unix://:{PASSWORD}@{server.socket_path}", decode_responses=False)
    out = []
    for name in raw.scan_iter(count=1000):
        kind = raw.type(name)
        if kind == b"string":
            value: Any = raw.get(name)
        elif kind == b"hash":
            value = raw.hgetall(name)
        elif kind == b"list":
            value = raw.lrange(name, 0, -1)
        elif kind == b"set":
            value = raw.smembers(name)
        elif kind == b"zset":
            value = raw.zrange(name, 0, -1, withscores=True)
        else:
            value = kind
        out.append(f"{name!r} {value!r}")
    raw.close()
    return "\n".join(out)


def test_the_password_never_shows(pw_server: EmbeddedServer, admin: redis.Redis, spawn: Spawn,
                                  tmp_path: Path, quick_connect: Path) -> None:
    port = pw_server.port  # type: ignore[attr-defined]
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    unreachable = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    wrong_secret = "WRONGSECRET-pw-2Hf6"
    wrong = f"redis://:{wrong_secret}@127.0.0.1:{port}/0"
    log_file = tmp_path / "master.log"
    seen: dict[str, str] = {}  # where -> what it showed

    master = start_master(spawn, tmp_path, url, "--log-file", str(log_file), "--log-level",
                          "debug", workers=2)
    names = wait_master_ready(master, workers=2)
    queue = JobQueue("default", redis_url=url)
    ok = queue.enqueue(tasks.add, 1, 2)
    bad = queue.enqueue(tasks.boom, "kaput", max_retries=1)
    assert ok.result(timeout=20) == 3
    wait_until(lambda: queue.get_status(bad.id) == "failed", timeout=20,
               message="the failing job to fail")
    # process titles (setproctitle rewrites the command line the password was given on)
    procs = [psutil.Process(master.pid), *children(master)]
    seen["titles"] = "\n".join(titles(procs) + names)
    assert re.search(r"^jobq-master \[default\] workers=2", seen["titles"], re.M)
    assert seen["titles"].count("jobq worker") >= 2 and "jobq scheduler" in seen["titles"]

    def jobq(*args: str, code: int = 0) -> str:
        proc = spawn(*args)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == code, (args, err)
        return out + err

    seen["info"] = jobq("--redis-url", url, "info")
    seen["info --json"] = jobq("--redis-url", url, "info", "--json")
    assert json.loads(seen["info --json"])["masters"], "the master is not in the info"
    seen["job"] = jobq("--redis-url", url, "job", bad.id)
    seen["dlq"] = jobq("--redis-url", url, "dlq", "list", "--json")
    seen["debug job"] = jobq("--debug", "--redis-url", url, "job", "no-such-job",
                             code=exitcodes.NOT_FOUND)
    seen["unreachable"] = jobq("--redis-url", unreachable, "info", code=exitcodes.CONNECT)
    seen["unreachable --debug"] = jobq("--debug", "--redis-url", unreachable, "info",
                                       code=exitcodes.CONNECT)
    seen["wrong --debug"] = jobq("--debug", "--redis-url", wrong, "enqueue",
                                 "jobq_testtasks:add", "[1, 2]", code=exitcodes.CONNECT)
    seen["bad scheme"] = jobq("--redis-url", f"http://:{PASSWORD}@example.com", "info",
                              code=exitcodes.USAGE)
    wrong_master = start_master(spawn, tmp_path, wrong)
    _, seen["master, wrong password"] = wrong_master.communicate(timeout=30)
    assert wrong_master.returncode == exitcodes.CONNECT
    seen["redis"] = dump_redis(pw_server)
    out, err = stop_master(master)
    seen["master stdout+stderr"] = out + err
    seen["log file"] = log_file.read_text()

    # what was collected is the real thing: tracebacks, redacted URLs, job records, logs
    assert "Traceback" in seen["unreachable --debug"] and "Traceback" in seen["wrong --debug"]
    assert "redis://:***@127.0.0.1:" in seen["unreachable"]
    assert "authentication failed for redis://:***@127.0.0.1:" in seen["wrong --debug"]
    assert "http://:***@example.com" in seen["bad scheme"]
    assert bad.id in seen["redis"] and "kaput" in seen["redis"] and "ValueError" in seen["job"]
    assert "jobq_testtasks:boom" in seen["log file"] and "master" in seen["log file"]
    for where, text in seen.items():
        for secret in (PASSWORD, wrong_secret):
            assert secret not in text, f"the password shows in {where}"
            assert secret.split("-")[0] not in text, f"part of the password shows in {where}"


# -- the embedded server is private --------------------------------------------------------------

def listening_inet(pid: int) -> list[Any]:
    return [c for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN]


def test_the_embedded_server_listens_only_on_a_private_unix_socket(
        server_home: Path, pw_server: EmbeddedServer) -> None:
    server = EmbeddedServer(server_home)
    pid = server.pid()
    assert pid is not None
    assert listening_inet(pid) == []
    unix = [c for c in psutil.Process(pid).net_connections(kind="unix")
            if c.laddr == str(server.socket_path)]
    assert unix, "the server does not listen on its socket"
    assert stat.S_ISSOCK(server.socket_path.stat().st_mode)
    assert stat.S_IMODE(server.socket_path.stat().st_mode) == 0o700
    assert stat.S_IMODE(server_home.stat().st_mode) == 0o700
    assert stat.S_IMODE(server.conf_path.stat().st_mode) == 0o600  # may hold requirepass
    # the check above sees a TCP listener when there is one (the second server has one)
    control = pw_server.pid()
    assert control is not None
    assert [c.laddr.port for c in listening_inet(control)] == [
        pw_server.port]  # type: ignore[attr-defined]


def test_jobq_home_is_created_private_and_tightened(tmp_path: Path) -> None:
    home = tmp_path / "new" / "home"
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    old_umask = os.umask(0)  # a process that creates everything world-writable
    started = []
    try:
        for path in (home, loose):
            server = EmbeddedServer(path)
            server.start()
            started.append(server)
            assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
            assert stat.S_IMODE(server.socket_path.stat().st_mode) == 0o700
            assert stat.S_IMODE(server.conf_path.stat().st_mode) == 0o600
            other = os.stat(server.lock_path).st_mode
            assert stat.S_IMODE(other) & 0o077 == 0, oct(other)
    finally:
        os.umask(old_umask)
        for server in started:
            stop_server(server)
