"""The status page's Starlette app: the page, its live feed (server-sent events), actions, /healthz, /metrics.

GET  /                         the page, rendered on the server
GET  /events                   the live feed: table bodies and a status line, as they change
POST /servers/{name}/enable    and /disable: switch a server in the registry (running sessions follow it)
POST /servers/{name}/check     a health check now, recorded like the monitor's
GET  /healthz                  200 when the database answers and the health monitor runs, else 503
GET  /metrics                  Prometheus text: this process's health checks and what mcp_jobs records
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
from psycopg_pool import PoolTimeout
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import mcp_integration.web.render as render
from mcp_integration.errors import ToolCallError
from mcp_integration.web.feed import LiveFeed
from mcp_integration.web.guard import Guard, check_binding
from mcp_integration.web.views import SnapshotReader, scrub, secrets_of

if TYPE_CHECKING:
    from mcp_integration.dispatcher import Dispatcher
    from mcp_integration.health import HealthMonitor
    from mcp_integration.metrics import Metrics
    from mcp_integration.registry import Registry

__all__ = [
    "ASSET_VERSION",
    "DB_ERRORS",
    "HEALTHZ_TIMEOUT_S",
    "KEEPALIVE_S",
    "PAGE_DB_TIMEOUT_S",
    "STATIC",
    "SecurityHeaders",
    "create_app",
    "sse",
]


log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
# In the asset URLs, so a browser never runs an old script against a new page.
ASSET_VERSION = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(STATIC.iterdir()))).hexdigest()[:12]
KEEPALIVE_S = 15.0
HEALTHZ_TIMEOUT_S = 2.0
PAGE_DB_TIMEOUT_S = 3.0
DB_ERRORS = (psycopg.Error, PoolTimeout, OSError, TimeoutError)

_SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class SecurityHeaders:
    """Every response: the page runs only our own script and is never framed by another site."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)


