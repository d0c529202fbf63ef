"""Who may act: the dashboard's safety rules as pure functions (the views only apply them).

* Read-only unless ``jobq web --allow-actions``.
* An action is a POST. A browser signs in once with the token (a session cookie,
  HttpOnly, SameSite=Lax, named after the port) and sends each form with the session's CSRF
  token and its ``Origin`` (or at least a ``Referer``); a cross-origin request is refused
  whatever it carries, and so is one naming no origin at all. A script may instead send
  ``Authorization: Bearer TOKEN`` (a header a cross-site page cannot set without a CORS
  grant, which the dashboard never gives), with or without an ``Origin``.
* Signing out is a POST with the CSRF token too (another site cannot sign you out).
* Tokens are compared in constant time and never shown.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Iterable
from urllib.parse import urlsplit

#: The names a dashboard always answers to (a request's ``Host`` names one of them or another
#: allowed name, else it is refused: a site that rebinds its name to 127.0.0.1 names itself).
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

#: The form field (and session key) of the CSRF token.
CSRF_FIELD = "csrf"


def new_token() -> str:
    """A fresh secret: 32 URL-safe characters (192 random bits)."""
    return secrets.token_urlsafe(24)


def same(given: str | None, expected: str | None) -> bool:
    """Whether two secrets are equal, in constant time; never for a missing one."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, if that is what it is."""
    scheme, _, value = (authorization or "").partition(" ")
    return (value.strip() or None) if scheme.lower() == "bearer" else None


def same_origin(origin: str | None, host: str) -> bool:
    """Whether an ``Origin`` (or ``Referer``) header names this server (no header: see
    :func:`refusal`, which lets only a bearer token do without)."""
    if origin is None:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()


def refusal(*, allowed: bool, token: str, signed_in: bool, session_csrf: str | None,
            form_csrf: str | None, authorization: str | None, origin: str | None,
            host: str, referer: str | None = None) -> str | None:
    """Why an action must be refused (a 403 saying so), or None when it may go ahead.
    ``origin``, else ``referer``, must name this server; a request with neither may only
    act with a bearer token (a browser sends Origin with every POST form)."""
    if not allowed:
        return "actions are off: this dashboard was started without --allow-actions"
    source = origin if origin is not None else referer
    if not same_origin(source, host):
        return "refused: the request came from another site"
    key = bearer(authorization)
    if key is not None:
        return None if same(key, token) else "refused: wrong token"
    if source is None:
        return "refused: the request has no Origin or Referer header (a script: use a token)"
    if not signed_in:
        return "refused: sign in with the token first"
    if not same(form_csrf, session_csrf):
        return "refused: the form's CSRF token is missing or stale (reload the page)"
    return None


def host_name(host: str) -> str:
    """The name in a ``Host`` header or an allowed-host entry: lower case, without its port,
    brackets or trailing dot (``[::1]:8181`` -> ``::1``)."""
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    return name.rstrip(".")


def allowed_hosts(names: Iterable[str] = ()) -> frozenset[str]:
    """The names a dashboard answers to: loopback's and ``names`` (the address it listens
    on, a proxy's name), less the wildcard addresses (``0.0.0.0``, ``::``), which no
    request names."""
    given = {host_name(h) for h in names} - {"", "0.0.0.0", "::"}
    return frozenset({*LOOPBACK_NAMES, *given})
