"""Load benchmark: 200 concurrent calls, mixed sync / task / receipt tools, through one Dispatcher.

    python bench/load.py [--calls 200] [--rounds 2] [--sync-rounds 21] [--sync-s 1.0] [--job-s 2.0] [--quick]

One process (this one), one Dispatcher over a real registry in Postgres (a fresh schema, dropped at the end),
nine real MCP servers:
  sync     demo_server.py `slow(seconds, steps=1)`: 3 over Streamable HTTP, 1 over SSE, 1 over stdio
  task     task_server_2025.py `long_report` (status pushed) and task_server_2026.py `report` (polled)
  receipt  generic_receipt_server.py `submit_report` and n8n_like_server.py `start_workflow` (both polled)
The calls are split 60 % sync, 20 % task, 20 % receipt, round-robin over the servers of each kind, and all
started at once; ours are waited on as the voice layer waits (`Job.wait(release_after=...)`). Overhead = our
end-to-end latency of a call minus the server's own latency (the sync tool's sleep, a job's configured
duration). For tasks and receipts it includes noticing the end: within one poll interval (--poll-ms, both the
rows' poll_interval and the 2026 server's pollInterval) when polled, at once when pushed; from round 2 on,
learned timing places the first poll near the durations seen in round 1. For the servers that tell when each
job really ended (`GET /_finished`), the part of the overhead after that end (noticing it) is shown too.

Baseline, in the same run: the same sync calls made with the bare MCP SDK (`mcp.Client`, one session per
server, the same progress token), interleaved with the same sync-only load through our Dispatcher, and through
a second Dispatcher without a registry (closed before the mixed load; it records nothing in mcp_jobs, so the
gap between the two is what the job records cost). Then --rounds identical mixed rounds (at least 2), with our
open file descriptors, sockets, TCP connections (to the MCP servers, to Postgres), RSS, asyncio tasks, jobs held
and child processes (zombies) before and after each, to show that nothing grows. The Dispatcher keeps the last
--keep-jobs jobs in memory (default --calls, so that history is full before the first mixed round and RSS
between rounds shows growth, not the history filling up). Each round also reports where the time went: our
CPU, the servers' and PostgreSQL's per call (the last is what writing the job records costs the database), how
busy the machine was, and our event loop's lag (this benchmark shares the machine with its servers and
Postgres; on a saturated machine latency is mostly queueing for a CPU), and the sync rounds: by transport, the
time to the server's first progress notification and from it to the answer (the way there told apart from the
way back), the statements our job records took (flushes), the liveness probes ours sent (requests the bare SDK
never makes, counted per 100 calls) and the TCP connections each side opened to the HTTP servers (counted by
the kernel, per 100 calls). Every
round starts from a full garbage collection, not measured, so none inherits another's; what the warm-up loaded is
frozen out of the collector first, as agent.py's prewarm does in each job process. The report ends with the
two figures the job records are held to: per-call CPU and p50 overhead of ours (with rows) / the bare SDK, each
the median of its ratios over the interleaved pairs of sync-only rounds (this shared machine drifts between pairs;
two of them a second apart differ by up to 1.5x, so 21 pairs by default: a median of seven moved by 0.15 from run
to run).
Exits non-zero on any failed call or any zombie. --quick: 0.3 s sleeps, 0.6 s jobs, 3 sync-only rounds.
--profile sync|mixed: cProfile our first such round (stderr). Uses DATABASE_URL if set, else an embedded
PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402
from _common import SERVERS, bench_database, bench_registry, bench_schema, profiled, spawn, stop  # noqa: E402
from mcp import Client  # noqa: E402
from mcp.client.sse import sse_client  # noqa: E402
from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: E402
from psycopg.conninfo import conninfo_to_dict  # noqa: E402

from mcp_integration.dispatcher import Dispatcher  # noqa: E402
from mcp_integration.errors import ToolCallError  # noqa: E402
from mcp_integration.jobs import Job  # noqa: E402
from mcp_integration.registry import ServerConfig  # noqa: E402

MAX_CALLS_PER_SERVER = 64  # the Dispatcher's default, passed explicitly so the queueing note stays true
SHARES = (("sync", 0.6), ("task", 0.2), ("receipt", 0.2))
# Monotonic event times to wall time (the test servers report finish times as time.time()): one offset.
WALL_OFFSET = time.time() - time.monotonic()


@dataclass(frozen=True)
class Target:
    """One server row and the tool the load calls on it."""

    cfg: ServerConfig
    kind: str  # sync | task | receipt
    tool: str
    label: str
    arguments: Callable[[int], dict[str, Any]]
    own_s: float  # the server's own latency for one call
    finished_url: str | None = None  # the test server's `GET /_finished`: when each job really ended there


@dataclass(frozen=True)
class Sample:
    target: Target
    latency_s: float
    started: float
    ended: float
    error: str | None
    polls: int = 0
    key: str | None = None  # the task id or receipt id, to look the job up in the server's finish times
    done_wall: float | None = None  # time.time() of our job's `done` event
    # s from the call's start to the server's first progress notification (sync calls): the part of the latency
    # on the way to the server and through its first steps, told apart from the part after
    first_word_s: float | None = None

    @property
    def overhead_ms(self) -> float:
        return (self.latency_s - self.target.own_s) * 1000


@dataclass
class Round:
    name: str
    samples: list[Sample] = field(default_factory=list)
    cpu_s: float = 0.0  # this process's CPU time (user + sys) over the round
    servers_cpu_s: float = 0.0  # the MCP servers' (our child processes')
    db_cpu_s: float = 0.0  # PostgreSQL's (every postgres process on the machine), writing the job records
    busy: float = 0.0  # the whole machine's CPU use over the round, 0..1 of all cores
    settle_s: float = 0.0  # from the last answer until every job's final state was written to mcp_jobs
    lag_ms: list[float] = field(default_factory=list)  # how late a 10 ms sleep of our event loop woke
    gc_ms: list[float] = field(default_factory=list)  # pauses of the garbage collector's full collections
    probes: int = 0  # liveness probes our connections sent during the round (the bare SDK sends none)
    opened: int = 0  # TCP connections this process opened to the MCP servers during the round (sync rounds)
    flushes: int = 0  # statements the job queue sent for the round's records (ours, with a registry)
    job_ids: list[uuid.UUID] = field(default_factory=list)
    # By target label: ms from the server's own finish of a job to our job's `done` (noticing the end).
    detect_ms: dict[str, list[float]] = field(default_factory=dict)

    @property
    def errors(self) -> list[str]:
        return [f"{s.target.cfg.name}: {s.error}" for s in self.samples if s.error is not None]

    @property
    def wall_s(self) -> float:
        return max(s.ended for s in self.samples) - min(s.started for s in self.samples)


@dataclass(frozen=True)
class Snapshot:
    label: str
    fds: int
    tcp_mcp: int  # established TCP connections to anything but Postgres (the MCP servers)
    tcp_db: int
    sockets: int  # every socket fd: the TCP ones above, plus any not (or no longer) established
    pipes: int
    rss_mb: float
    tasks: int
    children: int  # beyond the test servers this script started (stdio servers)
    zombies: int
    jobs_held: int  # jobs the Dispatcher still holds in memory (it keeps the last keep_jobs)


# -- servers --------------------------------------------------------------------------------------------------


def start_servers(args: argparse.Namespace, procs: list[subprocess.Popen[str]]) -> list[Target]:
    job_ms = str(int(args.job_s * 1000))
    poll = ["--poll-interval-ms", str(args.poll_ms)]

    def sleep(i: int) -> dict[str, Any]:
        return {"seconds": args.sync_s, "steps": 1}

    def work(i: int) -> dict[str, Any]:
        return {"seconds": args.job_s}

    def report(i: int) -> dict[str, Any]:
        return {"topic": f"t{i}", "seconds": args.job_s}

    def workflow(i: int) -> dict[str, Any]:
        return {"topic": f"t{i}"}  # the n8n look-alike's executions all last its --finish-after-ms

    def finished(port: int) -> str:
        return f"http://127.0.0.1:{port}/_finished"

    def http(name: str, port: int, path: str = "/mcp", transport: str = "streamable-http", **kw: Any) -> ServerConfig:
        return ServerConfig(name=name, transport=transport, url=f"http://127.0.0.1:{port}{path}", **kw)

    targets: list[Target] = []
    for i in range(3):
        port = spawn("demo_server.py", ["--transport", "streamable-http", "--name", f"http{i}"], procs)
        targets.append(Target(http(f"demo-http{i}", port), "sync", "slow", "sync http", sleep, args.sync_s))
    port = spawn("demo_server.py", ["--transport", "sse", "--name", "sse"], procs)
    targets.append(Target(http("demo-sse", port, "/sse", "sse"), "sync", "slow", "sync sse", sleep, args.sync_s))
    demo = [str(SERVERS / "demo_server.py"), "--transport", "stdio", "--name", "stdio"]
    cfg = ServerConfig(name="demo-stdio", transport="stdio", command=sys.executable, args=demo)
    targets.append(Target(cfg, "sync", "slow", "sync stdio", sleep, args.sync_s))

    port = spawn("task_server_2025.py", ["--transport", "streamable-http", *poll, "--step-ms", "250"], procs)
    cfg = http("tasks-2025", port, poll_interval=args.poll_ms)
    targets.append(Target(cfg, "task", "long_report", "task 2025 push", work, args.job_s, finished(port)))
    # fastmcp-tasks runs 10 tasks at a time by default: the load would queue on the server, not with us.
    unqueued = {"FASTMCP_DOCKET_CONCURRENCY": str(max(10, args.calls))}
    port = spawn("task_server_2026.py", ["--transport", "streamable-http", *poll], procs, unqueued)
    cfg = http("tasks-2026", port, poll_interval=args.poll_ms)
    targets.append(Target(cfg, "task", "report", "task 2026 poll", work, args.job_s, finished(port)))

    port = spawn("generic_receipt_server.py", ["--finish-after-ms", job_ms], procs)
    cfg = http("receipts", port, poll_interval=args.poll_ms)
    targets.append(Target(cfg, "receipt", "submit_report", "receipt generic", report, args.job_s, finished(port)))
    port = spawn("n8n_like_server.py", ["--finish-after-ms", job_ms], procs)
    cfg = http("n8n", port, "/mcp/reports", "sse", poll_interval=args.poll_ms, poll_profile="n8n")
    targets.append(Target(cfg, "receipt", "start_workflow", "receipt n8n", workflow, args.job_s))
    return targets


def plan(targets: list[Target], calls: int, kinds: tuple[str, ...]) -> list[Target]:
    """One target per call: the calls split by SHARES over `kinds`, round-robin over each kind's servers."""
    shares = [(k, s) for k, s in SHARES if k in kinds]
    total = sum(s for _, s in shares)
    out: list[Target] = []
    for n, (kind, share) in enumerate(shares):
        count = calls - len(out) if n == len(shares) - 1 else round(calls * share / total)
        pool = [t for t in targets if t.kind == kind]
        out += [pool[i % len(pool)] for i in range(count)]
    return out


