"""An example MCP server whose slow tool runs as an MCP task (the 2026 tasks extension), over stdio.

python -m mcp_integration.examples.tasks_server
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from fastmcp import Context, FastMCP
from fastmcp.utilities.tasks import TaskConfig
from fastmcp_tasks import TasksExtension

mcp = FastMCP("reports")
mcp.add_extension(TasksExtension())


@mcp.tool(task=TaskConfig(mode="optional", poll_interval=timedelta(milliseconds=500)))
async def quarterly_report(quarter: str, ctx: Context, seconds: float = 10.0) -> dict[str, object]:
    """Build the sales report for a quarter (slow: it runs as a task)."""
    steps = 5
    for i in range(steps):
        await ctx.report_progress(i, steps, f"section {i + 1} of {steps}")
        await asyncio.sleep(seconds / steps)
    return {"quarter": quarter.upper(), "revenue_eur": 1284500, "growth_percent": 7.5, "top_region": "Nordics"}


if __name__ == "__main__":
    mcp.run("stdio", show_banner=False)
