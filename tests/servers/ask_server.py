"""A real MCP server whose tools ask the user mid-call (elicitation), in both dialects, over stdio or HTTP.

    python tests/servers/ask_server.py --transport stdio
    python tests/servers/ask_server.py --transport streamable-http --port 0 [--legacy]   # prints "LISTENING <port>"

Built on the `mcp` SDK's own resolvers (`Annotated[..., Resolve(fn)]` returning `Elicit(message, Model)`), which
pick the dialect from the negotiated protocol: at 2026-07-28 the call is answered with an `input_required` result
and resumed when the client retries with the answers (SEP-2322); at 2025-11-25 (`--legacy`, which refuses
`server/discover`) the server sends a standalone `elicitation/create` request in the middle of the call.

Tools:
- `book_table(people)` asks "Which day would you like?" (a date, and a time of day: an enum with a default);
- `pay(amount)` asks to confirm the amount (a boolean) with a PIN (a secret field);
- `open_account()` asks through URL mode (a browser step, 2025-11-25 `ctx.elicit_url`);
- `summarize(text)` asks the client's LLM for a one-line summary (sampling, `Sample(...)`, max 50 tokens).
Each answers with what it got, or with the action (decline, cancel) when it got no answer.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Annotated, Literal

from demo_server import DemoServer, Quirks, serve_http
from mcp.server.mcpserver import AcceptedElicitation, Context, Elicit, ElicitationResult, Resolve, Sample
from mcp_types import CreateMessageResult, SamplingMessage, TextContent
from pydantic import BaseModel, Field


class Day(BaseModel):
    day: str = Field(description="The day, as YYYY-MM-DD", json_schema_extra={"format": "date"})
    time: Literal["lunch", "dinner"] = Field("dinner", description="Lunch or dinner")


class Payment(BaseModel):
    confirm: bool = Field(description="Pay this amount?")
    pin: str = Field(description="Your four-digit PIN", min_length=4, max_length=4)


def ask_day(people: int) -> Elicit[Day]:
    return Elicit(f"Which day would you like the table for {people}?", Day)


def ask_payment(amount: float) -> Elicit[Payment]:
    return Elicit(f"Shall I pay {amount:.2f} euros?", Payment)


def ask_summary(text: str) -> Sample:
    message = SamplingMessage(role="user", content=TextContent(type="text", text=f"Summarize in one line: {text}"))
    return Sample([message], max_tokens=50, system_prompt="You summarize for a phone call.")


def build(name: str) -> DemoServer:
    mcp = DemoServer(name)

    @mcp.tool()
    async def book_table(people: int, when: Annotated[ElicitationResult[Day], Resolve(ask_day)]) -> str:
        """Book a table: asks the caller for the day."""
        if isinstance(when, AcceptedElicitation):
            return f"Booked a table for {people} on {when.data.day} for {when.data.time}."
        return f"Not booked: the caller chose {when.action}."

    @mcp.tool()
    async def pay(amount: float, answer: Annotated[ElicitationResult[Payment], Resolve(ask_payment)]) -> str:
        """Pay an amount: asks the caller to confirm it, with a PIN."""
        if isinstance(answer, AcceptedElicitation) and answer.data.confirm:
            return f"Paid {amount:.2f} euros (PIN ending {answer.data.pin[-1]})."
        return "Nothing was paid."

    @mcp.tool()
    async def open_account(ctx: Context) -> str:
        """Open an account: the caller must finish in a browser."""
        result = await ctx.elicit_url("Please finish signing up in your browser.", "https://example.com/signup", "e-1")
        return f"Sign-up: {result.action}."

    @mcp.tool()
    async def summarize(text: str, summary: Annotated[CreateMessageResult, Resolve(ask_summary)]) -> str:
        """Summarize a text with the client's LLM."""
        return f"Summary ({summary.model}, {summary.stop_reason}): {summary.content.text}"

    return mcp


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", choices=["stdio", "streamable-http"], default="stdio")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="ask")
    parser.add_argument("--legacy", action="store_true", help="refuse server/discover: 2025-11-25 handshake")
    args = parser.parse_args()
    mcp = build(args.name)
    if args.legacy:
        mcp.middleware.append(Quirks(ping_delay_ms=0, legacy=True))
    if args.transport == "stdio":
        mcp.run("stdio")
    else:
        asyncio.run(serve_http(mcp.streamable_http_app(), args.port))


if __name__ == "__main__":
    sys.exit(main())
