"""Remembered protocols against real servers and the real registry: what a server negotiated is reused by the next
connect (in this process and, through PostgreSQL, in the next), and forgotten when the server has changed.

The servers log every HTTP request they get (`demo_server.py --method-log`), so "no `server/discover`" and "no
handshake" are counted where they would be sent, not inferred from our side.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SERVERS
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED, INTERNAL_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND
from pydantic import BaseModel, ValidationError

from mcp_integration.config import Settings
from mcp_integration.connection import ServerConnection
from mcp_integration.dispatcher import Dispatcher
from mcp_integration.errors import Reconnecting
from mcp_integration.health import Health
from mcp_integration.mcp_compat import send_raw_request
from mcp_integration.protocol_memory import MAX_TTL_S, KnownProtocol, could_be_mismatch, fingerprint
from mcp_integration.registry import Registry, ServerConfig
from mcp_integration.runtime import start_from_registry_or_snapshot
from mcp_integration.snapshot import read_snapshot, write_snapshot
from mcp_integration.tasks import TaskHandle

FORGOTTEN = "did not work now"  # what the one INFO line says when a remembered protocol is dropped


class Server:
    """A demo server over Streamable HTTP whose requests are logged, restartable on its port in another era."""

    def __init__(self, spawn: Callable[..., int], log: Path) -> None:
        self.spawn = spawn
        self.log = log
        self.port = 0

    def start(self, *flags: str) -> ServerConfig:
        # A server that lets clients reuse its DiscoverResult for an hour, unless the flags say otherwise.
        ttl = () if any(f.startswith("--discover-ttl-ms") for f in flags) else ("--discover-ttl-ms", "3600000")
        self.port = self.spawn(
            "--transport", "streamable-http", "--port", str(self.port), "--method-log", str(self.log), *ttl, *flags
        )
        return ServerConfig(name="demo", transport="streamable-http", url=f"http://127.0.0.1:{self.port}/mcp")

    def restart(self, *flags: str) -> ServerConfig:
        """The same URL, a new process (an upgrade or a downgrade in place)."""
        proc = self.spawn.procs[-1]  # type: ignore[attr-defined]
        proc.kill()
        proc.wait(5)
        return self.start(*flags)

    def methods(self) -> list[str]:
        """The requests logged since the last call ("POST tools/list", "GET", ...)."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        self.log.write_text("")
        return lines


@pytest.fixture
def server(spawn: Callable[..., int], tmp_path: Path) -> Server:
    return Server(spawn, tmp_path / "methods.log")


async def discovered(registry: Registry) -> Dispatcher:
    """A new dispatcher (as a new session or process gets), started and discovered without error; its background
    writes (the protocol learned) are awaited by `aclose`."""
    d = Dispatcher(registry, connect_timeout=15)
    await d.start(wait=True)
    errors = {n: s.error for n, s in d.servers.items() if s.error}
    assert not errors, errors
    return d


async def session(registry: Registry) -> tuple[bool, list[str]]:
    """One fresh session start: whether its connect used a remembered protocol, and its tool names."""
    d = await discovered(registry)
    try:
        return d.servers["demo"].conn.remembered, sorted(t.name for t in d.tools)
    finally:
        await d.aclose()


async def stored(registry: Registry) -> KnownProtocol:
    protocols = await registry.known_protocols()
    assert set(protocols) == {"demo"}
    return protocols["demo"]


# -- a handshake-era server ------------------------------------------------------------------------------------


async def test_a_legacy_server_is_probed_once_then_never_again(registry: Registry, server: Server) -> None:
    cfg = await registry.add_server(server.start("--legacy"))
    d = await discovered(registry)
    try:
        first = server.methods()
        assert first[:2] == ["POST server/discover", "POST initialize"]  # probed, refused, handshake
        assert not d.servers["demo"].conn.remembered

        # A reconnect in the same process: the handshake, but no probe.
        d.servers["demo"].conn.drop("test: reconnect")
        assert (await d.refresh())["demo"] is None
        again = server.methods()
        assert "POST server/discover" not in again and "POST initialize" in again
        assert d.servers["demo"].conn.remembered
    finally:
        await d.aclose()

    memory = await stored(registry)
    assert (memory.era, memory.protocol_version, memory.discover) == ("legacy", "2025-11-25", None)
    assert memory.fingerprint == fingerprint(cfg)

    # A new session (a new dispatcher, as in a new process): remembered through the registry.
    remembered, tools = await session(registry)
    assert remembered and "echo" in tools
    log = server.methods()
    assert "POST server/discover" not in log and log.count("POST initialize") == 1


