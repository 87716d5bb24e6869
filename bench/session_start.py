"""Session-start benchmark: how long until the dispatcher's tool index is ready, for N real MCP servers.

    python bench/session_start.py [--servers 20] [--delay-ms 100] [--runs 7] [--legacy] [--tools-ttl-ms N]

Modes: one server alone (baseline), N servers one after another, N servers concurrently, and a warm start
from the Postgres tool cache (`start(wait=False)`). Each is a worker's steady state: a new dispatcher per run,
as per session, over a registry that already holds the tool cache and each server's remembered protocol (from
the untimed warm-up run), so a connect skips the `server/discover` probe, or on these 2026-07-28 servers adopts
the stored DiscoverResult with no handshake round trip (they let clients reuse it for an hour: `ttlMs`). One
more mode, for comparison, starts concurrently with the memory withheld (every connect negotiates afresh, as the
first session of a new server does). After the warm-up, the process freezes what it holds from the collector
(`gc.freeze()`), as agent.py's prewarm does in each job process, and the one-server and concurrent runs
alternate. Baseline, in the same runs: the bare MCP SDK (`mcp.Client`, connected and `list_tools()` answered) on
one server and on all of them concurrently, at its best (one TLS context for all its HTTP clients, and the protocol
version given, `mode="2026-07-28"`, so it sends no `server/discover`: what our remembered protocol does), and as
`Client(url)` is documented (a TLS context per client, negotiation first). Concurrent starts on one event loop
are bound by CPU per connect times N: the SDK's best ratio is that bound on this machine, with none of our work
(validation, tool checks, registry) in it. Uses DATABASE_URL if set, else an embedded PostgreSQL. `--legacy`:
servers that refuse `server/discover`, so every connect is a 2025-11-25 handshake, which a remembered protocol
spares only the probe (the SDK at its best is then given `mode="legacy"`). `--tools-ttl-ms N`: the servers let
clients reuse their tools/list answer for N ms (2026-07-28 `ttlMs`, the SDK server's `cache_hints`), which ours
keeps in the registry (tool_lists.py): a start then sends those servers nothing. The bare SDK's own response cache
lives in its `Client`, one per session, so its starts list the tools each time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import ssl
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "servers"))

import httpx2  # noqa: E402
from _common import bench_database, bench_registry, bench_schema  # noqa: E402
from mcp import Client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

from mcp_integration.dispatcher import Dispatcher  # noqa: E402
from mcp_integration.protocol_memory import KnownProtocol  # noqa: E402
from mcp_integration.registry import ServerConfig  # noqa: E402

DEMO = ROOT / "tests" / "servers" / "demo_server.py"
TOOLS_PER_SERVER = 5  # echo, add, slow, fail, lookup.weather


def start_servers(
    n: int, delay_ms: int, procs: list[subprocess.Popen[str]], *, legacy: bool = False, tools_ttl_ms: int = 0
) -> list[int]:
    """Start n demo servers over Streamable HTTP (all at once); returns their ports. `procs` collects them."""
    for i in range(n):
        cmd = [sys.executable, str(DEMO), "--transport", "streamable-http", "--port", "0"]
        cmd += ["--list-delay-ms", str(delay_ms), "--name", f"s{i}", *(["--legacy"] if legacy else [])]
        cmd += ["--discover-ttl-ms", "3600000"]  # its DiscoverResult reusable for an hour (the SDK's default: not)
        cmd += ["--tools-ttl-ms", str(tools_ttl_ms)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT))
    ports = []
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("LISTENING "):
            raise RuntimeError(f"a demo server did not start (exit code {proc.poll()})")
        ports.append(int(line.split()[1]))
    return ports


def stop_servers(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait(5)


async def timed(runs: int, once: Callable[[], Awaitable[float]]) -> list[float]:
    return [await once() for _ in range(runs)]


class Remembered:
    """How many connects of the timed runs used a remembered protocol, and which ones were remembered."""

    def __init__(self) -> None:
        self.connects = 0
        self.remembered = 0
        self.kinds: set[str] = set()

    def count(self, d: Dispatcher) -> None:
        for state in d.servers.values():
            self.connects += 1
            self.remembered += state.conn.remembered
        self.kinds |= {_kind(m) for m in d.protocols.values()}


def _kind(memory: KnownProtocol) -> str:
    if memory.era == "modern":
        return f"{memory.protocol_version}: stored DiscoverResult adopted, no handshake round trip"
    return f"{memory.protocol_version}: initialize without the server/discover probe"


def check_index(d: Dispatcher, names: list[str]) -> None:
    errors = {n: s.error for n, s in d.servers.items() if s.error}
    assert not errors, f"discovery errors: {errors}"
    servers = {e.server for e in d.tools}
    assert servers == set(names), f"index holds servers {sorted(servers)}, expected {sorted(names)}"
    assert len(d.tools) == TOOLS_PER_SERVER * len(names), f"index holds {len(d.tools)} tools"


async def bench(
    base_url: str, ports: list[int], runs: int, legacy: bool
) -> tuple[dict[str, list[float]], dict[str, Remembered]]:
    async with bench_schema(base_url) as conninfo, bench_registry(conninfo) as registry:
        cfgs = [
            await registry.add_server(
                ServerConfig(name=f"s{i}", transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp")
            )
            for i, port in enumerate(ports)
        ]
        names = [c.name for c in cfgs]
        reg = registry
        closes: list[float] = []
        memory = {"warm-up": Remembered(), "one": Remembered(), "concurrent": Remembered(), "afresh": Remembered()}

        async def one() -> float:
            d = Dispatcher(reg)
            try:
                t0 = time.perf_counter()
                # The server list read from the registry, as every session start reads it (and as the concurrent
                # start does), then the first server alone: the two differ in the servers started, nothing else.
                listed = await reg.list_servers(enabled_only=True)
                await d.start(wait=True, servers=[c for c in listed if c.name == names[0]])
                elapsed = time.perf_counter() - t0
                check_index(d, names[:1])
                memory["one"].count(d)
            finally:
                await d.aclose()
            return elapsed * 1000

        async def sequential() -> float:
            d = Dispatcher(reg)
            try:
                t0 = time.perf_counter()
                await d.start(wait=True, servers=[])
                for cfg in cfgs:
                    error = await d.add_server(cfg)
                    assert error is None, error
                elapsed = time.perf_counter() - t0
                check_index(d, names)
            finally:
                await d.aclose()
            return elapsed * 1000

        async def concurrent(afresh: bool = False, counted: str = "concurrent") -> float:
            d = Dispatcher(reg)
            try:
                t0 = time.perf_counter()
                # protocols={}: the remembered protocols withheld, as for servers met for the first time.
                await d.start(wait=True, protocols={} if afresh else None)
                elapsed = time.perf_counter() - t0
                check_index(d, names)
                memory["afresh" if afresh else counted].count(d)
            finally:
                await d.aclose()
            return elapsed * 1000

        async def warm() -> float:
            d = Dispatcher(reg)
            try:
                t0 = time.perf_counter()
                await d.start(wait=False)
                elapsed = time.perf_counter() - t0
                check_index(d, names)
                assert all(s.from_cache for s in d.servers.values()), "index not served from the tool cache"
            finally:
                t1 = time.perf_counter()
                await d.aclose()
                closes.append((time.perf_counter() - t1) * 1000)
            return elapsed * 1000

        # Warm-up, untimed: first connections, imports; the tool cache and the protocols stored (its aclose waits
        # for those writes).
        await concurrent(counted="warm-up")
        # What agent.py's prewarm does in each job process: all loaded so far is never collected, so the
        # collector's full passes (90 ms each here, one in four starts) do not walk it.
        gc.collect()
        gc.freeze()
        urls = [c.url for c in cfgs if c.url]

        tls = ssl.create_default_context()
        mode = "legacy" if legacy else "2026-07-28"

        async def sdk_listed(url: str, best: bool) -> float:
            """Seconds until the bare SDK has connected and listed the tools (its close not counted)."""
            t0 = time.perf_counter()
            async with contextlib.AsyncExitStack() as stack:
                if best:
                    http = await stack.enter_async_context(httpx2.AsyncClient(verify=tls))
                    client = Client(streamable_http_client(url, http_client=http), mode=mode)
                else:
                    client = Client(url)
                await stack.enter_async_context(client)
                tools = await client.list_tools()
                elapsed = time.perf_counter() - t0
            assert len(tools.tools) == TOOLS_PER_SERVER
            return elapsed

        async def sdk_one(best: bool = True) -> float:
            return await sdk_listed(urls[0], best) * 1000

        async def sdk_concurrent(best: bool = True) -> float:
            return max(await asyncio.gather(*(sdk_listed(u, best) for u in urls))) * 1000

        await sdk_concurrent()  # warm-up
        # One server and all of them, ours and the SDK's, in turn: the figures of both ratios see the same machine.
        alone: list[float] = []
        together: list[float] = []
        sdk_alone: list[float] = []
        sdk_together: list[float] = []
        for _ in range(runs):
            alone.append(await one())
            together.append(await concurrent())
            sdk_alone.append(await sdk_one())
            sdk_together.append(await sdk_concurrent())
        results = {
            "one server (baseline)": alone,
            f"sequential x{len(cfgs)}": await timed(runs, sequential),
            f"concurrent x{len(cfgs)}": together,
            "warm cache (wait=False)": await timed(runs, warm),
            "  aclose after warm start": closes,
            f"concurrent x{len(cfgs)}, afresh": await timed(runs, lambda: concurrent(afresh=True)),
            "bare SDK as documented, one": await timed(runs, lambda: sdk_one(best=False)),
            f"bare SDK as documented, x{len(cfgs)}": await timed(runs, lambda: sdk_concurrent(best=False)),
            "bare SDK at its best, one": sdk_alone,
            f"bare SDK at its best, x{len(cfgs)}": sdk_together,
        }
        return results, memory


async def run(ports: list[int], runs: int, legacy: bool) -> tuple[dict[str, list[float]], dict[str, Remembered]]:
    async with bench_database() as url:
        return await bench(url, ports, runs, legacy)


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10, method="inclusive")[-1] if len(xs) > 1 else xs[0]


def report(
    results: dict[str, list[float]], memory: dict[str, Remembered], n: int, delay_ms: int, runs: int, ttl_ms: int
) -> None:
    reuse = f"their answer reusable for {ttl_ms} ms (ttlMs)" if ttl_ms else "no ttlMs (asked at every start)"
    print(f"\n{n} servers, tools/list delay {delay_ms} ms, {reuse}, {runs} runs per mode\n")
    print(f"{'mode':<30}{'median ms':>11}{'p90 ms':>10}{'min ms':>10}{'max ms':>10}")
    for mode, xs in results.items():
        print(f"{mode:<30}{statistics.median(xs):>11.1f}{p90(xs):>10.1f}{min(xs):>10.1f}{max(xs):>10.1f}")
    one, seq, conc, warm = (statistics.median(xs) for xs in list(results.values())[:4])
    sdk_one, sdk_conc = (statistics.median(xs) for xs in list(results.values())[-2:])
    steady = [memory["one"], memory["concurrent"]]
    connects, remembered = sum(m.connects for m in steady), sum(m.remembered for m in steady)
    kinds = "; ".join(sorted(set().union(*(m.kinds for m in steady)))) or "nothing remembered"
    print(
        f"\nprotocol remembered: {'yes' if connects and remembered == connects else 'NO'} "
        f"({remembered} of {connects} connects in the one-server and concurrent runs; {kinds}); "
        f"afresh: {memory['afresh'].remembered} of {memory['afresh'].connects}"
    )
    checks = [
        (f"sequential / concurrent = {seq / conc:.1f}x", f"informational (ideal ~{n}x)", None),
        (f"concurrent / one server = {conc / one:.2f}x", "expected <= 1.5x", conc / one <= 1.5),
        (f"bare SDK at its best: {sdk_conc / sdk_one:.2f}x", "the bound on this machine", None),
        (f"ours / SDK's best, concurrent = {conc / sdk_conc:.2f}x", "informational", None),
        (f"warm cache median = {warm:.1f} ms", "expected <= 50 ms", warm <= 50),
    ]
    print()
    for what, expected, ok in checks:
        verdict = "" if ok is None else ("MET" if ok else "NOT MET")
        print(f"{what:<42}{expected:<30}{verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=20)
    parser.add_argument("--delay-ms", type=int, default=100)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--legacy", action="store_true", help="servers that refuse server/discover (2025-11-25)")
    parser.add_argument(
        "--tools-ttl-ms",
        type=int,
        default=0,
        help="the servers let clients reuse their tools/list answer this long (default 0, the SDK's: asked each time)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mcp_integration").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")  # pgserver via platformdirs
    procs: list[subprocess.Popen[str]] = []
    try:
        ports = start_servers(args.servers, args.delay_ms, procs, legacy=args.legacy, tools_ttl_ms=args.tools_ttl_ms)
        results, memory = asyncio.run(run(ports, args.runs, args.legacy))
    finally:
        stop_servers(procs)
    report(results, memory, args.servers, args.delay_ms, args.runs, args.tools_ttl_ms)


if __name__ == "__main__":
    main()
