"""Liveness benchmark: a dead server is failed at once, a busy one never.

    python bench/liveness.py [--runs 3] [--sessions 10] [--calls 5] [--min-s 3] [--max-s 10] [--seed 1]

Part 1, hard faults. For each transport, a call is started on a server that is then made to fail for real
(SIGKILL of its process, or the server closing its SSE stream or WebSocket) 2.5 s into the call, long enough
for a serial server to have been found serial. Printed: the median time from the fault to the failed call, ours
and the bare `mcp` SDK's (`mcp.Client`, defaults; "never" = still waiting after --give-up-s), run side by side
against separate server processes.

Part 2, busy servers. Serial servers (the n8n look-alike over SSE and Streamable HTTP, a read-handle-write stdio
loop) run tools of 3-10 s (seeded uniform); --sessions connections per transport each make --calls calls in a
row, ours and the bare SDK's at the same time. Printed: calls wrongly failed (expected 0) and the median
call time beside the bare SDK's. No database: the dispatcher runs without a registry.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import SERVERS, spawn, stop  # noqa: E402
from mcp import Client  # noqa: E402
from mcp.client.sse import sse_client  # noqa: E402
from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

from mcp_integration.dispatcher import Dispatcher  # noqa: E402
from mcp_integration.errors import ToolCallError  # noqa: E402
from mcp_integration.registry import ServerConfig  # noqa: E402
from mcp_integration.transports import open_transport  # noqa: E402

FAULT_AT_S = 2.5


@dataclass(frozen=True)
class Target:
    """One server to call: its registry row, the tool and arguments of a long call, and how to hurt it."""

    cfg: ServerConfig
    tool: str
    args: dict[str, Any]
    fault: Callable[[], None]  # SIGKILL the process; a no-op where the server closes the stream itself


@dataclass(frozen=True)
class Fault:
    label: str
    start: Callable[[list[Any], Path], Target]


def _n8n(transport: str) -> Callable[[list[Any], Path], Target]:
    def start(procs: list[Any], _: Path) -> Target:
        port = spawn("n8n_like_server.py", [], procs)
        cfg = ServerConfig(name="s", transport=transport, url=f"http://127.0.0.1:{port}/mcp/reports")
        return Target(cfg, "run_workflow", {"topic": "x", "seconds": 60}, _killer(procs[-1].pid))

    return start


def _serial_stdio(procs: list[Any], tmp: Path) -> Target:
    pidfile = tmp / f"pid-{random.random()}"
    cfg = ServerConfig(
        name="s",
        transport="stdio",
        command=sys.executable,
        args=[str(SERVERS / "serial_stdio_server.py"), "--pid-file", str(pidfile)],
    )
    return Target(cfg, "work", {"seconds": 60}, lambda: os.kill(int(pidfile.read_text()), signal.SIGKILL))


def _websocket(closed: bool) -> Callable[[list[Any], Path], Target]:
    def start(procs: list[Any], _: Path) -> Target:
        port = spawn("ws_server.py", [], procs)
        cfg = ServerConfig(name="s", transport="websocket", url=f"ws://127.0.0.1:{port}/")
        return Target(cfg, "slow", {"seconds": 60}, (_closer if closed else _killer)(procs[-1].pid))

    return start


def _sse_closed(procs: list[Any], _: Path) -> Target:
    port = spawn("demo_server.py", ["--transport", "sse", "--sse-close-on-signal"], procs)
    cfg = ServerConfig(name="s", transport="sse", url=f"http://127.0.0.1:{port}/sse")
    return Target(cfg, "slow", {"seconds": 60, "steps": 1}, _closer(procs[-1].pid))


def _modern_http(procs: list[Any], _: Path) -> Target:
    port = spawn("demo_server.py", ["--transport", "streamable-http"], procs)
    cfg = ServerConfig(name="s", transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp")
    return Target(cfg, "slow", {"seconds": 60, "steps": 1}, _killer(procs[-1].pid))


def _killer(pid: int) -> Callable[[], None]:
    return lambda: os.kill(pid, signal.SIGKILL)


def _closer(pid: int) -> Callable[[], None]:
    # The test servers end their event streams / WebSockets on SIGUSR1, the process staying up.
    return lambda: os.kill(pid, signal.SIGUSR1)


FAULTS = [
    Fault("stdio, process killed (serial server)", _serial_stdio),
    Fault("sse, process killed (n8n look-alike)", _n8n("sse")),
    Fault("streamable-http, process killed (n8n look-alike)", _n8n("streamable-http")),
    Fault("streamable-http 2026-07-28, process killed", _modern_http),
    Fault("websocket, process killed", _websocket(closed=False)),
    Fault("sse, event stream closed by the server", _sse_closed),
    Fault("websocket, closed by the server", _websocket(closed=True)),
]


async def _ours(target: Target, fault: Callable[[], None], give_up_s: float) -> float | None:
    d = Dispatcher(None, connect_timeout=15)
    await d.start(servers=[target.cfg])
    try:
        job = d.submit(target.tool, target.args)
        await asyncio.sleep(FAULT_AT_S)
        fault()
        at = time.monotonic()
        try:
            await job.wait(give_up_s)
        except ToolCallError as exc:
            return time.monotonic() - at if exc.kind != "timeout" else None
        return None
    finally:
        await d.aclose()


async def _bare(target: Target, fault: Callable[[], None], give_up_s: float) -> float | None:
    async with Client(_bare_transport(target.cfg)) as client:
        call = asyncio.ensure_future(client.call_tool(target.tool, target.args))
        await asyncio.sleep(FAULT_AT_S)
        fault()
        at = time.monotonic()
        done, _ = await asyncio.wait({call}, timeout=give_up_s)
        if not done:
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
            return None
        failed = call.exception() is not None or call.result().is_error
        return time.monotonic() - at if failed else None


def _bare_transport(cfg: ServerConfig) -> Any:
    if cfg.transport == "stdio":
        return stdio_client(StdioServerParameters(command=cfg.command or "", args=list(cfg.args)))
    if cfg.transport == "sse":
        return sse_client(cfg.url or "")
    if cfg.transport == "streamable-http":
        return streamable_http_client(cfg.url or "")
    return open_transport(cfg)  # WebSocket: the SDK has none; ours is the transport, the bare Client on top


async def part1(runs: int, give_up_s: float, tmp: Path) -> None:
    print(f"\n== hard faults: fault → failed call, median of {runs} runs (bare SDK beside, never = > {give_up_s:g} s)")
    print(f"{'fault':50} {'ours':>8} {'bare SDK':>9}")
    for fault in FAULTS:
        ours: list[float | None] = []
        bare: list[float | None] = []
        for _ in range(runs):
            procs: list[Any] = []
            try:
                mine, theirs = fault.start(procs, tmp), fault.start(procs, tmp)
                a, b = await asyncio.gather(
                    _ours(mine, mine.fault, give_up_s), _bare(theirs, theirs.fault, give_up_s), return_exceptions=True
                )
                ours.append(a if isinstance(a, float) else None)
                bare.append(b if isinstance(b, float) else None)
            finally:
                stop(procs)
        print(f"{fault.label:50} {_median(ours):>8} {_median(bare):>9}")


def _median(values: list[float | None]) -> str:
    if not values or any(v is None for v in values):
        return "never" if all(v is None for v in values) else f"{sum(v is None for v in values)}× never"
    return f"{statistics.median(v for v in values if v is not None):.2f} s"


async def part2(sessions: int, calls: int, lo: float, hi: float, seed: int) -> None:
    print(f"\n== busy serial servers: {sessions} sessions × {calls} calls of {lo:g}-{hi:g} s per transport")
    rng = random.Random(seed)
    procs: list[Any] = []
    try:
        ports = {side: spawn("n8n_like_server.py", [], procs) for side in ("ours", "bare")}
        plans = [[rng.uniform(lo, hi) for _ in range(calls)] for _ in range(sessions)]
        stdio = ServerConfig(
            name="s", transport="stdio", command=sys.executable, args=[str(SERVERS / "serial_stdio_server.py")]
        )

        def cfgs(side: str) -> dict[str, ServerConfig]:
            url = f"http://127.0.0.1:{ports[side]}/mcp/reports"
            return {
                "sse": ServerConfig(name="s", transport="sse", url=url),
                "streamable-http": ServerConfig(name="s", transport="streamable-http", url=url),
                "stdio": stdio,
            }

        def call_of(transport: str, seconds: float) -> tuple[str, dict[str, Any]]:
            if transport == "stdio":
                return "work", {"seconds": round(seconds, 2)}
            return "run_workflow", {"topic": "x", "seconds": round(seconds, 2)}

        async def ours_session(cfg: ServerConfig, plan: list[float]) -> list[tuple[bool, float]]:
            d = Dispatcher(None, connect_timeout=30)
            await d.start(servers=[cfg])
            out = []
            try:
                for seconds in plan:
                    tool, args = call_of(cfg.transport, seconds)
                    at = time.monotonic()
                    try:
                        await d.call(tool, args)
                        out.append((True, time.monotonic() - at))
                    except ToolCallError as exc:
                        print(f"  ours, {cfg.transport}: wrongly failed: {exc}")
                        out.append((False, time.monotonic() - at))
            finally:
                await d.aclose()
            return out

        async def bare_session(cfg: ServerConfig, plan: list[float]) -> list[tuple[bool, float]]:
            out = []
            async with Client(_bare_transport(cfg)) as client:
                for seconds in plan:
                    tool, args = call_of(cfg.transport, seconds)
                    at = time.monotonic()
                    try:
                        result = await client.call_tool(tool, args)
                        out.append((not result.is_error, time.monotonic() - at))
                    except Exception as exc:
                        print(f"  bare, {cfg.transport}: failed: {type(exc).__name__}")
                        out.append((False, time.monotonic() - at))
            return out

        runners: list[tuple[str, str, Awaitable[list[tuple[bool, float]]]]] = []
        for transport in ("sse", "streamable-http", "stdio"):
            for plan in plans:
                runners.append(("ours", transport, ours_session(cfgs("ours")[transport], plan)))
                runners.append(("bare", transport, bare_session(cfgs("bare")[transport], plan)))
        results = await asyncio.gather(*(r[2] for r in runners))
        print(f"{'transport':17} {'side':5} {'calls':>6} {'wrongly failed':>15} {'median call':>12} {'/ bare':>7}")
        for transport in ("sse", "streamable-http", "stdio"):
            medians: dict[str, float] = {}
            for side in ("ours", "bare"):
                rows = [
                    x
                    for (s, t, _), res in zip(runners, results, strict=True)
                    if s == side and t == transport
                    for x in res
                ]
                medians[side] = statistics.median(t for _, t in rows)
                failed = sum(not ok for ok, _ in rows)
                ratio = f"{medians['ours'] / medians['bare']:.2f}" if side == "bare" else ""
                print(f"{transport:17} {side:5} {len(rows):>6} {failed:>15} {medians[side]:>10.2f} s {ratio:>7}")
    finally:
        stop(procs)


async def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--give-up-s", type=float, default=30.0)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--min-s", type=float, default=3.0)
    parser.add_argument("--max-s", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", choices=["faults", "busy"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="liveness-") as tmp:
        if args.only != "busy":
            await part1(args.runs, args.give_up_s, Path(tmp))
        if args.only != "faults":
            await part2(args.sessions, args.calls, args.min_s, args.max_s, args.seed)


if __name__ == "__main__":
    asyncio.run(main())
