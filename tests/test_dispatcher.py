"""The dispatcher against real MCP servers on every transport, with the real registry."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
import weakref
from collections.abc import Callable

import httpx
import pytest
from conftest import SERVERS, eventually, stdio_demo

from mcp_integration.dispatcher import Dispatcher
from mcp_integration.errors import ToolCallError
from mcp_integration.health import Health
from mcp_integration.jobs import Job
from mcp_integration.metrics import process_metrics
from mcp_integration.naming import SAFE_RE
from mcp_integration.registry import Registry, ServerConfig


def network_cfg(transport: str, port: int, name: str = "net") -> ServerConfig:
    path = {"streamable-http": "/mcp", "sse": "/sse", "websocket": "/"}[transport]
    scheme = "ws" if transport == "websocket" else "http"
    return ServerConfig(name=name, transport=transport, url=f"{scheme}://127.0.0.1:{port}{path}")


async def start(registry: Registry, *cfgs: ServerConfig, wait: bool = True) -> Dispatcher:
    for cfg in cfgs:
        await registry.add_server(cfg)
    dispatcher = Dispatcher(registry, connect_timeout=15)
    await dispatcher.start(wait=wait)
    return dispatcher


@pytest.mark.parametrize("transport", ["stdio", "streamable-http", "sse", "websocket"])
async def test_every_transport_fast_slow_and_failing_tools(
    registry: Registry, spawn: Callable[..., int], transport: str
) -> None:
    if transport == "stdio":
        cfg = stdio_demo("net")
    elif transport == "websocket":
        cfg = network_cfg(transport, spawn("--port", "0", script=str(SERVERS / "ws_server.py")))
    else:
        cfg = network_cfg(transport, spawn("--transport", transport, "--port", "0"))
    d = await start(registry, cfg)
    try:
        assert d.servers["net"].error is None
        names = {t.name for t in d.tools}
        assert {"echo", "slow", "fail"} <= names
        result = await d.call("echo", {"text": "hello"})
        assert result.text == "echo: hello"

        job = d.submit("slow", {"seconds": 0.4})
        progress: list[dict] = []
        job.add_listener(lambda e: progress.append(e.data) if e.kind == "progress" else None)
        result = await job.wait(10)
        assert result.text.startswith("done after 0.4")
        assert progress and all("progress" in p for p in progress)

        with pytest.raises(ToolCallError) as info:
            await d.call("fail", {"reason": "disk on fire"})
        assert info.value.kind == "tool_error" and "disk on fire" in info.value.reason
        assert info.value.server == "net" and info.value.tool == "fail"
    finally:
        await d.aclose()


async def test_legacy_sse_202_accepted_is_never_the_answer(registry: Registry, spawn: Callable[..., int]) -> None:
    """The root cause of 'Accepted': on legacy SSE the POST is answered 202 and the reply comes on the stream."""
    port = spawn("--transport", "sse", "--port", "0")
    base = f"http://127.0.0.1:{port}"
    # What a naive client sees: the POST's own body is the word "Accepted".
    async with httpx.AsyncClient(timeout=10) as http, http.stream("GET", f"{base}/sse") as stream:
        endpoint = None
        async for line in stream.aiter_lines():
            if line.startswith("data: "):
                endpoint = line[6:].strip()
                break
        assert endpoint
        init = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"},
            },
        }
        posted = await http.post(f"{base}{endpoint}", json=init)
        assert posted.status_code == 202 and posted.text == "Accepted"

    d = await start(registry, network_cfg("sse", port, "workflow"))
    try:
        result = await d.call("echo", {"text": "the real answer"})
        assert result.text == "echo: the real answer"
        assert "Accepted" not in result.text
        job = d.job(await d.execute_tool("add", {"a": 2, "b": 40}))
        assert job is not None
        assert (await d.get_result(job.id, timeout=10)).text == "42"
    finally:
        await d.aclose()


async def test_execute_then_get_result_and_read_back_from_postgres(registry: Registry) -> None:
    d = await start(registry, stdio_demo())
    try:
        job_id = await d.execute_tool("slow", {"seconds": 0.3})
        assert isinstance(job_id, str)
        result = await d.get_result(job_id)
        assert result.text == "done after 0.3s"
        job = d.job(job_id)
        assert job is not None
        await job.settled()
        row = await registry.get_job(job_id)  # type: ignore[arg-type]
        assert row is not None and row["state"] == "completed" and row["result"]["text"] == "done after 0.3s"
    finally:
        await d.aclose()
    # A new dispatcher (another process, say) reads the finished job from mcp_jobs.
    other = Dispatcher(registry)
    assert (await other.get_result(job_id)).text == "done after 0.3s"
    with pytest.raises(ToolCallError, match="no job"):
        await other.get_result("00000000-0000-0000-0000-000000000000")


async def jobs_ended_every_way(d: Dispatcher) -> list[weakref.ref[Job]]:
    """Four jobs, ended each way (completed, failed, released then late, cancelled) and recorded; only weak
    references to them are returned. No pytest.raises: its ExceptionInfo, kept in this frame, would hold the
    frame through the exception's own traceback."""
    heard: list[str] = []
    ok = d.submit("echo", {"text": "hi"})
    ok.add_listener(lambda e: heard.append(f"{ok.key} {e.kind}"))
    await ok.wait(10)
    failed, released = d.submit("fail", {"reason": "no"}), d.submit("slow", {"seconds": 0.5})
    kinds = []
    for job, release in ((failed, None), (released, 0.05)):
        try:
            await job.wait(release_after=release)
        except ToolCallError as exc:
            kinds.append(exc.kind)
    assert kinds == ["tool_error", "timeout"]
    await released.outcome()
    cancelled = d.submit("slow", {"seconds": 30})
    await asyncio.sleep(0.2)
    await cancelled.cancel()
    jobs = [ok, failed, released, cancelled]
    for job in jobs:
        await job.settled()
    assert [j.state for j in jobs] == ["completed", "failed", "completed", "cancelled"] and released.late
    assert heard[-1].endswith("done")
    return [weakref.ref(j) for j in jobs]


