"""Real third-party MCP servers, not our look-alikes: the reference servers the MCP maintainers publish on npm
(`@modelcontextprotocol/server-everything`, `-filesystem`, `-memory`; versions pinned in package.json, installed
by `.ci/run` with `npm ci`), each through the dispatcher and through a text-mode LiveKit `AgentSession`.

server-everything runs over stdio, legacy SSE and Streamable HTTP: a fast tool, a 3 s tool that reports
progress, and its 2025-11-25 task tool (`simulate-research-query`, `taskSupport: required`). It lists
`get-roots-list` only to clients that declare roots, which we do.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import BARE_AT_LEAST, BARE_CALLS, ROOT, client_sockets, started
from mcp import Client

from mcp_integration.dispatcher import Dispatcher
from mcp_integration.errors import ToolCallError
from mcp_integration.fillers import FillerPolicy
from mcp_integration.livekit_text import ScriptedLLM, TextCall
from mcp_integration.livekit_tools import VoiceOptions
from mcp_integration.registry import Registry, ServerConfig

MODULES = ROOT / "node_modules"
NODE = MODULES / ".bin" / "node"
EVERYTHING = MODULES / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
FILESYSTEM = MODULES / "@modelcontextprotocol" / "server-filesystem" / "dist" / "index.js"
MEMORY = MODULES / "@modelcontextprotocol" / "server-memory" / "dist" / "index.js"


@pytest.fixture(scope="module", autouse=True)
def installed() -> None:
    for path in (NODE, EVERYTHING, FILESYSTEM, MEMORY):
        assert path.exists(), f"{path} is missing: run `npm ci` in the project root (.ci/run does)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def everything_over_http(mode: str) -> Iterator[int]:
    """server-everything's own HTTP entry (`sse` or `streamableHttp`), on a free port it is told with PORT."""
    port = free_port()
    proc = subprocess.Popen(
        [str(NODE), str(EVERYTHING), mode],
        env={**os.environ, "PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert proc.poll() is None, f"server-everything {mode} exited with {proc.returncode}"
                assert time.monotonic() < deadline, f"server-everything {mode} never listened on {port}"
                time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.wait(5)


@contextlib.contextmanager
def everything(transport: str) -> Iterator[ServerConfig]:
    if transport == "stdio":
        yield ServerConfig(name="everything", transport="stdio", command=str(NODE), args=[str(EVERYTHING), "stdio"])
        return
    mode, path = {"sse": ("sse", "/sse"), "streamable-http": ("streamableHttp", "/mcp")}[transport]
    with everything_over_http(mode) as port:
        yield ServerConfig(name="everything", transport=transport, url=f"http://127.0.0.1:{port}{path}")


@contextlib.asynccontextmanager
async def dispatcher(registry: Registry, *cfgs: ServerConfig) -> AsyncIterator[Dispatcher]:
    d = await started(registry, *cfgs, connect_timeout=20)
    try:
        yield d
    finally:
        await d.aclose()


def files_and_memory(tmp_path: Path, folder: Path) -> tuple[ServerConfig, ServerConfig]:
    files = ServerConfig(name="files", transport="stdio", command=str(NODE), args=[str(FILESYSTEM), str(folder)])
    memory = ServerConfig(
        name="memory", transport="stdio", command=str(NODE), args=[str(MEMORY)],
        env={"MEMORY_FILE_PATH": str(tmp_path / "memory.jsonl")},
    )  # fmt: skip
    return files, memory


# -- through the dispatcher --------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["stdio", "sse", "streamable-http"])
async def test_server_everything_through_the_dispatcher(registry: Registry, tmp_path: Path, transport: str) -> None:
    with everything(transport) as cfg:
        cfg.roots = [str(tmp_path)]
        async with dispatcher(registry, cfg) as d:
            names = {e.name for e in d.tools}
            assert {"echo", "get-sum", "trigger-long-running-operation", "simulate-research-query"} <= names
            assert "get-roots-list" in names  # listed only to a client that declares roots

            assert (await d.call("echo", {"message": "hello"})).text == "Echo: hello"
            assert "5" in (await d.call("get-sum", {"a": 2, "b": 3})).text

            slow = d.submit("trigger-long-running-operation", {"duration": 3, "steps": 3})
            assert "completed" in (await slow.wait(30)).text
            assert len([e for e in slow.events if e.kind == "progress"]) >= 2

            research = d.submit("simulate-research-query", {"topic": "bees"})
            report = await research.wait(60)
            assert research.kind == "task" and "bees" in report.text
            statuses = [e.data.get("message") for e in research.events if e.kind == "status"]
            assert any(s and "Gathering sources" in s for s in statuses), statuses

            roots = (await d.call("get-roots-list", {})).text
            assert tmp_path.as_uri() in roots
    rows = await registry.recent_jobs()
    assert len(rows) == 5 and all(r["state"] == "completed" for r in rows)


async def test_server_everything_over_streamable_http_keeps_its_connection_from_call_to_call(
    registry: Registry,
) -> None:
    """server-everything answers each request in an event stream, which the bare SDK closes before its end: a new
    TCP connection for most calls (the control, counted by the kernel). Ours reads each to its end (keep_alive.py)."""
    with everything("streamable-http") as cfg:
        assert cfg.url is not None
        port = urlsplit(cfg.url).port
        assert port is not None
        before = client_sockets(port)
        async with Client(cfg.url) as bare:
            for i in range(BARE_CALLS):
                assert "Echo: bare" in str(await bare.call_tool("echo", {"message": f"bare {i}"}))
        assert len(client_sockets(port) - before) >= BARE_AT_LEAST, (
            "the control: the bare SDK opens a connection per call"
        )
        async with dispatcher(registry, cfg) as d:
            before = client_sockets(port)
            for i in range(BARE_CALLS):
                assert (await d.call("echo", {"message": f"ours {i}"})).text == f"Echo: ours {i}"
            assert len(client_sockets(port) - before) <= 1


async def test_filesystem_and_memory_servers_through_the_dispatcher(registry: Registry, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "note.txt").write_text("The meeting moved to Thursday.\n")
    files, memory = files_and_memory(tmp_path, shared)
    async with dispatcher(registry, files, memory) as d:
        assert str(shared) in (await d.call("list_allowed_directories", {})).text
        text = (await d.call("read_text_file", {"path": str(shared / "note.txt")})).text
        assert "Thursday" in text
        await d.call("write_file", {"path": str(shared / "reply.txt"), "content": "Noted."})
        assert (shared / "reply.txt").read_text() == "Noted."
        outside = d.submit("read_text_file", {"path": "/etc/hostname"})
        with pytest.raises(ToolCallError, match=r"outside allowed directories|Access denied"):
            await outside.wait(20)

        entity = {"name": "Ada", "entityType": "caller", "observations": ["prefers mornings"]}
        await d.call("create_entities", {"entities": [entity]})
        graph = json.loads((await d.call("read_graph", {})).text)
        assert graph["entities"][0]["name"] == "Ada"
    assert "Ada" in (tmp_path / "memory.jsonl").read_text()


# -- through a text AgentSession ---------------------------------------------------------------------------------

RULES: list[tuple[str, Callable[[re.Match[str]], tuple[str, dict[str, Any]]]]] = [
    (r"^add (\d+) and (\d+)", lambda m: ("get-sum", {"a": int(m[1]), "b": int(m[2])})),
    (r"^research (\w+)", lambda m: ("simulate-research-query", {"topic": m[1]})),
    (r"^run something long", lambda m: ("trigger-long-running-operation", {"duration": 3, "steps": 3})),
    (r"^read (\S+)", lambda m: ("read_text_file", {"path": m[1]})),
    (r"^remember (\w+)", lambda m: ("create_entities", {"entities": [{"name": m[1], "entityType": "person",
                                                                       "observations": ["called today"]}]})),
    (r"^who do you know", lambda m: ("search_nodes", {"query": "person"})),
]  # fmt: skip


def route(text: str) -> tuple[str, dict[str, Any]] | None:
    for pattern, make in RULES:
        if m := re.match(pattern, text.strip(), re.I):
            return make(m)
    return None


async def voice(registry: Registry, *cfgs: ServerConfig) -> TextCall:
    d = await started(registry, *cfgs, connect_timeout=20)
    policy = FillerPolicy.load()
    policy.threshold_s, policy.interval_s = 1.0, (6.0, 8.0)
    return await TextCall(d, ScriptedLLM(route), options=VoiceOptions(policy=policy)).start()


def answers(call: TextCall) -> list[str]:
    return [line.text for line in call.spoken("agent")]


@pytest.mark.parametrize("transport", ["stdio", "sse", "streamable-http"])
async def test_server_everything_in_a_voice_session(registry: Registry, transport: str) -> None:
    with everything(transport) as cfg:
        call = await voice(registry, cfg)
        try:
            result = await call.say("add 19 and 23")
            result.expect.next_event().is_function_call(name="get-sum")
            assert any("42" in a for a in answers(call)), call.lines

            await call.say("run something long")  # 3 s of progress: one filler line, then the answer
            assert call.spoken("filler"), call.lines
            assert any("completed" in a.lower() for a in answers(call)), call.lines

            await call.say("research volcanoes")  # a 2025-11-25 task: the report is spoken, not the task id
            started = [line.text for line in call.lines if "simulate-research-query: task job started" in line.text]
            task_id = started[0].rsplit("(", 1)[1].rstrip(")")
            spoken = answers(call)[-1]
            assert "volcanoes" in spoken.lower() and task_id not in spoken, call.lines
            assert "#" not in spoken and "**" not in spoken  # markdown made for the ear
        finally:
            await call.aclose()
            await call.toolbox.dispatcher.aclose()


async def test_filesystem_and_memory_servers_in_a_voice_session(registry: Registry, tmp_path: Path) -> None:
    (tmp_path / "agenda.txt").write_text("Standup at nine, then the budget review.\n")
    files, memory = files_and_memory(tmp_path, tmp_path)
    call = await voice(registry, files, memory)
    try:
        await call.say(f"read {tmp_path / 'agenda.txt'}")
        assert any("budget review" in a for a in answers(call)), call.lines
        await call.say("remember Grace")
        await call.say("who do you know")
        assert any("Grace" in a for a in answers(call)[-1:]), call.lines
    finally:
        await call.aclose()
        await call.toolbox.dispatcher.aclose()
    rows = await registry.recent_jobs()
    assert {r["tool"] for r in rows} == {"read_text_file", "create_entities", "search_nodes"}
    assert all(r["state"] == "completed" for r in rows)


async def test_we_say_who_we_are(tmp_path: Path) -> None:
    """clientInfo is voice-mcp with the package version (not the SDK's default), and roots are declared."""
    import sys
    import tomllib

    from conftest import SERVERS

    import mcp_integration

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert mcp_integration.__version__ == version
    record = tmp_path / "initialize.json"
    cfg = ServerConfig(
        name="loop", transport="stdio", command=sys.executable,
        args=[str(SERVERS / "serial_stdio_server.py"), "--record-initialize", str(record)],
    )  # fmt: skip
    d = Dispatcher(None)
    await d.start(servers=[cfg])
    await d.aclose()
    params = json.loads(record.read_text())
    assert params["clientInfo"] == {"name": "voice-mcp", "version": version}
    assert "roots" in params["capabilities"]
