"""Detection-lag benchmark: how long after a server finished a job does our Job complete?

    python bench/detection_lag.py [--jobs 40] [--interval-ms 1000] [--concurrency 8] [--seed 1]

Jobs last a random time (uniform --min-s..--max-s, the same seeded list for every mode). The lag of a job is
the wall time of its `done` event minus the server's own finish time (each test server tells it at
`GET /_finished`; same machine, same clock). Modes:
  push            2025-11-25 task server, status pushed as notifications/tasks/status
  task polling    2026 task server (fastmcp-tasks, no push), pollInterval = --interval-ms
  receipt polling generic receipt server, row poll_interval = --interval-ms
  baseline        a naive loop in this script: GET the result endpoint every --interval-ms until done
Polling modes run twice: in waves of --concurrency jobs (after 3 finish, learned timing puts the first poll
near their median duration) and as one burst of all jobs (none has a learned duration yet).
Uses DATABASE_URL if set, else an embedded PostgreSQL; a fresh schema, dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from _common import bench_database, bench_registry, bench_schema, spawn, stop  # noqa: E402

from mcp_integration.dispatcher import Dispatcher  # noqa: E402
from mcp_integration.errors import ToolCallError  # noqa: E402
from mcp_integration.jobs import Job  # noqa: E402
from mcp_integration.registry import ServerConfig  # noqa: E402

SERVERS = ROOT / "tests" / "servers"
# Monotonic event times to wall time: one offset, measured once.
WALL_OFFSET = time.time() - time.monotonic()


@dataclass(frozen=True)
class Sample:
    duration_s: float  # what the job was asked to last
    lag_s: float  # our completion minus the server's finish
    polls: int
    ok: bool


@dataclass(frozen=True)
class Mode:
    label: str
    server: str  # registry row
    tool: str
    port: int
    burst: bool  # all jobs at once (no learned timing) instead of waves
    polling: bool  # lag bounded by the interval, in theory
    args: Callable[[int, float], dict[str, Any]]


def done_at(job: Job) -> float:
    return next(e.at for e in job.events if e.kind == "done") + WALL_OFFSET


async def finish_times(http: httpx.AsyncClient, port: int) -> dict[str, float]:
    return (await http.get(f"http://127.0.0.1:{port}/_finished")).json()


async def in_waves(n: int, durations: list[float], one: Callable[[int, float], Awaitable[None]]) -> None:
    """Run `one(i, duration)` for every job, `n` at a time."""
    todo = list(enumerate(durations))

    async def worker() -> None:
        while todo:
            await one(*todo.pop(0))

    await asyncio.gather(*(worker() for _ in range(n)))


async def run_mode(d: Dispatcher, http: httpx.AsyncClient, mode: Mode, durations: list[float], n: int) -> list[Sample]:
    jobs: list[tuple[float, Job]] = []

    async def one(i: int, duration: float) -> None:
        job = d.submit(mode.tool, mode.args(i, duration), server=mode.server)
        jobs.append((duration, job))
        try:
            await job.wait(duration + 30)
        except ToolCallError:
            pass

    await in_waves(len(durations) if mode.burst else n, durations, one)
    finished = await finish_times(http, mode.port)
    out = []
    for duration, job in jobs:
        key = job.task_id or (job.receipt or {}).get("job_id")
        ok = job.state == "completed" and key in finished
        lag = done_at(job) - finished[key] if ok else float("nan")
        out.append(Sample(duration, lag, job.polls, ok))
    return out


async def run_naive(
    d: Dispatcher, http: httpx.AsyncClient, port: int, durations: list[float], n: int, interval: float
) -> list[Sample]:
    """The baseline: submit (the receipt handed back as is), then GET the result every `interval` until done."""
    seen: list[tuple[float, str, float, int]] = []

    async def one(i: int, duration: float) -> None:
        answer = await d.call("submit_report", {"topic": f"n{i}", "seconds": duration}, server="naive", timeout=30)
        receipt = answer.structured if isinstance(answer.structured, dict) else json.loads(answer.text)
        job_id = str(receipt["job_id"])
        polls = 0
        while True:
            await asyncio.sleep(interval)
            polls += 1
            body = (await http.get(f"http://127.0.0.1:{port}/mcp/results/{job_id}")).json()
            if body.get("status") == "completed":
                seen.append((duration, job_id, time.time(), polls))
                return

    await in_waves(n, durations, one)
    finished = await finish_times(http, port)
    return [Sample(dur, at - finished[jid], polls, True) for dur, jid, at, polls in seen]


async def bench(base_url: str, args: argparse.Namespace, ports: dict[str, int]) -> dict[str, tuple[Mode, list[Sample]]]:
    interval_ms: int = args.interval_ms
    rng = random.Random(args.seed)
    durations = [round(rng.uniform(args.min_s, args.max_s), 3) for _ in range(args.jobs)]
    d: Dispatcher | None = None
    async with bench_schema(base_url) as conninfo, bench_registry(conninfo, max_size=20) as registry:
        try:

            def row(name: str, port: int, **kw: Any) -> ServerConfig:
                url = f"http://127.0.0.1:{port}/mcp"
                return ServerConfig(name=name, transport="streamable-http", url=url, poll_interval=interval_ms, **kw)

            rows = [
                row("push", ports["2025"]),
                row("taskpoll", ports["2026"]),
                row("taskpoll_burst", ports["2026"]),
                row("receipt", ports["receipt"]),
                row("receipt_burst", ports["receipt"]),
                row("naive", ports["receipt"], poll_profile="none"),
            ]
            for cfg in rows:
                await registry.add_server(cfg)
            d = Dispatcher(registry, connect_timeout=15)
            await d.start(wait=True)
            errors = {n: s.error for n, s in d.servers.items() if s.error}
            assert not errors, f"discovery errors: {errors}"

            def seconds(i: int, dur: float) -> dict[str, Any]:
                return {"seconds": dur}

            def report(i: int, dur: float) -> dict[str, Any]:
                return {"topic": f"t{i}", "seconds": dur}

            modes = [
                Mode("push (2025 task, notifications)", "push", "long_report", ports["2025"], False, False, seconds),
                Mode("task polling (2026, waves)", "taskpoll", "report", ports["2026"], False, True, seconds),
                Mode("task polling (2026, burst)", "taskpoll_burst", "report", ports["2026"], True, True, seconds),
                Mode("receipt polling (waves)", "receipt", "submit_report", ports["receipt"], False, True, report),
                Mode("receipt polling (burst)", "receipt_burst", "submit_report", ports["receipt"], True, True, report),
            ]
            results: dict[str, tuple[Mode, list[Sample]]] = {}
            async with httpx.AsyncClient(timeout=10) as http:
                for mode in modes:
                    t0 = time.perf_counter()
                    results[mode.label] = (mode, await run_mode(d, http, mode, durations, args.concurrency))
                    print(f"  {mode.label}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
                naive = Mode(
                    f"baseline: naive {interval_ms} ms loop", "naive", "", ports["receipt"], False, True, report
                )
                samples = await run_naive(d, http, ports["receipt"], durations, args.concurrency, interval_ms / 1000)
                results[naive.label] = (naive, samples)
            return results
        finally:
            if d is not None:
                await d.aclose()


async def run(args: argparse.Namespace, ports: dict[str, int]) -> dict[str, tuple[Mode, list[Sample]]]:
    async with bench_database() as url:
        return await bench(url, args, ports)


def p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20, method="inclusive")[-1] if len(xs) > 1 else xs[0]


def report(results: dict[str, tuple[Mode, list[Sample]]], args: argparse.Namespace) -> None:
    interval = args.interval_ms / 1000
    print(
        f"\n{args.jobs} jobs per mode, durations uniform {args.min_s:g}-{args.max_s:g} s (seed {args.seed}), "
        f"interval {args.interval_ms} ms, waves of {args.concurrency}\n"
    )
    print(f"{'mode':<36}{'ok':>4}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}", end="")
    print(f"{'polls/job':>11}{'p50/base':>10}{'p95/base':>10}")
    base = [s.lag_s for s in list(results.values())[-1][1]]
    b50, b95 = statistics.median(base), p95(base)
    stats: dict[str, tuple[float, float, float]] = {}
    for label, (_, samples) in results.items():
        lags = [s.lag_s for s in samples if s.ok]
        if not lags:
            print(f"{label:<36}{0:>4}  (no job completed)")
            continue
        m50, m95, mx = statistics.median(lags), p95(lags), max(lags)
        stats[label] = (m50, m95, mx)
        polls = statistics.mean(s.polls for s in samples)
        print(
            f"{label:<36}{len(lags):>4}{m50 * 1000:>9.1f}{m95 * 1000:>9.1f}{mx * 1000:>9.1f}{polls:>11.2f}"
            f"{m50 / b50:>10.3f}{m95 / b95:>10.3f}"
        )
    print()
    checks: list[tuple[str, str, bool | None]] = []
    for label, (mode, _) in results.items():
        if label not in stats:
            checks.append((f"{label}: no job completed", "", False))
            continue
        m50, _, mx = stats[label]
        if not mode.polling:
            checks.append((f"{label}: p50 = {m50 * 1000:.1f} ms", "expected <= 20 ms", m50 <= 0.020))
        else:
            checks.append((f"{label}: max = {mx * 1000:.0f} ms", f"expected <= {args.interval_ms} ms", mx <= interval))
    for what, expected, ok in checks:
        verdict = "" if ok is None else ("MET" if ok else "NOT MET")
        print(f"{what:<58}{expected:<22}{verdict}")
    print(f"\njobs detected more than {args.interval_ms} ms after they finished (duration s -> lag s, polls):")
    for label, (_, samples) in results.items():
        late = sorted((s for s in samples if s.ok and s.lag_s > interval), key=lambda s: s.duration_s)
        if late:
            listed = ", ".join(f"{s.duration_s:.2f}->{s.lag_s:.2f} ({s.polls})" for s in late)
            print(f"  {label}: {len(late)}/{len(samples)}: {listed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--interval-ms", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8, help="jobs in flight at once in the waves")
    parser.add_argument("--min-s", type=float, default=0.5)
    parser.add_argument("--max-s", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")  # pgserver via platformdirs
    procs: list[subprocess.Popen[str]] = []
    interval = ["--poll-interval-ms", str(args.interval_ms)]
    unqueued = {"FASTMCP_DOCKET_CONCURRENCY": str(max(10, args.jobs))}
    try:
        ports = {
            "2025": spawn("task_server_2025.py", ["--transport", "streamable-http", *interval], procs),
            # fastmcp-tasks runs 10 tasks at a time by default; a burst would queue on the server.
            "2026": spawn("task_server_2026.py", ["--transport", "streamable-http", *interval], procs, unqueued),
            "receipt": spawn("generic_receipt_server.py", [], procs),
        }
        results = asyncio.run(run(args, ports))
    finally:
        stop(procs)
    report(results, args)


if __name__ == "__main__":
    main()