# -- measuring ourselves --------------------------------------------------------------------------------------


def snapshot(label: str, db_port: int, started_pids: set[int], jobs_held: int) -> Snapshot:
    gc.collect()
    me = psutil.Process()
    fds = os.listdir("/proc/self/fd")
    kinds: Counter[str] = Counter()
    for fd in fds:
        with contextlib.suppress(OSError):
            kinds[os.readlink(f"/proc/self/fd/{fd}").split(":")[0]] += 1
    tcp = [c for c in me.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED and c.raddr]
    db = sum(c.raddr.port == db_port for c in tcp)
    kids = me.children(recursive=True)
    zombies = 0
    for kid in kids:
        with contextlib.suppress(psutil.NoSuchProcess):
            zombies += kid.status() == psutil.STATUS_ZOMBIE
    ours = [k for k in kids if k.pid not in started_pids]
    return Snapshot(
        label=label,
        fds=len(fds),
        tcp_mcp=len(tcp) - db,
        tcp_db=db,
        sockets=kinds["socket"],
        pipes=kinds["pipe"],
        rss_mb=me.memory_info().rss / 2**20,
        tasks=len(asyncio.all_tasks()),
        children=len(ours),
        zombies=zombies,
        jobs_held=jobs_held,
    )


# -- one round ------------------------------------------------------------------------------------------------


