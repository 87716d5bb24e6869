"""`servers login NAME`: the authorization-code flow with PKCE as desktop MCP clients run it.

The authorization URL is printed (and opened in a browser when this machine has a display); the authorization
server redirects to a listener on a loopback port (RFC 8252 §7.3: `http://127.0.0.1:<port>/callback`), which
hands the code to the SDK's flow; the tokens land, sealed, in the registry, where every worker finds them. The
login asks for the scopes configured, the ones the server's challenge names and, after a step-up no worker
could do, the ones it asked for then. Servers using an unattended grant need no login: the same command
then just checks that a token can be had.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import webbrowser
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import uvicorn
from mcp.shared.auth import AuthorizationCodeResult
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from mcp_integration.connection import ServerConnection
from mcp_integration.errors import NeedsLogin, VoiceMcpError
from mcp_integration.oauth import build_provider
from mcp_integration.oauth_store import OAuthState, OAuthStore
from mcp_integration.registry import ServerConfig
from mcp_integration.scrubber import known

__all__ = ["LOGIN_TIMEOUT_S", "LoginError", "LoopbackPrompt", "login"]

# How long a person has to finish in the browser.
LOGIN_TIMEOUT_S = 300.0

_DONE_PAGE = """<!doctype html><meta charset="utf-8"><title>voice-mcp</title>
<p style="font:16px system-ui;margin:3em">{message} You can close this window.</p>"""


class LoginError(VoiceMcpError):
    """The login could not be completed; the message says why, in one line."""


class LoopbackPrompt:
    """The person's side of the flow: shows the URL, then waits on 127.0.0.1 for the authorization server's
    redirect. One prompt serves the whole login, a step-up inside it included."""

    def __init__(self, announce: Callable[[str], None], *, port: int = 0, open_browser: bool = True) -> None:
        self.announce = announce
        self.port = port
        self.open_browser = open_browser
        self.redirect_uri = ""
        self._waiting: asyncio.Future[AuthorizationCodeResult] | None = None
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoopbackPrompt:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.bind(("127.0.0.1", self.port))
        except OSError:
            sock.close()
            raise
        sock.listen(8)
        self.port = sock.getsockname()[1]
        self.redirect_uri = f"http://127.0.0.1:{self.port}/callback"
        app = Starlette(routes=[Route("/callback", self._callback)])
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                await self._task
                raise LoginError("the loopback listener for the login did not start")
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            await asyncio.wait([self._task], timeout=5)

    async def show(self, url: str) -> None:
        self._waiting = asyncio.get_running_loop().create_future()
        self.announce(
            f"Open this address to authorize voice-mcp:\n  {url}\nWaiting for the redirect to {self.redirect_uri} …"
        )
        if self.open_browser and _has_display():
            await asyncio.to_thread(webbrowser.open, url)

    async def code(self) -> AuthorizationCodeResult:
        if self._waiting is None:
            raise LoginError("no authorization was started")
        try:
            async with asyncio.timeout(LOGIN_TIMEOUT_S):
                return await self._waiting
        except TimeoutError:
            raise LoginError(f"no redirect within {LOGIN_TIMEOUT_S:g} s; run the login again") from None

    async def _callback(self, request: Request) -> HTMLResponse:
        params = request.query_params
        waiting = self._waiting
        if waiting is None or waiting.done():
            return HTMLResponse(_DONE_PAGE.format(message="No login is waiting here."), status_code=400)
        if params.get("error"):
            why = params.get("error_description") or params["error"]
            waiting.set_exception(LoginError(f"the authorization server refused: {why}"))
            return HTMLResponse(_DONE_PAGE.format(message="The authorization was refused."), status_code=400)
        code = params.get("code")
        if not code:
            return HTMLResponse(_DONE_PAGE.format(message="This redirect carries no code."), status_code=400)
        known.add(code)
        waiting.set_result(AuthorizationCodeResult(code=code, state=params.get("state"), iss=params.get("iss")))
        return HTMLResponse(_DONE_PAGE.format(message="voice-mcp is authorized."))


def _has_display() -> bool:
    # Without one, Python's webbrowser may start a text browser in this very terminal.
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


@dataclass
class LoginOutcome:
    state: OAuthState | None
    asked: bool  # the server asked for authorization (else it let us in without a token)


async def login(
    cfg: ServerConfig,
    store: OAuthStore,
    announce: Callable[[str], None],
    *,
    port: int | None = None,
    open_browser: bool = True,
) -> LoginOutcome:
    """Log in to an OAuth server and store its tokens; raises LoginError (or NeedsLogin) with the reason."""
    if cfg.auth != "oauth" or cfg.oauth is None:
        raise LoginError(f"server {cfg.name!r} does not use OAuth (its auth mode is {cfg.auth!r})")
    before = await store.state(cfg.name)
    wanted = before.needed_scope if before else None
    if wanted:
        await _register_anew_for(cfg, store, wanted)
    saved = await store.set_aside_tokens(cfg.name)
    try:
        async with _prompt(cfg, store, announce, port, open_browser) as prompt:
            provider = build_provider(cfg, store, prompt=prompt if cfg.oauth.interactive else None, wanted_scope=wanted)
            conn = ServerConnection(cfg, connect_timeout=LOGIN_TIMEOUT_S + 30, auth_for=lambda _: provider)
            try:
                await conn.open()
                # Some servers let the handshake through and guard only what follows (tools/list, a call).
                await conn.list_tools()
            except NeedsLogin:
                raise
            except VoiceMcpError as exc:
                raise LoginError(str(exc)) from None
            except Exception as exc:
                refusal = conn.refusal()
                raise LoginError(str(refusal) if refusal else f"server {cfg.name!r}: {exc}") from None
            finally:
                await conn.close()
    except BaseException:
        if saved is not None:
            await store.put_back_tokens(cfg.name, saved)
        raise
    after = await store.state(cfg.name)
    return LoginOutcome(after, asked=bool(after and after.has_tokens))


async def _register_anew_for(cfg: ServerConfig, store: OAuthStore, wanted: str) -> None:
    """A step-up login asks for scopes the dynamically registered client may not have been registered for; an
    authorization server that holds clients to their registered scope (the SDK's does) would refuse it."""
    assert cfg.oauth is not None
    if cfg.oauth.client_id or cfg.oauth.client_metadata_url:
        return  # a client we do not register: its scopes are its owner's business
    client = await store.client(cfg.name)
    if client is not None and not set(wanted.split()) <= set((client.get("scope") or "").split()):
        await store.forget_client(cfg.name)


@asynccontextmanager
async def _prompt(
    cfg: ServerConfig, store: OAuthStore, announce: Callable[[str], None], port: int | None, open_browser: bool
) -> AsyncIterator[LoopbackPrompt]:
    """The loopback listener, on the port a dynamically registered client was registered with when it is free
    (a strict authorization server compares the port too); otherwise on a free one, registering anew."""
    registered = None
    if port is None and cfg.oauth is not None and not cfg.oauth.client_id:
        client: dict[str, Any] | None = await store.client(cfg.name)
        uris = (client or {}).get("redirect_uris") or []
        loopback = [urlsplit(u) for u in uris if urlsplit(u).hostname == "127.0.0.1" and urlsplit(u).port]
        registered = loopback[0].port if loopback else None
    prompt = LoopbackPrompt(announce, port=port or registered or 0, open_browser=open_browser)
    try:
        entered = await prompt.__aenter__()
    except OSError:
        if port:
            raise LoginError(f"cannot listen on 127.0.0.1:{port} for the redirect (in use?)") from None
        await store.forget_client(cfg.name)
        prompt = LoopbackPrompt(announce, port=0, open_browser=open_browser)
        entered = await prompt.__aenter__()
    if registered and entered.port != registered:
        await store.forget_client(cfg.name)
    try:
        yield entered
    finally:
        await entered.__aexit__()
