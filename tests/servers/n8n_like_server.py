"""An n8n look-alike for the receipt tests: an MCP endpoint whose tool starts a "workflow" and answers at once
with a receipt, and n8n's public executions API that reports the execution as it runs and finishes.

    python tests/servers/n8n_like_server.py --port 0 [--finish-after-ms 1500] [--api-key KEY] [--fail]

One process, one port: MCP over legacy SSE at /mcp/sse (what n8n's MCP Server Trigger speaks) and Streamable HTTP
at /mcp; `GET /api/v1/executions/{id}` (header X-N8N-API-KEY when --api-key is given); `GET /_stats` counts the
GETs of each execution as `{"<id>": n}`. Prints `LISTENING <port>` once the socket is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from demo_server import app_with_mcp, serve_http
from mcp.server.mcpserver import MCPServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

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


def build(state: N8nLike) -> Starlette:
    mcp = MCPServer("n8n-like")

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

    routes = [
        Route("/api/v1/executions/{execution_id}", get_execution, methods=["GET"]),
        Route("/_stats", stats, methods=["GET"]),
    ]
    return app_with_mcp(mcp, routes, sse=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--finish-after-ms", type=int, default=1500)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--fail", action="store_true")
    args = parser.parse_args()
    state = N8nLike(finish_after_ms=args.finish_after_ms, api_key=args.api_key, fail=args.fail)
    asyncio.run(serve_http(build(state), args.port))


if __name__ == "__main__":
    sys.exit(main())
