"""Bad input never crashes a session: the worst cases at each boundary, then hypothesis at each of them.

Boundaries: what a server sends on the stream (stdio lines, WebSocket frames), its tool lists, its answers
(enormous, binary, not text, not a tool result at all), the arguments we are asked to send, and the text
spoken from an answer. A real hand-rolled server (tests/servers/hostile_server.py) sends what each test asks;
one process serves all the examples of a property, so the whole file stays fast.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from conftest import SERVERS
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mcp_integration.dispatcher import Dispatcher, ToolEntry
from mcp_integration.errors import ToolCallError
from mcp_integration.limits import (
    MAX_ARGUMENT_BYTES,
    MAX_DEPTH,
    MAX_RESULT_CHARS,
    _Bounder,
    _fits_as_is,
    _storable_as_is,
    bounded,
    deeper_than,
    json_too_deep,
    storable,
    texts_fit,
)
from mcp_integration.livekit_text import ScriptedLLM, TextCall
from mcp_integration.registry import Registry, ServerConfig, ToolSpec
from mcp_integration.results import ToolResult
from mcp_integration.speech import for_speech
from mcp_integration.tool_guard import _model_problem, _plain_text_result, check_tool

HOSTILE = str(SERVERS / "hostile_server.py")
SHARED = settings(
    deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def deep_json(depth: int, leaf: str = "1") -> str:
    """JSON nested `depth` levels, built as text: json.dumps itself cannot write 10 000 levels."""
    return '{"a":' * depth + leaf + "}" * depth


def deep_schema(levels: int) -> str:
    """An object schema whose property is an object schema, `levels` times (2 JSON levels each)."""
    return '{"type":"object","properties":{"a":' * levels + '{"type":"object"}' + "}}" * levels


def deep_value(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"a": value}
    return value


def stdio_cfg(name: str = "hostile") -> ServerConfig:
    return ServerConfig(name=name, transport="stdio", command=sys.executable, args=[HOSTILE], timeout_ms=10_000)


@pytest.fixture
async def hostile(registry: Registry) -> AsyncIterator[Dispatcher]:
    """A dispatcher with the hostile server over stdio, recording jobs in Postgres."""
    await registry.add_server(stdio_cfg())
    d = Dispatcher(registry, connect_timeout=15)
    await d.start()
    assert d.servers["hostile"].error is None
    try:
        yield d
    finally:
        await d.aclose()


@pytest.fixture(scope="module")
def ws_port() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, HOSTILE, "--transport", "websocket"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("LISTENING "), line
        yield int(line.split()[1])
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
async def hostile_ws(ws_port: int) -> AsyncIterator[Dispatcher]:
    d = Dispatcher(None, connect_timeout=15)
    await d.start(servers=[ServerConfig(name="hostile", transport="websocket", url=f"ws://127.0.0.1:{ws_port}/")])
    assert d.servers["hostile"].error is None
    try:
        yield d
    finally:
        await d.aclose()


async def calls_seen(d: Dispatcher) -> int:
    """How many tools/call this connection's server process has received (it restarts from 0 on a reconnect)."""
    return int(json.loads((await d.call("stats", {}, timeout=10)).text)["calls"])


async def recorded(registry: Registry, d: Dispatcher, job_id: Any) -> dict[str, Any]:
    job = d.job(job_id)
    assert job is not None
    await job.settled()
    row = await registry.get_job(job.id)
    assert row is not None
    return row


# -- the stream: bytes that are not what they should be ---------------------------------------------------------


