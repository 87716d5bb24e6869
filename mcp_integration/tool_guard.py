"""What a server answers, checked before the SDK sees it: one bad thing fails or drops that one thing, never the
connection or the server's other tools.

The SDK validates a `tools/list` answer as one unit (one malformed `inputSchema` would hide every tool of the
server) and leaves a request whose answer cannot be parsed waiting until a timeout; nothing in it offers per-item
leniency, hence this wrapper on the transport's streams.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import anyio
import mcp_types as types
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for
from mcp.shared.message import SessionMessage
from mcp_types.methods import SERVER_RESULTS
from pydantic import TypeAdapter, ValidationError

from mcp_integration.limits import MAX_DEPTH, json_depth
from mcp_integration.mcp_compat import Transport, TransportStreams
from mcp_integration.ws_transport import FrameTooLarge

__all__ = ["ToolListGuard", "check_tool"]

log = logging.getLogger(__name__)


def check_tool(raw: Any) -> tuple[types.Tool | None, str | None]:
    """Validate one tool of a `tools/list` answer on its own: the tool, or why it is skipped."""
    name = raw.get("name") if isinstance(raw, dict) else None
    try:
        tool = types.Tool.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return None, f"tool {name!r}: {where or 'definition'}: {first.get('msg')}"
    if not tool.name or "\x00" in tool.name:
        return None, f"tool {tool.name!r}: a name must be non-empty text without NUL"
    schema = tool.input_schema
    if schema.get("type") != "object":
        return None, f"tool {tool.name!r}: inputSchema must have type 'object'"
    # Its depth from its text (in C), not a walk of it: every tool of every server, at every connect.
    try:
        encoded: str | None = _SORTED_JSON(schema)
    except RecursionError:  # deeper than the encoder goes: far past the limit
        encoded = None
    if encoded is None or json_depth(encoded) > MAX_DEPTH:
        return None, f"tool {tool.name!r}: inputSchema nests deeper than {MAX_DEPTH} levels"
    problem = _schema_problem(encoded)
    if problem:
        return None, f"tool {tool.name!r}: inputSchema is not valid JSON Schema ({problem})"
    return tool, None


# One encoder for every schema: json.dumps with an option builds a new one per call.
_SORTED_JSON = json.JSONEncoder(sort_keys=True).encode


@functools.lru_cache(maxsize=4096)
def _schema_problem(schema_json: str) -> str | None:
    # check_schema costs ~1 ms; a server lists the same schemas on every refresh, and many servers share them.
    schema = json.loads(schema_json)
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        return exc.message[:300]
    except RecursionError:
        return "nested too deeply to check"
    return None


class ToolListGuard:
    """Wraps a transport so that a server's bad answers fail or drop one thing instead of the connection.

    - `tools/list`: the SDK validates a listing as one unit, so a single bad `inputSchema` (common in
      hand-written servers) would hide every tool of that server. Each tool is checked on its own; the rest
      pass through.
    - An answer that is not valid JSON-RPC (a `result` that is not an object, JSON nested past the parser's
      limit, broken JSON) would leave its request waiting until a timeout: when its id can still be read, the
      request fails at once with an error saying so.
    - A `tools/call` answer that is not a valid tool result becomes an error answer naming the problem
      (the SDK would raise a bare validation error deep inside the call).
    """

    # Requests remembered for their answers; a server that never answers some of them cannot grow this forever.
    MAX_PENDING = 10_000

    def __init__(
        self,
        inner: Transport,
        server: str,
        on_closed: Callable[[], None] | None = None,
        on_heard: Callable[[Any], None] | None = None,
    ) -> None:
        self._inner = inner
        self._server = server
        self._on_closed = on_closed
        # Told of every item the transport reads, before it is checked (the connection's liveness clock): here,
        # not in a wrapper of its own, which cost every message one more hop.
        self._on_heard = on_heard
        self.skipped: list[str] = []
        self.ending: str | None = None  # why the stream is about to end, when the transport said so first
        self._pending: dict[Any, str] = {}  # request id -> method, until its answer arrives

    @asynccontextmanager
    async def _run(self) -> AsyncIterator[TransportStreams]:
        # Wrappers on the transport's own streams, not a relay through streams and tasks of ours: a relay costs
        # every message two more hops and two more task switches (about a tenth of a call's CPU, measured in
        # bench/load.py).
        async with self._inner as (inner_read, inner_write):
            reader = _GuardedReader(self, inner_read)
            try:
                yield cast(Any, reader), cast(Any, _GuardedWriter(self, inner_write))
            finally:
                reader.ended()

    def _remember(self, request: types.JSONRPCRequest) -> None:
        if request.method == "tools/list" and not (request.params or {}).get("cursor"):
            self.skipped.clear()  # a new listing: what it skips replaces what the last one skipped
        self._pending[request.id] = request.method
        if len(self._pending) > self.MAX_PENDING:
            del self._pending[next(iter(self._pending))]

    def _check(self, item: SessionMessage) -> SessionMessage:
        m = item.message
        if not isinstance(m, types.JSONRPCResponse | types.JSONRPCError):
            return item
        method = self._pending.pop(m.id, None)
        if not isinstance(m, types.JSONRPCResponse):
            return item
        if method == "tools/list":
            result = self._filter_tools(m.result)
            if result is not m.result:
                return SessionMessage(types.JSONRPCResponse(jsonrpc="2.0", id=m.id, result=result), item.metadata)
        elif method == "tools/call":
            problem = _call_result_problem(m.result)
            if problem is not None:
                log.warning(
                    "server %s: its answer to tools/call is not a valid tool result (%s)", self._server, problem
                )
                reason = f"the server's answer is not a valid tool result ({problem})"
                return SessionMessage(_error(m.id, types.INTERNAL_ERROR, reason), item.metadata)
        return item

    def _filter_tools(self, result: dict[str, Any]) -> dict[str, Any]:
        tools = result.get("tools")
        if not isinstance(tools, list):
            return result
        kept = []
        for raw in tools:
            tool, why = check_tool(raw)
            if tool is None:
                self.skipped.append(why or "malformed tool")
                log.warning("server %s: skipping %s", self._server, why)
            else:
                kept.append(raw)
        return result if len(kept) == len(tools) else dict(result, tools=kept)

    def _unreadable(self, exc: Exception) -> SessionMessage | None:
        """For a message that failed to parse: the answer its waiting request should get, if its id is known."""
        found = _reply_in(exc)
        if found is None or found[0] not in self._pending:
            return None
        rid, body = found
        method = self._pending.pop(rid)
        if method == "tools/list" and isinstance(body, dict) and isinstance(body.get("result"), dict):
            # Python's parser goes deeper than pydantic's: a listing with one absurdly deep schema loses that tool.
            with contextlib.suppress(ValidationError, RecursionError):
                result = self._filter_tools(body["result"])
                return SessionMessage(types.JSONRPCResponse(jsonrpc="2.0", id=rid, result=result))
        log.warning("server %s: its answer to %s is not valid JSON-RPC; the request fails", self._server, method)
        return SessionMessage(_error(rid, types.PARSE_ERROR, f"the server's answer to {method} could not be read"))

    def transport(self) -> Transport:
        return self._run()

    def _received(self, item: Any) -> list[Any]:
        """What the SDK gets for one item the transport read: the item checked, or, for an unreadable answer
        whose request is known, the transport's error (still reported, as any transport error is) and an answer."""
        if isinstance(item, SessionMessage):
            return [self._check(item)]
        if isinstance(item, FrameTooLarge):
            self.ending = str(item)
            return [item]
        answer = self._unreadable(item)
        return [item] if answer is None else [item, answer]


