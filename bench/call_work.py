"""Interpreter work per call: Python bytecodes executed by this process, bare SDK against our dispatcher.

    python bench/call_work.py [--calls 240] [--at-once 24] [--top N] [--gc-calls 4800]

CPU time on a shared two-core machine drifts by more than the gap it is meant to show (bench/load.py's rounds
spread over 0.9-1.6x); the bytecodes a call executes nearly do not. One real demo server over Streamable HTTP,
its instant `echo` tool, and `--calls` calls, `--at-once` at a time, made three ways after a warm-up: the bare MCP
SDK (`mcp.Client`, the same progress callback), our Dispatcher without a registry (no job records), and our
Dispatcher over a registry in Postgres (a fresh schema, dropped at the end). Ours are waited on as the voice layer
waits (`Job.wait(release_after=...)`: the idle timeout, its cap, a release point). A `sys.settrace` tracer counts
every bytecode of this process while the calls run (tasks included; C code such as pydantic-core and the JSON
encoder counts as the one bytecode that calls it). It slows everything about fifty-fold; the job queue's flush
windows are stretched by the slowdown measured on the same calls untraced, so that records are written in the
batches they would be at full speed. Prints bytecodes per call, the ratios to the SDK, the part run in our package
and in asyncio (the HTTP client's pool, which checks each idle connection per request, varies by a thousand
bytecodes a call with how many connections a pass happened to open; ours and asyncio's do not), and, with --top N,
where our dispatcher's extra bytecodes go and where the records' go. Then, untraced, the garbage collector over
--gc-calls more calls each way (after `gc.freeze()`, as agent.py's prewarm does): its passes by generation and its
time per call; enough calls that the jobs a dispatcher keeps reach the oldest generation. Uses DATABASE_URL if
set, else an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import re
import sys
import time
import types
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import bench_database, bench_registry, bench_schema, spawn, stop  # noqa: E402
from mcp import Client  # noqa: E402

from mcp_integration import job_queue  # noqa: E402
from mcp_integration.dispatcher import Dispatcher  # noqa: E402
from mcp_integration.registry import ServerConfig  # noqa: E402


class Bytecodes:
    """Counts the bytecodes each code object executes while armed."""

    def __init__(self) -> None:
        self.counts: Counter[types.CodeType] = Counter()

    def _local(self, frame: types.FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            self.counts[frame.f_code] += 1
        return self._local

    def _global(self, frame: types.FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return self._local

    def __enter__(self) -> Bytecodes:
        self.counts.clear()
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)


def where(code: types.CodeType) -> str:
    name = re.sub(r".*/lib/python3\.\d+/", "", code.co_filename.split("site-packages/")[-1])
    return f"{name.removeprefix(f'{ROOT}/')}:{code.co_firstlineno} {code.co_qualname}"


class Collector:
    """The garbage collector's passes while armed: how many of each generation, and the time they took."""

    def __init__(self) -> None:
        self.passes = [0, 0, 0]
        self.seconds = 0.0
        self._began = 0.0

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.passes[info["generation"]] += 1
            self.seconds += time.perf_counter() - self._began

    def __enter__(self) -> Collector:
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._on_gc)


async def measure(
    call: Callable[[int], Awaitable[Any]],
    calls: int,
    at_once: int,
    settle: Callable[[], Awaitable[None]] | None = None,
) -> tuple[Counter[str], float]:
    """Bytecodes of `calls` calls, `at_once` at a time (each batch then `settle`d: its records written), and how
    many times slower they ran traced than not."""

    async def batches(calls: int) -> float:
        began = time.perf_counter()
        for start in range(0, calls, at_once):
            await asyncio.gather(*(call(i) for i in range(start, min(start + at_once, calls))))
            if settle is not None:
                await settle()
        return time.perf_counter() - began

    for i in range(20):  # warm-up: connections, caches, first-use imports
        await call(i)
    plain = await batches(calls)
    with Bytecodes() as counter:
        traced = await batches(calls)
    return Counter({where(code): n for code, n in counter.counts.items()}), traced / plain


async def collected(call: Callable[[int], Awaitable[Any]], calls: int, at_once: int) -> Collector:
    """The collector's passes during `calls` more calls, untraced, from a full collection: enough calls that the
    jobs a dispatcher keeps (its history) reach the oldest generation, as in a long session."""
    gc.collect()
    gc.freeze()  # what is loaded and connected by now, as agent.py's prewarm does in each job process
    with Collector() as collector:
        for start in range(0, calls, at_once):
            await asyncio.gather(*(call(i) for i in range(start, min(start + at_once, calls))))
    return collector


@contextlib.contextmanager
def stretched(factor: float) -> Iterator[None]:
    """The job queue's flush windows stretched as tracing stretches everything else, so that a traced burst
    is written in the batches it would be at full speed (unstretched, each record is nearly a flush of its own)."""
    names = ("FLUSH_QUIET_S", "FLUSH_MAX_WAIT_S", "FLUSH_INTERVAL_S")
    saved = {n: getattr(job_queue, n) for n in names}
    for name, value in saved.items():
        setattr(job_queue, name, value * factor)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(job_queue, name, value)


