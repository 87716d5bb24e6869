"""An example MCP server over stdio with a fast tool, and a booking tool that asks the caller for the day
(MCP elicitation, through the SDK's resolvers: a mid-call question in either protocol dialect).

python -m mcp_integration.examples.assistant_server
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from mcp.server.mcpserver import AcceptedElicitation, Elicit, ElicitationResult, MCPServer, Resolve
from pydantic import BaseModel, Field

mcp = MCPServer("assistant")

_OFFSETS = {"london": 0, "paris": 1, "new york": -5, "tokyo": 9, "sydney": 11}


@mcp.tool()
async def world_time(city: str) -> str:
    """The local time in a city (London, Paris, New York, Tokyo, Sydney)."""
    offset = _OFFSETS.get(city.strip().lower())
    if offset is None:
        return f"I only know the time in {', '.join(c.title() for c in _OFFSETS)}."
    now = datetime.now(UTC) + timedelta(hours=offset)
    return f"It is {now:%H:%M} in {city.title()}."


class Day(BaseModel):
    day: str = Field(description="The day, as YYYY-MM-DD", json_schema_extra={"format": "date"})
    time: Literal["lunch", "dinner"] = Field("dinner", description="Lunch or dinner")


def ask_day(people: int) -> Elicit[Day]:
    return Elicit(f"Which day would you like the table for {people}?", Day)


@mcp.tool()
async def book_table(people: int, when: Annotated[ElicitationResult[Day], Resolve(ask_day)]) -> str:
    """Book a table at the restaurant; asks the caller which day."""
    if isinstance(when, AcceptedElicitation):
        return f"Booked a table for {people} on {when.data.day} for {when.data.time}."
    return f"Nothing was booked ({when.action})."


if __name__ == "__main__":
    mcp.run("stdio")
