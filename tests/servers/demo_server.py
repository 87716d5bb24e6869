"""A real MCP server for the tests and benchmarks, over stdio, Streamable HTTP or legacy SSE.

    python tests/servers/demo_server.py --transport stdio
    python tests/servers/demo_server.py --transport sse --port 0      # prints "LISTENING <port>"

Tools: echo (fast), slow (sleeps, reports progress), fail (an error result), add, lookup.weather (a name
unsafe for LLMs); --list-delay-ms delays every tools/list answer. Malformed schemas: raw_stdio_server.py.
Faults on demand: --ping-delay-ms delays every `ping` and `server/discover` (the liveness probes); --legacy
refuses `server/discover`, so a client falls back to the 2025-11-25 handshake (with an `Mcp-Session-Id` on
Streamable HTTP); --sse-close-after-ms ends each SSE event stream that long after it opened (as an
idle-closing proxy does), --sse-close-on-signal ends them on SIGUSR1; --pid-file writes the process id.
Streamable HTTP only, for the protocol-memory tests: --method-log PATH appends one line per HTTP request
("POST tools/list", "GET", "DELETE"); --legacy-only answers as a server written before 2026-07-28 does (an SDK
1.x server: anything sent at a 2026 version, `server/discover` included, is refused with HTTP 400 and JSON-RPC
-32600); --modern-only refuses the `initialize` handshake with -32022, naming only 2026-07-28.
--discover-ttl-ms N: the `ttlMs` of its `server/discover` result (the SDK's default, 0, lets no client reuse it);
--tools-ttl-ms N the same for `tools/list`; --tools-page-size N lists the tools in pages of N, with cursors that
name the process (one made before a restart is refused with -32602, as by a server keeping listings in memory);
--growing adds `grow(name)`, which adds a tool and sends `notifications/tools/list_changed`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from mcp.server.caching import CacheHint
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPError
from mcp_types import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    UNSUPPORTED_PROTOCOL_VERSION,
    ListToolsResult,
    PaginatedRequestParams,
)
from mcp_types import Tool as MCPTool
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from starlette.applications import Starlette
from starlette.routing import Route


class DemoServer(MCPServer):
    def __init__(self, name: str, *, list_delay_ms: int = 0, tools_page_size: int = 0, **options: Any) -> None:
        super().__init__(name, **options)
        self.list_delay_ms = list_delay_ms
        self.tools_page_size = tools_page_size
        # Cursors name this process: a server holding its listings in memory knows none made before it started.
        self._cursor_prefix = os.urandom(4).hex()

    async def list_tools(self) -> list[MCPTool]:
        if self.list_delay_ms:
            await asyncio.sleep(self.list_delay_ms / 1000)
        return await super().list_tools()

    async def _handle_list_tools(
        self, ctx: ServerRequestContext[Any], params: PaginatedRequestParams | None
    ) -> ListToolsResult:
        if not self.tools_page_size:
            return await super()._handle_list_tools(ctx, params)
        cursor = params.cursor if params is not None else None
        start = 0
        if cursor is not None:
            prefix, _, offset = cursor.partition(":")
            if prefix != self._cursor_prefix or not offset.isdigit():
                raise MCPError(INVALID_PARAMS, f"unknown cursor {cursor!r}")
            start = int(offset)
        tools = await self.list_tools()
        end = start + self.tools_page_size
        following = f"{self._cursor_prefix}:{end}" if end < len(tools) else None
        return ListToolsResult(tools=tools[start:end], next_cursor=following)


def build(name: str, **kwargs: Any) -> DemoServer:
    mcp = DemoServer(name, **kwargs)

    @mcp.tool()
    async def echo(text: str) -> str:
        """Repeat the text back."""
        return f"echo: {text}"

    @mcp.tool()
    async def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @mcp.tool()
    async def slow(seconds: float, ctx: Context, steps: int = 4) -> str:
        """Wait a while, reporting progress, then answer."""
        for i in range(steps):
            await ctx.report_progress(i, steps, f"step {i + 1} of {steps}")
            await asyncio.sleep(seconds / steps)
        return f"done after {seconds:g}s"

    @mcp.tool()
    async def fail(reason: str = "it broke") -> str:
        """Always fails, with the reason given."""
        raise ToolError(reason)

    @mcp.tool(name="lookup.weather")
    async def weather(city: str) -> dict[str, Any]:
        """A tool whose name is not safe for LLM function calling."""
        return {"city": city, "forecast": "sunny", "high_c": 21}

    return mcp


def growing(mcp: DemoServer) -> None:
    """`grow(name)`: adds a tool of that name (it answers "<name> is here"), then tells the client its tool list
    changed (`notifications/tools/list_changed`), as servers that unlock tools mid-session do."""

    @mcp.tool()
    async def grow(name: str, ctx: Context) -> str:
        """Add a tool of this name, and tell the client its tool list changed."""

        async def grown() -> str:
            return f"{name} is here"

        mcp.add_tool(grown, name=name, description=f"The {name} tool, added by grow.")
        await ctx.session.send_tool_list_changed()
        return f"{name} added"


class Quirks:
    """Server middleware for fault tests: slow `ping` and `server/discover`, and (legacy) no `server/discover`."""

    def __init__(self, *, ping_delay_ms: int = 0, legacy: bool = False) -> None:
        self.ping_delay_s = ping_delay_ms / 1000
        self.legacy = legacy

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if self.legacy and ctx.method == "server/discover":
            raise MCPError(METHOD_NOT_FOUND, "Method not found: server/discover")
        if ctx.method in ("ping", "server/discover") and self.ping_delay_s:
            await asyncio.sleep(self.ping_delay_s)
        return await call_next(ctx)


def closing_event_streams(app: Any, after_ms: int | None) -> Any:
    """Wrap an ASGI app so the server ends each GET (event stream) response `after_ms` after it opened, or when
    the process gets SIGUSR1 (a fault whose moment a benchmark can know)."""
    state = {"closing": asyncio.Event()}

    def on_signal() -> None:
        state["closing"].set()
        state["closing"] = asyncio.Event()

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, on_signal)
        if scope["type"] != "http" or scope["method"] != "GET":
            await app(scope, receive, send)
            return
        closing = state["closing"]
        served = asyncio.ensure_future(app(scope, receive, send))
        ended = asyncio.ensure_future(closing.wait())
        await asyncio.wait(
            {served, ended}, timeout=after_ms / 1000 if after_ms else None, return_when="FIRST_COMPLETED"
        )
        ended.cancel()
        if not served.done():
            served.cancel()
            await asyncio.gather(served, return_exceptions=True)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    return wrapped


_CHATTER = b": " + b"." * 4096 + b"\n\n"


def holding_post_streams(app: Any, hold_ms: int, *, chatter: bool = False) -> Any:
    """Wrap a Streamable HTTP app so each POST answered as an event stream stays open `hold_ms` after its last
    event (with `chatter`, a 4 KiB SSE comment every 5 ms meanwhile) before it ends. A fault, not something we saw a
    server do: the spec has a server close a POST's stream once its answer is sent (the SDK's server and
    server-everything do: `tests/test_keep_alive.py`, `tests/test_real_servers.py`), and a client must not wait
    on one that does not."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await app(scope, receive, send)
            return
        streaming = False

        async def held(message: dict[str, Any]) -> None:
            nonlocal streaming
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and streaming and not message.get("more_body", False):
                if message.get("body"):
                    await send({**message, "more_body": True})
                end = time.monotonic() + hold_ms / 1000
                while time.monotonic() < end:
                    if chatter:
                        await send({"type": "http.response.body", "body": _CHATTER, "more_body": True})
                    await asyncio.sleep(0.005 if chatter else end - time.monotonic())
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await app(scope, receive, held)

    return wrapped


