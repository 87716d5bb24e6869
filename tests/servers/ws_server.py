"""Test MCP server over WebSocket: `python tests/servers/ws_server.py --port N`.

Prints exactly one line, `LISTENING <port>`, once it accepts connections
(`--port 0` picks a free port). `--close-after-ms N` closes every connection
N ms after it opens, to exercise server-side closes; `--token-env VAR` refuses a handshake without
`Authorization: Bearer <$VAR>` with HTTP 401, as a gateway would; SIGUSR1 closes every open connection at once (a fault
whose moment a benchmark can know).
"""

from __future__ import annotations

import argparse
import hmac
import os
import signal
import sys
from http import HTTPStatus
from pathlib import Path

import anyio

# Run by path, so the project root is not on sys.path by default.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from mcp.server.mcpserver import Context, MCPServer  # noqa: E402
from mcp.server.mcpserver.exceptions import ToolError  # noqa: E402
from websockets.asyncio.server import ServerConnection  # noqa: E402
from websockets.http11 import Request, Response  # noqa: E402
from ws_serve import serve_websocket  # noqa: E402

mcp = MCPServer("ws-test-server")


@mcp.tool()
def echo(text: str) -> str:
    """Returns the text, prefixed."""
    return f"echo: {text}"


@mcp.tool()
async def slow(seconds: float, ctx: Context) -> str:
    """Sleeps for `seconds`, reporting progress along the way."""
    steps = 5
    for i in range(steps):
        await ctx.report_progress(i, steps, f"step {i + 1} of {steps}")
        await anyio.sleep(seconds / steps)
    await ctx.report_progress(steps, steps, "finished")
    return f"done after {seconds:g}s"


@mcp.tool()
def fail(reason: str) -> str:
    """Always raises, so the caller gets an isError result (ToolError, so the reason reaches the caller)."""
    raise ToolError(reason)


@mcp.tool()
def get_header(name: str, ctx: Context) -> str:
    """Returns one handshake header as the server saw it ("" if absent); lets tests check headers arrive."""
    return (ctx.headers or {}).get(name.lower(), "")


async def main(host: str, port: int, close_after_ms: int | None, token: str | None = None) -> None:
    closing = anyio.Event()

    def guard(ws: ServerConnection, request: Request) -> Response | None:
        if token is None or hmac.compare_digest(request.headers.get("Authorization", ""), f"Bearer {token}"):
            return None
        return ws.respond(HTTPStatus.UNAUTHORIZED, "invalid token\n")

    async def close_later(ws: ServerConnection) -> None:
        with anyio.move_on_after(close_after_ms / 1000 if close_after_ms is not None else None):
            await closing.wait()
        await ws.close(1001, "closed by the server")

    async def on_signal() -> None:
        nonlocal closing
        with anyio.open_signal_receiver(signal.SIGUSR1) as signals:
            async for _ in signals:
                closing.set()
                closing = anyio.Event()

    serving = serve_websocket(mcp, host, port, on_connect=close_later, process_request=guard)
    async with serving as bound_port, anyio.create_task_group() as tg:
        tg.start_soon(on_signal)
        print(f"LISTENING {bound_port}", flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--close-after-ms", type=int, default=None)
    parser.add_argument("--token-env", default=None, help="require Authorization: Bearer <the value of this variable>")
    args = parser.parse_args()
    token = os.environ[args.token_env] if args.token_env else None
    try:
        anyio.run(main, args.host, args.port, args.close_after_ms, token)
    except KeyboardInterrupt:
        pass
