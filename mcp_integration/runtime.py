"""The composition root: one place that builds the pieces from `Settings` and closes them in order.

A `Runtime` is a dispatcher over the registry's servers, the `Health` that gates and checks them, and, as asked,
a registry watcher (LISTEN/NOTIFY) and a health monitor. The voice worker, the status page, the CLI and the
demo all start theirs here, so each concern is wired once:

    async with open_runtime(registry, settings, snapshot=True, watch=True, monitor=True) as rt:
        rt.dispatcher.submit(...)

`snapshot=True` (the worker) starts from the database within `db_start_timeout_s`, or else from the on-disk copy
of the registry (`snapshot.py`), and keeps that copy fresh; otherwise the registry's enabled servers (or the
`servers` given) are loaded, discovered before the context opens (`wait=True`, the CLI) or behind it from the
tool cache (the status page).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psycopg

from mcp_integration.aio import spawn
from mcp_integration.config import Settings
from mcp_integration.dispatcher import Dispatcher
from mcp_integration.explain import describe
from mcp_integration.fleet import Fleet
from mcp_integration.health import Health, HealthMonitor
from mcp_integration.oauth import OAuthBroker
from mcp_integration.oauth_store import OAuthStore
from mcp_integration.protocol_memory import KnownProtocol
from mcp_integration.registry import Registry, ServerConfig, StartCache, ToolSpec
from mcp_integration.registry_watch import RegistryWatcher
from mcp_integration.snapshot import SnapshotError, ago, read_snapshot, save
from mcp_integration.vault import Vault

__all__ = ["Runtime", "SessionStart", "open_runtime"]

log = logging.getLogger(__name__)

# Snapshot writes in flight, kept alive (the event loop holds tasks only weakly); they outlive no process.
_saving: set[asyncio.Task[Any]] = set()


@dataclass
class SessionStart:
    """Where the servers and tools came from: the database, the on-disk copy, or nowhere yet."""

    source: Literal["database", "snapshot", "empty"]
    age_s: float | None = None
    reason: str | None = None
    saved: asyncio.Task[bool] | None = field(default=None, repr=False)


@dataclass
class Runtime:
    settings: Settings
    registry: Registry | None
    dispatcher: Dispatcher
    health: Health
    start: SessionStart
    watcher: RegistryWatcher | None = None
    monitor: HealthMonitor | None = None
    oauth: OAuthBroker | None = None
    fleet: Fleet | None = None


@asynccontextmanager
async def open_runtime(
    registry: Registry | None,
    settings: Settings,
    *,
    servers: list[ServerConfig] | None = None,
    wait: bool = False,
    snapshot: bool = False,
    watch: bool = False,
    monitor: bool = False,
    record_every_check: bool = True,
    check_interval_s: float | None = None,
    fleet: Fleet | None = None,
) -> AsyncIterator[Runtime]:
    # OAuth servers' tokens live in the registry, sealed with the key from the environment (a malformed key fails
    # here, at start; a missing one only when an OAuth server is used).
    oauth = OAuthBroker(OAuthStore(registry, Vault.from_setting(settings.secret_key))) if registry else None
    dispatcher = Dispatcher(
        registry, connect_timeout=settings.connect_timeout_s, auth_for=oauth.auth_for if oauth else None
    )
    async with AsyncExitStack() as stack:
        if fleet is None and registry is not None and (watch or monitor):
            # The process's signals and leases (a voice worker passes the one its process shares by all sessions).
            fleet = Fleet.open(registry, settings)
            stack.push_async_callback(fleet.aclose)
        # Every check recorded (a CLI, the status page, the fleet's one checker of a server), or, without leases,
        # only changes of status.
        health = Health(
            dispatcher,
            record_every_check=record_every_check or fleet is not None,
            signals=fleet.signals if fleet is not None else None,
        )
        stack.push_async_callback(dispatcher.aclose)
        stack.push_async_callback(health.aclose)
        if snapshot:
            start = await start_from_registry_or_snapshot(dispatcher, health, settings.snapshot_path, settings)
        else:
            start = await _start(dispatcher, health, servers, wait=wait)
        rt = Runtime(settings, registry, dispatcher, health, start, oauth=oauth, fleet=fleet)
        signals = fleet.signals if fleet is not None else None
        if watch and registry is not None:
            on_change = (lambda: save_soon(dispatcher, settings.snapshot_path)) if snapshot else None
            rt.watcher = RegistryWatcher(registry, dispatcher, on_change=on_change, signals=signals).start()
            stack.push_async_callback(rt.watcher.aclose)
        if monitor:
            interval = check_interval_s if check_interval_s is not None else settings.health_interval_s
            leases = fleet.leases if fleet is not None else None
            rt.monitor = HealthMonitor(health, interval_s=interval, leases=leases).start()
            stack.push_async_callback(rt.monitor.aclose)
        yield rt


async def _start(
    dispatcher: Dispatcher, health: Health, servers: list[ServerConfig] | None, *, wait: bool
) -> SessionStart:
    # The recorded health beside discovery, not before it: one more query must not delay a start.
    recalling = asyncio.ensure_future(health.recall())
    try:
        await dispatcher.start(wait=wait, servers=servers)
    finally:
        await recalling
    return SessionStart("database")


async def start_from_registry_or_snapshot(
    dispatcher: Dispatcher, health: Health, path: Path, settings: Settings
) -> SessionStart:
    """Start from the registry, or, when the database does not answer within `db_start_timeout_s`, from the
    snapshot at `path`. Either way discovery goes on in the background.

    From the database, the snapshot is written at once and again when discovery is done. From the snapshot, one
    warning says so and how old it is; the registry's pool keeps reconnecting, so job records (retried by the
    jobs themselves) land once the database is back, and a registry watcher brings any change made meanwhile.
    """
    registry = dispatcher.registry
    if registry is None:
        raise ValueError("starting from the registry needs a dispatcher with a registry")
    try:
        servers, cache = await _load(registry, timeout=settings.db_start_timeout_s)
    except psycopg.OperationalError as exc:  # unreachable, restarting, or gone mid-query (incl. PoolTimeout)
        return await _start_offline(dispatcher, path, describe(exc))
    spawn(save(path, servers, cache.tools, cache.protocols), _saving)  # off the greeting's path, like discovery
    recalling = spawn(health.recall(), _saving)  # beside discovery, not before it
    await dispatcher.start(
        wait=False, servers=servers, cached=cache.tools, protocols=cache.protocols, lists=cache.lists
    )
    await recalling
    return SessionStart("database", saved=spawn(_save_after_discovery(dispatcher, path), _saving))


async def _load(registry: Registry, *, timeout: float) -> tuple[list[ServerConfig], StartCache]:
    await registry.ping(timeout)  # first, within `timeout`: the calls below would each wait the pool's longer one
    await registry.migrate()  # idempotent; a database that was down when the process started gets it now
    servers = await registry.list_servers(enabled_only=True)
    return servers, await registry.start_cache()  # the remembered protocols come with the tool cache


async def _start_offline(dispatcher: Dispatcher, path: Path, reason: str) -> SessionStart:
    try:
        snap = await asyncio.to_thread(read_snapshot, path)
    except SnapshotError as exc:
        log.warning("%s", exc)
        snap = None
    if snap is None:
        log.error(
            "database unreachable (%s) and no usable registry snapshot at %s: starting with no MCP tools; "
            "they appear once the database is back",
            reason,
            path,
        )
        await dispatcher.start(wait=False, servers=[], cached={}, protocols={})
        return SessionStart("empty", reason=reason)
    age = snap.age_s
    log.warning(
        "database unreachable (%s): starting from the on-disk copy of the registry saved %s ago (%s; %d servers, "
        "%d cached tools); jobs are recorded once the database is back",
        reason,
        ago(age),
        snap.saved_at.isoformat(timespec="seconds"),
        len(snap.servers),
        sum(len(v) for v in snap.tools.values()),
    )
    await dispatcher.start(
        wait=False, servers=snap.servers, cached=snap.tools, protocols=snap.protocols, cached_is_stored=False
    )
    return SessionStart("snapshot", age_s=age, reason=reason)


def dispatcher_state(
    dispatcher: Dispatcher,
) -> tuple[list[ServerConfig], dict[str, list[ToolSpec]], dict[str, KnownProtocol]]:
    """What the registry holds once the dispatcher's discoveries are saved: its servers, their tool lists and
    what each negotiated."""
    states = dispatcher.servers
    tools = {name: s.tools for name, s in states.items() if s.tools}
    return [s.cfg for s in states.values()], tools, dispatcher.protocols


def save_soon(dispatcher: Dispatcher, path: Path) -> None:
    """Save the dispatcher's servers and tools in the background (a registry watcher's `on_change`)."""
    spawn(save(path, *dispatcher_state(dispatcher)), _saving)


async def _save_after_discovery(dispatcher: Dispatcher, path: Path) -> bool:
    await dispatcher.refreshed()
    return await save(path, *dispatcher_state(dispatcher))
