"""One transport per registry row: stdio, Streamable HTTP and legacy SSE through the `mcp` SDK, WebSocket ours
(what the server then answers is checked by `tool_guard.py`).

Secrets stay references (`env:NAME`, `{env:NAME}` in a URL) until this module resolves them at connect time
(`secrets.py` then knows them, and scrubs them from everything). A stdio server's stderr passes through the same
scrubber, and its whole process group is ended on close (`stdio_guard.py`).
"""

from __future__ import annotations

import functools
import logging
import ssl
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx2
from mcp.client.sse import sse_client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from mcp_integration.keep_alive import KeepAliveTransport
from mcp_integration.mcp_compat import Transport, TransportStreams
from mcp_integration.registry import ServerConfig
from mcp_integration.secrets import resolve_refs, resolve_url
from mcp_integration.stdio_guard import guarded_stdio
from mcp_integration.ws_transport import websocket_client

__all__ = [
    "StatusHook",
    "open_transport",
    "prewarm",
]


log = logging.getLogger(__name__)

# Connections a server's client keeps open for reuse: httpx's default (20) is below the Dispatcher's calls in
# flight per server (64), and a burst of more calls than that opened a new connection for each one above it.
_LIMITS = httpx2.Limits(max_connections=100, max_keepalive_connections=64)

# Called with the status of each HTTP response the transport receives: how a 401 or 403 is told apart from
# other failures (the SDK's Streamable HTTP client reports every 4xx as "Server returned an error response").
StatusHook = Callable[[int], None]


def open_transport(
    cfg: ServerConfig,
    *,
    connect_timeout: float = 10.0,
    on_status: StatusHook | None = None,
    auth: httpx2.Auth | None = None,
) -> Transport:
    """The SDK transport (an async context manager yielding the stream pair) for a registry row; `auth` (an OAuth
    provider, `oauth.py`) signs every HTTP request of an OAuth server."""
    headers = resolve_refs(cfg.headers, what="header", server=cfg.name)
    if cfg.transport == "stdio":
        env = resolve_refs(cfg.env, what="env", server=cfg.name)
        assert cfg.command
        # "replace": one invalid byte from a server must not end the connection (strict decoding kills the reader).
        params = StdioServerParameters(
            command=cfg.command, args=list(cfg.args), env=env or None, encoding_error_handler="replace"
        )
        # The server's stderr reaches ours (where an operator sees why it failed to start), scrubbed.
        return guarded_stdio(params, cfg.name)
    assert cfg.url
    url = resolve_url(cfg.url, server=cfg.name)
    hooks = _status_hooks(on_status)
    if cfg.transport == "streamable-http":
        # A long read timeout: the server may hold a response stream open while a tool works.
        client = httpx2.AsyncClient(
            headers=headers,
            timeout=httpx2.Timeout(connect_timeout, read=max(300.0, cfg.max_wait_ms / 1000)),
            verify=_ssl_context(),
            event_hooks=hooks,
            auth=auth,
            trust_env=_env_proxies(),
            # Each answer read to its end, so the next request reuses the connection (keep_alive.py). Proxied
            # hosts go through httpx's own proxy transports, which close them as before.
            transport=KeepAliveTransport(
                httpx2.AsyncHTTPTransport(verify=_ssl_context(), limits=_LIMITS, trust_env=_env_proxies()),
                server=cfg.name,
            ),
        )
        return _owning(streamable_http_client(url, http_client=client), client)
    if cfg.transport == "sse":

        def factory(
            headers: dict[str, str] | None = None,
            timeout: httpx2.Timeout | None = None,
            auth: httpx2.Auth | None = None,
        ) -> httpx2.AsyncClient:
            return httpx2.AsyncClient(
                headers=headers,
                timeout=timeout,
                auth=auth,
                verify=_ssl_context(),
                event_hooks=hooks,
                trust_env=_env_proxies(),
            )

        return sse_client(
            url,
            headers=headers,
            timeout=connect_timeout,
            sse_read_timeout=3600.0,
            httpx_client_factory=factory,
            auth=auth,
        )
    if cfg.transport == "websocket":
        return websocket_client(url, headers=headers, open_timeout=connect_timeout)
    raise ValueError(f"unknown transport {cfg.transport!r}")


def _status_hooks(on_status: StatusHook | None) -> dict[str, list[Callable[[httpx2.Response], Any]]]:
    if on_status is None:
        return {}

    async def seen(response: httpx2.Response) -> None:
        on_status(response.status_code)

    return {"response": [seen]}


def prewarm() -> None:
    """What a worker process can build before its first session, so that no session start pays for it."""
    _ssl_context()
    _env_proxies()


@functools.cache
def _env_proxies() -> bool:
    # With our own TLS context, the environment matters to httpx only for proxies (HTTP(S)_PROXY, ALL_PROXY,
    # NO_PROXY), which it reads again for every client: a fifth of a server's connect, for nothing when none is
    # set. Read once; with one set, httpx reads them as before.
    return bool(urllib.request.getproxies())


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Building a context loads the CA bundle (~17 ms of CPU, blocking the loop); once per process is enough,
    # and 20 servers connecting at once would otherwise queue behind each other here.
    return ssl.create_default_context()


@asynccontextmanager
async def _owning(inner: Transport, client: httpx2.AsyncClient) -> AsyncIterator[TransportStreams]:
    # streamable_http_client leaves a caller-supplied client open; we made it, so we close it.
    async with client, inner as streams:
        yield streams