async def call_ours(d: Dispatcher, target: Target, i: int, jobs: list[Job]) -> Sample:
    started, started_mono = time.perf_counter(), time.monotonic()
    error: str | None = None
    job: Job | None = None
    try:
        job = d.submit(target.tool, target.arguments(i), server=target.cfg.name)
        jobs.append(job)
        # As the voice layer waits: the idle timeout (35 s), its cap, and a release point.
        await job.wait(release_after=target.own_s + 60)
    except ToolCallError as exc:
        error = str(exc)
    ended = time.perf_counter()
    if job is None:
        return Sample(target, ended - started, started, ended, error)
    key = job.task_id or (job.receipt or {}).get("job_id")
    done = next((e.at for e in job.events if e.kind == "done"), None)
    done_wall = None if done is None else done + WALL_OFFSET
    word = next((e.at - started_mono for e in job.events if e.kind == "progress"), None)
    return Sample(target, ended - started, started, ended, error, job.polls, key, done_wall, word)


async def call_sdk(client: Client, target: Target, i: int) -> Sample:
    heard: list[float] = []

    async def progress(progress: float, total: float | None, message: str | None) -> None:
        # The same progress token ours sends, so the server sends the same notification; its arrival is timed
        # as ours is (the job's progress event).
        heard.append(time.monotonic())

    started, started_mono = time.perf_counter(), time.monotonic()
    error: str | None = None
    try:
        result = await client.call_tool(target.tool, target.arguments(i), progress_callback=progress)
        if result.is_error:
            error = f"tool error: {result.content}"
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    ended = time.perf_counter()
    word = heard[0] - started_mono if heard else None
    return Sample(target, ended - started, started, ended, error, first_word_s=word)


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def db_cpu_s() -> float:
    """CPU time of every PostgreSQL process on the machine (its backends, WAL writer, checkpointer): where the job
    records' statements run. Read outside the metered part: walking the process table takes our CPU."""
    total = 0.0
    for proc in psutil.process_iter(["name", "cpu_times"]):
        if proc.info["name"] == "postgres" and proc.info["cpu_times"] is not None:
            total += proc.info["cpu_times"].user + proc.info["cpu_times"].system
    return total


def children_cpu_s() -> float:
    total = 0.0
    for kid in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            times = kid.cpu_times()
            total += times.user + times.system
    return total


async def probe_lag(lags: list[float], period: float = 0.01) -> None:
    while True:
        t = time.perf_counter()
        await asyncio.sleep(period)
        lags.append((time.perf_counter() - t - period) * 1000)


