"""Many real MCP servers in one process: `--servers N` MCPServer instances (the `mcp` SDK's), each on Streamable
HTTP at `/sNN/mcp`, each with `--tools M` tools of its own subject (weather, calendar, invoices…), so a registry
of hundreds of tools can be built without hundreds of processes. Prints `LISTENING <port>`.

    python tests/servers/many_servers.py --servers 30 --tools 10 --port 0

Every tool answers with its own name and arguments; the names are `<verb>_<subject>` (`get_forecast`,
`create_invoice`) and the descriptions say what a caller would ask for, as real servers' do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from typing import Any

from demo_server import serve_http
from mcp.server.mcpserver import MCPServer
from starlette.applications import Starlette
from starlette.routing import Mount

SUBJECTS = [
    ("weather", "forecast", "the weather forecast, temperature and rain for a city"),
    ("calendar", "meeting", "meetings and appointments in the calendar"),
    ("billing", "invoice", "invoices, amounts due and payments of a customer"),
    ("shipping", "parcel", "parcels, deliveries and tracking numbers"),
    ("crm", "contact", "customer contacts, phone numbers and companies"),
    ("support", "ticket", "support tickets, complaints and their status"),
    ("hr", "employee", "employees, holidays and sick leave"),
    ("inventory", "stock", "stock levels of products in the warehouse"),
    ("travel", "flight", "flights, departure times and seats"),
    ("hotel", "room", "hotel rooms, check-in and reservations"),
    ("restaurant", "table", "restaurant tables and dinner reservations"),
    ("music", "playlist", "songs and playlists to play"),
    ("news", "headline", "news headlines and articles"),
    ("maps", "route", "driving directions, routes and traffic"),
    ("bank", "transfer", "bank transfers and account balances"),
    ("email", "message", "email messages in the inbox"),
    ("files", "document", "documents and folders in the file store"),
    ("sales", "lead", "sales leads, deals and the pipeline"),
    ("marketing", "campaign", "marketing campaigns and newsletters"),
    ("legal", "contract", "contracts, signatures and renewal dates"),
    ("it", "laptop", "laptops, passwords resets and IT equipment"),
    ("facilities", "badge", "office badges, desks and parking spaces"),
    ("fitness", "workout", "workouts, steps and training plans"),
    ("health", "prescription", "prescriptions, pharmacies and medication"),
    ("school", "grade", "school grades, homework and classes"),
    ("energy", "meter", "electricity meter readings and energy use"),
    ("insurance", "claim", "insurance claims and policies"),
    ("taxi", "ride", "taxi rides, pickups and drivers"),
    ("pets", "vet", "vet appointments and pet vaccinations"),
    ("garden", "plant", "plants, watering schedules and seeds"),
]
VERBS = ["get", "list", "create", "update", "delete", "search", "cancel", "summarize", "export", "count"]


def build(index: int, tools: int) -> MCPServer:
    area, noun, about = SUBJECTS[index % len(SUBJECTS)]
    mcp = MCPServer(f"{area}{index // len(SUBJECTS) or ''}")
    for verb in VERBS[:tools]:
        name = f"{verb}_{noun}"
        mcp.add_tool(_answering(name), name=name, description=f"{verb.capitalize()} {about}.")
    return mcp


def _answering(name: str) -> Any:
    async def tool(query: str = "") -> str:
        return f"{name} done: {query}"

    return tool


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--servers", type=int, default=30)
    parser.add_argument("--tools", type=int, default=10)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    servers = [build(i, args.tools) for i in range(args.servers)]
    apps = [s.streamable_http_app(streamable_http_path="/mcp") for s in servers]

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        # Each SDK app runs its session manager in its own lifespan, which a mounted app never gets.
        async with contextlib.AsyncExitStack() as stack:
            for s in servers:
                await stack.enter_async_context(s.session_manager.run())
            yield

    app = Starlette(routes=[Mount(f"/s{i:02d}", app=a) for i, a in enumerate(apps)], lifespan=lifespan)
    asyncio.run(serve_http(app, args.port))


if __name__ == "__main__":
    sys.exit(main())
