"""MCP over WebSocket, client side, on the `websockets` asyncio API (`bridge` serves the test servers too).

SDK 2.x dropped the WebSocket transport that 1.x had; this keeps its wire
convention: subprotocol `mcp`, one JSON-RPC message per text frame.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import mcp_types as types
from mcp.shared.message import ServerMessageMetadata, SessionMessage
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidHandshake
from websockets.frames import CloseCode
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from mcp_integration.mcp_compat import TransportStreams
from mcp_integration.secrets import redact_url

if TYPE_CHECKING:
    from websockets.asyncio.connection import Connection
    from websockets.http11 import Request

__all__ = ["DEFAULT_MAX_SIZE", "MCP_SUBPROTOCOL", "FrameTooLarge", "bridge", "quiet_logger", "websocket_client"]

logger = logging.getLogger(__name__)

MCP_SUBPROTOCOL = Subprotocol("mcp")

# websockets' 1 MiB default is too small for tool results carrying images or documents.
DEFAULT_MAX_SIZE = 16 * 2**20

# Bounded window for the writer to flush already-accepted messages on exit.
_WRITER_FLUSH_TIMEOUT = 0.5


class FrameTooLarge(Exception):
    """The server sent a message over our frame limit; we closed the connection (close code 1009)."""


class _SameOriginConnect(connect):
    """websockets follows redirects, and to another origin it re-sends every header but Authorization and Cookie:
    an `X-Api-Key` would go to whatever host the server names. A redirect is followed only within the origin
    (headers kept, as on the HTTP transports); to another origin the connection fails, saying so."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        before = self.ws_uri
        target = super().process_redirect(exc)
        if isinstance(target, str):
            after = parse_uri(target)
            if (before.secure, before.host, before.port) != (after.secure, after.host, after.port):
                return InvalidHandshake(
                    f"the server redirected to another origin ({redact_url(target)}); not followed, so our "
                    "credentials stay with the server they belong to"
                )
        return target


class _NoDebugLogger(logging.LoggerAdapter[logging.Logger]):
    """websockets logs every handshake header (Authorization included) and every frame at DEBUG.

    Headers can carry secrets and frames carry user data, so its DEBUG output is
    switched off for our connections while its warnings and errors still go through.
    """

    def isEnabledFor(self, level: int) -> bool:
        return level > logging.DEBUG and self.logger.isEnabledFor(level)


def quiet_logger(name: str) -> logging.LoggerAdapter[logging.Logger]:
    """A websockets logger (`websockets.client`, `websockets.server`) that never logs at DEBUG."""
    return _NoDebugLogger(logging.getLogger(name))


_client_wire_logger = quiet_logger("websockets.client")


@asynccontextmanager
async def websocket_client(
    url: str,
    headers: dict[str, str] | None = None,
    open_timeout: float = 10.0,
    max_size: int = DEFAULT_MAX_SIZE,
) -> AsyncIterator[TransportStreams]:
    """Connects to an MCP server over WebSocket; satisfies the SDK's `Transport` protocol.

    `headers` are sent in the opening handshake. The read stream ends when the
    server closes the socket, so pending requests fail instead of hanging.
    Connection failures (OSError, TimeoutError, websockets.InvalidHandshake) propagate.
    """
    async with _SameOriginConnect(
        url,
        subprotocols=[MCP_SUBPROTOCOL],
        additional_headers=headers,
        open_timeout=open_timeout,
        max_size=max_size,
        logger=_client_wire_logger,
    ) as ws:
        if ws.subprotocol != MCP_SUBPROTOCOL:
            # Lenient, as SDK 1.x was: some servers never echo the subprotocol but still speak MCP.
            logger.warning("WebSocket server did not select the %r subprotocol; continuing", MCP_SUBPROTOCOL)
        async with bridge(ws) as streams:
            yield streams


@asynccontextmanager
async def bridge(ws: Connection, request: Request | None = None) -> AsyncIterator[TransportStreams]:
    """Pumps frames between an open WebSocket and a pair of session streams.

    `request` is the server side's handshake request, attached to each inbound
    message the way the SDK's HTTP transports attach theirs.
    """
    read_stream_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, write_stream_reader = anyio.create_memory_object_stream[SessionMessage](0)
    writer_done = anyio.Event()

    async def ws_reader() -> None:
        # Closing read_stream_writer (on any exit) is what tells the session the peer is gone.
        async with read_stream_writer:
            try:
                async for frame in ws:
                    await read_stream_writer.send(_parse_frame(frame, request))
            except ConnectionClosedError as exc:
                if exc.sent is not None and exc.sent.code == CloseCode.MESSAGE_TOO_BIG:
                    # Ours, not the server's doing: say so before the stream ends.
                    limit = ws.protocol.max_message_size or 0
                    reason = f"the server sent a message larger than our limit of {limit / 2**20:g} MiB"
                    with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                        await read_stream_writer.send(FrameTooLarge(reason))
                logger.info("WebSocket closed abnormally (code %s)", exc.rcvd.code if exc.rcvd else "none")
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass  # the session stopped reading; nothing left to deliver to

    async def ws_writer() -> None:
        try:
            async with write_stream_reader:
                async for session_message in write_stream_reader:
                    await ws.send(session_message.message.model_dump_json(by_alias=True, exclude_unset=True))
        except ConnectionClosed:
            # The reader sees the same closure and ends the read stream; closing
            # write_stream_reader makes further sends fail instead of blocking.
            pass
        finally:
            writer_done.set()

    async with read_stream, write_stream, anyio.create_task_group() as tg:
        tg.start_soon(ws_reader)
        tg.start_soon(ws_writer)
        try:
            yield read_stream, write_stream
        finally:
            write_stream.close()
            # Shielded so a cancelled caller still gets its last messages (e.g. a
            # cancellation notice) onto the wire; bounded so a stuck peer cannot hold us.
            with anyio.move_on_after(_WRITER_FLUSH_TIMEOUT, shield=True):
                await writer_done.wait()
            tg.cancel_scope.cancel()


def _parse_frame(frame: str | bytes, request: Request | None) -> SessionMessage | Exception:
    """Parses one frame, returning a parse error as a value for the session to surface."""
    if isinstance(frame, bytes):
        # A text frame is UTF-8 by the protocol; a binary one may not be, and one bad byte in a string must
        # not cost the whole message (the stdio transport decodes the same way).
        frame = frame.decode("utf-8", "replace")
    try:
        message = types.jsonrpc_message_adapter.validate_json(frame, by_name=False)
    except ValueError as exc:
        # Not the frame itself, nor the error text that quotes it: either may hold user data.
        logger.warning("Received a WebSocket frame that is not a JSON-RPC message (length %d)", len(frame))
        return exc
    metadata = ServerMessageMetadata(request_context=request) if request is not None else None
    return SessionMessage(message, metadata)