async def test_invalid_utf8_from_a_stdio_server_is_replaced_not_fatal(hostile: Dispatcher, registry: Registry) -> None:
    """Strict decoding used to end the connection at the first bad byte, and every later call hung."""
    inside = b'{"jsonrpc":"2.0","id":{id},"result":{"content":[{"type":"text","text":"caf\xe9 \xff\xfe ok"}]}}'
    result = await hostile.call("raw_reply", {"b64": b64(inside)}, timeout=10)
    assert result.text == "caf\ufffd \ufffd\ufffd ok"
    whole_line = b"\xff\xfe\xfd not even json \x80\n\xc3\x28"
    assert (await hostile.call("emit", {"frames": [b64(whole_line)], "text": "after"}, timeout=10)).text == "after"
    assert (await hostile.call("echo", {"text": "still here"}, timeout=10)).text == "echo: still here"
    assert await calls_seen(hostile) == 4  # one process throughout: nothing reconnected


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b'{"jsonrpc":"2.0","id":{id},"result":5}', "could not be read"),
        (
            b'{"jsonrpc":"2.0","id":{id},"result":{"content":[], "structuredContent":'
            + deep_json(5000).encode()
            + b"}}",
            "could not be read",
        ),
        (b'{"jsonrpc":"2.0","id":{id},"result":{"content":"not a list"}}', "not a valid tool result (content"),
        (b'{"jsonrpc":"2.0","id":{id},"result":{"content":[{"type":"hologram"}]}}', "not a valid tool result"),
        (b'{"jsonrpc":"2.0","id":{id},"error":{"code":-1,"message":"bad\\u0000news ' + b"x" * 50_000 + b'"}}', "bad"),
    ],
    ids=["result-not-an-object", "nested-5000-deep", "content-not-a-list", "unknown-content-type", "nul-in-error"],
)
async def test_an_unreadable_answer_fails_its_call_at_once(
    hostile: Dispatcher, registry: Registry, answer: bytes, reason: str
) -> None:
    """Not a hang until the idle timeout, not 'internal error': a clear error, recorded, and the session goes on."""
    job = hostile.submit("raw_reply", {"b64": b64(answer)})
    with pytest.raises(ToolCallError) as info:
        await job.wait(5)  # the server's idle timeout is 10 s: failing within 5 s means it did not wait for it
    assert info.value.kind in ("server_error", "tool_error") and reason in info.value.reason
    assert "internal error" not in info.value.reason and len(info.value.reason) < 3000
    row = await recorded(registry, hostile, job.id)
    assert row["state"] == "failed" and reason in row["error"]
    assert (await hostile.call("echo", {"text": "next"}, timeout=10)).text == "echo: next"


text_items = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image", "hologram"]), "text": st.text(max_size=10) | st.integers()},
    optional={"annotations": st.none() | st.just({"audience": ["user"]}), "_meta": st.just({})},
)
tool_results = st.fixed_dictionaries(
    {"content": st.lists(text_items, max_size=3) | st.just("not a list") | st.none()},
    optional={
        "structuredContent": st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3)
        | st.lists(st.integers(), max_size=2)
        | st.text(max_size=5)
        | st.none(),
        "isError": st.booleans() | st.sampled_from(["yes", 1, None]),
        "_meta": st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=2)
        | st.just({"io.modelcontextprotocol/serverInfo": {"name": "s"}})
        | st.just(["k"])
        | st.none(),
        "resultType": st.sampled_from(["complete", "task", "input_required", "Complete"]) | st.integers() | st.none(),
    },
)


@settings(max_examples=400, deadline=None, database=None)
@given(result=tool_results)
@example(result={"content": [{"type": "text", "text": "ok"}], "structuredContent": {"result": "ok"}, "isError": False})
@example(result={"content": [{"type": "text", "text": 5}]})
@example(result={"content": [], "isError": "yes"})
@example(result={"content": [], "resultType": "task"})
@example(result={"content": [], "_meta": None})
def test_a_tool_result_let_through_unchecked_is_one_the_full_check_accepts(result: dict[str, Any]) -> None:
    """The guard skips pydantic for bare text results (nearly every answer): only those some protocol version's
    model accepts, as the full check would; and every such common answer is skipped."""
    if _plain_text_result(result):
        assert _model_problem(result) is None, result
    common = {"content": [{"type": "text", "text": "ok"}], "structuredContent": {"result": "ok"}, "isError": False}
    # ...as a 2026-07-28 server sends it: every answer says its type and who answered.
    modern = {**common, "resultType": "complete", "_meta": {"io.modelcontextprotocol/serverInfo": {"name": "s"}}}
    assert _plain_text_result(common) and _plain_text_result(modern) and _plain_text_result({"content": []})


async def test_a_websocket_server_breaking_the_protocol_costs_one_call_not_the_session(hostile_ws: Dispatcher) -> None:
    # Invalid UTF-8 in a binary frame is decoded leniently, like stdio.
    inside = b'{"jsonrpc":"2.0","id":{id},"result":{"content":[{"type":"text","text":"bin \xff"}]}}'
    assert (await hostile_ws.call("raw_reply", {"b64": b64(inside)}, timeout=10)).text == "bin \ufffd"
    # In a text frame it is a protocol violation: the socket closes (1007), that call fails, the next reconnects.
    with pytest.raises(ToolCallError) as info:
        await hostile_ws.call("emit", {"frames": [b64(b"\xff\xfe")], "as_text": True}, timeout=10)
    assert info.value.kind in ("unreachable", "server_error")
    assert (await hostile_ws.call("echo", {"text": "again"}, timeout=10)).text == "echo: again"
    # A frame over the 16 MiB limit closes the socket too (1009): again one call, not the session.
    with pytest.raises(ToolCallError):
        await hostile_ws.call("big", {"chars": 20_000_000}, timeout=20)
    assert (await hostile_ws.call("echo", {"text": "and again"}, timeout=10)).text == "echo: and again"


