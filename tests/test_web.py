"""The dashboard (``jobq web``) without a browser: the cache and the safety rules as pure
functions with a fake clock, then the pages and actions through Flask's test client against
a real server (the browser tests are in test_web_browser.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jobq_testtasks as tasks
import pytest
import redis
from conftest import free_port, run_in_this_process, subprocess_env

from jobq.queue import JobQueue
from jobq.registry import TaskResolver
from jobq.scheduler import Scheduler
from jobq.web import security
from jobq.web.cache import TtlCache
from jobq.worker_loop import Worker

flask = pytest.importorskip("flask", reason="the web extra (flask) is not installed")

from jobq.web.app import CSP, create_app  # noqa: E402
from jobq.web.data import Dashboard  # noqa: E402

TOKEN = "t0ken-for-the-tests-0123456789"
HOSTILE = "<script>alert(1)</script>"


# -- the cache (pure) -------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_key_is_read_once_per_ttl_whoever_asks() -> None:
    clock = Clock()
    cache = TtlCache(1.0, clock=clock)
    reads: list[int] = []

    def read() -> int:
        reads.append(1)
        return len(reads)

    assert [cache.get("k", read) for _ in range(50)] == [1] * 50
    clock.now += 0.99
    assert cache.get("k", read) == 1
    clock.now += 0.02
    assert cache.get("k", read) == 2
    cache.clear()
    assert cache.get("k", read) == 3 and cache.get("other", read) == 4


def test_viewers_asking_at_once_wait_for_one_read() -> None:
    cache = TtlCache(5.0)
    reads: list[int] = []
    gate = threading.Event()

    def read() -> str:
        reads.append(1)
        gate.wait(5)
        return "value"

    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(cache.get("k", read)))
               for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.05)  # let them all reach the cache: only one may be reading
    gate.set()
    for t in threads:
        t.join(5)
    assert got == ["value"] * 8 and len(reads) == 1


def test_a_failed_read_is_not_cached() -> None:
    cache = TtlCache(10.0)

    def fail() -> None:
        raise RuntimeError("server away")

    with pytest.raises(RuntimeError):
        cache.get("k", fail)
    assert cache.get("k", lambda: 7) == 7


def test_the_lock_table_holds_only_the_reads_in_flight() -> None:
    cache = TtlCache(10.0, max_keys=8)
    for i in range(1000):
        assert cache.get(("job", str(i)), lambda i=i: i) == i
    with pytest.raises(RuntimeError):
        cache.get("failing", lambda: (_ for _ in ()).throw(RuntimeError("x")))
    assert cache._locks == {} and len(cache._values) <= 8
    inside: list[int] = []
    cache.get("outer", lambda: inside.append(len(cache._locks)) or 1)
    assert inside == [1] and cache._locks == {}


# -- the safety rules (pure) ----------------------------------------------------------------------
def _refusal(**given: Any) -> str | None:
    facts = {"allowed": True, "token": TOKEN, "signed_in": True, "session_csrf": "abc",
             "form_csrf": "abc", "authorization": None, "origin": "http://127.0.0.1:8181",
             "host": "127.0.0.1:8181", **given}
    return security.refusal(**facts)


def test_an_action_needs_actions_on_a_session_and_its_csrf_token() -> None:
    assert _refusal() is None
    assert "--allow-actions" in str(_refusal(allowed=False))
    assert "sign in" in str(_refusal(signed_in=False))
    assert "CSRF" in str(_refusal(form_csrf=None))
    assert "CSRF" in str(_refusal(form_csrf="abd"))
    assert "CSRF" in str(_refusal(session_csrf=None, form_csrf=None))
    assert "another site" in str(_refusal(origin="http://evil.example"))
    assert "another site" in str(_refusal(origin="null"))
    assert _refusal(origin="http://127.0.0.1:8181") is None


def test_a_session_action_must_name_its_origin() -> None:
    assert "no Origin or Referer" in str(_refusal(origin=None))
    assert _refusal(origin=None, referer="http://127.0.0.1:8181/dlq?queue=x") is None
    assert "another site" in str(_refusal(origin=None, referer="http://evil.example/"))
    assert "another site" in str(_refusal(referer="http://127.0.0.1:8181/",
                                          origin="http://evil.example"))
    # a script with the token needs none (a browser cannot send the header cross-site)
    assert _refusal(origin=None, signed_in=False, authorization=f"Bearer {TOKEN}") is None
    assert "another site" in str(_refusal(origin="http://evil.example", signed_in=False,
                                          authorization=f"Bearer {TOKEN}"))


def test_a_bearer_token_acts_without_a_session() -> None:
    assert _refusal(signed_in=False, form_csrf=None, authorization=f"Bearer {TOKEN}") is None
    assert "wrong token" in str(_refusal(signed_in=False, authorization="Bearer nope"))
    assert "--allow-actions" in str(_refusal(allowed=False, authorization=f"Bearer {TOKEN}"))
    assert security.bearer("Basic abc") is None and security.bearer("bearer  x ") == "x"
    assert not security.same("", "") and not security.same(None, TOKEN)


def test_host_names_and_the_names_a_dashboard_answers_to() -> None:
    assert [security.host_name(h) for h in ("LocalHost:8181", "[::1]:8181", "[::1]", "::1",
                                             "example.com.", "127.0.0.1")] == \
        ["localhost", "::1", "::1", "::1", "example.com", "127.0.0.1"]
    assert security.allowed_hosts() == {"localhost", "127.0.0.1", "::1"}
    assert security.allowed_hosts(["0.0.0.0", "::", "[::]"]) == security.allowed_hosts()
    assert security.allowed_hosts(["192.0.2.7", "Proxy.Example"]) == \
        {"localhost", "127.0.0.1", "::1", "192.0.2.7", "proxy.example"}


def test_new_tokens_are_long_and_differ() -> None:
    tokens = {security.new_token() for _ in range(100)}
    assert len(tokens) == 100 and all(len(t) >= 32 for t in tokens)


# -- pages and actions, against a real server ---------------------------------------------------
@pytest.fixture
def dash(queue: JobQueue) -> Dashboard:
    return Dashboard(queue, cache=TtlCache(0.0))  # no caching: each request reads


@pytest.fixture
def client(dash: Dashboard) -> Any:
    return _browser(create_app(dash, allow_actions=True, token=TOKEN))


@pytest.fixture
def readonly(dash: Dashboard) -> Any:
    return create_app(dash).test_client()


def _browser(app: Any) -> Any:
    """A test client that sends what a browser sends with a form: its page's Origin."""
    c = app.test_client()
    c.environ_base["HTTP_ORIGIN"] = "http://localhost"
    return c


