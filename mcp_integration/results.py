"""What a tool answered, made fit to keep and to say: bounded, storable, and never carrying a secret of ours."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import mcp_types as types

from mcp_integration.limits import bounded, cut_text, texts_fit
from mcp_integration.scrubber import scrub_known

__all__ = ["ToolResult"]


@dataclass(frozen=True)
class ToolResult:
    """What a tool answered: its text for a language model, and its structured content when it sent some.

    However it is made (a tool's answer, a task's, a polled receipt's, a row read back), a result is bounded:
    `limits.MAX_RESULT_CHARS` of text and as much structured content, "(cut)" where something was left out,
    storable in mcp_jobs as is. Images, audio and blobs are placeholders in the text, never base64.
    """

    text: str
    structured: Any = None
    content: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Frozen, so the bounded values are set the one way a frozen dataclass allows. A server echoing a
        # credential of ours back in its answer does not get it to the LLM, the caller or mcp_jobs.
        text = self.text if isinstance(self.text, str) else str(self.text)
        structured = None if self.structured is None else bounded(self.structured)[0]
        content = bounded([_without_payload(c) for c in self.content])[0] if self.content else self.content
        _settle(self, text, structured, content)

    @classmethod
    def from_mcp(cls, result: types.CallToolResult) -> ToolResult:
        parts: list[str] = []
        raw: list[dict[str, Any]] = []
        plain = True  # only bare text items so far
        for item in result.content:
            if type(item) is types.TextContent and item.annotations is None and item.meta is None:
                # What model_dump gives for a bare text item, without pydantic's serializer: most answers are
                # one or two of these, and the dump was most of what keeping them cost.
                raw.append({"type": item.type, "text": item.text})
                parts.append(item.text)
                continue
            plain = False
            raw.append(item.model_dump(by_alias=True, mode="json", exclude_none=True))
            if isinstance(item, types.TextContent):
                parts.append(item.text)
            elif isinstance(item, types.EmbeddedResource):
                res = item.resource
                text = res.text if isinstance(res, types.TextResourceContents) else None
                parts.append(text if text is not None else f"[binary resource {_short_uri(str(res.uri))}]")
            elif isinstance(item, types.ResourceLink):
                parts.append(f"[resource {item.name[:200]}: {_short_uri(str(item.uri))}]")
            else:
                mime = getattr(item, "mime_type", None)
                parts.append(f"[{item.type} content{f', {mime[:100]}' if isinstance(mime, str) else ''}]")
        text = "\n".join(parts)
        structured, _ = bounded(result.structured_content) if result.structured_content is not None else (None, False)
        if not text and structured is not None:
            text = json.dumps(structured, ensure_ascii=False)
        # Built past __post_init__, which would bound the structured content a second time (a whole walk of it
        # for nothing: bounding a bounded value changes nothing). The same limits hold: text cut, content
        # without payloads and bounded, everything scrubbed, in `_settle`.
        if plain and texts_fit(parts, len(raw)):
            content = raw  # bare text items that fit as they are: nothing to take out, nothing to cut
        else:
            content = bounded([_without_payload(c) for c in raw])[0] if raw else raw
        out = object.__new__(cls)
        _settle(out, text, structured, content)
        return out

    def as_record(self) -> dict[str, Any]:
        return {"text": self.text, "structured": self.structured}


def _settle(result: ToolResult, text: str, structured: Any, content: list[dict[str, Any]]) -> None:
    """Set a result's fields from bounded values: the text cut, and secrets of ours scrubbed from all three."""
    object.__setattr__(result, "text", cut_text(scrub_known(text)))
    object.__setattr__(result, "structured", None if structured is None else scrub_known(structured))
    object.__setattr__(result, "content", scrub_known(content) if content else content)


def _without_payload(item: Any) -> Any:
    """A content item for keeping: base64 data (images, audio, blobs) replaced by its size."""
    if not isinstance(item, dict) or not ("data" in item or "blob" in item or "resource" in item):
        return item
    out = dict(item)
    for key in ("data", "blob"):
        if isinstance(out.get(key), str):
            out[key] = f"({len(out[key]):,} base64 characters not kept)"
    if isinstance(out.get("resource"), dict):
        out["resource"] = _without_payload(out["resource"])
    return out


def _short_uri(uri: str) -> str:
    # A data: URI is its payload; anything else is cut to what a reader could use.
    return uri.split(",", 1)[0] + ",…" if uri.startswith("data:") else uri[:300]
