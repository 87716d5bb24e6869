"""Fleet benchmark: many voice sessions in several processes on one registry, as a LiveKit worker runs them.

    python bench/fleet.py [--processes 8] [--sessions 200] [--servers 4] [--interval 3] [--window 5]

Each process is tests/fleet_worker.py: sessions (a runtime each: dispatcher, health, registry watcher, health
monitor) sharing the process's registry pool. Two fleets, one after the other, on the same real servers (demo
servers over Streamable HTTP) and the same database:
  before  sessions as they ran before the fleet shared its work: each its own LISTEN connection and its own
          monitor checking every server; the process's pool as agent.py opened it (1 to 10 connections);
  now     the fleet: one relay (this process, as the worker's main process) listening for all; health leases
          (one checker per server for the whole fleet); pools sized by DB_POOL_MAX / DB_POOL_IDLE_S.
For each: health checks per server per interval (counted by the sessions that made them), PostgreSQL connections
of the fleet (pg_stat_activity, sampled every 0.25 s: median and max), and CPU per idle session (the processes'
CPU over the window, per session). Then, for the fleet, the process holding a lease is killed (SIGKILL) right
after one of its checks, and measured: how soon another process holds the lease (expected within one interval),
and when it checks the server: at the fleet's rhythm, one interval after the check before the kill (within
RHYTHM_SLACK_S of timer and write jitter), so no check is skipped. Seconds from the kill to that check are shown
too; with the kill right after a check they are one interval less the kill's lag, plus that jitter.

Uses DATABASE_URL if set, else an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import psycopg  # noqa: E402
from _common import bench_database, bench_registry, bench_schema, spawn, stop  # noqa: E402
from fleet_worker import FleetProcess  # noqa: E402
from psycopg.conninfo import make_conninfo  # noqa: E402

from mcp_integration.registry import Registry, ServerConfig  # noqa: E402
from mcp_integration.relay import Relay  # noqa: E402

APP = "voice-mcp-fleet-bench"
POOL_MAX = 2
POOL_IDLE_S = 5.0
# A check's time is taken when it is recorded (after its ping and its row's write): the rhythm wavers by tens of ms.
RHYTHM_SLACK_S = 0.25


@dataclass
class Fleet:
    name: str
    sessions: int
    checks_per_interval: list[float] = field(default_factory=list)  # per server
    connections: list[int] = field(default_factory=list)
    recorded_per_interval: list[float] = field(default_factory=list)  # per server, from mcp_health_checks
    cpu_ms_per_session_s: float = 0.0  # CPU ms per second of one idle session
    start_s: float = 0.0
    budget: int | None = None
    takeover_from_kill_s: float | None = None
    takeover_gap_s: float | None = None
    handed_s: float | None = None  # from the kill to another process holding the lease


def count_connections(base_url: str) -> int:
    with psycopg.connect(base_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (APP,)).fetchone()
        return int(row[0]) if row else 0


async def sample_connections(base_url: str, into: list[int], stop_at: float) -> None:
    while time.monotonic() < stop_at:
        into.append(await asyncio.to_thread(count_connections, base_url))
        await asyncio.sleep(0.25)


async def run_fleet(
    name: str, conninfo: str, base_url: str, args: argparse.Namespace, relay: Path | None, old: bool
) -> tuple[Fleet, list[FleetProcess]]:
    sessions = args.before_sessions if old else args.sessions
    out = Fleet(name, sessions=sessions)
    per = [sessions // args.processes + (i < sessions % args.processes) for i in range(args.processes)]
    env = {"DB_POOL_MAX": str(POOL_MAX), "DB_POOL_IDLE_S": str(POOL_IDLE_S)}
    extra = ("--interval", str(args.interval), *(("--no-lease",) if old else ()))
    t0 = time.perf_counter()
    started = await asyncio.gather(
        *(asyncio.to_thread(FleetProcess, conninfo, n, relay, extra, env, 300) for n in per), return_exceptions=True
    )
    procs = [p for p in started if isinstance(p, FleetProcess)]
    if len(procs) < len(started):
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))
        failed = next(p for p in started if not isinstance(p, FleetProcess))
        raise RuntimeError(f"the {name} fleet did not start: {failed}")
    out.start_s = time.perf_counter() - t0
    await asyncio.sleep(args.interval * 2)  # past the start: discovery done, leases claimed
    before = [p.ask() for p in procs]
    window = args.interval * args.window
    stop_at = time.monotonic() + window
    recorded_from = time.time()
    await sample_connections(base_url, out.connections, stop_at)
    recorded_to = time.time()
    after = [p.ask() for p in procs]
    if not old:
        out.recorded_per_interval = await recorded_checks(conninfo, recorded_from, recorded_to, args.interval)
    servers = {s for a in after for s in a["checks"]}
    # Each process's own counts over its own span between the two readings (read one process after another).
    pairs = list(zip(after, before, strict=True))
    for server in sorted(servers):
        rate = sum((a["checks"].get(server, 0) - b["checks"].get(server, 0)) / (a["at"] - b["at"]) for a, b in pairs)
        out.checks_per_interval.append(rate * args.interval)
    cpu_rate = sum((a["cpu_s"] - b["cpu_s"]) / (a["at"] - b["at"]) for a, b in pairs)
    out.cpu_ms_per_session_s = cpu_rate * 1000 / sessions
    return out, list(procs)


async def recorded_checks(conninfo: str, since: float, until: float, interval: float) -> list[float]:
    """Checks per server per interval as recorded in mcp_health_checks (the fleet's checker records each)."""
    async with await psycopg.AsyncConnection.connect(conninfo) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM mcp_health_checks WHERE checked_at >= to_timestamp(%s)"
            " AND checked_at < to_timestamp(%s) GROUP BY server_id",
            (since, until),
        )
        return [n * interval / (until - since) for (n,) in await cur.fetchall()]


