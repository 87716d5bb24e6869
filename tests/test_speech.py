"""Speech is a format: the exact spoken text for each rule, and properties that hold for any input."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcp_integration.errors import ToolCallError
from mcp_integration.results import ToolResult
from mcp_integration.speech import Spoken, error_sentence, for_speech, humanise_name

CASES: list[tuple[str, Any, str]] = [
    # markdown
    (
        "heading and emphasis",
        "# Weather\n\nIt is **sunny** and _warm_ in `Oslo`.",
        "Weather. It is sunny and warm in Oslo.",
    ),
    (
        "heading closed, quote, rule",
        "## Results ##\n> quoted *text* here\n\n---\n\nDone",
        "Results. quoted text here. Done",
    ),
    ("soft wraps join, paragraphs end", "Line one\nline two\n\nNew para", "Line one line two. New para"),
    (
        "snake_case is not emphasis",
        "snake_case_name stays, __init__ and _this_ go",
        "snake_case_name stays, init and this go",
    ),
    ("code block", "Run this:\n```python\nprint(1)\n```\nThen done.", "Run this: (code omitted). Then done."),
    ("unclosed code block", "Unclosed\n```\ncode forever", "Unclosed. (code omitted)."),
    ("table", "| City | Temp |\n|---|---|\n| Oslo | 3 |\n| Bergen | 7 |", "City, Temp. Oslo, 3. Bergen, 7."),
    ("bullet list", "Options:\n- one\n- two\n- three", "Options: one; two; three."),
    ("numbered list", "1. First\n2. Second", "First; Second."),
    ("star bullets", "* bullet a\n* bullet b", "bullet a; bullet b."),
    # links, URLs, HTML, emoji, brackets
    (
        "links and bare URLs",
        "See [the forecast](https://yr.no/x) or https://www.bbc.co.uk/news/x?y.",
        "See the forecast or bbc.co.uk.",
    ),
    (
        "autolink, no scheme",
        "Visit <https://example.com/a>, //cdn.x.io/i.png or www.yr.no/x",
        "Visit example.com, cdn.x.io or yr.no",
    ),
    ("image", "![chart](https://x.com/c.png) shows growth", "chart shows growth"),
    ("html", "<p>Hello <b>world</b></p><ul><li>a</li><li>b</li></ul>", "Hello world. a; b."),
    ("entities", "Temp 3&deg;C &amp; dry", "Temp 3°C & dry"),
    ("emoji", "Great news 🎉🎉 you are booked ✅", "Great news you are booked"),
    ("stray brackets", "Not JSON [1] footnote {x}", "Not JSON 1 footnote x"),
    ("secrets in text", "Key sk-proj-abcdefgh12345678 was used", "Key was used"),
    # numbers, dates, times
    (
        "numbers",
        "Population 12500, price $12.50, ratio 3.50, growth 4.50%, year 2024, order 123456.",
        "Population 12,500, price $12.50, ratio 3.5, growth 4.5%, year 2024, order 123456.",
    ),
    (
        "phones and versions stay",
        "Call 5551234, version 3.10, 3.50 USD, 1.000 kr",
        "Call 5551234, version 3.10, 3.50 USD, 1.000 kr",
    ),
    (
        "dates and datetimes",
        "Leaves 2026-11-27T14:30:00Z, arrives 2026-11-28 09:05.",
        "Leaves Friday 27 November 2026 at 14:30 UTC, arrives Saturday 28 November 2026 at 09:05.",
    ),
    ("impossible dates stay", "On 2026-02-30 or 2026-11-27T25:00", "On 2026-02-30 or 2026-11-27T25:00"),
    # JSON
    (
        "object: key facts first, yes/no, null dropped, nested flattened",
        '{"wind": null, "temp_c": 3.50, "sunny": true, "name": "Oslo", "address": {"city": "Oslo"}}',
        "Name: Oslo. Temp c: 3.5. Sunny: yes. Address city: Oslo.",
    ),
    (
        "array of objects cut to three",
        [
            {"name": "Oslo", "high_c": 3},
            {"name": "Bergen", "high_c": 7},
            {"name": "Tromsø", "high_c": -2},
            {"name": "Bodø"},
        ],
        "Oslo, high c: 3; Bergen, high c: 7; Tromsø, high c: -2; and 1 more.",
    ),
    (
        "list truncation and ids",
        '{"tags": ["a","b","c","d","e"], "id": "3f2b1c4e-1234-4abc-9def-1234567890ab", "order_id": 123456}',
        "Tags: a, b, c and 2 more. Order id: 123456.",
    ),
    ("short list", {"tags": ["a", "b", "c"]}, "Tags: a, b and c."),
    ("message spoken alone", '{"message": "Booked for Friday."}', "Booked for Friday."),
    (
        "humanised keys, dates and big numbers in values",
        {"etaDate": "2026-11-27", "total": 12500, "status": "shipped"},
        "Status: shipped. Total: 12,500. Eta date: Friday 27 November 2026.",
    ),
    ("wrapper keys add nothing", {"data": {"result": {"temp": 3, "unit": "C"}}}, "Temp: 3. Unit: C."),
    ("empty list", {"results": []}, "Results: none."),
    ("nothing", "[]", "The tool returned nothing."),
    (
        "secret and noise keys dropped",
        {"user": {"name": "Ann", "password": "x", "api_key": "y"}, "next_cursor": "abc", "sha": "deadbeef"},
        "User name: Ann.",
    ),
    ("JSON inside a string", {"data": '{"inner": true}'}, "Inner: yes."),
    ("nested lists", [[1, 2], [3, 4], [5, 6], [7, 8]], "1 and 2, 3 and 4, 5 and 6 and 1 more."),
    (
        "structured wins",
        ToolResult(text='{"temp": 3}', structured={"temp": 3, "url": "https://met.no/x"}),
        "Temp: 3. Url: met.no.",
    ),
    ("structured without facts falls back to text", ToolResult(text="hi", structured={"id": "a" * 40}), "hi"),
    ("bytes", b"plain **bytes**", "plain bytes"),
    ("None", None, "The tool returned nothing."),
]


@pytest.mark.parametrize(("value", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_spoken_text(value: Any, expected: str) -> None:
    assert for_speech(value) == Spoken(expected, None)


BOOKING = "booking-system"
ERRORS = [
    ("timeout", "late", "The booking system did not answer in time."),
    ("unreachable", "refused", "The booking system is not answering right now."),
    (
        "tool_error",
        "Error: Room 12 is **not** available.",
        "The booking system could not do that: Room 12 is not available.",
    ),
    ("tool_error", "", "The booking system could not do that."),
    (
        "tool_error",
        "HTTP 401 for https://api.example.com/v1?x=1 with Bearer abcdefghijklmnopqrstuvwxyz123456 (token=abc123def456)",
        "The booking system could not do that: HTTP 401 for api.example.com with (token).",
    ),
    ("invalid_arguments", "date must be in the future", "I could not send that request: date must be in the future."),
    ("unknown_tool", "no such tool", "I do not have a tool for that."),
    ("cancelled", "by caller", "That request was cancelled."),
    ("server_error", "500", "Something went wrong with the booking system."),
    ("something_new", "?", "Something went wrong with the booking system."),
]


KINDS = ["unknown_tool", "invalid_arguments", "unreachable", "server_error", "tool_error", "timeout", "cancelled"]


@pytest.mark.parametrize(("kind", "reason", "expected"), ERRORS)
def test_error_sentence(kind: str, reason: str, expected: str) -> None:
    assert error_sentence(ToolCallError(BOOKING, "book", reason, kind)) == expected


def test_error_sentence_uses_the_label_and_caps_the_reason() -> None:
    err = ToolCallError("gcal", "add", "x", "timeout")
    assert error_sentence(err, server_label="Google Calendar") == "Google Calendar did not answer in time."
    assert error_sentence(err, server_label="calendar") == "The calendar did not answer in time."
    assert error_sentence(ToolCallError(None, "add", "x", "timeout")) == "The tool did not answer in time."
    long = error_sentence(ToolCallError(BOOKING, "book", "word " * 100, "tool_error"))
    assert long.startswith("The booking system could not do that: word word") and long.endswith("word.")
    assert len(long) <= len("The booking system could not do that: .") + 120


@pytest.mark.parametrize(
    ("name", "expected"),
    [("lookup_weather", "lookup weather"), ("n8n-crm", "n8n crm"), ("etaDate", "eta date"), ("high_c", "high c"),
     ("HTTPStatus", "HTTP status"), ("booking-system", "booking system"), ("", "")],
)  # fmt: skip
def test_humanise_name(name: str, expected: str) -> None:
    assert humanise_name(name) == expected


def test_the_cap_cuts_at_a_sentence_and_keeps_the_rest() -> None:
    text = " ".join(f"Sentence {i} is here." for i in range(20))
    out = for_speech(text, max_chars=80)
    assert out.text == "Sentence 0 is here. Sentence 1 is here. Sentence 2 is here. There is more."
    assert out.rest is not None and out.rest.startswith("Sentence 3 is here.") and out.rest.endswith("19 is here.")
    clause = for_speech("alpha beta, gamma delta, epsilon zeta, eta theta, iota kappa", max_chars=50)
    assert clause == Spoken("alpha beta, gamma delta… there is more.", "epsilon zeta, eta theta, iota kappa")


def test_empty_answer_names_the_system() -> None:
    assert for_speech("", server_label="booking system").text == "The booking system returned nothing."


def test_odd_inputs_never_raise() -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    deep: list[Any] = []
    inner = deep
    for _ in range(50_000):
        inner.append([])
        inner = inner[0]
    assert for_speech(Unprintable()).text == "The answer could not be read."
    assert for_speech(deep).text == "The tool returned nothing."
    assert for_speech("[" * 50_000 + "]" * 50_000).text == "The tool returned nothing."
    assert for_speech({"x": 10**5000}).text == "X: a very large number."
    assert len(for_speech("**bold** [l](http://a.b) " * 50_000, max_chars=100).text) <= 100
    assert for_speech("x" * 50, max_chars=0) == Spoken("", "x" * 50)


# -- properties -------------------------------------------------------------------------------------------------

MARKDOWN = re.compile(r"\*\*|```|^# |\n# |\[[^\]]*\]\(")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=40,
)
markdownish = st.lists(st.sampled_from([*"ab 1#*_`[](){}|<>-:./\n🎉", "https://x.io/p", "```"])).map("".join)


def assert_speakable(out: Spoken, max_chars: int, *, quotes: bool = True) -> None:
    assert len(out.text) <= max_chars
    assert not MARKDOWN.search(out.text)
    assert not set("{}[]" if quotes else '{}[]"') & set(out.text)


@given(text=st.text() | markdownish, max_chars=st.integers(40, 2000))
def test_any_text_is_speakable(text: str, max_chars: int) -> None:
    assert_speakable(for_speech(text, max_chars=max_chars), max_chars)


@given(value=json_values, max_chars=st.integers(40, 2000))
@settings(max_examples=200, deadline=None)
def test_any_json_is_speakable(value: Any, max_chars: int) -> None:
    structured = isinstance(value, dict | list)  # a summary never quotes; a plain string may hold quotes of its own
    assert_speakable(for_speech(value, max_chars=max_chars), max_chars, quotes=not structured)
    assert_speakable(
        for_speech(ToolResult(text="", structured=value), max_chars=max_chars), max_chars, quotes=not structured
    )
    assert_speakable(for_speech(json.dumps(value), max_chars=max_chars), max_chars, quotes=not structured)


secrets = st.from_regex(r"sk-[A-Za-z0-9]{20,30}|Bearer [A-Za-z0-9]{20,30}|[0-9a-f]{19}7e[0-9a-f]{19}", fullmatch=True)


@given(before=st.text(max_size=60), secret=secrets, after=st.text(max_size=60), kind=st.sampled_from(KINDS))
def test_error_sentences_never_leak_tokens(before: str, secret: str, after: str, kind: str) -> None:
    sentence = error_sentence(ToolCallError(BOOKING, "book", f"{before} {secret} {after}", kind))
    assert secret.split()[-1] not in sentence
    assert sentence.endswith(".") and "\n" not in sentence


word = st.from_regex(r"[A-Za-z]+(['-][A-Za-z]+)?[,.;:!?]?", fullmatch=True) | st.integers(0, 9999).map(str)
prose = st.lists(st.tuples(word, st.sampled_from([" ", "  ", "\n", " \n "])), min_size=1, max_size=40).map(
    lambda pairs: "".join(w + sep for w, sep in pairs)
)


@given(text=prose)
def test_plain_prose_changes_at_most_whitespace(text: str) -> None:
    out = for_speech(text, max_chars=10_000)
    assert out.text == " ".join(text.split())
    assert for_speech(out.text, max_chars=10_000).text == out.text


# -- the caller's language -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("language", "expected"),
    [
        ("en", "Booked for Tuesday 1 December 2026 at 19:30 UTC. Total 128,450 items, 7.5 percent."),
        ("de", "Booked for Dienstag, 1. Dezember 2026, 19:30 UTC. Total 128.450 items, 7.5 percent."),
        # Mexican Spanish: a 12-hour clock, a comma between thousands (CLDR); narrow spaces are said as spaces.
        ("es-MX", "Booked for martes, 1 de diciembre de 2026, 7:30 p.m. UTC. Total 128,450 items, 7.5 percent."),
        ("fr", "Booked for mardi 1 décembre 2026, 19:30 UTC. Total 128 450 items, 7.5 percent."),
        ("xx", "Booked for Tuesday 1 December 2026 at 19:30 UTC. Total 128,450 items, 7.5 percent."),
    ],
)
def test_dates_and_numbers_are_said_the_callers_way(language: str, expected: str) -> None:
    text = "Booked for 2026-12-01T19:30Z. Total 128450 items, 7.5 percent."
    assert for_speech(text, language=language).text == expected


def test_values_in_structured_answers_follow_the_language_and_english_is_unchanged() -> None:
    value = {"revenue_eur": 1284500, "growth_percent": 7.5, "price": 12345.678}
    assert for_speech(value).text == "Price: 12,345.68. Revenue eur: 1,284,500. Growth percent: 7.5."
    assert for_speech(value, language="de").text == "Price: 12.345,68. Revenue eur: 1.284.500. Growth percent: 7,5."
    # Identifiers stay as written in every language.
    assert for_speech("order 123456 and version 3.10", language="de").text == "order 123456 and version 3.10"
