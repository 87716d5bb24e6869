"""Every call is a job: receipts polled to their answer, idle timeouts reset by progress, late results,
background bounds, cancel, learned timing, and a row in mcp_jobs for each — against real servers."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable

import httpx
import pytest
from conftest import SERVERS, eventually, stdio_demo

from mcp_integration.aio import Deadlines
from mcp_integration.dispatcher import Dispatcher
from mcp_integration.errors import ToolCallError
from mcp_integration.jobs import Job, WaitPolicy
from mcp_integration.registry import Registry, ServerConfig
from mcp_integration.results import ToolResult


async def started(registry: Registry, *cfgs: ServerConfig, **kwargs) -> Dispatcher:
    for cfg in cfgs:
        await registry.add_server(cfg)
    d = Dispatcher(registry, connect_timeout=15, **kwargs)
    await d.start(wait=True)
    for name, state in d.servers.items():
        assert state.error is None, (name, state.error)
    return d


def n8n_cfg(port: int, **kw) -> ServerConfig:
    return ServerConfig(
        name="n8n",
        transport="sse",
        url=f"http://127.0.0.1:{port}/mcp/reports",
        headers={"X-N8N-API-KEY": "env:N8N_TEST_KEY"},
        poll_profile=kw.pop("poll_profile", "n8n"),
        poll_interval=kw.pop("poll_interval", 200),
        **kw,
    )


async def row(registry: Registry, job: Job) -> dict:
    await job.settled()
    r = await registry.get_job(job.id)
    assert r is not None
    return r


async def test_n8n_receipt_is_polled_to_the_real_answer(
    registry: Registry, spawn: Callable[..., int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("N8N_TEST_KEY", "k-secret-1")
    port = spawn(
        "--port", "0", "--finish-after-ms", "900", "--api-key", "k-secret-1", script=str(SERVERS / "n8n_like_server.py")
    )
    d = await started(registry, n8n_cfg(port))
    try:
        job = d.submit("start_workflow", {"topic": "sales"})
        kinds: list[str] = []
        job.add_listener(lambda e: kinds.append(e.kind))
        result = await job.wait(15)
        assert "Report on sales is ready" in result.text and "accepted" not in result.text.lower()
        assert result.structured == {"summary": "Report on sales is ready", "pages": 3}
        assert job.kind == "receipt" and job.polls >= 1
        assert "accepted" in kinds and "poll" in kinds
        r = await row(registry, job)
        assert r["kind"] == "receipt" and r["state"] == "completed" and r["polls"] == job.polls
        assert r["receipt"]["job_id"] and "k-secret-1" not in str(r)
        async with httpx.AsyncClient() as http:
            stats = (await http.get(f"http://127.0.0.1:{port}/_stats")).json()
        assert sum(stats.values()) == job.polls  # every poll we counted reached the server, no more
    finally:
        await d.aclose()


async def test_n8n_failed_workflow_is_an_honest_failure(
    registry: Registry, spawn: Callable[..., int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("N8N_TEST_KEY", "k1")
    port = spawn(
        "--port",
        "0",
        "--finish-after-ms",
        "300",
        "--api-key",
        "k1",
        "--fail",
        script=str(SERVERS / "n8n_like_server.py"),
    )
    d = await started(registry, n8n_cfg(port))
    try:
        job = d.submit("start_workflow", {"topic": "x"})
        with pytest.raises(ToolCallError, match="Summarise node failed") as info:
            await job.wait(15)
        assert info.value.kind == "tool_error"
        assert (await row(registry, job))["state"] == "failed"
    finally:
        await d.aclose()


async def test_generic_receipt_and_a_lookalike_that_is_not_one(registry: Registry, spawn: Callable[..., int]) -> None:
    port = spawn("--port", "0", "--finish-after-ms", "600", script=str(SERVERS / "generic_receipt_server.py"))
    cfg = ServerConfig(name="gen", transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp", poll_interval=150)
    d = await started(registry, cfg)
    try:
        job = d.submit("submit_report", {"topic": "q3"})
        result = await job.wait(15)
        assert job.kind == "receipt" and "q3" in result.text and "queued" not in result.text
        customer = d.submit("lookup_customer", {"id": 7})
        answer = await customer.wait(15)
        assert customer.kind == "plain" and customer.polls == 0 and "Ada" in answer.text
        assert (await row(registry, customer))["kind"] == "plain"
    finally:
        await d.aclose()


async def test_poll_profile_none_hands_back_the_receipt_as_is(registry: Registry, spawn: Callable[..., int]) -> None:
    port = spawn("--port", "0", "--finish-after-ms", "600", script=str(SERVERS / "generic_receipt_server.py"))
    cfg = ServerConfig(name="gen", transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp", poll_profile="none")
    d = await started(registry, cfg)
    try:
        job = d.submit("submit_report", {"topic": "q3"})
        result = await job.wait(15)
        assert job.kind == "plain" and "queued" in result.text
    finally:
        await d.aclose()


async def test_an_ack_without_an_id_fails_clearly_instead_of_saying_started(
    registry: Registry, spawn: Callable[..., int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("N8N_TEST_KEY", "k1")
    port = spawn("--port", "0", "--api-key", "k1", script=str(SERVERS / "n8n_like_server.py"))
    d = await started(registry, n8n_cfg(port, poll_profile="auto"))
    try:
        with pytest.raises(ToolCallError, match="only acknowledged"):
            await d.call("trigger_webhook", {"topic": "x", "with_execution_id": False}, timeout=15)
    finally:
        await d.aclose()


async def test_progress_resets_the_idle_timeout(registry: Registry) -> None:
    cfg = stdio_demo()
    cfg.timeout_ms = 700  # far below the call's 2 s, but progress arrives every 0.4 s
    d = await started(registry, cfg)
    try:
        job = d.submit("slow", {"seconds": 2.0, "steps": 5})
        assert (await job.wait()).text == "done after 2s"
        assert not job.late
    finally:
        await d.aclose()


async def test_the_idle_wait_follows_activity_pauses_and_the_cap() -> None:
    """The voice layer's wait (`wait(release_after=...)`), driven by hand: activity keeps it going past the idle
    timeout; a pause (queued for a slot) holds it however long, and its end starts a full idle period; the cap
    and the release point end it whatever the activity; the job's end ends it at once."""
    gate = asyncio.Event()

    async def work(job: Job) -> ToolResult:
        await gate.wait()
        return ToolResult(text="ok")

    def job(idle_s: float = 0.3, cap_s: float = 30.0) -> Job:
        policy = WaitPolicy(idle_s=idle_s, cap_s=cap_s, background_s=60.0)
        return Job(server="s", server_id=None, tool="t", arguments={}, policy=policy).start(work)

    async def kept_busy(j: Job, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            j.touch()
            await asyncio.sleep(0.05)

    # Activity every 50 ms for a second, idle timeout 0.3 s: still waiting; then the answer.
    busy = job()
    waiting = asyncio.ensure_future(busy.wait())
    await kept_busy(busy, 1.0)
    assert not waiting.done()
    gate.set()
    assert (await asyncio.wait_for(waiting, 5)).text == "ok"
    gate.clear()

    # Queued for 1 s (three idle timeouts): still waiting; after the queue, a whole idle period, then the timeout.
    queued = job()
    queued.queue(True, ahead=1)
    waiting = asyncio.ensure_future(queued.wait())
    await asyncio.sleep(1.0)
    assert not waiting.done()
    queued.queue(False)
    freed_at = time.monotonic()
    with pytest.raises(ToolCallError) as info:
        await asyncio.wait_for(waiting, 5)
    assert info.value.kind == "timeout" and time.monotonic() - freed_at >= 0.3

    # The cap and the release point end a busy wait.
    capped = job(cap_s=0.6)
    began = time.monotonic()
    waiting = asyncio.ensure_future(capped.wait())
    await kept_busy(capped, 1.2)
    assert waiting.done() and 0.6 <= time.monotonic() - began
    assert isinstance(waiting.exception(), ToolCallError) and "limit" in waiting.exception().reason
    released = job()
    began = time.monotonic()
    waiting = asyncio.ensure_future(released.wait(release_after=0.5))
    await kept_busy(released, 1.0)
    assert waiting.done() and isinstance(waiting.exception(), ToolCallError)
    # None of those waits ended its job: they all finish, and their waits leave nothing behind.
    gate.set()
    for j in (queued, capped, released):
        assert (await j.outcome()).text == "ok" and j.late and not j._waiters


async def test_timeout_ends_the_wait_and_the_late_result_still_arrives(registry: Registry) -> None:
    cfg = stdio_demo()
    cfg.timeout_ms = 400
    d = await started(registry, cfg)
    try:
        job = d.submit("slow", {"seconds": 1.5, "steps": 1})  # one progress at the start, then silence
        done_events = []
        job.add_listener(lambda e: done_events.append(e) if e.kind == "done" else None)
        t0 = time.monotonic()
        with pytest.raises(ToolCallError) as info:
            await job.wait()
        assert info.value.kind == "timeout" and "still running" in info.value.reason
        assert time.monotonic() - t0 < 1.4 and not job.done
        result = await job.wait(10)  # the job went on in the background
        assert result.text == "done after 1.5s" and job.late
        assert done_events and done_events[0].data["late"] is True
        r = await row(registry, job)
        assert r["state"] == "completed" and r["delivered_late"] is True
    finally:
        await d.aclose()


async def test_background_bound_ends_a_job_as_timed_out(registry: Registry) -> None:
    d = await started(registry, stdio_demo(), background_s=0.5)
    try:
        job = d.submit("slow", {"seconds": 5, "steps": 1})
        with pytest.raises(ToolCallError) as info:
            await job.wait(10)
        assert info.value.kind == "timeout" and job.state == "timed_out"
        r = await row(registry, job)
        assert r["state"] == "timed_out" and r["finished_at"] is not None
    finally:
        await d.aclose()


async def test_deadlines_share_one_timer_and_fire_only_the_wanted() -> None:
    """The dispatcher's deadlines (aio.Deadlines: background limits, waits' idle deadlines): each fires once, in
    the order they fall due whatever order they were set in, at or after its delay; a cancelled one never fires;
    cancelling most of a long heap compacts it; one set by a firing callback fires too."""
    loop = asyncio.get_running_loop()
    limits = Deadlines()
    fired: list[tuple[int, float]] = []
    began = loop.time()
    delays = [0.3, 0.2, 0.25, 0.2, 0.4, 0.15]
    entries = [limits.add(d, lambda i=i: fired.append((i, loop.time()))) for i, d in enumerate(delays)]
    entries[2].cancel()
    entries[4].cancel()
    entries[4].cancel()  # twice: counted once
    assert len(limits) == 4
    await eventually(lambda: len(fired) >= 4, 10, "four deadlines fired")
    await asyncio.sleep(0.05)  # nothing more comes
    assert [i for i, _ in fired] == [5, 1, 3, 0]  # by time due; 1 and 3 (equal delays) in the order set
    assert all(at >= began + delays[i] - 0.01 for i, at in fired)
    assert len(limits) == 0 and limits._timer is None
    entries[0].cancel()  # after it fired: nothing happens
    assert len(limits) == 0

    many = [limits.add(0.05 + i / 10_000, lambda: fired.append((-1, loop.time()))) for i in range(3000)]
    for entry in many[:-1]:
        entry.cancel()
    assert len(limits) == 1 and len(limits._heap) < 1500  # compacted, not 3000 dead entries held
    await eventually(lambda: [i for i, _ in fired].count(-1) >= 1, 10, "the last deadline fired")
    await asyncio.sleep(0.05)
    assert [i for i, _ in fired].count(-1) == 1

    limits.add(0.01, lambda: limits.add(0.02, lambda: fired.append((7, loop.time()))))
    await eventually(lambda: 7 in [i for i, _ in fired], 10, "a deadline set while firing fired")


async def test_cancel_stops_waiting_promptly(registry: Registry, spawn: Callable[..., int]) -> None:
    port = spawn("--port", "0", "--finish-after-ms", "30000", script=str(SERVERS / "generic_receipt_server.py"))
    cfg = ServerConfig(name="gen", transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp", poll_interval=200)
    d = await started(registry, cfg)
    try:
        job = d.submit("submit_report", {"topic": "never"})
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        await job.cancel()
        assert time.monotonic() - t0 < 1.0
        assert job.state == "cancelled"
        with pytest.raises(ToolCallError) as info:
            await job.wait(1)
        assert info.value.kind == "cancelled"
        assert (await row(registry, job))["state"] == "cancelled"
    finally:
        await d.aclose()


async def test_a_job_cancelled_before_its_run_began_still_ends_cancelled(registry: Registry) -> None:
    """A task cancelled before its first step never runs its coroutine: the job used to stay "submitted" for
    good, with no row and its waiter held to the idle timeout. So it went for every call made in the same
    moment a session closed."""
    d = await started(registry, stdio_demo())
    try:
        job = d.submit("slow", {"seconds": 5})
        waiting = asyncio.ensure_future(job.wait(30))
        await job.cancel()  # no await between submit and this: the job's task has not run yet
        assert job.state == "cancelled" and job.done
        with pytest.raises(ToolCallError) as info:
            await asyncio.wait_for(waiting, 5)
        assert info.value.kind == "cancelled"
        await job.settled()
        assert (await row(registry, job))["state"] == "cancelled"
        closing = d.submit("slow", {"seconds": 5})
    finally:
        await d.aclose()
    assert closing.state == "cancelled"
    assert (await row(registry, closing))["state"] == "cancelled"


async def test_learned_timing_puts_the_first_poll_near_the_usual_finish(
    registry: Registry, spawn: Callable[..., int]
) -> None:
    port = spawn("--port", "0", "--finish-after-ms", "1200", script=str(SERVERS / "generic_receipt_server.py"))
    cfg = ServerConfig(name="gen", transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp", poll_interval=100)
    d = await started(registry, cfg)
    try:
        first = d.submit("submit_report", {"topic": "a"})
        await first.wait(15)
        untrained_polls = first.polls  # polls every 100 ms until 1.2 s: about 10
        for topic in "bcd":
            await d.submit("submit_report", {"topic": topic}).wait(15)
        trained = d.submit("submit_report", {"topic": "e"})
        await trained.wait(15)
        assert untrained_polls >= 6
        assert trained.polls <= 3, trained.polls
    finally:
        await d.aclose()
    # A new process learns the same from mcp_jobs.
    fresh = await started(registry)
    try:
        job = fresh.submit("submit_report", {"topic": "f"})
        await job.wait(15)
        assert job.polls <= 3
    finally:
        await fresh.aclose()


async def test_every_job_has_its_row(registry: Registry) -> None:
    d = await started(registry, stdio_demo())
    try:
        jobs = [d.submit("echo", {"text": str(i)}) for i in range(5)] + [d.submit("fail", {})]
        for job in jobs:
            try:
                await job.wait(10)
            except ToolCallError:
                pass
            await job.settled()
        rows = {r["id"]: r for r in await registry.recent_jobs(limit=100)}
        assert {j.id for j in jobs} <= set(rows)
        assert sorted(rows[j.id]["state"] for j in jobs) == ["completed"] * 5 + ["failed"]
    finally:
        await d.aclose()


# -- MCP tasks through the dispatcher ---------------------------------------------------------------------------

SERVER_2026 = str(SERVERS / "task_server_2026.py")
SERVER_2025 = str(SERVERS / "task_server_2025.py")


def task_cfg(script: str, transport: str, spawn: Callable[..., int], **fields) -> ServerConfig:
    if transport == "stdio":
        return ServerConfig(name="tasks", transport="stdio", command=sys.executable, args=[script], **fields)
    port = spawn("--transport", "streamable-http", "--port", "0", script=script)
    return ServerConfig(name="tasks", transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp", **fields)


@pytest.mark.parametrize("transport", ["stdio", "streamable-http"])
async def test_2026_task_completes_fails_and_is_cancelled_on_the_server(
    registry: Registry, spawn: Callable[..., int], transport: str
) -> None:
    d = await started(registry, task_cfg(SERVER_2026, transport, spawn))
    try:
        job = d.submit("report", {"seconds": 0.6})
        result = await job.wait(15)
        assert result.text == "report ready after 0.6s" and job.kind == "task" and job.task_id
        r = await row(registry, job)
        assert r["kind"] == "task" and r["state"] == "completed"

        failing = d.submit("report", {"seconds": 0.2, "fail": True})
        with pytest.raises(ToolCallError, match="could not be built"):
            await failing.wait(15)
        erring = d.submit("report", {"seconds": 0.2, "tool_error": True})
        with pytest.raises(ToolCallError, match="no data"):
            await erring.wait(15)

        long = d.submit("report", {"seconds": 30})
        await until_accepted(long)
        conn = d.servers["tasks"].conn
        handle_id = long.task_id
        t0 = time.monotonic()
        await long.cancel()
        assert time.monotonic() - t0 < 6 and long.state == "cancelled"
        status = await conn.tasks.get(_handle(handle_id, "2026-ext"))
        assert status.status == "cancelled"  # cancelled on the server, not only in our process
    finally:
        await d.aclose()


async def until_accepted(job: Job) -> None:
    accepted = asyncio.Event()
    job.add_listener(lambda e: accepted.set() if e.kind == "accepted" else None)
    if job.task_id is None:
        await asyncio.wait_for(accepted.wait(), 10)


def _handle(task_id: str, dialect: str):
    from mcp_integration.tasks import TaskHandle, TaskStatus

    return TaskHandle(dialect=dialect, task_id=task_id, first=TaskStatus(task_id, "working", None, None))


@pytest.mark.parametrize("transport", ["stdio", "streamable-http"])
async def test_2025_task_via_status_push_and_cancel(
    registry: Registry, spawn: Callable[..., int], transport: str
) -> None:
    d = await started(registry, task_cfg(SERVER_2025, transport, spawn))
    try:
        job = d.submit("long_report", {"seconds": 0.8})
        statuses: list[str] = []
        job.add_listener(lambda e: statuses.append(e.data.get("state")) if e.kind == "status" else None)
        result = await job.wait(15)
        assert job.kind == "task" and "0.8" in result.text
        assert "completed" in statuses
        quick = d.submit("quick", {"text": "hi"})
        assert (await quick.wait(10)).text.endswith("hi") and quick.kind == "plain"
        seen = {c["tool"]: c["task"] for c in json.loads((await d.call("calls_seen", {}, timeout=10)).text)}
        assert seen["long_report"] and seen["quick"] is None  # taskSupport honoured by the job engine

        long = d.submit("long_report", {"seconds": 30})
        await until_accepted(long)
        await long.cancel()
        assert long.state == "cancelled"
        status = await d.servers["tasks"].conn.tasks.get(_handle(long.task_id, "2025-11-25"))
        assert status.status == "cancelled"
    finally:
        await d.aclose()


async def test_task_outlives_the_wait_and_is_delivered_late(registry: Registry, spawn: Callable[..., int]) -> None:
    d = await started(registry, task_cfg(SERVER_2026, "streamable-http", spawn, timeout_ms=500))
    try:
        job = d.submit("report", {"seconds": 2.0})
        with pytest.raises(ToolCallError) as info:
            await job.wait(0.8)
        assert info.value.kind == "timeout" and not job.done
        assert (await job.wait(15)).text == "report ready after 2s" and job.late
        assert (await row(registry, job))["delivered_late"] is True
    finally:
        await d.aclose()


async def test_task_server_crash_mid_wait_is_a_clear_failure(registry: Registry, tmp_path) -> None:
    script = tmp_path / "dies_2025.py"
    script.write_text(
        "import os, sys, threading\n"
        f"sys.argv = [{SERVER_2025!r}]\n"
        f"sys.path.insert(0, {str(SERVERS)!r})\n"
        "threading.Timer(1.0, lambda: os._exit(3)).start()\n"
        f"exec(compile(open({SERVER_2025!r}).read(), {SERVER_2025!r}, 'exec'))\n"
    )
    cfg = ServerConfig(name="dies", transport="stdio", command=sys.executable, args=[str(script)], poll_interval=200)
    d = await started(registry, cfg)
    try:
        job = d.submit("long_report", {"seconds": 30})
        t0 = time.monotonic()
        with pytest.raises(ToolCallError) as info:
            await job.wait(20)
        assert info.value.kind != "timeout", info.value
        assert time.monotonic() - t0 < 15
        assert (await row(registry, job))["state"] == "failed"
    finally:
        await d.aclose()