def _csrf(client: Any, path: str = "/") -> str:
    page = client.get(path).get_data(as_text=True)
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    if found:
        return found.group(1)
    with client.session_transaction() as s:
        return str(s["csrf"])


def _sign_in(client: Any) -> str:
    csrf = _csrf(client, "/login")
    reply = client.post("/login", data={"token": TOKEN, "csrf": csrf})
    assert reply.status_code == 302
    return _csrf(client)


def _failed_job(queue: JobQueue, *args: Any) -> str:
    """A job failed for good (``boom`` raises, no retry), run by a burst worker here."""
    job = queue.enqueue("jobq_testtasks:boom", *args, max_retries=0)
    run_in_this_process(Worker(["default"], config=queue.config, url=queue.url, burst=True,
                               resolver=TaskResolver(["jobq_testtasks"])))
    assert queue.get_status(job.id) == "failed"
    return job.id


def test_pages_escape_every_value_and_forbid_inline_script(client: Any, queue: JobQueue) -> None:
    job = queue.enqueue("jobq_testtasks:echo", HOSTILE, kwargs={"k": HOSTILE}, queue="default")
    reply = client.get(f"/job?id={job.id}")
    page = reply.get_data(as_text=True)
    assert reply.status_code == 200
    assert HOSTILE not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert reply.headers["Content-Security-Policy"] == CSP
    assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP
    assert reply.headers["X-Frame-Options"] == "DENY"
    assert "<script>" not in page.replace('<script src="/static/live.js" defer></script>', "")
    assert " style=" not in page and "<style" not in page