# Frames a server may send besides its answers. Ids of responses stay far from the client's own (small, counting
# up), so no example answers a real request by accident.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
foreign_ids = st.integers(10**6, 10**12) | st.text(max_size=6).map(lambda t: f"x{t}")
rpc_shaped = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "1.0", 2])},
    optional={
        "id": foreign_ids | st.none() | st.floats() | st.lists(st.integers(), max_size=2),
        "method": st.sampled_from(
            [
                "ping",
                "roots/list",
                "sampling/createMessage",
                "notifications/progress",
                "notifications/message",
                "notifications/tasks/status",
                "tools/call",
                "",
            ]
        )
        | st.text(max_size=10),
        "params": json_values,
        "result": json_values,
        "error": json_values,
    },
)
frames = st.one_of(
    st.binary(max_size=120),
    st.text(max_size=120).map(lambda t: t.encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: json.dumps(v).encode()),
    rpc_shaped.map(lambda m: json.dumps(m).encode()),
    st.integers(1, 3000).map(lambda n: ("[" * n + "]" * n).encode()),
    st.sampled_from(
        [
            b"",
            b"\x00" * 5,
            b"\xef\xbb\xbf{}",
            b'{"jsonrpc":"2.0","id":424242,"result":{}}',
            b'{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"nope","progress":"x"}}',
            b'{"jsonrpc":"2.0","id":77777777,"method":"sampling/createMessage","params":{"messages":[]}}',
            b'{"jsonrpc":"2.0","id":1e400,"result":{}}',
            b"x" * 300_000,
        ]
    ),
)


@settings(SHARED, max_examples=40)
@given(garbage=st.lists(frames, min_size=1, max_size=4))
async def test_garbage_lines_on_stdio_never_break_the_connection(hostile: Dispatcher, garbage: list[bytes]) -> None:
    before = await calls_seen(hostile)
    result = await hostile.call("emit", {"frames": [b64(f) for f in garbage], "text": "answer"}, timeout=10)
    assert result.text == "answer"
    assert await calls_seen(hostile) == before + 2  # the same process: the connection was never replaced


@settings(SHARED, max_examples=40)
@given(garbage=st.lists(frames, min_size=1, max_size=4))
async def test_garbage_frames_on_a_websocket_never_break_the_connection(
    hostile_ws: Dispatcher, garbage: list[bytes]
) -> None:
    before = await calls_seen(hostile_ws)
    result = await hostile_ws.call("emit", {"frames": [b64(f) for f in garbage], "text": "answer"}, timeout=10)
    assert result.text == "answer"
    assert await calls_seen(hostile_ws) == before + 2


# Answers framed right (so their id is known) but with anything inside, corrupted bytes included.
def corrupt(body: bytes, cut: int, junk: bytes) -> bytes:
    return body[: cut % (len(body) + 1)] + junk + body[cut % (len(body) + 1) :]


answers = st.one_of(
    json_values.map(lambda v: {"content": [{"type": "text", "text": "ok"}], "structuredContent": v}),
    json_values.map(lambda v: {"content": v}),
    json_values,
    st.fixed_dictionaries({"content": st.lists(json_values.filter(lambda v: isinstance(v, dict)), max_size=3)}),
).map(lambda r: json.dumps(r).encode())
raw_answers = st.one_of(
    answers.map(lambda r: b'{"jsonrpc":"2.0","id":{id},"result":' + r + b"}"),
    st.tuples(answers, st.integers(0, 400), st.binary(min_size=1, max_size=8)).map(
        lambda t: b'{"jsonrpc":"2.0","id":{id},"result":' + corrupt(t[0], t[1], t[2]) + b"}"
    ),
    st.tuples(st.integers(), st.text(max_size=40), json_values).map(
        lambda t: (
            b'{"jsonrpc":"2.0","id":{id},"error":'
            + json.dumps({"code": t[0], "message": t[1], "data": t[2]}).encode()
            + b"}"
        )
    ),
)


