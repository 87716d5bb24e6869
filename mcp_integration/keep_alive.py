"""Streamable HTTP connections kept for the next request: a POST's response is read to its end before it closes.

The SDK's Streamable HTTP client closes each POST's event stream as soon as the JSON-RPC answer is on it, before
the stream's last chunk is read (python-sdk issues #2707 and #3281; fixes proposed upstream, none released in
the SDK we pin). httpcore cannot hand back a connection whose response it has not read to the end, so it closes
it: every request to a server that answers in SSE (the SDK's servers, and most others, whenever a call reports
progress) opened a new TCP connection, and over HTTPS paid a new TLS handshake. The answer is already out when
that close comes (the SDK forwards it first), so reading what is left delays no one: the server ends the stream
right after the answer, and the rest is a few bytes already on the way. Bounded in time and size; a server that
keeps its streams open past the answer is given up on after one such wait, and its connections close as before.

A custom transport is httpx's own extension point; nothing in the SDK or httpx offers this, hence the code.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from types import TracebackType

import anyio
import httpx2

__all__ = ["DRAIN_BYTES", "DRAIN_S", "KeepAliveTransport"]

log = logging.getLogger(__name__)

# How long a closed response's remaining stream is read for, and how much of it. The end of a stream follows its
# last event at once, so reaching either bound means a server that keeps streaming: its connection is closed.
DRAIN_S = 1.0
DRAIN_BYTES = 64 * 1024


class KeepAliveTransport(httpx2.AsyncBaseTransport):
    """Wraps the pooled transport of one server's client: POST responses closed before their end are read to it
    first, so their connections return to the pool."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, *, server: str) -> None:
        self._inner = inner
        self.server = server
        self.draining = True  # off once the server is seen to keep a stream open past its answer

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self._inner.handle_async_request(request)
        # Only POSTs: the standalone GET stream is long-lived by design, and closing it must not wait.
        if request.method == "POST" and self.draining:
            assert isinstance(response.stream, httpx2.AsyncByteStream)
            response.stream = _ReadToEnd(response.stream, self)
        return response

    async def __aenter__(self) -> KeepAliveTransport:
        await self._inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self._inner.__aexit__(exc_type, exc_value, traceback)

    async def aclose(self) -> None:
        await self._inner.aclose()


class _ReadToEnd(httpx2.AsyncByteStream):
    """A response stream that, closed before its end, reads the rest first (bounded). An iterator, not an async
    generator: one left unfinished is finalized by the event loop as a task of its own."""

    __slots__ = ("_ended", "_inner", "_it", "_owner")

    def __init__(self, inner: httpx2.AsyncByteStream, owner: KeepAliveTransport) -> None:
        self._inner = inner
        self._owner = owner
        self._it: AsyncIterator[bytes] | None = None
        self._ended = False

    def __aiter__(self) -> _ReadToEnd:  # type: ignore[override]
        self._it = self._inner.__aiter__()
        return self

    async def __anext__(self) -> bytes:
        assert self._it is not None
        try:
            return await self._it.__anext__()
        except StopAsyncIteration:
            self._ended = True
            raise

    async def aclose(self) -> None:
        try:
            if not self._ended and self._owner.draining:
                await self._read_rest()
        finally:
            await self._inner.aclose()

    async def _read_rest(self) -> None:
        it = self._it if self._it is not None else self._inner.__aiter__()
        left = DRAIN_BYTES
        with anyio.move_on_after(DRAIN_S):
            try:
                while left >= 0:
                    left -= len(await it.__anext__())
            except StopAsyncIteration:
                self._ended = True
                return
            except Exception as exc:  # a reset or a malformed end: the connection goes, as it would have
                log.debug("server %r: could not read a response to its end: %r", self._owner.server, exc)
                return
        # Still open after DRAIN_S, or DRAIN_BYTES read: this server streams on past its answers. Stop waiting on
        # them (each wait held a connection); reads already under way when this is learned end at their own bound.
        if self._owner.draining:
            self._owner.draining = False
            log.info(
                "server %r kept an event stream open after its answer; its connections are no longer reused"
                " (each request opens one)",
                self._owner.server,
            )
