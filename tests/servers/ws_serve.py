"""A WebSocket MCP server for the tests: one MCP session per connection, the wire convention of the SDK 1.x (and
of our client, `mcp_integration.ws_transport`): subprotocol `mcp`, one JSON-RPC message per text frame.

Test-only: the product is a client. Used by ws_server.py, echo_creds_server.py and tests that serve in-process.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from websockets.asyncio.server import ServerConnection, serve

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from mcp_integration.ws_transport import DEFAULT_MAX_SIZE, MCP_SUBPROTOCOL, bridge, quiet_logger  # noqa: E402

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer
    from websockets.http11 import Request, Response


_server_wire_logger = quiet_logger("websockets.server")


@asynccontextmanager
async def serve_websocket(
    server: MCPServer,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    on_connect: Callable[[ServerConnection], Awaitable[None]] | None = None,
    process_request: Callable[[ServerConnection, Request], Response | None] | None = None,
) -> AsyncIterator[int]:
    """Serves `server` over WebSocket, one MCP session per connection; yields the bound port.

    `on_connect`, if given, runs alongside each session (cancelled when the session
    ends), e.g. to cap a connection's lifetime; `process_request` may refuse a handshake
    (websockets' hook: return a response to send instead). Tools see the handshake
    headers as `ctx.headers`, as they would on the HTTP transports.
    """
    # The SDK's own run methods reach for this attribute; there is no public equivalent yet.
    lowlevel = server._lowlevel_server  # pyright: ignore[reportPrivateUsage]

    async def handle(ws: ServerConnection) -> None:
        async with bridge(ws, request=ws.request) as (read_stream, write_stream), anyio.create_task_group() as tg:
            if on_connect is not None:
                tg.start_soon(on_connect, ws)
            await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())
            tg.cancel_scope.cancel()

    async with serve(
        handle,
        host,
        port,
        # Clients that do not offer `mcp` get HTTP 400 rather than a session they cannot speak.
        subprotocols=[MCP_SUBPROTOCOL],
        max_size=DEFAULT_MAX_SIZE,
        logger=_server_wire_logger,
        process_request=process_request,
    ) as ws_server:
        yield ws_server.sockets[0].getsockname()[1]
