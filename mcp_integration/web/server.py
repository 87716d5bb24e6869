"""Running the status page: its own dispatcher, registry watcher and health monitor, served by uvicorn.

`python -m mcp_integration dashboard` calls `serve()`; tests and the benchmark use `services()` and
`listening()` to run the same pieces inside their own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import uvicorn
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from mcp_integration.config import Settings
from mcp_integration.dispatcher import Dispatcher
from mcp_integration.health import HealthMonitor
from mcp_integration.metrics import Metrics
from mcp_integration.registry import Registry
from mcp_integration.registry_watch import RegistryWatcher
from mcp_integration.runtime import open_runtime
from mcp_integration.web.app import create_app
from mcp_integration.web.guard import BindingError, check_binding

__all__ = [
    "GRACEFUL_SHUTDOWN_S",
    "Services",
    "bind",
    "build_app",
    "listening",
    "serve",
    "services",
    "url_of",
]


# Open live streams end at shutdown (the feed closes them); anything else gets this long to finish.
GRACEFUL_SHUTDOWN_S = 3.0


@dataclass
class Services:
    registry: Registry
    dispatcher: Dispatcher
    watcher: RegistryWatcher
    monitor: HealthMonitor
    metrics: Metrics


@asynccontextmanager
async def services(
    registry: Registry, *, check_interval_s: float = 15.0, settings: Settings | None = None
) -> AsyncIterator[Services]:
    """The page's runtime: a dispatcher following the registry, a monitor checking (and recording) every server
    each `check_interval_s`; closed afterwards."""
    settings = settings or Settings.from_env()
    # Tools from the cache at once; discovery goes on in the background while the page already serves.
    async with open_runtime(registry, settings, watch=True, monitor=True, check_interval_s=check_interval_s) as rt:
        assert rt.watcher is not None and rt.monitor is not None
        # A registry of its own: the page's metrics never collide with another Metrics in the same process.
        metrics = Metrics(CollectorRegistry())
        metrics.attach(rt.dispatcher, rt.health)
        yield Services(registry, rt.dispatcher, rt.watcher, rt.monitor, metrics)


def build_app(
    svc: Services, *, token: str | None, bind_host: str, period_s: float = 1.0, history_max_age_s: float = 10.0
) -> Starlette:
    return create_app(
        svc.registry,
        svc.dispatcher,
        svc.monitor,
        metrics=svc.metrics,
        token=token,
        bind_host=bind_host,
        period_s=period_s,
        history_max_age_s=history_max_age_s,
    )


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Starlette, *, signals: bool) -> None:
        super().__init__(config)
        self._app = app
        self._signals = signals

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Live streams never end by themselves: end them first, so shutdown does not wait out the grace period.
        self._app.state.feed.close()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises a caught SIGINT/SIGTERM after shutdown; we have cleanup of our own to do after
        # serve() returns, so a signal only asks for shutdown. Tests running the app in-process leave signals be.
        if not self._signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one); a clear BindingError when that is impossible."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise BindingError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise BindingError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        shown = host
    else:
        shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


@asynccontextmanager
async def listening(
    app: Starlette,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    sock: socket.socket | None = None,
    signals: bool = False,
) -> AsyncIterator[tuple[str, asyncio.Task[None]]]:
    """Serve `app` on `sock` (or a new socket on host:port) in this event loop; yields its base URL and the
    serving task, and stops it afterwards."""
    sock = sock or bind(host, port)
    config = uvicorn.Config(
        app,
        lifespan="off",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        access_log=False,
        log_config=None,  # the process's own logging setup stands
    )
    server = _Server(config, app, signals=signals)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="dashboard-http")
    try:
        while not server.started:
            if task.done():
                task.result()
                raise BindingError("the dashboard stopped while starting")
            await asyncio.sleep(0.01)
        yield url_of(sock), task
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()


async def serve(
    registry: Registry,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    token: str | None = None,
    check_interval_s: float = 15.0,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve the status page until SIGINT or SIGTERM. Refuses (BindingError) to bind off loopback without a
    token, or to an address it cannot use, before starting anything."""
    check_binding(host, token)
    sock = bind(host, port)
    async with services(registry, check_interval_s=check_interval_s) as svc:
        app = build_app(svc, token=token, bind_host=host)
        async with listening(app, sock=sock, signals=True) as (url, task):
            announce(f"dashboard on {url}" + (" (token required)" if token else ""))
            await task
