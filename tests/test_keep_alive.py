"""Streamable HTTP connections reused from call to call (`keep_alive.py`), against the SDK's own server.

The SDK's client closes each POST's event stream before its end, so httpcore closes the connection: the bare SDK
opens one per call (unless it happened to read the end first) to a server that answers in event streams (the
SDK's server does for a call that reports progress), counted here by the kernel (`client_sockets`) as the
control. Ours reads each stream to its end instead, and a server that keeps a stream open past its answer (a
fault mode of the demo server) costs one bounded wait, never the answer's time, and then is not waited on again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import pytest
from conftest import BARE_AT_LEAST, BARE_CALLS, client_sockets, eventually, started
from mcp import Client

from mcp_integration import keep_alive
from mcp_integration.registry import Registry, ServerConfig

SLOW = {"seconds": 0.01, "steps": 2}  # reports progress, so the server answers in an event stream


async def _progress(progress: float, total: float | None, message: str | None) -> None:
    pass


def _http(port: int) -> ServerConfig:
    return ServerConfig(name="demo", transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp")


async def test_calls_reuse_their_connections_where_the_bare_sdk_opens_one_each(
    registry: Registry, spawn: Callable[..., int]
) -> None:
    port = spawn("--transport", "streamable-http")

    before = client_sockets(port)
    async with Client(f"http://127.0.0.1:{port}/mcp") as bare:
        for _ in range(BARE_CALLS):
            await bare.call_tool("slow", SLOW, progress_callback=_progress)
    assert len(client_sockets(port) - before) >= BARE_AT_LEAST, "the control: the bare SDK opens a connection per call"

    d = await started(registry, _http(port))
    try:
        before = client_sockets(port)
        for _ in range(BARE_CALLS):
            assert "done" in (await d.call("slow", SLOW)).text
        assert len(client_sockets(port) - before) <= 1
        # A burst above httpx's default of 20 kept connections: all it opened stay open for the next one. (How many
        # it opens depends on how the calls overlap, so the kept set is what is compared, not the count opened.)
        kept: set[int] = set()
        for _ in range(2):
            results = await asyncio.gather(*(d.call("slow", {"seconds": 1.0, "steps": 2}) for _ in range(40)))
            assert all("done" in r.text for r in results)
            assert kept <= client_sockets(port, open_only=True)
            kept = client_sockets(port, open_only=True)
            assert len(kept) > 21, "no more than httpx's default of 20 idle (and the listening GET) kept"
    finally:
        await d.aclose()


@pytest.mark.parametrize("fault", ["silent", "chatter"])
async def test_a_server_holding_its_streams_open_costs_one_bounded_wait_and_never_the_answer(
    registry: Registry, spawn: Callable[..., int], caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    # silent: the stream stays open without a byte (the time bound gives up); chatter: comments stream on (the
    # size bound gives up, well before the time bound).
    extra = ["--chatter"] if fault == "chatter" else []
    port = spawn("--transport", "streamable-http", "--hold-post-streams-ms", "60000", *extra)
    caplog.set_level(logging.INFO, logger=keep_alive.__name__)
    d = await started(registry, _http(port))

    def gave_up() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "kept an event stream open" in r.getMessage()]

    try:
        for _ in range(3):
            started_at = time.monotonic()
            assert "done" in (await d.call("slow", SLOW)).text
            assert time.monotonic() - started_at < 30, "the answer waited for the held stream"
        # The first held stream (the handshake's) is given up on after its bound, once, and no other is waited on.
        await eventually(gave_up, 30, "the held stream given up on")
        for _ in range(3):
            assert "done" in (await d.call("slow", SLOW)).text
        await asyncio.sleep(keep_alive.DRAIN_S * 2)
        assert len(gave_up()) == 1
    finally:
        closing = time.monotonic()
        await d.aclose()
        assert time.monotonic() - closing < 30, "closing waited for a held stream"
