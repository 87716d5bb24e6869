"""`python -m mcp_integration demo`: the real voice path, offline, printed as a timeline.

Registers the example servers shipped in `mcp_integration/examples/` (a fast tool, a booking tool that asks
the caller for the day, a slow MCP task, a workflow that answers with a receipt), then runs a real LiveKit
`AgentSession` in text mode over the real toolbox, filler policy and speech formatting. With OPENAI_API_KEY
(or OPENAI_BASE_URL) a real LLM answers; without, a scripted caller-and-LLM conversation drives the same
session, and the screen says so.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from mcp_integration.config import Settings
from mcp_integration.dispatcher import Dispatcher
from mcp_integration.livekit_text import Line, ScriptedLLM, TextCall
from mcp_integration.livekit_tools import ANSWER_TOOL, VoiceOptions, llm_from_env
from mcp_integration.registry import Registry, ServerConfig
from mcp_integration.runtime import open_runtime

__all__ = [
    "CALLER",
    "RULES",
    "WHO",
    "example_servers",
    "route",
    "run_demo",
    "start_workflow_server",
]


CALLER = [
    "What time is it in Tokyo?",
    "Can you book a table for 2, please?",
    "The first of December, for dinner.",
    "Where is my order A-1042?",
    "Please build the Q3 sales report.",
    "Thanks. Meanwhile, what time is it in Paris?",
]
RULES: list[tuple[str, Callable[[re.Match[str]], tuple[str, dict[str, Any]]]]] = [
    (r"time is it in (\w[\w ]*)\?", lambda m: ("world_time", {"city": m[1]})),
    (r"order (\S+?)\??$", lambda m: ("order_status", {"order_id": m[1]})),
    (r"(Q\d) sales report", lambda m: ("quarterly_report", {"quarter": m[1]})),
    (r"book a table for (\d+)", lambda m: ("book_table", {"people": int(m[1])})),
    # The caller's answer to the booking tool's question, mapped onto its schema as an LLM would.
    (r"first of december, for (lunch|dinner)", lambda m: (ANSWER_TOOL, {"day": "2026-12-01", "time": m[1]})),
]
WHO = {"caller": "CALLER", "agent": "AGENT", "filler": "FILLER", "tool": "  job"}


def route(text: str) -> tuple[str, dict[str, Any]] | None:
    for pattern, make in RULES:
        if m := re.search(pattern, text, re.I):
            return make(m)
    return None


def example_servers(workflow_port: int) -> list[ServerConfig]:
    py = sys.executable
    return [
        ServerConfig(
            name="example-assistant",
            transport="stdio",
            command=py,
            args=["-m", "mcp_integration.examples.assistant_server"],
        ),
        ServerConfig(
            name="example-reports",
            transport="stdio",
            command=py,
            args=["-m", "mcp_integration.examples.tasks_server"],
            release_after_ms=4000,
        ),
        ServerConfig(
            name="example-workflows",
            transport="streamable-http",
            url=f"http://127.0.0.1:{workflow_port}/mcp",
            poll_interval=500,
        ),
    ]


def start_workflow_server() -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcp_integration.examples.workflow_server", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("LISTENING "):
        proc.kill()
        raise RuntimeError("the example workflow server did not start")
    return proc, int(line.split()[1])


async def run_demo(
    registry: Registry, settings: Settings, out: Callable[[str], None] = print, *, late_wait_s: float = 30.0
) -> list[Line]:
    proc, port = start_workflow_server()
    cfgs = example_servers(port)
    try:
        for cfg in cfgs:
            await registry.add_server(cfg, replace=True)
        mine = [s for s in await registry.list_servers() if s.name in {c.name for c in cfgs}]
        async with open_runtime(registry, settings, servers=mine, wait=True) as rt:
            return await _converse(rt.dispatcher, settings, out, late_wait_s)
    finally:
        for cfg in cfgs:
            # The example servers live only for the demo: the real agent should not find them later.
            await registry.remove_server(cfg.name)
        proc.kill()
        proc.wait(5)


async def _converse(
    dispatcher: Dispatcher, settings: Settings, out: Callable[[str], None], late_wait_s: float
) -> list[Line]:
    model = llm_from_env(settings)
    if model is None:
        out("LLM: scripted (no OPENAI_API_KEY): a scripted caller-and-LLM conversation drives the real session")
        model = ScriptedLLM(route)
    else:
        out(f"LLM: {model.model} (real)")
    out(f"tools: {', '.join(t.name for t in dispatcher.tools)}")
    out("")

    def show(line: Line) -> None:
        out(f"[{line.at:6.2f}s] {WHO[line.who]:<7} {line.text}")

    call = await TextCall(dispatcher, model, options=VoiceOptions(), on_line=show).start()
    try:
        for text in CALLER:
            await call.say(text)
        for _ in range(int(late_wait_s * 10)):
            if any(j.done for j in call.toolbox.jobs) and all(j.done for j in call.toolbox.jobs):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # the late answer is spoken just after its job completes
    finally:
        await call.aclose()
    return call.lines
