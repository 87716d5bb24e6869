"""A server that hands our credentials back to us, in its answers, its errors and its stderr, as careless real
servers do ("401: invalid token Bearer sk-…", a debug tool that shows the request, a startup line printing its
API key). For the secret-scrubbing tests.

    python tests/servers/echo_creds_server.py --transport stdio          # echoes the env var API_TOKEN
    python tests/servers/echo_creds_server.py --transport http --port 0  # prints LISTENING <port>
    python tests/servers/echo_creds_server.py --transport websocket --port 0

HTTP serves Streamable HTTP at any path ending in /mcp and legacy SSE at any path ending in /sse (messages at
/messages/), so a URL may carry a token in its path (`/s/<token>/mcp`) and its query (`?api_key=…`).
Tools: `whoami` answers with the Authorization and X-Api-Key headers, the path and query it was reached at (and
on stdio the API_TOKEN variable); `denied` fails with the same in its error message.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import anyio  # noqa: E402
from demo_server import serve_http  # noqa: E402
from mcp.server.mcpserver import Context, MCPServer  # noqa: E402
from mcp.server.mcpserver.exceptions import ToolError  # noqa: E402
from ws_serve import serve_websocket  # noqa: E402


def seen(ctx: Context) -> str:
    request: Any = ctx.request_context.request
    headers = ctx.headers or {}
    scope = getattr(request, "scope", {}) or {}
    path = scope.get("orig_path") or getattr(request, "path", "") or ""
    query = scope.get("query_string", b"").decode("latin-1") if scope else ""
    return (
        f"auth=[{headers.get('authorization', '')}] key=[{headers.get('x-api-key', '')}] "
        f"path=[{path}] query=[{query}] env=[{os.environ.get('API_TOKEN', '')}]"
    )


def build() -> MCPServer:
    mcp = MCPServer("echo-creds")

    @mcp.tool()
    async def whoami(ctx: Context) -> str:
        """Say what credentials the request carried."""
        return f"you are {seen(ctx)}"

    @mcp.tool()
    async def denied(ctx: Context) -> str:
        """Refuse, quoting the credentials (as careless servers do)."""
        raise ToolError(f"denied: {seen(ctx)}")

    return mcp


def any_prefix(app: Any) -> Any:
    """`/<anything>/mcp` → `/mcp`, `/<anything>/sse` → `/sse`, remembering the path the client used."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            for tail in ("/mcp", "/sse"):
                if path.rstrip("/").endswith(tail):
                    scope = {**scope, "orig_path": path, "path": tail, "raw_path": tail.encode()}
        await app(scope, receive, send)

    return wrapped


async def serve_both(mcp: MCPServer, port: int) -> None:
    from demo_server import app_with_mcp

    mcp_app = app_with_mcp(mcp, [], sse=False)
    sse_app = mcp.sse_app(sse_path="/sse", message_path="/messages/")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == "/sse" or path.startswith("/messages"):
            await sse_app(scope, receive, send)
        else:
            await mcp_app(scope, receive, send)

    await serve_http(any_prefix(app), port)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", choices=["stdio", "http", "websocket"], default="stdio")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    mcp = build()
    if args.transport == "stdio":
        # A careless startup line: the key, in full, on stderr.
        print(f"echo-creds starting with API_TOKEN={os.environ.get('API_TOKEN', '')}", file=sys.stderr, flush=True)
        mcp.run("stdio")
    elif args.transport == "http":
        asyncio.run(serve_both(mcp, args.port))
    else:

        async def ws() -> None:
            async with serve_websocket(mcp, "127.0.0.1", args.port) as bound:
                print(f"LISTENING {bound}", flush=True)
                await anyio.sleep_forever()

        anyio.run(ws)


if __name__ == "__main__":
    main()
