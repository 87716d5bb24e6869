"""A fleet on one registry: several real worker processes (tests/fleet_worker.py), each with sessions, as LiveKit
runs them, sharing health checks through leases, breaker verdicts through LISTEN/NOTIFY, and a connection budget.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import psycopg
import pytest
from conftest import eventually
from fleet_worker import FleetProcess
from psycopg.conninfo import make_conninfo

from mcp_integration.registry import Registry, ServerConfig
from mcp_integration.relay import Relay

INTERVAL = 1.5
APP = "voice-mcp-fleet-test"


@pytest.fixture
def app_url(pg_url: str) -> str:
    return make_conninfo(pg_url, application_name=APP)


@asynccontextmanager
async def fleet(conninfo: str, processes: int, sessions: int, relay: Path | None) -> AsyncIterator[list[FleetProcess]]:
    workers: list[FleetProcess] = []
    try:
        for _ in range(processes):
            env = {"DB_POOL_MAX": "2", "DB_POOL_IDLE_S": "1"}
            args = ("--interval", str(INTERVAL))
            workers.append(await asyncio.to_thread(FleetProcess, conninfo, sessions, relay, args, env))
        yield workers
    finally:
        await asyncio.gather(*(asyncio.to_thread(w.stop) for w in workers))


@pytest.fixture
async def relay(app_url: str, tmp_path: Path) -> AsyncIterator[Path | None]:
    async with _relay_or_none(app_url, tmp_path, True) as path:
        yield path


async def http_servers(registry: Registry, spawn: Callable[..., int], n: int) -> list[ServerConfig]:
    cfgs = []
    for i in range(n):
        port = spawn("--transport", "streamable-http", "--name", f"s{i}")
        cfg = ServerConfig(name=f"s{i}", transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp")
        cfgs.append(await registry.add_server(cfg))
    return cfgs


async def checks_by_server(registry: Registry, since: float) -> dict[int, list[float]]:
    """When each server was checked (epoch seconds) since `since`, from the checks' history."""
    async with registry.pool.connection() as conn:
        rows = await (
            await conn.execute(
                "SELECT server_id, extract(epoch FROM checked_at)::float8 AS at FROM mcp_health_checks"
                " WHERE checked_at >= to_timestamp(%s) ORDER BY checked_at",
                (since,),
            )
        ).fetchall()
    out: dict[int, list[float]] = {}
    for r in rows:
        out.setdefault(r["server_id"], []).append(r["at"])
    return out


async def holders(registry: Registry) -> dict[int, int | None]:
    """Which process holds each server's lease (the pid in its holder token)."""
    async with registry.pool.connection() as conn:
        rows = await (await conn.execute("SELECT server_id, holder FROM mcp_health_leases")).fetchall()
    return {r["server_id"]: int(r["holder"].split(":")[1]) if r["holder"] else None for r in rows}


def connections(base_url: str) -> int:
    with psycopg.connect(base_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (APP,)).fetchone()
        return int(row[0]) if row else 0


async def test_one_checker_per_server_and_a_takeover_when_it_dies(
    registry: Registry, spawn: Callable[..., int], app_url: str, relay: Path
) -> None:
    cfgs = await http_servers(registry, spawn, 2)
    ids = [c.id for c in cfgs]
    async with fleet(app_url, processes=3, sessions=3, relay=relay) as workers:
        held = await eventually(lambda: _all_held(registry, ids), 20, "every server's lease held by a worker")
        start = time.time()
        await asyncio.sleep(INTERVAL * 6)
        seen = await checks_by_server(registry, start)
        for server_id in ids:
            n = len(seen.get(server_id, []))
            # Nine sessions in three processes; one check per interval between them (a window edge may add one).
            assert 4 <= n <= 7, f"server {server_id}: {n} checks in {INTERVAL * 6:g} s at one per {INTERVAL:g} s"
        stats = [w.ask() for w in workers]
        checkers = {w["pid"] for w in stats if w["checks"]}
        assert checkers <= set(held.values())

        # Kill the process holding the first server's lease: another takes over, on the fleet's rhythm.
        victim = next(w for w in workers if w.pid == held[ids[0]])
        killed_at = time.time()
        victim.kill()
        new = await eventually(lambda: _held_by_other(registry, ids[0], victim.pid), INTERVAL * 3 + 10, "a new holder")
        assert new != victim.pid
        await eventually(
            lambda: _checked_since(registry, ids[0], killed_at), INTERVAL * 3 + 10, "a check by the new holder"
        )
        survivors = [w for w in workers if w is not victim]
        assert any(w.ask()["checks"] for w in survivors)


