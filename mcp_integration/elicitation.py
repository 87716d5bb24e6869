"""A server's question for the caller (MCP elicitation): what was asked, the answer checked against what was
asked, the schema's defaults, and what is kept of it with the job.

Both dialects arrive here the same way: a 2025-11-25 `elicitation/create` request, and a 2026-07-28
`input_required` result that the SDK's driver (SEP-2322) turns into the same callback. Whoever answers — the
voice session, a terminal, a script's `--input`, nobody — is an `Asker`; this module has no I/O.

Form mode's schema is flat: strings (optionally with a `format`: date, date-time, email, uri), numbers,
integers, booleans, single-choice enums (`enum`, or `oneOf` of `const`/`title`, or the legacy `enumNames`) and
multi-choice arrays of those. Answers are checked with `jsonschema` (formats included) after the defaults are
filled in, as SEP-1034 asks of clients.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import jsonschema

from mcp_integration.limits import cut_text

__all__ = [
    "ASK_TIMEOUT_S",
    "Answer",
    "Asker",
    "ElicitAction",
    "Field",
    "Question",
    "answer_within",
    "check",
    "decline_all",
    "from_values",
]

log = logging.getLogger(__name__)

ElicitAction = Literal["accept", "decline", "cancel"]
FieldKind = Literal["string", "number", "integer", "boolean", "choice", "choices"]

# How long a question may wait for its answer before it is cancelled (a caller who never answers).
ASK_TIMEOUT_S = 120.0
MAX_MESSAGE_CHARS = 1000  # what a server may make us say or show, at most
# A field whose answer is never recorded: its name, or a password format, says it is secret.
_SECRET_NAME = re.compile(r"pass|secret|token|pin\b|^pin|cvv|cvc|card.?number|iban|ssn|social|otp|api.?key", re.I)


@dataclass(frozen=True)
class Field:
    name: str
    kind: FieldKind
    title: str
    description: str | None = None
    required: bool = False
    default: Any = None
    has_default: bool = False
    options: tuple[str, ...] = ()  # the values of a choice
    labels: tuple[str, ...] = ()  # their titles, to say or show (same order; the value when untitled)
    format: str | None = None
    secret: bool = False


@dataclass(frozen=True)
class Question:
    server: str
    tool: str | None
    message: str
    mode: Literal["form", "url"]
    fields: tuple[Field, ...] = ()
    schema: dict[str, Any] = field(default_factory=dict)
    url: str | None = None
    elicitation_id: str | None = None

    @classmethod
    def from_request(cls, server: str, tool: str | None, params: Any) -> Question:
        """From the SDK's `ElicitRequestFormParams` / `ElicitRequestURLParams`. Raises ValueError for a schema
        that is not the flat form the spec allows (the caller is then not asked; the server hears `decline`)."""
        message = cut_text(str(getattr(params, "message", "") or ""), MAX_MESSAGE_CHARS)
        if getattr(params, "mode", None) == "url":
            return cls(server, tool, message, "url", url=params.url, elicitation_id=params.elicitation_id)
        schema = getattr(params, "requested_schema", None) or {}
        if hasattr(schema, "model_dump"):
            schema = schema.model_dump(by_alias=True, exclude_none=True)
        return cls(server, tool, message, "form", fields=_fields(schema), schema=dict(schema))

    @property
    def defaults(self) -> dict[str, Any]:
        return {f.name: f.default for f in self.fields if f.has_default}

    def record(self, answer: Answer) -> dict[str, Any]:
        """What the job keeps: the question and the outcome, never a secret field's value."""
        out: dict[str, Any] = {"message": self.message, "mode": self.mode, "action": answer.action}
        if self.mode == "form":
            out["fields"] = [f.name for f in self.fields]
            if answer.content is not None:
                secret = {f.name for f in self.fields if f.secret}
                out["content"] = {k: ("***" if k in secret else v) for k, v in answer.content.items()}
        elif self.url:
            out["url"] = self.url
        return out


@dataclass(frozen=True)
class Answer:
    action: ElicitAction
    content: dict[str, Any] | None = None
    why: str | None = None  # for the log and the record: why it was declined or cancelled


Asker = Callable[[Question], Awaitable[Answer]]


async def decline_all(question: Question) -> Answer:
    """Nobody to ask (a worker without a session, a script without --input): the honest answer is no."""
    return Answer("decline", why="nobody here can answer a server's question")


def from_values(values: dict[str, Any]) -> Asker:
    """Answers given in advance (`call --input JSON`): the fields given, the schema's defaults for the rest."""

    async def ask(question: Question) -> Answer:
        if question.mode == "url":
            return Answer("decline", why="a browser step cannot be done from --input")
        content, problems = check(question, values)
        if problems:
            return Answer("decline", why="--input does not fit the question: " + "; ".join(problems))
        return Answer("accept", content)

    return ask


