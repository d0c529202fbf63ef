"""The dashboard in a real browser: Chromium (the system's, driven by Selenium through the
system's chromedriver) against ``jobq web --allow-actions`` and a real ``jobq-master``, both
started here as processes. The tests click requeue, pause and cancel, and check what the page
then shows and what happened on the server; a hostile argument is shown as text, no dialog
fires; actions without the token are refused; GET changes nothing. With ``JOBQ_SCREENSHOTS``
set, PNG screenshots of the main pages are written to that folder.

Where no Chromium or chromedriver is found, every test here is skipped, saying why (.ci/run
installs them, as root with apt).
"""

from __future__ import annotations

import os
import queue as queue_mod
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jobq_testtasks as tasks
import pytest
from conftest import kill_tree, subprocess_env, wait_until

from jobq import info
from jobq.config import load_config
from jobq.queue import JobQueue
from jobq.scheduler import Scheduler

webdriver = pytest.importorskip("selenium.webdriver",
                                reason="selenium is not installed (the test extra has it)")
from selenium.common.exceptions import TimeoutException, WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytest.importorskip("flask", reason="the web extra (flask) is not installed")

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM = next((p for p in map(shutil.which, BROWSERS) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no Chromium and chromedriver on this machine: apt-get install chromium "
           "chromium-driver (.ci/run does, as root)")

HOSTILE = "<script>alert(1)</script>"
#: Where the screenshots go, when set (else a temporary folder: they are taken all the same).
SCREENSHOTS_ENV = "JOBQ_SCREENSHOTS"


class Dashboard:
    """What the tests share: the server, the processes, the browsers."""

    def __init__(self, url: str, queue: JobQueue, token: str, web: str,
                 browser: Any, plain: Any, shots: Path) -> None:
        self.url, self.queue, self.token, self.web = url, queue, token, web
        self.browser, self.plain = browser, plain  # scripts on / scripts off
        self.shots = shots  # where the screenshots go: $JOBQ_SCREENSHOTS, else a temp dir

    def open(self, path: str, browser: Any = None) -> Any:
        b = browser or self.browser
        b.get(self.web + path.lstrip("/"))
        return b

    def sign_in(self, browser: Any) -> None:
        self.open("/login", browser)
        browser.find_element(By.NAME, "token").send_keys(self.token)
        browser.find_element(By.CSS_SELECTOR, "main form button").click()
        wait_until(lambda: "signed in" in self.flash(browser), 5, message="signed in")

    def flash(self, browser: Any) -> str:
        """What the page says of the action just done ("" while the next page loads)."""
        try:
            return " ".join(e.text for e in browser.find_elements(By.CLASS_NAME, "flash"))
        except WebDriverException:  # the page went away between the find and the read
            return ""


def _browser(scripts: bool) -> Any:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    if not scripts:
        options.add_experimental_option(
            "prefs", {"profile.managed_default_content_settings.javascript": 2})
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(15)
    return driver


def _lines(proc: subprocess.Popen[str]) -> queue_mod.Queue[str]:
    """The process's standard output, line by line, read by a thread (no blocking read)."""
    lines: queue_mod.Queue[str] = queue_mod.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


@pytest.fixture(scope="module")
def dash(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    prefix = f"web{uuid.uuid4().hex[:8]}"  # a namespace of its own: nothing else touches it
    config_path = tmp_path_factory.mktemp("web") / "jobq.toml"
    config_path.write_text(f'prefix = "{prefix}"\nlease_time = 5\n')
    env = subprocess_env(JOBQ_REDIS_URL=server_url, JOBQ_CONFIG=str(config_path))
    queue = JobQueue("default", config=load_config(config_path, redis_url=server_url))
    procs: list[subprocess.Popen[str]] = []
    browsers: list[Any] = []
    try:
        for module, args in (("jobq.cli.master", ["-w", "2", "-I", "jobq_testtasks",
                                              "-q", "default"]),
                             ("jobq.cli", ["web", "--allow-actions", "--port", "0"])):
            procs.append(subprocess.Popen([sys.executable, "-m", module, *args], env=env,
                                          text=True, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, start_new_session=True))
        lines, said = _lines(procs[1]), ""
        while "serving" not in said:
            try:
                said += lines.get(timeout=15)
            except queue_mod.Empty:
                pytest.fail(f"jobq web did not start; it said: {said!r}")
        token = re.search(r"token to sign in with .*: (\S+)", said)
        web = re.search(r"serving (http://127\.0\.0\.1:\d+/) \(actions allowed\)", said)
        assert token and web, said
        browsers += [_browser(scripts=True), _browser(scripts=False)]
        wait_until(lambda: [m for m in info.collect(queue.broker)["masters"]
                            if len(m["workers"]) == 2], 20, message="the master's 2 workers")
        shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path_factory.mktemp("shots"))
        yield Dashboard(server_url, queue, token.group(1), web.group(1), *browsers, shots)
    finally:
        for b in browsers:
            b.quit()
        for p in procs:
            kill_tree(p.pid)
            p.wait(10)
            if p.stdout:
                p.stdout.close()
        queue.broker.delete_namespace()


class _Stay(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None  # the test reads the 302 itself


NO_REDIRECT = urllib.request.build_opener(_Stay)


def _text(browser: Any, selector: str) -> str:
    """The text of the first element ``selector`` finds ("" if none). The live parts of a
    page are swapped every 2 s, so an element found may be gone when read: read again."""
    for _ in range(20):
        try:
            found = browser.find_elements(By.CSS_SELECTOR, selector)
            return str(found[0].text) if found else ""
        except WebDriverException:  # stale: swapped between the find and the read
            continue
    raise AssertionError(f"{selector} kept changing under the test")


def _status(browser: Any) -> str:
    return _text(browser, "#status")


def _no_dialog(browser: Any) -> None:
    try:
        WebDriverWait(browser, 0.5).until(expected_conditions.alert_is_present())
    except TimeoutException:
        return
    pytest.fail(f"a dialog fired: {browser.switch_to.alert.text!r}")


def _shot(dash: Dashboard, browser: Any, name: str) -> None:
    dash.shots.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(dash.shots / f"{name}.png"))


def test_the_queues_page_updates_live(dash: Dashboard) -> None:
    b = dash.open("/")
    assert "master" in _text(b, "#masters")
    assert "MB" in _text(b, "#masters")  # the workers' memory
    b.execute_script("window.notReloaded = true")
    cell = 'tr[data-queue="default"] [data-field="completed"]'
    done = int(_text(b, cell) or 0)
    jobs = dash.queue.enqueue_many("jobq_testtasks:add", [(i, i) for i in range(5)])
    wait_until(lambda: all(j.refresh().status.value == "completed" for j in jobs), 20,
               message="the jobs to complete")

    wait_until(lambda: int(_text(b, cell) or -1) >= done + 5, 10, interval=0.2,
               message="the page to update")
    assert b.execute_script("return window.notReloaded") is True  # live, not reloaded
    assert "live: updated" in _text(b, "#live-state")
    _shot(dash, b, "queues")


def test_a_hostile_argument_is_shown_as_text(dash: Dashboard) -> None:
    job = dash.queue.enqueue("jobq_testtasks:echo", HOSTILE, kwargs={"note": HOSTILE},
                             priority=5, delay=3600)  # scheduled: it stays on its page
    b = dash.open(f"/job?id={job.id}")
    _no_dialog(b)
    assert HOSTILE in _text(b, "#args")
    assert HOSTILE in _text(b, "#kwargs")
    assert b.execute_script("return document.querySelectorAll('main script').length") == 0
    dash.queue.cancel(job.id)


def test_requeue_from_the_dead_letter_queue(dash: Dashboard) -> None:
    key = uuid.uuid4().hex
    job = dash.queue.enqueue("jobq_testtasks:fail_times", key, 1, max_retries=0)
    wait_until(lambda: dash.queue.get_status(job.id) == "failed", 20, message="the failure")
    b = dash.browser
    dash.sign_in(b)
    dash.open(f"/job?id={job.id}")
    assert "ValueError: run 1 of" in b.page_source and "Traceback" in b.page_source
    _shot(dash, b, "failed-job")
    dash.open("/dlq?queue=default")
    row = b.find_element(By.CSS_SELECTOR, f'tr[data-job="{job.id}"]')
    _shot(dash, b, "dead-letters")
    row.find_element(By.TAG_NAME, "button").click()
    wait_until(lambda: "requeued" in dash.flash(b), 5, message="the page to say requeued")
    assert f"job {job.id} requeued" in dash.flash(b)
    wait_until(lambda: dash.queue.get_status(job.id) == "completed", 20,
               message="the requeued job to run again")
    assert dash.queue.failed_count() == 0 and dash.queue.get_job(job.id).requeues == 1  # type: ignore[union-attr]
    dash.open(f"/job?id={job.id}")
    assert _status(b) == "completed"
    assert not b.find_elements(By.CSS_SELECTOR, f'tr[data-job="{job.id}"]')


def test_pause_and_resume_a_schedule_with_scripts_off(dash: Dashboard) -> None:
    name = f"nightly-{uuid.uuid4().hex[:6]}"
    sched = Scheduler(dash.queue)
    sched.schedule_interval(name, "jobq_testtasks:noop", 3600)
    b = dash.plain  # no scripts: plain forms
    dash.sign_in(b)
    dash.open("/schedules", b)
    row = f'tr[data-schedule="{name}"]'
    b.find_element(By.CSS_SELECTOR, f"{row} button").click()  # Pause, its first button
    wait_until(lambda: "paused" in dash.flash(b), 5, message="the page to say paused")
    assert b.find_element(By.CSS_SELECTOR, f"{row} .next").text == "paused"
    assert sched.get(name).paused is True  # type: ignore[union-attr]
    b.find_element(By.CSS_SELECTOR, f"{row} button").click()  # now: Resume
    wait_until(lambda: "resumed" in dash.flash(b), 5, message="the page to say resumed")
    assert sched.get(name).paused is False  # type: ignore[union-attr]
    assert b.find_element(By.CSS_SELECTOR, f"{row} .next").text != "paused"


def test_cancel_a_running_job(dash: Dashboard) -> None:
    key = uuid.uuid4().hex
    job = dash.queue.enqueue("jobq_testtasks:sleep_until_cancelled", key, 30)
    wait_until(lambda: dash.queue.get_status(job.id) == "processing", 20, message="it runs")
    b = dash.browser
    dash.sign_in(b)
    dash.open(f"/job?id={job.id}")
    wait_until(lambda: _status(b) == "processing", 5, interval=0.1,
               message=f"the page to show it running: {b.page_source[-1500:]}")
    b.find_element(By.XPATH, "//button[text()='Cancel job']").click()
    wait_until(lambda: "interrupting" in dash.flash(b), 5, message="the page to say so")
    wait_until(lambda: dash.queue.get_status(job.id) == "cancelled", 10, message="cancelled")
    wait_until(lambda: _status(b) == "cancelled", 10, interval=0.2,
               message=f"the page (live) to show it cancelled: {b.page_source[-2000:]}")
    client = dash.queue.redis
    assert [x.decode() if isinstance(x, bytes) else x
            for x in client.lrange(f"test:{key}", 0, -1)] == ["started", "JobCancelled"]


def test_actions_without_the_token_are_refused_and_get_changes_nothing(dash: Dashboard) -> None:
    job = dash.queue.enqueue("jobq_testtasks:echo", 1, delay=3600)

    def post(path: str, headers: dict[str, str] | None = None, method: str = "POST") -> int:
        request = urllib.request.Request(dash.web + path.lstrip("/"), method=method,
                                         data=f"job={job.id}".encode() if method == "POST"
                                         else None, headers=headers or {})
        try:
            with NO_REDIRECT.open(request, timeout=5) as reply:
                return int(reply.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    assert post("/actions/cancel") == 403
    assert post("/actions/cancel", {"Authorization": "Bearer " + "x" * 32}) == 403
    assert post(f"/actions/cancel?job={job.id}", method="GET") == 405
    assert dash.queue.get_status(job.id) == "scheduled"
    # a new browser session (no cookie): the pages show no form, and the token nowhere
    b = dash.plain
    b.delete_all_cookies()
    dash.open(f"/job?id={job.id}", b)
    assert not b.find_elements(By.XPATH, "//button[text()='Cancel job']")
    assert dash.token not in b.page_source
    assert post("/actions/cancel", {"Authorization": f"Bearer {dash.token}"}) == 302
    assert dash.queue.get_status(job.id) == "cancelled"


def test_a_link_from_another_site_keeps_the_session_and_signing_out_works(
        dash: Dashboard) -> None:
    """SameSite=Lax: following a link from another site (here localhost, another site than
    127.0.0.1) brings the signed-in session along; with Strict, the page came without it and
    the new session it set replaced the signed-in one."""
    import http.server

    job = dash.queue.enqueue("jobq_testtasks:echo", 1, delay=3600)
    target = f"{dash.web}job?id={job.id}"

    class Other(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = f'<a id="go" href="{target}">to the dashboard</a>'.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Other)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    b = dash.plain
    try:
        b.delete_all_cookies()
        dash.sign_in(b)
        port = dash.web.rstrip("/").rsplit(":", 1)[1]
        assert [c["name"] for c in b.get_cookies()] == [f"jobq_web_{port}"]
        assert b.get_cookies()[0]["sameSite"] == "Lax"
        b.get(f"http://localhost:{other.server_address[1]}/")
        b.find_element(By.ID, "go").click()
        wait_until(lambda: b.current_url == target, 5, message="the dashboard's page")
        assert b.find_elements(By.XPATH, "//button[text()='Sign out']")
        b.find_element(By.XPATH, "//button[text()='Cancel job']").click()
        wait_until(lambda: "cancelled" in dash.flash(b), 5, message="the job cancelled")
        assert dash.queue.get_status(job.id) == "cancelled"
        b.find_element(By.XPATH, "//button[text()='Sign out']").click()
        wait_until(lambda: not b.find_elements(By.XPATH, "//button[text()='Sign out']"), 5,
                   message="signed out")
    finally:
        other.shutdown()
        other.server_close()
        b.delete_all_cookies()


def test_the_limits_page_shows_a_limit_in_use_live_and_without_scripts(dash: Dashboard) -> None:
    """One job at a time (the task's own limit, concurrency 1): the page, left open, shows a
    slot taken, then free again, without being reloaded; scripts off, it is the same table."""
    b = dash.open("/limits")
    b.execute_script("window.notReloaded = true")
    row = 'tr[data-limit="jobq_testtasks:one_at_a_time"]'
    running = f'{row} [data-field="running"]'
    key = uuid.uuid4().hex
    jobs = [dash.queue.enqueue(tasks.one_at_a_time, key, 2.5) for _ in range(2)]
    wait_until(lambda: _text(b, running) == "1", 10, interval=0.2,
               message="the page to show a slot taken")
    assert "full" in _text(b, row)
    _shot(dash, b, "limits")
    plain = dash.open("/limits", dash.plain)  # scripts off: the same table, as it is now
    assert _text(plain, f"{row} td") == "jobq_testtasks:one_at_a_time"
    assert _text(plain, f"{row} td:nth-child(2)") == "1"  # its concurrency
    wait_until(lambda: all(j.refresh().status.value == "completed" for j in jobs), 20,
               message="the jobs to complete")
    wait_until(lambda: _text(b, running) == "0", 10, interval=0.2,
               message="the page to show the slot free")
    assert b.execute_script("return window.notReloaded") is True  # live, not reloaded
    assert dash.queue.limit_use()["jobq_testtasks:one_at_a_time"]["running"] == 0


def test_screenshots_are_written(dash: Dashboard) -> None:
    """Taken by the tests before this one (in $JOBQ_SCREENSHOTS when set, to look at)."""
    folder = dash.shots
    for name in ("queues", "failed-job", "dead-letters", "limits"):
        path = folder / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