def test_every_page_answers(client: Any, queue: JobQueue) -> None:
    job = queue.enqueue("jobq_testtasks:add", 1, 2)
    group = queue.map("jobq_testtasks:square", [1, 2, 3])
    Scheduler(queue).schedule_interval("every-minute", "jobq_testtasks:noop", 60)
    for path, says in [("/", "default"), (f"/job?id={job.id}", "jobq_testtasks:add"),
                       ("/job", "Find a job"), ("/dlq", "Dead-letter queue of default"),
                       ("/schedules", "every-minute"), ("/groups", group.id),
                       ("/limits", "No limit"),
                       (f"/groups?id={group.id}", "0 done, 0 failed, of 3 item(s)"),
                       ("/login", "Sign in")]:
        reply = client.get(path)
        assert reply.status_code == 200, path
        assert says in reply.get_data(as_text=True), path
    assert client.get("/job?id=nope").status_code == 404
    assert client.get("/groups?id=nope").status_code == 404
    assert client.get("/dlq?queue=nope").status_code == 404


def _cells(page: str, row: str) -> list[str]:
    """The text of each cell of the table row whose data attribute is ``row``
    ('data-limit="gpu"'), tags stripped."""
    found = re.search(rf"<tr {re.escape(row)}>(.*?)</tr>", page, re.S)
    assert found, f"no row {row} in {page[-2000:]}"
    return [re.sub(r"<[^>]+>", "", c).strip()
            for c in re.findall(r"<td[^>]*>(.*?)</td>", found.group(1), re.S)]


def test_the_limits_page_shows_each_limit_and_its_use(readonly: Any, queue: JobQueue,
                                                      r: redis.Redis) -> None:
    k = queue.keys
    queue.set_limit("gpu", concurrency=2, rate="10/s", burst=3)
    queue.enqueue(tasks.one_at_a_time, "x")  # the task's own limit: concurrency 1
    r.hset(k.limit_running("gpu"), mapping={"job-a": "w1", "job-b": "w2"})  # 2 slots held
    r.sadd(k.limit_waiting("gpu"), "default")  # ... and jobs held back in default
    r.hset(k.limit_running(HOSTILE), "job-c", "w3")  # state of a name no jobq writes
    r.hset(k.limits, HOSTILE, '{"c": 1}')  # a definition no jobq writes: ignored
    reply = readonly.get("/limits")
    page = reply.get_data(as_text=True)
    assert reply.status_code == 200 and 'href="/limits"' in page
    assert _cells(page, 'data-limit="gpu"') == ["gpu", "2", "10/s", "3", "2 full", "3",
                                                "default"]
    assert _cells(page, 'data-limit="jobq_testtasks:one_at_a_time"') == [
        "jobq_testtasks:one_at_a_time", "1", "-", "-", "0", "-", "-"]
    hostile = 'data-limit="&lt;script&gt;alert(1)&lt;/script&gt;"'
    assert _cells(page, hostile)[0] == "&lt;script&gt;alert(1)&lt;/script&gt; deleted"
    assert HOSTILE not in page and 'id="limits" data-live' in page
    use = queue.limit_use()  # what jobq limit list shows: the same
    assert use["gpu"]["running"] == 2 and use[HOSTILE]["defined"] is False
    r.hdel(k.limit_running("gpu"), "job-a")
    assert _cells(readonly.get("/limits").get_data(as_text=True),
                  'data-limit="gpu"')[4] == "1"


def test_the_limit_names_a_scan_finds_are_kept_the_definitions_read_each_time(
        queue: JobQueue, r: redis.Redis) -> None:
    client = create_app(Dashboard(queue, cache=TtlCache(0.0))).test_client()
    assert "No limit" in client.get("/limits").get_data(as_text=True)
    r.hset(queue.keys.limit_running("leftover"), "job-a", "w1")  # found by the next scan
    queue.set_limit("gpu", concurrency=2)
    page = client.get("/limits").get_data(as_text=True)
    assert 'data-limit="gpu"' in page and "leftover" not in page
    fresh = create_app(Dashboard(queue, cache=TtlCache(0.0))).test_client()
    assert 'data-limit="leftover"' in fresh.get("/limits").get_data(as_text=True)


