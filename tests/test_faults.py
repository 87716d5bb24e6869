"""Real faults, real servers: a dead server is told from a slow one, dropped connections come back, and no job
is ever lost from mcp_jobs.

Each fault is produced for real: a server process killed (SIGKILL) or frozen (SIGSTOP: it keeps its sockets
and pipes but never answers again) in the middle of a call, a WebSocket and an SSE stream closed by the server,
a Streamable HTTP server restarted on the same port (so it answers our old session id with 404), a server whose
`ping` answers are slow, and a listener that hangs up on every connection.
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
from conftest import DEMO, SERVERS, all_final
from conftest import started as start

from mcp_integration.connection import BACKOFF_FIRST_S, PROBE_TIMEOUT_S, ServerConnection
from mcp_integration.dispatcher import Dispatcher
from mcp_integration.errors import ConnectError, Reconnecting, ToolCallError
from mcp_integration.jobs import Job
from mcp_integration.registry import Registry, ServerConfig, ToolSpec

WS_SERVER = str(SERVERS / "ws_server.py")


def http_cfg(transport: str, port: int, name: str = "net") -> ServerConfig:
    if transport == "websocket":
        return ServerConfig(name=name, transport=transport, url=f"ws://127.0.0.1:{port}/")
    path = {"streamable-http": "/mcp", "sse": "/sse"}[transport]
    return ServerConfig(name=name, transport=transport, url=f"http://127.0.0.1:{port}{path}")


def stdio_cfg(name: str, *extra: str) -> ServerConfig:
    return ServerConfig(name=name, transport="stdio", command=sys.executable, args=[DEMO, "--name", name, *extra])


async def eventually(check: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not met within {timeout:g} s"
        await asyncio.sleep(0.05)


async def progressed(job: Job, timeout: float = 15.0) -> None:
    """Wait until the server has reported progress on the job: the call is certainly running there."""
    await eventually(lambda: any(e.kind == "progress" for e in job.events), timeout, "progress")


def process_state(pid: int) -> str | None:
    """The kernel's state letter for a process (`Z` is a zombie), or None once it is gone (reaped)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split()[1]
    except FileNotFoundError:
        return None
    return "?"


def read_pid(path: Path) -> int:
    return int(path.read_text())


# -- a dead server fails its call at once; the next call brings the server back --------------------------------