def create_app(
    registry: Registry,
    dispatcher: Dispatcher,
    monitor: HealthMonitor,
    *,
    metrics: Metrics | None = None,
    token: str | None = None,
    bind_host: str = "127.0.0.1",
    period_s: float = 1.0,
    history_max_age_s: float = 10.0,
) -> Starlette:
    """The app over a running dispatcher and health monitor. `token` is required unless `bind_host` is loopback
    (`BindingError` otherwise). The live feed polls the database every `period_s` while a page is open; the
    latency charts' history is re-read at most every `history_max_age_s`."""

    check_binding(bind_host, token)  # here, not at the first request: Starlette builds middleware lazily

    reader = SnapshotReader(registry, history_max_age_s=history_max_age_s)

    async def current_fingerprint() -> dict[str, str]:
        seen = await reader.fingerprint()
        # The status line shows the monitor's state: it rides with the servers.
        seen["servers"] += f"|{monitor.running}"
        return seen

    async def current_parts(changed: frozenset[str]) -> dict[str, str]:
        servers, jobs = "servers" in changed, "jobs" in changed
        snapshot = await reader.read(servers=servers, jobs=jobs)
        return render.parts(snapshot, servers=servers, jobs=jobs, monitor_running=monitor.running)

    def unreachable(_: Exception) -> dict[str, str]:
        return {"status": render.status_part(None, monitor_running=monitor.running, database=False)}

    feed = LiveFeed(current_fingerprint, current_parts, period=period_s, on_error=unreachable)
    # This process's own health checks show at once, not at the next tick.
    monitor.health.observers.append(lambda _report: feed.poke())

    async def index(request: Request) -> Response:
        try:
            snapshot = await reader.read(timeout=PAGE_DB_TIMEOUT_S)
        except DB_ERRORS as exc:
            log.warning("status page: cannot read the database: %s", type(exc).__name__)
            return HTMLResponse(
                "<!doctype html><title>voice-mcp · status</title><h1>Database unreachable</h1>"
                "<p>The status page cannot read PostgreSQL right now. Reload in a moment.</p>",
                status_code=503,
                headers={"Cache-Control": "no-store", "Retry-After": "5"},
            )
        html = render.page(snapshot, monitor_running=monitor.running, asset_version=ASSET_VERSION)
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    async def events(request: Request) -> Response:
        async def body() -> AsyncIterator[str]:
            # A lost stream is retried by the browser after 2 s (its default is 3).
            yield "retry: 2000\n: voice-mcp live feed\n\n"
            async for name, text in feed.stream(keepalive_s=KEEPALIVE_S):
                yield sse(name, text) if name else ": keepalive\n\n"

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            # No buffering in a reverse proxy: an event is worth something only when it arrives.
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def action(request: Request) -> Response:
        name, verb = request.path_params["name"], request.path_params["verb"]
        if verb not in ("enable", "disable", "check"):
            return _message(404, f"no action {verb!r}: use enable, disable or check")
        try:
            if verb in ("enable", "disable"):
                if not await registry.set_enabled(name, verb == "enable"):
                    return _message(404, f"no server named {name!r}")
                feed.poke()
                return _message(200, f"{name} {verb}d", server=name, enabled=verb == "enable")
            cfg = await registry.get_server(name)
            if cfg is None:
                return _message(404, f"no server named {name!r}")
        except DB_ERRORS:
            return _message(503, "the database is unreachable: try again in a moment")
        if not cfg.enabled:
            return _message(409, f"{name} is disabled: enable it to check it")
        try:
            report = (await monitor.check_now(name))[name]
        except ToolCallError:
            # Enabled a moment ago: the registry watcher has not added it to this process yet.
            return _message(409, f"{name} is not connected yet: try again in a second")
        feed.poke()
        if report.source == "busy":
            text = f"{name}: {report.status}, busy with a call (it answers one request at a time)"
        elif report.ok:
            latency = f", {report.latency_ms:.0f} ms" if report.latency_ms is not None else ""
            text = f"{name}: {report.status}{latency}"
        else:
            text = f"{name}: {report.status} ({scrub(report.error or 'no answer', secrets_of(cfg))})"
        return _message(200, text, server=name, ok=report.ok, status=report.status, latency_ms=report.latency_ms)

    async def healthz(request: Request) -> Response:
        database = await _database_answers(registry)
        running = monitor.running
        ok = database and running
        return JSONResponse(
            {
                "status": "ok" if ok else "unavailable",
                "database": "reachable" if database else "unreachable",
                "monitor": "running" if running else "stopped",
            },
            status_code=200 if ok else 503,
            headers={"Cache-Control": "no-store"},
        )

    async def metrics_text(request: Request) -> Response:
        if metrics is None:
            return _message(404, "metrics are off in this process")
        try:
            await metrics.refresh_from_table(registry)
        except DB_ERRORS as exc:
            # Still serve this process's own figures; the recorded ones are those of the last good read.
            log.warning("metrics: cannot read the database: %s", type(exc).__name__)
        body, content_type = metrics.render()
        return Response(body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})

    app = Starlette(
        routes=[
            Route("/", index, methods=["GET", "HEAD"]),
            Route("/events", events),
            Route("/servers/{name}/{verb}", action, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET", "HEAD"]),
            Route("/metrics", metrics_text),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=[Middleware(SecurityHeaders), Middleware(Guard, token=token, bind_host=bind_host)],
    )
    app.state.feed = feed
    return app


def sse(event: str, data: str) -> str:
    lines = data.splitlines() or [""]
    return f"event: {event}\n" + "".join(f"data: {line}\n" for line in lines) + "\n"


def _message(code: int, text: str, **extra: object) -> JSONResponse:
    return JSONResponse({"message": text, **extra}, status_code=code, headers={"Cache-Control": "no-store"})


async def _database_answers(registry: Registry) -> bool:
    try:
        async with asyncio.timeout(HEALTHZ_TIMEOUT_S):
            await registry.ping(HEALTHZ_TIMEOUT_S)
        return True
    except DB_ERRORS:
        return False