async def test_the_memory_is_written_only_when_it_changes(registry: Registry, server: Server) -> None:
    await registry.add_server(server.start("--legacy"))
    await session(registry)
    first = await seen_at(registry)
    await session(registry)
    await session(registry)
    assert await seen_at(registry) == first  # the same protocol again: no write


async def seen_at(registry: Registry) -> object:
    async with registry.pool.connection() as conn:
        row = await (await conn.execute("SELECT seen_at FROM mcp_server_protocol")).fetchone()
    assert row is not None
    return row["seen_at"]


# -- a 2026-07-28 server ----------------------------------------------------------------------------------------


async def test_a_modern_server_is_adopted_with_no_handshake_round_trip(registry: Registry, server: Server) -> None:
    await registry.add_server(server.start())
    remembered, _ = await session(registry)
    assert not remembered
    assert server.methods()[:2] == ["POST server/discover", "POST tools/list"]
    memory = await stored(registry)
    assert memory.era == "modern" and memory.protocol_version == "2026-07-28"
    assert memory.discover is not None and "2026-07-28" in memory.discover["supportedVersions"]

    d = await discovered(registry)
    try:
        conn = d.servers["demo"].conn
        assert conn.remembered
        assert server.methods() == ["POST tools/list"]  # the discovery itself, and nothing before it
        assert conn.client.session.discover_result is not None
        assert conn.client.session.discover_result.model_dump(mode="json", by_alias=True) == memory.discover
        assert (await d.call("echo", {"text": "hi"})).text == "echo: hi"
    finally:
        await d.aclose()