async def test_a_finished_job_is_freed_by_its_last_reference_not_by_the_collector(registry: Registry) -> None:
    """A cycle through a finished job (a listener closing over it, its record, its error's traceback) left
    every job to the collector's oldest generation, whose full collections then walked them all: with the
    collector off, a job the dispatcher has forgotten must be gone, however it ended."""
    await registry.add_server(stdio_demo())
    d = Dispatcher(registry, connect_timeout=15, keep_jobs=0)
    process_metrics(os.environ.get("PROMETHEUS_MULTIPROC_DIR")).attach(d)  # its listener closes over each job
    await d.start(wait=True)
    gc.collect()
    gc.disable()
    try:
        refs = await jobs_ended_every_way(d)
        assert d.job(refs[0]().key) is not None  # type: ignore[union-attr]  # still in the dispatcher's history
        for i in range(20):  # new jobs push the finished ones out of its history (keep_jobs=0)
            await d.call("echo", {"text": str(i)})
        assert [ref() for ref in refs] == [None] * 4
    finally:
        gc.enable()
        await d.aclose()


async def test_get_result_timeout_ends_the_wait_not_the_job(registry: Registry) -> None:
    d = await start(registry, stdio_demo())
    try:
        job_id = await d.execute_tool("slow", {"seconds": 1.0})
        with pytest.raises(ToolCallError) as info:
            await d.get_result(job_id, timeout=0.1)
        assert info.value.kind == "timeout"
        assert (await d.get_result(job_id, timeout=10)).text == "done after 1s"
    finally:
        await d.aclose()


async def test_bad_input_gets_clear_errors(registry: Registry) -> None:
    d = await start(registry, stdio_demo())
    try:
        with pytest.raises(ToolCallError, match="no tool named 'nope'") as info:
            await d.execute_tool("nope", {})
        assert info.value.kind == "unknown_tool"
        with pytest.raises(ToolCallError, match="argument 'a'") as info:
            await d.execute_tool("add", {"a": "two", "b": 1})
        assert info.value.kind == "invalid_arguments"
        with pytest.raises(ToolCallError, match="'text' is a required property"):
            await d.execute_tool("echo", {})
        with pytest.raises(ToolCallError, match="no enabled server"):
            await d.execute_tool("echo", {"text": "x"}, server="ghost")
    finally:
        await d.aclose()


async def test_same_tool_on_two_servers_stays_reachable_under_distinct_safe_names(registry: Registry) -> None:
    d = await start(registry, stdio_demo("alpha"), stdio_demo("beta"))
    try:
        names = {t.name: t for t in d.tools}
        assert all(SAFE_RE.match(n) for n in names)
        assert {"alpha__echo", "beta__echo"} <= set(names)
        assert names["alpha__echo"].server == "alpha" and names["beta__echo"].server == "beta"
        # The unsafe name 'lookup.weather' is reachable under a safe one.
        assert "alpha__lookup_weather" in names
        assert (await d.call("beta__echo", {"text": "b"})).text == "echo: b"
        assert (await d.call("echo", {"text": "a"}, server="alpha")).text == "echo: a"
        assert (await d.call("alpha/lookup.weather", {"city": "Oslo"})).structured["city"] == "Oslo"
        with pytest.raises(ToolCallError, match="several servers"):
            d.resolve("echo")
    finally:
        await d.aclose()


