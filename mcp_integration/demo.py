"""`python -m mcp_integration demo`: the tool path end to end, offline, with a timeline of what happens.

Registers the example server shipped in `mcp_integration/examples/`, discovers its tools, and calls a fast
and a slow one through the dispatcher, printing each event with its time.
"""

from __future__ import annotations

import sys
import time

from mcp_integration.dispatcher import Dispatcher
from mcp_integration.jobs import JobEvent, ToolCallError
from mcp_integration.registry import Registry, ServerConfig

EXAMPLE = ServerConfig(
    name="example-assistant",
    transport="stdio",
    command=sys.executable,
    args=["-m", "mcp_integration.examples.assistant_server"],
)


async def run_demo(registry: Registry, out=print) -> None:
    t0 = time.monotonic()

    def line(who: str, text: str) -> None:
        out(f"[{time.monotonic() - t0:6.2f}s] {who:<7} {text}")

    await registry.add_server(EXAMPLE, replace=True)
    d = Dispatcher(registry)
    await d.start(
        wait=True, servers=[s for s in await registry.list_servers(enabled_only=True) if s.name == EXAMPLE.name]
    )
    try:
        line("setup", f"tools: {', '.join(t.name for t in d.tools)}")
        for tool, args in (("world_time", {"city": "Tokyo"}), ("order_status", {"order_id": "A-1042"})):
            line("call", f"{tool} {args}")
            job = d.submit(tool, args)

            def show(event: JobEvent) -> None:
                if event.kind == "progress":
                    line(
                        "event", f"progress {event.data['progress']:g}/{event.data['total']:g}: {event.data['message']}"
                    )
                elif event.kind == "accepted":
                    line("event", "accepted by the server")

            job.add_listener(show)
            try:
                result = await job.wait()
                line("answer", result.text)
            except ToolCallError as exc:
                line("error", str(exc))
            await job.settled()
        row = (await registry.recent_jobs(server=EXAMPLE.name, limit=1))[0]
        line("record", f"mcp_jobs: {row['tool']} {row['state']}")
    finally:
        await d.aclose()