class _GuardedReader:
    """The transport's read stream as the SDK reads it (`async with`, `async for`), each item checked."""

    def __init__(self, guard: ToolListGuard, inner: Any) -> None:
        self._guard = guard
        self._inner = inner.__aiter__()
        self._queued: deque[Any] = deque()
        self._ended = False

    def ended(self) -> None:
        # The server's stream ended (process exited, socket closed): the one moment a dead connection can be told
        # from a slow one without waiting for a timeout. Once, however it ended.
        if not self._ended:
            self._ended = True
            if self._guard._on_closed is not None:
                self._guard._on_closed()

    async def __aenter__(self) -> _GuardedReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __aiter__(self) -> _GuardedReader:
        return self

    async def __anext__(self) -> Any:
        while not self._queued:
            try:
                item = await self._inner.__anext__()
            except (StopAsyncIteration, anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                self.ended()
                raise StopAsyncIteration from None
            if self._guard._on_heard is not None:
                self._guard._on_heard(item)
            self._queued.extend(self._guard._received(item))
        return self._queued.popleft()


class _GuardedWriter:
    """The transport's write stream as the SDK writes it: each request remembered, for checking its answer."""

    def __init__(self, guard: ToolListGuard, inner: Any) -> None:
        self._guard = guard
        self._inner = inner

    async def send(self, msg: SessionMessage) -> None:
        if isinstance(msg.message, types.JSONRPCRequest):
            self._guard._remember(msg.message)
        await self._inner.send(msg)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> _GuardedWriter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _error(rid: Any, code: int, message: str) -> types.JSONRPCError:
    return types.JSONRPCError(jsonrpc="2.0", id=rid, error=types.ErrorData(code=code, message=message))


@functools.cache
def _call_result_adapters() -> list[TypeAdapter[Any]]:
    # Every protocol version's shape, as the SDK checks them: a result fit for the version in use passes.
    # Versions share models (four of five, today): each distinct one is checked once.
    models = dict.fromkeys(model for (method, _), model in SERVER_RESULTS.items() if method == "tools/call")
    return [TypeAdapter(model) for model in models]


def _call_result_problem(result: dict[str, Any]) -> str | None:
    """Why a `tools/call` answer is not a tool result the SDK will accept, or None."""
    if _plain_text_result(result):
        return None
    if result.get("resultType", "complete") != "complete" or "task" in result:
        return None  # a task or a request for input: the tasks runtime reads those
    return _model_problem(result)


def _model_problem(result: dict[str, Any]) -> str | None:
    """Why no protocol version's model of a tool result accepts `result` (the first version's words), or None."""
    first: ValidationError | None = None
    for adapter in _call_result_adapters():
        try:
            adapter.validate_python(result, by_name=False)
        except ValidationError as exc:
            first = first or exc
        else:
            return None
    if first is None:
        return None
    err = first.errors(include_input=False)[0]
    where = ".".join(str(p) for p in err.get("loc", ()))[:100]
    return f"{where or 'result'}: {err.get('msg', 'invalid')}"[:300]


def _plain_text_result(result: dict[str, Any]) -> bool:
    """Bare text items, with at most an object of structured content, an `isError` flag, an object of `_meta` and
    `resultType: "complete"` (the last two on every answer of a 2026-07-28 server): what nearly every tool
    answers, and a shape the full check passes. Told in a few comparisons: pydantic's check of it cost each call
    8.7 µs, only for the SDK to check the same result again."""
    content = result.get("content")
    if type(content) is not list:
        return False
    for item in content:
        if type(item) is not dict or len(item) != 2 or item.get("type") != "text" or type(item.get("text")) is not str:
            return False
    for key, value in result.items():
        if key == "resultType":
            if value != "complete":
                return False
        elif type(value) is not _PLAIN_TYPES.get(key):
            return False
    return True


# The other keys a plain text result may have, and the type of each (`content` is checked item by item first).
_PLAIN_TYPES: dict[str, type] = {"content": list, "structuredContent": dict, "isError": bool, "_meta": dict}


_REPLY_ID = re.compile(
    r'^\s*\{\s*"jsonrpc"\s*:\s*"2\.0"\s*,\s*"id"\s*:\s*(-?\d{1,18}|"[^"\\]{0,200}")\s*,\s*"(?:result|error)"'
)


def _reply_in(exc: Exception) -> tuple[Any, dict[str, Any]] | None:
    """The id and body (as far as it can be read) of the answer behind a message that failed to parse."""
    if not isinstance(exc, ValidationError):
        return None
    for err in exc.errors(include_url=False):
        data = err.get("input")
        if isinstance(data, bytes | str):
            data = _lenient_json(data)
        if isinstance(data, dict) and "method" not in data and ("result" in data or "error" in data):
            rid = data.get("id")
            if isinstance(rid, int | str) and not isinstance(rid, bool):
                return rid, data
    return None


def _lenient_json(raw: bytes | str) -> Any:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    # Too deep even for Python's parser: the id is still at the start of a well-ordered answer.
    m = _REPLY_ID.match(text[:300])
    return {"id": json.loads(m[1]), "result": None} if m else None
