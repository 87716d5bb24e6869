"""An example workflow server in the style of n8n or Zapier: its MCP tool answers at once with a receipt,
and the real answer is fetched later from a result endpoint on the same origin.

    python -m mcp_integration.examples.workflow_server --port 0    # prints "LISTENING <port>"

MCP (Streamable HTTP) at /mcp; `GET /mcp/results/{job_id}` answers {"status": "running"} until the job is done.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from mcp.server.mcpserver import MCPServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

_ids = itertools.count(1042)
_jobs: dict[str, tuple[float, str]] = {}
WORK_S = 3.0


def build() -> Starlette:
    mcp = MCPServer("workflows")

    @mcp.tool()
    async def order_status(order_id: str) -> dict[str, Any]:
        """Where an order is (runs a warehouse workflow; the answer comes a few seconds later)."""
        job_id = f"exec-{next(_ids)}"
        _jobs[job_id] = (time.monotonic(), order_id)
        return {"job_id": job_id, "status": "queued"}

    async def result(request: Request) -> JSONResponse:
        job = _jobs.get(request.path_params["job_id"])
        if job is None:
            return JSONResponse({"error": "no such job"}, status_code=404)
        started, order_id = job
        if time.monotonic() - started < WORK_S:
            return JSONResponse({"status": "running"})
        answer = {"order_id": order_id, "status": "shipped", "carrier": "DHL", "eta": "2026-11-27"}
        return JSONResponse({"status": "completed", "result": answer})

    app = mcp.streamable_http_app(streamable_http_path="/mcp")

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with mcp.session_manager.run():
            yield

    return Starlette(routes=[Route("/mcp/results/{job_id}", result), *app.routes], lifespan=lifespan)


async def serve(port: int) -> None:
    # Naming TCP lets uvicorn set TCP_NODELAY on accepted connections (no delayed-ACK stalls).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    print(f"LISTENING {sock.getsockname()[1]}", flush=True)
    await uvicorn.Server(uvicorn.Config(build(), log_level="warning")).serve(sockets=[sock])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve(parser.parse_args().port))