@settings(SHARED, max_examples=50)
@given(answer=raw_answers)
async def test_any_answer_ends_its_call_promptly_with_a_result_or_a_clear_error(
    hostile: Dispatcher, registry: Registry, answer: bytes
) -> None:
    job = hostile.submit("raw_reply", {"b64": b64(answer)})
    try:
        result = await job.wait(8)
    except ToolCallError as exc:
        assert exc.kind in ("server_error", "tool_error"), exc
        assert "internal error" not in exc.reason and exc.reason.strip()
    else:
        assert len(result.text) <= MAX_RESULT_CHARS
    row = await recorded(registry, hostile, job.id)
    assert row["state"] in ("completed", "failed"), row  # the record is final: nothing failed to store


# -- tool lists ------------------------------------------------------------------------------------------------

schemas = st.one_of(
    json_values,
    st.fixed_dictionaries({"type": st.just("object")}, optional={"properties": json_values, "required": json_values}),
    st.integers(1, 150).map(lambda n: json.loads(deep_schema(n))),
    st.integers(1, 300).map(
        lambda n: {"type": "object", "properties": {"a": json.loads('{"items":' * n + "{}" + "}" * n)}}
    ),
)
tools = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=20) | json_values,
        "description": st.text(max_size=30) | json_values,
        "inputSchema": schemas,
        "annotations": json_values,
    },
)


@settings(max_examples=300, deadline=None, database=None)
@given(raw=tools)
def test_check_tool_judges_any_tool_without_raising(raw: dict[str, Any]) -> None:
    tool, why = check_tool(raw)
    assert (tool is None) != (why is None)
    if why is not None:
        assert "\n" not in why and len(why) < 1000
    else:
        assert tool is not None and tool.input_schema.get("type") == "object"
        assert not deeper_than(tool.input_schema)


@settings(SHARED, max_examples=15)
@given(extra=st.lists(tools, max_size=4))
@example(extra=[{"name": "too_deep", "inputSchema": json.loads(deep_schema(40))}])
async def test_a_tool_list_with_bad_tools_keeps_the_good_ones(hostile: Dispatcher, extra: list[dict[str, Any]]) -> None:
    good = {"name": "good_tool", "description": "fine", "inputSchema": {"type": "object"}}
    listing = json.dumps({"tools": [good, *extra]}).encode()
    assert (await hostile.call("set_tools", {"b64": b64(listing)}, timeout=10)).text == "tools set"
    listed = await hostile.servers["hostile"].conn.list_tools()
    expected = {r["name"] for r in [good, *extra] if check_tool(r)[0] is not None}
    assert {t.name for t in listed} == expected and "good_tool" in expected


@settings(SHARED, max_examples=15)
@given(extra=st.lists(tools, max_size=4))
@example(
    extra=[
        {"name": "nul", "description": "a\x00b", "inputSchema": {"type": "object", "properties": {"z": {}, "a": {}}}}
    ]
)
async def test_a_listing_checked_against_the_stored_one_is_what_a_fresh_listing_is(
    hostile: Dispatcher, extra: list[dict[str, Any]]
) -> None:
    """`known` (the tool cache) spares unchanged tools their `storable` pass: the result must not differ from a
    listing made without it, even when the stored copy has PostgreSQL's key order (jsonb sorts keys) or is stale."""
    listing = json.dumps({"tools": [{"name": "good_tool", "inputSchema": {"type": "object"}}, *extra]}).encode()
    assert (await hostile.call("set_tools", {"b64": b64(listing)}, timeout=10)).text == "tools set"
    conn = hostile.servers["hostile"].conn
    fresh = await conn.list_tools()
    as_jsonb = [ToolSpec(t.server, t.name, t.description, _key_sorted(t.input_schema), t.meta) for t in fresh]
    stale = [ToolSpec(t.server, t.name, t.description + "!", t.input_schema, t.meta) for t in fresh]
    for known in (fresh, as_jsonb, stale):
        again = await conn.list_tools(known=known)
        assert again == fresh
        # The server's key order, not the stored copy's: it is the order the LLM is shown.
        assert [json.dumps(t.input_schema) for t in again] == [json.dumps(t.input_schema) for t in fresh]
    assert all("\x00" not in t.description for t in fresh)


def _key_sorted(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))


