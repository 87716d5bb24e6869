"""What the database tells a process: the registry changed, a server's status changed, health leases are free.

One `Signals` per process feeds every session in it. It listens either on one PostgreSQL connection of its own
(`direct`: LISTEN on both channels, and a sweep for free health leases once a second while someone wants them),
or through the machine's relay (`relay.py`), which does that once for all the job processes of a LiveKit worker,
so a session holds no database connection just to listen.

Signals are hints: a `resync` follows every (re)connect, because notifications sent while nobody listened are
lost, and listeners then re-read the tables they care about.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import psycopg

from mcp_integration.aio import Backoff
from mcp_integration.registry import connect_defaults

__all__ = ["CHANNELS", "SWEEP_S", "Signal", "SignalKind", "Signals", "free_leases"]

log = logging.getLogger(__name__)

SignalKind = Literal["servers", "health", "leases", "resync"]
# Channel -> signal kind. `mcp_servers_changed`: migration 002; `mcp_health_changed`: migration 010.
CHANNELS: dict[str, SignalKind] = {"mcp_servers_changed": "servers", "mcp_health_changed": "health"}
# How often free health leases are looked for: a dead checker's servers are offered within this long.
SWEEP_S = 1.0
MAX_BACKOFF_S = 5.0

# Leases nobody holds: never claimed, released, past their time, or held from a database session that is gone
# (its process died: PostgreSQL ends the session at once, which makes the takeover prompt).
_FREE_LEASES_SQL = """
SELECT s.id FROM mcp_servers s LEFT JOIN mcp_health_leases l ON l.server_id = s.id
WHERE s.enabled AND (l.server_id IS NULL OR l.holder IS NULL OR l.held_until < now()
      OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = l.holder_pid))
ORDER BY s.id
"""


@dataclass(frozen=True)
class Signal:
    kind: SignalKind
    data: dict[str, Any] = field(default_factory=dict)

    def line(self) -> bytes:
        return (json.dumps({"kind": self.kind, "data": self.data}, separators=(",", ":")) + "\n").encode()

    @classmethod
    def parse(cls, line: bytes) -> Signal | None:
        try:
            msg = json.loads(line)
            if msg["kind"] in get_args(SignalKind) and isinstance(msg["data"], dict):
                return cls(msg["kind"], msg["data"])
        except (ValueError, KeyError, TypeError):
            pass
        return None


Listener = Callable[[Signal], None]


async def free_leases(conn: psycopg.AsyncConnection[Any]) -> list[int]:
    """The ids of enabled servers whose health lease nobody holds; none before migration 010. `conn` returns
    tuples (the listening connection, not the registry's pool)."""
    try:
        cur = await conn.execute(_FREE_LEASES_SQL)
    except psycopg.errors.UndefinedTable:
        return []
    return [row[0] for row in await cur.fetchall()]


class Signals:
    """A process's signals, from PostgreSQL directly or from a relay socket (`relay`: its path)."""

    def __init__(self, conninfo: str, *, relay: str | None = None, sweep_s: float = SWEEP_S) -> None:
        self.conninfo = conninfo
        self.relay = relay
        self.sweep_s = sweep_s
        self.ready = asyncio.Event()  # listening now (a resync was sent)
        # Set by whoever claims leases here (health_lease.py); a direct connection sweeps only then.
        self.sweep = False
        self.schema: str | None = None  # the registry's schema, to tell our health changes from another's
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def mode(self) -> Literal["direct", "relay"]:
        return "relay" if self.relay else "direct"

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def start(self) -> Signals:
        if self._task is None:
            run = self._from_relay if self.relay else self._direct
            self._task = asyncio.create_task(run(), name=f"signals-{self.mode}")
        return self

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.ready.clear()

    def emit(self, signal: Signal) -> None:
        for listener in list(self._listeners):
            try:
                listener(signal)
            except Exception:
                log.exception("a %s signal listener failed", signal.kind)

    # -- sources --------------------------------------------------------------------------------------------

    async def _direct(self) -> None:
        backoff = Backoff(0.5, MAX_BACKOFF_S, jitter=(0.8, 1.0))
        while True:
            try:
                options = connect_defaults(self.conninfo)
                async with await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True, **options) as conn:
                    row = await (await conn.execute("SELECT current_schema()")).fetchone()
                    self.schema = row[0] if row else None
                    for channel in CHANNELS:
                        await conn.execute(f"LISTEN {channel}")
                    self.ready.set()
                    backoff.reset()
                    self.emit(Signal("resync"))  # whatever changed while we were not listening
                    while True:
                        async for note in conn.notifies(timeout=self.sweep_s):
                            self._notified(note.channel, note.payload)
                        if self.sweep:
                            free = await free_leases(conn)
                            if free:
                                self.emit(Signal("leases", {"servers": free}))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._lost(f"{type(exc).__name__}", backoff)

    async def _from_relay(self) -> None:
        assert self.relay is not None
        backoff = Backoff(0.2, MAX_BACKOFF_S, jitter=(0.8, 1.0))
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.relay, limit=2**20)
                try:
                    self.ready.set()
                    backoff.reset()
                    self.emit(Signal("resync"))
                    while line := await reader.readline():
                        signal = Signal.parse(line)
                        if signal is not None:
                            self.emit(signal)
                finally:
                    writer.close()
                raise ConnectionResetError("the relay closed the connection")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._lost(f"relay {self.relay}: {type(exc).__name__}", backoff)

    async def _lost(self, reason: str, backoff: Backoff) -> None:
        self.ready.clear()
        delay = backoff.next()
        log.warning("database signals interrupted (%s); retrying in %.1f s", reason, delay)
        await asyncio.sleep(delay)

    def _notified(self, channel: str, payload: str) -> None:
        kind = CHANNELS.get(channel)
        if kind is None:
            return
        try:
            data = json.loads(payload) if payload else {}
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        if kind == "health" and data.get("schema") not in (None, self.schema):
            return  # another registry in the same database
        self.emit(Signal(kind, data))
