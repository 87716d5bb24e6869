"""A server's question during a call (elicitation), in the core and the CLI, against real servers.

tests/servers/ask_server.py (the `mcp` SDK's resolvers) asks in both dialects: a 2026-07-28 `input_required`
result resumed with the answers, and a 2025-11-25 `elicitation/create` request mid-call (`--legacy`). The
reference server (`@modelcontextprotocol/server-everything`, pinned) lists its elicitation tool only to a client
that declares the capability; its schema has every field kind the spec allows.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from conftest import ROOT, SERVERS, OfferingLLM

from mcp_integration.dispatcher import Dispatcher
from mcp_integration.elicitation import Answer, Question, check
from mcp_integration.errors import ToolCallError
from mcp_integration.livekit_text import TextCall
from mcp_integration.livekit_tools import ANSWER_TOOL, DECLINE_TOOL, VoiceOptions
from mcp_integration.registry import Registry, ServerConfig

ASK = str(SERVERS / "ask_server.py")
EVERYTHING = ROOT / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
NODE = ROOT / "node_modules" / ".bin" / "node"


@pytest.fixture(params=["2026-07-28", "2025-11-25"])
async def asking(
    request: pytest.FixtureRequest, spawn: Callable[..., int], registry: Registry
) -> AsyncIterator[Dispatcher]:
    """A dispatcher (recording jobs) on ask_server, in the dialect of the parameter."""
    legacy = ["--legacy"] if request.param == "2025-11-25" else []
    port = spawn("--transport", "streamable-http", "--port", "0", *legacy, script=ASK)
    cfg = await registry.add_server(
        ServerConfig(name="ask", transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp", timeout_ms=1500)
    )
    d = Dispatcher(registry)
    await d.start(servers=[cfg])
    assert d.servers["ask"].conn.client.protocol_version == request.param
    try:
        yield d
    finally:
        await d.aclose()


def answering(**values: Any) -> Callable[[Question], Any]:
    asked: list[Question] = []

    async def ask(question: Question) -> Answer:
        asked.append(question)
        return Answer("accept", values)

    ask.asked = asked  # type: ignore[attr-defined]
    return ask


async def test_the_caller_is_asked_and_the_tool_completes_with_the_answer(
    asking: Dispatcher, registry: Registry
) -> None:
    ask = answering(day="2026-12-01")
    job = asking.submit("book_table", {"people": 2}, asker=ask)
    result = await job.wait(30)
    assert result.text == "Booked a table for 2 on 2026-12-01 for dinner."  # "dinner": the schema's default
    (question,) = ask.asked  # type: ignore[attr-defined]
    assert question.message == "Which day would you like the table for 2?" and question.tool == "book_table"
    assert [(f.name, f.kind, f.required, f.format) for f in question.fields] == [
        ("day", "string", True, "date"),
        ("time", "choice", False, None),
    ]
    assert [e.kind for e in job.events if e.kind in ("asked", "answered")] == ["asked", "answered"]
    await job.settled()
    async with registry.pool.connection() as conn:
        row = await (await conn.execute("SELECT elicitations FROM mcp_jobs WHERE id = %s", (job.id,))).fetchone()
    assert row["elicitations"] == [
        {
            "message": "Which day would you like the table for 2?",
            "mode": "form",
            "action": "accept",
            "fields": ["day", "time"],
            "content": {"day": "2026-12-01", "time": "dinner"},
        }
    ]


async def test_a_secret_answer_is_sent_but_never_recorded(asking: Dispatcher, registry: Registry) -> None:
    job = asking.submit("pay", {"amount": 12.5}, asker=answering(confirm="yes", pin="4711"))
    assert (await job.wait(30)).text == "Paid 12.50 euros (PIN ending 1)."
    await job.settled()
    async with registry.pool.connection() as conn:
        row = await (
            await conn.execute("SELECT elicitations::text AS e FROM mcp_jobs WHERE id = %s", (job.id,))
        ).fetchone()
    assert "4711" not in row["e"] and '"pin": "***"' in row["e"] and '"confirm": true' in row["e"]


async def test_decline_and_nobody_to_ask(asking: Dispatcher) -> None:
    async def decline(question: Question) -> Answer:
        return Answer("decline")

    assert (await asking.call("book_table", {"people": 2}, asker=decline, timeout=30)).text == (
        "Not booked: the caller chose decline."
    )
    # A dispatcher with nobody to ask (a worker without a session) declines, and says why in the record.
    job = asking.submit("book_table", {"people": 3})
    assert (await job.wait(30)).text == "Not booked: the caller chose decline."
    assert job.elicitations[0]["why"] == "nobody here can answer a server's question"


async def test_a_caller_who_never_answers_is_cancelled_and_the_idle_timeout_waits_meanwhile(
    asking: Dispatcher,
) -> None:
    """The server's idle timeout is 1.5 s; the caller is given 4 s and says nothing. The call is not timed out
    while it waits for the caller: it ends with `cancel` sent to the server, and the server's answer."""

    async def silent(question: Question) -> Answer:
        await asyncio.sleep(3600)
        raise AssertionError("not reached")

    job = asking.submit("book_table", {"people": 2}, asker=silent)
    job.ask_timeout_s = 4.0
    result = await job.wait()  # the idle timeout (1.5 s), not a fixed one: paused while the caller is asked
    assert result.text == "Not booked: the caller chose cancel."
    assert job.elicitations[0]["action"] == "cancel" and "no answer within 4 s" in job.elicitations[0]["why"]