async def run(args: argparse.Namespace, url: str) -> tuple[dict[str, Counter[str]], dict[str, Collector]]:
    cfg = ServerConfig(name="demo", transport="streamable-http", url=url)

    async def progress(progress: float, total: float | None, message: str | None) -> None:
        return None

    found: dict[str, Counter[str]] = {}
    collectors: dict[str, Collector] = {}
    async with Client(url) as client:
        await client.list_tools()

        def sdk(i: int) -> Awaitable[Any]:
            return client.call_tool("echo", {"text": f"hi {i}"}, progress_callback=progress)

        found["bare SDK"], _ = await measure(sdk, args.calls, args.at_once)
        collectors["bare SDK"] = await collected(sdk, args.gc_calls, args.at_once)
    bare = Dispatcher(None)
    await bare.start(wait=True, servers=[cfg])
    try:

        def unrecorded(i: int) -> Awaitable[Any]:
            return bare.submit("echo", {"text": f"hi {i}"}, server="demo").wait(release_after=60)

        found["ours, no job records"], slowdown = await measure(unrecorded, args.calls, args.at_once)
        collectors["ours, no job records"] = await collected(unrecorded, args.gc_calls, args.at_once)
    finally:
        await bare.aclose()
    async with bench_database() as base, bench_schema(base) as conninfo, bench_registry(conninfo) as registry:
        await registry.add_server(cfg)
        ours = Dispatcher(registry)
        await ours.start(wait=True)
        try:

            async def recorded(i: int) -> None:
                await ours.submit("echo", {"text": f"hi {i}"}, server="demo").wait(release_after=60)

            stats = registry.job_queue.stats
            with stretched(slowdown):
                flushes, rows = stats.flushes, stats.rows
                # Each batch's rows written before the next: the records' whole cost is counted.
                found["ours, recorded"], _ = await measure(recorded, args.calls, args.at_once, registry.jobs_flushed)
                flushes, rows = stats.flushes - flushes, stats.rows - rows
            collectors["ours, recorded"] = await collected(recorded, args.gc_calls, args.at_once)
            print(
                f"tracing slowed the calls {slowdown:.0f}-fold, and the flush windows were stretched as much; the "
                f"records of both passes took {flushes} flushes, {rows} rows"
            )
        finally:
            await ours.aclose()
    return found, collectors


def report(found: dict[str, Counter[str]], collectors: dict[str, Collector], args: argparse.Namespace) -> None:
    calls, top = args.calls, args.top
    per_call = {who: sum(c.values()) / calls for who, c in found.items()}
    sdk = per_call["bare SDK"]
    print(f"\nbytecodes per call ({calls} calls)            in mcp_integration   in asyncio")
    for who, n in per_call.items():
        ours = sum(v for k, v in found[who].items() if k.startswith("mcp_integration/")) / calls
        loop = sum(v for k, v in found[who].items() if k.startswith("asyncio/")) / calls
        print(f"  {who:<24}{n:>10,.0f}   x{n / sdk:.3f}{ours:>14,.0f}{loop:>16,.0f}")
    if top:
        base, ours = found["bare SDK"], found["ours, no job records"]
        extra = Counter({k: (ours[k] - base[k]) / calls for k in set(base) | set(ours)})
        print(f"\nwhere ours (no records) does more than the SDK, per call (top {top})")
        for name, n in extra.most_common(top):
            print(f"  {n:>8.1f}  {name}")
        recorded = found["ours, recorded"]
        extra = Counter({k: (recorded[k] - ours[k]) / calls for k in set(ours) | set(recorded)})
        print(f"\nwhere the job records' bytecodes go, per call (top {top})")
        for name, n in extra.most_common(top):
            print(f"  {n:>8.1f}  {name}")
    print(f"\nthe garbage collector over {args.gc_calls} more calls, untraced: passes per 100 calls (young, middle,")
    print("oldest generation) and its time per call")
    for who, c in collectors.items():
        young, middle, oldest = (100 * n / args.gc_calls for n in c.passes)
        print(f"  {who:<24}{young:>8.1f}{middle:>8.1f}{oldest:>8.2f}{1e6 * c.seconds / args.gc_calls:>10.1f} us")
    print(f"\nbytecodes ours / bare SDK, no job records: {per_call['ours, no job records'] / sdk:.3f}")
    print(f"bytecodes ours / bare SDK, recorded: {per_call['ours, recorded'] / sdk:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=240)
    parser.add_argument("--at-once", type=int, default=24)
    parser.add_argument("--top", type=int, default=0, help="list where our extra bytecodes go")
    parser.add_argument("--gc-calls", type=int, default=4800, help="untraced calls the collector is timed over")
    args = parser.parse_args()
    procs: list[Any] = []
    try:
        port = spawn("demo_server.py", ["--transport", "streamable-http", "--name", "work"], procs)
        found, collectors = asyncio.run(run(args, f"http://127.0.0.1:{port}/mcp"))
    finally:
        stop(procs)
    report(found, collectors, args)


if __name__ == "__main__":
    main()
