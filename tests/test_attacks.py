"""Attacks, as issue 12 ran them: secrets planted everywhere they could hide, servers that redirect or echo our
credentials, input built to break the door, servers that try to hang or blind us, and promises tested to the
letter. Each test is one attack; its docstring says what it tries and what must hold.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import DEMO, SERVERS, started, stdio_demo
from mcp.server.mcpserver import Context, MCPServer
from servers.ws_serve import serve_websocket
from test_faults import process_state
from test_security import all_rows, every_log_record

from mcp_integration.cli import main as cli_main
from mcp_integration.dispatcher import Dispatcher
from mcp_integration.errors import RegistryError, ToolCallError
from mcp_integration.importer import parse_mcp_servers
from mcp_integration.registry import Registry, ServerConfig
from mcp_integration.web import BindingError, build_app, check_binding, listening, services

ECHO = str(SERVERS / "echo_creds_server.py")
HOSTILE = str(SERVERS / "hostile_server.py")
SERIAL = str(SERVERS / "serial_stdio_server.py")
PY = sys.executable


@pytest.fixture
def cli(pg_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.setenv("DATABASE_URL", pg_url)
    output: list[str] = []

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli_main(list(argv))
        out, err = capsys.readouterr()
        output.extend([out, err])
        return code, out, err

    run.output = output  # type: ignore[attr-defined]
    assert run("migrate")[0] == 0
    return run


# -- 1. secrets planted in every place they could leave from -------------------------------------------------------


def test_planted_secrets_never_leave_by_any_path(
    cli: Any, pg_url: str, spawn: Callable[..., int], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Secrets in headers, in the URL's userinfo, path and query (by {env:NAME} reference), and in a stdio
    server's environment; servers over HTTP, SSE, WebSocket and stdio that echo every one of them back, in their
    answers, their errors and their stderr. Then every log record (DEBUG, every library), every line the CLI
    printed, every row of every table, and the status page are searched: no planted value may appear."""
    planted = {
        "V_AUTH": "Bearer sk-PLANTED-auth-7f3a9c2e1b",
        "V_KEY": "key-PLANTED-9d8c7b6a5f4e",
        "V_PATH": "PathPLANTED7d6c5b4a3928Z",
        "V_QUERY": "qk-PLANTED-1a2b3c4d5e6f",
        "V_PASS": "pw-PLANTED-6f5e4d3c2b1a",
        "V_STDIO": "st-PLANTED-0f9e8d7c6b5a",
    }
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    needles = [v.split()[-1] for v in planted.values()]
    http_port = spawn("--transport", "http", "--port", "0", script=ECHO)
    ws_port = spawn("--transport", "websocket", "--port", "0", script=ECHO)
    auth = ["--header", "Authorization=env:V_AUTH", "--header", "X-Api-Key=env:V_KEY"]
    url = "http://ops:{env:V_PASS}@127.0.0.1:%d/s/{env:V_PATH}/%s?api_key={env:V_QUERY}"

    with every_log_record() as logs:
        assert cli("servers", "add", "h", "--url", url % (http_port, "mcp"), *auth)[0] == 0
        assert cli("servers", "add", "s", "--transport", "sse", "--url", url % (http_port, "sse"), *auth)[0] == 0
        ws_url = f"ws://127.0.0.1:{ws_port}/s/{{env:V_PATH}}/ws?api_key={{env:V_QUERY}}"
        assert cli("servers", "add", "w", "--url", ws_url, *auth)[0] == 0
        assert cli("servers", "add", "o", "--env", "API_TOKEN=env:V_STDIO", "--", PY, ECHO)[0] == 0
        assert cli("servers", "list")[0] == 0
        assert cli("servers", "list", "--json")[0] == 0
        assert cli("tools")[0] == 0
        answers = []
        for server in ("h", "s", "w", "o"):
            code, out, err = cli("call", "whoami", "--server", server)
            assert code == 0, err
            answers.append(out)
            assert cli("call", "denied", "--server", server)[0] == 1
        assert cli("jobs", "--json")[0] == 0
        assert cli("servers", "check")[0] == 0
        page = asyncio.run(_status_page(pg_url))
        rows = asyncio.run(all_rows(pg_url))

    # The secrets were really sent (the servers saw them, and said so), and really hidden.
    assert all("auth=[" in a for a in answers[:3]) and "env=[***]" in answers[3]
    assert "auth=[***] key=[***]" in answers[2] and "path=[/s/***/ws?api_key=***]" in answers[2]
    assert "{env:V_PATH}" in "\n".join(cli.output)  # `servers list` shows the reference
    places = {"logs": "\n".join(logs), "CLI": "\n".join(cli.output), "database": rows, "status page": page}
    assert "echo-creds starting with API_TOKEN=***" in places["CLI"]  # the stdio server's stderr, scrubbed
    for where, text in places.items():
        for needle in needles:
            assert needle not in text, f"a planted secret reached the {where}: {_around(text, needle)}"


