"""The last-known registry on disk, and a session start that falls back to it when the database is unreachable.

The file holds the enabled servers and their tool cache exactly as the registry holds them: header and env values
stay `env:NAME` references (or the literals the registry already had), never resolved secrets. It is written after
each successful load from the database and after each discovery or registry change, atomically (a temporary file
renamed over the old one), readable by its owner only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import tempfile
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import psycopg

from mcp_integration.connection import describe
from mcp_integration.dispatcher import Dispatcher
from mcp_integration.registry import Registry, ServerConfig, ToolSpec

log = logging.getLogger(__name__)

FORMAT = 1
_SERVER_FIELDS = {f.name for f in dataclasses.fields(ServerConfig)}
_TOOL_FIELDS = {f.name for f in dataclasses.fields(ToolSpec)}
# Strong references to the snapshot writes in flight (asyncio keeps only weak ones).
_writes: set[asyncio.Task[Any]] = set()
_order = itertools.count()
_write_lock = threading.Lock()
_written: dict[Path, int] = {}


class SnapshotError(Exception):
    """The snapshot file exists but cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class Snapshot:
    saved_at: datetime
    servers: list[ServerConfig]
    tools: dict[str, list[ToolSpec]]

    @property
    def age_s(self) -> float:
        return max(0.0, (datetime.now(UTC) - self.saved_at).total_seconds())


def write_snapshot(path: Path, servers: list[ServerConfig], tools: dict[str, list[ToolSpec]]) -> Snapshot:
    """Replace the file at `path` with these servers and tools, atomically; mode 0600."""
    snap = Snapshot(datetime.now(UTC), list(servers), {k: list(v) for k, v in tools.items()})
    body = {
        "format": FORMAT,
        "saved_at": snap.saved_at.isoformat(),
        "servers": [dataclasses.asdict(cfg) for cfg in snap.servers],
        "tools": {name: [dataclasses.asdict(t) for t in specs] for name, specs in snap.tools.items()},
    }
    text = json.dumps(body, ensure_ascii=False, indent=1, default=_encode)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # mkstemp creates the file 0600 in the target's folder, so the rename below is atomic.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return snap


def read_snapshot(path: Path) -> Snapshot | None:
    """The snapshot at `path`, or None when there is none. Raises SnapshotError when it cannot be used."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"registry snapshot {path} is unreadable: {describe(exc)}") from None
    try:
        if body.get("format") != FORMAT:
            raise ValueError(f"format {body.get('format')!r}, expected {FORMAT}")
        servers = [_decode_server(raw) for raw in body["servers"]]
        tools = {
            name: [ToolSpec(**{k: v for k, v in raw.items() if k in _TOOL_FIELDS}) for raw in specs]
            for name, specs in body["tools"].items()
        }
        saved_at = datetime.fromisoformat(body["saved_at"])
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"registry snapshot {path} is not usable: {describe(exc)}") from None
    return Snapshot(saved_at, servers, tools)


def dispatcher_state(dispatcher: Dispatcher) -> tuple[list[ServerConfig], dict[str, list[ToolSpec]]]:
    """What the registry holds once the dispatcher's discoveries are saved: its servers and their tool lists."""
    states = dispatcher.servers
    return [s.cfg for s in states.values()], {name: s.tools for name, s in states.items() if s.tools}


async def save(path: Path, servers: list[ServerConfig], tools: dict[str, list[ToolSpec]]) -> bool:
    """Write the snapshot off the event loop. A failure is logged, never raised: the snapshot is a fallback."""
    try:
        await asyncio.to_thread(_write_newest, path, next(_order), servers, tools)
    except OSError as exc:
        log.warning("registry snapshot not saved to %s: %s", path, describe(exc))
        return False
    return True


def _write_newest(path: Path, order: int, servers: list[ServerConfig], tools: dict[str, list[ToolSpec]]) -> None:
    # Writes run in threads and may finish out of order: an older state never replaces a newer one.
    with _write_lock:
        if _written.get(path, -1) > order:
            return
        write_snapshot(path, servers, tools)
        _written[path] = order