@contextlib.asynccontextmanager
async def metered(into: Round) -> AsyncIterator[None]:
    """Where the time went: our CPU, the servers' CPU, how busy the whole machine was (a saturated one queues
    everything), and our event loop's lag (a busy loop delays every call it carries)."""
    # Each round starts from a full collection, not measured. Otherwise the process's next full collection (60-90
    # ms here, a cost set by all this process holds: SDK clients, both dispatchers, the samples) lands in whichever
    # round sits at the same place of each interleaved cycle: it was always "ours (Dispatcher)", and swapping the
    # order moved it, with 100 ms of p50, to the dispatcher without rows.
    gc.collect()
    d0 = db_cpu_s()
    c0, k0, m0 = cpu_s(), children_cpu_s(), psutil.cpu_times()
    probe = asyncio.create_task(probe_lag(into.lag_ms))
    gc_started = 0.0

    def on_gc(phase: str, info: dict[str, int]) -> None:
        nonlocal gc_started
        if info["generation"] == 2:
            if phase == "start":
                gc_started = time.perf_counter()
            else:
                into.gc_ms.append((time.perf_counter() - gc_started) * 1000)

    gc.callbacks.append(on_gc)
    try:
        yield
    finally:
        gc.callbacks.remove(on_gc)
        probe.cancel()
        await asyncio.gather(probe, return_exceptions=True)
    m1 = psutil.cpu_times()
    into.cpu_s, into.servers_cpu_s = cpu_s() - c0, children_cpu_s() - k0
    into.db_cpu_s = db_cpu_s() - d0
    total = sum(m1) - sum(m0)
    idle = (m1.idle + m1.iowait) - (m0.idle + m0.iowait)
    into.busy = 1 - idle / total if total > 0 else 0.0


def sockets_to(ports: set[int]) -> set[int]:
    """The local ports of this machine's TCP sockets toward these servers, open or closed within the last minute
    (TIME_WAIT): those new after a round are the connections opened during it. Counted by the kernel, outside
    the metered part (reading the socket table takes a few ms)."""
    return {c.laddr.port for c in psutil.net_connections("tcp") if c.raddr and c.raddr.port in ports}


def http_ports(calls: list[Target]) -> set[int]:
    return {int(p) for t in calls if t.cfg.url and (p := urlsplit(t.cfg.url).port)}


def probes_sent(d: Dispatcher) -> int:
    """Liveness probes the dispatcher's connections have sent so far."""
    return sum(s.conn.probes for s in d.servers.values())


async def round_ours(name: str, d: Dispatcher, calls: list[Target], profile: bool = False) -> Round:
    jobs: list[Job] = []
    out = Round(name)
    probes, ports = probes_sent(d), http_ports(calls)
    flushes = d.registry.job_queue.stats.flushes if d.registry is not None else 0
    before = sockets_to(ports)
    with profiled(profile, name):
        async with metered(out):
            out.samples = list(await asyncio.gather(*(call_ours(d, t, i, jobs) for i, t in enumerate(calls))))
        out.probes = probes_sent(d) - probes
        out.opened = len(sockets_to(ports) - before)
        # Each job's final write to mcp_jobs comes after its answer: let it land before anything is counted, and
        # count its CPU (but not its wait: a slow or restarting database would make the machine look idle).
        # One wait for the queue, not a `Job.settled()` per job: nothing in the product waits for its rows, and
        # a waiter per call would be this benchmark's cost, counted as the records'.
        d0 = db_cpu_s()
        c0, t0 = cpu_s(), time.perf_counter()
        if d.registry is not None:
            await asyncio.wait_for(d.registry.jobs_flushed(), 60)
        out.cpu_s += cpu_s() - c0
        out.db_cpu_s += db_cpu_s() - d0
        out.settle_s = time.perf_counter() - t0
        if d.registry is not None:
            out.flushes = d.registry.job_queue.stats.flushes - flushes
    out.job_ids = [j.id for j in jobs]
    await detection(out)
    return out


async def detection(r: Round) -> None:
    """How long after the server finished each job did we notice (from the test servers' `/_finished`)."""
    urls = {s.target.finished_url for s in r.samples if s.target.finished_url}
    async with httpx.AsyncClient(timeout=10) as http:
        finished: dict[str, float] = {}
        for url in sorted(u for u in urls if u):
            finished |= (await http.get(url)).json()
    for s in r.samples:
        if s.key is not None and s.key in finished and s.done_wall is not None and s.error is None:
            r.detect_ms.setdefault(s.target.label, []).append((s.done_wall - finished[s.key]) * 1000)


async def round_sdk(name: str, clients: dict[str, Client], calls: list[Target]) -> Round:
    out = Round(name)
    ports = http_ports(calls)
    before = sockets_to(ports)
    async with metered(out):
        out.samples = list(await asyncio.gather(*(call_sdk(clients[t.cfg.name], t, i) for i, t in enumerate(calls))))
    out.opened = len(sockets_to(ports) - before)
    return out


@contextlib.asynccontextmanager
async def sdk_clients(targets: list[Target]) -> AsyncIterator[dict[str, Client]]:
    """One bare SDK session per sync server, as a plain application would hold them."""
    async with contextlib.AsyncExitStack() as stack:
        clients: dict[str, Client] = {}
        for t in targets:
            cfg = t.cfg
            assert cfg.url is not None or cfg.command is not None
            if cfg.transport == "stdio":
                assert cfg.command is not None
                params = StdioServerParameters(command=cfg.command, args=list(cfg.args))
                server: Any = stdio_client(params, errlog=sys.stderr)
            elif cfg.transport == "sse":
                server = sse_client(cfg.url or "")
            else:
                server = cfg.url
            clients[cfg.name] = await stack.enter_async_context(Client(server))
            await clients[cfg.name].list_tools()
        yield clients


