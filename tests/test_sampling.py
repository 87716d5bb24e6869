"""A server asking the session's LLM for a completion (MCP sampling), served only where the registry allows it,
capped, and recorded without its content. tests/servers/ask_server.py's `summarize` asks through the `mcp` SDK's
`Sample` resolver (both dialects); the session is a real text `AgentSession` with the scripted LLM.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import SERVERS

from mcp_integration.dispatcher import Dispatcher
from mcp_integration.jobs import Job
from mcp_integration.livekit_text import ScriptedLLM, TextCall
from mcp_integration.registry import Registry, ServerConfig

ASK = str(SERVERS / "ask_server.py")


def route(text: str) -> tuple[str, dict[str, str]] | None:
    return ("summarize", {"text": text.removeprefix("summarize ")}) if text.startswith("summarize ") else None


async def session(
    spawn: Callable[..., int], registry: Registry, *, allow: bool, legacy: bool, talk: Callable[[str], str]
) -> tuple[Dispatcher, TextCall]:
    port = spawn("--transport", "streamable-http", "--port", "0", *(["--legacy"] if legacy else []), script=ASK)
    cfg = await registry.add_server(
        ServerConfig(name="ask", transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp", allow_sampling=allow)
    )
    d = Dispatcher(registry)
    await d.start(servers=[cfg])
    call = await TextCall(d, ScriptedLLM(route, small_talk=talk)).start(greeting=None)
    return d, call


async def one_call(d: Dispatcher, call: TextCall, said: str) -> Job:
    """The caller says one thing; the job it made, once recorded; then the session and dispatcher close."""
    try:
        await call.say(said)
        (job,) = call.toolbox.jobs
        await job.settled()
        return job
    finally:
        await call.aclose()
        await d.aclose()


@pytest.mark.parametrize("legacy", [False, True], ids=["2026-07-28", "2025-11-25"])
async def test_an_allowed_server_gets_the_sessions_llm_and_the_exchange_is_recorded_without_content(
    spawn: Callable[..., int], registry: Registry, legacy: bool
) -> None:
    d, call = await session(spawn, registry, allow=True, legacy=legacy, talk=lambda text: f"One line about: {text}")
    try:
        await call.say("summarize the minutes of the board meeting")
        (job,) = call.toolbox.jobs
        await job.settled()
        said = " ".join(line.text for line in call.spoken("agent"))
    finally:
        await call.aclose()
        await d.aclose()
    assert "Summary (scripted, endTurn): One line about: Summarize in one line: the minutes of the board" in said
    (record,) = job.samplings
    assert record.pop("chars") > 20
    assert record == {"messages": 1, "max_tokens": 50, "model": "scripted", "stop_reason": "endTurn"}
    async with registry.pool.connection() as conn:
        row = await (
            await conn.execute("SELECT samplings::text AS s FROM mcp_jobs WHERE id = %s", (job.id,))
        ).fetchone()
    assert '"model": "scripted"' in row["s"] and "board meeting" not in row["s"]  # the shape, never the content


async def test_the_token_cap_cuts_a_long_completion(spawn: Callable[..., int], registry: Registry) -> None:
    d, call = await session(spawn, registry, allow=True, legacy=True, talk=lambda text: "blah " * 400)
    job = await one_call(d, call, "summarize everything")
    (record,) = job.samplings
    assert record["stop_reason"] == "maxTokens" and record["chars"] <= 50 * 4


async def test_sampling_is_off_unless_the_registry_allows_it(spawn: Callable[..., int], registry: Registry) -> None:
    asked: list[str] = []

    def talk(text: str) -> str:
        asked.append(text)
        return "should not be asked"

    d, call = await session(spawn, registry, allow=False, legacy=True, talk=talk)
    job = await one_call(d, call, "summarize the minutes")
    assert job.state == "failed" and "sampling" in (job.error.reason if job.error else "").lower()
    assert not any("Summarize in one line" in a for a in asked) and not job.samplings
