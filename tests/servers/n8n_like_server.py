"""An n8n look-alike: an MCP Server Trigger whose workflows answer late or hand back a receipt, and n8n's public
executions API that reports an execution as it runs and finishes.

    python tests/servers/n8n_like_server.py --port 0 [--path reports] [--finish-after-ms 1500] [--api-key KEY]
                                            [--fail] [--concurrent]

What it copies from a real n8n 1.123.0 (measured against it with the bare `mcp` SDK, 2026-11-28; see NOTES.md):
- **One path for both transports**, as the MCP Server Trigger node (v2) serves them: `/mcp/<path>`. A GET opens a
  legacy SSE stream whose `endpoint` event points back at the same path with the session in the query; a POST
  carrying that query is an SSE message (answered `202 Accepted`, the reply comes on the stream); any other POST
  is Streamable HTTP (`Mcp-Session-Id` header), and DELETE ends such a session.
- **One request per MCP session at a time, pings included.** An idle `ping` answered in ~15 ms; a `ping` sent
  0.5 s into a 3 s `tools/call` was answered only when the call ended. Other sessions are served meanwhile.
  `--concurrent` switches this off, to show what a test would miss without it.
- **The handshake of the TypeScript SDK it runs on**: no `server/discover` (2026-07-28), so a client falls back
  to `initialize`; no progress notifications from workflow tools.
- **Workflow tools**: `run_workflow {topic, seconds}` answers when the workflow has run (a "respond when last node
  finishes" webhook); `start_workflow` and `trigger_webhook` answer at once with a receipt, as a workflow behind
  a "respond immediately" webhook does, to be polled at `GET /api/v1/executions/{id}` (header X-N8N-API-KEY when
  --api-key is given). `GET /_stats` counts the GETs of each execution as `{"<id>": n}`.

Prints `LISTENING <port>` once the socket is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import mcp_types as types
from demo_server import Quirks, serve_http
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.server.sse import SseServerTransport
from mcp.shared.message import SessionMessage
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

WORKFLOW_ID = "wfReport01"


@dataclass
class Execution:
    id: str
    topic: str
    started: float  # monotonic, for the finish time
    started_wall: datetime


class N8nLike:
    def __init__(self, *, finish_after_ms: int, api_key: str | None, fail: bool) -> None:
        self.finish_after = finish_after_ms / 1000
        self.api_key = api_key
        self.fail = fail
        self.executions: dict[str, Execution] = {}
        self.gets: Counter[str] = Counter()
        self._ids = itertools.count(1001)

    def start(self, topic: str) -> Execution:
        # n8n execution ids are numeric strings.
        execution = Execution(str(next(self._ids)), topic, time.monotonic(), datetime.now(UTC))
        self.executions[execution.id] = execution
        return execution

    def document(self, execution: Execution, *, include_data: bool) -> dict[str, Any]:
        done = time.monotonic() - execution.started >= self.finish_after
        started_ms = int(execution.started_wall.timestamp() * 1000)
        run_data: dict[str, Any] = {"Webhook": [_run(started_ms, {"body": {"topic": execution.topic}})]}
        last = "Webhook"
        error: dict[str, Any] | None = None
        if done and self.fail:
            status, finished = "error", False
            message = "The Summarise node failed"
            error = {"message": message, "name": "NodeOperationError", "node": {"name": "Summarise"}}
            run_data["Summarise"] = [{**_run(started_ms + 5, None), "executionStatus": "error", "error": error}]
            last = "Summarise"
        elif done:
            status, finished = "success", True
            answer = {"summary": f"Report on {execution.topic} is ready", "pages": 3}
            run_data["Summarise"] = [_run(started_ms + 5, answer)]
            last = "Summarise"
        else:
            status, finished = "running", False
        doc: dict[str, Any] = {
            "id": execution.id,
            "finished": finished,
            "mode": "webhook",
            "retryOf": None,
            "retrySuccessId": None,
            "startedAt": execution.started_wall.isoformat().replace("+00:00", "Z"),
            "stoppedAt": datetime.now(UTC).isoformat().replace("+00:00", "Z") if done else None,
            "workflowId": WORKFLOW_ID,
            "waitTill": None,
            "status": status,
        }
        if include_data:
            result_data: dict[str, Any] = {"runData": run_data, "lastNodeExecuted": last}
            if error is not None:
                result_data["error"] = error
            doc["data"] = {"startData": {}, "resultData": result_data, "executionData": {}}
        return doc


def _run(start_ms: int, output: dict[str, Any] | None) -> dict[str, Any]:
    run: dict[str, Any] = {
        "startTime": start_ms,
        "executionTime": 3,
        "executionStatus": "success",
        "source": [],
        "hints": [],
    }
    if output is not None:
        run["data"] = {"main": [[{"json": output, "pairedItem": {"item": 0}}]]}
    return run


class SerialPerSession:
    """Server middleware: the requests of one MCP session are handled one at a time, in arrival order (pings and
    tools/list included), as n8n handles them. Notifications pass; other sessions are not held up."""

    def __init__(self) -> None:
        self._locks: weakref.WeakKeyDictionary[Any, asyncio.Lock] = weakref.WeakKeyDictionary()

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.request_id is None:
            return await call_next(ctx)
        # The context's ServerSession is made per request; the connection behind it is the MCP session.
        lock = self._locks.setdefault(ctx.session._connection, asyncio.Lock())
        async with lock:
            return await call_next(ctx)


@contextlib.asynccontextmanager
async def without_discover(read: Any, write: Any) -> AsyncIterator[Any]:
    """The read stream of a legacy SSE connection, less `server/discover`, answered "Method not found" as the
    TypeScript SDK answers it. (The Python SDK's server would take that first request as opening a 2026-07-28
    connection and then refuse `initialize`; on Streamable HTTP the `Quirks(legacy=True)` middleware does.)"""
    send, recv = anyio.create_memory_object_stream[SessionMessage | Exception](0)

    async def pump() -> None:
        async with send:
            async for item in read:
                m = item.message if isinstance(item, SessionMessage) else None
                if isinstance(m, types.JSONRPCRequest) and m.method == "server/discover":
                    error = types.ErrorData(code=types.METHOD_NOT_FOUND, message="Method not found")
                    await write.send(SessionMessage(types.JSONRPCError(jsonrpc="2.0", id=m.id, error=error)))
                    continue
                await send.send(item)

    async with anyio.create_task_group() as tg:
        tg.start_soon(pump)
        try:
            yield recv
        finally:
            tg.cancel_scope.cancel()


def build_mcp(state: N8nLike, *, serial: bool = True) -> MCPServer:
    mcp = MCPServer("n8n-like")
    # The TypeScript SDK under n8n 1.123 knows no server/discover: clients fall back to initialize.
    mcp.middleware.append(Quirks(legacy=True))
    if serial:
        mcp.middleware.append(SerialPerSession())

    @mcp.tool(structured_output=False)
    async def run_workflow(topic: str, seconds: float = 3.0) -> str:
        """Run the report workflow for a topic and answer when its last node has finished."""
        await asyncio.sleep(seconds)
        return json.dumps([{"summary": f"Report on {topic} is ready", "pages": 3}], separators=(",", ":"))

    @mcp.tool(structured_output=False)
    async def start_workflow(topic: str) -> str:
        """Start the report workflow for a topic; the report arrives later."""
        execution = state.start(topic)
        # What an n8n workflow behind a "respond immediately" webhook hands back: one item, as JSON text.
        return json.dumps([{"status": "accepted", "job_id": execution.id}], separators=(",", ":"))

    @mcp.tool(structured_output=False)
    async def trigger_webhook(topic: str, with_execution_id: bool = True) -> str:
        """Start the report workflow the way n8n's webhook answers when it responds immediately."""
        execution = state.start(topic)
        body: dict[str, Any] = {"message": "Workflow was started"}
        if with_execution_id:
            body["executionId"] = execution.id
        return json.dumps(body)

    return mcp