async def _status_page(pg_url: str) -> str:
    registry = await Registry.open(pg_url)
    try:
        async with services(registry, check_interval_s=60) as svc:
            app = build_app(svc, token=None, bind_host="127.0.0.1")
            async with listening(app) as (url, _), httpx.AsyncClient(timeout=20) as http:
                await svc.monitor.check_now()
                return (await http.get(url)).text + (await http.get(f"{url}/metrics")).text
    finally:
        await registry.close()


def _around(text: str, needle: str) -> str:
    at = text.find(needle)
    return text[max(0, at - 120) : at + 40].replace(needle, "<SECRET>")


# -- 2. no credential follows a redirect to another origin --------------------------------------------------------


@asynccontextmanager
async def capture() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A listener on another port that records whatever reaches it: it must get nothing."""
    got: list[bytes] = []

    async def keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await reader.read(65536))
        writer.close()

    server = await asyncio.start_server(keep, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], got
    finally:
        server.close()


@asynccontextmanager
async def redirecting(to: str) -> AsyncIterator[int]:
    """Answers every request (HTTP, SSE, WebSocket handshake) with a redirect to `to`."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {to}\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@pytest.mark.parametrize("transport", ["websocket", "streamable-http", "sse"])
async def test_a_redirect_to_another_origin_is_refused_and_the_other_origin_gets_nothing(
    transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registered server redirects the connection to a listener on another port. websockets alone would
    follow and send X-Api-Key there; nothing may reach that listener, and the error says why."""
    monkeypatch.setenv("R_KEY", "rk-PLANTED-3c2b1a0f9e8d")
    scheme = "ws" if transport == "websocket" else "http"
    async with capture() as (port, got):
        async with redirecting(f"{scheme}://127.0.0.1:{port}/mcp") as redirector:
            cfg = ServerConfig(
                name="r", transport=transport, url=f"{scheme}://127.0.0.1:{redirector}/mcp",
                headers={"X-Api-Key": "env:R_KEY", "Authorization": "env:R_KEY"},
            )  # fmt: skip
            d = Dispatcher(None, connect_timeout=5)
            await d.start(servers=[cfg])
            try:
                error = d.servers["r"].error or ""
            finally:
                await d.aclose()
        await asyncio.sleep(0.2)
    # Ours (WebSocket) says "redirected to another origin (…); not followed"; the SDK's (HTTP, SSE) says
    # "Redirect to … not followed; use that URL as the endpoint if it is the intended server".
    assert re.search(r"(?i)redirect", error) and "not followed" in error, error
    assert got == [], got


async def test_a_same_origin_websocket_redirect_is_followed_with_its_headers() -> None:
    mcp = MCPServer("moved")

    @mcp.tool()
    async def header(name: str, ctx: Context) -> str:
        """One handshake header as the server saw it."""
        return (ctx.headers or {}).get(name.lower(), "")

    def moved(ws: Any, request: Any) -> Any:
        if request.path == "/old":
            response = ws.respond(HTTPStatus.FOUND, "")
            response.headers["Location"] = "/new"
            return response
        return None

    async with serve_websocket(mcp, "127.0.0.1", 0, process_request=moved) as port:
        cfg = ServerConfig(
            name="m", transport="websocket", url=f"ws://127.0.0.1:{port}/old", headers={"X-Api-Key": "k1"}
        )
        d = Dispatcher(None)
        await d.start(servers=[cfg])
        try:
            assert (await d.call("header", {"name": "X-Api-Key"}, server="m")).text == "k1"
        finally:
            await d.aclose()


# -- 3. input refused at the door, nothing written ---------------------------------------------------------------

DEEP = "[" * 60_000 + "]" * 60_000


def _file(tmp: Path, name: str, content: bytes) -> str:
    path = tmp / name
    path.write_bytes(content)
    return str(path)


def _servers(*entries: dict[str, Any]) -> bytes:
    return json.dumps({"mcpServers": {f"s{i}": e for i, e in enumerate(entries)}}).encode()


BAD_INPUT: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("space in URL", lambda t: ["servers", "add", "a", "--url", "http://a b/mcp"], "space, line break"),
    ("header injection in URL", lambda t: ["servers", "add", "a", "--url", "http://h/mcp\nX-Injected: 1"],
     "line break"),
    ("broken IPv6 URL", lambda t: ["servers", "add", "a", "--url", "http://[::1/x"], "cannot be parsed"),
    ("port out of range", lambda t: ["servers", "add", "a", "--url", "http://h:99999/mcp"], "cannot be parsed"),
    ("no host", lambda t: ["servers", "add", "a", "--url", "http:///mcp"], "names no host"),
    ("CR/LF in a header value", lambda t: ["servers", "add", "a", "--url", "http://h/mcp", "--header",
                                           "X-A=1\r\nX-Injected: 1"], "line break or control"),
    ("space in a header name", lambda t: ["servers", "add", "a", "--url", "http://h/mcp", "--header", "X A=1"],
     "not a valid HTTP header name"),
    ("env: with no name", lambda t: ["servers", "add", "a", "--url", "http://h/mcp", "--header",
                                     "Authorization=env:"], "env: must be followed"),
    ("bad {env:} in URL", lambda t: ["servers", "add", "a", "--url", "http://h/{env:1x}/mcp"], "env: must be followed"),
    ("huge timeout", lambda t: ["servers", "add", "a", "--url", "http://h/mcp", "--timeout", "3000000000"],
     "from 1 to 2147483647"),
    ("huge poll interval", lambda t: ["servers", "add", "a", "--url", "http://h/mcp", "--poll-interval",
                                      "99999999999"], "from 50 to 2147483647"),
    ("literal URL password", lambda t: ["servers", "add", "a", "--url", "https://u:hunter2@h/mcp"], "literal value"),
    ("literal API key in query", lambda t: ["servers", "add", "a", "--url", "https://h/mcp?api_key=abc123def"],
     "literal value"),
    ("key-like path segment", lambda t: ["servers", "add", "a", "--url",
                                         "https://h/api/mcp/s/ZmM4ZGI2NjItYzQ1Ni00Y2Q5LWE2/mcp"], "literal value"),
    ("NUL in an argument", lambda t: ["servers", "add", "a", "--", "npx", "a\x00b"], "NUL"),
    ("huge jobs limit", lambda t: ["jobs", "--limit", "99999999999999999999"], "--limit must be from 1"),
    ("negative call timeout", lambda t: ["call", "echo", "--timeout", "-1"], "--timeout must be a positive"),
    ("NaN call timeout", lambda t: ["call", "echo", "--timeout", "nan"], "--timeout must be a positive"),
    ("args nested 60,000 deep", lambda t: ["call", "echo", "--args", DEEP], "nests deeper than 64"),
    ("import: NUL in a command", lambda t: ["servers", "import", _file(t, "nul.json", _servers({"command": "a\x00b"}))],
     "NUL"),
    ("import: binary bytes", lambda t: ["servers", "import", _file(t, "bin.json", bytes(range(256)) * 4)],
     "not UTF-8"),
    ("import: /dev/zero", lambda t: ["servers", "import", "/dev/zero"], "larger than"),
    ("import: nested 60,000 deep", lambda t: ["servers", "import", _file(t, "deep.json", DEEP.encode())],
     "deeper than 64"),
    ("import: third entry out of range", lambda t: ["servers", "import", _file(t, "third.json", _servers(
        {"command": "a"}, {"command": "b"}, {"command": "c", "timeout": 3_000_000_000}))], "entry 's2'"),
    ("import: bad header in a file", lambda t: ["servers", "import", _file(t, "hdr.json", _servers(
        {"url": "http://h/mcp", "headers": {"X-A": "1\r\nX-B: 2"}}))], "line break"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), [(a, m) for _, a, m in BAD_INPUT], ids=[n for n, _, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_1_and_nothing_is_written(
    cli: Any, pg_url: str, tmp_path: Path, argv: Callable[[Path], list[str]], message: str
) -> None:
    before = asyncio.run(all_rows(pg_url))
    code, out, err = cli(*argv(tmp_path))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err + out
    assert asyncio.run(all_rows(pg_url)) == before


@pytest.mark.parametrize(
    "cfg",
    [
        ServerConfig(name="a", transport="streamable-http", url="http://h:0/mcp"),
        ServerConfig(name="a", transport="sse", url="http://h/mcp", headers={"X\nY": "1"}),
        ServerConfig(name="a", transport="stdio", command="x", env={"A=B": "1"}),
        ServerConfig(name="a", transport="stdio", command="x", timeout_ms=2**31),
        ServerConfig(name="a", transport="stdio", command="x", args=["ok", "\x00"]),
        ServerConfig(name="a", transport="websocket", url="ws://h/{env:}"),
    ],
)
async def test_the_registry_api_refuses_the_same_input(registry: Registry, cfg: ServerConfig) -> None:
    with pytest.raises(RegistryError):
        await registry.add_server(cfg)
    assert await registry.list_servers() == []


async def test_an_import_is_one_transaction_and_its_checks_are_linear(registry: Registry) -> None:
    """Three servers whose third breaks a database rule: none is stored. 80,000 entries are checked in seconds
    (the duplicate-name check was quadratic: 62 s)."""
    good = [ServerConfig(name=f"ok{i}", transport="stdio", command="x") for i in range(2)]
    await registry.add_server(ServerConfig(name="taken", transport="stdio", command="x"))
    with pytest.raises(RegistryError, match="already exists"):
        await registry.add_servers([*good, ServerConfig(name="taken", transport="stdio", command="y")])
    assert [s.name for s in await registry.list_servers()] == ["taken"]

    many = json.dumps({"mcpServers": {f"s{i}": {"command": "npx", "args": ["-y", "x"]} for i in range(80_000)}})
    started_at = time.monotonic()
    assert len(parse_mcp_servers(many)) == 80_000
    assert time.monotonic() - started_at < 30  # generous: about 2 s here


# -- 4. servers that try to hang or blind us -------------------------------------------------------------------


def test_an_endless_tool_list_does_not_hang_the_cli_or_the_other_servers(cli: Any) -> None:
    """tools/list answers with one more page forever: discovery stops at the page cap with a warning naming the
    server; the other server's tools are listed and callable."""
    assert cli("servers", "add", "endless", "--", PY, HOSTILE, "--endless-tools")[0] == 0
    assert cli("servers", "add", "demo", "--", PY, DEMO)[0] == 0
    started_at = time.monotonic()
    code, out, err = cli("tools", "--json")
    assert code == 0, err
    assert time.monotonic() - started_at < 60
    names = {(t["server"], t["tool"]) for t in json.loads(out)}
    assert ("demo", "echo") in names and ("endless", "page_0") in names
    assert len([n for n in names if n[0] == "endless"]) <= 110
    assert cli("call", "echo", "--server", "demo", "--args", '{"text": "still here"}')[1] == "echo: still here\n"


async def test_a_bad_or_repeated_tool_is_skipped_and_the_rest_is_cached(registry: Registry) -> None:
    d = await started(registry, ServerConfig(name="h", transport="stdio", command=PY, args=[HOSTILE]))
    try:
        listing = {
            "tools": [
                {"name": "a", "description": "holds a \x00 NUL", "inputSchema": {"type": "object"}},
                {"name": "a", "description": "the same name again", "inputSchema": {"type": "object"}},
                {"name": "b", "description": "fine", "inputSchema": {"type": "object", "title": "x\x00y"}},
            ]
        }
        b64 = base64.b64encode(json.dumps(listing).encode()).decode()
        await d.call("set_tools", {"b64": b64})
        assert (await d.refresh(["h"]))["h"] is None
        await asyncio.gather(*d._writes)  # the cache write runs beside discovery
        cached = (await registry.cached_tools())["h"]
        assert [t.name for t in cached] == ["a", "b"]
        assert cached[0].description == "holds a \ufffd NUL" and cached[1].input_schema["title"] == "x\ufffdy"
    finally:
        await d.aclose()


async def test_time_queued_behind_other_calls_is_not_server_silence(registry: Registry) -> None:
    """Twelve 1 s calls to a server allowed three at a time, with a 1.5 s idle timeout: the last ones wait about
    3 s for a slot, which is not the server being silent. All complete."""
    cfg = stdio_demo("busy")
    cfg.timeout_ms = 1500
    await registry.add_server(cfg)
    d = Dispatcher(registry, max_calls_per_server=3)
    await d.start()
    try:
        jobs = [d.submit("slow", {"seconds": 1, "steps": 1}) for _ in range(12)]
        results = await asyncio.gather(*(job.wait() for job in jobs))
        assert all(r.text == "done after 1s" for r in results)
        assert sum(any(e.kind == "queued" for e in job.events) for job in jobs) >= 6
    finally:
        await d.aclose()


async def test_a_stdio_server_that_forks_leaves_nothing_running(tmp_path: Path) -> None:
    child = tmp_path / "child.pid"
    cfg = ServerConfig(name="f", transport="stdio", command=PY, args=[SERIAL, "--fork-child", str(child)])
    d = Dispatcher(None)
    await d.start(servers=[cfg])
    try:
        assert (await d.call("echo", {"text": "x"})).text == "echo: x"
        deadline = time.monotonic() + 10
        while not child.exists() or not child.read_text():
            assert time.monotonic() < deadline, "the child never started"
            await asyncio.sleep(0.05)
        pid = int(child.read_text())
        assert process_state(pid) not in (None, "Z")
    finally:
        await d.aclose()
    deadline = time.monotonic() + 10
    while process_state(pid) not in (None, "Z"):
        assert time.monotonic() < deadline, f"the server's child {pid} outlived it"
        await asyncio.sleep(0.05)


async def test_a_websocket_message_over_our_limit_is_reported_as_such(spawn: Callable[..., int]) -> None:
    port = spawn("--transport", "websocket", "--port", "0", script=HOSTILE)
    d = Dispatcher(None)
    await d.start(servers=[ServerConfig(name="big", transport="websocket", url=f"ws://127.0.0.1:{port}/")])
    try:
        with pytest.raises(ToolCallError) as info:
            await d.call("big", {"chars": 17 * 2**20, "kind": "text"}, timeout=60)
        assert "larger than our limit of 16 MiB" in info.value.reason, info.value.reason
    finally:
        await d.aclose()


def test_terminal_control_sequences_never_reach_the_terminal(cli: Any) -> None:
    assert cli("servers", "add", "demo", "--", PY, DEMO)[0] == 0
    evil = "\x1b]0;pwned\x07hello\x1b[2J\x9b31mworld\x1bc"
    code, out, _ = cli("call", "echo", "--args", json.dumps({"text": evil}))
    assert code == 0 and out == "echo: helloworld\n", repr(out)
    code, out, _ = cli("call", "echo", "--raw", "--args", json.dumps({"text": evil}))
    assert code == 0 and not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", out), repr(out)


# -- 5. promises kept to the letter ----------------------------------------------------------------------------


async def test_a_cancelled_call_is_always_cancelled(registry: Registry) -> None:
    """Three hundred calls, each cancelled at a random moment while it runs (some just as the answer lands):
    every cancel that reached a running call ends it with CancelledError, none returns a result."""
    d = await started(registry, stdio_demo("c"))
    rng = random.Random(12)
    swallowed = cancelled = 0
    try:
        for _ in range(30):
            tasks = [asyncio.ensure_future(_one_call(d, rng)) for _ in range(10)]
            await asyncio.sleep(rng.uniform(0.0, 0.03))
            asked = [t for t in tasks if not t.done() and t.cancel()]
            for task in asked:
                try:
                    await task
                    swallowed += 1
                except asyncio.CancelledError:
                    cancelled += 1
                except ToolCallError:
                    pass
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await d.aclose()
    assert swallowed == 0 and cancelled >= 100, (swallowed, cancelled)


async def _one_call(d: Dispatcher, rng: random.Random) -> Any:
    if rng.random() < 0.5:
        return await d.call("slow", {"seconds": rng.uniform(0.001, 0.02), "steps": 1}, timeout=10)
    return await d.call("echo", {"text": "x"}, timeout=10)


def test_the_status_page_refuses_plain_tokens() -> None:
    for token in (" " * 16, "a" * 16, "ab" * 8, "abcdefabcdefabcd"):
        with pytest.raises(BindingError):
            check_binding("0.0.0.0", token)
    check_binding("0.0.0.0", "d41d8cd98f00b204e9800998ecf8427e")  # what `openssl rand -hex 16` gives


async def test_the_status_page_refuses_empty_and_malformed_hosts(registry: Registry) -> None:
    async with services(registry, check_interval_s=60) as svc:
        app = build_app(svc, token=None, bind_host="127.0.0.1")
        async with listening(app) as (url, _):
            port = int(url.rsplit(":", 1)[1])
            assert (await _raw_get(port, "Host: 127.0.0.1\r\n")).startswith("HTTP/1.1 200")
            for host in ("Host: \r\n", "Host: a b\r\n", "Host: 127.0.0.1:80:80\r\n", "Host: [::1\r\n"):
                answer = await _raw_get(port, host)
                assert answer.split(" ", 2)[1] in ("400", "403"), (host, answer[:80])
            assert (await _raw_get(port, "", version="1.0")).split(" ", 2)[1] == "400"  # no Host at all


async def _raw_get(port: int, host_line: str, version: str = "1.1") -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /healthz HTTP/{version}\r\n{host_line}Connection: close\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    return data.decode("latin-1")
