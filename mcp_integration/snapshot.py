"""The last-known registry on disk: what a session starts from when the database is unreachable (runtime.py).

The file holds the enabled servers, their tool cache and their remembered protocols exactly as the registry holds
them: header and env values stay `env:NAME` references (or the literals the registry already had), never resolved
secrets. It is written after each successful load from the database and after each discovery or registry change,
atomically (a temporary file renamed over the old one), readable by its owner only.
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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mcp_integration.explain import describe
from mcp_integration.protocol_memory import KnownProtocol
from mcp_integration.registry import ServerConfig, ToolSpec

__all__ = [
    "FORMAT",
    "Snapshot",
    "SnapshotError",
    "ago",
    "read_snapshot",
    "save",
    "write_snapshot",
]


log = logging.getLogger(__name__)

FORMAT = 1
_SERVER_FIELDS = {f.name for f in dataclasses.fields(ServerConfig)}
_TOOL_FIELDS = {f.name for f in dataclasses.fields(ToolSpec)}
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
    # What each server negotiated (protocol_memory.py); a file written before this existed has none.
    protocols: dict[str, KnownProtocol] = field(default_factory=dict)

    @property
    def age_s(self) -> float:
        return max(0.0, (datetime.now(UTC) - self.saved_at).total_seconds())


def write_snapshot(
    path: Path,
    servers: list[ServerConfig],
    tools: dict[str, list[ToolSpec]],
    protocols: dict[str, KnownProtocol] | None = None,
) -> Snapshot:
    """Replace the file at `path` with these servers, tools and protocols, atomically; mode 0600."""
    snap = Snapshot(datetime.now(UTC), list(servers), {k: list(v) for k, v in tools.items()}, dict(protocols or {}))
    body = {
        "format": FORMAT,
        "saved_at": snap.saved_at.isoformat(),
        "servers": [dataclasses.asdict(cfg) for cfg in snap.servers],
        "tools": {name: [dataclasses.asdict(t) for t in specs] for name, specs in snap.tools.items()},
        "protocols": {name: memory.to_json() for name, memory in snap.protocols.items()},
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
        # Only an optimisation: an entry that cannot be read is left out, never a reason to refuse the file.
        stored = body.get("protocols")
        stored = stored if isinstance(stored, dict) else {}
        remembered = {name: KnownProtocol.from_json(raw) for name, raw in stored.items()}
        protocols = {name: memory for name, memory in remembered.items() if memory is not None}
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"registry snapshot {path} is not usable: {describe(exc)}") from None
    return Snapshot(saved_at, servers, tools, protocols)


async def save(
    path: Path,
    servers: list[ServerConfig],
    tools: dict[str, list[ToolSpec]],
    protocols: dict[str, KnownProtocol] | None = None,
) -> bool:
    """Write the snapshot off the event loop. A failure is logged, never raised: the snapshot is a fallback."""
    try:
        await asyncio.to_thread(_write_newest, path, next(_order), servers, tools, protocols)
    except OSError as exc:
        log.warning("registry snapshot not saved to %s: %s", path, describe(exc))
        return False
    return True


def _write_newest(
    path: Path,
    order: int,
    servers: list[ServerConfig],
    tools: dict[str, list[ToolSpec]],
    protocols: dict[str, KnownProtocol] | None,
) -> None:
    # Writes run in threads and may finish out of order: an older state never replaces a newer one.
    with _write_lock:
        if _written.get(path, -1) > order:
            return
        write_snapshot(path, servers, tools, protocols)
        _written[path] = order


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


def ago(seconds: float) -> str:
    """A duration as a person says it: "40 s", "3 min", "2 h", "5 days"."""
    for unit, size in (("day", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= 1.5 * size:
            n = round(seconds / size)
            return f"{n} {unit}s" if unit == "day" else f"{n} {unit}"
    return f"{round(seconds)} s"