def test_the_groups_page_lists_the_maps_with_their_progress(readonly: Any, queue: JobQueue,
                                                            r: redis.Redis) -> None:
    from jobq.groups import GROUP_TTL

    done = queue.map("jobq_testtasks:square", [1, 2, 3])
    failed = queue.map("jobq_testtasks:boom", ["x"], max_retries=0)
    run_in_this_process(Worker(["default"], config=queue.config, url=queue.url, burst=True,
                               resolver=TaskResolver(["jobq_testtasks"])))
    waiting = queue.map("jobq_testtasks:square", range(5), chunksize=2)
    expired = queue.map("jobq_testtasks:square", [1])
    r.delete(queue.keys.group(expired.id))
    queue.broker.create_group("hostile", {"total": 1, "items": 1, "chunk": 1, "done": 0,
                                          "failed": 0, "task": HOSTILE,
                                          "created": time.time()}, ["j"], GROUP_TTL)
    page = readonly.get("/groups").get_data(as_text=True)
    rows = re.findall(r'<tr data-group="([^"]+)">', page)
    assert rows == ["hostile", waiting.id, failed.id, done.id]  # newest first
    assert expired.id not in page
    cells = _cells(page, f'data-group="{done.id}"')
    assert cells[0] == done.id and cells[1] == "jobq_testtasks:square" and cells[2] != "-"
    assert cells[3:] == ["finished", "3", "0", "3"]  # progress, done, failed, items
    assert _cells(page, f'data-group="{failed.id}"')[4:] == ["0", "1", "1"]
    assert _cells(page, f'data-group="{waiting.id}"')[1] == "jobq_testtasks:square 3 jobs of 2"
    assert _cells(page, f'data-group="{waiting.id}"')[3:] == ["", "0", "0", "5"]
    assert f'href="/groups?id={done.id}"' in page and 'id="groups" data-live' in page
    assert HOSTILE not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert readonly.get("/groups?id=hostile").status_code == 200