def era_gate(app: Any, *, method_log: str = "", legacy_only: bool = False, modern_only: bool = False) -> Any:
    """Wrap a Streamable HTTP app: log each request's method (`method_log`), and answer as a server of one era
    only. The SDK's server speaks both eras; a real pre-2026 server refuses a request carrying a 2026 protocol
    version (SDK 1.x: `400 Bad Request: Unsupported protocol version`), and a 2026-only one refuses `initialize`."""
    log = Path(method_log) if method_log else None

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        body = b""
        if scope["method"] == "POST":
            more = True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        message = parsed if isinstance(parsed, dict) else {}
        method, rid = message.get("method"), message.get("id")
        if log is not None:
            with log.open("a") as f:
                f.write(f"{scope['method']} {method or ''}".rstrip() + "\n")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        version = headers.get("mcp-protocol-version")
        if legacy_only and version is not None and version not in HANDSHAKE_PROTOCOL_VERSIONS:
            supported = ", ".join(HANDSHAKE_PROTOCOL_VERSIONS)
            reason = f"Bad Request: Unsupported protocol version: {version}. Supported protocol versions: {supported}"
            await _json_error(send, 400, rid, INVALID_REQUEST, reason)
            return
        if modern_only and method == "initialize":
            requested = (message.get("params") or {}).get("protocolVersion", "")
            data = {"supported": list(MODERN_PROTOCOL_VERSIONS), "requested": requested}
            await _json_error(send, 400, rid, UNSUPPORTED_PROTOCOL_VERSION, "Unsupported protocol version", data)
            return
        if scope["method"] != "POST":
            await app(scope, receive, send)
            return
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await app(scope, replay, send)

    return wrapped


