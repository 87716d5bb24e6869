"""What each server negotiated last time, so the next connect can skip the negotiation.

`mcp.Client(mode="auto")` probes `server/discover` (protocol 2026-07-28) before anything else and, on a server of
the handshake era, falls back to `initialize`: one round trip (and both sides' CPU) on every connect, to learn
what rarely changes. Remembered, a handshake-era server is opened with `mode="legacy"` (no probe; `initialize`
is still needed, it creates the session), and a 2026-07-28 server with its version and its stored
`DiscoverResult` (`prior_discover=`), which adopts the session with no round trip at all — while that result is
fresh: a DiscoverResult is a cacheable result, and its `ttlMs` says how long a client may reuse it (0, the SDK
servers' default, means not at all; capped at 24 hours, as the SDK's own response cache caps it). A stale one is
asked again (`server/discover`, one round trip, no fallback), and the new answer stored with its time.

A memory is keyed by a fingerprint of where the server is (transport, URL, command, arguments): a registry row
that moves somewhere else is a new server, and its old memory is ignored. A memory can still be wrong (the server
was upgraded or downgraded in place); `could_be_mismatch` says which failures may mean that, and the connection
then forgets it and negotiates afresh (connection.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import mcp_types as types
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED, INVALID_REQUEST, METHOD_NOT_FOUND, UNSUPPORTED_PROTOCOL_VERSION
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError

from mcp_integration.limits import storable

if TYPE_CHECKING:
    from mcp.client.session import ClientSession

    from mcp_integration.registry import ServerConfig

__all__ = ["ERAS", "MAX_TTL_S", "Era", "KnownProtocol", "could_be_mismatch", "fingerprint", "learned"]

Era = Literal["legacy", "modern"]
ERAS: tuple[Era, ...] = ("legacy", "modern")

# The longest a remembered DiscoverResult is reused, whatever its ttlMs says (the SDK caps its cache so).
MAX_TTL_S = 24 * 60 * 60

# Errors a server gives before it acts on a request: a method it does not know, a protocol version it does not
# speak, a request it cannot take as one (a pre-2026 server asked without a session: "Bad Request: Missing
# session ID"). Only these may be retried after a `tools/call`, which has side effects.
_NOT_ACTED = frozenset({METHOD_NOT_FOUND, UNSUPPORTED_PROTOCOL_VERSION, INVALID_REQUEST})


@dataclass(frozen=True)
class KnownProtocol:
    """What a server negotiated: its era, the protocol version, (modern) its `DiscoverResult` as JSON, and when
    (seconds since the epoch; not part of equality: the same answer learned again is the same memory)."""

    fingerprint: str
    era: Era
    protocol_version: str
    discover: dict[str, Any] | None = None
    seen_at: float | None = field(default=None, compare=False)

    def fresh(self, now: float | None = None) -> bool:
        """Whether this memory may be used as it is: a handshake-era memory always (it only spares the probe,
        and `initialize` still runs); a DiscoverResult within its `ttlMs` of when it was learned."""
        if self.era == "legacy":
            return True
        ttl = (self.discover or {}).get("ttlMs")
        if self.seen_at is None or not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0:
            return False
        return (time.time() if now is None else now) < self.seen_at + min(ttl / 1000, MAX_TTL_S)

    def client_mode(self) -> tuple[str, types.DiscoverResult | None]:
        """`mode=` and `prior_discover=` for `mcp.Client`; ("auto", None) when this SDK cannot use the memory
        (a version it does not speak, a result it cannot read): negotiating costs a round trip, failing a connect."""
        if self.era == "legacy" and self.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS:
            return "legacy", None
        modern = self.era == "modern" and self.protocol_version in MODERN_PROTOCOL_VERSIONS
        if modern and self.discover and self.fresh():
            try:
                return self.protocol_version, types.DiscoverResult.model_validate(self.discover)
            except ValidationError:
                pass
        return "auto", None

    def to_json(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "era": self.era,
            "protocol_version": self.protocol_version,
            "discover": self.discover,
            "seen_at": self.seen_at,
        }

    @classmethod
    def from_json(cls, raw: Any) -> KnownProtocol | None:
        """From `to_json`'s shape (a database row, a snapshot entry); None when it is not one."""
        if not isinstance(raw, dict):
            return None
        era, version, mark = raw.get("era"), raw.get("protocol_version"), raw.get("fingerprint")
        discover = raw.get("discover")
        if era not in ERAS or not isinstance(version, str) or not isinstance(mark, str):
            return None
        if discover is not None and not isinstance(discover, dict):
            return None
        seen = raw.get("seen_at")
        seen_at = float(seen) if isinstance(seen, int | float) and not isinstance(seen, bool) else None
        return cls(mark, era, version, discover if era == "modern" else None, seen_at)


def fingerprint(cfg: ServerConfig) -> str:
    """Where a server is, hashed: a memory is only used for the server it was learned from. References
    (`env:NAME`, `{env:NAME}`) are hashed as written, so no secret value goes into it."""
    where = json.dumps([cfg.transport, cfg.url, cfg.command, list(cfg.args)], separators=(",", ":"))
    return hashlib.sha256(where.encode()).hexdigest()[:32]


def learned(session: ClientSession, mark: str) -> KnownProtocol | None:
    """What a session that just connected negotiated (None if it negotiated nothing we know how to reuse)."""
    version = session.protocol_version
    if version is None:
        return None
    discovered = session.discover_result
    if discovered is not None:
        # Storable as jsonb (no NUL, no lone surrogates), however the server wrote its instructions.
        discover = storable(discovered.model_dump(mode="json", by_alias=True))
        return KnownProtocol(mark, "modern", version, discover, time.time())
    if session.initialize_result is not None:
        return KnownProtocol(mark, "legacy", version, seen_at=time.time())
    return None


def could_be_mismatch(exc: BaseException, *, acted_on: bool = False) -> bool:
    """Whether a failure could mean a remembered protocol no longer fits the server: an MCP error answer or an
    answer we cannot read — not a refused or unreachable connection, not a timeout, not a closed stream.
    `acted_on`: the failed request may have side effects (a `tools/call`), so only errors a server gives
    before acting count (a result that fails validation was acted on)."""
    leaves = _leaves(exc)
    if not leaves:
        return False
    for leaf in leaves:
        if isinstance(leaf, MCPError):
            if leaf.error.code == CONNECTION_CLOSED:
                return False
            if acted_on and leaf.error.code not in _NOT_ACTED:
                return False
        elif acted_on:
            return False
        elif not isinstance(leaf, ValidationError | RuntimeError):
            # RuntimeError: the SDK's own era checks ("Unsupported protocol version from the server", "No
            # mutually supported modern protocol version"). Anything else (OSError, httpx errors, timeouts)
            # says the server is unreachable or slow, not that it changed.
            return False
    return True


def _leaves(exc: BaseException) -> list[BaseException]:
    # anyio wraps what fails inside a task group (the SDK's transports, its session) in exception groups.
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]
