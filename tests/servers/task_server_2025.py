"""A real MCP server speaking the 2025-11-25 `tasks` utility, over stdio or Streamable HTTP.

    python tests/servers/task_server_2025.py --transport stdio
    python tests/servers/task_server_2025.py --transport streamable-http --port 0   # prints "LISTENING <port>"

The JSON-RPC is written by hand: the SDK's server checks every 2025 `tools/call` answer against
`CallToolResult`, so it cannot send the spec's `CreateTaskResult`, and it has no `tasks/*` methods at that
version. What this server does, per the 2025-11-25 spec:
  - declares `capabilities.tasks` = {list, cancel, requests.tools.call};
  - lists `long_report` (execution.taskSupport "required"), `maybe_task` ("optional"), `quick` (none) and
    `calls_seen` (none: what every tools/call carried, as JSON);
  - answers a task-augmented tools/call with `CreateTaskResult` {task: {..., pollInterval}};
  - serves tasks/get, tasks/result (blocks until the task is terminal), tasks/cancel and tasks/list;
  - sends `notifications/tasks/status` whenever a task's status or status message changes;
  - refuses `long_report` without `params.task` with -32601, as the spec says for a `required` tool.
  - answers `server/discover` with -32601, so a 2026-capable client falls back to `initialize`.
With --no-tasks-capability it lists the same tools but declares no `tasks` capability. A task works in steps of
--step-ms (a status message each). On HTTP, responses are plain JSON and notifications travel on the session's
GET event stream; `GET /_finished` gives each finished task's server-side finish time, `{"<taskId>": time.time()}`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

PROTOCOL = "2025-11-25"
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
RELATED_TASK = "io.modelcontextprotocol/related-task"
TERMINAL = ("completed", "failed", "cancelled")

TOOLS: list[dict[str, Any]] = [
    {
        "name": "long_report",
        "description": "Build a report over `seconds`; must run as a task.",
        "inputSchema": {
            "type": "object",
            "properties": {"seconds": {"type": "number"}, "fail": {"type": "boolean"}},
            "required": ["seconds"],
        },
        "execution": {"taskSupport": "required"},
    },
    {
        "name": "maybe_task",
        "description": "Build a report over `seconds`; may run as a task.",
        "inputSchema": {
            "type": "object",
            "properties": {"seconds": {"type": "number"}, "fail": {"type": "boolean"}},
            "required": ["seconds"],
        },
        "execution": {"taskSupport": "optional"},
    },
    {
        "name": "quick",
        "description": "Answer at once.",
        "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    },
    {
        "name": "calls_seen",
        "description": "Every tools/call this server received: tool name and whether params.task was set.",
        "inputSchema": {"type": "object", "properties": {}},
    },
]
TASK_SUPPORT = {t["name"]: t.get("execution", {}).get("taskSupport", "forbidden") for t in TOOLS}

Notify = Callable[[dict[str, Any]], Awaitable[None]]


class RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def now() -> str:
    return datetime.now(UTC).isoformat()


def text_result(text: str, *, is_error: bool = False) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": is_error}


@dataclass
class Task:
    task_id: str
    ttl: int | None
    poll_interval: int
    status: str = "working"
    status_message: str | None = None
    created_at: str = field(default_factory=now)
    last_updated_at: str = field(default_factory=now)
    result: dict[str, Any] | None = None
    finished_at: float | None = None  # wall clock (time.time()) when the work ended, for the benchmarks
    done: asyncio.Event = field(default_factory=asyncio.Event)
    runner: asyncio.Task[None] | None = None

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "taskId": self.task_id,
            "status": self.status,
            "createdAt": self.created_at,
            "lastUpdatedAt": self.last_updated_at,
            "ttl": self.ttl,
            "pollInterval": self.poll_interval,
        }
        if self.status_message is not None:
            out["statusMessage"] = self.status_message
        return out


class TaskServer:
    """The protocol, independent of the transport: one instance per client connection (or HTTP session)."""

    def __init__(
        self, notify: Notify, *, poll_interval_ms: int, declare_tasks: bool = True, step_s: float = 0.1
    ) -> None:
        self.notify = notify
        self.poll_interval_ms = poll_interval_ms
        self.step_s = step_s
        self.declare_tasks = declare_tasks
        self.tasks: dict[str, Task] = {}
        self.calls: list[dict[str, Any]] = []

    async def handle(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        """The response to one JSON-RPC message, or None for a notification or a response."""
        if "method" not in msg or "id" not in msg:
            return None
        try:
            result = await self.dispatch(msg["method"], msg.get("params") or {})
        except RpcError as exc:
            return {"jsonrpc": "2.0", "id": msg["id"], "error": {"code": exc.code, "message": exc.message}}
        except Exception as exc:  # a bug here must still answer the request
            return {"jsonrpc": "2.0", "id": msg["id"], "error": {"code": INTERNAL_ERROR, "message": repr(exc)}}
        return {"jsonrpc": "2.0", "id": msg["id"], "result": result}

    async def dispatch(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        if method == "initialize":
            capabilities: dict[str, Any] = {"tools": {"listChanged": False}}
            if self.declare_tasks:
                capabilities["tasks"] = {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}
            return {
                "protocolVersion": PROTOCOL,
                "capabilities": capabilities,
                "serverInfo": {"name": "tasks-2025", "version": "1.0.0"},
            }
        if method == "ping":
            return {}
        if method == "tools/list":
            return {"tools": TOOLS}
        if method == "tools/call":
            return await self.call_tool(params)
        if method == "tasks/get":
            return self.task(params).wire()
        if method == "tasks/result":
            task = self.task(params)
            await task.done.wait()
            if task.result is None:
                raise RpcError(INTERNAL_ERROR, f"task {task.task_id} was {task.status} and has no result")
            meta = dict(task.result.get("_meta") or {}, **{RELATED_TASK: {"taskId": task.task_id}})
            return {**task.result, "_meta": meta}
        if method == "tasks/cancel":
            task = self.task(params)
            if task.status in TERMINAL:
                raise RpcError(INVALID_PARAMS, f"cannot cancel task {task.task_id}: it is already {task.status}")
            if task.runner is not None:
                task.runner.cancel()
            await self.set_status(task, "cancelled", "cancelled by the client")
            task.done.set()
            return task.wire()
        if method == "tasks/list":
            return {"tasks": [t.wire() for t in self.tasks.values()]}
        raise RpcError(METHOD_NOT_FOUND, f"method not found: {method}")

    def task(self, params: dict[str, Any]) -> Task:
        task = self.tasks.get(str(params.get("taskId")))
        if task is None:
            raise RpcError(INVALID_PARAMS, f"task not found: {params.get('taskId')!r}")
        return task

    async def call_tool(self, params: dict[str, Any]) -> dict[str, Any]:
        name = params.get("name")
        args = params.get("arguments") or {}
        augment = params.get("task")
        self.calls.append({"tool": name, "task": augment})
        print(f"tools/call {name} task={json.dumps(augment)}", file=sys.stderr, flush=True)
        support = TASK_SUPPORT.get(str(name))
        if support is None:
            raise RpcError(INVALID_PARAMS, f"unknown tool: {name}")
        if name == "quick":
            return text_result(f"quick: {args.get('text', '')}")
        if name == "calls_seen":
            return text_result(json.dumps(self.calls))
        if augment is None:
            if support == "required":
                raise RpcError(METHOD_NOT_FOUND, f"tool {name} must be called as a task (params.task)")
            return await self.work(None, args)
        ttl = augment.get("ttl") if isinstance(augment, dict) else None
        task = Task(
            task_id=uuid.uuid4().hex, ttl=ttl if isinstance(ttl, int) else 60_000, poll_interval=self.poll_interval_ms
        )
        self.tasks[task.task_id] = task
        task.runner = asyncio.get_running_loop().create_task(self.run_task(task, args))
        return {"task": task.wire()}

    async def work(self, task: Task | None, args: dict[str, Any]) -> dict[str, Any]:
        seconds = float(args.get("seconds", 1))
        steps = max(1, int(seconds / self.step_s))
        for i in range(steps):
            if task is not None:
                await self.set_status(task, "working", f"step {i + 1} of {steps}")
            await asyncio.sleep(seconds / steps)
        if args.get("fail"):
            return text_result("the report could not be built", is_error=True)
        return text_result(f"report ready after {seconds:g}s")

    async def run_task(self, task: Task, args: dict[str, Any]) -> None:
        try:
            result = await self.work(task, args)
        except asyncio.CancelledError:
            return
        task.result = result
        task.finished_at = time.time()
        # 2025-11-25: a tool result with isError makes the task `failed`; tasks/result still returns it.
        if result.get("isError"):
            await self.set_status(task, "failed", result["content"][0]["text"])
        else:
            await self.set_status(task, "completed", None)
        task.done.set()

    async def set_status(self, task: Task, status: str, message: str | None) -> None:
        if task.status in TERMINAL or (status, message) == (task.status, task.status_message):
            return
        task.status, task.status_message, task.last_updated_at = status, message, now()
        await self.notify({"jsonrpc": "2.0", "method": "notifications/tasks/status", "params": task.wire()})

    def close(self) -> None:
        for task in self.tasks.values():
            if task.runner is not None:
                task.runner.cancel()


# -- stdio: one JSON-RPC message per line ---------------------------------------------------------------------


async def serve_stdio(poll_interval_ms: int, declare_tasks: bool, step_s: float = 0.1) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    write_lock = asyncio.Lock()

    async def write(message: dict[str, Any]) -> None:
        async with write_lock:
            sys.stdout.write(json.dumps(message) + "\n")
            sys.stdout.flush()

    server = TaskServer(write, poll_interval_ms=poll_interval_ms, declare_tasks=declare_tasks, step_s=step_s)
    pending: set[asyncio.Task[None]] = set()

    async def answer(msg: dict[str, Any]) -> None:
        response = await server.handle(msg)
        if response is not None:
            await write(response)

    while line := await reader.readline():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        # Each request on its own task: tasks/result blocks until its task ends.
        job = loop.create_task(answer(msg))
        pending.add(job)
        job.add_done_callback(pending.discard)
    server.close()


# -- Streamable HTTP (2025-11-25): POST answers as JSON, GET carries server notifications ---------------------


@dataclass
class Session:
    server: TaskServer
    outbox: asyncio.Queue[dict[str, Any]]


def http_app(poll_interval_ms: int, declare_tasks: bool, step_s: float = 0.1) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    sessions: dict[str, Session] = {}

    async def post(request: Request) -> Response:
        try:
            msg = await request.json()
        except ValueError:
            return JSONResponse({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "bad JSON"}}, 400)
        if not isinstance(msg, dict):
            return JSONResponse({"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "no batches"}}, 400)
        headers: dict[str, str] = {}
        if msg.get("method") == "initialize":
            sid = uuid.uuid4().hex
            outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
            server = TaskServer(
                outbox.put, poll_interval_ms=poll_interval_ms, declare_tasks=declare_tasks, step_s=step_s
            )
            sessions[sid] = Session(server, outbox)
            headers["mcp-session-id"] = sid
        else:
            sid = request.headers.get("mcp-session-id", "")
        session = sessions.get(sid)
        if session is None:
            if msg.get("method") == "server/discover" and "id" in msg:
                # No session yet: a 2026 client's probe. Not ours to serve.
                return JSONResponse(
                    {"jsonrpc": "2.0", "id": msg["id"], "error": {"code": METHOD_NOT_FOUND, "message": "not found"}}
                )
            return JSONResponse(
                {"jsonrpc": "2.0", "id": msg.get("id"), "error": {"code": -32001, "message": "no session"}}, 404
            )
        response = await session.server.handle(msg)
        if response is None:
            return Response(status_code=202)
        return JSONResponse(response, headers=headers)

    async def get(request: Request) -> Response:
        session = sessions.get(request.headers.get("mcp-session-id", ""))
        if session is None:
            return Response(status_code=404)

        async def events() -> AsyncIterator[bytes]:
            yield b": open\n\n"
            while True:
                message = await session.outbox.get()
                yield f"event: message\ndata: {json.dumps(message)}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    async def delete(request: Request) -> Response:
        session = sessions.pop(request.headers.get("mcp-session-id", ""), None)
        if session is not None:
            session.server.close()
        return Response(status_code=200)

    async def finished(_: Request) -> Response:
        times = {t.task_id: t.finished_at for s in sessions.values() for t in s.server.tasks.values()}
        return JSONResponse({tid: at for tid, at in times.items() if at is not None})

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        for session in sessions.values():
            session.server.close()

    return Starlette(
        routes=[
            Route("/mcp", post, methods=["POST"]),
            Route("/mcp", get, methods=["GET"]),
            Route("/mcp", delete, methods=["DELETE"]),
            Route("/_finished", finished, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


async def serve_http(port: int, poll_interval_ms: int, declare_tasks: bool, step_s: float = 0.1) -> None:
    import uvicorn
    from demo_server import listening_socket

    sock = listening_socket(port)
    print(f"LISTENING {sock.getsockname()[1]}", flush=True)
    server = uvicorn.Server(
        uvicorn.Config(
            http_app(poll_interval_ms, declare_tasks, step_s),
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=1,
        )
    )
    await server.serve(sockets=[sock])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", choices=["stdio", "streamable-http"], default="stdio")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--poll-interval-ms", type=int, default=200)
    parser.add_argument("--step-ms", type=int, default=100, help="a task's step (one status message each)")
    parser.add_argument("--no-tasks-capability", action="store_true", help="list the same tools, declare no tasks")
    args = parser.parse_args()
    declare = not args.no_tasks_capability
    if args.transport == "stdio":
        asyncio.run(serve_stdio(args.poll_interval_ms, declare, args.step_ms / 1000))
    else:
        asyncio.run(serve_http(args.port, args.poll_interval_ms, declare, args.step_ms / 1000))


if __name__ == "__main__":
    sys.exit(main())
