"""The registry of MCP servers in PostgreSQL: servers, their tool cache, their health, and the jobs record.

Every query is parameterised; the schema lives in numbered files under `migrations/`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import select
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any, Literal, NamedTuple, get_args
from urllib.parse import urlsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from mcp_integration.auth_config import AUTH_MODES, AuthMode, OAuthSettings
from mcp_integration.errors import RegistryError
from mcp_integration.job_queue import JobQueue, JobRow
from mcp_integration.protocol_memory import KnownProtocol
from mcp_integration.scrubber import known
from mcp_integration.secrets import ENV_NAME, ENV_PREFIX, PLACEHOLDER, looks_opaque, redact_url
from mcp_integration.tool_lists import StoredList

__all__ = [
    "CONNECT_DEFAULTS",
    "HEADER_NAME",
    "HEADER_VALUE",
    "INT4_MAX",
    "MAX_TEXT_CHARS",
    "MAX_URL_CHARS",
    "NAME_RE",
    "POLL_PROFILES",
    "POOL_TIMEOUT_S",
    "RECONNECT_GIVE_UP_S",
    "TRANSPORTS",
    "HealthRow",
    "Registry",
    "ServerConfig",
    "StartCache",
    "StatusRows",
    "ToolSpec",
    "Transport",
    "check_pooled",
    "connect_defaults",
    "url_problem",
]


log = logging.getLogger(__name__)

Transport = Literal["stdio", "streamable-http", "sse", "websocket"]
TRANSPORTS: tuple[Transport, ...] = get_args(Transport)
# How a receipt in an ordinary result is polled: auto (recognised by shape), mcp-task, http (generic), n8n, none.
PollProfile = Literal["auto", "mcp-task", "http", "n8n", "none"]
POLL_PROFILES: tuple[PollProfile, ...] = get_args(PollProfile)
NAME_RE = re.compile(r"^[a-z0-9_-]{1,48}$")
# Serialises concurrent migrators (two workers starting at once) without a table lock.
_MIGRATION_LOCK_KEY = 0x6D6370  # "mcp"
_TOOLS_LOCK_KEY = 0x6D6374  # "mct", with the server's id as the second key


# Connection defaults for the pool and the registry watcher's LISTEN connection: a connect attempt to an
# unreachable host gives up, and keepalives end a query whose server vanished without closing the socket.
CONNECT_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}
POOL_TIMEOUT_S = 5.0
RECONNECT_GIVE_UP_S = 10.0


def connect_defaults(conninfo: str) -> dict[str, Any]:
    """CONNECT_DEFAULTS less what the connection string already sets (`?connect_timeout=2` wins)."""
    given = conninfo_to_dict(conninfo)
    return {k: v for k, v in CONNECT_DEFAULTS.items() if k not in given}


async def _reconnect_failed(pool: AsyncConnectionPool) -> None:
    log.info("database unreachable for %g s; reconnecting on the next request", RECONNECT_GIVE_UP_S)


@dataclass
class ServerConfig:
    name: str
    transport: Transport
    url: str | None = None
    command: str | None = None
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    allowed_tools: list[str] = field(default_factory=list)
    # Offered to the LLM on every turn, even when the registry holds more tools than the budget (tool_choice.py).
    pinned_tools: list[str] = field(default_factory=list)
    # The session's LLM may answer this server's sampling requests (sampling.py); off unless allowed.
    allow_sampling: bool = False
    roots: list[str] = field(default_factory=list)  # answered to the server's roots/list (file:// URIs)
    enabled: bool = True
    timeout_ms: int = 35_000
    max_wait_ms: int = 300_000
    release_after_ms: int = 8_000
    poll_interval: int = 1_000
    result_endpoint: str = "/mcp/results"
    poll_profile: PollProfile = "auto"
    # none: no credentials; header: fixed headers (env: references); oauth: OAuth 2.1 with `oauth`'s settings.
    auth: AuthMode = "none"
    oauth: OAuthSettings | None = None
    id: int | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def __post_init__(self) -> None:
        # Rows and snapshots carry the OAuth settings as a JSON object.
        if isinstance(self.oauth, dict):
            self.oauth = OAuthSettings.from_json(self.oauth)

    def validate(self) -> None:
        """Raise RegistryError with a user-facing reason for anything the registry must not hold; the CLI, the
        importer and the Python API all come through here, so nothing malformed is stored to fail later. The
        database checks the core rules again."""
        where = f"server {self.name!r}"
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise RegistryError(f"invalid server name {self.name!r}: use 1-48 lowercase letters, digits, '-' or '_'")
        if self.transport not in TRANSPORTS:
            raise RegistryError(f"unknown transport {self.transport!r}: choose one of {', '.join(TRANSPORTS)}")
        _check_text_fields(self, where)
        if self.transport == "stdio":
            if not (self.command or "").strip():
                raise RegistryError(f"{where}: the stdio transport needs a command")
        else:
            schemes = ("ws", "wss") if self.transport == "websocket" else ("http", "https")
            problem = url_problem(self.url or "", schemes)
            if problem:
                raise RegistryError(f"{where}: {problem}")
        if self.poll_profile not in POLL_PROFILES:
            raise RegistryError(f"unknown poll profile {self.poll_profile!r}: choose one of {', '.join(POLL_PROFILES)}")
        for label, value, low in (
            ("timeout", self.timeout_ms, 1),
            ("max wait", self.max_wait_ms, 1),
            ("poll interval", self.poll_interval, 50),
            ("release after", self.release_after_ms, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= INT4_MAX:
                raise RegistryError(f"{where}: {label} must be a whole number of ms from {low} to {INT4_MAX}")
        self._validate_auth(where)
        for root in self.roots:
            if not (root.startswith("file://") or root.startswith("/")):
                raise RegistryError(f"{where}: a root must be an absolute path or a file:// URI")
        for name, value in self.headers.items():
            if not HEADER_NAME.match(name):
                raise RegistryError(f"{where}: {name!r} is not a valid HTTP header name")
            if not HEADER_VALUE.match(value):
                raise RegistryError(f"{where}: the value of header {name!r} holds a line break or control character")
        for name in self.env:
            if not name or "=" in name:
                raise RegistryError(f"{where}: {name!r} is not a valid environment variable name")
        for label, mapping in (("header", self.headers), ("env", self.env)):
            for key, value in mapping.items():
                if value.startswith(ENV_PREFIX) and not ENV_NAME.match(value[len(ENV_PREFIX) :]):
                    raise RegistryError(
                        f"{where}: {label} {key!r} refers to {value!r}: env: must be followed by a variable name"
                    )

    def _validate_auth(self, where: str) -> None:
        if self.auth not in AUTH_MODES:
            raise RegistryError(f"{where}: unknown auth mode {self.auth!r}: choose one of {', '.join(AUTH_MODES)}")
        if self.auth != "oauth":
            if self.oauth is not None:
                raise RegistryError(f"{where}: OAuth settings given but the auth mode is {self.auth!r}")
            return
        if self.transport not in ("streamable-http", "sse"):
            raise RegistryError(
                f"{where}: OAuth is for HTTP servers (streamable-http, sse); a {self.transport} server takes its "
                "credentials in headers or env"
            )
        if not isinstance(self.oauth, OAuthSettings):
            raise RegistryError(f"{where}: the oauth auth mode needs OAuth settings")
        self.oauth.validate(where)

    @property
    def label(self) -> str:
        """Where the server lives, fit to show: credentials in its URL hidden, key-like arguments too."""
        if self.transport != "stdio":
            return redact_url(self.url)
        shown = ["***" if looks_opaque(a) else a for a in self.args]
        return " ".join([self.command or "", *shown]).strip()


# The database's integer columns (int4).
INT4_MAX = 2_147_483_647
# RFC 9110 token characters, for header names; a value may hold any visible character, space and tab.
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")
HEADER_VALUE = re.compile(r"^[\t\x20-\x7e\x80-\uffff]{0,8192}$")
MAX_URL_CHARS = 2048
MAX_TEXT_CHARS = 8192


def _check_text_fields(cfg: ServerConfig, where: str) -> None:
    """Strings only, no NUL (PostgreSQL refuses it, mid-import), nothing absurdly long."""
    texts: list[tuple[str, object]] = [
        ("url", cfg.url),
        ("command", cfg.command),
        ("result endpoint", cfg.result_endpoint),
    ]
    texts += [("an argument", a) for a in cfg.args] + [("a root", r) for r in cfg.roots]
    texts += [("an allowed tool", t) for t in cfg.allowed_tools] + [("a pinned tool", t) for t in cfg.pinned_tools]
    for label, mapping in (("header", cfg.headers), ("env", cfg.env)):
        if not isinstance(mapping, dict):
            raise RegistryError(f"{where}: {label}s must be a mapping of names to values")
        texts += [(f"{label} name", k) for k in mapping] + [(f"{label} {k!r}", v) for k, v in mapping.items()]
    for label, value in texts:
        if value is None and label in ("url", "command", "result endpoint"):
            continue
        if not isinstance(value, str):
            raise RegistryError(f"{where}: {label} must be text")
        if "\x00" in value:
            raise RegistryError(f"{where}: {label} holds a NUL character")
        if len(value) > MAX_TEXT_CHARS:
            raise RegistryError(f"{where}: {label} is longer than {MAX_TEXT_CHARS} characters")
    if len(cfg.args) > 1000 or len(cfg.headers) > 100 or len(cfg.env) > 1000:
        raise RegistryError(f"{where}: too many arguments, headers or env entries")


def url_problem(url: str, schemes: tuple[str, ...]) -> str | None:
    """Why `url` cannot be a server's URL (parsed as a client would, `{env:NAME}` parts standing for values), or
    None. Checked before anything is stored: a URL that fails here would fail at every connect instead."""
    want = " or ".join(f"{s}://" for s in schemes)
    if not url:
        return f"this transport needs a URL starting with {want}"
    if len(url) > MAX_URL_CHARS:
        return f"the URL is longer than {MAX_URL_CHARS} characters"
    if re.search(r"[\x00-\x20\x7f]", url):
        return "the URL holds a space, line break or control character"
    for name in PLACEHOLDER.findall(url):
        if not ENV_NAME.match(name):
            return f"{{env:{name}}} in the URL: env: must be followed by a variable name"
    bare = PLACEHOLDER.sub("x", url)
    if "{" in bare or "}" in bare:
        return "the URL holds a brace that is not part of an {env:NAME} reference"
    try:
        parts = urlsplit(bare)
        port = parts.port
        host = parts.hostname
    except ValueError as exc:
        return f"the URL cannot be parsed ({exc})"
    if parts.scheme.lower() not in schemes:
        return f"this transport needs a URL starting with {want}"
    if not host:
        return "the URL names no host"
    if port == 0:
        return "the URL's port must be from 1 to 65535"
    return None


@dataclass(frozen=True)
class ToolSpec:
    """A tool as discovered from (or cached for) one server."""

    server: str
    name: str
    description: str
    input_schema: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class HealthRow:
    server: str
    status: str
    checked_at: datetime | None
    latency_ms: float | None
    consecutive_failures: int
    last_error: str | None


_SERVER_COLUMNS = [f.name for f in dataclasses.fields(ServerConfig) if f.name not in ("id", "created_at", "updated_at")]
_JSON_COLUMNS = {"args", "env", "headers", "oauth"}

_CONSTRAINT_MESSAGES = {
    "stdio_needs_command": "the stdio transport needs a command",
    "network_needs_url": "this transport needs an http(s):// or ws(s):// URL",
    "websocket_url_scheme": "the websocket transport needs a ws:// or wss:// URL",
    "http_url_scheme": "this transport needs an http:// or https:// URL",
    "mcp_servers_name_check": "invalid server name: use lowercase letters, digits, '-' or '_'",
    "mcp_servers_transport_check": "unknown transport",
}


def _friendly(exc: psycopg.Error, name: str) -> RegistryError:
    if isinstance(exc, pg_errors.UniqueViolation):
        return RegistryError(f"a server named {name!r} already exists")
    if isinstance(exc, pg_errors.CheckViolation):
        constraint = exc.diag.constraint_name or ""
        return RegistryError(f"server {name!r}: {_CONSTRAINT_MESSAGES.get(constraint, constraint or 'invalid row')}")
    return RegistryError(f"server {name!r}: {exc.diag.message_primary or exc}")


_SERVERS_SQL = """
SELECT s.id, s.name, s.transport, s.url, s.command, s.enabled, s.headers, s.env,
       CASE WHEN o.needs_login THEN 'needs_login' ELSE h.status END AS status,
       h.checked_at, h.latency_ms, h.consecutive_failures,
       CASE WHEN o.needs_login
            THEN 'needs a login' || coalesce(' with scope ''' || o.needed_scope || '''', '')
                 || coalesce(' (' || o.reason || ')', '') || ': run servers login ' || s.name
            ELSE h.last_error END AS last_error,
       t.tools, t.discovered_at
FROM mcp_servers s
LEFT JOIN mcp_server_health h ON h.server_id = s.id
LEFT JOIN mcp_oauth o ON o.server_id = s.id
LEFT JOIN LATERAL (
    SELECT count(*) AS tools, max(discovered_at) AS discovered_at FROM mcp_tools WHERE server_id = s.id
) t ON true
ORDER BY s.name
"""

# The status page (web/views.py). One row per server and minute: the mean latency of the checks that
# answered, and how many failed. Per server
# through the (server_id, checked_at) index: the table keeps a day of checks, the chart needs one hour.
_HISTORY_SQL = """
SELECT s.id AS server_id, m.minutes_ago, m.latency_ms, m.failed, m.checks
FROM mcp_servers s CROSS JOIN LATERAL (
    SELECT floor(date_part('epoch', now() - c.checked_at) / 60)::int AS minutes_ago,
           avg(c.latency_ms) FILTER (WHERE c.ok) AS latency_ms,
           count(*) FILTER (WHERE NOT c.ok) AS failed, count(*) AS checks
    FROM mcp_health_checks c
    WHERE c.server_id = s.id AND c.checked_at >= now() - make_interval(mins => %s)
    GROUP BY 1
) m
"""

# A session's start in one read (`Registry.start_cache`): per enabled server, its cached tools (in the order
# `cached_tools()` gives them) and its remembered protocol.
_START_CACHE_SQL = """
SELECT s.name, p.fingerprint, p.era, p.protocol_version, p.discover, extract(epoch FROM p.seen_at)::float8 AS seen_at,
       t.tools, l.protocol_version AS list_version, l.result AS list_result, l.scope AS list_scope,
       extract(epoch FROM l.expires_at)::float8 AS list_expires_at
FROM mcp_servers s
LEFT JOIN mcp_server_protocol p ON p.server_id = s.id
-- A server's row edited since its list was stored (its URL, its allowed tools): the list is asked again.
LEFT JOIN mcp_tool_lists l ON l.server_id = s.id AND l.expires_at > now() AND l.stored_at >= s.updated_at
LEFT JOIN LATERAL (
    SELECT json_agg(json_build_object('name', name, 'description', description, 'input_schema', input_schema,
                                      'meta', meta) ORDER BY name) AS tools
    FROM mcp_tools WHERE server_id = s.id
) t ON true
WHERE s.enabled AND (p.server_id IS NOT NULL OR t.tools IS NOT NULL OR l.server_id IS NOT NULL)
ORDER BY s.name
"""

_JOBS_SQL = """
SELECT id, server_name, tool, state, kind, submitted_at, finished_at, polls, delivered_late,
       extract(epoch FROM coalesce(finished_at, now()) - submitted_at)::float8 AS seconds
FROM mcp_jobs ORDER BY submitted_at DESC LIMIT %s
"""

# One fingerprint per part of the page, each moving whenever what that part shows changes; cheap enough to run
# every second (small tables, and the newest jobs off their index). A health check rewrites `checked_at`, a
# job's change rewrites `updated_at`.
_FINGERPRINT_SQL = """
SELECT concat_ws('|',
    (SELECT count(*) || ':' || coalesce(max(updated_at)::text, '') FROM mcp_servers),
    (SELECT count(*) || ':' || coalesce(max(checked_at)::text, '') FROM mcp_server_health),
    (SELECT count(*) || ':' || coalesce(max(updated_at)::text, '') FROM mcp_oauth),
    (SELECT count(*) || ':' || coalesce(max(discovered_at)::text, '') FROM mcp_tools)
) AS servers,
(SELECT md5(coalesce(string_agg(id::text || state || updated_at::text, ','), ''))
   FROM (SELECT id, state, updated_at FROM mcp_jobs ORDER BY submitted_at DESC LIMIT %s) j) AS jobs
"""


class StartCache(NamedTuple):
    """What a session starts from, read in one query: each server's cached tools, what it negotiated last, and
    the tools/list answer it lets clients reuse, where one is stored, still holds and the server's row was not
    edited since."""

    tools: dict[str, list[ToolSpec]]
    protocols: dict[str, KnownProtocol]
    lists: dict[str, StoredList]


@dataclass
class StatusRows:
    """What the status page reads in one go, on one connection."""

    taken_at: datetime
    servers: list[dict[str, Any]]
    jobs: list[dict[str, Any]]
    history: list[dict[str, Any]] | None  # None: not read this time


def _row_to_server(row: dict[str, Any]) -> ServerConfig:
    return ServerConfig(**{k: row[k] for k in (*_SERVER_COLUMNS, "id", "created_at", "updated_at")})


def _params(cfg: ServerConfig) -> list[Any]:
    values = []
    for col in _SERVER_COLUMNS:
        value = getattr(cfg, col)
        if col == "oauth":
            value = value.to_json() if value is not None else {}
        values.append(Jsonb(value) if col in _JSON_COLUMNS else value)
    return values


async def check_pooled(conn: psycopg.AsyncConnection[Any]) -> None:
    """The pool's check before it lends a connection: a round trip only when the connection has something to say.

    An idle connection's socket has nothing to read unless the server wrote to it, and a server that restarts or
    ends the session writes its goodbye there (or the kernel its reset): a readable socket gets the full check
    (a round trip, which raises on a dead connection), a quiet one is lent at once. The full check on every
    loan doubled the round trips of a job-record flush. What neither check can tell, a network gone silent, the
    statement's own error and the callers' retries handle."""
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("the connection is closed")
    if _readable(conn.fileno()) or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        await AsyncConnectionPool.check_connection(conn)


def _readable(fd: int) -> bool:
    # poll, not select: a busy agent process has sockets past select's limit of 1024 descriptors.
    if not hasattr(select, "poll"):
        return bool(select.select([fd], [], [], 0)[0])
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class Registry:
    """All database access of the project, over one `AsyncConnectionPool`."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool
        self._migrated = False
        self._job_queue: JobQueue | None = None  # made on first use (`job_queue`)

    @classmethod
    async def open(
        cls,
        conninfo: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        max_idle: float = 600.0,
        timeout: float = 10.0,
        wait: bool = True,
    ) -> Registry:
        """Open the pool. With `wait` (the default) the database must answer within `timeout` or this raises;
        without it the pool connects in the background and keeps trying, so an agent can start while the
        database is down and its writes resume once it is back."""
        pool = AsyncConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            # Unused connections beyond min_size are closed after this long (a quiet voice session holds none).
            max_idle=max_idle,
            open=False,
            # A connection broken by a server restart is noticed and replaced before use.
            check=check_pooled,
            # A call waits at most this long for a connection: an unreachable database fails fast.
            timeout=POOL_TIMEOUT_S,
            # The pool's reconnect backoff doubles (1, 2, 4 s...) without a cap until it gives up; giving up at
            # 10 s restarts it on the next request, so no gap exceeds 4 s, under the pool timeout: the first call
            # after the database is back gets a connection, however long the outage was.
            reconnect_timeout=RECONNECT_GIVE_UP_S,
            reconnect_failed=_reconnect_failed,
            kwargs={**connect_defaults(conninfo), "autocommit": True, "row_factory": dict_row},
            name="voice-mcp",
        )
        try:
            await pool.open(wait=wait, timeout=timeout)
        except Exception:
            await pool.close()
            raise
        return cls(pool)

    async def ping(self, timeout: float) -> None:
        """A connection and a round trip within `timeout`, or the pool's error: the registry's own calls would
        each wait the pool's longer timeout."""
        async with self.pool.connection(timeout=timeout) as conn:
            await conn.execute("SELECT 1")

    async def _fetch(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Every row of one query, on a pooled connection held only for it."""
        async with self.pool.connection() as conn:
            return await (await conn.execute(sql, params)).fetchall()

    async def close(self) -> None:
        # Job records still queued are written first (once, bounded): a CLI call that ends right after its
        # answer keeps its row.
        if self._job_queue is not None:
            await self._job_queue.aclose()
        await self.pool.close()

    # -- migrations -----------------------------------------------------------------------------------------

    @staticmethod
    def migration_files() -> list[tuple[str, str]]:
        folder = resources.files("mcp_integration") / "migrations"
        files = sorted(p for p in folder.iterdir() if p.name.endswith(".sql"))
        return [(p.name.removesuffix(".sql"), p.read_text(encoding="utf-8")) for p in files]

    async def migrate(self) -> list[str]:
        """Apply the migrations not yet recorded, each in its own transaction, in order. Returns what ran.
        Once it succeeded on this registry it does nothing more: each session start asks, and the advisory lock
        would make concurrent starts wait on one another."""
        if self._migrated:
            return []
        applied: list[str] = []
        async with self.pool.connection() as conn:
            await conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK_KEY,))
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                rows = await (await conn.execute("SELECT version FROM schema_migrations")).fetchall()
                done = {r["version"] for r in rows}
                for version, sql in self.migration_files():
                    if version in done:
                        continue
                    async with conn.transaction():
                        await conn.execute(sql)
                        await conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                    applied.append(version)
                    log.info("applied migration %s", version)
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK_KEY,))
        self._migrated = True
        return applied

    async def applied_migrations(self) -> list[str]:
        async with self.pool.connection() as conn:
            rows = await (await conn.execute("SELECT version FROM schema_migrations ORDER BY version")).fetchall()
        return [r["version"] for r in rows]

    # -- servers --------------------------------------------------------------------------------------------

    async def add_server(self, cfg: ServerConfig, *, replace: bool = False) -> ServerConfig:
        return (await self.add_servers([cfg], replace=replace))[0]

    async def add_servers(self, cfgs: list[ServerConfig], *, replace: bool = False) -> list[ServerConfig]:
        """Add (or with `replace`, update) servers, all in one transaction: every one is stored, or none."""
        for cfg in cfgs:
            cfg.validate()
        cols = ", ".join(_SERVER_COLUMNS)
        marks = ", ".join(["%s"] * len(_SERVER_COLUMNS))
        sql = f"INSERT INTO mcp_servers ({cols}) VALUES ({marks})"
        if replace:
            updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in _SERVER_COLUMNS if c != "name")
            sql += f" ON CONFLICT (name) DO UPDATE SET {updates}, updated_at = now()"
        sql += " RETURNING *"
        saved: list[ServerConfig] = []
        current = cfgs[0].name if cfgs else ""
        try:
            async with self.pool.connection() as conn, conn.transaction():
                for cfg in cfgs:
                    current = cfg.name
                    row = await (await conn.execute(sql, _params(cfg))).fetchone()
                    assert row is not None
                    saved.append(_row_to_server(row))
        except (psycopg.errors.IntegrityError, psycopg.errors.DataError) as exc:
            raise _friendly(exc, current) from None
        return saved

    async def get_server(self, name: str) -> ServerConfig | None:
        async with self.pool.connection() as conn:
            row = await (await conn.execute("SELECT * FROM mcp_servers WHERE name = %s", (name,))).fetchone()
        return _row_to_server(row) if row else None

    async def list_servers(self, *, enabled_only: bool = False) -> list[ServerConfig]:
        sql = "SELECT * FROM mcp_servers" + (" WHERE enabled" if enabled_only else "") + " ORDER BY name"
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(sql)).fetchall()
        return [_row_to_server(r) for r in rows]

    async def remove_server(self, name: str) -> bool:
        async with self.pool.connection() as conn:
            cur = await conn.execute("DELETE FROM mcp_servers WHERE name = %s", (name,))
        return cur.rowcount > 0

    async def set_enabled(self, name: str, enabled: bool) -> bool:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE mcp_servers SET enabled = %s, updated_at = now() WHERE name = %s", (enabled, name)
            )
        return cur.rowcount > 0

    # -- tool cache -----------------------------------------------------------------------------------------

    async def save_tools(self, server_id: int, tools: list[ToolSpec]) -> None:
        """Replace a server's cached tool list with a fresh discovery, atomically."""
        async with self.pool.connection() as conn, conn.transaction():
            # Sessions starting together discover the same server at once: one rewrite at a time, or the second
            # transaction's inserts collide with the first's.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(%s::int, (%s::bigint %% 2147483647)::int)", (_TOOLS_LOCK_KEY, server_id)
            )
            await conn.execute("DELETE FROM mcp_tools WHERE server_id = %s", (server_id,))
            if tools:
                async with conn.cursor() as cur:
                    await cur.executemany(
                        "INSERT INTO mcp_tools (server_id, name, description, input_schema, meta)"
                        " VALUES (%s, %s, %s, %s, %s)",
                        [(server_id, t.name, t.description, Jsonb(t.input_schema), Jsonb(t.meta)) for t in tools],
                    )

    async def cached_tools(self) -> dict[str, list[ToolSpec]]:
        """The cached tools of every enabled server, by server name."""
        async with self.pool.connection() as conn:
            rows = await (
                await conn.execute(
                    "SELECT s.name AS server, t.name, t.description, t.input_schema, t.meta"
                    " FROM mcp_tools t JOIN mcp_servers s ON s.id = t.server_id"
                    " WHERE s.enabled ORDER BY s.name, t.name"
                )
            ).fetchall()
        out: dict[str, list[ToolSpec]] = {}
        for r in rows:
            out.setdefault(r["server"], []).append(
                ToolSpec(r["server"], r["name"], r["description"], r["input_schema"], r["meta"])
            )
        return out

    # -- remembered protocols (protocol_memory.py) ----------------------------------------------------------

    async def known_protocols(self) -> dict[str, KnownProtocol]:
        """What each enabled server negotiated when it last connected, by server name."""
        rows = await self._fetch(
            "SELECT s.name, p.fingerprint, p.era, p.protocol_version, p.discover,"
            " extract(epoch FROM p.seen_at)::float8 AS seen_at"
            " FROM mcp_server_protocol p JOIN mcp_servers s ON s.id = p.server_id WHERE s.enabled"
        )
        return {r["name"]: memory for r in rows if (memory := KnownProtocol.from_json(r)) is not None}

    async def save_protocol(self, server_id: int, memory: KnownProtocol) -> None:
        """Remember what a server negotiated. Its `mcp_servers` row is not touched: a change there re-connects
        the server in every worker (registry_watch.py)."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO mcp_server_protocol (server_id, fingerprint, era, protocol_version, discover, seen_at)"
                " VALUES (%s, %s, %s, %s, %s, COALESCE(to_timestamp(%s), now()))"
                " ON CONFLICT (server_id) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, era = EXCLUDED.era,"
                " protocol_version = EXCLUDED.protocol_version, discover = EXCLUDED.discover,"
                " seen_at = EXCLUDED.seen_at",
                (
                    server_id,
                    memory.fingerprint,
                    memory.era,
                    memory.protocol_version,
                    None if memory.discover is None else Jsonb(memory.discover),
                    memory.seen_at,  # when it was learned: a DiscoverResult's ttlMs counts from then
                ),
            )

    async def touch_tools(self, server_ids: list[int]) -> None:
        """Discoveries found these servers' cached tool lists unchanged: mark them fresh without rewriting them."""
        async with self.pool.connection() as conn:
            await conn.execute("UPDATE mcp_tools SET discovered_at = now() WHERE server_id = ANY(%s)", (server_ids,))

    async def start_cache(self) -> StartCache:
        """`cached_tools()`, `known_protocols()` and the reusable tool lists in one query: what a session starts
        from."""
        rows = await self._fetch(_START_CACHE_SQL)
        cache = StartCache({}, {}, {})
        for r in rows:
            if r["tools"]:
                cache.tools[r["name"]] = [
                    ToolSpec(r["name"], t["name"], t["description"], t["input_schema"], t["meta"]) for t in r["tools"]
                ]
            memory = KnownProtocol.from_json(r) if r["era"] is not None else None
            if memory is not None:
                cache.protocols[r["name"]] = memory
            if r["list_result"] is not None:
                cache.lists[r["name"]] = StoredList(
                    r["list_version"], r["list_result"], r["list_scope"], r["list_expires_at"]
                )
        return cache

    async def forget_tool_list(self, server_id: int) -> None:
        """The server no longer lets its tools/list answer be reused (or changed it): the stored one must not be."""
        async with self.pool.connection() as conn:
            await conn.execute("DELETE FROM mcp_tool_lists WHERE server_id = %s", (server_id,))

    async def save_tool_list(self, server_id: int, stored: StoredList) -> None:
        """Keep a server's reusable tools/list answer (tool_lists.py) for the next session start, in any process."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO mcp_tool_lists (server_id, protocol_version, result, scope, expires_at)"
                " VALUES (%s, %s, %s, %s, to_timestamp(%s))"
                " ON CONFLICT (server_id) DO UPDATE SET protocol_version = EXCLUDED.protocol_version,"
                " result = EXCLUDED.result, scope = EXCLUDED.scope, expires_at = EXCLUDED.expires_at,"
                " stored_at = now()",
                (server_id, stored.protocol_version, Jsonb(stored.result), stored.scope, stored.expires_at),
            )

    # -- health ---------------------------------------------------------------------------------------------

    async def record_health(
        self,
        server_id: int,
        status: str,
        latency_ms: float | None,
        failures: int,
        last_error: str | None,
        *,
        checked: bool = True,
    ) -> None:
        """The server's current verdict. `checked=False` (a call moved the breaker, no check ran): the last
        check's latency stays, and no point is added to the latency history."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO mcp_server_health"
                " (server_id, status, checked_at, latency_ms, consecutive_failures, last_error)"
                " VALUES (%s, %s, now(), %s, %s, %s)"
                " ON CONFLICT (server_id) DO UPDATE SET status = EXCLUDED.status, checked_at = now(),"
                " latency_ms = CASE WHEN %s THEN EXCLUDED.latency_ms ELSE mcp_server_health.latency_ms END,"
                " consecutive_failures = EXCLUDED.consecutive_failures, last_error = EXCLUDED.last_error",
                (
                    server_id,
                    status,
                    latency_ms,
                    failures,
                    None if last_error is None else known.scrub(last_error),
                    checked,
                ),
            )
            if checked:
                await conn.execute(
                    "INSERT INTO mcp_health_checks (server_id, ok, latency_ms) VALUES (%s, %s, %s)",
                    (server_id, last_error is None, latency_ms),
                )

    async def prune_health_checks(self, keep_hours: float = 24.0) -> int:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM mcp_health_checks WHERE checked_at < now() - make_interval(secs => %s)",
                (keep_hours * 3600,),
            )
            return cur.rowcount

    async def health(self) -> dict[str, HealthRow]:
        rows = await self._fetch(
            "SELECT s.name, h.status, h.checked_at, h.latency_ms, h.consecutive_failures, h.last_error"
            " FROM mcp_server_health h JOIN mcp_servers s ON s.id = h.server_id"
        )
        return {
            r["name"]: HealthRow(
                r["name"], r["status"], r["checked_at"], r["latency_ms"], r["consecutive_failures"], r["last_error"]
            )
            for r in rows
        }

    # -- jobs -----------------------------------------------------------------------------------------------

    @property
    def job_queue(self) -> JobQueue:
        """The write-behind queue of this pool's job rows (job_queue.py): one per registry, made on first use."""
        if self._job_queue is None:
            self._job_queue = JobQueue(self)
        return self._job_queue

    async def jobs_flushed(self) -> None:
        """Until every job record queued so far is written to mcp_jobs (or given up, which is logged)."""
        if self._job_queue is not None:
            await self._job_queue.flushed()

    # One statement for any number of rows, so its text never changes: psycopg prepares it on each connection
    # after a few uses. The rows travel as one jsonb parameter (a single json.dumps), cheaper to build than an
    # array per column. A job whose server was removed meanwhile keeps its row, with no server id, as the
    # foreign key's ON DELETE SET NULL would have left it. `submitted_at` is never updated: it is the job's.
    _WRITE_JOBS_SQL = """
INSERT INTO mcp_jobs AS j (id, server_id, server_name, tool, kind, state, receipt, submitted_at, updated_at,
                           finished_at, result, error, polls, delivered_late, elicitations, samplings)
SELECT r.id, s.id, r.server_name, r.tool, r.kind, r.state, r.receipt, to_timestamp(r.submitted_at), now(),
       to_timestamp(r.finished_at), r.result, r.error, r.polls, r.delivered_late, r.elicitations, r.samplings
FROM jsonb_to_recordset(%s::jsonb) AS r(
    id uuid, server_id bigint, server_name text, tool text, kind text, state text, receipt jsonb,
    submitted_at float8, finished_at float8, result jsonb, error text, polls integer, delivered_late boolean,
    elicitations jsonb, samplings jsonb)
LEFT JOIN mcp_servers s ON s.id = r.server_id
ON CONFLICT (id) DO UPDATE SET
    state = EXCLUDED.state, kind = EXCLUDED.kind, receipt = EXCLUDED.receipt, updated_at = EXCLUDED.updated_at,
    finished_at = EXCLUDED.finished_at, result = EXCLUDED.result, error = EXCLUDED.error, polls = EXCLUDED.polls,
    delivered_late = EXCLUDED.delivered_late, elicitations = EXCLUDED.elicitations, samplings = EXCLUDED.samplings
"""

    async def write_jobs(self, conn: psycopg.AsyncConnection[Any], rows: list[JobRow]) -> None:
        """Insert or update these job rows (each as it is now, whole) in one statement on `conn`."""
        await conn.execute(self._WRITE_JOBS_SQL, (Jsonb(rows),))

    async def recent_durations(self, server: str, tool: str, *, limit: int = 50) -> list[float]:
        """Seconds from submit to finish of a tool's recent completed jobs, newest first (for learned timing)."""
        async with self.pool.connection() as conn:
            rows = await (
                await conn.execute(
                    "SELECT extract(epoch FROM finished_at - submitted_at)::float8 AS s FROM mcp_jobs"
                    " WHERE server_name = %s AND tool = %s AND state = 'completed' AND finished_at IS NOT NULL"
                    " ORDER BY submitted_at DESC LIMIT %s",
                    (server, tool, limit),
                )
            ).fetchall()
        return [r["s"] for r in rows]

    async def job_totals(self) -> list[dict[str, Any]]:
        """Jobs counted by server, tool, kind and state, with the late ones and the polls made (for metrics)."""
        async with self.pool.connection() as conn:
            return await (
                await conn.execute(
                    "SELECT server_name, tool, kind, state, count(*) AS n,"
                    " count(*) FILTER (WHERE delivered_late AND state = 'completed') AS late,"
                    " coalesce(sum(polls), 0) AS polls"
                    " FROM mcp_jobs GROUP BY server_name, tool, kind, state"
                )
            ).fetchall()

    async def get_job(self, job_id: uuid.UUID) -> dict[str, Any] | None:
        async with self.pool.connection() as conn:
            return await (await conn.execute("SELECT * FROM mcp_jobs WHERE id = %s", (job_id,))).fetchone()

    async def recent_jobs(
        self, *, server: str | None = None, state: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn:
            return await (
                await conn.execute(
                    "SELECT * FROM mcp_jobs WHERE (%s::text IS NULL OR server_name = %s)"
                    " AND (%s::text IS NULL OR state = %s) ORDER BY submitted_at DESC LIMIT %s",
                    (server, server, state, state, limit),
                )
            ).fetchall()

    # -- the status page ------------------------------------------------------------------------------------

    async def status_rows(
        self, *, servers: bool, jobs: int, history_minutes: int, timeout: float | None = None
    ) -> StatusRows:
        """The servers with their health and tool counts (`servers`), the newest `jobs` jobs, and the health
        history bucketed per minute for the last `history_minutes` (0: not read), on one connection."""
        server_rows: list[dict[str, Any]] = []
        job_rows: list[dict[str, Any]] = []
        history: list[dict[str, Any]] | None = None
        async with self.pool.connection(timeout=timeout) as conn:
            taken_at = (await (await conn.execute("SELECT now() AS now")).fetchone())["now"]
            if servers:
                server_rows = await (await conn.execute(_SERVERS_SQL)).fetchall()
            if jobs:
                job_rows = await (await conn.execute(_JOBS_SQL, (jobs,))).fetchall()
            if history_minutes:
                history = await (await conn.execute(_HISTORY_SQL, (history_minutes,))).fetchall()
        return StatusRows(taken_at, server_rows, job_rows, history)

    async def status_fingerprint(self, jobs: int) -> dict[str, str]:
        """{"servers": …, "jobs": …}: each changes when what that part of the status page shows changes."""
        async with self.pool.connection() as conn:
            row = await (await conn.execute(_FINGERPRINT_SQL, (jobs,))).fetchone()
        return {"servers": row["servers"], "jobs": row["jobs"]}
