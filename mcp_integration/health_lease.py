"""Health leases: one checker per server for the whole fleet.

A row per server in `mcp_health_leases` (migration 010) names the monitor that checks it (`holder`), the
database session it holds it from (`holder_pid`), until when (`held_until`), and when the next check is due
(`due_at`, the same for whoever holds the lease next, so a takeover keeps the fleet's rhythm: one check per
interval, not one more). A lease is free when nobody holds it, when its time ran out (a holder whose process
hangs), or when its session is gone: PostgreSQL ends a dead process's session at once, so a takeover waits for
the next sweep (`signals.SWEEP_S`), not for a timeout. Claims take `FOR UPDATE SKIP LOCKED`, so two processes
claiming at once never both win.

`Leases` is the process's side: a database connection of its own, opened when a monitor here first claims and
closed when none holds anything (the connection *is* the holder's liveness, so it cannot come from a pool that
may close or swap it), and the lease offers the process hears (`Signals`), handed to one of its monitors.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from mcp_integration.aio import spawn
from mcp_integration.registry import connect_defaults
from mcp_integration.signals import Signal, Signals

__all__ = ["Claimant", "Leases", "holder_token"]

log = logging.getLogger(__name__)

_ENSURE_SQL = (
    "INSERT INTO mcp_health_leases (server_id) SELECT id FROM mcp_servers WHERE id = ANY(%(ids)s)"
    " ON CONFLICT (server_id) DO NOTHING"
)
# Free (see signals._FREE_LEASES_SQL) or ours already. held_until: the holder has until one interval after the
# check is due to check and renew; past that its lease is free even if its session lives (a hung process).
_CLAIM_SQL = """
UPDATE mcp_health_leases l
SET holder = %(me)s, holder_pid = pg_backend_pid(),
    held_until = greatest(l.due_at, now()) + make_interval(secs => %(interval)s)
WHERE l.server_id IN (
    SELECT server_id FROM mcp_health_leases
    WHERE server_id = ANY(%(ids)s)
      AND (holder IS NULL OR holder = %(me)s OR held_until < now()
           OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = holder_pid))
    FOR UPDATE SKIP LOCKED)
RETURNING l.server_id, greatest(0, extract(epoch FROM l.due_at - now()))::float8 AS due_in
"""
# The next check is due one interval after this one was (a steady rhythm that the checks' own length does not
# stretch), or one interval from now when the holder fell behind.
_CHECKED_SQL = """
UPDATE mcp_health_leases
SET due_at = CASE WHEN due_at + make_interval(secs => %(interval)s) > now()
                  THEN due_at + make_interval(secs => %(interval)s)
                  ELSE now() + make_interval(secs => %(interval)s) END,
    held_until = now() + make_interval(secs => 2 * %(interval)s)
WHERE server_id = %(id)s AND holder = %(me)s AND holder_pid = pg_backend_pid()
RETURNING greatest(0, extract(epoch FROM due_at - now()))::float8 AS due_in
"""
_RELEASE_SQL = (
    "UPDATE mcp_health_leases SET holder = NULL, holder_pid = NULL, held_until = NULL"
    " WHERE holder = %(me)s AND server_id = ANY(%(ids)s)"
)


def holder_token() -> str:
    """Who holds a lease, readable in the table: host, process, and which monitor of that process."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


# A monitor's answer to an offer: claim these (of the offered server ids) if you like, returning what you got.
Claimant = Callable[[list[int]], Awaitable[None]]


class Leases:
    """The health leases of one process's monitors, on one connection held only while they hold a lease."""

    def __init__(self, conninfo: str, signals: Signals) -> None:
        self.conninfo = conninfo
        self.signals = signals
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()
        self._held: dict[str, set[int]] = {}  # by holder token
        self._claimants: dict[str, Claimant] = {}
        self._unsubscribe: Callable[[], None] | None = None
        self._offers: set[asyncio.Task[None]] = set()

    # -- monitors -------------------------------------------------------------------------------------------

    def join(self, token: str, claimant: Claimant) -> None:
        """A monitor wants to check servers; offers of free leases go to the first monitor that joined."""
        self._claimants[token] = claimant
        self.signals.sweep = True
        if self._unsubscribe is None:
            self._unsubscribe = self.signals.subscribe(self._offered)

    async def leave(self, token: str) -> None:
        self._claimants.pop(token, None)
        held = self._held.pop(token, set())
        if held:
            await self._run(_RELEASE_SQL, {"me": token, "ids": sorted(held)}, fetch=False)
        await self._close_if_idle()

    def _offered(self, signal: Signal) -> None:
        if signal.kind not in ("leases", "resync") or not self._claimants:
            return
        ids = [int(i) for i in signal.data.get("servers", [])] if signal.kind == "leases" else []
        # One monitor claims for the process (the first: the longest-lived session); a resync asks it to claim
        # whatever it knows, as leases may have been freed while nobody listened.
        claimant = next(iter(self._claimants.values()))
        spawn(claimant(ids), self._offers)

    # -- the database ---------------------------------------------------------------------------------------

    def held(self, token: str) -> set[int]:
        return set(self._held.get(token, ()))

    async def claim(self, token: str, ids: list[int], interval_s: float) -> dict[int, float]:
        """Claim the free leases among `ids` (or renew our own): {server id: seconds until its check is due}."""
        if not ids:
            return {}
        params = {"me": token, "ids": sorted(set(ids)), "interval": interval_s}
        async with self._lock:
            conn = await self._connection()
            try:
                await conn.execute(_ENSURE_SQL, params)
                rows = await (await conn.execute(_CLAIM_SQL, params)).fetchall()
            except psycopg.OperationalError:
                await self._dropped()
                raise
            got = {int(r[0]): float(r[1]) for r in rows}
            if got:
                self._held.setdefault(token, set()).update(got)
            elif not any(self._held.values()):
                # Another process holds them: this one keeps no connection open for nothing.
                await conn.close()
                self._conn = None
        return got

    async def checked(self, token: str, server_id: int, interval_s: float) -> float | None:
        """Record a check; seconds until the next is due, or None when the lease is no longer ours."""
        params = {"me": token, "id": server_id, "interval": interval_s}
        rows = await self._run(_CHECKED_SQL, params, fetch=True)
        if rows:
            return float(rows[0][0])
        self._held.get(token, set()).discard(server_id)
        return None

    async def _run(self, sql: str, params: dict[str, Any], *, fetch: bool) -> list[Any]:
        async with self._lock:
            if self._conn is None or self._conn.closed:
                if not fetch:
                    return []  # a release on a lost connection: its leases went with it
                self._forget_all()
                return []
            try:
                cur = await self._conn.execute(sql, params)
                return await cur.fetchall() if fetch else []
            except psycopg.OperationalError as exc:
                log.warning("health leases: connection lost (%s); leases are offered again", type(exc).__name__)
                await self._dropped()
                return []

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._forget_all()  # a new session: whatever the old one held is free now
            options = connect_defaults(self.conninfo)
            self._conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True, **options)
        return self._conn

    def _forget_all(self) -> None:
        for held in self._held.values():
            held.clear()

    async def _dropped(self) -> None:
        self._forget_all()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _close_if_idle(self) -> None:
        async with self._lock:
            if self._conn is not None and not any(self._held.values()):
                await self._conn.close()
                self._conn = None

    async def aclose(self) -> None:
        for token in list(self._claimants):
            await self.leave(token)
        for task in list(self._offers):
            task.cancel()
        await asyncio.gather(*self._offers, return_exceptions=True)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        async with self._lock:
            if self._conn is not None:
                await self._conn.close()
                self._conn = None
