"""Which MCP tools an LLM turn is offered: never more than a budget, chosen from the conversation.

OpenAI's chat API refuses more than 128 tools, and choice degrades long before that; twenty servers of ten
tools is an ordinary registry. When the registry's tools fit the budget, every tool is offered (one server of a
handful of tools sees no change). Otherwise a turn is offered, in this order: the tools pinned per server, the
tools of jobs still running (their answers may need a follow-up), the tools the LLM asked for through
`find_tools`, then the best matches for what the caller said (BM25 over names and descriptions, with `bm25s`;
the latest caller turn counts most), and, to fill the budget, the others in registry order.

Descriptions and schemas offered to an LLM are capped too: a server's megabyte of description or a schema of
thousands of properties would otherwise reach every request.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import bm25s
import numpy as np

__all__ = [
    "DEFAULT_BUDGET",
    "MAX_DESCRIPTION_CHARS",
    "MAX_SCHEMA_CHARS",
    "ToolChooser",
    "ToolText",
    "capped_description",
    "capped_schema",
    "words",
]

# bm25s sets its own logger to DEBUG at import, and would print a line per index built.
logging.getLogger("bm25s").setLevel(logging.WARNING)

DEFAULT_BUDGET = 40
MAX_DESCRIPTION_CHARS = 1024
MAX_SCHEMA_CHARS = 8_000

_STOP = frozenset(
    "a an and are as at be by can could do for from get give has have how i in is it its me my of on or please "
    "the this to tool use what when where which who will with would you your".split()
)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lowercase words of a name or a sentence: `lookup.weatherNow` → lookup, weather, now."""
    return [w for w in _WORD.findall(_CAMEL.sub(" ", text).lower()) if len(w) > 1 and w not in _STOP]


@dataclass(frozen=True)
class ToolText:
    """What the chooser knows of a tool: its LLM name, its server, and the text it is found by."""

    name: str
    server: str
    text: str


@dataclass
class ToolChooser:
    budget: int = DEFAULT_BUDGET
    _key: tuple[tuple[str, str], ...] = ()
    _names: list[str] = field(default_factory=list)
    _vocab: set[str] = field(default_factory=set)
    _index: Any = None

    def _ensure(self, tools: Sequence[ToolText]) -> None:
        key = tuple((t.name, t.text) for t in tools)
        if key == self._key:
            return
        corpus = [words(f"{t.name} {t.server} {t.text}") or ["_"] for t in tools]
        index = bm25s.BM25()
        index.index(corpus, show_progress=False)
        self._key, self._names, self._index = key, [t.name for t in tools], index
        self._vocab = {w for doc in corpus for w in doc}

    def search(self, tools: Sequence[ToolText], query: str, k: int) -> list[str]:
        """The names of the tools that best match `query`, best first (only those it matches at all)."""
        if not tools or k <= 0:
            return []
        self._ensure(tools)
        terms = [w for w in words(query) if w in self._vocab]
        if not terms:
            return []
        scores = self._index.get_scores(terms)
        best = np.argsort(-scores, kind="stable")[: min(k, len(self._names))]
        return [self._names[i] for i in best if scores[i] > 0]

    def choose(
        self,
        tools: Sequence[ToolText],
        conversation: Sequence[str],
        *,
        keep: Iterable[str] = (),
        budget: int | None = None,
    ) -> list[str]:
        """The names to offer this turn, at most `budget` (this chooser's by default), in the order above."""
        limit = self.budget if budget is None else budget
        names = [t.name for t in tools]
        if len(names) <= limit:
            return names
        known = set(names)
        chosen: dict[str, None] = {n: None for n in keep if n in known}
        # The latest turn twice: what the caller just said matters most; earlier turns keep a topic alive.
        recent = list(conversation[-3:])
        query = " ".join([*recent, *recent[-1:]]) if recent else ""
        for name in self.search(tools, query, limit):
            chosen.setdefault(name, None)
        for name in names:
            if len(chosen) >= limit:
                break
            chosen.setdefault(name, None)
        return list(chosen)[:limit]


def capped_description(text: str | None, limit: int = MAX_DESCRIPTION_CHARS) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 1].rstrip() + "…"


def capped_schema(schema: dict[str, Any], limit: int = MAX_SCHEMA_CHARS) -> dict[str, Any]:
    """A schema small enough to offer: as it is when it fits; else without descriptions and examples; else only
    its required properties, typed loosely (the server still validates the call)."""
    if len(json.dumps(schema, default=str)) <= limit:
        return schema
    lean = _strip(schema)
    if len(json.dumps(lean, default=str)) <= limit:
        return lean
    required = [r for r in schema.get("required", []) if isinstance(r, str)][:50]
    props = lean.get("properties", {}) if isinstance(lean.get("properties"), dict) else {}
    kept = {
        r: {"type": props.get(r, {}).get("type", "string")} if isinstance(props.get(r), dict) else {} for r in required
    }
    return {"type": "object", "properties": kept, "required": required}


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in ("description", "examples", "title", "$comment")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value
