"""OAuth state in PostgreSQL (`mcp_oauth`), shared by every worker: tokens and client registrations sealed by
`vault.py`, the discovered metadata, and what may be shown (expiry, scope, issuer, subject, needs_login).

A refresh runs inside `locked(server)`: one transaction holding an advisory lock keyed on the server's id, in
which the worker rereads the tokens (another may have refreshed already) and, if it still must, refreshes and
writes on that same connection. Rotating refresh tokens are therefore used once, however many workers (job
processes, machines) see the expiry at the same moment.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from mcp_integration.registry import Registry
from mcp_integration.scrubber import known
from mcp_integration.vault import KEY_VARIABLE, Vault, VaultError

__all__ = ["OAuthState", "OAuthStore", "StoredTokens"]

log = logging.getLogger(__name__)

# The advisory lock's first key: this table's refreshes (the second is the server id).
_LOCK_CLASS = 0x6F61  # "oa"


@dataclass(frozen=True)
class StoredTokens:
    token: dict[str, Any]  # an OAuth token response (access_token, refresh_token, scope, expires_in, ...)
    expires_at: float | None  # epoch seconds

    @property
    def access_token(self) -> str | None:
        return self.token.get("access_token")


@dataclass(frozen=True)
class OAuthState:
    """What may be shown of a server's OAuth state: nothing secret."""

    server: str
    has_tokens: bool
    expires_at: datetime | None
    scope: str | None
    issuer: str | None
    subject: str | None
    needs_login: bool
    needed_scope: str | None
    reason: str | None
    refreshes: int
    logged_in_at: datetime | None
    refreshed_at: datetime | None


_STATE_SQL = """
SELECT s.name, o.tokens IS NOT NULL AS has_tokens, o.expires_at, o.scope, o.issuer, o.subject, o.needs_login,
       o.needed_scope, o.reason, o.refreshes, o.logged_in_at, o.refreshed_at
FROM mcp_oauth o JOIN mcp_servers s ON s.id = o.server_id
"""


