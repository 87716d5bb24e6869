"""The voice path: a real text-mode AgentSession, a scripted LLM on LiveKit's LLM interface, the real toolbox,
dispatcher, registry and MCP servers. What the caller hears is asserted, in order and roughly in time."""

from __future__ import annotations

import asyncio
import itertools
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from conftest import SERVERS, OfferingLLM, stdio_demo

from mcp_integration.dispatcher import Dispatcher
from mcp_integration.fillers import FillerPolicy
from mcp_integration.livekit_text import ScriptedLLM, TextCall
from mcp_integration.livekit_tools import VoiceOptions
from mcp_integration.registry import Registry, ServerConfig
from mcp_integration.registry_watch import RegistryWatcher

RULES: list[tuple[str, Callable[[re.Match[str]], tuple[str, dict[str, Any]]]]] = [
    (r"^echo (.+)", lambda m: ("echo", {"text": m[1]})),
    (r"^wait ([\d.]+)(?: in (\d+) steps)?", lambda m: ("slow", {"seconds": float(m[1]), "steps": int(m[2] or 1)})),
    (r"^break", lambda m: ("fail", {"reason": "the disk is on fire"})),
    (r"^report on (\w+)", lambda m: ("submit_report", {"topic": m[1]})),
    (r"^use (\w+) (.+)", lambda m: (m[1], {"text": m[2]})),
]


def route(text: str) -> tuple[str, dict[str, Any]] | None:
    for pattern, make in RULES:
        if m := re.match(pattern, text.strip(), re.I):
            return make(m)
    return None


def fast_policy(**kw: Any) -> VoiceOptions:
    policy = FillerPolicy.load()
    policy.threshold_s = kw.pop("threshold_s", 1.0)
    policy.interval_s = kw.pop("interval_s", (6.0, 8.0))
    return VoiceOptions(policy=policy, **kw)


async def call_with(
    registry: Registry, *cfgs: ServerConfig, options: VoiceOptions | None = None, model: ScriptedLLM | None = None
) -> TextCall:
    for cfg in cfgs:
        await registry.add_server(cfg)
    d = Dispatcher(registry, connect_timeout=15)
    await d.start(wait=True)
    return await TextCall(d, model or ScriptedLLM(route), options=options or fast_policy()).start()


async def close(call: TextCall) -> None:
    await call.aclose()
    await call.toolbox.dispatcher.aclose()


async def test_fast_tool_answers_without_filler(registry: Registry) -> None:
    call = await call_with(registry, stdio_demo())
    try:
        result = await call.say("echo good morning")
        result.expect.next_event().is_function_call(name="echo")
        result.expect.next_event().is_function_call_output()
        msg = result.expect.next_event().is_message(role="assistant")
        assert "echo: good morning" in msg.event().item.text_content
        assert call.spoken("filler") == []
    finally:
        await close(call)


async def test_slow_tool_first_filler_just_after_the_threshold_then_the_answer(registry: Registry) -> None:
    call = await call_with(registry, stdio_demo())
    try:
        t0 = call.now()
        await call.say("wait 2.5")
        fillers = call.spoken("filler")
        assert len(fillers) == 1, call.lines
        assert 0.9 <= fillers[0].at - t0 <= 2.4, fillers[0].at - t0  # not before the threshold
        assert fillers[0].text in FillerPolicy.load().default.lines["start"]
        answers = [line for line in call.spoken("agent") if "done after 2.5s" in line.text]
        assert answers and answers[0].at > fillers[0].at
    finally:
        await close(call)


async def test_progress_aware_lines_that_never_repeat_back_to_back(registry: Registry) -> None:
    options = fast_policy(threshold_s=0.3, interval_s=(0.8, 0.8))
    call = await call_with(registry, stdio_demo(), options=options)
    try:
        await call.say("wait 5 in 10 steps")
        texts = [line.text for line in call.spoken("filler")]
        assert len(texts) >= 3, call.lines
        assert all(a != b for a, b in itertools_pairs(texts))
        lines = FillerPolicy.load().default.lines
        progress_like = set(lines["halfway"] + lines["almost_done"])
        assert any(t in progress_like or "percent done" in t or "Making progress" in t for t in texts), texts
        assert "done after 5s" in call.lines[-1].text
    finally:
        await close(call)


def itertools_pairs(items: list[str]) -> list[tuple[str, str]]:
    return list(itertools.pairwise(items))