# -- the run --------------------------------------------------------------------------------------------------


@dataclass
class Results:
    sdk: list[Round] = field(default_factory=list)
    sync: list[Round] = field(default_factory=list)
    unrecorded: list[Round] = field(default_factory=list)  # ours without a registry
    mixed: list[Round] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)
    queued: dict[str, int] = field(default_factory=dict)
    keep_jobs: int = 0
    loadavg: list[float] = field(default_factory=list)


async def bench(base_url: str, args: argparse.Namespace, targets: list[Target], pids: set[int]) -> Results:
    res = Results(keep_jobs=args.keep_jobs)
    db_port = int(conninfo_to_dict(base_url).get("port") or 5432)
    d: Dispatcher | None = None
    submitted: list[uuid.UUID] = []

    def snap(label: str) -> None:
        held = sum(d.job(i) is not None for i in submitted) if d is not None else 0
        res.snapshots.append(snapshot(label, db_port, pids, held))

    async def ours(name: str, calls: list[Target], profile: bool = False) -> Round:
        assert d is not None
        out = await round_ours(name, d, calls, profile)
        submitted.extend(out.job_ids)
        return out

    res.loadavg.append(os.getloadavg()[0])
    snap("idle: servers up, nothing connected")
    sync_targets = [t for t in targets if t.kind == "sync"]
    sync_calls = plan(targets, round(args.calls * SHARES[0][1]), ("sync",))
    mixed_calls = plan(targets, args.calls, ("sync", "task", "receipt"))
    per_server = Counter(t.cfg.name for t in mixed_calls if t.kind == "sync")
    res.queued = {n: c - MAX_CALLS_PER_SERVER for n, c in per_server.items() if c > MAX_CALLS_PER_SERVER}
    async with bench_schema(base_url) as conninfo, bench_registry(conninfo) as registry:
        try:
            for t in targets:
                await registry.add_server(t.cfg)
            async with sdk_clients(sync_targets) as clients:
                await round_sdk("warm-up", clients, sync_targets)
                d = Dispatcher(
                    registry, connect_timeout=15, max_calls_per_server=MAX_CALLS_PER_SERVER, keep_jobs=args.keep_jobs
                )
                await d.start(wait=True)
                failed = {n: s.error for n, s in d.servers.items() if s.error}
                if failed:
                    raise RuntimeError(f"discovery failed: {failed}")
                warm = await ours("warm-up", targets)
                if warm.errors:
                    raise RuntimeError(f"warm-up calls failed: {warm.errors[:3]}")
                # Attribution only, closed before the mixed load: the same layer without a registry, so no job is
                # recorded in mcp_jobs; the gap to `ours` is what the records cost.
                unrecorded = Dispatcher(None, connect_timeout=15, max_calls_per_server=MAX_CALLS_PER_SERVER)
                try:
                    await unrecorded.start(wait=True, servers=[t.cfg for t in sync_targets])
                    await round_ours("warm-up", unrecorded, sync_targets)
                    # What agent.py's prewarm does in each job process: all loaded and connected so far is never
                    # collected, so the collector's passes during the rounds do not walk it.
                    gc.collect()
                    gc.freeze()
                    # Interleaved, so that all see the same machine, and in an order that turns from cycle to cycle
                    # (SDK, ours, unrecorded; ours, unrecorded, SDK; ...), so that none always runs right after
                    # another: whatever a round leaves behind (in the servers, in PostgreSQL) falls on each alike.
                    for r in range(args.sync_rounds):

                        async def sdk_round(r: int = r) -> None:
                            res.sdk.append(await round_sdk(f"sdk {r + 1}", clients, sync_calls))

                        async def ours_round(r: int = r) -> None:
                            profile = args.profile == "sync" and r == 0
                            res.sync.append(await ours(f"sync {r + 1}", sync_calls, profile))

                        async def unrecorded_round(r: int = r) -> None:
                            res.unrecorded.append(await round_ours(f"unrecorded {r + 1}", unrecorded, sync_calls))

                        cycle = [sdk_round, ours_round, unrecorded_round]
                        for run_round in cycle[r % 3 :] + cycle[: r % 3]:
                            await run_round()
                        print(f"  sync round {r + 1} done", file=sys.stderr, flush=True)
                finally:
                    await unrecorded.aclose()
            await asyncio.sleep(0.5)  # connections the SDK clients closed: let the kernel tear them down
            snap("ours connected, warmed; before the mixed load")
            for r in range(args.rounds):
                res.mixed.append(await ours(f"mixed {r + 1}", mixed_calls, args.profile == "mixed" and r == 0))
                await asyncio.sleep(0.5)
                snap(f"after mixed round {r + 1}")
                print(f"  mixed round {r + 1} done", file=sys.stderr, flush=True)
            await d.aclose()
            d = None
            await registry.close()
            await asyncio.sleep(0.5)
            snap("after Dispatcher.aclose(), Registry.close()")
            res.loadavg.append(os.getloadavg()[0])
            return res
        finally:
            if d is not None:
                await d.aclose()


async def run(args: argparse.Namespace, targets: list[Target], pids: set[int]) -> Results:
    async with bench_database() as url:
        return await bench(url, args, targets, pids)


