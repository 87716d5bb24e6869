"""Health: the circuit breaker's rules, and the monitor against real servers that die, come back, hang or lag."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import pytest
from conftest import all_final, stdio_demo
from hypothesis import given
from hypothesis import strategies as st

from mcp_integration.dispatcher import Dispatcher
from mcp_integration.errors import ToolCallError
from mcp_integration.health import CircuitBreaker, Health, HealthMonitor
from mcp_integration.jobs import Job
from mcp_integration.registry import HealthRow, Registry, ServerConfig, ToolSpec
from mcp_integration.speech import error_sentence


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def http_cfg(name: str, port: int) -> ServerConfig:
    return ServerConfig(name=name, transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp")


async def eventually(check: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def db_status(registry: Registry, name: str, status: str, timeout: float = 10.0) -> HealthRow:
    """Wait for a status to reach mcp_server_health (it is written just after the breaker changes)."""
    deadline = time.monotonic() + timeout
    while (row := (await registry.health()).get(name)) is None or row.status != status:
        assert time.monotonic() < deadline, f"{name} never recorded as {status} (last: {row})"
        await asyncio.sleep(0.05)
    return row


# -- the breaker ---------------------------------------------------------------------------------------------


def test_breaker_goes_up_degraded_down_and_back_through_one_probe() -> None:
    clock = Clock()
    b = CircuitBreaker(down_after=3, open_s=5.0, max_open_s=20.0, clock=clock)
    assert b.status == "unknown" and b.allow()
    assert b.success(12.0) == "up"
    assert b.failure() == "degraded" and b.allow()
    assert b.failure() == "degraded"
    assert b.failure() == "down"
    assert not b.allow()  # calls fail fast while the pause lasts
    clock.now += 5.0
    assert b.allow()  # half-open: one probe goes through ...
    assert not b.allow()  # ... and only one
    assert b.failure() == "down"  # the probe failed: a longer pause (5 → 10 s, jittered down to 8)
    clock.now += 7.9
    assert not b.allow()
    clock.now += 2.2
    assert b.allow()
    assert b.success(30.0) == "up" and b.failures == 0 and b.allow()


def test_breaker_calls_refused_meanwhile_do_not_extend_the_pause() -> None:
    clock = Clock()
    b = CircuitBreaker(down_after=1, open_s=4.0, clock=clock)
    b.failure()
    retry_at = b.retry_at
    for _ in range(10):
        clock.now += 0.1
        b.failure()  # say, calls that failed to connect while down
    assert b.retry_at == retry_at


def test_breaker_slow_answers_are_degraded_not_down() -> None:
    b = CircuitBreaker(slow_ms=2000)
    assert b.success(2500) == "degraded" and b.allow()
    assert b.success(100) == "up"


@given(st.lists(st.sampled_from(["ok", "slow", "fail", "wait", "probe"]), max_size=60))
def test_breaker_invariants(steps: list[str]) -> None:
    clock = Clock()
    b = CircuitBreaker(down_after=3, open_s=1.0, max_open_s=8.0, clock=clock)
    for step in steps:
        if step == "ok":
            b.success(10)
        elif step == "slow":
            b.success(5000)
        elif step == "fail":
            b.failure()
        elif step == "wait":
            clock.now += 3.0
        else:
            b.allow()
        assert b.status in ("unknown", "up", "degraded", "down")
        assert (b.status == "down") == (b.failures >= 3)
        assert b.seconds_to_retry() <= 8.0
        if b.status != "down":
            assert b.allow()


# -- the monitor, against real servers -----------------------------------------------------------------------


async def test_killed_server_goes_down_fails_fast_and_comes_back(registry: Registry, spawn: Callable[..., int]) -> None:
    port = spawn("--transport", "streamable-http", "--port", "0")
    await registry.add_server(http_cfg("booking", port))
    d = Dispatcher(registry, connect_timeout=5)
    health = Health(d)
    await d.start()
    monitor = HealthMonitor(health, interval_s=0.3, check_timeout_s=2.0).start()
    jobs: list[Job] = []
    try:
        await eventually(lambda: health.breaker("booking").status == "up")
        jobs.append(first := d.submit("echo", {"text": "hi"}))
        assert (await first.wait(10)).text == "echo: hi"

        proc = spawn.procs[-1]  # type: ignore[attr-defined]
        proc.kill()
        proc.wait(5)
        await eventually(lambda: health.breaker("booking").status == "down")
        await db_status(registry, "booking", "down")
        rows = await registry.health()
        assert rows["booking"].status == "down" and rows["booking"].consecutive_failures >= 3
        assert rows["booking"].last_error

        started, failures = time.monotonic(), health.breaker("booking").failures
        jobs.append(refused := d.submit("echo", {"text": "anyone?"}))
        with pytest.raises(ToolCallError) as info:
            await refused.wait(10)
        assert time.monotonic() - started < 3.0  # refused at once, not after a timeout (35 s)
        assert health.breaker("booking").failures == failures  # a refusal is not one more failure
        assert info.value.kind == "unreachable" and "not answering right now" in info.value.reason
        assert error_sentence(info.value, server_label="the booking system") == (
            "The booking system is not answering right now."
        )

        spawn("--transport", "streamable-http", "--port", str(port))  # back, same address
        await eventually(lambda: health.breaker("booking").status == "up", timeout=30)
        jobs.append(again := d.submit("echo", {"text": "back"}))
        assert (await again.wait(10)).text == "echo: back"
        await db_status(registry, "booking", "up")
        async with registry.pool.connection() as conn:
            history = await (
                await conn.execute(
                    "SELECT c.ok FROM mcp_health_checks c JOIN mcp_servers s ON s.id = c.server_id"
                    " WHERE s.name = 'booking'"
                )
            ).fetchall()
        assert any(r["ok"] for r in history) and any(not r["ok"] for r in history)
        assert monitor.running
    finally:
        await monitor.aclose()
        await d.aclose()
    assert not monitor.running
    # Every call is a job, the refused one too: recorded, with the reason the caller heard.
    rows = await all_final(registry, jobs)
    assert [rows[j.id]["state"] for j in jobs] == ["completed", "failed", "completed"]
    assert "not answering right now" in rows[refused.id]["error"]


async def test_server_that_never_answers_is_down_after_three_checks(registry: Registry) -> None:
    # Accepts TCP connections and reads, but never says a word.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = silent.getsockname()[1]
    held: list[socket.socket] = []

    async def accept_forever() -> None:
        loop = asyncio.get_running_loop()
        silent.setblocking(False)
        while True:
            conn, _ = await loop.sock_accept(silent)
            held.append(conn)

    acceptor = asyncio.create_task(accept_forever())
    mute = await registry.add_server(http_cfg("mute", port))
    assert mute.id is not None
    await registry.save_tools(mute.id, [ToolSpec("mute", "echo", "Echo.", {"type": "object"})])
    d = Dispatcher(registry, connect_timeout=1)
    health = Health(d)
    await d.start(wait=False)  # its tool known from the cache
    try:
        for expected in ("degraded", "degraded", "down"):
            report = (await health.check("mute", timeout=0.5))["mute"]
            assert not report.ok and report.status == expected and report.error
        assert "within 0.5 s" in (report.error or "")
        with pytest.raises(ToolCallError) as info:
            await d.call("echo", {"text": "x"}, server="mute")
        assert info.value.kind == "unreachable" and "not answering right now" in info.value.reason
    finally:
        acceptor.cancel()
        await asyncio.gather(acceptor, return_exceptions=True)
        await d.aclose()
        for conn in held:
            conn.close()
        silent.close()


async def test_slow_to_ping_is_degraded_but_still_serves(registry: Registry) -> None:
    # tools/list is the probe on a 2026 connection; this server takes 2.3 s to list its tools.
    await registry.add_server(stdio_demo("laggy", "--list-delay-ms", "2300"))
    d = Dispatcher(registry, connect_timeout=10)
    health = Health(d)
    await d.start()
    try:
        report = (await health.check("laggy", timeout=8))["laggy"]
        assert report.ok and report.status == "degraded" and report.latency_ms and report.latency_ms > 2000
        assert (await d.call("echo", {"text": "still here"})).text == "echo: still here"
        assert (await registry.health())["laggy"].status == "degraded"
    finally:
        await d.aclose()


async def test_calls_that_cannot_connect_trip_the_breaker(registry: Registry) -> None:
    # Nothing listens on port 9; its tool is known from the cache, so each call tries to connect and fails.
    gone = await registry.add_server(http_cfg("gone", 9))
    assert gone.id is not None
    await registry.save_tools(gone.id, [ToolSpec("gone", "book", "Book a table.", {"type": "object"})])
    d = Dispatcher(registry, connect_timeout=2)
    health = Health(d)
    await d.start(wait=False)
    try:
        kinds = []
        for _ in range(3):
            with pytest.raises(ToolCallError) as info:
                await d.call("book", {})
            kinds.append(info.value.kind)
        assert kinds == ["unreachable"] * 3
        assert health.breaker("gone").status == "down"
        started = time.monotonic()
        with pytest.raises(ToolCallError) as info:
            await d.call("book", {})
        assert "not answering right now" in info.value.reason and time.monotonic() - started < 3.0
        assert (await db_status(registry, "gone", "down")).consecutive_failures == 3
    finally:
        await d.aclose()