async def test_receipt_tool_speaks_the_answer_never_the_acknowledgment(
    registry: Registry, spawn: Callable[..., int]
) -> None:
    port = spawn("--port", "0", "--finish-after-ms", "1500", script=str(SERVERS / "generic_receipt_server.py"))
    gen = ServerConfig(
        name="reports", transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp", poll_interval=200
    )
    call = await call_with(registry, gen)
    try:
        await call.say("report on revenue")
        agent = " ".join(line.text for line in call.spoken("agent"))
        assert "revenue" in agent
        assert "queued" not in agent.lower() and "accepted" not in agent.lower() and "{" not in agent
    finally:
        await close(call)


async def test_failing_tool_is_one_honest_sentence(registry: Registry) -> None:
    call = await call_with(registry, stdio_demo("booking-system"))
    try:
        result = await call.say("break it")
        result.expect.next_event().is_function_call(name="fail")
        out = result.expect.next_event().is_function_call_output().event().item
        assert out.is_error
        assert out.output == "The booking system could not do that: the disk is on fire."
        assert "internal error" not in call.lines[-1].text.lower()
    finally:
        await close(call)


async def test_job_outliving_the_release_point_is_spoken_later_while_the_caller_talks(registry: Registry) -> None:
    cfg = stdio_demo()
    cfg.release_after_ms = 1500
    call = await call_with(registry, cfg)
    try:
        await call.say("wait 4")  # released at 1.5 s
        released = call.lines[-1]
        assert "taking a little longer" in released.text, call.lines
        t_release = call.now()
        reply = await call.say("what's the weather like")  # the caller talks meanwhile; the job goes on
        assert "weather" in reply.expect.next_event().is_message(role="assistant").event().item.text_content
        for _ in range(100):
            if any(line.text.startswith("About your earlier question") for line in call.lines):
                break
            await asyncio.sleep(0.1)
        late = [line for line in call.lines if line.text.startswith("About your earlier question")]
        assert late and "done after 4s" in late[0].text, call.lines
        assert late[0].at > t_release
        job = call.toolbox.jobs[-1]
        assert job.state == "completed"
    finally:
        await close(call)


async def test_late_failure_is_spoken_too(registry: Registry) -> None:
    cfg = stdio_demo()
    cfg.release_after_ms = 500
    d_cfg = cfg
    call = await call_with(registry, d_cfg)
    call.toolbox.dispatcher.background_s = 1.5  # the job itself gives up after 1.5 s
    try:
        await call.say("wait 10")
        for _ in range(60):
            if any(line.text.startswith("About your earlier question") for line in call.lines):
                break
            await asyncio.sleep(0.1)
        late = [line for line in call.lines if line.text.startswith("About your earlier question")]
        assert late and "did not answer in time" in late[0].text, call.lines
    finally:
        await close(call)


async def test_session_starts_from_the_cache_while_a_server_is_down(registry: Registry) -> None:
    cfg = await registry.add_server(stdio_demo())
    warm = Dispatcher(registry)
    await warm.start(wait=True)
    await warm.aclose()
    # The server's command is now broken: discovery fails, the cache still serves the tool list.
    await registry.add_server(ServerConfig(name="demo", transport="stdio", command="/nonexistent"), replace=True)
    d = Dispatcher(registry)
    t0 = time.monotonic()
    await d.start(wait=False)
    model = OfferingLLM(route)
    call = await TextCall(d, model, options=fast_policy()).start()
    try:
        assert time.monotonic() - t0 < 2
        result = await call.say("hello")
        assert {"echo", "slow"} <= model.offered[-1]
        assert result.expect.next_event().is_message(role="assistant")
        broken = await call.say("echo anyone there")
        out = next(e for e in broken.events if e.type == "function_call_output").item
        assert out.is_error and "not answering" in out.output
        assert cfg.id is not None
    finally:
        await close(call)


async def test_servers_added_and_disabled_in_postgres_reach_the_running_session(registry: Registry) -> None:
    model = OfferingLLM(route)
    call = await call_with(registry, stdio_demo(), model=model)
    watcher = RegistryWatcher(registry, call.toolbox.dispatcher).start()
    try:
        await asyncio.wait_for(watcher.listening.wait(), 10)
        await call.say("hello")
        assert "alpha__echo" not in model.offered[-1]
        t0 = time.monotonic()
        await registry.add_server(stdio_demo("alpha"))
        while "alpha__echo" not in {e.name for e in call.toolbox.dispatcher.tools}:
            assert time.monotonic() - t0 < 10
            await asyncio.sleep(0.05)
        result = await call.say("use alpha__echo from the new server")
        assert "alpha__echo" in model.offered[-2]
        result.expect.next_event().is_function_call(name="alpha__echo")
        await registry.set_enabled("alpha", False)
        t0 = time.monotonic()
        while "alpha" in call.toolbox.dispatcher.servers:
            assert time.monotonic() - t0 < 5
            await asyncio.sleep(0.05)
        await call.say("hello again")
        assert not any(name.startswith("alpha") for name in model.offered[-1])
    finally:
        await watcher.aclose()
        await close(call)