# -- the report -----------------------------------------------------------------------------------------------


def pct(xs: list[float], q: int) -> float:
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def overheads(rounds: list[Round], pick: Callable[[Sample], bool] = lambda s: True) -> list[float]:
    return [s.overhead_ms for r in rounds for s in r.samples if s.error is None and pick(s)]


def there_and_back(rounds: list[Round], label: str) -> str:
    """p50 ms to the server's first progress notification + p50 ms from it to the answer, for one target label."""
    words = [
        (s.first_word_s, s.latency_s)
        for r in rounds
        for s in r.samples
        if s.target.label == label and s.first_word_s is not None
    ]
    if not words:  # a server that sent no progress notification
        return "n/a"
    there = statistics.median(word for word, _ in words)
    back = statistics.median(latency - word for word, latency in words)
    return f"{there * 1000:.0f} + {back * 1000:.0f}"


def spread(xs: list[float]) -> str:
    """p50 / p95 / max, in ms."""
    return f"{statistics.median(xs):>8.0f}{pct(xs, 95):>8.0f}{max(xs):>8.0f}" if xs else f"{'(none ok)':>24}"


def paired(ours: list[Round], base: list[Round], measure: Callable[[Round], float]) -> list[float]:
    """measure(ours) / measure(base) for each interleaved pair of rounds."""
    return [measure(o) / measure(b) for o, b in zip(ours, base, strict=True)]


def cpu_ms(rounds: list[Round]) -> float:
    """This process's CPU ms per call, the median over rounds (the `us ms` column)."""
    return statistics.median(r.cpu_s / len(r.samples) * 1000 for r in rounds)


def costs(rounds: list[Round]) -> str:
    """Where the time went, medians over rounds: our CPU and the servers' per call, machine busy, loop lag."""
    per_call = [(r.cpu_s, r.servers_cpu_s, r.busy, len(r.samples)) for r in rounds]
    ours = cpu_ms(rounds)
    servers = statistics.median(k / n * 1000 for _, k, _, n in per_call)
    db = statistics.median(r.db_cpu_s / len(r.samples) * 1000 for r in rounds)
    busy = statistics.median(b for _, _, b, _ in per_call) * 100
    lag = [x for r in rounds for x in r.lag_ms]
    pauses = [x for r in rounds for x in r.gc_ms]
    gc_max = f"{max(pauses):.0f}" if pauses else "-"
    return (
        f"{ours:>9.2f}{servers:>9.2f}{db:>7.2f}{busy:>7.0f}{pct(lag, 95):>8.1f}{max(lag):>8.1f}{len(pauses):>5}"
        f"{gc_max:>6}"
    )


COSTS = f"{'us ms':>9}{'srv ms':>9}{'db ms':>7}{'busy%':>7}{'lag95':>8}{'lagmax':>8}{'gc2':>5}{'max':>6}"