async def test_a_listing_too_deep_for_the_parser_still_keeps_the_good_tools(hostile: Dispatcher) -> None:
    """Nested past pydantic's limit (200), the listing is read with Python's parser and the deep tool dropped."""
    deep = '{"name":"deep","inputSchema":' + deep_schema(150) + "}"
    listing = '{"tools":[{"name":"good_tool","inputSchema":{"type":"object"}},' + deep + "]}"
    await hostile.call("set_tools", {"b64": b64(listing.encode())}, timeout=10)
    assert [t.name for t in await hostile.servers["hostile"].conn.list_tools()] == ["good_tool"]
    assert any("'deep'" in why and "nests deeper" in why for why in hostile.servers["hostile"].conn.skipped_tools)


# -- enormous, binary and non-text answers ----------------------------------------------------------------------


async def test_enormous_answers_are_cut_for_the_llm_and_the_record(hostile: Dispatcher, registry: Registry) -> None:
    job = hostile.submit("big", {"chars": 3_000_000})
    result = await job.wait(20)
    assert MAX_RESULT_CHARS - 100 <= len(result.text) <= MAX_RESULT_CHARS and "(cut: " in result.text[-60:]
    row = await recorded(registry, hostile, job.id)
    assert row["state"] == "completed" and row["result"]["text"] == result.text
    spoken = for_speech(result)
    assert len(spoken.text) <= 600 and spoken.rest is not None and len(spoken.rest) <= MAX_RESULT_CHARS

    job = hostile.submit("big", {"chars": 3_000_000, "kind": "structured"})
    result = await job.wait(20)
    assert len(json.dumps(result.structured, ensure_ascii=False)) <= MAX_RESULT_CHARS
    assert "rows" in result.structured  # cut from the end: the keys and first rows are kept
    assert "(cut: " in result.structured["rows"][-1]  # a list cut says how many items it left out
    assert (await recorded(registry, hostile, job.id))["state"] == "completed"


@pytest.mark.parametrize(
    ("content", "placeholder"),
    [
        (
            [{"type": "image", "data": b64(b"\x89PNG" + bytes(300_000)), "mimeType": "image/png"}],
            "[image content, image/png]",
        ),
        ([{"type": "audio", "data": b64(bytes(300_000)), "mimeType": "audio/wav"}], "[audio content, audio/wav]"),
        (
            [
                {
                    "type": "resource",
                    "resource": {"uri": "file:///r.bin", "blob": b64(bytes(300_000)), "mimeType": "x/y"},
                }
            ],
            "[binary resource file:///r.bin]",
        ),
        (
            [{"type": "resource_link", "name": "report", "uri": "https://example.com/r.pdf"}],
            "[resource report: https://example.com/r.pdf]",
        ),
        ([], ""),
        (
            [{"type": "text", "text": "nul\u0000 and \u001b[31mcolour\u001b[0m"}],
            "nul\ufffd and \u001b[31mcolour\u001b[0m",
        ),
    ],
    ids=["image", "audio", "blob", "link", "empty", "control-characters"],
)
async def test_answers_that_are_not_text_become_placeholders_never_base64(
    hostile: Dispatcher, registry: Registry, content: list[dict[str, Any]], placeholder: str
) -> None:
    job = hostile.submit("reply", {"result": {"content": content}})
    result = await job.wait(10)
    assert result.text == placeholder
    row = await recorded(registry, hostile, job.id)
    assert row["state"] == "completed" and row["result"]["text"] == placeholder
    everything = json.dumps([result.text, result.structured, result.content, row["result"]])
    assert "AAAAAAAAAAAAAAAA" not in everything  # no base64 wall, in memory or in mcp_jobs
    spoken = for_speech(result, server_label="the archive")
    assert spoken.text and "AAAA" not in spoken.text and "\u001b" not in spoken.text


def json_results(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | text | st.binary(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=6)
            | st.dictionaries(text | st.integers(), inner, max_size=6)
            | st.tuples(inner, inner)
        ),
        max_leaves=60,
    )


NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")  # an escape preceded by an even number of backslashes
# Without control characters, whose JSON escapes (\u0001) would make the size check measure escapes, not text.
printable = st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=50)


