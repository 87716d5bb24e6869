"""Status-page benchmark: page load with many servers and jobs, and what the live feed costs.

    python bench/dashboard.py [--servers 50] [--jobs 10000] [--loads 30] [--pages 10] [--window-s 60]

Setup: a fresh schema with --servers registered servers (all but five spread over five real demo servers on
Streamable HTTP, five on a closed port, so down), --jobs rows in mcp_jobs over the last day, and an hour of
health-check history (one check per server every 15 s). The dashboard runs as its own process
(`python -m mcp_integration dashboard --port 0`), with its real health monitor at the default 15 s.

Page load (medians of --loads): time to first byte of `/` (httpx, keep-alive; the request ends when the
headers arrive), and full render in Debian's chromium through Playwright (Navigation Timing: navigation start
to the end of the load event: HTML, stylesheet and script). The baseline, from the same server in the same
run, is a static file (`/static/dashboard.css`): the ratio is what rendering the page adds.

Live feed: the dashboard's CPU time (user+sys, psutil) over --window-s with no page open (the baseline: the
health monitor and the process's idle work), then over --window-s with --pages live streams open (`/events`,
read to the end of each event, as a browser's EventSource does). Both windows see the same traffic: a writer
inserts a job and finishes an earlier one --job-rate times a second, so the page has news every second. The
difference is the feed's cost. Budgets: first byte <= 100 ms, feed <= 1 CPU-s per minute.

Uses DATABASE_URL if set, else an embedded PostgreSQL; the schema is dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import select
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402
from _common import bench_database, bench_registry, bench_schema, die_with_parent, spawn, stop  # noqa: E402
from psycopg.types.json import Jsonb  # noqa: E402

from mcp_integration.job_queue import JobRow, job_row  # noqa: E402
from mcp_integration.registry import Registry, ServerConfig  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
TTFB_BUDGET_MS = 100.0
FEED_BUDGET_CPU_PER_MIN = 1.0
REAL_SERVERS = 5
DOWN_SERVERS = 5


def ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


# -- setup ----------------------------------------------------------------------------------------------------


async def seed(registry: Registry, ports: list[int], n_servers: int, n_jobs: int) -> list[str]:
    names: list[str] = []
    for i in range(n_servers):
        name = f"srv-{i:03d}"
        if i < n_servers - DOWN_SERVERS:
            url = f"http://127.0.0.1:{ports[i % len(ports)]}/mcp"
        else:
            url = "http://127.0.0.1:9/mcp"  # the discard port: refused
        await registry.add_server(ServerConfig(name=name, transport="streamable-http", url=url))
        names.append(name)
    servers = {s.name: s.id for s in await registry.list_servers()}
    now = datetime.now(UTC)
    rng = random.Random(7)
    async with registry.pool.connection() as conn:
        async with conn.cursor() as cur:
            async with cur.copy(
                "COPY mcp_jobs (id, server_id, server_name, tool, kind, state, submitted_at, updated_at,"
                " finished_at, result, polls, delivered_late) FROM STDIN"
            ) as copy:
                for _ in range(n_jobs):
                    name = rng.choice(names)
                    kind = rng.choices(["plain", "task", "receipt"], [6, 2, 2])[0]
                    state = rng.choices(["completed", "failed", "timed_out", "cancelled"], [90, 6, 3, 1])[0]
                    submitted = now - timedelta(seconds=rng.uniform(0, 86_400))
                    finished = submitted + timedelta(seconds=rng.uniform(0.05, 30))
                    await copy.write_row(
                        (
                            uuid.uuid4(),
                            servers[name],
                            name,
                            rng.choice(["echo", "add", "slow", "lookup.weather"]),
                            kind,
                            state,
                            submitted,
                            finished,
                            finished,
                            Jsonb({"text": "x" * rng.randint(10, 400)}),
                            0 if kind == "plain" else rng.randint(1, 6),
                            rng.random() < 0.05,
                        )
                    )
            async with cur.copy("COPY mcp_health_checks (server_id, checked_at, ok, latency_ms) FROM STDIN") as copy:
                for name, sid in servers.items():
                    down = name >= names[n_servers - DOWN_SERVERS]
                    for k in range(240):  # an hour at one check per 15 s
                        ok = not down and rng.random() > 0.01
                        await copy.write_row(
                            (sid, now - timedelta(seconds=15 * k), ok, rng.uniform(2, 40) if ok else None)
                        )
    return names


def start_dashboard(conninfo: str) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if k != "DASHBOARD_TOKEN"}
    env["DATABASE_URL"] = conninfo
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcp_integration", "dashboard", "--port", "0"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env=env,
        preexec_fn=die_with_parent,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        line = proc.stderr.readline() if ready else ""
        found = re.search(r"dashboard on (http://\S+)", line)
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"the dashboard did not start (exit code {proc.poll()})")


# -- page load ------------------------------------------------------------------------------------------------


async def first_byte(http: httpx.AsyncClient, path: str, loads: int) -> tuple[list[float], int]:
    times: list[float] = []
    size = 0
    for _ in range(loads):
        started = time.perf_counter()
        async with http.stream("GET", path) as response:
            times.append(time.perf_counter() - started)
            assert response.status_code == 200, (path, response.status_code)
            size = len(await response.aread())
    return times, size


async def full_render(base: str, loads: int) -> dict[str, list[float]]:
    from playwright.async_api import async_playwright

    out: dict[str, list[float]] = {"page": [], "baseline": []}
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1500, "height": 900})
            for _ in range(loads):
                for key, path in (("page", "/"), ("baseline", "/static/dashboard.css")):
                    await page.goto(base + path, wait_until="load")
                    timing = json.loads(
                        await page.evaluate("JSON.stringify(performance.getEntriesByType('navigation')[0])")
                    )
                    out[key].append((timing["loadEventEnd"] - timing["startTime"]) / 1000)
            await page.goto(base + "/", wait_until="load")
            assert await page.locator("#servers-body tr").count() >= 1
        finally:
            await browser.close()
    return out


# -- live feed ------------------------------------------------------------------------------------------------


async def job_writer(registry: Registry, names: list[str], rate: float, stop_at: asyncio.Event) -> int:
    """Traffic like an agent's: a job submitted now, one submitted two seconds ago completed."""
    ids = {s.name: s.id for s in await registry.list_servers()}
    pending: list[JobRow] = []
    written = 0
    while not stop_at.is_set():
        name = random.choice(names)
        rows = [job_row(uuid.uuid4(), ids[name], name, "echo", "plain", "submitted", time.time())]
        pending.append(rows[0])
        if len(pending) > max(1, int(2 * rate)):
            done = pending.pop(0)
            done.update(state="completed", result={"text": "ok"}, finished_at=time.time())
            rows.append(done)
        async with registry.pool.connection() as conn:
            await registry.write_jobs(conn, rows)
        written += 1
        await asyncio.sleep(1 / rate)
    return written