async def test_an_answer_that_does_not_fit_is_declined_with_the_reason(asking: Dispatcher) -> None:
    job = asking.submit("book_table", {"people": 2}, asker=answering(day="next tuesday", time="breakfast"))
    assert (await job.wait(30)).text == "Not booked: the caller chose decline."
    why = job.elicitations[0]["why"]
    assert "'next tuesday' is not a 'date'" in why and "'breakfast' is not one of ['lunch', 'dinner']" in why


def test_defaults_choices_and_plain_words_are_read_as_the_schema_says() -> None:
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 1, "default": 42},
            "ok": {"type": "boolean"},
            "hero": {
                "type": "string",
                "oneOf": [{"const": "h1", "title": "Superman"}, {"const": "h2", "title": "Batman"}],
            },
            "fish": {
                "type": "array",
                "items": {"anyOf": [{"const": "f1", "title": "Tuna"}, {"const": "f2", "title": "Trout"}]},
            },
            "legacy": {"type": "string", "enum": ["a", "b"], "enumNames": ["Apple", "Banana"]},
        },
        "required": ["ok"],
    }

    q = Question.from_request("s", "t", SimpleNamespace(mode="form", message="?", requested_schema=schema))
    assert [f.kind for f in q.fields] == ["integer", "boolean", "choice", "choices", "choice"]
    assert q.fields[4].labels == ("Apple", "Banana")
    content, problems = check(q, {"ok": "yes", "hero": "batman", "fish": "Tuna, f2", "legacy": "Banana"})
    assert problems == [] and content == {"n": 42, "ok": True, "hero": "h2", "fish": ["f1", "f2"], "legacy": "b"}
    _, problems = check(q, {"n": "0", "other": 1})
    assert problems == ["'other' was not asked for", "'ok' is required", "n: 0 is less than the minimum of 1"]

    nested = {"type": "object", "properties": {"address": {"type": "object"}}}
    with pytest.raises(ValueError, match="cannot be asked"):
        Question.from_request("s", "t", SimpleNamespace(mode="form", message="?", requested_schema=nested))


# -- the CLI ---------------------------------------------------------------------------------------------------


