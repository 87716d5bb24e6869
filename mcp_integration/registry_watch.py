"""Keep a running dispatcher in step with the registry, through PostgreSQL LISTEN/NOTIFY.

A trigger (migration 002) notifies `mcp_servers_changed` on every change to `mcp_servers`; the process's
`Signals` (signals.py) hears it, and the watcher then re-reads the enabled servers and adds, replaces or removes
them in the dispatcher. Notifications are only hints: the table is the truth, so a missed or foreign
notification costs one harmless re-read, and every reconnect of the signals brings one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from mcp_integration.aio import Backoff
from mcp_integration.registry import Registry, ServerConfig
from mcp_integration.signals import Signal, Signals

__all__ = ["MAX_BACKOFF_S", "Follower", "RegistryWatcher"]


log = logging.getLogger(__name__)

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
    """Follows the registry through the process's `Signals` (its own, started here, when none is given)."""

    def __init__(
        self,
        registry: Registry,
        dispatcher: Follower,
        *,
        on_change: Callable[[], None] | None = None,
        signals: Signals | None = None,
    ) -> None:
        self.registry = registry
        self.dispatcher = dispatcher
        self.on_change = on_change
        self._own = signals is None
        self.signals = signals if signals is not None else Signals(registry.pool.conninfo)
        self._unsubscribe: Callable[[], None] | None = None
        self._syncing: asyncio.Task[None] | None = None
        self._again = False

    @property
    def listening(self) -> asyncio.Event:
        return self.signals.ready

    def start(self) -> RegistryWatcher:
        self._unsubscribe = self.signals.subscribe(self._signalled)
        if self._own:
            self.signals.start()
        elif self.signals.ready.is_set():
            self._want_sync()  # the process already listens: read once, for what changed before we joined
        return self

    async def aclose(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._syncing is not None:
            self._syncing.cancel()
            await asyncio.gather(self._syncing, return_exceptions=True)
        if self._own:
            await self.signals.aclose()

    def _signalled(self, signal: Signal) -> None:
        if signal.kind in ("servers", "resync"):
            self._want_sync()

    def _want_sync(self) -> None:
        # A burst of notifications (an import of fifty servers) costs one re-read in flight and one after it.
        if self._syncing is not None and not self._syncing.done():
            self._again = True
            return
        self._syncing = asyncio.get_running_loop().create_task(self._sync_until_current(), name="registry-sync")

    async def _sync_until_current(self) -> None:
        backoff = Backoff(0.5, MAX_BACKOFF_S, jitter=(0.8, 1.0))
        while True:
            self._again = False
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = backoff.next()
                log.warning("registry not re-read (%s); retrying in %.1f s", type(exc).__name__, delay)
                await asyncio.sleep(delay)
                self._again = True
            if not self._again:
                return

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