class OAuthStore:
    def __init__(self, registry: Registry, vault: Vault | None) -> None:
        self.registry = registry
        self.vault = vault

    def require_vault(self) -> None:
        self._vault()

    def _vault(self) -> Vault:
        if self.vault is None:
            raise VaultError(
                f"OAuth tokens are stored encrypted: set {KEY_VARIABLE} (make a key with "
                "`python -m mcp_integration secret-key`) in every worker's environment"
            )
        return self.vault

    # -- what may be shown ------------------------------------------------------------------------------------

    async def states(self) -> dict[str, OAuthState]:
        async with self.registry.pool.connection() as conn:
            rows = await (await conn.execute(_STATE_SQL)).fetchall()
        return {r["name"]: OAuthState(**{"server": r.pop("name"), **r}) for r in rows}

    async def state(self, server: str) -> OAuthState | None:
        async with self.registry.pool.connection() as conn:
            row = await (await conn.execute(_STATE_SQL + " WHERE s.name = %s", (server,))).fetchone()
        return OAuthState(**{"server": row.pop("name"), **row}) if row else None

    # -- tokens, client, metadata -----------------------------------------------------------------------------

    async def tokens(self, server: str, conn: AsyncConnection[Any] | None = None) -> StoredTokens | None:
        row = await self._row(server, "tokens, expires_at", conn)
        if row is None or row["tokens"] is None:
            return None
        token = self._vault().open(f"{server}/tokens", row["tokens"])
        for key in ("access_token", "refresh_token", "id_token"):
            if token.get(key):
                known.add(token[key])
        expires = row["expires_at"].timestamp() if row["expires_at"] else None
        return StoredTokens(token, expires)

    async def client(self, server: str) -> dict[str, Any] | None:
        row = await self._row(server, "client", None)
        if row is None or row["client"] is None:
            return None
        client = self._vault().open(f"{server}/client", row["client"])
        if client.get("client_secret"):
            known.add(client["client_secret"])
        return client

    async def metadata(self, server: str) -> dict[str, Any]:
        row = await self._row(server, "metadata", None)
        return dict(row["metadata"]) if row else {}

    async def save_tokens(
        self,
        server: str,
        token: dict[str, Any],
        *,
        refreshed: bool,
        metadata: dict[str, Any] | None = None,
        subject: str | None = None,
        conn: AsyncConnection[Any] | None = None,
    ) -> float | None:
        """Store a token response (sealed); returns its expiry (epoch seconds). A refresh counts in `refreshes`; a
        new grant (login, client credentials) clears needs_login."""
        for key in ("access_token", "refresh_token", "id_token"):
            if token.get(key):
                known.add(token[key])
        sealed = self._vault().seal(f"{server}/tokens", token)
        lifetime = token.get("expires_in")
        expires_at = (
            datetime.now(UTC) + timedelta(seconds=float(lifetime)) if isinstance(lifetime, int | float) else None
        )
        issuer = (metadata or {}).get("asm", {}).get("issuer") if metadata else None
        sql = """
            INSERT INTO mcp_oauth (server_id, tokens, expires_at, scope, metadata, issuer, subject,
                                   needs_login, needed_scope, reason, logged_in_at, refreshed_at, refreshes)
            SELECT id, %(sealed)s, %(expires_at)s, %(scope)s, %(metadata)s, %(issuer)s, %(subject)s,
                   false, NULL, NULL, CASE WHEN %(refreshed)s THEN NULL ELSE now() END,
                   CASE WHEN %(refreshed)s THEN now() END, CASE WHEN %(refreshed)s THEN 1 ELSE 0 END
            FROM mcp_servers WHERE name = %(server)s
            ON CONFLICT (server_id) DO UPDATE SET
                tokens = EXCLUDED.tokens, expires_at = EXCLUDED.expires_at, scope = EXCLUDED.scope,
                metadata = CASE WHEN %(has_metadata)s THEN EXCLUDED.metadata ELSE mcp_oauth.metadata END,
                issuer = coalesce(EXCLUDED.issuer, mcp_oauth.issuer),
                subject = coalesce(EXCLUDED.subject, mcp_oauth.subject),
                needs_login = false, needed_scope = NULL, reason = NULL,
                logged_in_at = coalesce(EXCLUDED.logged_in_at, mcp_oauth.logged_in_at),
                refreshed_at = coalesce(EXCLUDED.refreshed_at, mcp_oauth.refreshed_at),
                refreshes = mcp_oauth.refreshes + EXCLUDED.refreshes,
                updated_at = now()
        """
        params = {
            "server": server,
            "sealed": sealed,
            "expires_at": expires_at,
            "scope": token.get("scope"),
            "metadata": Jsonb(metadata or {}),
            "has_metadata": bool(metadata),
            "issuer": issuer,
            "subject": subject,
            "refreshed": refreshed,
        }
        await self._execute(sql, params, conn)
        return expires_at.timestamp() if expires_at else None

    async def save_client(self, server: str, client: dict[str, Any]) -> None:
        if client.get("client_secret"):
            known.add(client["client_secret"])
        sealed = self._vault().seal(f"{server}/client", client)
        await self._execute(
            "INSERT INTO mcp_oauth (server_id, client) SELECT id, %(sealed)s FROM mcp_servers WHERE name = %(server)s"
            " ON CONFLICT (server_id) DO UPDATE SET client = EXCLUDED.client, updated_at = now()",
            {"server": server, "sealed": sealed},
            None,
        )

    async def needs_login(self, server: str, reason: str, scope: str | None = None) -> None:
        await self._execute(
            "INSERT INTO mcp_oauth (server_id, needs_login, reason, needed_scope)"
            " SELECT id, true, %(reason)s, %(scope)s FROM mcp_servers WHERE name = %(server)s"
            " ON CONFLICT (server_id) DO UPDATE SET needs_login = true, reason = EXCLUDED.reason,"
            " needed_scope = coalesce(EXCLUDED.needed_scope, mcp_oauth.needed_scope), updated_at = now()",
            {"server": server, "reason": reason, "scope": scope},
            None,
        )

    async def set_aside_tokens(self, server: str) -> dict[str, Any] | None:
        """Before a login: the tokens go (so the server asks again; the client registration stays). Returns them,
        still sealed, so a login that fails can put them back (`put_back_tokens`) instead of logging every worker
        out."""
        async with self.registry.pool.connection() as conn, conn.transaction():
            row = await (
                await conn.execute(
                    "SELECT tokens, expires_at FROM mcp_oauth"
                    " WHERE server_id = (SELECT id FROM mcp_servers WHERE name = %s) FOR UPDATE",
                    (server,),
                )
            ).fetchone()
            if row is None or row["tokens"] is None:
                return None
            await conn.execute(
                "UPDATE mcp_oauth SET tokens = NULL, expires_at = NULL, updated_at = now()"
                " WHERE server_id = (SELECT id FROM mcp_servers WHERE name = %s)",
                (server,),
            )
            return dict(row)

    async def put_back_tokens(self, server: str, saved: dict[str, Any]) -> None:
        # Only where nothing newer was stored meanwhile (a login elsewhere, a client-credentials grant).
        await self._execute(
            "UPDATE mcp_oauth SET tokens = %(tokens)s, expires_at = %(expires_at)s, updated_at = now()"
            " WHERE server_id = (SELECT id FROM mcp_servers WHERE name = %(server)s) AND tokens IS NULL",
            {"server": server, **saved},
            None,
        )

    async def forget_client(self, server: str) -> None:
        """A dynamically registered client that can no longer be used (its redirect address cannot be served, or
        it was registered for fewer scopes than a step-up needs): register anew."""
        await self._execute(
            "UPDATE mcp_oauth SET client = NULL, updated_at = now()"
            " WHERE server_id = (SELECT id FROM mcp_servers WHERE name = %(server)s)",
            {"server": server},
            None,
        )

    async def forget(self, server: str) -> bool:
        """Logout: tokens, registration and metadata, all of it."""
        async with self.registry.pool.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM mcp_oauth WHERE server_id = (SELECT id FROM mcp_servers WHERE name = %s)", (server,)
            )
            return cur.rowcount > 0

    @asynccontextmanager
    async def locked(self, server: str) -> AsyncIterator[AsyncConnection[Any]]:
        """A transaction holding the server's refresh lock; reads and writes given its connection see and make
        the state every other worker will see once it commits."""
        started = time.monotonic()
        async with self.registry.pool.connection() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(%s, coalesce((SELECT id FROM mcp_servers WHERE name = %s), 0)::int)",
                (_LOCK_CLASS, server),
            )
            waited = time.monotonic() - started
            if waited > 0.5:
                log.info("server %s: waited %.1f s for another worker's token refresh", server, waited)
            yield conn

    # -- plumbing ----------------------------------------------------------------------------------------------

    async def _row(self, server: str, columns: str, conn: AsyncConnection[Any] | None) -> dict[str, Any] | None:
        sql = f"SELECT {columns} FROM mcp_oauth WHERE server_id = (SELECT id FROM mcp_servers WHERE name = %s)"
        if conn is not None:
            return await (await conn.execute(sql, (server,))).fetchone()
        async with self.registry.pool.connection() as own:
            return await (await own.execute(sql, (server,))).fetchone()

    async def _execute(self, sql: str, params: dict[str, Any], conn: AsyncConnection[Any] | None) -> None:
        if conn is not None:
            await conn.execute(sql, params)
            return
        async with self.registry.pool.connection() as own:
            await own.execute(sql, params)
