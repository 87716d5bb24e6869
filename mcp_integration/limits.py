"""How big and how deep anything crossing the boundary with a server may be, and the walkers that enforce it.

Arguments over a limit are refused before anything is sent; results over a limit are cut, with "(cut)" where
something was left out. No walker here recurses deeper than `MAX_DEPTH`, so a 10 000-level document gives a
clear answer, never RecursionError.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable
from typing import Any

__all__ = [
    "MAX_ARGUMENT_BYTES",
    "MAX_DEPTH",
    "MAX_REASON_CHARS",
    "MAX_RESULT_CHARS",
    "argument_problem",
    "bounded",
    "cut_text",
    "deeper_than",
    "flat_schema_check",
    "json_depth",
    "json_too_deep",
    "storable",
    "texts_fit",
]


# One call's arguments, as JSON. Far above what a language model writes; a larger payload is a mistake or abuse.
MAX_ARGUMENT_BYTES = 1_000_000
# Nesting of arguments, tool schemas and structured results. Real schemas and results stay below 15 levels;
# pydantic's own JSON parser stops at 200, and the JSON Schema validator recurses several frames per level.
MAX_DEPTH = 64
# What is kept of a result's text and of its structured content (as its JSON would measure): what a language
# model, mcp_jobs and follow-up questions ever see. A voice answer uses a few hundred characters of it.
MAX_RESULT_CHARS = 100_000
# A failure's reason (a server's error message among them): enough for a log line and mcp_jobs.error.
MAX_REASON_CHARS = 2_000
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")  # PostgreSQL text and jsonb refuse NUL; UTF-8 refuses surrogates


def deeper_than(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether containers nest more than `limit` levels (a scalar is level 0); stops as soon as it knows. Only
    containers are stacked: a tool's schema at every connect is mostly text."""
    if not isinstance(value, _CONTAINERS):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]  # a container and its level
    while stack:
        item, level = stack.pop()
        if level > limit:
            return True
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, _CONTAINERS):
                stack.append((child, level + 1))
    return False


_CONTAINERS = (dict, list, tuple)


def json_too_deep(text: str, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON text nests arrays and objects more than `limit` levels, told before parsing it: Python's
    parser raises RecursionError (a traceback, not a message) on a document 60,000 levels deep."""
    return json_depth(text) > limit


def argument_problem(arguments: Any) -> str | None:
    """Why these arguments cannot be sent (too deep, too large, not JSON), or None when they can."""
    # Flat arguments (most calls) without encoding them: `_fits_as_is`'s bound holds in bytes too (a character is
    # six bytes at most, escaped or in UTF-8), and text it passes has no NUL or lone surrogate.
    if _fits_as_is(arguments, MAX_ARGUMENT_BYTES):
        return None
    if deeper_than(arguments):
        return f"arguments nest deeper than {MAX_DEPTH} levels"
    try:
        # Strict UTF-8: a lone surrogate cannot be sent either.
        size = len(json.dumps(arguments, ensure_ascii=False, allow_nan=False).encode("utf-8"))
    except (TypeError, ValueError) as exc:
        return f"arguments must be plain JSON values ({str(exc)[:120]})"
    if size > MAX_ARGUMENT_BYTES:
        return f"arguments are {size:,} bytes of JSON; the limit is {MAX_ARGUMENT_BYTES:,}"
    return None


def _storable_text(text: str) -> str:
    """`text` with NUL and lone surrogates replaced (U+FFFD), a plain str. Searched before substituting: almost no
    text needs it, and sub copies every string (and makes a str of a str subclass, which the copy should be)."""
    if type(text) is str and _UNSTORABLE.search(text) is None:
        return text
    return _UNSTORABLE.sub("\ufffd", text)


def cut_text(text: str, limit: int = MAX_RESULT_CHARS) -> str:
    """At most `limit` characters, marker included (so cutting twice changes nothing), storable in PostgreSQL."""
    text = _storable_text(text)
    if len(text) <= limit:
        return text
    keep = max(limit - _MARKER_ROOM, 0)
    return f"{text[:keep]}… (cut: {len(text) - keep:,} more characters)"


def storable(value: Any) -> Any:
    """A JSON value PostgreSQL will store as it is (no NUL, no lone surrogates, no NaN; at most MAX_DEPTH levels),
    with nothing cut for size."""
    if type(value) is str:  # a tool's description: what the walk would do to it, without encoding it
        return _storable_text(value)
    if _storable_as_is(value):
        return value
    return bounded(value, budget=2**62)[0]


def _storable_as_is(value: Any) -> bool:
    """Whether `storable`'s walk would give `value` back equal, told by the C encoder and decoder instead of a walk
    in Python: a tool's schema, description and metadata at every connect, where the walk was the largest part of
    our own CPU in a concurrent start. Encoded and decoded equal rules out what the walk would change to make
    JSON (tuples, keys that are not text, NaN); then the text must hold no NUL (escaped as \\u0000 by the
    encoder), no lone surrogate, no number past the walk's 3,000 bits, and the containers must stay within the
    walk's depth. Anything it is unsure of (a string holding a backslash and "u0000", a long run of digits in
    text) takes the walk: never a wrong "yes"."""
    try:
        text = _ENCODE(value)
        if json.loads(text) != value:
            return False
    except (TypeError, ValueError, RecursionError):
        return False
    return (
        "\\u0000" not in text
        and _UNSTORABLE.search(text) is None  # a lone surrogate: the encoder escapes every NUL itself
        and _LONG_NUMBER.search(text) is None
        and json_depth(text) < MAX_DEPTH  # the walk empties a non-empty container at the last level
    )


def json_depth(text: str) -> int:
    """How deep the arrays and objects of JSON text nest (a scalar is level 0), counted in C: strings taken out
    (one left open runs to the end of the text), then the running sum of the brackets left. No Python bytecode per
    character or per value, where a scan of the text or a walk of the value had several."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(itertools.accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


