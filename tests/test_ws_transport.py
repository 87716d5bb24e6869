"""WebSocket transport: our client against the test server run as a real subprocess, plus raw-socket edge cases."""

from __future__ import annotations

import json
import logging
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest
from mcp import Client, MCPError
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.message import SessionMessage
from mcp_types import CallToolResult, JSONRPCRequest, JSONRPCResponse, TextContent
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import InvalidStatus

# pytest puts tests/ (not the project root) on sys.path, and pyproject sets no pythonpath.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from servers.ws_serve import serve_websocket  # noqa: E402

from mcp_integration.ws_transport import MCP_SUBPROTOCOL, websocket_client  # noqa: E402

SERVER_SCRIPT = Path(__file__).parent / "servers" / "ws_server.py"
STARTUP_TIMEOUT = 20.0


@contextmanager
def _run_server(*extra_args: str) -> Iterator[int]:
    """Starts tests/servers/ws_server.py, yields its port, and always kills it."""
    proc = subprocess.Popen(
        [sys.executable, str(SERVER_SCRIPT), "--port", "0", *extra_args],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], STARTUP_TIMEOUT)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("LISTENING "):
            pytest.fail(f"server did not start (exit code {proc.poll()}, first line {line!r})")
        yield int(line.split()[1])
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="module")
def server_port() -> Iterator[int]:
    with _run_server() as port:
        yield port


@pytest.fixture(scope="module")
def closing_server_port() -> Iterator[int]:
    with _run_server("--close-after-ms", "1000") as port:
        yield port


def _text(result: CallToolResult) -> str:
    block = result.content[0]
    assert isinstance(block, TextContent)
    return block.text


async def test_list_tools(server_port: int) -> None:
    async with Client(websocket_client(f"ws://127.0.0.1:{server_port}/")) as c:
        tools = await c.session.list_tools()
    assert {"echo", "slow", "fail"} <= {t.name for t in tools.tools}


async def test_echo(server_port: int) -> None:
    async with Client(websocket_client(f"ws://127.0.0.1:{server_port}/")) as c:
        result = await c.session.call_tool("echo", {"text": "hi"})
    assert not result.is_error
    assert _text(result) == "echo: hi"


async def test_fail_is_error_result(server_port: int) -> None:
    async with Client(websocket_client(f"ws://127.0.0.1:{server_port}/")) as c:
        result = await c.session.call_tool("fail", {"reason": "kaboom"})
        # The session survives a failing tool.
        again = await c.session.call_tool("echo", {"text": "still here"})
    assert result.is_error is True
    assert "kaboom" in _text(result)
    assert _text(again) == "echo: still here"


async def test_progress_events_arrive(server_port: int) -> None:
    events: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        events.append((progress, total, message))

    async with Client(websocket_client(f"ws://127.0.0.1:{server_port}/")) as c:
        result = await c.session.call_tool("slow", {"seconds": 0.3}, progress_callback=on_progress)
    assert _text(result) == "done after 0.3s"
    assert len(events) >= 2
    assert [p for p, _, _ in events] == sorted(p for p, _, _ in events)
    assert events[-1] == (5, 5, "finished")


async def test_server_negotiates_mcp_subprotocol(server_port: int) -> None:
    url = f"ws://127.0.0.1:{server_port}/"
    async with connect(url, subprotocols=[MCP_SUBPROTOCOL]) as ws:
        assert ws.subprotocol == "mcp"
    # A client that does not speak `mcp` is refused at the handshake.
    with pytest.raises(InvalidStatus) as excinfo:
        async with connect(url):
            pass
    assert excinfo.value.response.status_code == 400


async def test_headers_reach_server(server_port: int) -> None:
    headers = {"Authorization": "Bearer test-token-123", "X-Tenant": "acme"}
    async with Client(websocket_client(f"ws://127.0.0.1:{server_port}/", headers=headers)) as c:
        auth = await c.session.call_tool("get_header", {"name": "Authorization"})
        tenant = await c.session.call_tool("get_header", {"name": "x-tenant"})
    assert _text(auth) == "Bearer test-token-123"
    assert _text(tenant) == "acme"


async def test_server_close_fails_pending_call_promptly(closing_server_port: int) -> None:
    url = f"ws://127.0.0.1:{closing_server_port}/"
    started = time.monotonic()
    with anyio.fail_after(10):  # a hang fails the test instead of stalling the suite
        async with Client(websocket_client(url)) as c:
            call_started = time.monotonic()
            with pytest.raises(MCPError):
                # The server closes the socket ~1 s after it opened, long before this finishes.
                await c.session.call_tool("slow", {"seconds": 30})
            failed_after = time.monotonic() - call_started
    assert failed_after < 3.0, f"pending call took {failed_after:.2f}s to fail"
    assert time.monotonic() - started < 5.0


async def test_non_json_frame_is_exception_item_not_crash() -> None:
    """A raw server sends garbage, then a valid request; the transport keeps going."""
    seen: dict[str, object] = {}

    async def handler(ws: ServerConnection) -> None:
        seen["offered"] = ws.request.headers.get("Sec-WebSocket-Protocol") if ws.request else None
        await ws.send("this is not json")
        await ws.send('{"jsonrpc": "2.0", "method": "ping"')  # truncated JSON
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        seen["reply"] = json.loads(await ws.recv())
        # Closing from this side must end the client's read stream.

    async with serve(handler, "127.0.0.1", 0, subprotocols=[MCP_SUBPROTOCOL]) as raw_server:
        port = raw_server.sockets[0].getsockname()[1]
        with anyio.fail_after(5):
            async with websocket_client(f"ws://127.0.0.1:{port}/") as (read_stream, write_stream):
                assert isinstance(await read_stream.receive(), Exception)
                assert isinstance(await read_stream.receive(), Exception)
                item = await read_stream.receive()
                assert isinstance(item, SessionMessage)
                assert isinstance(item.message, JSONRPCRequest)
                assert item.message.method == "ping"
                await write_stream.send(SessionMessage(JSONRPCResponse(jsonrpc="2.0", id=1, result={})))
                leftovers = [x async for x in read_stream]
    assert leftovers == []
    assert seen["offered"] == "mcp"
    assert seen["reply"] == {"jsonrpc": "2.0", "id": 1, "result": {}}


async def test_in_process_serve_websocket_never_logs_header_values(caplog: pytest.LogCaptureFixture) -> None:
    """serve_websocket bridges in-process too; websockets' DEBUG handshake dump must stay off."""
    server = MCPServer("in-process")

    @server.tool()
    def whoami(ctx: Context) -> str:
        return "authorized" if (ctx.headers or {}).get("authorization") == "Bearer sup3r-s3cret" else "anonymous"

    caplog.set_level(logging.DEBUG)
    async with serve_websocket(server) as port:
        transport = websocket_client(f"ws://127.0.0.1:{port}/", headers={"Authorization": "Bearer sup3r-s3cret"})
        async with Client(transport) as c:
            result = await c.session.call_tool("whoami", {})
    assert _text(result) == "authorized"
    assert "sup3r-s3cret" not in caplog.text


async def test_connection_refused_raises() -> None:
    # Bind then release a port so nothing is listening on it.
    async with serve_websocket(MCPServer("gone")) as port:
        pass
    with anyio.fail_after(5), pytest.raises(OSError):
        async with websocket_client(f"ws://127.0.0.1:{port}/", open_timeout=2):
            pass