async def holders(registry: Registry) -> dict[int, int]:
    async with registry.pool.connection() as conn:
        rows = await (await conn.execute("SELECT server_id, holder FROM mcp_health_leases")).fetchall()
    return {r["server_id"]: int(r["holder"].split(":")[1]) for r in rows if r["holder"]}


async def last_check(registry: Registry, server_id: int) -> float | None:
    async with registry.pool.connection() as conn:
        row = await (
            await conn.execute(
                "SELECT extract(epoch FROM max(checked_at))::float8 AS at FROM mcp_health_checks WHERE server_id = %s",
                (server_id,),
            )
        ).fetchone()
    return row["at"] if row else None


async def takeover(registry: Registry, procs: list[FleetProcess], interval: float) -> tuple[float, float, float]:
    """Kill the process holding a lease; seconds from the kill, and from the check before it, to the next check,
    and from the kill to another process holding the lease."""
    held = await holders(registry)
    server_id, pid = next(iter(held.items()))
    victim = next(p for p in procs if p.pid == pid)
    # Right after its check: the worst moment, a whole interval before the next one is due.
    previous = await last_check(registry, server_id)
    now = previous
    for _ in range(int(interval * 50) + 500):
        now = await last_check(registry, server_id)
        if now != previous:
            break
        await asyncio.sleep(0.02)
    assert now is not None and now != previous, "no check seen"
    victim.proc.send_signal(signal.SIGKILL)
    killed = time.time()
    await asyncio.to_thread(victim.proc.wait, 10)
    procs.remove(victim)
    deadline = time.monotonic() + interval * 5 + 10
    handed: float | None = None
    while time.monotonic() < deadline:
        if handed is None and (await holders(registry)).get(server_id, pid) != pid:
            handed = time.time() - killed
        latest = await last_check(registry, server_id)
        if latest is not None and latest > killed:
            return latest - killed, latest - now, handed if handed is not None else latest - killed
        await asyncio.sleep(0.05)
    raise RuntimeError("no other process checked the server after its checker was killed")


async def bench(base_url: str, args: argparse.Namespace, ports: list[int]) -> list[Fleet]:
    async with bench_schema(base_url) as schema_url, bench_registry(schema_url) as registry:
        conninfo = make_conninfo(schema_url, application_name=APP)
        for i, port in enumerate(ports):
            url = f"http://127.0.0.1:{port}/mcp"
            await registry.add_server(ServerConfig(name=f"s{i}", transport="streamable-http", url=url))
        results = []
        # Before: no relay, no leases.
        old, procs = await run_fleet("before", conninfo, base_url, args, None, old=True)
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))
        results.append(old)
        # Now: the relay as the worker's main process runs it, and leases.
        with tempfile.TemporaryDirectory() as tmp:
            relay = await Relay(conninfo, Path(tmp) / "relay.sock").start()
            try:
                new, procs = await run_fleet("now", conninfo, base_url, args, Path(relay.path), old=False)
                new.budget = 1 + args.processes * (POOL_MAX + 1)
                try:
                    taken = await takeover(registry, procs, args.interval)
                    new.takeover_from_kill_s, new.takeover_gap_s, new.handed_s = taken
                finally:
                    await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))
                results.append(new)
            finally:
                await relay.aclose()
        return results


