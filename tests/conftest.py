"""Shared fixtures: a real PostgreSQL (a fresh schema per test) and real MCP servers as subprocesses."""

from __future__ import annotations

import asyncio
import inspect
import os
import select
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from mcp_integration.dispatcher import Dispatcher
from mcp_integration.jobs import FINAL_STATES, Job
from mcp_integration.livekit_text import Route, ScriptedLLM
from mcp_integration.registry import Registry, ServerConfig
from mcp_integration.scrubber import known

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ROOT / "tests" / "servers"
DEMO = str(SERVERS / "demo_server.py")


@pytest.fixture(scope="session")
def pg_base_url() -> Iterator[str]:
    """DATABASE_URL when set (CI: the machine's server); otherwise an embedded PostgreSQL for the whole run."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    import pgserver

    with tempfile.TemporaryDirectory(prefix="voice-mcp-pg-") as tmp:
        server = pgserver.get_server(Path(tmp) / "pg", cleanup_mode="stop")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()


@pytest.fixture
def pg_url(pg_base_url: str) -> Iterator[str]:
    """A connection string whose search_path is a schema made for this test alone, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_base_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield make_conninfo(pg_base_url, options=f"-c search_path={schema}")
    finally:
        with psycopg.connect(pg_base_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
async def registry(pg_url: str) -> AsyncIterator[Registry]:
    reg = await Registry.open(pg_url, max_size=20)
    await reg.migrate()
    try:
        yield reg
    finally:
        await reg.close()


@pytest.fixture(autouse=True)
def _forget_secrets() -> Iterator[None]:
    """Each test starts with no known secrets: what one test resolved must not be scrubbed from another's text."""
    yield
    known.clear()


# Lines for the end of the test session's output (a figure a test measured, such as the conformance count).
_REPORT: list[str] = []


def report(line: str) -> None:
    _REPORT.append(line)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _REPORT:
        terminalreporter.write_line(line)


def stdio_demo(name: str = "demo", *extra: str) -> ServerConfig:
    return ServerConfig(name=name, transport="stdio", command=sys.executable, args=[DEMO, "--name", name, *extra])


@pytest.fixture
def spawn() -> Iterator[Callable[..., int]]:
    """Start a server script as a real subprocess; returns the port it printed as `LISTENING <port>`."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, script: str = DEMO) -> int:
        proc = subprocess.Popen([sys.executable, script, *args], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        procs.append(proc)
        assert proc.stdout is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            # select, so a server that starts but never prints cannot hang the test past the deadline
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = proc.stdout.readline()
            if line.startswith("LISTENING "):
                return int(line.split()[1])
            if not line and proc.poll() is not None:
                break
        raise RuntimeError(f"server {script} {args} did not start")

    start.procs = procs  # type: ignore[attr-defined]
    yield start
    for proc in procs:
        proc.kill()
        proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


# The control for the keep-alive tests. Whether the bare SDK loses a connection after a streamed answer is a race:
# it closes the stream before the last chunk is read unless that chunk already arrived. Measured over 30 rounds of 10
# calls: 9-10 new connections on an idle machine, 4-10 with both cores busy. So the control asks for a quarter of
# the calls: enough to show what ours (at most one connection) is spared.
BARE_CALLS = 20
BARE_AT_LEAST = BARE_CALLS // 4


def client_sockets(port: int, *, open_only: bool = False) -> set[int]:
    """The local ports of this machine's TCP sockets toward the server on `port`, open or closed within the last
    minute (a closed one stays in TIME_WAIT for 60 s on Linux): those new since an earlier reading are the
    connections made to it meanwhile, counted by the kernel. `open_only`: the established ones alone."""
    return {
        c.laddr.port
        for c in psutil.net_connections("tcp")
        if c.raddr and c.raddr.port == port and (not open_only or c.status == psutil.CONN_ESTABLISHED)
    }


async def started(registry: Registry, *cfgs: ServerConfig, connect_timeout: float = 15) -> Dispatcher:
    """A dispatcher over these servers (added to the registry first), every one discovered without error."""
    for cfg in cfgs:
        await registry.add_server(cfg)
    d = Dispatcher(registry, connect_timeout=connect_timeout)
    await d.start()
    errors = {n: s.error for n, s in d.servers.items() if s.error is not None}
    if errors:
        await d.aclose()
        raise AssertionError(f"servers not discovered: {errors}")
    return d


async def all_final(registry: Registry, jobs: list[Job]) -> dict[uuid.UUID, dict]:
    """No job lost: each submitted job has its row in mcp_jobs, in a final state, and no other row exists."""
    for job in jobs:
        await job.settled()
    rows = {row["id"]: row for row in await registry.recent_jobs(limit=1000)}
    assert set(rows) == {job.id for job in jobs}
    for job in jobs:
        assert rows[job.id]["state"] in FINAL_STATES and rows[job.id]["state"] == job.state
    return rows


class OfferingLLM(ScriptedLLM):
    """The scripted LLM, also remembering the tool names each request offered (registry changes reaching a
    running agent, a question's tools coming and going, the tool budget)."""

    def __init__(self, route: Route) -> None:
        super().__init__(route)
        self.offered: list[set[str]] = []

    def chat(self, *, chat_ctx, tools=None, **kwargs):  # type: ignore[no-untyped-def,override]
        self.offered.append({getattr(t, "id", "") for t in tools or []})
        return super().chat(chat_ctx=chat_ctx, tools=tools, **kwargs)


async def eventually(check: Callable[[], Any | Awaitable[Any]], timeout: float, what: str) -> Any:
    """Poll `check` (plain or async) until it gives something truthy, which is returned; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:g} s")
        await asyncio.sleep(0.1)
