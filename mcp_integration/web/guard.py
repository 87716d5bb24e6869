"""Who may use the status page: a token off loopback, a loopback Host on loopback, same-origin actions.

Bound to loopback without a token, the page trusts the machine's users but not other web sites: the Host header
must name a loopback address (so a DNS-rebinding page cannot read it) and every action must come from the
page's own origin. With a token (required off loopback), every request needs it: `Authorization: Bearer`, or the
cookie set by a first load with `?token=`. Comparisons are constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import re
from urllib.parse import urlencode, urlsplit

from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "COOKIE",
    "MIN_TOKEN_BITS",
    "MIN_TOKEN_LENGTH",
    "TOKEN_ENV",
    "BindingError",
    "Guard",
    "check_binding",
    "cookie_value",
    "is_loopback",
]


COOKIE = "voice_mcp_dashboard"
TOKEN_ENV = "DASHBOARD_TOKEN"
MIN_TOKEN_LENGTH = 16
MIN_TOKEN_BITS = 48


class BindingError(ValueError):
    """The dashboard may not start as asked; the message says why and what to do."""


def is_loopback(host: str) -> bool:
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_binding(host: str, token: str | None) -> None:
    """Refuse to serve beyond this machine without a token, and refuse a token too short or too plain to be one."""
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise BindingError(f"{TOKEN_ENV} is too short: use at least {MIN_TOKEN_LENGTH} random characters")
    if token is not None and not _random_enough(token):
        raise BindingError(
            f"{TOKEN_ENV} does not look random (spaces, or too few different characters): make one with "
            "`openssl rand -hex 24`"
        )
    if token is None and not is_loopback(host):
        raise BindingError(
            f"binding the dashboard to {host} needs a token: set {TOKEN_ENV} (at least {MIN_TOKEN_LENGTH} random "
            "characters), or bind to 127.0.0.1"
        )


def _random_enough(token: str) -> bool:
    """No whitespace or control characters, and at least MIN_TOKEN_BITS by a generous estimate (length times the
    bits of its alphabet as used): "aaaa…" and "abab…" are refused, 16 random hex digits pass."""
    if any(c.isspace() or not c.isprintable() for c in token):
        return False
    distinct = len(set(token))
    return distinct >= 6 and len(token) * math.log2(distinct) >= MIN_TOKEN_BITS


# host, or host:port; a host is a name, an IPv4 address or a bracketed IPv6 address.
_HOST_HEADER = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?)(?::\d{1,5})?$")


def _host_of(header: str) -> str | None:
    """The host a well-formed Host header names, or None."""
    if not _HOST_HEADER.match(header):
        return None
    return header.rsplit(":", 1)[0] if not header.startswith("[") else header.split("]")[0] + "]"


def cookie_value(token: str) -> str:
    # Derived, not the token itself: the cookie opens this page only, and changes when the token does.
    return hmac.new(token.encode(), b"voice-mcp dashboard session", hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class Guard:
    """ASGI middleware in front of every route (page, live feed, actions, /healthz, /metrics, static files)."""

    def __init__(self, app: ASGIApp, *, token: str | None, bind_host: str) -> None:
        check_binding(bind_host, token)
        self.app = app
        self.token = token
        self._cookie = cookie_value(token) if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        how = self._admit(request)
        if isinstance(how, Response):
            await how(scope, receive, send)
        elif how == "query":
            # First load with ?token=: trade it for a cookie and drop it from the address bar and history.
            await self._login(request)(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _admit(self, request: Request) -> Response | str:
        """How the request proved itself (open | bearer | cookie | query), or the response refusing it."""
        how = "open"
        host = _host_of(request.headers.get("host", ""))
        if host is None:
            return _refuse(400, "a request needs a well-formed Host header")
        if self.token is None:
            if not is_loopback(host):
                return _refuse(403, "this dashboard answers only to a loopback Host (127.0.0.1 or localhost)")
        else:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() == "bearer" and given.strip():
                if not _same(given.strip(), self.token):
                    return _unauthorised()
                how = "bearer"
            elif self._cookie and _same(request.cookies.get(COOKIE, ""), self._cookie):
                how = "cookie"
            elif request.method == "GET" and request.url.path == "/" and "token" in request.query_params:
                if not _same(request.query_params["token"], self.token):
                    return _unauthorised()
                how = "query"
            else:
                return _unauthorised()
        if request.method not in ("GET", "HEAD") and how != "bearer" and not _same_origin(request):
            # A browser sends the cookie (or reaches loopback) for any site's form: actions must come from here.
            return _refuse(403, "cross-site request refused: actions must come from the dashboard page")
        return how

    def _login(self, request: Request) -> Response:
        assert self._cookie is not None
        rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
        target = URL(path=request.url.path, query=urlencode(rest))
        response = RedirectResponse(str(target), status_code=303)
        response.set_cookie(
            COOKIE, self._cookie, httponly=True, samesite="lax", secure=request.url.scheme == "https", path="/"
        )
        return response


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is not None:
        # Host parts only: behind a TLS-terminating proxy the page is https while we see http.
        return _same(urlsplit(origin).netloc.lower(), request.headers.get("host", "").lower())
    # Browsers that omit Origin still say where a request came from in Sec-Fetch-Site.
    return request.headers.get("sec-fetch-site") == "same-origin"


def _unauthorised() -> Response:
    return PlainTextResponse(
        f"unauthorised: send Authorization: Bearer <{TOKEN_ENV}>, or open /?token=<{TOKEN_ENV}> once",
        status_code=401,
        headers={"WWW-Authenticate": 'Bearer realm="voice-mcp dashboard"'},
    )


def _refuse(status: int, reason: str) -> Response:
    return PlainTextResponse(reason, status_code=status)
