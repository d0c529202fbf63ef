"""``jobq web``: the dashboard in the browser (the ``jobq[web]`` extra), read-only unless
``--allow-actions``."""

from __future__ import annotations

import ipaddress

import click

from .. import exitcodes
from ..web.security import new_token
from .app import CliError, State, jobq_command, main

#: The modules of the web extra: one missing means the extra is not installed.
WEB_MODULES = ("flask", "werkzeug", "jinja2", "markupsafe", "itsdangerous", "waitress")


@jobq_command(main, "web")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (another than loopback shows the dashboard to the "
                   "network: put TLS in front).")
@click.option("--port", type=click.IntRange(0, 65535), default=8181, show_default=True)
@click.option("--allow-actions", is_flag=True,
              help="Allow cancel, requeue, purge and schedule actions, to whoever signs in "
                   "with the token (the config's web_token, else a new one printed here).")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Another host name the dashboard answers to (a proxy's; repeatable; adds "
                   "to the config's web_allowed_hosts): besides localhost, 127.0.0.1, ::1 and "
                   "--host, any other is refused (DNS rebinding).")
def web(state: State, host: str, port: int, allow_actions: bool,
        allowed_hosts: tuple[str, ...]) -> int:
    """A dashboard in the browser: queues, masters and workers, jobs, dead letters,
    schedules and groups; read-only unless --allow-actions."""
    try:
        from ..web.server import serve  # lazy: only `jobq web` needs the web extra
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in WEB_MODULES:
            raise
        raise CliError(f"jobq web needs the web extra: pip install 'jobq[web]' (no module "
                       f"{exc.name!r})", exitcodes.USAGE) from None
    config = state.config()
    queue = state.queue()
    token = config.web_token
    if allow_actions and not token:
        token = new_token()
        click.echo(f"jobq web: the token to sign in with (new at each start; set web_token "
                   f"in the config to keep one): {token}")
    if not _loopback(host):
        click.echo(f"jobq web: listening on {host}: anyone who reaches it sees the queues and "
                   "job arguments" + ("; the token travels in clear without TLS"
                                      if allow_actions else ""), err=True)
    try:
        serve(queue, host=host, port=port, allow_actions=allow_actions, token=token,
              say=lambda line: click.echo(line),
              allowed_hosts=[*config.web_allowed_hosts, *allowed_hosts])
    except KeyboardInterrupt:  # Ctrl-C is how a server in the foreground is stopped
        pass
    return exitcodes.OK


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
