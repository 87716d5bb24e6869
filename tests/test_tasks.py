"""The MCP tasks runtime against real task servers: the 2026 extension (fastmcp-tasks) and 2025-11-25 tasks.

Both servers run as subprocesses, over stdio and over Streamable HTTP.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError

from mcp_integration.connection import ServerConnection
from mcp_integration.registry import ServerConfig, ToolSpec
from mcp_integration.tasks import DIALECT_2025, DIALECT_2026, TaskError, TaskHandle, TaskStatus
from tests.conftest import SERVERS

SERVER_2026 = str(SERVERS / "task_server_2026.py")
SERVER_2025 = str(SERVERS / "task_server_2025.py")
TRANSPORTS = ["stdio", "streamable-http"]


def config(script: str, transport: str, spawn: Callable[..., int], *extra: str, **fields: Any) -> ServerConfig:
    if transport == "stdio":
        return ServerConfig(name="tasks", transport="stdio", command=sys.executable, args=[script, *extra], **fields)
    port = spawn("--transport", "streamable-http", "--port", "0", *extra, script=script)
    return ServerConfig(name="tasks", transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp", **fields)


async def connect(cfg: ServerConfig) -> tuple[ServerConnection, dict[str, ToolSpec]]:
    conn = ServerConnection(cfg, connect_timeout=20)
    await conn.open()
    tools = {t.name: t for t in await conn.list_tools()}
    return conn, tools


@pytest.fixture(params=TRANSPORTS)
async def c2026(request: pytest.FixtureRequest, spawn: Callable[..., int]) -> AsyncIterator[Any]:
    conn, tools = await connect(config(SERVER_2026, request.param, spawn))
    try:
        yield conn, tools, request.param
    finally:
        await conn.close()


@pytest.fixture(params=TRANSPORTS)
async def c2025(request: pytest.FixtureRequest, spawn: Callable[..., int]) -> AsyncIterator[Any]:
    conn, tools = await connect(config(SERVER_2025, request.param, spawn))
    try:
        yield conn, tools, request.param
    finally:
        await conn.close()


async def start(conn: ServerConnection, tools: dict[str, ToolSpec], name: str, **args: Any) -> TaskHandle:
    outcome = await conn.tasks.call_tool(name, args, tool_meta=tools[name].meta)
    assert isinstance(outcome, TaskHandle), f"{name} did not run as a task: {outcome!r}"
    return outcome


async def poll_until_terminal(conn: ServerConnection, handle: TaskHandle, timeout: float = 15) -> TaskStatus:
    status = handle.first
    deadline = time.monotonic() + timeout
    while not status.terminal:
        assert time.monotonic() < deadline, f"task {handle.task_id} still {status.status} after {timeout} s"
        await asyncio.sleep(status.poll_interval_s or 0.2)
        status = await conn.tasks.get(handle)
    return status


def text(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def calls_seen(conn: ServerConnection) -> list[dict[str, Any]]:
    result = await conn.tasks.call_tool("calls_seen", {}, tool_meta={})
    assert isinstance(result, types.CallToolResult)
    return json.loads(text(result))


# -- 2026-07-28 extension (fastmcp-tasks) ----------------------------------------------------------------------


async def test_2026_task_completes_with_inline_result(c2026: Any) -> None:
    conn, tools, _ = c2026
    assert conn.client.protocol_version == "2026-07-28"
    handle = await start(conn, tools, "report", seconds=0.5)
    assert handle.dialect == DIALECT_2026
    assert handle.first.status == "working"
    assert handle.first.poll_interval_s == pytest.approx(0.2)  # the server's pollIntervalMs, in seconds
    seen: list[TaskStatus] = []
    status = handle.first
    while not status.terminal:
        await asyncio.sleep(0.15)
        status = await conn.tasks.get(handle)
        seen.append(status)
    assert status.status == "completed" and status.error is None
    assert status.result is not None and text(status.result) == "report ready after 0.5s"
    assert any(s.message and s.message.startswith("step ") for s in seen if s.status == "working")
    assert text(await conn.tasks.result(handle)) == "report ready after 0.5s"


async def test_2026_task_failure_is_failed_with_the_error(c2026: Any) -> None:
    conn, tools, _ = c2026
    handle = await start(conn, tools, "report", seconds=0.2, fail=True)
    status = await poll_until_terminal(conn, handle)
    assert status.status == "failed"
    assert status.error == "the report could not be built"
    assert status.result is None
    with pytest.raises(MCPError, match="could not be built"):
        await conn.tasks.result(handle)


async def test_2026_tool_error_is_completed_with_an_error_result(c2026: Any) -> None:
    # SEP-2663: `failed` is for JSON-RPC errors only; a tool's isError result completes the task.
    conn, tools, _ = c2026
    handle = await start(conn, tools, "report", seconds=0.2, tool_error=True)
    status = await poll_until_terminal(conn, handle)
    assert status.status == "completed"
    assert status.result is not None and status.result.is_error
    assert status.error is not None and "no data" in status.error


async def test_2026_cancel_is_prompt(c2026: Any) -> None:
    conn, tools, _ = c2026
    handle = await start(conn, tools, "report", seconds=30)
    await asyncio.sleep(0.3)
    assert (await conn.tasks.get(handle)).status == "working"
    started = time.monotonic()
    await conn.tasks.cancel(handle)
    status = await conn.tasks.get(handle)
    while status.status == "working" and time.monotonic() - started < 5:
        await asyncio.sleep(0.05)
        status = await conn.tasks.get(handle)
    assert status.status == "cancelled"
    assert time.monotonic() - started < 2
    with pytest.raises(TaskError, match="cancelled"):
        await conn.tasks.result(handle)


async def test_2026_task_outlives_a_short_wait_and_is_fetched_later(c2026: Any, spawn: Callable[..., int]) -> None:
    conn, tools, transport = c2026
    handle = await start(conn, tools, "report", seconds=1.0)
    # The caller gives up waiting; nothing is polled for a while and the task goes on on the server.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(poll_until_terminal(conn, handle), 0.3)
    await asyncio.sleep(1.2)
    if transport == "streamable-http":
        # Over HTTP the task outlives the session: a new connection fetches it by id alone.
        later = ServerConnection(conn.cfg, connect_timeout=20)
        await later.open()
        try:
            status = await later.tasks.get(TaskHandle(DIALECT_2026, handle.task_id, handle.first))
        finally:
            await later.close()
    else:
        status = await conn.tasks.get(handle)
    assert status.status == "completed"
    assert status.result is not None and text(status.result) == "report ready after 1s"


async def test_2026_plain_tool_and_no_push(c2026: Any) -> None:
    conn, tools, _ = c2026
    quick = await conn.tasks.call_tool("quick", {"text": "hi"}, tool_meta=tools["quick"].meta)
    assert isinstance(quick, types.CallToolResult) and text(quick) == "quick: hi"
    # fastmcp-tasks pushes no status: a listen stream asking for the task is not honored, so none is expected.
    handle = await start(conn, tools, "report", seconds=0.5)
    pushed: list[TaskStatus] = []
    unsubscribe = conn.tasks.subscribe(handle.task_id, pushed.append)
    for _ in range(100):
        if conn.tasks._listen_state != "unknown":
            break
        await asyncio.sleep(0.02)
    assert conn.tasks._listen_state == "refused"
    assert conn.tasks.push_available is False
    assert (await poll_until_terminal(conn, handle)).status == "completed"
    assert pushed == []
    unsubscribe()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_2026_status_pushes_on_a_listen_stream(transport: str, spawn: Callable[..., int]) -> None:
    # The same server, told to honor the extension's `taskIds` listen filter and push `notifications/tasks`.
    conn, tools = await connect(config(SERVER_2026, transport, spawn, "--push"))
    try:
        assert conn.tasks.push_available is False  # nothing known yet
        handle = await start(conn, tools, "report", seconds=0.5)
        pushed: list[TaskStatus] = []
        done = asyncio.Event()

        def on_push(status: TaskStatus) -> None:
            pushed.append(status)
            if status.terminal:
                done.set()

        unsubscribe = conn.tasks.subscribe(handle.task_id, on_push)
        await asyncio.wait_for(done.wait(), 10)  # no polling: the pushes alone carry it to the end
        unsubscribe()
        assert conn.tasks.push_available
        assert any(s.status == "working" and s.message for s in pushed)
        final = pushed[-1]
        assert final.status == "completed"
        assert final.result is not None and text(final.result) == "report ready after 0.5s"  # inline, as tasks/get
        # A cancelled task's end is pushed too, and every listen stream is gone once its task ends.
        handle2 = await start(conn, tools, "report", seconds=30)
        ended = asyncio.Event()
        unsubscribe = conn.tasks.subscribe(handle2.task_id, lambda s: ended.set() if s.terminal else None)
        await asyncio.sleep(0.3)
        await conn.tasks.cancel(handle2)
        await asyncio.wait_for(ended.wait(), 5)
        unsubscribe()
        for _ in range(50):
            if not conn.tasks._listens:
                break
            await asyncio.sleep(0.02)
        assert conn.tasks._listens == {}
    finally:
        await conn.close()


async def test_2026_task_requests_carry_mcp_name(spawn: Callable[..., int]) -> None:
    conn, tools = await connect(config(SERVER_2026, "streamable-http", spawn))
    try:
        handle = await start(conn, tools, "report", seconds=0.2)
        await poll_until_terminal(conn, handle)
        handle2 = await start(conn, tools, "report", seconds=5)
        await conn.tasks.cancel(handle2)
        seen = json.loads(text(await conn.tasks.call_tool("seen_headers", {}, tool_meta={})))
    finally:
        await conn.close()
    methods = {r["method"] for r in seen}
    assert {"tasks/get", "tasks/cancel"} <= methods
    assert all(r["mcpName"] == r["taskId"] for r in seen), seen


# -- 2025-11-25 tasks ------------------------------------------------------------------------------------------


async def test_2025_discovery_captures_task_support(c2025: Any) -> None:
    conn, tools, _ = c2025
    assert conn.client.protocol_version == "2025-11-25"
    caps = conn.client.server_capabilities
    assert caps.tasks is not None and caps.tasks.requests is not None and caps.tasks.requests.tools is not None
    assert tools["long_report"].meta["execution"] == {"taskSupport": "required"}
    assert tools["maybe_task"].meta["execution"] == {"taskSupport": "optional"}
    assert "execution" not in tools["quick"].meta


async def test_2025_required_tool_runs_as_task_with_pushes(c2025: Any) -> None:
    conn, tools, _ = c2025
    handle = await start(conn, tools, "long_report", seconds=0.6)
    assert handle.dialect == DIALECT_2025
    assert handle.first.status == "working" and handle.first.poll_interval_s == pytest.approx(0.2)
    pushed: list[tuple[float, TaskStatus]] = []
    done = asyncio.Event()

    def on_push(status: TaskStatus) -> None:
        pushed.append((time.monotonic(), status))
        if status.terminal:
            done.set()

    unsubscribe = conn.tasks.subscribe(handle.task_id, on_push)
    await asyncio.wait_for(done.wait(), 10)  # no polling at all: the pushes alone say when it is done
    unsubscribe()
    statuses = [s for _, s in pushed]
    assert statuses[-1].status == "completed"
    assert len([s for s in statuses if s.status == "working" and (s.message or "").startswith("step ")]) >= 3
    assert conn.tasks.push_available
    result = await conn.tasks.result(handle)
    assert text(result) == "report ready after 0.6s" and not result.is_error
    assert (await conn.tasks.get(handle)).status == "completed"
    calls = await calls_seen(conn)
    assert calls[0] == {"tool": "long_report", "task": {"ttl": conn.tasks.task_ttl_ms}}


async def test_2025_optional_tool_is_augmented_and_plain_tool_is_not(c2025: Any) -> None:
    conn, tools, _ = c2025
    handle = await start(conn, tools, "maybe_task", seconds=0.2)
    assert (await poll_until_terminal(conn, handle)).status == "completed"
    assert text(await conn.tasks.result(handle)) == "report ready after 0.2s"
    quick = await conn.tasks.call_tool("quick", {"text": "hi"}, tool_meta=tools["quick"].meta)
    assert isinstance(quick, types.CallToolResult) and text(quick) == "quick: hi"
    calls = await calls_seen(conn)
    assert [(c["tool"], c["task"] is not None) for c in calls[:2]] == [("maybe_task", True), ("quick", False)]


async def test_2025_failed_task(c2025: Any) -> None:
    conn, tools, _ = c2025
    handle = await start(conn, tools, "long_report", seconds=0.2, fail=True)
    status = await poll_until_terminal(conn, handle)
    assert status.status == "failed" and status.error == "the report could not be built"
    result = await conn.tasks.result(handle)  # 2025-11-25: tasks/result still returns the tool's isError result
    assert result.is_error and text(result) == "the report could not be built"


async def test_2025_cancel(c2025: Any) -> None:
    conn, tools, _ = c2025
    handle = await start(conn, tools, "long_report", seconds=30)
    pushed: list[TaskStatus] = []
    unsubscribe = conn.tasks.subscribe(handle.task_id, pushed.append)
    await asyncio.sleep(0.3)
    await conn.tasks.cancel(handle)
    assert (await conn.tasks.get(handle)).status == "cancelled"
    for _ in range(50):
        if pushed and pushed[-1].status == "cancelled":
            break
        await asyncio.sleep(0.02)
    assert pushed[-1].status == "cancelled"
    unsubscribe()
    with pytest.raises(MCPError):
        await conn.tasks.cancel(handle)  # already terminal: the server refuses


async def test_2025_server_rejects_required_tool_without_task(c2025: Any) -> None:
    # What the runtime protects against: the server really refuses a plain call to a `required` tool.
    conn, _, _ = c2025
    with pytest.raises(MCPError, match="must be called as a task"):
        await conn.client.session.call_tool("long_report", {"seconds": 0.1})


async def test_2025_required_tool_is_never_called_without_the_capability(spawn: Callable[..., int]) -> None:
    conn, tools = await connect(config(SERVER_2025, "stdio", spawn, "--no-tasks-capability"))
    try:
        assert tools["long_report"].meta["execution"] == {"taskSupport": "required"}
        with pytest.raises(TaskError, match="must run as a task"):
            await conn.tasks.call_tool("long_report", {"seconds": 0.1}, tool_meta=tools["long_report"].meta)
        # An optional tool runs plainly, without params.task, when the server declares no tasks.
        plain = await conn.tasks.call_tool("maybe_task", {"seconds": 0.1}, tool_meta=tools["maybe_task"].meta)
        assert isinstance(plain, types.CallToolResult) and text(plain) == "report ready after 0.1s"
        calls = await calls_seen(conn)
    finally:
        await conn.close()
    assert [c["tool"] for c in calls] == ["maybe_task", "calls_seen"]
    assert all(c["task"] is None for c in calls)