async def test_allowed_tools_limits_what_is_offered(registry: Registry) -> None:
    cfg = stdio_demo()
    cfg.allowed_tools = ["echo", "add"]
    d = await start(registry, cfg)
    try:
        assert {t.name for t in d.tools} == {"echo", "add"}
        with pytest.raises(ToolCallError, match="no tool named 'slow'"):
            await d.execute_tool("slow", {"seconds": 0})
    finally:
        await d.aclose()


async def test_malformed_schema_is_skipped_and_other_tools_kept(registry: Registry) -> None:
    raw = ServerConfig(
        name="raw", transport="stdio", command=sys.executable, args=[str(SERVERS / "raw_stdio_server.py")]
    )
    d = await start(registry, raw)
    try:
        assert d.servers["raw"].error is None
        assert {t.name for t in d.tools} == {"echo", "ping_me"}
        skipped = " ".join(d.servers["raw"].skipped)
        for bad in ("broken", "broken_props", "no_schema", "bad_jsonschema", "None"):
            assert bad in skipped
        assert (await d.call("echo", {"text": "still works"})).text == "echo: still works"
        assert (await Health(d).check("raw"))["raw"].ok  # a legacy server: MCP ping
    finally:
        await d.aclose()


async def test_unreachable_server_is_reported_not_fatal(registry: Registry) -> None:
    dead = ServerConfig(name="dead", transport="streamable-http", url="http://127.0.0.1:9/mcp")
    nocmd = ServerConfig(name="nocmd", transport="stdio", command="/nonexistent/binary")
    secret = ServerConfig(
        name="secret", transport="sse", url="http://127.0.0.1:9/sse", headers={"X-Key": "env:NOT_SET_X"}
    )
    d = await start(registry, stdio_demo(), dead, nocmd, secret)
    try:
        assert d.servers["demo"].error is None
        assert d.servers["dead"].error and "dead" in d.servers["dead"].error
        assert d.servers["nocmd"].error
        assert "env:NOT_SET_X" in (d.servers["secret"].error or "")
        assert (await d.call("echo", {"text": "ok"})).text == "echo: ok"
        report = await Health(d).check()
        assert report["demo"].ok and report["demo"].latency_ms is not None
        assert not report["dead"].ok and report["dead"].error
    finally:
        await d.aclose()


async def test_session_starts_from_the_cache_without_waiting_for_slow_servers(registry: Registry) -> None:
    cfg = stdio_demo("slowlist", "--list-delay-ms", "5000")
    warm = await start(registry, cfg)  # first discovery fills mcp_tools
    await warm.aclose()

    cold = Dispatcher(registry)
    started = time.monotonic()
    await cold.start(wait=False)
    elapsed = time.monotonic() - started
    try:
        assert {"echo", "slow"} <= {t.name for t in cold.tools}
        assert cold.servers["slowlist"].from_cache
        assert elapsed < 4.0, elapsed  # the server itself needs 5 s to list: start did not wait for it
        # A call made before discovery finishes connects on demand and works.
        assert (await cold.call("echo", {"text": "early"})).text == "echo: early"
        await cold.refreshed()
        assert not cold.servers["slowlist"].from_cache
    finally:
        await cold.aclose()


async def test_servers_connect_concurrently(registry: Registry) -> None:
    cfgs = [stdio_demo(f"s{i}", "--list-delay-ms", "2500") for i in range(4)]
    started = time.monotonic()
    d = await start(registry, *cfgs)
    elapsed = time.monotonic() - started
    try:
        assert all(s.error is None for s in d.servers.values())
        assert len({t.server for t in d.tools}) == 4
        assert elapsed < 4 * 2.5  # one after another could not take less than 10 s of listing alone
    finally:
        await d.aclose()


async def test_a_server_that_says_its_tools_changed_is_listed_again(
    registry: Registry, spawn: Callable[..., int]
) -> None:
    """A server may add tools mid-session (a login unlocks them, a toolset is switched on) and say so with
    `notifications/tools/list_changed`: the server is listed again, the new tool is in the index (which the voice
    layer offers from at every turn) and callable, and the tool cache holds it for the next session. A server of
    the 2025 protocols sends it on its standalone stream (here Streamable HTTP's GET stream)."""
    port = spawn("--transport", "streamable-http", "--legacy-only", "--growing")
    d = await start(
        registry, ServerConfig(name="demo", transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp")
    )
    try:
        assert d.servers["demo"].conn.client.session.protocol_version == "2025-11-25"
        assert "forecast" not in [t.name for t in d.tools]
        assert (await d.call("grow", {"name": "forecast"})).text == "forecast added"
        await eventually(lambda: "forecast" in [t.name for t in d.tools], 10, "the new tool in the index")
        assert (await d.call("forecast", {})).text == "forecast is here"
    finally:
        await d.aclose()
    cached = (await registry.start_cache()).tools["demo"]
    assert "forecast" in [t.name for t in cached]
