"""One transport per registry row: stdio, Streamable HTTP and legacy SSE through the `mcp` SDK, WebSocket ours.

Secrets stay references (`env:NAME`) until this module resolves them at connect time; no value is ever logged.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TextIO

import anyio
import httpx2
import mcp_types as types
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for
from mcp.client._transport import Transport, TransportStreams
from mcp.client.sse import sse_client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.message import SessionMessage
from pydantic import ValidationError

from mcp_integration.registry import ServerConfig
from mcp_integration.ws_transport import websocket_client

log = logging.getLogger(__name__)

ENV_PREFIX = "env:"


class SecretMissing(Exception):
    """An `env:NAME` reference names a variable that is not set. The message names the variable, not a value."""


def resolve_refs(
    mapping: Mapping[str, str], *, what: str, server: str, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for key, value in mapping.items():
        if value.startswith(ENV_PREFIX):
            var = value[len(ENV_PREFIX) :]
            if var not in environ:
                raise SecretMissing(f"server {server!r}: {what} {key!r} refers to env:{var}, which is not set")
            out[key] = environ[var]
        else:
            out[key] = value
    return out


def open_transport(cfg: ServerConfig, *, connect_timeout: float = 10.0) -> Transport:
    """The SDK transport (an async context manager yielding the stream pair) for a registry row."""
    headers = resolve_refs(cfg.headers, what="header", server=cfg.name)
    if cfg.transport == "stdio":
        env = resolve_refs(cfg.env, what="env", server=cfg.name)
        assert cfg.command
        params = StdioServerParameters(command=cfg.command, args=list(cfg.args), env=env or None)
        # The server's stderr goes to ours, where an operator can see why it failed to start.
        return stdio_client(params, errlog=_errlog())
    assert cfg.url
    if cfg.transport == "streamable-http":
        # A long read timeout: the server may hold a response stream open while a tool works.
        client = httpx2.AsyncClient(
            headers=headers,
            timeout=httpx2.Timeout(connect_timeout, read=max(300.0, cfg.max_wait_ms / 1000)),
            verify=_ssl_context(),
        )
        return _owning(streamable_http_client(cfg.url, http_client=client), client)
    if cfg.transport == "sse":
        return sse_client(cfg.url, headers=headers, timeout=connect_timeout, sse_read_timeout=3600.0)
    if cfg.transport == "websocket":
        return websocket_client(cfg.url, headers=headers, open_timeout=connect_timeout)
    raise ValueError(f"unknown transport {cfg.transport!r}")


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Building a context loads the CA bundle (~17 ms of CPU, blocking the loop); once per process is enough,
    # and 20 servers connecting at once would otherwise queue behind each other here.
    return ssl.create_default_context()


def _errlog() -> TextIO:
    """A stderr with a real file descriptor: a subprocess cannot write to a replaced in-memory sys.stderr."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            if stream is not None:
                stream.fileno()
                return stream
        except (AttributeError, OSError, ValueError):
            continue
    return open(os.devnull, "w")


@asynccontextmanager
async def _owning(inner: Transport, client: httpx2.AsyncClient) -> AsyncIterator[TransportStreams]:
    # streamable_http_client leaves a caller-supplied client open; we made it, so we close it.
    async with client, inner as streams:
        yield streams


def check_tool(raw: Any) -> tuple[types.Tool | None, str | None]:
    """Validate one tool of a `tools/list` answer on its own: the tool, or why it is skipped."""
    name = raw.get("name") if isinstance(raw, dict) else None
    try:
        tool = types.Tool.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return None, f"tool {name!r}: {where or 'definition'}: {first.get('msg')}"
    schema = tool.input_schema
    if schema.get("type") != "object":
        return None, f"tool {tool.name!r}: inputSchema must have type 'object'"
    problem = _schema_problem(json.dumps(schema, sort_keys=True))
    if problem:
        return None, f"tool {tool.name!r}: inputSchema is not valid JSON Schema ({problem})"
    return tool, None


@functools.lru_cache(maxsize=4096)
def _schema_problem(schema_json: str) -> str | None:
    # check_schema costs ~1 ms; a server lists the same schemas on every refresh, and many servers share them.
    schema = json.loads(schema_json)
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        return exc.message
    return None


class ToolListGuard:
    """Wraps a transport so that one malformed tool in `tools/list` is dropped instead of failing the whole list.

    The SDK validates a listing as one unit: a single bad `inputSchema` (common in hand-written servers)
    would hide every tool of that server. Here each tool is checked on its own; the rest pass through.
    """

    def __init__(self, inner: Transport, server: str, on_closed: Callable[[], None] | None = None) -> None:
        self._inner = inner
        self._server = server
        self._on_closed = on_closed
        self.skipped: list[str] = []
        self._list_ids: set[Any] = set()

    @asynccontextmanager
    async def _run(self) -> AsyncIterator[TransportStreams]:
        async with self._inner as (inner_read, inner_write):
            read_send, read_recv = anyio.create_memory_object_stream[SessionMessage | Exception](0)
            write_send, write_recv = anyio.create_memory_object_stream[SessionMessage](0)

            async def pump_writes() -> None:
                async with write_recv:
                    async for msg in write_recv:
                        m = msg.message
                        if isinstance(m, types.JSONRPCRequest) and m.method == "tools/list":
                            self._list_ids.add(m.id)
                        await inner_write.send(msg)
                await inner_write.aclose()

            async def pump_reads() -> None:
                try:
                    async with read_send:
                        async for item in inner_read:
                            if isinstance(item, SessionMessage):
                                item = self._filter(item)
                            await read_send.send(item)
                finally:
                    # The server's stream ended (process exited, socket closed): the one moment a dead
                    # connection can be told from a slow one without waiting for a timeout.
                    if self._on_closed is not None:
                        self._on_closed()

            async with anyio.create_task_group() as tg:
                tg.start_soon(pump_writes)
                tg.start_soon(pump_reads)
                try:
                    yield read_recv, write_send
                finally:
                    tg.cancel_scope.cancel()

    def _filter(self, item: SessionMessage) -> SessionMessage:
        m = item.message
        if not isinstance(m, types.JSONRPCResponse) or m.id not in self._list_ids:
            return item
        self._list_ids.discard(m.id)
        tools = m.result.get("tools")
        if not isinstance(tools, list):
            return item
        kept = []
        for raw in tools:
            tool, why = check_tool(raw)
            if tool is None:
                self.skipped.append(why or "malformed tool")
                log.warning("server %s: skipping %s", self._server, why)
            else:
                kept.append(raw)
        if len(kept) == len(tools):
            return item
        result = dict(m.result, tools=kept)
        return SessionMessage(types.JSONRPCResponse(jsonrpc="2.0", id=m.id, result=result), item.metadata)

    def transport(self) -> Transport:
        return self._run()