async def test_ending_the_session_cancels_waiting_jobs_on_the_server(registry: Registry) -> None:
    cfg = ServerConfig(
        name="tasks",
        transport="stdio",
        command=sys.executable,
        args=[str(SERVERS / "task_server_2026.py")],
        release_after_ms=500,
    )
    call = await call_with(registry, cfg, model=ScriptedLLM(lambda t: ("report", {"seconds": 60})))
    try:
        await call.say("build the report")
        job = call.toolbox.jobs[-1]
        assert job.kind == "task" and not job.done
    finally:
        await call.aclose()
    assert job.state == "cancelled"
    status = [e for e in job.events if e.kind == "status"]
    assert any(e.data.get("message") == "cancelled on the server" for e in status)
    await call.toolbox.dispatcher.aclose()


async def test_schema_mismatch_from_the_llm_is_a_clear_error_not_a_crash(registry: Registry) -> None:
    call = await call_with(registry, stdio_demo(), model=ScriptedLLM(lambda t: ("add", {"a": "x", "b": 1})))
    try:
        result = await call.say("add things")
        out = next(e for e in result.events if e.type == "function_call_output").item
        assert out.is_error and out.output.startswith("I could not send that request")
    finally:
        await close(call)


async def test_invalid_json_from_the_llm_is_an_error_and_the_session_goes_on(registry: Registry) -> None:
    model = ScriptedLLM(lambda t: ("add", "{not json") if t == "add" else ("echo", {"text": t}))
    call = await call_with(registry, stdio_demo(), model=model)
    try:
        result = await call.say("add")
        out = next(e for e in result.events if e.type == "function_call_output").item
        assert out.is_error
        again = await call.say("still here")
        assert "echo: still here" in next(e for e in again.events if e.type == "function_call_output").item.output
    finally:
        await close(call)


async def test_release_comes_at_the_idle_timeout_but_progress_keeps_a_call_held(registry: Registry) -> None:
    cfg = stdio_demo()
    cfg.release_after_ms = 60_000
    cfg.timeout_ms = 1000  # the call's idle timeout: release comes here when the server goes quiet
    call = await call_with(registry, cfg)
    try:
        await call.say("wait 3")  # one progress report at the start, then silence
        released = [line for line in call.lines if "caller's turn is freed" in line.text]
        assert released, call.lines
        await call.say("wait 2.5 in 10 steps")  # progress every 0.25 s: never idle, never released
        assert len([line for line in call.lines if "caller's turn is freed" in line.text]) == 1
        assert any("done after 2.5s" in line.text for line in call.spoken("agent"))
    finally:
        await close(call)


# -- the caller's language -------------------------------------------------------------------------------------


def test_filler_lines_per_language_cover_every_phase_and_fall_back_to_english() -> None:
    english = FillerPolicy.load()
    for language in ("es", "de", "fr", "de-AT"):
        policy = FillerPolicy.load(language=language)
        assert (policy.threshold_s, policy.interval_s) == (english.threshold_s, english.interval_s)
        for phase, lines in policy.default.lines.items():
            assert lines and set(lines).isdisjoint(english.default.lines[phase]), (language, phase)
        assert policy.default.late_prefix != english.default.late_prefix
    assert FillerPolicy.load(language="it").default == english.default  # no Italian file: English lines


async def test_a_german_session_hears_german_fillers_and_dates(registry: Registry) -> None:
    options = VoiceOptions.for_language("de")
    options.policy.threshold_s = 1.0
    call = await call_with(registry, stdio_demo(), options=options)
    try:
        await call.say("wait 2.5")
        fillers = call.spoken("filler")
        assert len(fillers) == 1 and fillers[0].text in FillerPolicy.load(language="de").default.lines["start"]
        await call.say("echo Termin am 2026-12-01")
        assert any("Dienstag, 1. Dezember 2026" in line.text for line in call.spoken("agent")), call.lines
    finally:
        await close(call)
