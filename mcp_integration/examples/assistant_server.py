"""An example MCP server over stdio: a fast tool and a slow one that reports progress.

python -m mcp_integration.examples.assistant_server
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from mcp.server.mcpserver import Context, MCPServer

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


@mcp.tool()
async def order_status(order_id: str, ctx: Context) -> dict[str, str]:
    """Look up an order in the (slow) warehouse system."""
    steps = ["finding the order", "asking the warehouse", "checking the courier"]
    for i, step in enumerate(steps):
        await ctx.report_progress(i, len(steps), step)
        await asyncio.sleep(1.0)
    return {"order_id": order_id, "status": "shipped", "carrier": "DHL", "eta": "Friday"}


if __name__ == "__main__":
    mcp.run("stdio")
