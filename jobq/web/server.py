"""Serving the dashboard: waitress, a pure-Python WSGI server with a fixed pool of threads,
in a process of its own (``jobq web``), never in the master."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from waitress.server import create_server

from ..queue import JobQueue
from .app import cookie_name, create_app
from .data import Dashboard

#: Threads answering requests: a page is a cache hit most of the time (microseconds), so a
#: few threads serve many viewers; none is held by a viewer between two polls.
THREADS = 8


def serve(queue: JobQueue, *, host: str, port: int, allow_actions: bool, token: str,
          say: Callable[[str], None], allowed_hosts: Iterable[str] = ()) -> None:
    """Serve until interrupted; ``say`` gets the lines to show at start (the address, and
    the token when it is a new one)."""
    app = create_app(Dashboard(queue), allow_actions=allow_actions, token=token,
                     hosts=[host, *allowed_hosts])
    server = create_server(app, host=host, port=port, threads=THREADS, ident="jobq",
                           clear_untrusted_proxy_headers=True)
    bound = getattr(server, "effective_port", port)
    app.config["SESSION_COOKIE_NAME"] = cookie_name(bound)  # the port bound (--port 0)
    shown = f"[{host}]" if ":" in host else host
    say(f"jobq web: serving http://{shown}:{bound}/ "
        f"({'actions allowed' if allow_actions else 'read-only'})")
    server.run()