_ENCODE = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_LONG_NUMBER = re.compile(r"\d{900}")  # 3,000 bits is 904 digits


def bounded(value: Any, budget: int = MAX_RESULT_CHARS) -> tuple[Any, bool]:
    """A JSON value that fits: about `budget` characters of JSON, `MAX_DEPTH` levels, storable in PostgreSQL's
    jsonb (no NUL, no NaN, no surrogates; keys are strings). Returns it and whether anything was cut.

    A value that fits comes back equal (only made storable); bounding a bounded value changes nothing.
    """
    if _fits_as_is(value, budget):
        return value, False
    walker = _Bounder(budget)
    out = walker.walk(value, 0)
    if walker.over:
        # Cut with room to spare for the markers, so the result itself fits the budget.
        walker = _Bounder(max(budget - _RESERVE, 0))
        out = walker.walk(value, 0)
    return out, walker.over or walker.too_deep


def texts_fit(texts: list[str], items: int, budget: int = MAX_RESULT_CHARS) -> bool:
    """Whether `items` text content items (`{"type": "text", "text": ...}`) holding these texts fit the budget
    as they are, storable: what bounding them would find, told from the texts alone."""
    joined = "".join(texts)
    return 6 * len(joined) + 40 * items + 2 <= budget and _UNSTORABLE.search(joined) is None


def _fits_as_is(value: Any, budget: int) -> bool:
    """Whether the walk would give `value` back unchanged, told without copying it: an object, or a list of
    objects, of text, small integers, finite floats, booleans and nulls, whose JSON surely fits (a character
    escapes to six at most), with text PostgreSQL stores. Most answers are this (`{"result": "..."}`, text
    items), and most arguments: the walk (or, for arguments, encoding them) cost them more than the rest of
    their keeping."""
    rows = (value,) if type(value) is dict else value if type(value) is list else None
    if rows is None or len(rows) > 64:
        return False
    texts: list[str] = []
    pairs = 0
    for row in rows:
        if type(row) is not dict or len(row) > 64:
            return False
        pairs += len(row)
        for key, item in row.items():
            kind = type(item)
            if type(key) is not str or (kind is not str and kind not in _SMALL):
                return False
            texts.append(key)
            if kind is str:
                texts.append(item)
            elif kind is int and not -(2**63) <= item < 2**63:
                return False
            elif kind is float and not math.isfinite(item):  # NaN and infinities are not JSON
                return False
    joined = "".join(texts)
    return 6 * len(joined) + 34 * pairs + 4 * len(rows) + 2 <= budget and _UNSTORABLE.search(joined) is None


# Values whose JSON fits in the room `_fits_as_is` allows a pair beside its text (34 characters): an int within 64
# bits is 20 at most, a finite float's shortest repr 24 ("-2.2250738585072014e-308"), as the walk counts them.
_SMALL = frozenset({int, float, bool, type(None)})


# The longest "… (cut: N more characters)" marker; markers added past a budget stay within _RESERVE in all
# (one per container on the way down to where the budget ran out, and at most MAX_DEPTH of those).
_MARKER_ROOM = 48
_RESERVE = _MARKER_ROOM * (MAX_DEPTH + 2)


