"""Talking about Redis URLs without leaking their secrets: one place that knows where a
password can hide in a URL, for logs, process titles and error messages."""

from __future__ import annotations

import re
from collections.abc import Container
from typing import Any, NamedTuple
from urllib.parse import unquote

from redis.connection import parse_url

#: Query parameters whose values are secrets (``?password=`` is redis-py's unix-socket form).
_SECRET_PARAM_RE = re.compile(r"([?&;][^=&#?;]*(?:pass|secret|token)[^=&#?;]*=)[^&#;]*", re.I)


def redact(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (the user name is kept).

    Everything before the last ``@`` counts as credentials, so a password with an unescaped
    ``/``, ``?`` or ``@`` is still hidden. Never raises.
    """
    try:
        text = str(url)
        text = _SECRET_PARAM_RE.sub(r"\1***", text)
        scheme, sep, rest = text.partition("://")
        if not sep or "@" not in rest:
            return text
        userinfo, _, hostpart = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        return f"{scheme}://{user}{':***' if colon else ''}@{hostpart}"
    except Exception:  # redaction must never be the thing that fails
        return "<unprintable url>"


def scrub(line: str, url: str) -> str:
    """Collapse to one line and remove any secret of ``url``, should a library echo one."""
    line = " ".join(line.split())
    for secret in _secrets(url):
        line = line.replace(secret, "***")
    return line


def _secrets(url: str) -> list[str]:
    """The password and secret query values of ``url``, raw and percent-decoded."""
    rest = url.partition("://")[2]
    found = [rest.rpartition("@")[0].partition(":")[2]]
    found += [m.group(0)[len(m.group(1)):] for m in _SECRET_PARAM_RE.finditer(url)]
    found += [unquote(s) for s in found]
    # Replacing a one- or two-letter string would garble the message more than it protects.
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


class NodesUrl(NamedTuple):
    """The parts of a URL naming several nodes: ``scheme://[userinfo@]hosts[/path][?query]``."""

    scheme: str  #: lower case
    userinfo: str  #: ``user:password``, '' when none
    hosts: str  #: ``host[:port],...``
    path: str
    query: str
    where: str  #: the URL without its secrets, for messages


def has_scheme(url: str, schemes: Container[str]) -> bool:
    """Whether ``url`` begins with one of ``schemes`` (lower case) and ``://``."""
    scheme, sep, _ = url.partition("://")
    return bool(sep) and scheme.lower() in schemes


def split_nodes_url(url: str, schemes: Container[str], kind: str) -> NodesUrl:
    """Split a URL naming several nodes (Sentinel's, a Cluster's); ValueError, without the
    password, if its scheme is not one of ``schemes`` (``kind``: what such a URL is)."""
    if not has_scheme(url, schemes):
        raise ValueError(f"not a {kind} URL: {redact(url)!r}")
    scheme, _, rest = url.partition("://")
    # everything before the last '@' is credentials, as for redact(): a password may hold
    # an unescaped '?' or '/'
    userinfo, at, after = rest.rpartition("@")
    hostpath, _, query = after.partition("?")
    hosts, _, path = hostpath.partition("/")
    return NodesUrl(scheme.lower(), userinfo if at else "", hosts, path, query, redact(url))


def host_port(text: str, where: str, default_port: int) -> tuple[str, int]:
    """``host[:port]`` or ``[v6addr][:port]`` of a URL listing several nodes (``where``: the
    URL, redacted, for the message)."""
    if text.startswith("["):  # [::1]:26379
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = text.partition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"{where}: bad node address {text!r}: expected host[:port]")
    return unquote(host), int(port) if port else default_port


def host_ports(hosts: str, where: str, default_port: int, missing: str) -> list[tuple[str, int]]:
    """The comma-separated ``host[:port]`` list of a URL of several nodes (see
    :func:`host_port`); ValueError ``missing`` if it names none."""
    nodes = [host_port(h, where, default_port) for h in hosts.split(",") if h]
    if not nodes:
        raise ValueError(f"{where}: {missing}")
    return nodes


def node_options(userinfo: str, query: str, where: str) -> dict[str, Any]:
    """The options a URL of several nodes gives every data node's connection: its query as
    redis-py reads a URL's (``db=``, ``ssl_cert_reqs=``, ...), with the user and password
    of ``userinfo`` (``user:password``, percent-encoded)."""
    try:
        options = {k: v for k, v in parse_url(f"redis://localhost/?{query}").items()
                   if k != "host"}
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    user, colon, password = userinfo.partition(":")
    if user:
        options["username"] = unquote(user)
    if colon and password:
        options["password"] = unquote(password)
    return options