def test_the_group_page_reads_only_the_job_ids_it_shows(readonly: Any, queue: JobQueue,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from jobq.web.data import RELATED_SHOWN

    group = queue.map("jobq_testtasks:square", range(RELATED_SHOWN + 7))
    ranges: list[tuple[Any, ...]] = []
    real = queue.broker._r.lrange

    def lrange(key: Any, start: int, stop: int) -> Any:
        ranges.append((start, stop))
        return real(key, start, stop)

    monkeypatch.setattr(queue.broker._r, "lrange", lrange)
    page = readonly.get(f"/groups?id={group.id}").get_data(as_text=True)
    assert ranges == [(0, RELATED_SHOWN - 1)]
    assert page.count('href="/job?id=') == RELATED_SHOWN and "and 7 more job(s)" in page
    assert queue.broker.group_job_ids(group.id) == group.job_ids()
    assert len(group.job_ids()) == RELATED_SHOWN + 7  # the other callers still get them all
    assert queue.broker.group_job_ids(group.id, 2, 3) == group.job_ids()[2:4]


def test_an_overlong_id_is_a_400_before_any_read(readonly: Any, dash: Dashboard,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def no_read(*args: Any) -> None:
        raise AssertionError("read the server")

    for name in ("job", "group", "dead_letters", "overview"):
        monkeypatch.setattr(dash, name, no_read)
    for path in ("/job?id=", "/groups?id=", "/dlq?queue="):
        reply = readonly.get(path + "x" * 201)
        assert reply.status_code == 400, path
        assert "longer than 200 characters" in reply.get_data(as_text=True)


def test_a_request_for_another_host_name_is_refused(dash: Dashboard) -> None:
    """DNS rebinding: a site whose name now resolves to 127.0.0.1 still names itself."""
    app = create_app(dash, allow_actions=True, token=TOKEN, hosts=["0.0.0.0", "proxy.example"])
    c = app.test_client()
    for host in ("localhost", "localhost:8181", "127.0.0.1:8181", "[::1]:8181",
                 "proxy.example", "PROXY.example:443"):
        assert c.get("/", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:8181", "0.0.0.0:8181", "127.0.0.1.evil.example",
                 "[::2]:8181"):
        for path in ("/", "/job?id=x", "/static/live.js", "/login"):
            reply = c.get(path, headers={"Host": host})
            text = reply.get_data(as_text=True)
            assert reply.status_code == 400, (host, path)
            assert text.startswith("refused: this dashboard does not answer to the host name")
            assert text.count("\n") == 1 and "redis" not in text and "<" not in text
        reply = c.post("/actions/cancel", data={"job": "x"}, headers={
            "Host": host, "Authorization": f"Bearer {TOKEN}"})
        assert reply.status_code == 400


def test_get_never_changes_anything(client: Any, queue: JobQueue) -> None:
    job = queue.enqueue("jobq_testtasks:add", 1, 2)
    Scheduler(queue).schedule_interval("s1", "jobq_testtasks:noop", 60)
    _sign_in(client)
    for path in ("/actions/cancel", "/actions/requeue", "/actions/requeue-all",
                 "/actions/purge", "/actions/schedule", "/logout"):
        assert client.get(f"{path}?job={job.id}&queue=default&schedule=s1&op=pause"
                          f"&confirm=yes").status_code == 405, path
    assert queue.get_status(job.id) == "pending"
    assert Scheduler(queue).get("s1").paused is False  # type: ignore[union-attr]


def test_actions_are_refused_without_the_token(client: Any, readonly: Any,
                                               queue: JobQueue) -> None:
    job = queue.enqueue("jobq_testtasks:add", 1, 2)
    csrf = _csrf(client)
    # not signed in, with the session's CSRF token
    reply = client.post("/actions/cancel", data={"job": job.id, "csrf": csrf})
    assert reply.status_code == 403 and "sign in" in reply.get_data(as_text=True)
    # a wrong token, to sign in or as a bearer
    assert client.post("/login", data={"token": "x" * 30, "csrf": csrf}).status_code == 403
    reply = client.post("/actions/cancel", data={"job": job.id},
                        headers={"Authorization": "Bearer " + "x" * 30})
    assert reply.status_code == 403
    # the right token, on a read-only dashboard
    reply = readonly.post("/actions/cancel", data={"job": job.id},
                          headers={"Authorization": f"Bearer {TOKEN}"})
    assert reply.status_code == 403 and "--allow-actions" in reply.get_data(as_text=True)
    assert readonly.get("/login").status_code == 404
    assert queue.get_status(job.id) == "pending"
    # signed in, but no CSRF token, or from another site
    csrf = _sign_in(client)
    assert client.post("/actions/cancel", data={"job": job.id}).status_code == 403
    reply = client.post("/actions/cancel", data={"job": job.id, "csrf": csrf},
                        headers={"Origin": "http://evil.example"})
    assert reply.status_code == 403
    assert queue.get_status(job.id) == "pending"
    # ... and with both, it is done
    reply = client.post("/actions/cancel", data={"job": job.id, "csrf": csrf, "next": "/x"})
    assert reply.status_code == 302 and reply.headers["Location"] == "/x"
    assert queue.get_status(job.id) == "cancelled"
    # a bearer token alone does it too (a script's way)
    other = queue.enqueue("jobq_testtasks:add", 1, 2)
    fresh = create_app(Dashboard(queue), allow_actions=True, token=TOKEN).test_client()
    reply = fresh.post("/actions/cancel", data={"job": other.id},
                       headers={"Authorization": f"Bearer {TOKEN}"})
    assert reply.status_code == 302 and queue.get_status(other.id) == "cancelled"


def test_signing_in_renews_the_csrf_token_and_redirects_only_to_our_pages(client: Any) -> None:
    before = _csrf(client, "/login")
    reply = client.post("/login", data={"token": TOKEN, "csrf": before,
                                        "next": "//evil.example/"})
    assert reply.status_code == 302 and reply.headers["Location"] == "/"
    with client.session_transaction() as s:
        assert s["auth"] is True and s["csrf"] != before
    page = client.get("/").get_data(as_text=True)
    assert TOKEN not in page and "Sign out" in page


@pytest.mark.parametrize("target", ["/\t/evil.example/", "/\n/evil.example/", "/\r\n/x",
                                    "/\\evil.example", "/x\\y", "//evil.example",
                                    "http://evil.example/", "javascript:alert(1)", "evil",
                                    "/\x7f/evil.example", ""])
def test_next_never_leaves_the_dashboard(client: Any, target: str) -> None:
    csrf = _csrf(client, "/login")
    reply = client.post("/login", data={"token": TOKEN, "csrf": csrf, "next": target})
    assert reply.status_code == 302 and reply.headers["Location"] == "/"


def test_next_keeps_our_own_pages(client: Any) -> None:
    csrf = _csrf(client, "/login")
    reply = client.post("/login", data={"token": TOKEN, "csrf": csrf,
                                        "next": "/job?id=a%2Fb&x=1"})
    assert reply.status_code == 302 and reply.headers["Location"] == "/job?id=a%2Fb&x=1"


def test_the_session_cookie_is_lax_and_named_after_the_port(dash: Dashboard) -> None:
    """Lax: a link followed from another site brings the signed-in session along (with
    Strict it came without, and the fresh session overwrote the signed-in one)."""
    c = _browser(create_app(dash, allow_actions=True, token=TOKEN, port=8181))
    cookie = c.get("/login").headers["Set-Cookie"]
    assert cookie.startswith("jobq_web_8181=") and "SameSite=Lax" in cookie
    assert "HttpOnly" in cookie
    _sign_in(c)
    page = c.get("/", headers={"Referer": "http://elsewhere.example/"}).get_data(as_text=True)
    assert "Sign out" in page


def test_a_cookie_post_without_origin_or_referer_is_refused(client: Any,
                                                           queue: JobQueue) -> None:
    job = queue.enqueue("jobq_testtasks:add", 1, 2)
    csrf = _sign_in(client)
    del client.environ_base["HTTP_ORIGIN"]
    reply = client.post("/actions/cancel", data={"job": job.id, "csrf": csrf})
    assert reply.status_code == 403 and "no Origin or Referer" in reply.get_data(as_text=True)
    assert queue.get_status(job.id) == "pending"
    reply = client.post("/actions/cancel", data={"job": job.id, "csrf": csrf},
                        headers={"Referer": "http://localhost/job?id=x"})
    assert reply.status_code == 302 and queue.get_status(job.id) == "cancelled"


def test_signing_out_needs_the_csrf_token_and_our_origin(client: Any) -> None:
    csrf = _sign_in(client)
    assert client.post("/logout").status_code == 403
    assert client.post("/logout", data={"csrf": csrf},
                       headers={"Origin": "http://evil.example"}).status_code == 403
    assert "Sign out" in client.get("/").get_data(as_text=True)  # still signed in
    page = client.get("/").get_data(as_text=True)
    assert re.search(r'action="/logout"><input type="hidden" name="csrf" value="[^"]+"', page)
    reply = client.post("/logout", data={"csrf": csrf})
    assert reply.status_code == 302
    assert "Sign out" not in client.get("/").get_data(as_text=True)


def test_dead_letters_requeue_and_purge(client: Any, queue: JobQueue) -> None:
    first, second = _failed_job(queue, "one"), _failed_job(queue, "two")
    page = client.get("/dlq").get_data(as_text=True)
    assert first in page and second in page and "2 job(s) failed for good" in page
    assert "Requeue" not in page  # not signed in: no forms
    csrf = _sign_in(client)
    assert "Requeue all 2" in client.get("/dlq").get_data(as_text=True)
    client.post("/actions/requeue", data={"job": first, "csrf": csrf})
    assert queue.get_status(first) == "pending" and queue.failed_count() == 1
    reply = client.post("/actions/purge", data={"queue": "default", "csrf": csrf},
                        follow_redirects=True)
    assert "nothing purged" in reply.get_data(as_text=True) and queue.failed_count() == 1
    reply = client.post("/actions/purge", data={"queue": "default", "csrf": csrf,
                                                "confirm": "yes"}, follow_redirects=True)
    assert "purged 1 job(s)" in reply.get_data(as_text=True) and queue.failed_count() == 0


def test_the_job_page_shows_attempts_parents_and_dependents(client: Any,
                                                              queue: JobQueue) -> None:
    failed = _failed_job(queue, HOSTILE)
    page = client.get(f"/job?id={failed}").get_data(as_text=True)
    assert "attempt 1: ValueError: &lt;script&gt;" in page and "Traceback" in page
    parent = queue.enqueue("jobq_testtasks:add", 1, 2)
    child = queue.enqueue("jobq_testtasks:parents", depends_on=[parent])
    page = client.get(f"/job?id={parent.id}").get_data(as_text=True)
    assert "Jobs waiting for it" in page and child.id in page
    page = client.get(f"/job?id={child.id}").get_data(as_text=True)
    assert "deferred" in page and parent.id in page and "pending" in page


def test_a_long_value_is_cut_with_a_note() -> None:
    from jobq.web.app import cap

    assert cap("short") == "short" and cap(None) == ""
    assert cap("é" * 10, limit=5) == "éé\n… (truncated, 20 bytes in all)"


def test_the_job_page_caps_each_long_value(readonly: Any, queue: JobQueue) -> None:
    big = "x" * 100_000
    job = queue.enqueue("jobq_testtasks:echo", big, kwargs={"k": big})
    run_in_this_process(Worker(["default"], config=queue.config, url=queue.url, burst=True,
                               resolver=TaskResolver(["jobq_testtasks"])))
    assert queue.get_status(job.id) == "completed"
    for job_id, cut in ((job.id, 3), (_failed_job(queue, big), 1)):
        reply = readonly.get(f"/job?id={job_id}")
        page = reply.get_data(as_text=True)
        assert reply.status_code == 200 and len(page) < 5 * 16 * 1024
        assert page.count("truncated, ") >= cut  # arguments, keyword arguments, result
        assert re.search(r"<pre id=\"args\">\[\n  &#34;x{1000,}", page)  # " escaped
        assert "(truncated, 100,008 bytes in all)</pre>" in page  # the arguments' JSON


def test_schedule_actions(client: Any, queue: JobQueue) -> None:
    sched = Scheduler(queue)
    sched.schedule_interval("tick", "jobq_testtasks:noop", 60)
    csrf = _sign_in(client)
    client.post("/actions/schedule", data={"schedule": "tick", "op": "pause", "csrf": csrf})
    assert sched.get("tick").paused is True  # type: ignore[union-attr]
    assert "paused" in client.get("/schedules").get_data(as_text=True)
    client.post("/actions/schedule", data={"schedule": "tick", "op": "resume", "csrf": csrf})
    assert sched.get("tick").paused is False  # type: ignore[union-attr]
    before = queue.get_stats()["enqueued"]
    reply = client.post("/actions/schedule", data={"schedule": "tick", "op": "run-now",
                                                   "csrf": csrf}, follow_redirects=True)
    assert "ran now as job" in reply.get_data(as_text=True)
    assert queue.get_stats()["enqueued"] == before + 1
    assert client.post("/actions/schedule", data={"schedule": "tick", "op": "drop",
                                                  "csrf": csrf}).status_code == 400


def test_no_secret_is_shown(queue: JobQueue) -> None:
    queue.url += "?password=hunter2secret"  # what a page would show is the URL, redacted
    c = _browser(create_app(Dashboard(queue), allow_actions=True, token=TOKEN))
    for path in ("/", "/login", "/dlq", "/schedules", "/groups", "/limits"):
        page = c.get(path).get_data(as_text=True)
        assert "hunter2secret" not in page and TOKEN not in page, path
        assert "password=***" in page


def test_a_server_that_does_not_answer_is_a_503_page(redis_url: str) -> None:
    away = JobQueue("default", redis_url=redis_url,
                    connection=redis.Redis(port=free_port(), socket_connect_timeout=0.5))
    reply = create_app(Dashboard(away)).test_client().get("/")
    assert reply.status_code == 503
    assert "cannot read the server" in reply.get_data(as_text=True)


def test_the_503_page_hides_the_password_however_it_is_written(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = "redis://user:s%40cret-pass@127.0.0.1:1/0"
    away = JobQueue("default", redis_url=url,
                    connection=redis.Redis(port=free_port(), socket_connect_timeout=0.5))
    dash = Dashboard(away)

    def fail() -> None:
        raise redis.ConnectionError("cannot reach redis://user:s@cret-pass@127.0.0.1:1/0\n"
                                    "(password s%40cret-pass)")

    monkeypatch.setattr(dash, "overview", fail)
    reply = create_app(dash).test_client().get("/")
    text = reply.get_data(as_text=True)
    assert reply.status_code == 503 and "cannot read the server" in text
    assert "cret-pass" not in text


def test_a_dashboard_with_actions_needs_a_real_token(dash: Dashboard) -> None:
    with pytest.raises(ValueError, match="token"):
        create_app(dash, allow_actions=True, token="")


# -- the command ---------------------------------------------------------------------------------
def _first_lines(proc: subprocess.Popen[str], until: str, timeout: float = 15) -> str:
    """What the process printed up to the line containing ``until``."""
    said: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            said.append(line)
            if until in line:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert not reader.is_alive(), f"no {until!r} within {timeout} s: {''.join(said)!r}"
    return "".join(said)


def test_the_core_imports_nothing_of_the_web_extra() -> None:
    code = ("import sys, jobq, jobq.cli, jobq.queue, jobq.master.arbiter\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('flask', 'waitress', 'werkzeug', 'jinja2', 'jobq.web')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=subprocess_env(), check=True).stdout
    assert out.strip() == "[]"


def test_jobq_web_without_the_extra_says_so_in_one_line() -> None:
    code = (
        "import sys\n"
        "class NoFlask:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'flask':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoFlask())\n"
        "from jobq.cli import main\n"
        "main(['web'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=subprocess_env(), timeout=30)
    assert done.returncode == 2
    assert done.stderr == ("jobq: error: jobq web needs the web extra: pip install "
                           "'jobq[web]' (no module 'flask')\n")


def test_jobq_web_is_read_only_by_default(redis_url: str,
                                          spawn: Callable[..., subprocess.Popen[str]]) -> None:
    proc = spawn("web", "--port", "0")
    said = _first_lines(proc, "serving")
    address = re.search(r"serving (http://127\.0\.0\.1:\d+/) \(read-only\)", said)
    assert address and "token" not in said, said
    with urllib.request.urlopen(address.group(1), timeout=5) as reply:
        page = reply.read().decode()
        assert reply.headers["Content-Security-Policy"] == CSP
    assert "read-only" in page and "Sign in" not in page
    rebound = address.group(1).replace("127.0.0.1", "evil.example")
    request = urllib.request.Request(address.group(1), headers={"Host": rebound[7:-1]})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 400


def test_jobq_web_answers_the_allowed_host_names(redis_url: str, tmp_path: Path,
                                                 spawn: Callable[..., subprocess.Popen[str]]
                                                 ) -> None:
    config = tmp_path / "jobq.toml"
    config.write_text('web_allowed_hosts = ["from-config.example"]\n')
    proc = spawn("web", "--port", "0", "--allowed-host", "proxy.example", "--allowed-host",
                 "other.example", "--config", str(config))
    address = re.search(r"serving (http://127\.0\.0\.1:\d+/)", _first_lines(proc, "serving"))
    assert address
    for host, code in (("proxy.example", 200), ("other.example:80", 200),
                       ("from-config.example", 200), ("evil.example", 400)):
        request = urllib.request.Request(address.group(1), headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                got = reply.status
        except urllib.error.HTTPError as exc:
            got = exc.code
        assert got == code, host


def test_jobq_web_takes_the_config_token_and_never_prints_it(
        redis_url: str, tmp_path: Path, queue: JobQueue,
        spawn: Callable[..., subprocess.Popen[str]]) -> None:
    config = tmp_path / "jobq.toml"
    config.write_text(f'web_token = "{TOKEN}"\n')
    proc = spawn("web", "--allow-actions", "--port", "0", "--config", str(config))
    said = _first_lines(proc, "serving")
    assert TOKEN not in said and "token to sign in with" not in said, said
    address = re.search(r"serving (http://127\.0\.0\.1:\d+/) \(actions allowed\)", said)
    assert address, said
    with urllib.request.urlopen(address.group(1) + "login", timeout=5) as reply:
        port = address.group(1).rsplit(":", 1)[1].strip("/")
        assert reply.headers["Set-Cookie"].startswith(f"jobq_web_{port}=")
    job = queue.enqueue("jobq_testtasks:add", 1, 2)
    request = urllib.request.Request(address.group(1) + "actions/cancel", method="POST",
                                     data=f"job={job.id}".encode(),
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=5) as reply:
        assert reply.status == 200  # redirected to the queues page
    assert queue.get_status(job.id) == "cancelled"