class _Bounder:
    """One walk: copies a JSON value while counting what its JSON would measure (an upper bound for
    `json.dumps(..., ensure_ascii=False)`), cutting where the budget ends."""

    def __init__(self, budget: int) -> None:
        self.left = budget
        self.over = False
        self.too_deep = False

    def walk(self, value: Any, depth: int) -> Any:
        if type(value) is str:  # the common case first: most of a result is text
            return self._string(value)
        if value is None or isinstance(value, bool):
            self.left -= 5
            return value
        if isinstance(value, int):
            # Beyond what Python will even turn into text (and what JSON tools accept): not a usable number.
            if value.bit_length() > 3000:
                self.left -= 4
                return None
            self.left -= 20 if value.bit_length() <= 64 else len(str(value))
            return value
        if isinstance(value, float):
            self.left -= 24
            return value if math.isfinite(value) else None  # NaN and infinities are not JSON; jsonb refuses them
        if isinstance(value, dict | list | tuple):
            self.left -= 2
            if depth >= MAX_DEPTH - 1 and value:  # its children would nest past the limit: it stays, empty
                self.too_deep = True
                return {} if isinstance(value, dict) else []
            return self._dict(value, depth) if isinstance(value, dict) else self._list(value, depth)
        return self._string(value if isinstance(value, str) else str(value))

    def _string(self, text: str) -> str:
        if len(text) + 2 <= self.left:
            cost = len(text) + 2 + _escapes(text)
            if cost <= self.left:
                self.left -= cost
                return _storable_text(text)
        self.over = True
        room = max(self.left - 2, 0)
        room = max(room - _escapes(text[:room]), 0)
        out = cut_text(text, room)
        self.left -= len(out) + 2 + _escapes(out)
        return out

    def _dict(self, value: dict[Any, Any], depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for n, (key, item) in enumerate(value.items()):
            if self.left <= 0:
                self.over = True
                out["(cut)"] = f"{len(value) - n} more keys"
                break
            self.left -= 4  # ": " and ", "
            name = self._string(key if isinstance(key, str) else str(key))  # the key first: it comes first
            out[name] = self.walk(item, depth + 1)
        return out

    def _list(self, value: list[Any] | tuple[Any, ...], depth: int) -> list[Any]:
        out: list[Any] = []
        for n, item in enumerate(value):
            if self.left <= 0:
                self.over = True
                out.append(f"(cut: {len(value) - n} more items)")
                break
            self.left -= 2  # ", "
            out.append(self.walk(item, depth + 1))
        return out


_ESCAPED = re.compile(r'["\\\x00-\x1f]')


def _escapes(text: str) -> int:
    """Characters JSON adds to escape `text`: one for a quote or backslash, up to five for a control character."""
    if _ESCAPED.search(text) is None:  # most text escapes nothing: no list, no generator
        return 0
    return sum(5 if c < " " else 1 for c in _ESCAPED.findall(text))


# -- a fast path for argument validation ---------------------------------------------------------------------

# Keywords that describe and never constrain (jsonschema asserts none of them).
_ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly", "$comment"}
)
# Dialects whose `type`, `properties`, `required` and `additionalProperties` mean what `flat_schema_check` checks.
_DIALECTS = frozenset(
    {
        "http://json-schema.org/draft-04/schema",
        "http://json-schema.org/draft-06/schema",
        "http://json-schema.org/draft-07/schema",
        "https://json-schema.org/draft/2019-09/schema",
        "https://json-schema.org/draft/2020-12/schema",
    }
)
_TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    # 1.0 is an integer to jsonschema; it is left to the full check, which says so.
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def flat_schema_check(schema: Any) -> Callable[[dict[str, Any]], bool] | None:
    """For a flat object schema (typed properties, `required`, `additionalProperties`, annotations), a check that
    says True only of arguments the schema surely accepts; None for any other schema.

    Most tools' schemas are this simple, and a call's arguments almost always valid: this spares them the
    JSON Schema validator's walk. False proves nothing: the full validator then decides, and words the error.
    """
    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        return None
    if not set(schema) <= _ANNOTATIONS | {"type", "properties", "required", "additionalProperties", "$schema", "$id"}:
        return None
    dialect = schema.get("$schema")
    if dialect is not None and (not isinstance(dialect, str) or dialect.rstrip("#") not in _DIALECTS):
        return None
    required = schema.get("required", [])
    extra = schema.get("additionalProperties", True)
    properties = schema.get("properties", {})
    if (
        not isinstance(required, list)
        or not all(isinstance(r, str) for r in required)
        or not isinstance(extra, bool)
        or not isinstance(properties, dict)
    ):
        return None
    checks: dict[str, tuple[Callable[[Any], bool], ...] | None] = {}  # None: any value
    for name, sub in properties.items():
        if sub is True or (isinstance(sub, dict) and set(sub) <= _ANNOTATIONS):
            checks[name] = None
            continue
        if not isinstance(sub, dict) or not set(sub) <= _ANNOTATIONS | {"type"}:
            return None
        kinds = sub["type"] if isinstance(sub["type"], list) else [sub["type"]]
        if not kinds or not all(isinstance(k, str) and k in _TYPE_CHECKS for k in kinds):
            return None
        checks[name] = tuple(_TYPE_CHECKS[k] for k in kinds)
    needed = tuple(required)

    def surely_valid(arguments: dict[str, Any]) -> bool:
        for name in needed:
            if name not in arguments:
                return False
        for name, value in arguments.items():
            if name not in checks:
                if not extra:
                    return False
                continue
            kinds = checks[name]
            if kinds is not None and not any(check(value) for check in kinds):
                return False
        return True

    return surely_valid
