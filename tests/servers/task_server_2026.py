"""A real MCP server speaking the 2026-07-28 tasks extension (`io.modelcontextprotocol/tasks`, SEP-2663).

Built on `fastmcp` + `fastmcp-tasks` (the server side of the extension; an in-memory Docket backend):

    python tests/servers/task_server_2026.py --transport stdio
    python tests/servers/task_server_2026.py --transport streamable-http --port 0   # prints "LISTENING <port>"

Tools:
  report(seconds, fail=False, tool_error=False)
                                task-capable: works for `seconds` (a status message per step), then answers;
                                `fail` ends it with a JSON-RPC error, `tool_error` with an isError result
  quick(text)                   never a task: answers at once
  seen_headers()                what `Mcp-Name` header each tasks/* request carried (HTTP only; [] on stdio)

fastmcp-tasks pushes no status (SEP-2663 status is polled), so clients of this server must poll `tasks/get`.
With --push, this server also serves `subscriptions/listen` with the extension's `taskIds` filter and pushes
`notifications/tasks` (the full task, result inline) whenever a watched task's status changes.
Over HTTP, `GET /_finished` gives each task's server-side finish time, `{"<taskId>": time.time()}` (benchmarks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import timedelta
from typing import Any, Literal

import mcp_types as types
from demo_server import listening_socket
from fastmcp import Context, FastMCP
from fastmcp.exceptions import ToolError
from fastmcp.server.extensions import read_client_extension_settings
from fastmcp.utilities.tasks import TASKS_EXTENSION_ID, TaskConfig
from fastmcp_tasks import TasksExtension
from fastmcp_tasks.handlers import tasks_get
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import SUBSCRIPTION_ID_META_KEY
from mcp_types import INTERNAL_ERROR, MISSING_REQUIRED_CLIENT_CAPABILITY
from pydantic import ConfigDict
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

# One record per tasks/* request seen over HTTP: {"method", "taskId", "mcpName"}.
SEEN: list[dict[str, Any]] = []
# When each task's work ended (time.time()), by task id.
FINISHED: dict[str, float] = {}


def build(poll_interval_ms: int, cache_ttl_s: int | None = None) -> FastMCP:
    mcp = FastMCP("tasks-2026", cache_ttl=cache_ttl_s)
    mcp.add_extension(TasksExtension())
    task_cfg = TaskConfig(mode="optional", poll_interval=timedelta(milliseconds=poll_interval_ms))

    @mcp.tool(task=task_cfg)
    async def report(seconds: float, ctx: Context, fail: bool = False, tool_error: bool = False) -> str:
        """Work for `seconds`, then return a report. Runs as a task when the client can.

        fail: end with a JSON-RPC error (SEP-2663: the task becomes `failed`, with `error`).
        tool_error: end with a tool error (the task is `completed`, its result has isError).
        """
        steps = max(1, int(seconds / 0.1))
        for i in range(steps):
            await ctx.report_progress(i, steps, f"step {i + 1} of {steps}")
            await asyncio.sleep(seconds / steps)
        if ctx.task_id is not None:
            FINISHED[ctx.task_id] = time.time()
        if fail:
            raise MCPError(INTERNAL_ERROR, "the report could not be built")
        if tool_error:
            raise ToolError("the report has no data")
        return f"report ready after {seconds:g}s"

    @mcp.tool()
    async def quick(text: str) -> str:
        """Answer at once; never a task."""
        return f"quick: {text}"

    @mcp.tool()
    async def seen_headers() -> str:
        """The tasks/* requests this server saw over HTTP, with their Mcp-Name header (JSON)."""
        return json.dumps(SEEN)

    @mcp.custom_route("/_finished", methods=["GET"])
    async def finished(_: Request) -> JSONResponse:
        return JSONResponse(FINISHED)

    return mcp


class RecordTaskHeaders:
    """ASGI middleware: note the Mcp-Name header of every tasks/* POST, so a test can check the client set it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if isinstance(payload, dict) and str(payload.get("method", "")).startswith("tasks/"):
            headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
            SEEN.append(
                {
                    "method": payload["method"],
                    "taskId": (payload.get("params") or {}).get("taskId"),
                    "mcpName": headers.get("mcp-name"),
                }
            )
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class TaskParams(types.NotificationParams):
    """A whole task as notification params (the model keeps every field it is given)."""

    model_config = ConfigDict(extra="allow")


class TaskStatusNotification(types.Notification[TaskParams, Literal["notifications/tasks"]]):
    method: Literal["notifications/tasks"] = "notifications/tasks"
    params: TaskParams


def install_task_push(mcp: FastMCP, interval_s: float = 0.01) -> None:
    """Serve `subscriptions/listen` with the extension's `taskIds` filter: push each task's status as it changes.

    fastmcp-tasks has no push (its status is polled), so this handler watches the tasks it is asked about
    (through fastmcp-tasks' own `tasks/get` logic) and sends `notifications/tasks` with the full task, on the
    listen stream, per the extension's draft. It replaces the server's listen handler (this server publishes
    no list changes), so only `taskIds` is honored.
    """

    async def listen(ctx: Any, params: types.SubscriptionsListenRequestParams) -> types.SubscriptionsListenResult:
        if read_client_extension_settings(ctx, TASKS_EXTENSION_ID) is None:
            raise MCPError(MISSING_REQUIRED_CLIENT_CAPABILITY, "task status notifications need the tasks extension")
        wanted = (params.notifications.model_extra or {}).get("taskIds") or []
        task_ids = [t for t in wanted if isinstance(t, str)]
        meta = {SUBSCRIPTION_ID_META_KEY: ctx.request_id}
        honored = types.SubscriptionFilter.model_validate({"taskIds": task_ids})
        await ctx.session.send_notification(
            types.SubscriptionsAcknowledgedNotification(
                params=types.SubscriptionsAcknowledgedNotificationParams(notifications=honored, _meta=meta)
            ),
            related_request_id=ctx.request_id,
        )
        last: dict[str, tuple[str, str | None]] = {}
        open_ids = set(task_ids)
        while open_ids:
            for task_id in sorted(open_ids):
                try:
                    task = await tasks_get(mcp, task_id)
                except MCPError:
                    open_ids.discard(task_id)
                    continue
                key = (task.status, task.status_message)
                if last.get(task_id) != key:
                    last[task_id] = key
                    wire = task.model_dump(by_alias=True, mode="json", exclude_none=True)
                    wire.pop("resultType", None)
                    wire["_meta"] = meta
                    await ctx.session.send_notification(
                        TaskStatusNotification(params=TaskParams.model_validate(wire)),
                        related_request_id=ctx.request_id,
                    )
                if task.status in ("completed", "failed", "cancelled"):
                    open_ids.discard(task_id)
            await asyncio.sleep(interval_s)
        # Every task ended: close the stream gracefully.
        return types.SubscriptionsListenResult(_meta=meta)

    mcp._mcp_server.add_request_handler("subscriptions/listen", types.SubscriptionsListenRequestParams, listen)


async def serve_http(mcp: FastMCP, port: int) -> None:
    sock = listening_socket(port)
    print(f"LISTENING {sock.getsockname()[1]}", flush=True)
    await mcp.run_http_async(
        show_banner=False,
        transport="streamable-http",
        host="127.0.0.1",
        log_level="warning",
        middleware=[Middleware(RecordTaskHeaders)],
        sockets=[sock],
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", choices=["stdio", "streamable-http"], default="stdio")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--poll-interval-ms", type=int, default=200)
    parser.add_argument("--push", action="store_true", help="push task status on subscriptions/listen (taskIds)")
    parser.add_argument("--cache-ttl-s", type=int, default=None, help="FastMCP's cache_ttl: ttlMs of its results")
    args = parser.parse_args()
    mcp = build(args.poll_interval_ms, args.cache_ttl_s)
    if args.push:
        install_task_push(mcp)
    if args.transport == "stdio":
        asyncio.run(mcp.run_stdio_async(show_banner=False, log_level="warning"))
    else:
        asyncio.run(serve_http(mcp, args.port))


if __name__ == "__main__":
    sys.exit(main())