def report(res: Results, args: argparse.Namespace, targets: list[Target]) -> int:
    n_sync = round(args.calls * SHARES[0][1])
    print(f"\nservers: {', '.join(f'{t.cfg.name} ({t.cfg.transport}, {t.kind})' for t in targets)}")
    print(f"the sync tool sleeps {args.sync_s:g} s; task and receipt jobs last {args.job_s:g} s; polled servers are")
    print(f"polled every {args.poll_ms} ms at most; keep_jobs = {res.keep_jobs}; max_calls_per_server = ", end="")
    if res.queued:
        print(f"{MAX_CALLS_PER_SERVER}: calls queued beyond it: {res.queued}")
    else:
        print(f"{MAX_CALLS_PER_SERVER}, and no server gets more calls than that: none queue in the Dispatcher")
    load = ", ".join(f"{x:.1f}" for x in res.loadavg)
    print(f"machine: {os.cpu_count()} CPUs, shared by this process, the {len(targets)} servers and Postgres; load")
    print(f"average (1 min) at the start and at the end: {load} (above the CPU count, other work competed)")
    print("cost columns: us/srv/db ms = CPU ms per call of this process / of the MCP servers / of PostgreSQL;")
    print("busy% = whole machine;", end=" ")
    print("lag95/lagmax = how late (ms) a 10 ms sleep on our event loop woke, p95 and max; gc2/max = the garbage")
    print("collector's full collections during the rounds and the longest pause (ms)")

    print(f"\n1. Sync only: {n_sync} calls at once over 5 servers, {args.sync_rounds} round(s) each, interleaved")
    print("   overhead (ms) = end-to-end latency - the tool's sleep; figures pooled over the rounds")
    print(f"  {'':<22}{'calls':>6}{'p50':>8}{'p95':>8}{'max':>8}{'calls/s':>9}{COSTS}")
    rows = (
        ("bare SDK (baseline)", res.sdk),
        ("ours (Dispatcher)", res.sync),
        ("ours, no mcp_jobs rows", res.unrecorded),
    )
    for label, rounds in rows:
        rate = statistics.median(len(r.samples) / r.wall_s for r in rounds)
        xs = overheads(rounds)
        print(f"  {label:<22}{len(xs):>6}{spread(xs)}{rate:>9.1f}{costs(rounds)}")
    sdk, ours, bare = overheads(res.sdk), overheads(res.sync), overheads(res.unrecorded)
    if sdk and ours and bare:
        s50, o50 = statistics.median(sdk), statistics.median(ours)
        print(f"  {'ratio ours / SDK':<22}{'':>6}{o50 / s50:>8.2f}{pct(ours, 95) / pct(sdk, 95):>8.2f}")
        ratio50, ratio95 = statistics.median(bare) / s50, pct(bare, 95) / pct(sdk, 95)
        print(f"  {'ratio no rows / SDK':<22}{'':>6}{ratio50:>8.2f}{ratio95:>8.2f}")
        e2e_sdk = statistics.median(s.latency_s for r in res.sdk for s in r.samples)
        e2e_ours = statistics.median(s.latency_s for r in res.sync for s in r.samples)
        print(
            f"  p50 ours - SDK: {o50 - s50:+.0f} ms; end to end p50: SDK {e2e_sdk * 1000:.0f} ms, ours "
            f"{e2e_ours * 1000:.0f} ms, ratio {e2e_ours / e2e_sdk:.3f}"
        )
        by, halves = [], []
        for label in dict.fromkeys(t.label for t in targets if t.kind == "sync"):
            a = overheads(res.sdk, lambda s, lb=label: s.target.label == lb)
            b = overheads(res.sync, lambda s, lb=label: s.target.label == lb)
            short = label.removeprefix("sync ")
            by.append(f"{short} {statistics.median(a):.0f} -> {statistics.median(b):.0f}")
            halves.append(f"{short} {there_and_back(res.sdk, label)} -> {there_and_back(res.sync, label)}")
        print(f"  p50 overhead by transport, SDK -> ours: {'; '.join(by)}")
        print(
            "  p50 ms to the server's first progress notification + from it to the answer, by transport, SDK -> "
            f"ours: {'; '.join(halves)}"
        )
        flushes = statistics.median(r.flushes for r in res.sync)
        print(
            f"  job-record flushes per round (ours), median: {flushes:g} (one for the calls' first rows, the rest "
            "for their answers': each one statement)"
        )
        probes = [sum(r.probes for r in rs) / sum(len(r.samples) for r in rs) for rs in (res.sync, res.unrecorded)]
        print(
            f"  liveness probes per 100 calls (ours, no rows): {100 * probes[0]:.1f}, {100 * probes[1]:.1f}; "
            "the bare SDK sends none"
        )
        opened = [sum(r.opened for r in rs) / sum(len(r.samples) for r in rs) for rs in (res.sdk, res.sync)]
        print(
            f"  TCP connections opened to the HTTP servers per 100 calls: SDK {100 * opened[0]:.1f}, ours "
            f"{100 * opened[1]:.1f} (the SDK closes each answer's event stream early, losing its connection)"
        )

    print(
        f"\n2. Mixed: {args.calls} calls at once (60 % sync, 20 % task, 20 % receipt), {args.rounds} identical rounds"
    )
    print("   overhead (ms) = end-to-end latency - the server's own latency (the sleep, the job's duration)")
    kinds = ("sync", "task", "receipt")
    print(f"  {'round':<8}{'calls/s':>8}{'errors':>7}" + "".join(f"{k + ' p50':>13}{'p95':>6}" for k in kinds) + COSTS)
    for r in res.mixed:
        cells = ""
        for kind in kinds:
            xs = overheads([r], lambda s, k=kind: s.target.kind == k)
            cells += f"{statistics.median(xs):>13.0f}{pct(xs, 95):>6.0f}" if xs else f"{'-':>19}"
        print(f"  {r.name:<8}{len(r.samples) / r.wall_s:>8.1f}{len(r.errors):>7}{cells}{costs([r])}")
    for r in res.mixed:
        if r.settle_s > 1.0:
            late = f"{r.settle_s:.1f} s after the last answer (a slow or restarting database?)"
            print(f"  {r.name}: the last job records reached mcp_jobs {late}")
    print("  by server, p50 / p95 overhead ms (polls per job), each round:")
    for label in dict.fromkeys(t.label for t in targets):
        cells = []
        for r in res.mixed:
            xs = overheads([r], lambda s, lb=label: s.target.label == lb)
            polls = statistics.mean(s.polls for s in r.samples if s.target.label == label)
            cells.append(f"{statistics.median(xs):>6.0f} /{pct(xs, 95):>5.0f} ({polls:.1f})" if xs else "-")
        print(f"    {label:<18}" + "  ".join(cells))
    print("  of that, after the server had finished the job (noticing its end), p50 / p95 ms, each round:")
    for label in dict.fromkeys(t.label for t in targets if t.finished_url):
        lags = [r.detect_ms.get(label, []) for r in res.mixed]
        print(
            f"    {label:<18}"
            + "  ".join(f"{statistics.median(x):>6.0f} /{pct(x, 95):>5.0f}" if x else "-" for x in lags)
        )
    if sdk:
        ratios = [
            statistics.median(overheads([r], lambda s: s.target.kind == "sync")) / statistics.median(sdk)
            for r in res.mixed
        ]
        print(
            "  sync p50 overhead under the mixed load / bare SDK's under the sync-only load: "
            + ", ".join(f"{x:.2f}" for x in ratios)
        )

    print("\n3. This process (test servers started by this script not counted as children)")
    cols = ("fds", "sockets", "tcp mcp", "tcp db", "pipes", "RSS MB", "tasks", "jobs", "children", "zombies")
    print(f"  {'':<46}" + "".join(f"{c:>9}" for c in cols))
    for s in res.snapshots:
        vals = (
            s.fds,
            s.sockets,
            s.tcp_mcp,
            s.tcp_db,
            s.pipes,
            f"{s.rss_mb:.1f}",
            s.tasks,
            s.jobs_held,
            s.children,
            s.zombies,
        )
        print(f"  {s.label:<46}" + "".join(f"{v:>9}" for v in vals))

    errors = [e for r in (*res.sdk, *res.sync, *res.unrecorded, *res.mixed) for e in r.errors]
    zombies = max(s.zombies for s in res.snapshots)
    idle, closed = res.snapshots[0], res.snapshots[-1]
    after = [s for s in res.snapshots if s.label.startswith("after mixed")]
    first, last = after[0], after[-1]
    span = f"round 1 -> {len(after)}"
    # HTTP pools keep a varying number of idle keep-alive connections (up to 20 per client, and the servers drop
    # them after 5 s idle), so these counts move by tens between rounds; a leak of one per call would add --calls.
    slack = max(10, args.calls // 4)
    print()
    checks = [
        (f"failed calls: {len(errors)}", "expected 0", not errors),
        (f"zombie children: {zombies}", "expected 0", zombies == 0),
        (f"fds, {span}: {first.fds} -> {last.fds}", f"< +{slack}", last.fds - first.fds < slack),
        (
            f"TCP to servers, {span}: {first.tcp_mcp} -> {last.tcp_mcp}",
            f"< +{slack}",
            last.tcp_mcp - first.tcp_mcp < slack,
        ),
        (f"asyncio tasks, {span}: {first.tasks} -> {last.tasks}", "no growth", last.tasks <= first.tasks),
        (f"RSS, {span}: {last.rss_mb - first.rss_mb:+.1f} MB", "< +5 MB", last.rss_mb - first.rss_mb < 5),
        (f"fds, idle -> all closed: {idle.fds} -> {closed.fds}", "equal", closed.fds == idle.fds),
        (
            f"children, idle -> all closed: {idle.children} -> {closed.children}",
            "equal",
            closed.children == idle.children,
        ),
    ]
    for what, expected, ok in checks:
        print(f"{what:<58}{expected:<14}{'MET' if ok else 'NOT MET'}")
    for e in Counter(errors).most_common(5):
        print(f"  error x{e[1]}: {e[0]}")
    # The two figures the job records are held to (sync-only rounds, ours with rows vs the bare SDK): CPU per
    # call and p50 overhead, each the median of its ratios in the interleaved pairs of rounds. Paired, because
    # this shared machine's speed drifts by more than the gap measured (the SDK's own CPU a call moved 1.7-2.4 ms
    # between runs of one build), and a pair's two rounds run seconds apart.
    if sdk and ours:
        cpu = paired(res.sync, res.sdk, lambda r: r.cpu_s / len(r.samples))
        p50 = paired(res.sync, res.sdk, lambda r: statistics.median(overheads([r])))
        listed = "; p50: ".join(", ".join(f"{x:.2f}" for x in xs) for xs in (cpu, p50))
        print(f"  per pair of rounds, CPU: {listed}")
        print(f"per-call CPU ours / bare SDK: {statistics.median(cpu):.2f}")
        print(f"p50 overhead ours / bare SDK: {statistics.median(p50):.2f}")
    return 1 if errors or zombies else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200, help="calls in flight at once in a mixed round")
    parser.add_argument("--rounds", type=int, default=2, help="identical mixed rounds (at least 2)")
    parser.add_argument("--sync-rounds", type=int, default=21, help="interleaved sync-only rounds, SDK and ours")
    parser.add_argument("--sync-s", type=float, default=1.0, help="the sync tool's sleep")
    parser.add_argument("--job-s", type=float, default=2.0, help="how long a task or receipt job lasts")
    parser.add_argument("--poll-ms", type=int, default=250, help="the polled servers' interval")
    parser.add_argument(
        "--keep-jobs", type=int, help="the Dispatcher's job history (default --calls: full from round 1 on)"
    )
    parser.add_argument(
        "--profile", choices=["sync", "mixed"], help="cProfile our first sync-only or mixed round (to stderr)"
    )
    parser.add_argument("--quick", action="store_true", help="0.3 s sleeps, 0.6 s jobs, 3 sync-only rounds")
    args = parser.parse_args()
    if args.quick:
        args.sync_s, args.job_s, args.sync_rounds = 0.3, 0.6, 3
    if args.keep_jobs is None:
        args.keep_jobs = args.calls
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: growth shows between rounds")
    if args.calls < 10:
        parser.error("--calls must be at least 10")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")  # pgserver via platformdirs
    procs: list[subprocess.Popen[str]] = []
    try:
        targets = start_servers(args, procs)
        results = asyncio.run(run(args, targets, {p.pid for p in procs}))
    finally:
        stop(procs)
    sys.exit(report(results, args, targets))


if __name__ == "__main__":
    main()
