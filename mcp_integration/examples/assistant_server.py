"""An example MCP server over stdio with a fast tool.

python -m mcp_integration.examples.assistant_server
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from mcp.server.mcpserver import MCPServer

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


if __name__ == "__main__":
    mcp.run("stdio")
