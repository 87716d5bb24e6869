"""What the status page shows, read from PostgreSQL: narrow columns, aggregated in SQL, on one connection.

The page costs the same whether `mcp_jobs` holds fifty rows or millions (the newest jobs come off the
`submitted_at` index) and whatever the health history holds (bucketed per minute by the database).
Nothing secret leaves this module: targets lose credentials and query strings, errors lose the server's
literal header and env values.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePath
from typing import Any

from psycopg_pool import AsyncConnectionPool

from mcp_integration.registry import ServerConfig
from mcp_integration.secrets import PLACEHOLDER, known, redact_url
from mcp_integration.secrets import scrub as scrub_known

HISTORY_MINUTES = 60
RECENT_JOBS = 50
MAX_ERROR_CHARS = 300

_SERVERS_SQL = """
SELECT s.id, s.name, s.transport, s.url, s.command, s.enabled, s.headers, s.env,
       h.status, h.checked_at, h.latency_ms, h.consecutive_failures, h.last_error,
       t.tools, t.discovered_at
FROM mcp_servers s
LEFT JOIN mcp_server_health h ON h.server_id = s.id
LEFT JOIN LATERAL (
    SELECT count(*) AS tools, max(discovered_at) AS discovered_at FROM mcp_tools WHERE server_id = s.id
) t ON true
ORDER BY s.name
"""

# One row per server and minute: the mean latency of the checks that answered, and how many failed. Per server
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
    (SELECT count(*) || ':' || coalesce(max(discovered_at)::text, '') FROM mcp_tools)
) AS servers,
(SELECT md5(coalesce(string_agg(id::text || state || updated_at::text, ','), ''))
   FROM (SELECT id, state, updated_at FROM mcp_jobs ORDER BY submitted_at DESC LIMIT %s) j) AS jobs
"""


@dataclass(frozen=True)
class Minute:
    """One minute of a server's health checks."""

    minutes_ago: int
    latency_ms: float | None
    failed: int
    checks: int


@dataclass(frozen=True)
class ServerView:
    name: str
    transport: str
    target: str
    enabled: bool
    status: str
    checked_at: datetime | None
    latency_ms: float | None
    consecutive_failures: int
    last_error: str | None
    tools: int
    discovered_at: datetime | None
    history: tuple[Minute, ...]


@dataclass(frozen=True)
class JobView:
    id: str
    server: str
    tool: str
    state: str
    kind: str
    submitted_at: datetime
    finished_at: datetime | None
    seconds: float
    polls: int
    late: bool


@dataclass(frozen=True)
class Snapshot:
    taken_at: datetime
    servers: tuple[ServerView, ...]
    jobs: tuple[JobView, ...]


class SnapshotReader:
    """Reads what the page shows. The per-minute latency history, the one costly query, is re-read at most
    every `history_max_age_s`: a chart of minutes needs no fresher data, and a busy job table then costs a
    rebuild two cheap queries, not three."""

    def __init__(self, pool: AsyncConnectionPool, *, jobs: int = RECENT_JOBS, history_max_age_s: float = 10.0) -> None:
        self.pool = pool
        self.jobs = jobs
        self.history_max_age_s = history_max_age_s
        self._history: dict[int, tuple[Minute, ...]] = {}
        self._history_at: float | None = None

    async def read(self, *, servers: bool = True, jobs: bool = True, timeout: float | None = None) -> Snapshot:
        """The servers, the recent jobs, or both (what is not read comes back empty)."""
        server_rows: list[dict[str, Any]] = []
        job_rows: list[dict[str, Any]] = []
        async with self.pool.connection(timeout=timeout) as conn:
            taken_at = (await (await conn.execute("SELECT now() AS now")).fetchone())["now"]
            if servers:
                server_rows = await (await conn.execute(_SERVERS_SQL)).fetchall()
            if jobs:
                job_rows = await (await conn.execute(_JOBS_SQL, (self.jobs,))).fetchall()
            stale = self._history_at is None or time.monotonic() - self._history_at >= self.history_max_age_s
            if servers and stale:
                history_rows = await (await conn.execute(_HISTORY_SQL, (HISTORY_MINUTES,))).fetchall()
                history: dict[int, list[Minute]] = {}
                for r in history_rows:
                    ago = min(r["minutes_ago"], HISTORY_MINUTES - 1)
                    history.setdefault(r["server_id"], []).append(
                        Minute(ago, r["latency_ms"], r["failed"], r["checks"])
                    )
                self._history = {k: tuple(sorted(v, key=lambda m: m.minutes_ago)) for k, v in history.items()}
                self._history_at = time.monotonic()
        servers = tuple(_server_view(r, self._history.get(r["id"], ())) for r in server_rows)
        job_views = tuple(
            JobView(
                id=str(r["id"]),
                server=r["server_name"],
                tool=r["tool"],
                state=r["state"],
                kind=r["kind"],
                submitted_at=r["submitted_at"],
                finished_at=r["finished_at"],
                seconds=max(0.0, r["seconds"] or 0.0),
                polls=r["polls"],
                late=r["delivered_late"],
            )
            for r in job_rows
        )
        return Snapshot(taken_at, servers, job_views)

    async def fingerprint(self) -> dict[str, str]:
        """{"servers": …, "jobs": …}: each changes when what that table of the page shows changes."""
        async with self.pool.connection() as conn:
            row = await (await conn.execute(_FINGERPRINT_SQL, (self.jobs,))).fetchone()
        return {"servers": row["servers"], "jobs": row["jobs"]}


def _server_view(r: dict[str, Any], minutes: tuple[Minute, ...]) -> ServerView:
    secrets = _secrets(r["url"], r["headers"] or {}, r["env"] or {})
    error = r["last_error"]
    return ServerView(
        name=r["name"],
        transport=r["transport"],
        target=safe_target(r["transport"], r["url"], r["command"]),
        enabled=r["enabled"],
        status=r["status"] or "unknown",
        checked_at=r["checked_at"],
        latency_ms=r["latency_ms"],
        consecutive_failures=r["consecutive_failures"] or 0,
        last_error=scrub(error, secrets) if error else None,
        tools=r["tools"] or 0,
        discovered_at=r["discovered_at"],
        history=minutes,
    )


def safe_target(transport: str, url: str | None, command: str | None) -> str:
    """Where a server lives, without what could be a secret: its URL redacted, and for a stdio server only the
    program's name (its arguments may carry keys)."""
    if transport == "stdio":
        return PurePath(command or "?").name
    return redact_url(url)


def secrets_of(cfg: ServerConfig) -> list[str]:
    """The values to hide from anything said about this server (errors)."""
    return _secrets(cfg.url, cfg.headers, cfg.env)


def _secrets(url: str | None, headers: dict[str, str], env: dict[str, str]) -> list[str]:
    """What this server's references resolve to here (an error written by another process may quote them), and
    its literal header and env values."""
    values = [os.environ.get(v[4:], "") if v.startswith("env:") else v for v in (*headers.values(), *env.values())]
    if url:
        values += [os.environ.get(name, "") for name in PLACEHOLDER.findall(url)]
    return [v for v in values if v]


def scrub(text: str, secrets: list[str]) -> str:
    """`text` fit for the page: this server's secrets, every secret this process knows, and credential shapes
    hidden; cut to MAX_ERROR_CHARS."""
    for value in secrets:
        known.add(value)
    text = scrub_known(text)
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"
