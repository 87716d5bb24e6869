"""A server's tools/list answer kept while the server says it holds, so a session start can ask it nothing.

A 2026-07-28 server may mark its tools/list result cacheable (`ttlMs`, `cacheScope`): a client may reuse it for
that long. The SDK's `Client` honours that through its response cache (`CacheConfig(store=...)`), and a served
hit is re-absorbed by the session (the tools' output schemas for result validation, their `x-mcp-header` maps for
`Mcp-Param-*` headers), exactly as a listing from the wire would be. So this is only the SDK's cache store, one
per server connection, seeded from the registry (`mcp_tool_lists`) and telling the dispatcher what to store back.

Only the cursor-less `tools/list` entry is kept, and only when it is the whole list: the SDK caches no
continuation page, so a kept first page would send its stored cursor to the server at the next start, one the
server may no longer know (cursors are opaque, and a server that restarted or dropped its listing refuses them),
and a start would ask the server anyway. Every other method is a miss, and our protocol memory
(protocol_memory.py) keeps `server/discover` its own way. The store is per server row, which is one set of
credentials, so a "private" entry stays within the authorization context it came from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import mcp_types as types
from mcp.client.caching import CacheEntry, CacheKey
from pydantic import ValidationError

from mcp_integration.limits import storable

__all__ = ["StoredList", "ToolListStore"]

log = logging.getLogger(__name__)

_METHOD = "tools/list"


@dataclass(frozen=True)
class StoredList:
    """A tools/list answer as kept in the registry: the protocol version it was given under (reused only under the
    same one), the result as JSON, its scope and until when it holds (seconds since the epoch)."""

    protocol_version: str
    result: dict[str, Any]
    scope: Literal["public", "private"]
    expires_at: float


class ToolListStore:
    """The SDK `ResponseCacheStore` of one server connection: holds one tools/list entry, for the connection's
    whole life (reconnects included)."""

    def __init__(self, server: str) -> None:
        self._server = server
        self._entry: CacheEntry | None = None
        self._seed: StoredList | None = None
        self._version: str | None = None  # the protocol version of the connection's current session
        # A fresh answer the SDK stored: the dispatcher writes it to the registry (`take_learned`).
        self._learned: CacheEntry | None = None
        # The registry holds an answer for this server (seeded with one, or one learned was handed over since).
        self._in_registry = False

    def seed(self, stored: StoredList | None) -> None:
        """What the registry holds for this server, served once the session speaks its protocol version."""
        self._seed, self._entry = stored, None
        self._in_registry = stored is not None

    def speaking(self, protocol_version: str) -> None:
        """The connection's session speaks this version now: a seed given under another is not served (the SDK
        keys its entries by protocol era too, and an answer's content differs between eras)."""
        self._version = protocol_version

    def take_learned(self) -> StoredList | None:
        """The fresh answer the SDK stored since last asked, as the registry keeps it (None: nothing new). Handed
        over, it counts as the registry's."""
        learned, self._learned = self._learned, None
        if learned is None or learned.expires_at is None or self._version is None:
            return None
        self._in_registry = True
        result = storable(learned.value.model_dump(mode="json", by_alias=True, exclude_none=True))
        return StoredList(self._version, result, learned.scope, learned.expires_at)

    def take_dropped(self) -> bool:
        """Whether the registry holds an answer this store no longer holds (the server answered without a `ttlMs`,
        said its list changed, or listed several pages): True once, for the dispatcher to delete it."""
        if not self._in_registry or self._entry is not None or self._seed is not None:
            return False
        self._in_registry = False
        return True

    # -- ResponseCacheStore ----------------------------------------------------------------------------------

    async def get(self, key: CacheKey) -> CacheEntry | None:
        if key.method != _METHOD or key.params_key:
            return None
        if self._entry is None and self._seed is not None:
            seed, self._seed = self._seed, None
            if seed.protocol_version != self._version:
                return None
            try:
                result = types.ListToolsResult.model_validate(seed.result)
            except ValidationError as exc:  # stored by an older SDK, say: asked again, not fatal
                log.info("server %s: stored tool list unreadable, asking again: %s", self._server, exc.errors()[0])
                return None
            if result.next_cursor:  # a first page only (kept by an earlier version): asked again, whole
                return None
            self._entry = CacheEntry(value=result, scope=seed.scope, expires_at=seed.expires_at)
        return self._entry

    async def set(self, key: CacheKey, entry: CacheEntry) -> None:
        if key.method != _METHOD or key.params_key:
            return
        if getattr(entry.value, "next_cursor", None):
            # The first of several pages: not kept (see the module's docstring), and one kept before is dropped.
            self._entry = self._seed = self._learned = None
            return
        self._entry = self._learned = entry
        self._seed = None

    async def delete(self, key: CacheKey) -> None:
        if key.method == _METHOD and not key.params_key:
            self._entry = self._seed = None

    async def clear(self) -> None:
        self._entry = self._seed = None
