"""A registry of more tools than an LLM can take: each turn is offered at most the budget, chosen from the
conversation, with `find_tools` for the rest. 30 real MCP servers of 10 tools (tests/servers/many_servers.py,
the `mcp` SDK's servers in one process), a real dispatcher and a text `AgentSession` with a scripted LLM that
can only call what it is offered.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from conftest import SERVERS, OfferingLLM, stdio_demo

from mcp_integration.dispatcher import Dispatcher, ToolEntry
from mcp_integration.livekit_text import TextCall
from mcp_integration.livekit_tools import FIND_TOOL, McpToolbox, VoiceOptions
from mcp_integration.registry import Registry, ServerConfig, ToolSpec
from mcp_integration.tool_choice import MAX_DESCRIPTION_CHARS, MAX_SCHEMA_CHARS, capped_schema

MANY = str(SERVERS / "many_servers.py")


class ChoosingLLM(OfferingLLM):
    """Calls the tool a phrase names when it is offered; otherwise asks `find_tools` first, then calls it."""

    def __init__(self, wants: dict[str, tuple[str, str]]) -> None:
        super().__init__(self._pick)
        self.wants = wants  # phrase -> (tool, what to search for when it is not offered)
        self.called: list[str] = []

    def _pick(self, text: str) -> tuple[str, dict[str, Any]] | None:
        for phrase, (tool, search) in self.wants.items():
            if phrase in text.lower():
                if tool in self.offered[-1]:
                    self.called.append(tool)
                    return (tool, {"query": text})
                self.called.append(FIND_TOOL)
                return (FIND_TOOL, {"query": search})
        return None

    def _decide(self, chat_ctx: Any, tool_choice: Any) -> tuple[str, Any]:
        items = [i for i in chat_ctx.items if i.type in ("message", "function_call_output")]
        if items and items[-1].type == "function_call_output" and items[-1].name == FIND_TOOL:
            said = next(i.text_content for i in reversed(items) if i.type == "message" and i.role == "user")
            picked = self._pick(said or "")
            if picked is not None and picked[0] != FIND_TOOL:
                return ("tool", (*picked, f"call_after_find_{len(self.called)}"))
        return super()._decide(chat_ctx, tool_choice)


@pytest.fixture
async def many(spawn: Callable[..., int], registry: Registry) -> AsyncIterator[Dispatcher]:
    port = spawn("--servers", "30", "--tools", "10", "--port", "0", script=MANY)
    for i in range(30):
        pinned = ["get_meeting"] if i == 1 else []
        await registry.add_server(
            ServerConfig(
                name=f"s{i:02d}",
                transport="streamable-http",
                url=f"http://127.0.0.1:{port}/s{i:02d}/mcp",
                pinned_tools=pinned,
            )
        )
    d = Dispatcher(registry, connect_timeout=30)
    await d.start(wait=True)
    assert len(d.tools) == 300, [s.error for s in d.servers.values() if s.error]
    try:
        yield d
    finally:
        await d.aclose()


async def test_300_tools_every_request_within_the_budget_and_the_right_tool_reached(many: Dispatcher) -> None:
    model = ChoosingLLM(
        {
            "weather": ("get_forecast", "weather forecast"),
            "parcels": ("count_parcel", "count parcels"),
            "export that": ("export_lead", "export the sales pipeline"),
        }
    )
    call = await TextCall(many, model, options=VoiceOptions(tool_budget=40)).start(greeting=None)
    try:
        await call.say("What's the weather forecast for Paris tomorrow?")
        await call.say("How many parcels are on their way to me?")
        await call.say("Great. And export that for me")
        said = [line.text for line in call.spoken("agent")]
    finally:
        await call.aclose()
    names = {e.name for e in many.tools}
    assert model.offered and all(len(offer) <= 40 for offer in model.offered), [
        sorted(o - names) for o in model.offered
    ]
    assert all("get_meeting" in offer for offer in model.offered)  # pinned on its server: always offered
    assert any("get_forecast done" in s for s in said) and any("count_parcel done" in s for s in said), said
    # The third needs find_tools: nothing the caller said names it, so the LLM searched, then called it.
    assert model.called[-2:] == [FIND_TOOL, "export_lead"], model.called
    assert any("export_lead done" in s for s in said), said


async def test_a_small_registry_is_offered_whole_without_find_tools(registry: Registry) -> None:
    await registry.add_server(stdio_demo())
    d = Dispatcher(registry)
    await d.start(wait=True)
    model = OfferingLLM(lambda text: ("echo", {"text": text}) if text.startswith("echo") else None)
    call = await TextCall(d, model).start(greeting=None)
    try:
        await call.say("echo hello")
    finally:
        await call.aclose()
        await d.aclose()
    names = {e.name for e in d.tools}
    assert names <= model.offered[0] and FIND_TOOL not in model.offered[0]


def test_descriptions_and_schemas_offered_are_capped() -> None:
    huge = {
        "type": "object",
        "properties": {f"p{i}": {"type": "string", "description": "x" * 200} for i in range(2000)},
        "required": ["p1", "p2"],
    }
    spec = ToolSpec(server="hostile", name="big", description="d" * 1_000_000, input_schema=huge)
    toolbox = McpToolbox(Dispatcher(None))
    tool = toolbox.make_tool(ToolEntry(name="big", spec=spec))
    offered = tool.info.raw_schema  # type: ignore[attr-defined]
    assert len(offered["description"]) <= MAX_DESCRIPTION_CHARS
    assert len(json.dumps(offered["parameters"])) <= MAX_SCHEMA_CHARS
    assert offered["parameters"]["required"] == ["p1", "p2"]
    small = {"type": "object", "properties": {"a": {"type": "integer", "description": "kept"}}}
    assert capped_schema(small) is small