async def answer_within(asker: Asker, question: Question, timeout_s: float = ASK_TIMEOUT_S) -> Answer:
    """Ask, bounded: no answer in time is `cancel`; an asker that fails is `cancel` too (logged), never a crash
    inside the server's call."""
    try:
        async with asyncio.timeout(timeout_s):
            answer = await asker(question)
    except TimeoutError:
        return Answer("cancel", why=f"no answer within {timeout_s:g} s")
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.warning("asking %s's question failed: %s: %s", question.server, type(exc).__name__, exc)
        return Answer("cancel", why="the question could not be asked")
    if answer.action == "accept" and question.mode == "form":
        content, problems = check(question, answer.content or {})
        if problems:
            return Answer("decline", why="the answer does not fit the question: " + "; ".join(problems))
        return Answer("accept", content)
    return answer


def check(question: Question, values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The answer to send: the values given (coerced where a string plainly means a number or a yes/no, as a
    terminal or a transcript gives them), the schema's defaults for fields left out, only fields asked for.
    Returns it and what is wrong with it (empty when it fits)."""
    if not isinstance(values, dict):
        return {}, ["the answer must be an object of field values"]
    known = {f.name: f for f in question.fields}
    problems = [f"{name!r} was not asked for" for name in values if name not in known]
    content = question.defaults
    for name, value in values.items():
        if name in known and value is not None:
            content[name] = _coerce(known[name], value)
    problems += [f"{f.title!r} is required" for f in question.fields if f.required and f.name not in content]
    validator = jsonschema.Draft202012Validator(
        {**question.schema, "additionalProperties": False},
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )
    for error in validator.iter_errors(content):
        if error.validator == "required" and not error.absolute_path:
            continue  # said above, by the field's title
        where = ".".join(str(p) for p in error.absolute_path) or "answer"
        problems.append(f"{where}: {cut_text(error.message, 200)}")
    return content, problems


# -- the schema ---------------------------------------------------------------------------------------------------


def _fields(schema: dict[str, Any]) -> tuple[Field, ...]:
    if schema.get("type", "object") != "object" or not isinstance(schema.get("properties", {}), dict):
        raise ValueError("the requested schema is not an object of fields")
    required = set(schema.get("required") or [])
    out = []
    for name, prop in (schema.get("properties") or {}).items():
        if not isinstance(prop, dict):
            raise ValueError(f"field {name!r} has no schema")
        kind, options, labels = _kind(name, prop)
        out.append(
            Field(
                name=name,
                kind=kind,
                title=str(prop.get("title") or name),
                description=prop.get("description"),
                required=name in required,
                default=prop.get("default"),
                has_default="default" in prop,
                options=options,
                labels=labels,
                format=prop.get("format"),
                secret=bool(_SECRET_NAME.search(name)) or prop.get("format") == "password",
            )
        )
    return tuple(out)


def _kind(name: str, prop: dict[str, Any]) -> tuple[FieldKind, tuple[str, ...], tuple[str, ...]]:
    kind = prop.get("type")
    if kind == "array":
        options, labels = _choices(prop.get("items") or {})
        if not options:
            raise ValueError(f"field {name!r}: a list field must list its choices")
        return "choices", options, labels
    options, labels = _choices(prop)
    if options:
        return "choice", options, labels
    if kind in ("string", "number", "integer", "boolean"):
        return kind, (), ()
    raise ValueError(f"field {name!r}: type {kind!r} cannot be asked (flat strings, numbers, booleans, choices)")


def _choices(prop: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if isinstance(prop.get("enum"), list):
        values = tuple(str(v) for v in prop["enum"])
        names = prop.get("enumNames")
        labels = tuple(str(n) for n in names) if isinstance(names, list) and len(names) == len(values) else values
        return values, labels
    variants = prop.get("oneOf") or prop.get("anyOf")
    if isinstance(variants, list) and all(isinstance(v, dict) and "const" in v for v in variants):
        return tuple(str(v["const"]) for v in variants), tuple(str(v.get("title") or v["const"]) for v in variants)
    return (), ()


_YES = {"yes", "y", "true", "1", "yeah", "yep", "sure", "ok", "okay", "correct", "right"}
_NO = {"no", "n", "false", "0", "nope", "nah", "wrong"}


def _coerce(f: Field, value: Any) -> Any:
    """Only the unambiguous: "42" for an integer, "yes" for a boolean, a choice's title for its value."""
    if isinstance(value, str):
        text = value.strip()
        if f.kind == "integer" and re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        if f.kind == "number" and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text):
            return float(text) if not re.fullmatch(r"[+-]?\d+", text) else int(text)
        if f.kind == "boolean" and text.lower() in _YES | _NO:
            return text.lower() in _YES
        if f.kind == "choice":
            return _option(f, text)
        if f.kind == "choices":
            return [_option(f, part.strip()) for part in text.split(",") if part.strip()]
    if f.kind == "choices" and isinstance(value, list):
        return [_option(f, str(v)) for v in value]
    return value


def _option(f: Field, text: str) -> str:
    for value, label in zip(f.options, f.labels, strict=True):
        if text.lower() in (value.lower(), label.lower()):
            return value
    return text