async def _all_held(registry: Registry, ids: list[int | None]) -> dict[int, int] | None:
    got = await holders(registry)
    return got if all(got.get(i) for i in ids) else None  # type: ignore[return-value]


async def _held_by_other(registry: Registry, server_id: int | None, old: int) -> int | None:
    pid = (await holders(registry)).get(server_id)  # type: ignore[arg-type]
    return pid if pid and pid != old else None


async def _checked_since(registry: Registry, server_id: int | None, since: float) -> bool:
    return bool((await checks_by_server(registry, since)).get(server_id))  # type: ignore[arg-type]


@pytest.mark.parametrize("through", ["relay", "direct"])
async def test_a_server_found_down_is_refused_by_every_process_and_back_for_all(
    registry: Registry, spawn: Callable[..., int], app_url: str, tmp_path: Path, through: str
) -> None:
    (cfg,) = await http_servers(registry, spawn, 1)
    assert cfg.url is not None
    port = int(cfg.url.rsplit(":", 1)[1].split("/")[0])
    relay_cm = _relay_or_none(app_url, tmp_path, through == "relay")
    async with relay_cm as relay, fleet(app_url, processes=3, sessions=2, relay=relay) as workers:
        await eventually(lambda: _all_held(registry, [cfg.id]), 20, "the lease held")
        server = spawn.procs[0]  # type: ignore[attr-defined]
        server.kill()
        server.wait(5)

        def everyone(status: str) -> bool:
            return all(b["s0"] == status for w in workers for b in w.ask()["breakers"])

        # Found down by the one checker (three failed checks), refused by all six sessions.
        await eventually(lambda: everyone("down"), INTERVAL * 6 + 15, "every session's breaker down")
        spawn("--transport", "streamable-http", "--name", "s0", "--port", str(port))
        await eventually(lambda: everyone("up"), 90, "every session's breaker up again")


@pytest.mark.parametrize("through", ["relay", "direct"])
async def test_database_connections_stay_within_the_budget(
    registry: Registry, spawn: Callable[..., int], app_url: str, pg_base_url: str, tmp_path: Path, through: str
) -> None:
    await http_servers(registry, spawn, 2)
    processes, sessions = 4, 5
    relay_cm = _relay_or_none(app_url, tmp_path, through == "relay")
    async with relay_cm as relay_path, fleet(app_url, processes, sessions, relay=relay_path) as workers:
        # Per machine: the relay's one; per process: the pool's 2 at most, and 1 for leases while holding any;
        # per process without a relay: 1 more, its own LISTEN (README: "Connection budget").
        per_process = 2 + 1 + (0 if relay_path else 1)
        budget = (1 if relay_path else 0) + processes * per_process
        samples = []
        for _ in range(30):
            samples.append(await asyncio.to_thread(connections, pg_base_url))
            await asyncio.sleep(0.2)
        assert max(samples) <= budget, f"connections {max(samples)} > budget {budget} ({samples})"
        # Quiet sessions hold no pooled connection: left are the relay (or each process's listener) and, in each
        # process holding leases, its lease connection and the pool's connections that record its checks.
        checkers = len({pid for pid in (await holders(registry)).values() if pid})
        quiet = (1 if relay_path else processes) + checkers * 3
        try:
            await eventually(lambda: connections(pg_base_url) <= quiet, 20, f"at most {quiet} connections when quiet")
        except AssertionError:
            with psycopg.connect(pg_base_url, autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT pid, state, left(query, 60), now() - state_change FROM pg_stat_activity"
                    " WHERE application_name = %s",
                    (APP,),
                ).fetchall()
            raise AssertionError(f"connections when quiet: {rows}") from None
        assert all(w.ask()["sessions"] == sessions for w in workers)


@asynccontextmanager
async def _relay_or_none(conninfo: str, tmp_path: Path, wanted: bool) -> AsyncIterator[Path | None]:
    if not wanted:
        yield None
        return
    path = tmp_path / "relay.sock"
    r = await Relay(conninfo, path).start()
    await asyncio.wait_for(r.signals.ready.wait(), 15)
    try:
        yield path
    finally:
        await r.aclose()
