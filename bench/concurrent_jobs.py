"""Concurrent-jobs benchmark: what 1,000 jobs waiting at once cost our process, in CPU and memory.

    python bench/concurrent_jobs.py [--jobs 1000] [--wait-s 60] [--modes task-push,receipt,...] [--profile]

Each mode runs in a fresh child process (so ru_maxrss is its own): one test server, a fresh schema, a
Dispatcher; all jobs are submitted, and once every one is waiting (accepted as a task or receipt, or in
flight for plain calls) our CPU time (getrusage RUSAGE_SELF, user+sys) is measured over --wait-s seconds,
servers excluded. Jobs last --wait-s + --margin-s, so none finishes inside the window. Modes:
  task-push         2025-11-25 task server over Streamable HTTP, a status push every --status-every-ms
  task-push-chatty  the same, a status push every 100 ms (the test server's default step)
  receipt           generic receipt server, row poll_interval 1000 ms
  receipt-learned   the same, with 5 past jobs of that duration in mcp_jobs, and one job submitted first (its
                    lookup of past durations must finish before the rest start, or they see none)
  plain             demo server's `slow` over Streamable HTTP: one long tools/call each
  plain-unlimited   the same with max_calls_per_server = --jobs (the per-server semaphore out of the way)
Each mode reports CPU and RSS for every 10 s of the window too. --profile runs cProfile over the window and
prints the top functions (to stderr); --tracemalloc traces allocations (CPU figures then invalid) and prints the
largest still held. Uses DATABASE_URL if set, else an embedded PostgreSQL; the schema is dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import time
import tracemalloc
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import bench_database, bench_registry, bench_schema, die_with_parent, profiled, spawn, stop  # noqa: E402

from mcp_integration.dispatcher import Dispatcher  # noqa: E402
from mcp_integration.job_queue import job_row  # noqa: E402
from mcp_integration.jobs import Job  # noqa: E402
from mcp_integration.registry import Registry, ServerConfig  # noqa: E402

SERVERS = ROOT / "tests" / "servers"
MODES = ("task-push", "task-push-chatty", "receipt", "receipt-learned", "plain", "plain-unlimited")
CPU_BUDGET_PER_MIN = 3.0
MEMORY_BUDGET_MB = 200.0


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def waiting(job: Job, plain: bool) -> bool:
    """Submitted and now only waiting: a task or receipt accepted, a plain call in flight (or finished)."""
    if job.done:
        return True
    return job.state == "working" if plain else any(e.kind == "accepted" for e in job.events)


async def watch(seconds: float, profile: bool) -> dict[str, Any]:
    """Our CPU time and memory while the jobs wait, overall and for each 10 s (a backlog shows as growth)."""
    peak = rss_mb()
    c0 = cpu_s()
    w0 = time.monotonic()
    slices: list[float] = []
    rss_slices: list[float] = []
    task_slices: list[int] = []
    mark = (w0, c0)
    with profiled(profile, "the waiting window", top=30):
        while (left := seconds - (time.monotonic() - w0)) > 0:
            await asyncio.sleep(min(0.5, left))
            peak = max(peak, rss_mb())
            if time.monotonic() - mark[0] >= 10:
                slices.append((cpu_s() - mark[1]) / (time.monotonic() - mark[0]) * 60)
                mark = (time.monotonic(), cpu_s())
                rss_slices.append(rss_mb())
                task_slices.append(len(asyncio.all_tasks()))
    window = time.monotonic() - w0
    used = cpu_s() - c0
    return {
        "window_s": window,
        "cpu_s": used,
        "cpu_per_min": used / window * 60,
        "cpu_slices": slices,
        "rss_slices": rss_slices,
        "task_slices": task_slices,
        "rss_peak_mb": peak,
    }


# -- one mode, in a child process ---------------------------------------------------------------------------


def server_for(mode: str, args: argparse.Namespace, procs: list[subprocess.Popen[str]]) -> tuple[ServerConfig, str]:
    """Start the mode's server; its registry row and the tool to call."""
    lasts = args.wait_s + args.margin_s
    if mode.startswith("task-push"):
        step = 100 if mode == "task-push-chatty" else args.status_every_ms
        extra = ["--transport", "streamable-http", "--poll-interval-ms", "1000", "--step-ms", str(step)]
        port = spawn("task_server_2025.py", extra, procs)
        tool = "long_report"
    elif mode.startswith("receipt"):
        port = spawn("generic_receipt_server.py", ["--finish-after-ms", str(int(lasts * 1000))], procs)
        tool = "submit_report"
    else:
        port = spawn("demo_server.py", ["--transport", "streamable-http"], procs)
        tool = "slow"
    cfg = ServerConfig(name="bench", transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp")
    return cfg, tool


async def seed_durations(registry: Registry, cfg: ServerConfig, tool: str, seconds: float, n: int = 5) -> None:
    """Past completed jobs of `tool` that lasted `seconds`, as learned timing reads them from mcp_jobs."""
    now = time.time()
    rows = [job_row(uuid.uuid4(), cfg.id, cfg.name, tool, "receipt", "completed", now - seconds) for _ in range(n)]
    for row in rows:
        row["finished_at"] = now
    async with registry.pool.connection() as conn:
        await registry.write_jobs(conn, rows)


def arguments(tool: str, i: int, lasts: float) -> dict[str, Any]:
    if tool == "submit_report":
        return {"topic": f"t{i}"}
    if tool == "slow":
        return {"seconds": lasts, "steps": 1}
    return {"seconds": lasts}


async def measure(base_url: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    procs: list[subprocess.Popen[str]] = []
    d: Dispatcher | None = None
    async with bench_schema(base_url) as conninfo, bench_registry(conninfo) as registry:
        try:
            cfg, tool = server_for(mode, args, procs)
            cfg = await registry.add_server(cfg)
            lasts = args.wait_s + args.margin_s
            if mode == "receipt-learned":
                await seed_durations(registry, cfg, tool, lasts)
            max_calls = args.jobs if mode == "plain-unlimited" else 64
            d = Dispatcher(registry, connect_timeout=10, max_calls_per_server=max_calls, keep_jobs=args.jobs)
            await d.start(wait=True)
            assert d.servers["bench"].error is None, d.servers["bench"].error
            plain = mode.startswith("plain")
            await asyncio.sleep(0.5)
            rss_before = rss_mb()
            if args.tracemalloc:
                tracemalloc.start()
            t0 = time.monotonic()
            jobs = [d.submit(tool, arguments(tool, 0, lasts), server="bench")]
            if mode == "receipt-learned":
                accepted = asyncio.Event()
                jobs[0].add_listener(lambda e: accepted.set() if e.kind == "accepted" else None)
                await asyncio.wait_for(accepted.wait(), 15)
            jobs += [d.submit(tool, arguments(tool, i, lasts), server="bench") for i in range(1, args.jobs)]
            # Plain calls beyond the per-server limit wait for a slot: the ones in flight are what can wait.
            expect = min(args.jobs, max_calls) if plain else args.jobs
            while time.monotonic() - t0 < args.margin_s - 2:
                if sum(waiting(j, plain) for j in jobs) >= expect:
                    break
                await asyncio.sleep(0.1)
            submitted_s = time.monotonic() - t0
            await asyncio.sleep(1.0)  # the last accepted jobs' own DB writes
            counts_before = Counter(j.state for j in jobs)
            polls0 = sum(j.polls for j in jobs)
            events0 = sum(len(j.events) for j in jobs)
            win = await watch(args.wait_s, args.profile)
            traced_peak = None
            if args.tracemalloc:
                traced_peak = tracemalloc.get_traced_memory()[1] / 2**20
                print(f"\n---- {mode}: largest allocations still held at the window's end ----", file=sys.stderr)
                for stat in tracemalloc.take_snapshot().statistics("lineno")[:8]:
                    print(f"  {stat}", file=sys.stderr)
                tracemalloc.stop()
            result: dict[str, Any] = {
                "mode": mode,
                "jobs": args.jobs,
                "waiting": sum(waiting(j, plain) and not j.done for j in jobs),
                "done_early": sum(j.done for j in jobs),
                "states_at_window": dict(counts_before),
                "submit_s": submitted_s,
                **win,
                "polls": sum(j.polls for j in jobs) - polls0,
                "events": sum(len(j.events) for j in jobs) - events0,
                "rss_before_mb": rss_before,
                "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "traced_peak_mb": traced_peak,
            }
            if not plain:
                # Let them finish: the answers must arrive, not just the waiting be cheap.
                settling = [asyncio.ensure_future(j.settled()) for j in jobs]
                await asyncio.wait(settling, timeout=args.margin_s + 60)
                for fut in settling:
                    fut.cancel()
            result["final_states"] = dict(Counter(j.state for j in jobs))
            reasons = (re.sub(r"/results/\S+", "/results/<id>", j.error.reason) for j in jobs if j.error is not None)
            errors = Counter(r for r in reasons if "cancelled" not in r)
            result["errors"] = dict(errors.most_common(3))
            return result
        finally:
            if d is not None:
                await d.aclose()
            stop(procs)


async def child(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    async with bench_database(announce=False) as url:
        return await measure(url, mode, args)


# -- the parent: one child per mode, then the table -----------------------------------------------------------


def run_child(mode: str, argv: list[str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, preexec_fn=die_with_parent)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # the child cleans up (servers, schema) on KeyboardInterrupt
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"mode {mode}: the child failed (exit code {proc.returncode})")
    return json.loads(line.removeprefix("RESULT "))


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\n{args.jobs} jobs per mode, waiting window {args.wait_s:g} s", end="; ")
    print(f"budgets: <= {CPU_BUDGET_PER_MIN:g} CPU-s per minute of waiting, <= {MEMORY_BUDGET_MB:g} MB (ru_maxrss)\n")
    cols = ("waiting", "submit s", "CPU s", "CPU-s/min", "polls/s", "events/s", "RSS0 MB", "RSS pk", "maxrss")
    print(f"{'mode':<18}" + "".join(f"{c:>10}" for c in cols))
    for r in results:
        w = r["window_s"]
        values = (
            f"{r['waiting']}",
            f"{r['submit_s']:.1f}",
            f"{r['cpu_s']:.2f}",
            f"{r['cpu_per_min']:.2f}",
            f"{r['polls'] / w:.1f}",
            f"{r['events'] / w:.1f}",
            f"{r['rss_before_mb']:.0f}",
            f"{r['rss_peak_mb']:.0f}",
            f"{r['maxrss_mb']:.0f}",
        )
        print(f"{r['mode']:<18}" + "".join(f"{v:>10}" for v in values))
    print()
    for r in results:
        mem = r["maxrss_mb"]
        traced = f", tracemalloc peak {r['traced_peak_mb']:.0f} MB" if r["traced_peak_mb"] is not None else ""
        delta = r["rss_peak_mb"] - r["rss_before_mb"]
        print(f"{r['mode']}: states when the window opened {r['states_at_window']}, finally {r['final_states']}")
        print(f"  RSS delta from before submit to the window's peak: {delta:.0f} MB{traced}")
        print("  CPU-s/min over each 10 s of the window: " + ", ".join(f"{c:.1f}" for c in r["cpu_slices"]))
        print("  RSS MB at the end of each 10 s: " + ", ".join(f"{m:.0f}" for m in r["rss_slices"]))
        print("  asyncio tasks alive then: " + ", ".join(str(n) for n in r["task_slices"]))
        if r["errors"]:
            print(f"  errors: {r['errors']}")
        cpu = r["cpu_per_min"]
        checks = (
            (f"CPU {cpu:.2f} CPU-s/min", f"expected <= {CPU_BUDGET_PER_MIN:g}", cpu <= CPU_BUDGET_PER_MIN),
            (f"memory {mem:.0f} MB", f"expected <= {MEMORY_BUDGET_MB:g} MB", mem <= MEMORY_BUDGET_MB),
        )
        for what, expected, ok in checks:
            print(f"  {what:<28}{expected:<24}{'MET' if ok else 'NOT MET'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--wait-s", type=float, default=60.0)
    parser.add_argument("--margin-s", type=float, default=20.0, help="time to submit before the window opens")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--status-every-ms", type=int, default=10_000, help="task-push: the server's status cadence")
    parser.add_argument("--profile", action="store_true", help="cProfile the waiting window")
    parser.add_argument("--tracemalloc", action="store_true", help="trace allocations (slows: CPU figures invalid)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")  # pgserver via platformdirs
    if args.child:
        print(f"RESULT {json.dumps(asyncio.run(child(args.child, args)))}", flush=True)
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    print("database: " + ("DATABASE_URL" if os.environ.get("DATABASE_URL") else "embedded PostgreSQL"))
    argv = sys.argv[1:]
    results = []
    for mode in modes:
        t0 = time.monotonic()
        results.append(run_child(mode, argv, timeout=args.wait_s + 2 * args.margin_s + 180))
        print(f"  {mode}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    report(results, args)


if __name__ == "__main__":
    main()