@settings(max_examples=200, deadline=None, database=None)
@given(text=printable, structured=json_results(printable), depth=st.integers(0, 120), size=st.integers(0, 150_000))
@example(text="nul\x00", structured={"k\x00": ["v\x00", float("nan"), 10**5000, b"\xff"]}, depth=0, size=0)
def test_any_result_is_bounded_storable_and_stable(text: str, structured: Any, depth: int, size: int) -> None:
    value = {"rows": [structured, "x" * size], "deep": deep_value(depth)}
    result = ToolResult(text=(text or "t") * (size // max(len(text), 1) + 1), structured=value)
    assert len(result.text) <= MAX_RESULT_CHARS and "\x00" not in result.text
    # Plain JSON (no NaN, no bytes, string keys, no NUL), within the budget, as mcp_jobs stores it.
    encoded = json.dumps(result.as_record(), allow_nan=False, ensure_ascii=False)
    # A NUL escaped, not a backslash of the text followed by "u0000" (plain text, which JSON writes as \\u0000).
    assert NUL_ESCAPE.search(encoded) is None and "\x00" not in encoded
    assert len(json.dumps(result.structured, ensure_ascii=False)) <= MAX_RESULT_CHARS
    assert not deeper_than(result.structured, MAX_DEPTH)
    assert ToolResult(text=result.text, structured=result.structured) == result  # bounding is stable
    assert bounded(result.structured)[0] == result.structured


@settings(max_examples=300, deadline=None, database=None)
@given(
    rows=st.lists(
        st.dictionaries(st.text(max_size=8) | st.integers(), json_values, max_size=5) | json_values, max_size=5
    )
    | st.dictionaries(st.text(max_size=8), json_values, max_size=8),
    budget=st.integers(0, 400) | st.just(MAX_RESULT_CHARS),
)
@example(rows={"k": "a" * 60}, budget=62)
@example(rows=[{"x": 2**64}], budget=MAX_RESULT_CHARS)
@example(rows={"s": "\ud800"}, budget=MAX_RESULT_CHARS)
@example(rows={"x": float("nan")}, budget=MAX_RESULT_CHARS)
@example(rows=[{"k": -2.2250738585072014e-308}], budget=50)  # the longest float repr, in the least room it fits
def test_bounding_without_a_walk_gives_what_the_walk_gives(rows: Any, budget: int) -> None:
    """`bounded` skips its walk for small flat values (most answers): only where the walk would change nothing."""
    walker = _Bounder(budget)
    walked = walker.walk(rows, 0)
    got, cut = bounded(rows, budget)
    if _fits_as_is(rows, budget):
        assert got is rows and not cut
        assert walked == rows and not walker.over and not walker.too_deep
    elif not walker.over:
        assert got == walked  # the walk's own answer, as before the shortcut


def nested(levels: int, leaf: Any = 1) -> Any:
    """`leaf` inside `levels` lists (a scalar is level 0, `[1]` level 1)."""
    for _ in range(levels):
        leaf = [leaf]
    return leaf


awkward_scalars = (
    st.text(max_size=12)
    | st.sampled_from(["\x00", "a\ud800", "\\u0000", "1" * 950, "é😀"])
    | st.integers()
    | st.sampled_from([2**63, 2**2999, 2**3001, 10**950, -(2**70)])
    | st.floats()
    | st.booleans()
    | st.none()
)
awkward_values = st.recursive(
    awkward_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner)
        | st.dictionaries(st.text(max_size=6) | st.integers(0, 3) | st.booleans(), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None, database=None)
@given(value=awkward_values)
@example(value=nested(MAX_DEPTH - 1))
@example(value=nested(MAX_DEPTH))
@example(value=nested(MAX_DEPTH, leaf=[]))
@example(value=nested(MAX_DEPTH - 1, leaf={}))
@example(value=nested(MAX_DEPTH + 1))
@example(value={"description": "a \\u0000 b", "n": 2**3000})
def test_storable_without_a_walk_gives_what_the_walk_gives(value: Any) -> None:
    """`storable` skips its walk (a tool's schema at every connect) only where the walk would give the value back
    equal, storable as it is."""
    walker = _Bounder(2**62)
    walked = walker.walk(value, 0)
    assert storable(value) == walked
    if _storable_as_is(value):
        assert storable(value) is value and walked == value and not walker.too_deep


def scanned_too_deep(text: str, limit: int) -> bool:
    """What `json_too_deep` was before it counted brackets in C: a scan of every character, kept as its oracle."""
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


@settings(max_examples=500, deadline=None, database=None)
@given(text=st.text(st.sampled_from('[]{}"\\a\n:,'), max_size=40), limit=st.integers(0, 6))
@example(text='"\\', limit=0)
@example(text='"[', limit=0)
@example(text='["\\"[', limit=1)
def test_json_depth_from_the_brackets_agrees_with_a_scan(text: str, limit: int) -> None:
    """JSON text's depth, valid or not (strings left open, escapes at the end), as a character scan finds it."""
    assert json_too_deep(text, limit) == scanned_too_deep(text, limit)


def test_storable_takes_the_walk_for_what_the_encoder_cannot_nest() -> None:
    """5,000 levels: the C encoder gives up (RecursionError), and the walk keeps the first MAX_DEPTH of them.
    Outside hypothesis, whose reporting recurses through such a value."""
    deep = nested(5000)
    assert not _storable_as_is(deep)
    assert storable(deep) == _Bounder(2**62).walk(deep, 0) and not deeper_than(storable(deep))


@settings(max_examples=200, deadline=None, database=None)
@given(texts=st.lists(st.text(max_size=40), max_size=6), budget=st.integers(0, 600) | st.just(MAX_RESULT_CHARS))
@example(texts=["\x00"], budget=MAX_RESULT_CHARS)
@example(texts=['"' * 50], budget=150)
def test_text_items_said_to_fit_come_back_unchanged(texts: list[str], budget: int) -> None:
    """`texts_fit` lets a tool result keep its text items without bounding them: only where bounding would
    give them back unchanged."""
    items = [{"type": "text", "text": t} for t in texts]
    if texts_fit(texts, len(items), budget):
        assert bounded(items, budget) == (items, False)


# -- arguments ---------------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, database=None)
@given(
    arguments=st.dictionaries(
        st.text(max_size=8) | st.integers(),
        st.text(max_size=30) | st.integers() | st.booleans() | st.none() | st.floats() | json_values,
        max_size=6,
    )
    | json_values
)
@example(arguments={"text": "\ud800"})
@example(arguments={"n": 2**63})
@example(arguments={"x": float("inf"), "y": 0.5})
@example(arguments={"text": '"\x01' * 200_000})
def test_arguments_passed_without_encoding_would_pass_the_encoding(arguments: Any) -> None:
    """`argument_problem` skips encoding flat arguments (most calls, `_fits_as_is` with a budget in bytes): only
    those the encoding would pass."""
    if _fits_as_is(arguments, MAX_ARGUMENT_BYTES):
        encoded = json.dumps(arguments, ensure_ascii=False, allow_nan=False).encode("utf-8")
        assert len(encoded) <= MAX_ARGUMENT_BYTES
        assert not deeper_than(arguments)


ENTRY = ToolEntry("echo", ToolSpec("s", "echo", "", {"type": "object", "properties": {"text": {"type": "string"}}}))
RECURSIVE = ToolEntry("tree", ToolSpec("s", "tree", "", {"type": "object", "properties": {"a": {"$ref": "#"}}}))


@settings(max_examples=200, deadline=None, database=None)
@given(
    arguments=st.dictionaries(st.text(max_size=5), json_results(st.text(max_size=20)), max_size=4)
    | json_results(st.text(max_size=20)),
    depth=st.integers(0, 12_000),
    size=st.integers(0, 1_500_000),
)
@example(arguments={}, depth=10_000, size=0)
@example(arguments={"text": float("nan")}, depth=0, size=0)
@example(arguments={"text": "\ud800"}, depth=0, size=0)
@example(arguments={"text": {1, 2}}, depth=0, size=0)
def test_any_arguments_are_accepted_or_refused_clearly(arguments: Any, depth: int, size: int) -> None:
    d = Dispatcher(None)
    if isinstance(arguments, dict):
        arguments = {**arguments, "a": deep_value(depth), "pad": "p" * size}
    for entry in (ENTRY, RECURSIVE):
        try:
            d.validate_arguments(entry, arguments)
        except ToolCallError as exc:
            assert exc.kind == "invalid_arguments" and exc.reason and len(exc.reason) < 1000
        else:
            encoded = json.dumps(arguments, allow_nan=False).encode()
            assert len(encoded) <= MAX_ARGUMENT_BYTES and not deeper_than(arguments)
            assert not any(isinstance(v, float) and not math.isfinite(v) for v in arguments.values())


async def test_oversized_arguments_are_refused_before_anything_is_sent(hostile: Dispatcher) -> None:
    for arguments, reason in (
        ({"text": deep_value(10_000)}, f"deeper than {MAX_DEPTH} levels"),
        ({"text": "y" * 2_000_000}, "the limit is 1,000,000"),
        ({"text": {"a", "set"}}, "plain JSON values"),
    ):
        with pytest.raises(ToolCallError) as info:
            hostile.submit("echo", arguments)
        assert info.value.kind == "invalid_arguments" and reason in info.value.reason
    assert await calls_seen(hostile) == 1  # only this one: nothing was sent for the refused calls


async def test_a_model_sending_huge_or_deep_arguments_gets_an_error_and_the_session_goes_on(
    registry: Registry,
) -> None:
    plans = {
        "deep": ("echo", '{"text": ' + "[" * 100 + "]" * 100 + "}"),
        "huge": ("echo", json.dumps({"text": "z" * 2_000_000})),
        # LiveKit parses arguments before any tool runs, and its parser (json_repair) raises RecursionError past
        # ~500 levels: that turn ends without a tool call. What is ours to keep: the session goes on.
        "deeper": ("echo", '{"text": ' + "[" * 10_000 + "]" * 10_000 + "}"),
        "fine": ("echo", {"text": "fine"}),
    }
    model = ScriptedLLM(lambda said: plans.get(said.strip()))
    await registry.add_server(stdio_cfg())
    d = Dispatcher(registry, connect_timeout=15)
    await d.start()
    call = await TextCall(d, model).start(greeting=None)
    try:
        for said, reason in (("deep", "deeper than 64 levels"), ("huge", "the limit is 1,000,000")):
            result = await call.say(said)
            out = next(e for e in result.events if e.type == "function_call_output").item
            assert out.is_error and out.output.startswith("I could not send that request") and reason in out.output
        await call.say("deeper")
        result = await call.say("fine")
        out = next(e for e in result.events if e.type == "function_call_output").item
        assert not out.is_error and "echo: fine" in out.output
    finally:
        await call.aclose()
        await d.aclose()


# Whatever a model writes as a tool call's arguments: broken JSON, JSON that is not an object, objects of the
# wrong shape. LiveKit parses (and repairs) the text before our tool runs; what is ours is that every such turn
# ends with an answer or an error, and the session goes on.
model_arguments = st.one_of(
    st.text(alphabet='{}[]":,0123456789.-+eE abctrufalsn\\', max_size=40),
    st.builds(
        json.dumps,
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["text", "x", ""]), inner),
            max_leaves=8,
        ),
    ),
)


