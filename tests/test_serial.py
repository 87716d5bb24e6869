"""Servers that handle one request at a time, as real ones do: they are busy, not dead.

n8n's MCP Server Trigger (measured: a ping sent during a 3 s call answers when the call ends) and stdio servers
written as a read-handle-write loop never answer a ping while a call runs. Their slow tools must complete, their
health checks must not count against them, and a hard fault (a killed process, a reset connection) must still
fail a call at once on every transport.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SERVERS, all_final, started
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from mcp_integration.errors import ToolCallError
from mcp_integration.health import Health
from mcp_integration.jobs import Job
from mcp_integration.registry import Registry, ServerConfig

N8N = str(SERVERS / "n8n_like_server.py")
SERIAL_STDIO = str(SERVERS / "serial_stdio_server.py")
WS_SERVER = str(SERVERS / "ws_server.py")
DEMO = str(SERVERS / "demo_server.py")


def n8n_cfg(transport: str, port: int, name: str = "n8n") -> ServerConfig:
    # One path for both transports, as n8n serves them.
    return ServerConfig(name=name, transport=transport, url=f"http://127.0.0.1:{port}/mcp/reports")


def serial_stdio_cfg(name: str = "loop", *extra: str) -> ServerConfig:
    return ServerConfig(name=name, transport="stdio", command=sys.executable, args=[SERIAL_STDIO, *extra])


async def ping_ms(client: Client) -> float:
    started_at = time.perf_counter()
    await client.session.send_ping()
    return (time.perf_counter() - started_at) * 1000


# -- the look-alikes behave as the real servers were measured to ---------------------------------------------------


@pytest.mark.parametrize("transport", ["sse", "streamable-http", "stdio"])
async def test_the_serial_look_alikes_answer_a_ping_only_after_the_call_in_front_of_it(
    spawn: Callable[..., int], transport: str
) -> None:
    """Measured with the bare SDK, as n8n 1.123 was: idle ping at once, a ping 0.5 s into a 3 s call only when the
    call ends; the n8n look-alike serves both transports at one path."""
    if transport == "stdio":
        opened = stdio_client(StdioServerParameters(command=sys.executable, args=[SERIAL_STDIO]))
        tool, args = "work", {"seconds": 3}
    else:
        url = f"http://127.0.0.1:{spawn('--port', '0', script=N8N)}/mcp/reports"
        opened = sse_client(url) if transport == "sse" else streamable_http_client(url)
        tool, args = "run_workflow", {"topic": "x", "seconds": 3}
    async with Client(opened) as client:
        assert client.session.protocol_version == "2025-11-25"  # no server/discover: the handshake, as n8n
        assert await ping_ms(client) < 1000
        call = asyncio.ensure_future(client.call_tool(tool, args))
        await asyncio.sleep(0.5)
        assert await ping_ms(client) >= 2000  # answered only once the call has ended
        assert not (await call).is_error


async def test_the_n8n_look_alike_serves_other_sessions_meanwhile_and_can_be_made_concurrent(
    spawn: Callable[..., int],
) -> None:
    port = spawn("--port", "0", script=N8N)
    url = f"http://127.0.0.1:{port}/mcp/reports"
    async with Client(sse_client(url)) as busy, Client(streamable_http_client(url)) as other:
        call = asyncio.ensure_future(busy.call_tool("run_workflow", {"topic": "x", "seconds": 2}))
        await asyncio.sleep(0.3)
        assert await ping_ms(other) < 1000  # one session at a time, not one server at a time
        await call
    concurrent = f"http://127.0.0.1:{spawn('--port', '0', '--concurrent', script=N8N)}/mcp/reports"
    async with Client(streamable_http_client(concurrent)) as client:
        call = asyncio.ensure_future(client.call_tool("run_workflow", {"topic": "x", "seconds": 2}))
        await asyncio.sleep(0.3)
        assert await ping_ms(client) < 1000  # what a test server built on the SDK does by default
        await call


# -- busy is not dead --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["sse", "streamable-http", "stdio"])
async def test_slow_tools_of_a_serial_server_complete(
    registry: Registry, spawn: Callable[..., int], transport: str
) -> None:
    """A 3 s workflow on n8n, a 5 s blocking tool on a stdio loop: the probe goes unanswered, the server is
    remembered as serial, and the call completes on the same connection."""
    if transport == "stdio":
        cfg, tool, args, answer = serial_stdio_cfg("busy"), "work", {"seconds": 5}, "worked 5 s"
    else:
        cfg = n8n_cfg(transport, spawn("--port", "0", script=N8N), name="busy")
        tool, args, answer = "run_workflow", {"topic": "tides", "seconds": 3}, "Report on tides is ready"
    d = await started(registry, cfg)
    conn = d.servers["busy"].conn
    jobs: list[Job] = []
    try:
        generation = conn.generation
        jobs.append(job := d.submit(tool, args))
        assert answer in (await job.wait(30)).text
        assert conn.serial and conn.probes >= 1
        assert conn.is_open and conn.generation == generation  # never dropped
        # Remembered: the next slow call sends no probe at all.
        probes = conn.probes
        jobs.append(again := d.submit(tool, args))
        assert answer in (await again.wait(30)).text
        assert conn.probes == probes
        assert all(not isinstance(j.error, Exception) for j in jobs)
    finally:
        await d.aclose()
    rows = await all_final(registry, jobs)
    assert all(rows[j.id]["state"] == "completed" for j in jobs)


async def test_a_huge_answer_from_a_serial_stdio_server_is_read_not_taken_for_death(registry: Registry) -> None:
    """30 MB in one line takes seconds to write and read; no ping is answered meanwhile."""
    d = await started(registry, serial_stdio_cfg("big"))
    try:
        job = d.submit("big", {"mb": 30})
        result = await job.wait(60)
        assert result.text.startswith("xxxx") and "cut:" in result.text  # bounded for the caller, not lost
        assert d.servers["big"].conn.is_open
    finally:
        await d.aclose()
    await all_final(registry, [job])


@pytest.mark.parametrize("learned", [False, True])
async def test_a_health_check_while_a_serial_server_works_is_no_failure(
    registry: Registry, spawn: Callable[..., int], learned: bool
) -> None:
    """The check would wait behind the call. Before the server is known to be serial, the check's own unanswered
    ping teaches it; after, no ping is sent. Either way the breaker keeps what it knew."""
    d = await started(registry, n8n_cfg("streamable-http", spawn("--port", "0", script=N8N)))
    health = Health(d)
    state = d.servers["n8n"]
    try:
        assert (await health.check("n8n", timeout=2))["n8n"].ok
        job = d.submit("run_workflow", {"topic": "x", "seconds": 4})
        await asyncio.sleep(0.2)
        if learned:
            deadline = time.monotonic() + 5
            while not state.conn.serial:
                assert time.monotonic() < deadline, "the in-call probe never went unanswered"
                await asyncio.sleep(0.05)
        report = (await health.check("n8n", timeout=1))["n8n"]
        assert report.source == "busy" and report.ok and report.error is None
        assert state.conn.serial
        assert health.breaker("n8n").status == "up" and health.breaker("n8n").failures == 0
        assert "Report on x" in (await job.wait(30)).text
        after = (await health.check("n8n", timeout=2))["n8n"]  # idle again: a real check
        assert after.source == "check" and after.latency_ms is not None
    finally:
        await d.aclose()
    rows = {r["server_name"]: r for r in await registry.recent_jobs()}
    assert rows["n8n"]["state"] == "completed"


# -- dead is dead, on every transport ------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["sse", "streamable-http", "websocket", "stdio"])
async def test_a_killed_server_fails_its_call_at_once_even_when_it_is_serial(
    registry: Registry, spawn: Callable[..., int], tmp_path: Path, transport: str
) -> None:
    """SIGKILL closes the process's pipes and sockets: evidence no busy server can produce. The call fails as
    unreachable well before its idle timeout, on a server already known to be serial too."""
    pidfile = tmp_path / "pid"
    if transport == "stdio":
        cfg, tool, args = serial_stdio_cfg("gone", "--pid-file", str(pidfile)), "work", {"seconds": 30}
    elif transport == "websocket":
        port = spawn("--port", "0", script=WS_SERVER)
        cfg = ServerConfig(name="gone", transport="websocket", url=f"ws://127.0.0.1:{port}/")
        tool, args = "slow", {"seconds": 30}
    else:
        cfg = n8n_cfg(transport, spawn("--port", "0", script=N8N), name="gone")
        tool, args = "run_workflow", {"topic": "x", "seconds": 30}
    d = await started(registry, cfg)
    try:
        if transport == "websocket":
            pid = spawn.procs[-1].pid  # type: ignore[attr-defined]
        elif transport == "stdio":
            pid = int(pidfile.read_text())
        else:
            pid = spawn.procs[-1].pid  # type: ignore[attr-defined]
        job = d.submit(tool, args)
        await asyncio.sleep(2.5)  # long enough for a serial server to be found serial
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        with pytest.raises(ToolCallError) as info:
            await job.wait(30)
        assert info.value.kind == "unreachable", info.value
        assert time.monotonic() - killed_at < 10  # generous here; bench/liveness.py measures it (about 0.1 s)
    finally:
        await d.aclose()
    await all_final(registry, [job])
