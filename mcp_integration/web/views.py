"""What the status page shows, shaped from the registry's status queries (`Registry.status_rows`).

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

from mcp_integration.registry import Registry, ServerConfig
from mcp_integration.scrubber import known
from mcp_integration.scrubber import scrub as scrub_known
from mcp_integration.secrets import PLACEHOLDER, redact_url

__all__ = [
    "HISTORY_MINUTES",
    "MAX_ERROR_CHARS",
    "RECENT_JOBS",
    "JobView",
    "Minute",
    "ServerView",
    "Snapshot",
    "SnapshotReader",
    "safe_target",
    "scrub",
    "secrets_of",
]


HISTORY_MINUTES = 60
RECENT_JOBS = 50
MAX_ERROR_CHARS = 300


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

    def __init__(self, registry: Registry, *, jobs: int = RECENT_JOBS, history_max_age_s: float = 10.0) -> None:
        self.registry = registry
        self.jobs = jobs
        self.history_max_age_s = history_max_age_s
        self._history: dict[int, tuple[Minute, ...]] = {}
        self._history_at: float | None = None

    async def read(self, *, servers: bool = True, jobs: bool = True, timeout: float | None = None) -> Snapshot:
        """The servers, the recent jobs, or both (what is not read comes back empty)."""
        stale = self._history_at is None or time.monotonic() - self._history_at >= self.history_max_age_s
        rows = await self.registry.status_rows(
            servers=servers,
            jobs=self.jobs if jobs else 0,
            history_minutes=HISTORY_MINUTES if servers and stale else 0,
            timeout=timeout,
        )
        taken_at, server_rows, job_rows = rows.taken_at, rows.servers, rows.jobs
        if rows.history is not None:
            history: dict[int, list[Minute]] = {}
            for r in rows.history:
                ago = min(r["minutes_ago"], HISTORY_MINUTES - 1)
                history.setdefault(r["server_id"], []).append(Minute(ago, r["latency_ms"], r["failed"], r["checks"]))
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
        return await self.registry.status_fingerprint(self.jobs)


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