def save_soon(dispatcher: Dispatcher, path: Path) -> None:
    """Save the dispatcher's servers and tools in the background (a registry watcher's `on_change`)."""
    _spawn(save(path, *dispatcher_state(dispatcher)))


@dataclass
class SessionStart:
    """Where a session's servers and tools came from: the database, the on-disk copy, or nowhere yet."""

    source: Literal["database", "snapshot", "empty"]
    age_s: float | None = None
    reason: str | None = None
    saved: asyncio.Task[bool] | None = field(default=None, repr=False)


async def start_dispatcher(
    dispatcher: Dispatcher, path: Path, *, timeout: float = 3.0, migrate: bool = True
) -> SessionStart:
    """Start `dispatcher` from the registry, or, when the database does not answer within `timeout`, from the
    snapshot at `path`. Either way discovery goes on in the background.

    From the database, the snapshot is written at once and again when discovery is done. From the snapshot, one
    warning says so and how old it is; the registry's pool keeps reconnecting, so job records (retried by the
    jobs themselves) land once the database is back, and a registry watcher brings any change made meanwhile.
    """
    registry = dispatcher.registry
    if registry is None:
        raise ValueError("start_dispatcher needs a dispatcher with a registry")
    try:
        servers, cached = await _load(registry, timeout=timeout, migrate=migrate)
    except psycopg.OperationalError as exc:  # unreachable, restarting, or gone mid-query (incl. PoolTimeout)
        return await _start_offline(dispatcher, path, describe(exc))
    _spawn(save(path, servers, cached))  # off the greeting's path, like discovery
    await dispatcher.start(wait=False, servers=servers, cached=cached)
    return SessionStart("database", saved=_spawn(_save_after_discovery(dispatcher, path)))


async def _load(
    registry: Registry, *, timeout: float, migrate: bool
) -> tuple[list[ServerConfig], dict[str, list[ToolSpec]]]:
    await registry.ping(timeout)  # first, within `timeout`: the calls below would each wait the pool's longer one
    if migrate:
        await registry.migrate()  # idempotent; a database that was down when the process started gets it now
    return await registry.list_servers(enabled_only=True), await registry.cached_tools()


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
        await dispatcher.start(wait=False, servers=[], cached={}, recall_health=False)
        return SessionStart("empty", reason=reason)
    age = snap.age_s
    log.warning(
        "database unreachable (%s): starting from the on-disk copy of the registry saved %s ago (%s; %d servers, "
        "%d cached tools); jobs are recorded once the database is back",
        reason,
        _ago(age),
        snap.saved_at.isoformat(timespec="seconds"),
        len(snap.servers),
        sum(len(v) for v in snap.tools.values()),
    )
    await dispatcher.start(wait=False, servers=snap.servers, cached=snap.tools, recall_health=False)
    return SessionStart("snapshot", age_s=age, reason=reason)


async def _save_after_discovery(dispatcher: Dispatcher, path: Path) -> bool:
    await dispatcher.refreshed()
    return await save(path, *dispatcher_state(dispatcher))


def _spawn(coro: Coroutine[Any, Any, bool]) -> asyncio.Task[bool]:
    task = asyncio.ensure_future(coro)
    _writes.add(task)
    task.add_done_callback(_writes.discard)
    return task


def _encode(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot store {type(value).__name__} in a registry snapshot")


def _decode_server(raw: dict[str, Any]) -> ServerConfig:
    values = {k: v for k, v in raw.items() if k in _SERVER_FIELDS}
    for key in ("created_at", "updated_at"):
        if values.get(key) is not None:
            values[key] = datetime.fromisoformat(values[key])
    return ServerConfig(**values)


def _ago(seconds: float) -> str:
    for unit, size in (("day", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= 1.5 * size:
            n = round(seconds / size)
            return f"{n} {unit}s" if unit == "day" else f"{n} {unit}"
    return f"{round(seconds)} s"