def build(state: N8nLike, *, path: str = "reports", serial: bool = True) -> Any:
    """The whole n8n look-alike as one ASGI app: `/mcp/<path>` for MCP, the executions API beside it."""
    mcp = build_mcp(state, serial=serial)
    mcp_path = f"/mcp/{path}"
    lowlevel = mcp._lowlevel_server  # the SDK's own sse_app reaches it the same way
    # The endpoint event sends the client back to the same path, with the session id in the query.
    sse = SseServerTransport(mcp_path)
    mcp.streamable_http_app(streamable_http_path=mcp_path)  # builds mcp.session_manager, which serves the path

    async def get_execution(request: Request) -> JSONResponse:
        execution_id = request.path_params["execution_id"]
        state.gets[execution_id] += 1
        if state.api_key is not None and request.headers.get("x-n8n-api-key") != state.api_key:
            return JSONResponse({"message": "unauthorized"}, status_code=401)
        execution = state.executions.get(execution_id)
        if execution is None:
            return JSONResponse({"message": "Not Found"}, status_code=404)
        include_data = request.query_params.get("includeData", "").lower() == "true"
        return JSONResponse(state.document(execution, include_data=include_data))

    async def stats(_: Request) -> JSONResponse:
        return JSONResponse(dict(state.gets))

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with mcp.session_manager.run():
            yield

    api = Starlette(
        routes=[
            Route("/api/v1/executions/{execution_id}", get_execution, methods=["GET"]),
            Route("/_stats", stats, methods=["GET"]),
        ],
        lifespan=lifespan,
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") != mcp_path:
            await api(scope, receive, send)
            return
        method = scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        legacy_post = method == "POST" and b"session_id=" in scope.get("query_string", b"")
        if method == "GET" and "mcp-session-id" not in headers:
            async with sse.connect_sse(scope, receive, send) as (read, write), without_discover(read, write) as legacy:
                await lowlevel.run(legacy, write, lowlevel.create_initialization_options())
        elif legacy_post:
            await sse.handle_post_message(scope, receive, send)
        else:
            await mcp.session_manager.handle_request(scope, receive, send)

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--path", default="reports", help="the trigger's path: MCP is served at /mcp/<path>")
    parser.add_argument("--finish-after-ms", type=int, default=1500)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--fail", action="store_true")
    parser.add_argument("--concurrent", action="store_true", help="handle a session's requests concurrently")
    args = parser.parse_args()
    state = N8nLike(finish_after_ms=args.finish_after_ms, api_key=args.api_key, fail=args.fail)
    asyncio.run(serve_http(build(state, path=args.path, serial=not args.concurrent), args.port))


if __name__ == "__main__":
    sys.exit(main())