async def run(args: argparse.Namespace, ports: list[int]) -> list[Fleet]:
    async with bench_database() as url:
        return await bench(url, args, ports)


def report(results: list[Fleet], args: argparse.Namespace) -> int:
    old, new = results
    print(
        f"\n{args.processes} processes, {args.sessions} sessions, {args.servers} servers, health interval "
        f"{args.interval:g} s, measured over {args.window} intervals"
    )
    head = f"{'':<8}{'sessions':>9}{'start s':>9}{'checks/server/interval':>24}{'PG conns p50':>14}{'max':>6}"
    print(head + f"{'per session':>13}{'CPU ms/s/session':>18}")
    for f in results:
        checks = statistics.median(f.checks_per_interval) if f.checks_per_interval else 0.0
        conns = f.connections or [0]
        print(
            f"{f.name:<8}{f.sessions:>9}{f.start_s:>9.1f}{checks:>24.2f}{statistics.median(conns):>14.0f}"
            f"{max(conns):>6}{max(conns) / f.sessions:>13.2f}{f.cpu_ms_per_session_s:>18.3f}"
        )
    print(
        f"before, at {new.sessions} sessions: at least {new.sessions} connections (a LISTEN per session) plus "
        f"{args.processes} pools of 1 to 10: over PostgreSQL's default max_connections (100)"
    )
    new_checks = statistics.median(new.checks_per_interval) if new.checks_per_interval else 0.0
    old_checks = statistics.median(old.checks_per_interval) if old.checks_per_interval else 0.0
    print(f"\nchecks per server per interval, before / now: {old_checks:.2f} / {new_checks:.2f}")
    print(f"checks per server per interval per session, before: {old_checks / old.sessions:.2f}")
    recorded = ", ".join(f"{x:.2f}" for x in new.recorded_per_interval)
    print(f"now, as recorded in mcp_health_checks, per server: {recorded}")
    cpu_ratio = new.cpu_ms_per_session_s / old.cpu_ms_per_session_s if old.cpu_ms_per_session_s else float("nan")
    print(f"CPU per idle session, now / before: {cpu_ratio:.2f}")
    assert new.budget is not None and new.takeover_from_kill_s is not None and new.takeover_gap_s is not None
    assert new.handed_s is not None
    checks = [
        (f"checks per server per interval: {new_checks:.2f}", "expected 1.0 (±0.15)", abs(new_checks - 1) <= 0.15),
        (
            f"PostgreSQL connections, max: {max(new.connections)} (before {max(old.connections)})",
            f"budget {new.budget}",
            max(new.connections) <= new.budget,
        ),
        (
            f"takeover: lease held by another process {new.handed_s:.2f} s after the kill",
            f"<= {args.interval:g} s (sweep: 1 s)",
            new.handed_s <= args.interval,
        ),
        (
            f"  its first check: {new.takeover_gap_s:.2f} s after the one before the kill",
            f"<= {args.interval + RHYTHM_SLACK_S:g} s, none skipped",
            new.takeover_gap_s <= args.interval + RHYTHM_SLACK_S,
        ),
        (f"  ({new.takeover_from_kill_s:.2f} s after the kill, which came right after a check)", "", None),
    ]
    print()
    failed = 0
    for what, expected, ok in checks:
        verdict = "" if ok is None else ("MET" if ok else "NOT MET")
        failed += ok is False
        print(f"{what:<64}{expected:<24}{verdict}")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--sessions", type=int, default=200, help="in all, spread over the processes")
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--interval", type=float, default=3.0, help="health interval, seconds")
    parser.add_argument("--window", type=int, default=5, help="intervals measured")
    parser.add_argument(
        "--before-sessions",
        type=int,
        default=16,
        help="sessions of the fleet as it ran before (a LISTEN connection each: at 200 it exceeds PostgreSQL's "
        "default max_connections, 100, and cannot start)",
    )
    args = parser.parse_args()
    if min(args.sessions, args.before_sessions) < args.processes:
        parser.error("--sessions and --before-sessions must be at least --processes")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")  # pgserver via platformdirs
    procs: list[subprocess.Popen[str]] = []
    try:
        ports = [
            spawn("demo_server.py", ["--transport", "streamable-http", "--name", f"s{i}"], procs)
            for i in range(args.servers)
        ]
        results = asyncio.run(run(args, ports))
    finally:
        stop(procs)
    sys.exit(report(results, args))


if __name__ == "__main__":
    main()