def cli(env: dict[str, str], *argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcp_integration", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )


@pytest.fixture
def cli_env(pg_url: str) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": pg_url}


def test_cli_input_answers_with_defaults_for_the_rest_and_declines_without_anyone(
    cli_env: dict[str, str], spawn: Callable[..., int]
) -> None:
    port = spawn("--transport", "streamable-http", "--port", "0", script=ASK)
    assert cli(cli_env, "servers", "add", "ask", "--url", f"http://127.0.0.1:{port}/mcp").returncode == 0
    done = cli(
        cli_env, "call", "book_table", "--server", "ask", "--args", '{"people": 4}', "--input", '{"day": "2026-12-24"}'
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Booked a table for 4 on 2026-12-24 for dinner."
    assert "… the server asks: Which day would you like the table for 4?" in done.stderr
    assert "… answered: accept" in done.stderr
    # No --input and no terminal (stdin is not a tty here): declined, and said so.
    nobody = cli(cli_env, "call", "book_table", "--server", "ask", "--args", '{"people": 4}', stdin=subprocess.DEVNULL)
    assert nobody.returncode == 0 and nobody.stdout.strip() == "Not booked: the caller chose decline."
    assert "answered: decline (nobody here can answer a server's question)" in nobody.stderr
    bad = cli(cli_env, "call", "book_table", "--server", "ask", "--args", '{"people": 4}', "--input", "[1]")
    assert bad.returncode == 1 and "--input must be a JSON object" in bad.stderr


def test_cli_asks_on_a_terminal_with_defaults_shown(cli_env: dict[str, str], spawn: Callable[..., int]) -> None:
    port = spawn("--transport", "streamable-http", "--port", "0", "--legacy", script=ASK)
    assert cli(cli_env, "servers", "add", "ask", "--url", f"http://127.0.0.1:{port}/mcp").returncode == 0
    master, slave = os.openpty()
    try:
        # What a person types: a day that does not fit, Enter for the default; then a fitting day, "lunch"; "y".
        os.write(master, b"31/12\n\n2026-12-31\nlunch\ny\n")
        done = cli(cli_env, "call", "book_table", "--server", "ask", "--args", '{"people": 2}', stdin=slave)
    finally:
        os.close(master)
        os.close(slave)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Booked a table for 2 on 2026-12-31 for lunch."
    assert "ask asks: Which day would you like the table for 2?" in done.stderr
    assert "  Day — The day, as YYYY-MM-DD (YYYY-MM-DD): " in done.stderr.replace("day — ", "Day — ")
    assert "(lunch / dinner) [dinner]: " in done.stderr
    assert "That does not fit: day: '31/12' is not a 'date'" in done.stderr


def test_the_reference_server_lists_its_elicitation_tool_and_gets_every_field_kind_answered(
    cli_env: dict[str, str], pg_url: str
) -> None:
    assert cli(cli_env, "servers", "add", "everything", "--", str(NODE), str(EVERYTHING), "stdio").returncode == 0
    listed = cli(cli_env, "tools", "--server", "everything", "--json")
    names = {t["tool"] for t in json.loads(listed.stdout)}
    assert "trigger-elicitation-request" in names  # listed only to a client that declares elicitation
    answers = {
        "name": "Ada Lovelace",
        "check": "yes",
        "email": "ada@example.com",
        "homepage": "https://ada.example.com",
        "birthdate": "1815-12-10",
        "titledSingleSelectEnum": "Wonder Woman",
    }
    done = cli(cli_env, "call", "trigger-elicitation-request", "--server", "everything", "--input", json.dumps(answers))
    assert done.returncode == 0, done.stderr
    assert "Ada Lovelace" in done.stdout and "hero-3" in done.stdout and "1815-12-10" in done.stdout
    assert '"integer": 42' in done.stdout or "42" in done.stdout  # the schema's default, filled in by us
    with psycopg.connect(pg_url) as conn:
        (record,) = conn.execute(
            "SELECT elicitations FROM mcp_jobs WHERE tool = 'trigger-elicitation-request'"
        ).fetchone()
    assert record[0]["action"] == "accept" and record[0]["content"]["titledSingleSelectEnum"] == "hero-3"
    declined = cli(
        cli_env, "call", "trigger-elicitation-request", "--server", "everything", "--input", '{"integer": 500}'
    )
    assert declined.returncode == 0 and "decline" in declined.stdout.lower()
    assert "500 is greater than the maximum of 100" in declined.stderr


def test_url_mode_is_declined_from_input_and_the_caller_is_told(
    cli_env: dict[str, str], spawn: Callable[..., int]
) -> None:
    port = spawn("--transport", "streamable-http", "--port", "0", "--legacy", script=ASK)
    assert cli(cli_env, "servers", "add", "ask", "--url", f"http://127.0.0.1:{port}/mcp").returncode == 0
    done = cli(cli_env, "call", "open_account", "--server", "ask", "--input", "{}")
    assert done.returncode == 0 and done.stdout.strip() == "Sign-up: decline."
    assert "a browser step cannot be done from --input" in done.stderr


async def test_an_asker_that_fails_cancels_and_the_call_goes_on(asking: Dispatcher) -> None:
    async def broken(question: Question) -> Answer:
        raise RuntimeError("the session went away")

    result = await asking.call("book_table", {"people": 2}, asker=broken, timeout=30)
    assert result.text == "Not booked: the caller chose cancel."


async def test_questions_outside_a_call_are_declined(asking: Dispatcher) -> None:
    params = SimpleNamespace(mode="form", message="Out of the blue?", requested_schema={"type": "object"}, meta=None)
    answer = await asking._question("ask", params, None)
    assert answer.action == "decline" and answer.why == "asked outside any call"
    with pytest.raises(ToolCallError):
        await asking.call("no_such_tool", {})


# -- by voice: a text AgentSession with the scripted LLM ---------------------------------------------------------


def voice_route(text: str) -> tuple[str, dict[str, Any]] | None:
    said = text.lower()
    if m := re.match(r"book a table for (\d+)", said):
        return ("book_table", {"people": int(m[1])})
    if said.startswith("open an account"):
        return ("open_account", {})
    if "first of december" in said:
        return (ANSWER_TOOL, {"day": "2026-12-01", "time": "breakfast" if "breakfast" in said else "lunch"})
    if "rather not" in said:
        return (DECLINE_TOOL, {})
    if "forget the whole thing" in said:
        return (DECLINE_TOOL, {"stop": True})
    if said.startswith("fill in the form"):
        return ("trigger-elicitation-request", {})
    if said.startswith("i am ada"):
        return (ANSWER_TOOL, {"name": "Ada Lovelace", "check": "yes", "titledSingleSelectEnum": "Wonder Woman"})
    return None


async def voice_call(d: Dispatcher, **options: Any) -> tuple[TextCall, OfferingLLM]:
    model = OfferingLLM(voice_route)
    return await TextCall(d, model, options=VoiceOptions(**options)).start(greeting=None), model


async def heard(call: TextCall, text: str, timeout: float = 30) -> str:
    """The first agent line containing `text` (a late answer arrives on its own), waited for."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        for line in call.spoken("agent"):
            if text in line.text:
                return line.text
        await asyncio.sleep(0.05)
    raise AssertionError(f"never heard {text!r}: {call.lines}")


async def test_by_voice_the_caller_is_asked_answers_and_hears_the_result(asking: Dispatcher) -> None:
    call, model = await voice_call(asking)
    try:
        await call.say("Book a table for 2")
        await heard(call, "Which day would you like the table for 2?")
        assert any(ANSWER_TOOL in offered for offered in model.offered[-1:]), model.offered
        await call.say("The first of December, for lunch")
        await heard(call, "Thank you, I have passed that on.")
        await heard(call, "Booked a table for 2 on Tuesday 1 December 2026 for lunch.")  # dates for the ear
        assert ANSWER_TOOL not in model.offered[-1]  # the question's tools leave with it
        assert call.spoken("filler") == []  # no filler while the caller was being asked
        (job,) = call.toolbox.jobs
        assert job.elicitations[0]["action"] == "accept"
    finally:
        await call.aclose()


async def converse(d: Dispatcher, *steps: tuple[str | None, str], **options: Any) -> TextCall:
    """Each step: what the caller says (None: nothing), then a line the agent must say. Returns the call, closed."""
    call, _ = await voice_call(d, **options)
    try:
        for said, expected in steps:
            if said is not None:
                await call.say(said)
            await heard(call, expected)
    finally:
        await call.aclose()
    return call


async def test_by_voice_an_answer_that_does_not_fit_is_asked_again_once(asking: Dispatcher) -> None:
    await converse(
        asking,
        ("Book a table for 4", "Which day would you like the table for 4?"),
        ("The first of December, for breakfast", "'breakfast' is not one of ['lunch', 'dinner']"),  # ask again
        ("The first of December, for lunch then", "Booked a table for 4 on Tuesday 1 December 2026 for lunch."),
    )


async def test_by_voice_decline_and_silence(asking: Dispatcher) -> None:
    call = await converse(
        asking,
        ("Book a table for 2", "Which day would you like the table for 2?"),
        ("I'd rather not say", "Not booked: the caller chose decline."),
        # Asked again, the caller says nothing: cancelled after the bound, and the call still ends honestly.
        ("Book a table for 3", "Which day would you like the table for 3?"),
        (None, "Not booked: the caller chose cancel."),
        ask_timeout_s=2.0,
    )
    assert [j.elicitations[0]["action"] for j in call.toolbox.jobs] == ["decline", "cancel"]


async def test_by_voice_a_browser_step_is_declined_with_what_the_caller_can_do(
    spawn: Callable[..., int], registry: Registry
) -> None:
    port = spawn("--transport", "streamable-http", "--port", "0", "--legacy", script=ASK)
    cfg = await registry.add_server(
        ServerConfig(name="ask", transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp")
    )
    d = Dispatcher(registry)
    await d.start(servers=[cfg])
    call, _ = await voice_call(d)
    try:
        await call.say("Open an account")
        said = await heard(call, "web browser")
        assert "example.com" in said or "example.com" in str(call.lines)
        await heard(call, "Sign-up: decline.")
    finally:
        await call.aclose()
        await d.aclose()


async def test_by_voice_the_caller_can_stop_the_whole_request(asking: Dispatcher) -> None:
    await converse(
        asking,
        ("Book a table for 5", "Which day would you like the table for 5?"),
        ("Forget the whole thing", "Not booked: the caller chose cancel."),
    )


async def test_by_voice_the_reference_servers_form_is_filled_from_what_the_caller_says(registry: Registry) -> None:
    """server-everything's elicitation tool (every field kind, defaults for most) over stdio, in a text session:
    the caller is asked its question, answers, and the server reports the fields it received."""
    cfg = await registry.add_server(
        ServerConfig(name="everything", transport="stdio", command=str(NODE), args=[str(EVERYTHING), "stdio"])
    )
    d = Dispatcher(registry)
    await d.start(servers=[cfg])
    call, _ = await voice_call(d)
    try:
        await call.say("Fill in the form for me")
        await heard(call, "Please provide inputs for the following fields:")
        await call.say("I am Ada Lovelace, yes I agree, and Wonder Woman")
        said = await heard(call, "Ada Lovelace", timeout=30)
        await heard(call, "hero-3")  # the title the caller said, sent as the choice's value
        (job,) = call.toolbox.jobs
        record = job.elicitations[0]
        assert record["action"] == "accept" and record["content"]["integer"] == 42  # a default, filled in by us
        assert "User provided the requested information" in said or "User inputs" in said
    finally:
        await call.aclose()
        await d.aclose()
