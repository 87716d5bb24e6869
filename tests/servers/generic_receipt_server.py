"""A queue-style MCP server for the receipt tests: a tool that answers with a receipt, a tool whose answer only
looks like one, and a result endpoint to poll.

    python tests/servers/generic_receipt_server.py --port 0 [--finish-after-ms 1000]

MCP over Streamable HTTP at /mcp. `GET /mcp/results/{job_id}` answers `{"status": "running"}` until the job is
finish-after-ms old, then `{"status": "completed", "result": {...}}` (or `failed` for `submit_report(fail=true)`).
Ids starting `redirect-` answer 302 to another origin; `moved-<id>` answers 302 to `<id>` on this origin.
`GET /_stats` counts the GETs of each job as `{"<id>": n}`. `submit_report(seconds=...)` sets that job's own
finish-after; `GET /_finished` gives each job's server-side finish time, `{"<id>": time.time()}` (for benchmarks).
`--busy-retry-after S`: the first GET of each job answers 503 with `Retry-After: S`, as a busy API does.
Prints `LISTENING <port>` once the socket is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from demo_server import app_with_mcp, serve_http
from mcp.server.mcpserver import MCPServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

OFF_ORIGIN = "http://127.0.0.2:9"


@dataclass
class Job:
    id: str
    topic: str
    fail: bool
    started: float
    finish_after: float
    started_wall: float


class Jobs:
    def __init__(self, finish_after_ms: int, busy_retry_after: float | None = None) -> None:
        self.finish_after = finish_after_ms / 1000
        self.busy_retry_after = busy_retry_after
        self.jobs: dict[str, Job] = {}
        self.gets: Counter[str] = Counter()
        self._ids = itertools.count(1)

    def submit(self, topic: str, fail: bool, seconds: float | None = None) -> Job:
        after = self.finish_after if seconds is None else seconds
        job = Job(f"rep-{next(self._ids)}", topic, fail, time.monotonic(), after, time.time())
        self.jobs[job.id] = job
        return job

    def status(self, job: Job) -> dict[str, Any]:
        if time.monotonic() - job.started < job.finish_after:
            return {"status": "running"}
        if job.fail:
            return {"status": "failed", "error": "the report generator crashed"}
        report = f"The report on {job.topic}: all good."
        return {"status": "completed", "result": {"report": report, "topic": job.topic}}


def build(jobs: Jobs) -> Starlette:
    mcp = MCPServer("generic-receipts")

    @mcp.tool()
    async def submit_report(topic: str, fail: bool = False, seconds: float | None = None) -> dict[str, Any]:
        """Queue a report on a topic; it is written in the background."""
        job = jobs.submit(topic, fail, seconds)
        return {"job_id": job.id, "status": "queued"}

    @mcp.tool()
    async def lookup_customer(id: int) -> dict[str, Any]:
        """Look up a customer by id."""
        return {"id": 7, "name": "Ada", "status": "active"}

    async def result(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        jobs.gets[job_id] += 1
        if job_id.startswith("redirect-"):
            return RedirectResponse(f"{OFF_ORIGIN}/steal?job={job_id}", status_code=302)
        if job_id.startswith("moved-"):
            return RedirectResponse(f"/mcp/results/{job_id.removeprefix('moved-')}", status_code=302)
        job = jobs.jobs.get(job_id)
        if job is None:
            return JSONResponse({"error": "no such job"}, status_code=404)
        if jobs.busy_retry_after is not None and jobs.gets[job_id] == 1:
            headers = {"Retry-After": f"{jobs.busy_retry_after:g}"}
            return JSONResponse({"error": "busy"}, status_code=503, headers=headers)
        return JSONResponse(jobs.status(job))

    async def stats(_: Request) -> JSONResponse:
        return JSONResponse(dict(jobs.gets))

    async def finished(_: Request) -> JSONResponse:
        return JSONResponse({j.id: j.started_wall + j.finish_after for j in jobs.jobs.values()})

    routes = [
        Route("/mcp/results/{job_id}", result, methods=["GET"]),
        Route("/_stats", stats, methods=["GET"]),
        Route("/_finished", finished, methods=["GET"]),
    ]
    return app_with_mcp(mcp, routes)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--finish-after-ms", type=int, default=1000)
    parser.add_argument("--busy-retry-after", type=float, default=None)
    args = parser.parse_args()
    asyncio.run(serve_http(build(Jobs(args.finish_after_ms, args.busy_retry_after)), args.port))


if __name__ == "__main__":
    sys.exit(main())