async def test_an_adopted_session_keeps_the_servers_extensions(registry: Registry, spawn: Callable[..., int]) -> None:
    # The stored DiscoverResult carries the capabilities the tasks runtime reads (the 2026 tasks extension). The
    # server lets clients reuse its results for an hour (FastMCP's cache_ttl).
    port = spawn(
        "--transport",
        "streamable-http",
        "--port",
        "0",
        "--cache-ttl-s",
        "3600",
        script=str(SERVERS / "task_server_2026.py"),
    )
    await registry.add_server(
        ServerConfig(name="tasks", transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp")
    )
    await (await discovered(registry)).aclose()
    d = await discovered(registry)
    try:
        conn = d.servers["tasks"].conn
        assert conn.remembered
        extensions = conn.client.session.server_capabilities.extensions or {}
        assert "io.modelcontextprotocol/tasks" in extensions
        job = d.submit("report", {"seconds": 0.3})
        assert (await job.wait(15)).text == "report ready after 0.3s"
        assert job.kind == "task"
    finally:
        await d.aclose()


async def test_a_discover_result_is_reused_only_within_its_ttl(registry: Registry, server: Server) -> None:
    """A DiscoverResult is a cacheable result: its ttlMs (0 by the SDK's default) says how long a client may
    reuse it. Stale, it is asked again (one `server/discover`, no handshake fallback), and the new answer is
    stored with its own time, so the session after that adopts it again."""
    await registry.add_server(server.start("--discover-ttl-ms", "0"))
    for _ in range(2):  # never reusable: every session asks
        remembered, tools = await session(registry)
        assert not remembered and "echo" in tools
        assert server.methods()[:2] == ["POST server/discover", "POST tools/list"]
    assert not (await stored(registry)).fresh()

    # 5 s: long enough for the next session to start within it on a machine busy with other tests.
    server.restart("--discover-ttl-ms", "5000")
    await session(registry)  # learns the 5 s one
    server.methods()
    first = await stored(registry)
    assert first.fresh() and first.discover is not None and first.discover["ttlMs"] == 5000
    assert first.seen_at is not None
    remembered, _ = await session(registry)
    assert remembered and server.methods() == ["POST tools/list"]  # adopted: no round trip before discovery
    assert (await stored(registry)).seen_at == first.seen_at  # adopting is not learning: the clock keeps running

    await asyncio.sleep(max(0.0, first.seen_at + 5.0 - time.time()) + 0.2)
    assert not (await stored(registry)).fresh()
    remembered, _ = await session(registry)
    assert not remembered and server.methods()[:2] == ["POST server/discover", "POST tools/list"]
    again = await stored(registry)
    assert again.fresh() and again.seen_at is not None and again.seen_at > first.seen_at
    remembered, _ = await session(registry)
    assert remembered and server.methods() == ["POST tools/list"]


def test_freshness_follows_ttl_and_caps_it() -> None:
    discover = {"supportedVersions": ["2026-07-28"], "ttlMs": 60_000}
    now = 1_000_000.0
    assert KnownProtocol("f", "modern", "2026-07-28", discover, now).fresh(now + 59)
    assert not KnownProtocol("f", "modern", "2026-07-28", discover, now).fresh(now + 61)
    assert not KnownProtocol("f", "modern", "2026-07-28", discover).fresh(now)  # learned when: unknown
    year = {**discover, "ttlMs": 365 * 24 * 3600 * 1000}
    assert not KnownProtocol("f", "modern", "2026-07-28", year, now).fresh(now + MAX_TTL_S + 1)
    for odd in (0, -5, "60000", True, None):
        assert not KnownProtocol("f", "modern", "2026-07-28", {**discover, "ttlMs": odd}, now).fresh(now)
    assert KnownProtocol("f", "legacy", "2025-11-25").fresh()  # nothing to expire: initialize still runs
    # The time is not part of what was learned: the same answer learned later is the same memory.
    assert KnownProtocol("f", "modern", "2026-07-28", discover, now) == KnownProtocol(
        "f", "modern", "2026-07-28", discover, now + 5
    )
    assert KnownProtocol.from_json(KnownProtocol("f", "modern", "2026-07-28", discover, now).to_json()) is not None
    assert KnownProtocol.from_json({**KnownProtocol("f", "legacy", "2025-11-25").to_json(), "seen_at": "x"}) == (
        KnownProtocol("f", "legacy", "2025-11-25")
    )


# -- a server that changed protocol in place -------------------------------------------------------------------


async def test_remembered_legacy_for_a_server_now_modern_only(
    registry: Registry, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    await registry.add_server(server.start("--legacy-only"))
    await session(registry)
    assert (await stored(registry)).era == "legacy"

    server.restart("--modern-only")
    server.methods()
    caplog.set_level(logging.INFO, logger="mcp_integration.connection")
    remembered, tools = await session(registry)  # no error: forgotten, negotiated afresh at once
    assert not remembered and "echo" in tools
    assert server.methods()[:3] == ["POST initialize", "POST server/discover", "POST tools/list"]
    assert sum(FORGOTTEN in m for m in caplog.messages) == 1
    assert (await stored(registry)).era == "modern"

    caplog.clear()
    remembered, _ = await session(registry)
    assert remembered and server.methods() == ["POST tools/list"]
    assert not any(FORGOTTEN in m for m in caplog.messages)


async def test_remembered_modern_for_a_server_now_legacy(
    registry: Registry, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    await registry.add_server(server.start())
    await session(registry)
    assert (await stored(registry)).era == "modern"

    server.restart("--legacy-only")
    server.methods()
    caplog.set_level(logging.INFO, logger="mcp_integration.connection")
    remembered, tools = await session(registry)
    assert not remembered and "echo" in tools
    log = server.methods()
    # The adopted session's first request is refused; then the probe (refused too) and the handshake.
    assert log[:3] == ["POST tools/list", "POST server/discover", "POST initialize"]
    assert sum(FORGOTTEN in m for m in caplog.messages) == 1
    memory = await stored(registry)
    assert (memory.era, memory.discover) == ("legacy", None)


async def test_a_reconnect_negotiates_again(registry: Registry, server: Server) -> None:
    # A reopening follows a loss: the server went away and may be back changed, so a modern memory is not adopted
    # blind; the negotiation finds the change before the call is sent.
    await registry.add_server(server.start())
    d = await discovered(registry)
    try:
        server.restart("--legacy-only")
        d.servers["demo"].conn.drop("test: the server restarted")
        server.methods()
        assert (await d.call("echo", {"text": "again"})).text == "echo: again"
        log = server.methods()
        assert log[:2] == ["POST server/discover", "POST initialize"] and log.count("POST tools/call") == 1
    finally:
        await d.aclose()
    assert (await stored(registry)).era == "legacy"


async def test_a_call_refused_on_an_adopted_session_may_be_sent_again(registry: Registry, server: Server) -> None:
    # The first request of an adopted session is a call (no discovery before it): refused before it ran, by a
    # server that is no longer 2026-07-28, it is the dispatcher's cue to send it once more on a fresh negotiation.
    cfg = server.start()
    await registry.add_server(cfg)
    await session(registry)
    memory = await stored(registry)
    cfg = server.restart("--legacy-only")
    server.methods()
    conn = ServerConnection(cfg, known=memory)
    try:
        await conn.open()
        assert conn.remembered and server.methods() == []  # adopted: nothing sent
        generation = conn.generation
        with pytest.raises(MCPError) as refused:
            await conn.tasks.call_tool("echo", {"text": "x"}, tool_meta=None)
        assert refused.value.error.code == INVALID_REQUEST
        assert conn.forget_if_mismatch(refused.value, generation=generation, acted_on=True)
        assert conn.known is None and not conn.is_open
        await conn.open()
        result = await conn.tasks.call_tool("echo", {"text": "x"}, tool_meta=None)
        assert not isinstance(result, TaskHandle) and result.content[0].text == "echo: x"  # type: ignore[union-attr]
        assert conn.known is not None and conn.known.era == "legacy"
    finally:
        await conn.close()
    log = server.methods()
    assert log[0] == "POST tools/call" and "POST initialize" in log and log.count("POST tools/call") == 2


async def test_a_failed_health_ping_on_an_adopted_session_forgets(registry: Registry, server: Server) -> None:
    # On 2026-07-28 the health check's ping is a tools/list: the same first request, the same evidence.
    await registry.add_server(server.start())
    await session(registry)
    memory = await stored(registry)
    conn = ServerConnection(server.restart("--legacy-only"), known=memory)
    try:
        await conn.open()
        with pytest.raises(MCPError):
            await conn.ping()
        assert conn.known is None and not conn.is_open
        await conn.open()
        assert await conn.ping() > 0 and conn.known is not None and conn.known.era == "legacy"
    finally:
        await conn.close()


async def test_an_answered_session_does_not_forget(registry: Registry, server: Server) -> None:
    # Once the server has answered a request of the session, the protocol fits: a later error is the server's
    # own (here an unknown method), not a reason to forget.
    cfg = await registry.add_server(server.start())
    await session(registry)
    conn = ServerConnection(cfg, known=await stored(registry))
    try:
        await conn.open()
        generation = conn.generation
        await conn.list_tools()
        with pytest.raises(MCPError) as unknown:
            await send_raw_request(conn.client.session, "no/such/method", {})
        assert not conn.forget_if_mismatch(unknown.value, generation=generation)
        assert conn.known is not None and conn.is_open
    finally:
        await conn.close()


async def test_an_unreachable_server_keeps_its_memory(registry: Registry, server: Server) -> None:
    cfg = await registry.add_server(server.start())
    await session(registry)
    proc = server.spawn.procs[-1]  # type: ignore[attr-defined]
    proc.kill()
    proc.wait(5)
    d = Dispatcher(registry, connect_timeout=5)
    try:
        await d.start(wait=True)
        error = d.servers["demo"].error
        # The adopted session's first contact failed; the reopening negotiated, and failed as a connect does.
        assert error is not None and "tools/list failed" not in error, error
        assert d.servers["demo"].conn.known is not None  # a refused connection says nothing of the protocol
        with pytest.raises(Reconnecting):
            await d.servers["demo"].conn.open()  # and the usual backoff holds
    finally:
        await d.aclose()
    assert (await stored(registry)).fingerprint == fingerprint(cfg)


# -- a registry row that moved ----------------------------------------------------------------------------------


async def test_the_memory_is_ignored_when_the_servers_url_changes(
    registry: Registry, server: Server, spawn: Callable[..., int], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = await registry.add_server(server.start())
    await session(registry)
    assert (await stored(registry)).fingerprint == fingerprint(old)

    elsewhere = Server(spawn, tmp_path / "elsewhere.log")
    moved = elsewhere.start("--legacy-only")
    new = await registry.add_server(moved, replace=True)
    assert fingerprint(new) != fingerprint(old)
    caplog.set_level(logging.INFO, logger="mcp_integration.connection")
    remembered, tools = await session(registry)
    assert not remembered and "echo" in tools
    # Negotiated from scratch: the old memory was not even tried (no failed adopt, nothing forgotten).
    assert elsewhere.methods()[:2] == ["POST server/discover", "POST initialize"]
    assert not any(FORGOTTEN in m for m in caplog.messages)
    memory = await stored(registry)
    assert (memory.era, memory.fingerprint) == ("legacy", fingerprint(new))


# -- where the memory travels -----------------------------------------------------------------------------------


async def test_a_session_start_reads_tools_and_protocols_in_one_query(registry: Registry, server: Server) -> None:
    await registry.add_server(server.start())
    await session(registry)
    tools, protocols, _ = await registry.start_cache()
    assert tools == await registry.cached_tools()
    assert protocols == await registry.known_protocols()

    d = Dispatcher(registry)
    try:
        await d.start(wait=False)  # the worker's way: the index from the cache, discovery behind it
        assert d.servers["demo"].from_cache
        await d.refreshed()
        assert d.servers["demo"].conn.remembered and d.servers["demo"].error is None
    finally:
        await d.aclose()


async def test_a_worker_session_starts_from_the_registry_with_its_memory(
    registry: Registry, server: Server, tmp_path: Path
) -> None:
    # The voice worker's start (runtime.py): servers, tool cache and protocols loaded, the snapshot written.
    await registry.add_server(server.start())
    await session(registry)
    server.methods()
    path = tmp_path / "snapshot.json"
    d = Dispatcher(registry, connect_timeout=15)
    try:
        start = await start_from_registry_or_snapshot(d, Health(d), path, Settings(db_start_timeout_s=3))
        assert start.source == "database" and start.saved is not None
        await d.refreshed()
        assert d.servers["demo"].conn.remembered and d.servers["demo"].error is None
        assert server.methods() == ["POST tools/list"]
        assert await start.saved
    finally:
        await d.aclose()
    snap = read_snapshot(path)
    assert snap is not None and snap.protocols == await registry.known_protocols()


async def test_the_snapshot_carries_the_protocols(registry: Registry, server: Server, tmp_path: Path) -> None:
    cfg = await registry.add_server(server.start())
    await session(registry)
    servers = await registry.list_servers(enabled_only=True)
    tools, protocols, _ = await registry.start_cache()
    path = tmp_path / "snapshot.json"
    write_snapshot(path, servers, tools, protocols)
    snap = read_snapshot(path)
    assert snap is not None and snap.protocols == protocols

    # Started from the snapshot (the database unreachable): the memory is used all the same.
    server.methods()
    d = Dispatcher(registry, connect_timeout=15)
    try:
        await d.start(wait=False, servers=snap.servers, cached=snap.tools, protocols=snap.protocols)
        await d.refreshed()
        assert d.servers[cfg.name].conn.remembered
        assert server.methods() == ["POST tools/list"]
    finally:
        await d.aclose()

    # A snapshot written before protocols were remembered still reads.
    write_snapshot(path, servers, tools)
    old = read_snapshot(path)
    assert old is not None and old.protocols == {}


async def test_an_unchanged_tool_list_is_marked_fresh_not_rewritten(registry: Registry, server: Server) -> None:
    cfg = await registry.add_server(server.start())
    async with registry.pool.connection() as conn:
        # Counts the rows each discovery inserts into the tool cache (an UPDATE inserts none).
        await conn.execute(
            "CREATE TABLE inserted (n int);"
            " CREATE FUNCTION count_insert() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN INSERT INTO inserted VALUES (1); RETURN NULL; END; $$;"
            " CREATE TRIGGER counted AFTER INSERT ON mcp_tools FOR EACH ROW EXECUTE FUNCTION count_insert()"
        )
    await session(registry)
    first = await cache_state(registry)
    assert first[0] == 5
    await session(registry)
    again = await cache_state(registry)
    assert again[0] == 5  # nothing rewritten ...
    assert again[1] > first[1]  # ... but marked fresh

    # A cache that no longer matches the server is rewritten by the next discovery.
    assert cfg.id is not None
    await registry.save_tools(cfg.id, [])
    await session(registry)
    assert (await cache_state(registry))[0] == 10
    assert len((await registry.cached_tools())["demo"]) == 5


async def cache_state(registry: Registry) -> tuple[int, object]:
    """Rows inserted into the cache so far, and when it was last marked fresh."""
    async with registry.pool.connection() as conn:
        row = await (
            await conn.execute(
                "SELECT (SELECT count(*) FROM inserted) AS n, (SELECT max(discovered_at) FROM mcp_tools) AS at"
            )
        ).fetchone()
    assert row is not None
    return row["n"], row["at"]


# -- which failures may mean the protocol changed ---------------------------------------------------------------


def mcp_error(code: int, message: str = "no") -> MCPError:
    return MCPError(code, message)


class _Shape(BaseModel):
    n: int


def validation_error() -> ValidationError:
    try:
        _Shape.model_validate({"n": "x"})
    except ValidationError as exc:
        return exc
    raise AssertionError("not reached")


def test_which_failures_could_be_a_protocol_mismatch() -> None:
    # Answers the server gave: any error, or one we cannot read.
    assert could_be_mismatch(mcp_error(METHOD_NOT_FOUND))
    assert could_be_mismatch(mcp_error(-32022))
    assert could_be_mismatch(mcp_error(INVALID_REQUEST, "Bad Request: Missing session ID"))
    assert could_be_mismatch(validation_error())
    assert could_be_mismatch(RuntimeError("Unsupported protocol version from the server: 2026-07-28"))
    assert could_be_mismatch(ExceptionGroup("task group", [mcp_error(METHOD_NOT_FOUND)]))
    # No answer: unreachable, refused, slow, or gone.
    assert not could_be_mismatch(ConnectionRefusedError(111, "Connection refused"))
    assert not could_be_mismatch(TimeoutError())
    assert not could_be_mismatch(mcp_error(CONNECTION_CLOSED, "Connection closed"))
    assert not could_be_mismatch(ExceptionGroup("task group", [OSError("reset"), mcp_error(METHOD_NOT_FOUND)]))
    # After a request with side effects, only errors a server gives before acting.
    assert could_be_mismatch(mcp_error(INVALID_REQUEST), acted_on=True)
    assert not could_be_mismatch(mcp_error(INTERNAL_ERROR), acted_on=True)
    assert not could_be_mismatch(validation_error(), acted_on=True)


def test_a_memory_this_sdk_cannot_use_negotiates() -> None:
    assert KnownProtocol("f", "legacy", "2025-11-25").client_mode() == ("legacy", None)
    assert KnownProtocol("f", "legacy", "1999-01-01").client_mode() == ("auto", None)
    assert KnownProtocol("f", "modern", "2099-01-01", {"supportedVersions": ["2099-01-01"]}).client_mode() == (
        "auto",
        None,
    )
    assert KnownProtocol("f", "modern", "2026-07-28", {"capabilities": "not an object"}).client_mode() == ("auto", None)
    assert KnownProtocol.from_json({"era": "medieval", "protocol_version": "x", "fingerprint": "f"}) is None


# -- a tool list the server lets clients reuse -------------------------------------------------------------------


async def test_a_tool_list_within_its_ttl_is_taken_without_asking(
    registry: Registry, server: Server, tmp_path: Path
) -> None:
    """A 2026-07-28 server may say how long its tools/list answer holds (`ttlMs`; here the SDK server's
    `cache_hints`). With its DiscoverResult remembered as well, a session start sends it nothing at all, and the
    session still knows each tool's output schema (no tools/list before the first call's answer)."""
    await met_once(registry, server, "--tools-ttl-ms", "3600000")

    d = await discovered(registry)
    try:
        state = d.servers["demo"]
        assert server.methods() == []  # no request at all
        assert not state.from_cache and state.error is None and state.conn.remembered
        assert "echo" in [t.name for t in d.tools]
        assert (await d.call("echo", {"text": "hi"})).text == "echo: hi"
        assert server.methods() == ["POST tools/call"]
    finally:
        await d.aclose()

    # The worker's start (runtime.py: the cache read once, discovery behind the greeting) asks nothing either.
    d = Dispatcher(registry, connect_timeout=15)
    try:
        start = await start_from_registry_or_snapshot(d, Health(d), tmp_path / "s.json", Settings())
        assert start.source == "database"
        await d.refreshed()
        assert server.methods() == [] and not d.servers["demo"].from_cache
        # A refresh (the registry changed, a person asked) always asks the server.
        assert (await d.refresh())["demo"] is None
        assert server.methods() == ["POST tools/list"]
    finally:
        await d.aclose()


async def test_a_tool_list_is_asked_again_once_its_ttl_is_over_or_its_server_is_edited(
    registry: Registry, server: Server
) -> None:
    cfg = await met_once(registry, server, "--tools-ttl-ms", "1500")
    await session(registry)
    assert server.methods() == []  # within the 1.5 s

    await asyncio.sleep(1.6)
    await asked_then_reused(registry, server)  # over: asked, and the new answer kept

    # An edit of the server's row (here its timeout; its URL or allowed tools alike) makes the list unfit to reuse.
    await registry.add_server(dataclasses.replace(cfg, timeout_ms=cfg.timeout_ms + 1), replace=True)
    await asked_then_reused(registry, server)


async def asked_then_reused(registry: Registry, server: Server) -> None:
    """Two session starts: the first asks the server for its tools (and keeps the answer), the second does not."""
    await session(registry)
    assert server.methods() == ["POST tools/list"]
    await session(registry)
    assert server.methods() == []


async def test_a_tool_list_of_a_server_that_gives_no_ttl_is_asked_at_every_start(
    registry: Registry, server: Server
) -> None:
    # The SDK server's default (ttlMs 0): the control for the two tests above.
    await met_once(registry, server)
    for _ in range(2):
        await session(registry)
        assert server.methods() == ["POST tools/list"]
    async with registry.pool.connection() as conn:
        assert (await (await conn.execute("SELECT count(*) AS n FROM mcp_tool_lists")).fetchone())["n"] == 0


async def test_a_stored_tool_list_is_dropped_once_the_server_answers_without_a_ttl(
    registry: Registry, server: Server
) -> None:
    cfg = await met_once(registry, server, "--tools-ttl-ms", "3600000")
    server.restart()  # the same URL, a new version of the server: it no longer lets its list be reused
    d = await discovered(registry)
    try:
        assert server.methods() == []  # the stored answer still holds for the start ...
        assert (await d.refresh())["demo"] is None  # ... but a refresh asks, and gets one with no ttlMs
        assert server.methods() == ["POST tools/list"]
    finally:
        await d.aclose()
    assert cfg.id is not None and cfg.name not in (await registry.start_cache()).lists
    await session(registry)
    assert server.methods() == ["POST tools/list"]


async def test_a_tool_list_of_several_pages_is_asked_whole_at_every_start(registry: Registry, server: Server) -> None:
    """The SDK's response cache keeps a list's first page only (a continuation page is never cached), so a kept
    first page would send its stored cursor to the server at the next start: one it may no longer know (this
    server's cursors name the process that made them, as a server keeping listings in memory does); its refusal
    was taken for a changed protocol, so the memory went too. A list of several pages is therefore not kept,
    even with a ttlMs, and each start asks for every page, on its remembered protocol."""
    flags = ("--tools-ttl-ms", "3600000", "--tools-page-size", "2")
    await met_once(registry, server, *flags)
    assert "demo" not in (await registry.start_cache()).lists
    server.restart(*flags)
    for _ in range(2):
        remembered, names = await session(registry)
        assert remembered and names == ["add", "echo", "fail", "lookup_weather", "slow"]
        assert server.methods() == ["POST tools/list"] * 3


async def met_once(registry: Registry, server: Server, *flags: str) -> ServerConfig:
    """The server started with these flags, added, and met by one session (which asked it for its tools)."""
    cfg = await registry.add_server(server.start(*flags))
    await session(registry)
    assert "POST tools/list" in server.methods()
    return cfg