async def read_stream(http: httpx.AsyncClient, events: list[int], index: int, ready: asyncio.Event) -> None:
    async with http.stream("GET", "/events") as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                events[index] += 1
                if events[index] >= 3:
                    ready.set()


async def cpu_window(proc: psutil.Process, seconds: float) -> float:
    """CPU seconds per minute of the process over the window."""
    before = proc.cpu_times()
    started = time.monotonic()
    await asyncio.sleep(seconds)
    after = proc.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    return used / (time.monotonic() - started) * 60


# -- main -----------------------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    procs: list[subprocess.Popen[str]] = []
    dashboard: subprocess.Popen[str] | None = None
    async with (
        bench_database() as base_url,
        bench_schema(base_url) as conninfo,
        bench_registry(conninfo, max_size=5) as registry,
    ):
        try:
            ports = [spawn("demo_server.py", ["--transport", "streamable-http"], procs) for _ in range(REAL_SERVERS)]
            t0 = time.monotonic()
            names = await seed(registry, ports, args.servers, args.jobs)
            print(
                f"seeded {args.servers} servers ({args.servers - DOWN_SERVERS} up over {REAL_SERVERS} processes,"
                f" {DOWN_SERVERS} down), {args.jobs:,} jobs, {args.servers * 240:,} health checks"
                f" in {time.monotonic() - t0:.1f} s"
            )
            dashboard, base = start_dashboard(conninfo)
            # The monitor's first round (discovery, then a check of every server) before measuring.
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    page = (await http.get("/")).text
                    if page.count('data-health="unknown"') == 0:
                        break
                    await asyncio.sleep(0.5)
                await asyncio.sleep(2)

                for path in ("/", "/static/dashboard.css"):
                    await first_byte(http, path, 3)  # warm up
                page_ttfb, page_size = await first_byte(http, "/", args.loads)
                base_ttfb, base_size = await first_byte(http, "/static/dashboard.css", args.loads)
            render = await full_render(base, args.loads)

            print(f"\npage load, {args.servers} servers, {args.jobs:,} jobs: median of {args.loads} loads")
            verdict = "ok" if ms(page_ttfb) <= TTFB_BUDGET_MS else "OVER BUDGET"
            print(
                f"  time to first byte   page {ms(page_ttfb):7.1f} ms ({page_size / 1024:.0f} KiB)"
                f"   static file {ms(base_ttfb):6.1f} ms ({base_size / 1024:.0f} KiB)"
                f"   ratio {ms(page_ttfb) / ms(base_ttfb):5.1f}   budget <= {TTFB_BUDGET_MS:.0f} ms: {verdict}"
            )
            print(
                f"  full render (chromium) page {ms(render['page']):7.1f} ms"
                f"   static file {ms(render['baseline']):6.1f} ms"
                f"   ratio {ms(render['page']) / ms(render['baseline']):5.1f}"
            )

            ps = psutil.Process(dashboard.pid)
            stop_writer = asyncio.Event()
            writer = asyncio.create_task(job_writer(registry, names, args.job_rate, stop_writer))
            await asyncio.sleep(2)
            idle = await cpu_window(ps, args.window_s)
            events = [0] * args.pages
            ready = [asyncio.Event() for _ in range(args.pages)]
            async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(30, read=None)) as http:
                readers = [asyncio.create_task(read_stream(http, events, i, ready[i])) for i in range(args.pages)]
                await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 30)
                start_events = sum(events)
                live = await cpu_window(ps, args.window_s)
                received = sum(events) - start_events
                for r in readers:
                    r.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
            stop_writer.set()
            written = await writer
            cost = live - idle
            verdict = "ok" if cost <= FEED_BUDGET_CPU_PER_MIN else "OVER BUDGET"
            print(
                f"\nlive feed: dashboard CPU over {args.window_s:g} s windows, {args.job_rate:g} job writes/s"
                f" ({written} in all)"
            )
            print(f"  no page open         {idle:5.2f} CPU-s/min   (baseline: health monitor, idle work)")
            ratio = live / idle if idle else float("inf")
            print(
                f"  {args.pages} live pages        {live:5.2f} CPU-s/min   ratio {ratio:4.2f};"
                f" {received / args.pages:.0f} events per page in the window"
            )
            print(f"  the feed's cost      {cost:5.2f} CPU-s/min   budget <= {FEED_BUDGET_CPU_PER_MIN:g}: {verdict}")
        finally:
            if dashboard is not None:
                dashboard.terminate()
                try:
                    dashboard.wait(15)
                except subprocess.TimeoutExpired:
                    dashboard.kill()
                    dashboard.wait(5)
                if dashboard.stderr is not None:
                    dashboard.stderr.close()
            stop(procs)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", type=int, default=50)
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--loads", type=int, default=30, help="page loads per measurement")
    p.add_argument("--pages", type=int, default=10, help="live pages (event streams) in the second window")
    p.add_argument("--window-s", type=float, default=60.0, help="length of each CPU window")
    p.add_argument("--job-rate", type=float, default=2.0, help="job writes per second during the CPU windows")
    args = p.parse_args()
    if args.servers <= DOWN_SERVERS:
        p.error(f"--servers must be more than {DOWN_SERVERS}")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse()))