async def test_stdio_server_killed_mid_call_fails_fast_is_reaped_and_the_next_call_restarts_it(
    registry: Registry, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    d = await start(registry, stdio_cfg("net", "--pid-file", str(pidfile)))
    jobs: list[Job] = []
    try:
        first_pid = read_pid(pidfile)
        job = d.submit("slow", {"seconds": 30, "steps": 30})
        jobs.append(job)
        await progressed(job)
        os.kill(first_pid, signal.SIGKILL)
        with pytest.raises(ToolCallError) as info:
            await job.wait(20)  # the server's idle timeout is 35 s: this fails on the lost stream, not a timeout
        assert info.value.kind == "unreachable"
        assert info.value.reason == "lost the server during the call: the server process exited"
        # The killed process is reaped, not left a zombie.
        await eventually(lambda: process_state(first_pid) is None, what="the killed server reaped")

        jobs.append(again := d.submit("echo", {"text": "back"}))
        assert (await again.wait(20)).text == "echo: back"
        second_pid = read_pid(pidfile)
        assert second_pid != first_pid
    finally:
        await d.aclose()
    assert process_state(second_pid) is None  # closing reaps the replacement too
    rows = await all_final(registry, jobs)
    assert [rows[j.id]["state"] for j in jobs] == ["failed", "completed"]
    assert "lost the server" in rows[jobs[0].id]["error"]


@pytest.mark.parametrize("transport", ["stdio", "streamable-http"])
async def test_a_frozen_server_is_waited_for_until_the_idle_timeout_and_its_answer_still_delivered(
    registry: Registry, spawn: Callable[..., int], tmp_path: Path, transport: str
) -> None:
    """SIGSTOP freezes the server: its pipes and sockets stay open and nothing answers, not even a ping. That is
    exactly what a busy serial server looks like (n8n, a read-handle-write stdio loop), so it is no evidence of
    death: the call waits out its idle timeout (3 s here), the connection stays, and the job goes on. Thawed,
    the server answers, and the answer is delivered late instead of lost."""
    pidfile = tmp_path / "pid"
    if transport == "stdio":
        cfg = stdio_cfg("net", "--pid-file", str(pidfile))
    else:
        cfg = http_cfg(transport, spawn("--transport", transport, "--port", "0", "--pid-file", str(pidfile)))
    cfg.timeout_ms = 3000
    d = await start(registry, cfg)
    conn = d.servers["net"].conn
    frozen = read_pid(pidfile)
    try:
        # One progress report at the start, then silence: nothing tells a frozen server from a busy one.
        job = d.submit("slow", {"seconds": 4, "steps": 1})
        await progressed(job)
        os.kill(frozen, signal.SIGSTOP)
        with pytest.raises(ToolCallError) as info:
            await job.wait()
        silent_for = time.monotonic() - job.last_activity
        assert info.value.kind == "timeout" and "no progress for 3 s" in info.value.reason
        assert silent_for >= 2.9, silent_for  # never failed before its idle timeout
        assert conn.is_open and not conn.lost.is_set()
        assert conn.serial  # the unanswered probe taught it, and it sends no more during calls

        os.kill(frozen, signal.SIGCONT)
        assert (await asyncio.wait_for(job.outcome(), 20)).text == "done after 4s"
        assert job.late and job.state == "completed"
    finally:
        os.kill(frozen, signal.SIGCONT)
        await d.aclose()
    rows = await all_final(registry, [job])
    assert rows[job.id]["state"] == "completed" and rows[job.id]["delivered_late"]


async def test_slow_pings_are_alive_and_sixty_waiting_calls_share_one_probe(
    registry: Registry, spawn: Callable[..., int]
) -> None:
    """Legacy Streamable HTTP (the 2025-11-25 handshake, so the probe is MCP `ping`), each ping answered after
    0.6 s, well inside the 1.5 s a probe waits (a margin that holds on a loaded machine). Sixty calls each go
    silent for 3 s: none is judged dead, and the connection sends one probe in all: not one per call, and not
    one per half second of silence (it sent three here before an answered probe ended the probing)."""
    assert PROBE_TIMEOUT_S > 1.0
    port = spawn("--transport", "streamable-http", "--port", "0", "--legacy", "--ping-delay-ms", "600")
    d = await start(registry, http_cfg("streamable-http", port))
    conn = d.servers["net"].conn
    assert conn.client.session.protocol_version == "2025-11-25"
    try:
        jobs = [d.submit("slow", {"seconds": 3, "steps": 1}) for _ in range(60)]
        results = await asyncio.gather(*(job.wait(30) for job in jobs))
        assert all(r.text == "done after 3s" for r in results)
        assert conn.probes == 1 and not conn.serial, conn.probes
        # Another quiet spell on the same opening: the server is known to answer while it works.
        again = d.submit("slow", {"seconds": 1.5, "steps": 1})
        jobs.append(again)
        assert (await again.wait(30)).text == "done after 1.5s"
        assert conn.probes == 1, conn.probes
        started = time.perf_counter()
        await conn.ping()
        assert time.perf_counter() - started >= 0.6  # the pings really are slow
    finally:
        await d.aclose()
    await all_final(registry, jobs)


async def test_slow_probe_on_a_2026_connection_is_alive(registry: Registry) -> None:
    # On 2026-07-28 there is no ping: the probe is server/discover, which this server answers after 0.6 s. Its
    # tools/list is slow too (2 s, more than a probe waits): that is the health check's concern, not a death sign.
    d = await start(registry, stdio_cfg("net", "--ping-delay-ms", "600", "--list-delay-ms", "2000"))
    conn = d.servers["net"].conn
    assert conn.client.session.protocol_version == "2026-07-28"
    try:
        job = d.submit("slow", {"seconds": 2, "steps": 1})
        assert (await job.wait(30)).text == "done after 2s"
        assert conn.probes >= 1
    finally:
        await d.aclose()
    await all_final(registry, [job])


# -- connections the server closes ------------------------------------------------------------------------------


async def test_websocket_closed_by_the_server_fails_the_call_and_reopens(
    registry: Registry, spawn: Callable[..., int]
) -> None:
    port = spawn("--port", "0", "--close-after-ms", "1500", script=WS_SERVER)
    d = await start(registry, http_cfg("websocket", port))
    conn = d.servers["net"].conn
    jobs: list[Job] = []
    try:
        jobs.append(job := d.submit("slow", {"seconds": 20}))
        with pytest.raises(ToolCallError) as info:
            await job.wait(15)
        assert info.value.kind == "unreachable" and "closed the WebSocket" in info.value.reason
        before = conn.generation
        jobs.append(again := d.submit("echo", {"text": "reopened"}))
        assert (await again.wait(15)).text == "echo: reopened"
        assert conn.generation == before + 1
    finally:
        await d.aclose()
    rows = await all_final(registry, jobs)
    assert [rows[j.id]["state"] for j in jobs] == ["failed", "completed"]


async def test_sse_stream_closed_after_idling_is_reopened_by_the_next_call(
    registry: Registry, spawn: Callable[..., int]
) -> None:
    # Like a proxy that cuts idle event streams: the server ends each SSE stream 1 s after it opened.
    port = spawn("--transport", "sse", "--port", "0", "--sse-close-after-ms", "1000")
    d = await start(registry, http_cfg("sse", port))
    conn = d.servers["net"].conn
    jobs: list[Job] = []
    try:
        await eventually(lambda: conn.lost.is_set(), what="the idle stream closed by the server")
        assert conn.lost_reason == "the server closed its event stream"
        jobs.append(job := d.submit("echo", {"text": "after the idle close"}))
        assert (await job.wait(15)).text == "echo: after the idle close"
        # A call still running when the server closes the stream fails at once, and the next one reopens again.
        jobs.append(cut := d.submit("slow", {"seconds": 20}))
        with pytest.raises(ToolCallError) as info:
            await cut.wait(15)
        assert info.value.kind == "unreachable" and "event stream" in info.value.reason
        jobs.append(last := d.submit("add", {"a": 2, "b": 3}))
        assert (await last.wait(15)).text == "5"
    finally:
        await d.aclose()
    rows = await all_final(registry, jobs)
    assert [rows[j.id]["state"] for j in jobs] == ["completed", "failed", "completed"]


async def test_expired_http_session_is_reopened_and_the_call_sent_once_more(
    registry: Registry, spawn: Callable[..., int]
) -> None:
    """A restarted server (same port) knows nothing of our session id and answers 404 `Session not found`: the
    call never ran, so it is sent again on a new session and the caller never sees the 404."""
    port = spawn("--transport", "streamable-http", "--port", "0", "--legacy")
    d = await start(registry, http_cfg("streamable-http", port))
    jobs: list[Job] = []
    try:
        jobs.append(first := d.submit("echo", {"text": "one"}))
        assert (await first.wait(15)).text == "echo: one"
        old = spawn.procs[-1]  # type: ignore[attr-defined]
        old.kill()
        old.wait(5)
        spawn("--transport", "streamable-http", "--port", str(port), "--legacy")
        jobs.append(second := d.submit("echo", {"text": "two"}))
        assert (await second.wait(15)).text == "echo: two"
        reconnects = [e.data for e in second.events if e.kind == "status" and e.data.get("state") == "reconnecting"]
        assert reconnects and "no longer knows our session" in reconnects[0]["message"]
    finally:
        await d.aclose()
    rows = await all_final(registry, jobs)
    assert all(rows[j.id]["state"] == "completed" for j in jobs)


# -- reopening backs off --------------------------------------------------------------------------------------


async def test_reopening_backs_off_fails_calls_fast_and_recovers(registry: Registry, spawn: Callable[..., int]) -> None:
    """A listener that hangs up on every connection: opening fails at once, again and again. Attempts are spaced
    out (not one per call), calls meanwhile fail at once saying so, and a real server on that port is reached
    once the backoff has passed."""
    accepted = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    listener = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    cfg = http_cfg("streamable-http", port, name="flaky")

    conn = ServerConnection(cfg, connect_timeout=5)
    tries = 0
    refused_fast = 0
    until = time.monotonic() + 2.0
    while time.monotonic() < until:
        tries += 1
        try:
            await conn.open()
        except Reconnecting as exc:
            refused_fast += 1
            assert "reconnecting after" in str(exc) and exc.retry_in > 0
        except ConnectError:
            pass
        await asyncio.sleep(0.01)
    assert tries > 20 and refused_fast > tries - 10
    assert 2 <= accepted <= 5, accepted  # 0.5 s doubling (jittered) within 2 s: a handful, not hundreds

    # Through the dispatcher: the first call tries (and waits out short backoffs), the next fails at once.
    await registry.add_server(cfg)
    d = Dispatcher(registry, connect_timeout=5)
    echo = ToolSpec("flaky", "echo", "Repeat the text.", {"type": "object", "properties": {"text": {"type": "string"}}})
    await d.start(wait=False, cached={"flaky": [echo]})
    jobs: list[Job] = []
    try:
        await d.refreshed()
        jobs.append(first := d.submit("echo", {"text": "x"}))
        with pytest.raises(ToolCallError) as info:
            await first.wait(20)
        assert info.value.kind == "unreachable"
        jobs.append(second := d.submit("echo", {"text": "y"}))
        with pytest.raises(ToolCallError) as info:
            await second.wait(20)
        assert info.value.kind == "unreachable" and "reconnecting after" in info.value.reason
        assert second.duration < 4.0  # at most one short backoff waited out, not a connect timeout (5 s)

        # A real server on that port is reached as soon as the backoff allows another attempt.
        listener.close()
        await listener.wait_closed()
        spawn("--transport", "streamable-http", "--port", str(port))
        deadline = time.monotonic() + 40
        while not conn.is_open:
            assert time.monotonic() < deadline, "never reconnected"
            try:
                await conn.open()
            except Reconnecting as exc:
                await asyncio.sleep(exc.retry_in)
            except ConnectError:
                pass
        assert (await conn.tasks.call_tool("echo", {"text": "z"}, tool_meta=None)).content[0].text == "echo: z"
        # A success resets the backoff: the next failure is retried after the first, short step again.
        conn.drop("test")
        for proc in spawn.procs:  # type: ignore[attr-defined]
            proc.kill()
            proc.wait(5)
        with pytest.raises(ConnectError):
            await conn.open()
        with pytest.raises(Reconnecting) as retry:
            await conn.open()
        assert retry.value.retry_in <= BACKOFF_FIRST_S
    finally:
        await conn.close()
        await d.aclose()
        listener.close()
    await all_final(registry, jobs)