@pytest.fixture
async def talking(registry: Registry) -> AsyncIterator[tuple[TextCall, dict[str, Any]]]:
    plan: dict[str, Any] = {}
    model = ScriptedLLM(lambda said: ("echo", plan["raw"]) if said == "go" else ("echo", {"text": said}))
    await registry.add_server(stdio_cfg())
    d = Dispatcher(registry, connect_timeout=15)
    await d.start()
    call = await TextCall(d, model).start(greeting=None)
    try:
        yield call, plan
    finally:
        await call.aclose()
        await d.aclose()


@settings(SHARED, max_examples=25)
@given(raw=model_arguments)
@example(raw="{not json")
@example(raw="[1, 2]")
@example(raw='{"text": 5}')
async def test_any_arguments_from_the_model_end_the_turn_and_the_session_goes_on(
    talking: tuple[TextCall, dict[str, Any]], raw: str
) -> None:
    call, plan = talking
    plan["raw"] = raw
    await asyncio.wait_for(call.say("go"), 30)  # a turn that ends (with the tool's answer or an error)
    result = await asyncio.wait_for(call.say("still here"), 30)
    out = next(e for e in result.events if e.type == "function_call_output").item
    assert not out.is_error and "still here" in out.output


# -- speech ----------------------------------------------------------------------------------------------------

fragments = st.sampled_from(
    [
        *"[](){}<>!*_`~#|:/.\"' \n=&;-",
        "token=",
        "[](",
        "http://",
        "www.",
        "```",
        "<a ",
        "sk-",
        "2024-01-01",
        "1 ",
        "Bearer ",
        "&amp;",
        "> ",
        "1.",
        "- ",
        "ab12",
        "aA1",
        "a",
    ]
)


@settings(max_examples=12, deadline=None, database=None)
@given(parts=st.lists(fragments, min_size=1, max_size=3), size=st.integers(50_000, MAX_RESULT_CHARS))
def test_speech_of_a_maximal_answer_stays_linear(parts: list[str], size: int) -> None:
    """A capped answer is still 100 000 characters: a regex with quadratic behaviour (a run of "[" took
    minutes) would stall the voice loop, so every repeated pattern must be spoken in about linear time."""
    text = ("".join(parts) * (size // len("".join(parts)) + 1))[:size]
    spoken = for_speech(ToolResult(text=text), max_chars=600)
    assert len(spoken.text) <= 600
