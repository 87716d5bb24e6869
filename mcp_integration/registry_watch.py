"""Keep a running dispatcher in step with the registry, through PostgreSQL LISTEN/NOTIFY.

A trigger (migration 002) notifies `mcp_servers_changed` on every change to `mcp_servers`; the watcher then
re-reads the enabled servers and adds, replaces or removes them in the dispatcher. Notifications are only
hints: the table is the truth, so a missed or foreign notification costs one harmless re-read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

import psycopg

from mcp_integration.aio import Backoff
from mcp_integration.registry import Registry, ServerConfig, connect_defaults

__all__ = [
    "CHANNEL",
    "MAX_BACKOFF_S",
    "Follower",
    "RegistryWatcher",
]


log = logging.getLogger(__name__)

CHANNEL = "mcp_servers_changed"
MAX_BACKOFF_S = 5.0


def _fingerprint(cfg: ServerConfig) -> tuple[object, ...]:
    return (cfg.id, cfg.updated_at)


class _Server(Protocol):
    cfg: ServerConfig


class Follower(Protocol):
    """What follows the registry (a `Dispatcher`): storage does not import the layers above it."""

    @property
    def servers(self) -> Mapping[str, _Server]: ...
    async def add_server(self, cfg: ServerConfig) -> str | None: ...
    async def remove_server(self, name: str) -> None: ...


class RegistryWatcher:
    def __init__(
        self, registry: Registry, dispatcher: Follower, *, on_change: Callable[[], None] | None = None
    ) -> None:
        self.registry = registry
        self.dispatcher = dispatcher
        self.on_change = on_change
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()

    def start(self) -> RegistryWatcher:
        self._task = asyncio.create_task(self._run(), name="registry-watch")
        return self

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        # Capped low: after a database restart or outage the watch should be back within seconds.
        backoff = Backoff(0.5, MAX_BACKOFF_S, jitter=(0.8, 1.0))
        while True:
            try:
                # A connection of its own: LISTEN holds it for the life of the session.
                conninfo = self.registry.pool.conninfo
                options = connect_defaults(conninfo)
                async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True, **options) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    backoff.reset()
                    await self.sync()  # whatever changed while we were not listening
                    async for _ in conn.notifies():
                        await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.listening.clear()
                delay = backoff.next()
                log.warning("registry watch interrupted (%s); retrying in %.1f s", type(exc).__name__, delay)
                await asyncio.sleep(delay)

    async def sync(self) -> None:
        wanted = {cfg.name: cfg for cfg in await self.registry.list_servers(enabled_only=True)}
        current = self.dispatcher.servers
        changed = False
        for name in set(current) - set(wanted):
            log.info("server %s removed or disabled: dropping its tools", name)
            await self.dispatcher.remove_server(name)
            changed = True
        fresh = [
            cfg
            for name, cfg in wanted.items()
            if name not in current or _fingerprint(current[name].cfg) != _fingerprint(cfg)
        ]
        for cfg in fresh:
            log.info("server %s added or changed: discovering its tools", cfg.name)
        # Concurrently: one slow server must not hold back the others' tools.
        await asyncio.gather(*(self.dispatcher.add_server(cfg) for cfg in fresh))
        changed = changed or bool(fresh)
        if changed and self.on_change is not None:
            self.on_change()