async def _json_error(send: Any, status: int, rid: Any, code: int, message: str, data: Any = None) -> None:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    body = json.dumps({"jsonrpc": "2.0", "id": rid if rid is not None else "server-error", "error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def app_with_mcp(mcp: MCPServer, routes: list[Route], *, sse: bool = False) -> Starlette:
    """`routes` beside the MCP endpoints (Streamable HTTP at /mcp; with `sse`, legacy SSE at /mcp/sse) in one app.

    The MCP routes are lifted out of their sub-apps, whose lifespans then do not run: the Streamable HTTP
    session manager is run here instead, before the first request.
    """
    mcp_routes = list(mcp.streamable_http_app(streamable_http_path="/mcp").routes)
    if sse:
        mcp_routes = [*mcp.sse_app(sse_path="/mcp/sse", message_path="/mcp/messages/").routes, *mcp_routes]

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with mcp.session_manager.run():
            yield

    return Starlette(routes=[*routes, *mcp_routes], lifespan=lifespan)


def listening_socket(port: int) -> socket.socket:
    # Naming TCP matters: uvicorn sets TCP_NODELAY only on sockets it knows are TCP; without it each reply on a
    # kept-alive connection waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


async def serve_http(app: Any, port: int) -> None:
    sock = listening_socket(port)
    print(f"LISTENING {sock.getsockname()[1]}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    await server.serve(sockets=[sock])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", choices=["stdio", "streamable-http", "sse"], default="stdio")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="demo")
    parser.add_argument("--list-delay-ms", type=int, default=0)
    parser.add_argument("--ping-delay-ms", type=int, default=0)
    parser.add_argument("--legacy", action="store_true", help="refuse server/discover: 2025-11-25 handshake")
    parser.add_argument("--sse-close-after-ms", type=int, default=0)
    parser.add_argument("--sse-close-on-signal", action="store_true", help="end every event stream on SIGUSR1")
    parser.add_argument("--pid-file", default="")
    parser.add_argument("--method-log", default="", help="streamable-http: append each request's method here")
    parser.add_argument(
        "--hold-post-streams-ms", type=int, default=0, help="streamable-http: a POST's event stream ends this late"
    )
    parser.add_argument("--chatter", action="store_true", help="with --hold-post-streams-ms: SSE comments meanwhile")
    parser.add_argument(
        "--discover-ttl-ms",
        type=int,
        default=0,
        help="ttlMs of the server/discover result: how long a client may reuse it (0, the SDK's default: not at all)",
    )
    parser.add_argument("--growing", action="store_true", help="a grow(name) tool that adds tools (list_changed)")
    parser.add_argument(
        "--tools-page-size",
        type=int,
        default=0,
        help="tools/list in pages of this many tools, with cursors only this process knows (0: one page)",
    )
    parser.add_argument(
        "--tools-ttl-ms",
        type=int,
        default=0,
        help="ttlMs of the tools/list result: how long a client may reuse the tool list (0: not at all)",
    )
    era = parser.add_mutually_exclusive_group()
    era.add_argument("--legacy-only", action="store_true", help="streamable-http: refuse every 2026 request")
    era.add_argument("--modern-only", action="store_true", help="streamable-http: refuse the initialize handshake")
    args = parser.parse_args()
    if args.pid_file:
        with open(args.pid_file, "w") as f:
            f.write(str(os.getpid()))
    hints = {"server/discover": CacheHint(ttl_ms=args.discover_ttl_ms)} if args.discover_ttl_ms else {}
    if args.tools_ttl_ms:
        hints["tools/list"] = CacheHint(ttl_ms=args.tools_ttl_ms)
    mcp = build(
        args.name, list_delay_ms=args.list_delay_ms, tools_page_size=args.tools_page_size, cache_hints=hints or None
    )
    if args.growing:
        growing(mcp)
    if args.ping_delay_ms or args.legacy:
        mcp.middleware.append(Quirks(ping_delay_ms=args.ping_delay_ms, legacy=args.legacy))
    if args.transport == "stdio":
        mcp.run("stdio")
    elif args.transport == "sse":
        app = mcp.sse_app()
        if args.sse_close_after_ms or args.sse_close_on_signal:
            app = closing_event_streams(app, args.sse_close_after_ms or None)
        asyncio.run(serve_http(app, args.port))
    else:
        app = mcp.streamable_http_app()
        if args.method_log or args.legacy_only or args.modern_only:
            app = era_gate(app, method_log=args.method_log, legacy_only=args.legacy_only, modern_only=args.modern_only)
        if args.hold_post_streams_ms:
            app = holding_post_streams(app, args.hold_post_streams_ms, chatter=args.chatter)
        asyncio.run(serve_http(app, args.port))


if __name__ == "__main__":
    sys.exit(main())
