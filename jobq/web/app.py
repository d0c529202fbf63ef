"""The dashboard's pages and actions (Flask): every value goes through Jinja's autoescape,
every action is a POST that :func:`.security.refusal` lets through, and no page carries
inline script or style (the Content-Security-Policy forbids them)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import redis
from flask import (
    Flask,
    abort,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.wrappers import Response

from ..schedule import local_time
from ..scheduler import Scheduler
from ..urls import redact, scrub
from . import security
from .data import DLQ_PAGE, GROUPS_SHOWN, Dashboard

#: What a page may load: its own scripts, styles and images, nothing inline, no frames.
#: ("Referrer-Policy: no-referrer" would make Chrome send "Origin: null" with our own forms.)
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin",
           "Cross-Origin-Opener-Policy": "same-origin"}
#: How often the live parts of a page refresh where scripts run (milliseconds).
LIVE_EVERY_MS = 2000
#: The most of one value a job's page shows (bytes): arguments, result, error, traceback.
VALUE_CAP = 16 * 1024
#: The longest job id, group id or queue name a page looks up.
MAX_ARG = 200
#: What a schedule form may ask, and what the page then says.
SCHEDULE_OPS = {"pause": "paused", "resume": "resumed", "run-now": "run now"}


def create_app(dashboard: Dashboard, *, allow_actions: bool = False, token: str = "",
               secret_key: bytes | None = None, hosts: Iterable[str] = (),
               port: int | None = None) -> Flask:
    """The dashboard over ``dashboard``'s server. ``token`` is required with
    ``allow_actions`` (the CLI makes one, or takes the config's ``web_token``). It answers
    only requests whose ``Host`` is loopback's or one of ``hosts``. ``port`` names the
    session cookie (cookies are per host, not per port: two dashboards on one host would
    otherwise share, and overwrite, one cookie); see :func:`cookie_name`."""
    allowed = security.allowed_hosts(hosts)
    if allow_actions and len(token) < 16:
        raise ValueError("actions need a token of at least 16 characters")
    app = Flask(__name__)
    # SameSite=Lax, not Strict: with Strict, a link followed from another site came without
    # the cookie, and the new session made then overwrote the signed-in one. Lax sends it on
    # such a top-level GET (which changes nothing) and never on another site's POST.
    app.config.update(SECRET_KEY=secret_key or os.urandom(32),
                      SESSION_COOKIE_NAME=cookie_name(port),
                      SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax",
                      MAX_CONTENT_LENGTH=64 * 1024, TEMPLATES_AUTO_RELOAD=False)
    app.jinja_env.filters.update(when=_when, pretty=_pretty, mb=_mb, seconds=_seconds,
                                  cap=cap)
    queue = dashboard.queue

    @app.context_processor
    def page_context() -> dict[str, Any]:
        return {"actions": allow_actions, "signed_in": _signed_in(),
                "csrf": session.get(security.CSRF_FIELD, ""), "server": redact(queue.url),
                "prefix": queue.config.prefix, "live_every": LIVE_EVERY_MS}

    def _signed_in() -> bool:
        return allow_actions and session.get("auth") is True

    @app.before_request
    def check_host() -> Response | None:
        """A page for this server's names only: a site rebinding its own name to this
        address (DNS rebinding) would read it. Plain text: not a word about the server."""
        name = security.host_name(request.host)
        if name in allowed:
            return None
        return Response(f"refused: this dashboard does not answer to the host name {name!r} "
                        "(jobq web --allowed-host NAME adds one)\n", 400,
                        {"Content-Type": "text/plain; charset=utf-8", **HEADERS})

    @app.before_request
    def give_csrf() -> None:
        if allow_actions and security.CSRF_FIELD not in session:
            session[security.CSRF_FIELD] = security.new_token()

    @app.after_request
    def harden(response: Response) -> Response:
        response.headers.update(HEADERS)
        if request.endpoint != "static":
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.errorhandler(redis.RedisError)
    def server_trouble(exc: redis.RedisError) -> tuple[str, int]:
        message = scrub(str(exc), queue.url)
        return render_template("error.html", title="Server unreachable",
                               message=f"cannot read the server: {message}"), 503

    @app.errorhandler(400)
    def bad_request(exc: Any) -> tuple[str, int]:
        return render_template("error.html", title="Bad request",
                               message=getattr(exc, "description", "bad request")), 400

    @app.errorhandler(404)
    def not_found(exc: Any) -> tuple[str, int]:
        return render_template("error.html", title="Not found",
                               message=getattr(exc, "description", "not found")), 404

    # -- pages (GET never changes anything) ---------------------------------------------------
    @app.get("/")
    def index() -> str:
        return render_template("index.html", data=dashboard.overview())

    @app.get("/job")
    def job() -> str:
        job_id = _arg("id")
        if not job_id:
            return render_template("job_lookup.html")
        page = dashboard.job(job_id)
        if page is None:
            abort(404, f"no job {job_id!r}: never enqueued, or its record expired")
        return render_template("job.html", page=page, job=page.job)

    @app.get("/dlq")
    def dlq() -> str:
        asked = _arg("queue")
        counts = {q["queue"]: q["dead"] for q in dashboard.overview()["queues"]}
        name = asked or next((q for q, n in counts.items() if n), None) \
            or next(iter(counts), "default")
        if name not in counts:
            abort(404, f"no queue {name!r}")
        jobs, total = dashboard.dead_letters(name)
        return render_template("dlq.html", queue=name, counts=counts, jobs=jobs, total=total,
                               page_size=DLQ_PAGE)

    @app.get("/schedules")
    def schedules() -> str:
        items, leader = dashboard.schedules()
        return render_template("schedules.html", schedules=items, leader=leader)

    @app.get("/groups")
    def groups() -> str:
        group_id = _arg("id")
        if not group_id:
            return render_template("groups.html", groups=dashboard.groups(), shown=GROUPS_SHOWN)
        page = dashboard.group(group_id)
        if page is None:
            abort(404, f"no group {group_id!r}: never made, or expired")
        return render_template("group.html", group=page)

    @app.get("/limits")
    def limits() -> str:
        return render_template("limits.html", limits=dashboard.limits())

    # -- signing in -----------------------------------------------------------------------------
    def refusal(*, signed_in: bool, bearer: bool) -> str | None:
        """Why this POST is refused (:func:`.security.refusal`), None if it may go on; a
        bearer token counts only where ``bearer`` (actions, not signing in or out)."""
        return security.refusal(
            allowed=allow_actions, token=token, signed_in=signed_in,
            session_csrf=session.get(security.CSRF_FIELD),
            form_csrf=request.form.get(security.CSRF_FIELD),
            authorization=request.headers.get("Authorization") if bearer else None,
            origin=request.headers.get("Origin"), referer=request.headers.get("Referer"),
            host=request.host)

    @app.get("/login")
    def login_form() -> str:
        if not allow_actions:
            abort(404, "nothing to sign in to: this dashboard is read-only")
        return render_template("login.html")

    @app.post("/login")
    def login() -> Response | tuple[str, int]:
        why = refusal(signed_in=True, bearer=False)
        if why is None and not security.same(request.form.get("token"), token):
            why = "refused: wrong token"
        if why is not None:
            return render_template("error.html", title="Refused", message=why), 403
        session.clear()  # a new session, new CSRF token: nothing from before signing in
        session["auth"] = True
        session[security.CSRF_FIELD] = security.new_token()
        flash("signed in: actions are on")
        return redirect(_back())

    @app.post("/logout")
    def logout() -> Response | tuple[str, int]:
        why = refusal(signed_in=True, bearer=False)
        if why is not None:  # another site may not sign you out either
            return render_template("error.html", title="Refused", message=why), 403
        session.clear()
        return redirect(url_for("index"))

    # -- actions (POST, token, CSRF) --------------------------------------------------------------
    def guard() -> None:
        why = refusal(signed_in=_signed_in(), bearer=True)
        if why is not None:
            abort(Response(render_template("error.html", title="Refused", message=why), 403))

    def done(message: str) -> Response:
        dashboard.forget()
        flash(message)
        return redirect(_back())

    @app.post("/actions/cancel")
    def cancel() -> Response:
        guard()
        job_id = _field("job")
        outcome = queue.cancel_job(job_id)
        return done({"cancelled": f"job {job_id} cancelled",
                     "interrupting": f"job {job_id} is running: its worker is interrupting it",
                     "finished": f"job {job_id} had already finished: nothing to cancel",
                     "unknown": f"no job {job_id}"}[outcome])

    @app.post("/actions/requeue")
    def requeue() -> Response:
        guard()
        job_id = _field("job")
        if queue.requeue(job_id):
            return done(f"job {job_id} requeued")
        found = queue.get_job(job_id)
        return done(f"job {job_id} not requeued: " +
                    ("unknown job" if found is None else f"it is {found.status.value}"))

    @app.post("/actions/requeue-all")
    def requeue_all() -> Response:
        guard()
        name = _field("queue")
        return done(f"requeued {dashboard.handle(name).requeue_failed()} job(s) from {name}")

    @app.post("/actions/purge")
    def purge() -> Response:
        guard()
        name = _field("queue")
        if request.form.get("confirm") != "yes":
            return done(f"nothing purged: tick the box to confirm deleting the dead-letter "
                        f"queue of {name}")
        return done(f"purged {dashboard.handle(name).purge_failed()} job(s) from the "
                    f"dead-letter queue of {name}")

    @app.post("/actions/schedule")
    def schedule() -> Response:
        guard()
        name, op = _field("schedule"), _field("op")
        if op not in SCHEDULE_OPS:
            abort(400, f"unknown schedule operation {op!r}")
        sched = Scheduler(queue)
        if op == "run-now":
            try:
                return done(f"schedule {name}: ran now as job {sched.run_now(name).id}")
            except KeyError:
                return done(f"no schedule {name!r}")
        ok = sched.pause(name) if op == "pause" else sched.resume(name)
        return done(f"schedule {name}: {SCHEDULE_OPS[op]}" if ok else f"no schedule {name!r}")

    return app


def cookie_name(port: int | None) -> str:
    """The session cookie's name: one per port (a browser sends a host's cookies to all its
    ports)."""
    return "jobq_web" if not port else f"jobq_web_{port}"


def _arg(name: str) -> str:
    """A query parameter naming a job, group or queue: a 400, before any read, when it is
    longer than any name jobq makes (each name read is a key of the cache and a read of the
    server)."""
    value = request.args.get(name, "").strip()
    if len(value) > MAX_ARG:
        abort(400, f"{name} is longer than {MAX_ARG} characters: no such name")
    return value


def _field(name: str) -> str:
    value = request.form.get(name, "").strip()
    if not value:
        abort(400, f"the form has no {name}")
    return value


def _back() -> str:
    """Where to go after a form: the page it came from (``next``), if it is one of ours."""
    return safe_next(request.form.get("next", ""))


def safe_next(target: str) -> str:
    """``target`` if it is a path on this server, else ``/``: no scheme, no host, one
    leading ``/``, and no backslash or control character (browsers drop tabs and newlines,
    so ``/<TAB>/evil.example`` would become ``//evil.example``; a newline would break the
    header)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target \
            or any(ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f for c in target):
        return "/"
    try:
        parts = urlsplit(target)
    except ValueError:
        return "/"
    return target if parts.scheme == "" and parts.netloc == "" else "/"


# -- filters ----------------------------------------------------------------------------------
def _when(ts: Any) -> str:
    if ts is None:
        return "-"
    return local_time(ts.timestamp() if hasattr(ts, "timestamp") else float(ts))


def _pretty(value: Any) -> str:
    """A JSON value as text (the template escapes it)."""
    return json.dumps(value, indent=2, default=str, ensure_ascii=False)


def cap(value: Any, limit: int = VALUE_CAP) -> str:
    """``value`` as text, at most ``limit`` bytes of it (UTF-8), and a note saying how long it
    was when it is cut: a job's arguments, result or traceback may be megabytes."""
    text = "" if value is None else str(value)
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    return (data[:limit].decode("utf-8", "ignore") +
            f"\n… (truncated, {len(data):,} bytes in all)")


def _mb(value: Any) -> str:
    return f"{value:.0f} MB" if value else "-"


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{value:.1f} s"
