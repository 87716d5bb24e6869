"""One live MCP client connection to one registered server, owned by a task of its own.

The SDK's client is an anyio context manager that must be entered and left in the same task; a dedicated
runner task holds it open, so any task may send requests while it lives, and closing is always clean.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import mcp_types as types
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS

from mcp_integration.registry import ServerConfig, ToolSpec
from mcp_integration.tasks import TaskClient
from mcp_integration.transports import ToolListGuard, open_transport

log = logging.getLogger(__name__)

ProgressCallback = Callable[[float, float | None, str | None], Awaitable[None]]


class ConnectError(Exception):
    """The server could not be reached or refused the MCP handshake."""


class ServerConnection:
    def __init__(
        self,
        cfg: ServerConfig,
        *,
        connect_timeout: float = 10.0,
    ) -> None:
        self.cfg = cfg
        self.connect_timeout = connect_timeout
        self._client: Client | None = None
        self._runner: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._lock = asyncio.Lock()
        self._guard: ToolListGuard | None = None
        self.last_error: str | None = None
        # Set when the server's stream ends: waiters wake on it instead of discovering a dead server by timeout.
        self.lost = asyncio.Event()
        # The MCP tasks runtime (both dialects) on this connection's session; see tasks.py. A plain tool call's
        # length is bounded by the job engine (its wait policy), not here.
        self.tasks = TaskClient(lambda: self.client.session)

    @property
    def is_open(self) -> bool:
        return (
            self._client is not None and self._runner is not None and not self._runner.done() and not self.lost.is_set()
        )

    @property
    def client(self) -> Client:
        if self._client is None:
            raise ConnectError(f"server {self.cfg.name!r} is not connected")
        return self._client

    @property
    def skipped_tools(self) -> list[str]:
        return list(self._guard.skipped) if self._guard else []

    async def open(self) -> None:
        """Connect (once; concurrent callers share the attempt). Raises ConnectError with the reason."""
        async with self._lock:
            if self.is_open:
                return
            await self._stop_runner()
            self._closing = asyncio.Event()
            self.lost = asyncio.Event()
            ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._runner = asyncio.create_task(self._run(ready), name=f"mcp-conn-{self.cfg.name}")
            try:
                await asyncio.wait_for(asyncio.shield(ready), self.connect_timeout)
            except TimeoutError:
                await self._stop_runner()
                self.last_error = f"no MCP handshake within {self.connect_timeout:g} s"
                raise ConnectError(f"server {self.cfg.name!r}: {self.last_error}") from None
            except asyncio.CancelledError:
                await self._stop_runner()
                raise
            except BaseException as exc:
                await self._stop_runner()
                self.last_error = describe(exc)
                raise ConnectError(f"server {self.cfg.name!r}: {self.last_error}") from None
            self.last_error = None

    async def _run(self, ready: asyncio.Future[None]) -> None:
        try:
            lost = self.lost
            self._guard = ToolListGuard(
                open_transport(self.cfg, connect_timeout=self.connect_timeout), self.cfg.name, on_closed=lost.set
            )
            # cache=None: a stale cached tools/list would hide a server's changes from a refresh.
            # extensions: declares the tasks extension (2026) and routes task status pushes to self.tasks.
            async with Client(
                self._guard.transport(), message_handler=self._message, cache=None, extensions=self.tasks.extensions()
            ) as client:
                self._client = client
                if not ready.done():
                    ready.set_result(None)
                await self._closing.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            elif not isinstance(exc, asyncio.CancelledError):
                self.last_error = describe(exc)
                log.warning("server %s: connection ended: %s", self.cfg.name, self.last_error)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._client = None

    async def _message(self, message: Any) -> None:
        if isinstance(message, Exception):
            log.warning("server %s: transport error: %s", self.cfg.name, describe(message))
            return
        self.tasks.on_message(message)

    async def _stop_runner(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._closing.set()
        try:
            await asyncio.wait_for(asyncio.shield(runner), 5.0)
        except TimeoutError:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        except asyncio.CancelledError:
            # We are being cancelled ourselves: end the runner too, and let the cancellation through.
            runner.cancel()
            raise
        except Exception:
            pass  # the runner's own failure is already in last_error

    async def close(self) -> None:
        async with self._lock:
            await self._stop_runner()

    # -- requests -------------------------------------------------------------------------------------------

    async def list_tools(self) -> list[ToolSpec]:
        """Every tool the server offers (all pages), less malformed ones and those outside `allowed_tools`."""
        session = self.client.session
        tools: list[types.Tool] = []
        cursor: str | None = None
        while True:
            params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
            page = await asyncio.wait_for(session.list_tools(params=params), self.connect_timeout)
            tools.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        allowed = set(self.cfg.allowed_tools)
        out = []
        for t in tools:
            if allowed and t.name not in allowed:
                continue
            meta: dict[str, Any] = {}
            if t.execution is not None:
                meta["execution"] = t.execution.model_dump(by_alias=True, exclude_none=True)
            if t.annotations is not None:
                meta["annotations"] = t.annotations.model_dump(by_alias=True, exclude_none=True)
            out.append(ToolSpec(self.cfg.name, t.name, t.description or "", dict(t.input_schema), meta))
        return out

    async def call_tool(
        self, name: str, arguments: dict[str, Any], *, progress: ProgressCallback | None = None
    ) -> types.CallToolResult:
        # Client.call_tool, not the session's: with the tasks extension declared, a 2026 server may answer with a
        # task, which only the client-level call resolves (through the claim in tasks.py) into a result.
        return await self.client.call_tool(name, arguments, progress_callback=progress)

    async def ping(self) -> float:
        """Round-trip latency in ms: MCP `ping` where the protocol has it (removed in 2026-07-28), else tools/list."""
        session = self.client.session
        started = time.perf_counter()
        if session.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS:
            await asyncio.wait_for(session.send_ping(), self.connect_timeout)
        else:
            await asyncio.wait_for(session.list_tools(), self.connect_timeout)
        return (time.perf_counter() - started) * 1000


def describe(exc: BaseException) -> str:
    """A one-line reason for an exception, unwrapping the exception groups anyio raises."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, MCPError):
        return f"MCP error {exc.error.code}: {exc.error.message}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
