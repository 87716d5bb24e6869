"""A server's request for a completion (MCP sampling, `sampling/createMessage`), served by the session's LLM
only for servers whose registry row allows it (`allow_sampling`, off by default), with a token cap.

Text only: a request with images or audio is refused. What is recorded with the job is the shape of the
exchange (how many messages, the cap, how long the answer was, the model), never its content, which may hold
what the caller said.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_SAMPLING_TOKENS", "Sampled", "Sampler", "SamplingRequest"]

# The most tokens a server may have the session's LLM write for it, whatever it asks for.
MAX_SAMPLING_TOKENS = 512


@dataclass(frozen=True)
class SamplingRequest:
    server: str
    tool: str | None
    system: str | None
    messages: tuple[tuple[str, str], ...]  # (role, text)
    max_tokens: int

    @classmethod
    def from_request(cls, server: str, tool: str | None, params: Any) -> SamplingRequest:
        """From the SDK's `CreateMessageRequestParams`; ValueError for what we do not serve (not text, tools)."""
        if getattr(params, "tools", None):
            raise ValueError("sampling with tools is not served")
        messages = []
        for message in params.messages:
            blocks = message.content if isinstance(message.content, list) else [message.content]
            texts = [getattr(b, "text", None) for b in blocks]
            if any(t is None for t in texts):
                raise ValueError("only text messages are served")
            messages.append((str(message.role), "\n".join(t for t in texts if t)))
        wanted = int(getattr(params, "max_tokens", MAX_SAMPLING_TOKENS) or MAX_SAMPLING_TOKENS)
        return cls(server, tool, params.system_prompt, tuple(messages), max(1, min(wanted, MAX_SAMPLING_TOKENS)))

    def record(self, result: Sampled | None, why: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"messages": len(self.messages), "max_tokens": self.max_tokens}
        if result is not None:
            out |= {"chars": len(result.text), "model": result.model, "stop_reason": result.stop_reason}
        if why:
            out["why"] = why
        return out


@dataclass(frozen=True)
class Sampled:
    text: str
    model: str
    stop_reason: str  # endTurn | maxTokens


Sampler = Callable[[SamplingRequest], Awaitable[Sampled]]
