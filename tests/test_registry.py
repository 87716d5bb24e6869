"""The registry against a real PostgreSQL: migrations, constraints, servers, tool cache, health, jobs."""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest

from mcp_integration.errors import RegistryError
from mcp_integration.job_queue import job_row
from mcp_integration.registry import Registry, ServerConfig, ToolSpec
from mcp_integration.secrets import redact


async def test_migrations_apply_once_in_order(registry: Registry) -> None:
    assert await registry.applied_migrations() == [v for v, _ in Registry.migration_files()]
    assert await registry.migrate() == []  # a second run applies nothing
    # ... nor does another process's first run (a new Registry reads schema_migrations; this one remembers).
    assert await Registry(registry.pool).migrate() == []


async def test_add_list_get_enable_remove(registry: Registry) -> None:
    cfg = await registry.add_server(
        ServerConfig(
            name="books",
            transport="streamable-http",
            url="http://127.0.0.1:9/mcp",
            headers={"Authorization": "env:BOOKS_TOKEN"},
            allowed_tools=["search"],
            timeout_ms=5000,
        )
    )
    assert cfg.id is not None and cfg.created_at is not None
    await registry.add_server(ServerConfig(name="local", transport="stdio", command="python", args=["-m", "x"]))
    assert [s.name for s in await registry.list_servers()] == ["books", "local"]
    got = await registry.get_server("books")
    assert got is not None
    assert got.headers == {"Authorization": "env:BOOKS_TOKEN"} and got.allowed_tools == ["search"]
    assert got.timeout_ms == 5000 and got.poll_interval == 1000 and got.poll_profile == "auto"
    assert await registry.set_enabled("books", False)
    assert [s.name for s in await registry.list_servers(enabled_only=True)] == ["local"]
    assert not await registry.set_enabled("nope", True)
    assert await registry.remove_server("local")
    assert not await registry.remove_server("local")


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (ServerConfig(name="Bad Name", transport="stdio", command="x"), "invalid server name"),
        (ServerConfig(name="a", transport="carrier-pigeon", url="http://x"), "unknown transport"),
        (ServerConfig(name="a", transport="stdio"), "needs a command"),
        (ServerConfig(name="a", transport="streamable-http"), "needs a URL"),
        (ServerConfig(name="a", transport="sse", url="ftp://x"), "needs a URL"),
        (ServerConfig(name="a", transport="websocket", url="http://x"), "ws:// or wss://"),
        (ServerConfig(name="a", transport="stdio", command="x", poll_profile="magic"), "unknown poll profile"),
        (ServerConfig(name="a", transport="stdio", command="x", timeout_ms=0), "timeout"),
    ],
)
async def test_bad_rows_are_refused_with_a_reason(registry: Registry, cfg: ServerConfig, message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        await registry.add_server(cfg)


async def test_database_constraints_reject_bad_rows_even_without_python_checks(registry: Registry) -> None:
    bad = [
        ("INSERT INTO mcp_servers (name, transport, command) VALUES ('x', 'telnet', 'c')", "transport_check"),
        ("INSERT INTO mcp_servers (name, transport) VALUES ('x', 'stdio')", "stdio_needs_command"),
        ("INSERT INTO mcp_servers (name, transport) VALUES ('x', 'sse')", "network_needs_url"),
        ("INSERT INTO mcp_servers (name, transport, command) VALUES ('X Y', 'stdio', 'c')", "name_check"),
        ("INSERT INTO mcp_servers (name, transport, url) VALUES ('x', 'websocket', 'http://h')", "websocket_url"),
    ]
    for sql, constraint in bad:
        async with registry.pool.connection() as conn:
            with pytest.raises(psycopg.errors.CheckViolation) as info:
                await conn.execute(sql)
        assert constraint in (info.value.diag.constraint_name or "")


async def test_duplicate_name_is_a_clear_error_and_replace_updates(registry: Registry) -> None:
    await registry.add_server(ServerConfig(name="dup", transport="stdio", command="a"))
    with pytest.raises(RegistryError, match="already exists"):
        await registry.add_server(ServerConfig(name="dup", transport="stdio", command="b"))
    updated = await registry.add_server(ServerConfig(name="dup", transport="stdio", command="b"), replace=True)
    assert updated.command == "b"


async def test_tool_cache_replaced_atomically_and_cascades(registry: Registry) -> None:
    cfg = await registry.add_server(ServerConfig(name="s", transport="stdio", command="a"))
    assert cfg.id is not None
    schema = {"type": "object", "properties": {"q": {"type": "string"}}}
    await registry.save_tools(cfg.id, [ToolSpec("s", "one", "first", schema), ToolSpec("s", "two", "", schema)])
    await registry.save_tools(
        cfg.id, [ToolSpec("s", "three", "third", schema, {"execution": {"taskSupport": "optional"}})]
    )
    cached = await registry.cached_tools()
    assert [t.name for t in cached["s"]] == ["three"]
    assert cached["s"][0].meta == {"execution": {"taskSupport": "optional"}}
    await registry.set_enabled("s", False)
    assert await registry.cached_tools() == {}
    await registry.remove_server("s")
    async with registry.pool.connection() as conn:
        row = await (await conn.execute("SELECT count(*) AS n FROM mcp_tools")).fetchone()
    assert row is not None and row["n"] == 0


async def test_health_and_jobs(registry: Registry) -> None:
    cfg = await registry.add_server(ServerConfig(name="s", transport="stdio", command="a"))
    assert cfg.id is not None
    await registry.record_health(cfg.id, "down", None, 3, "connection refused")
    await registry.record_health(cfg.id, "up", 12.5, 0, None)
    health = await registry.health()
    assert health["s"].status == "up" and health["s"].latency_ms == 12.5 and health["s"].consecutive_failures == 0

    jid = uuid.uuid4()
    job = job_row(jid, cfg.id, "s", "echo", "plain", "submitted", time.time())
    async with registry.pool.connection() as conn:
        await registry.write_jobs(conn, [job])
        job["state"] = "working"
        await registry.write_jobs(conn, [job])
        job.update(state="completed", result={"text": "hi"}, finished_at=time.time())
        await registry.write_jobs(conn, [job])
    row = await registry.get_job(jid)
    assert row is not None
    assert row["state"] == "completed" and row["result"] == {"text": "hi"} and row["finished_at"] is not None
    await registry.remove_server("s")  # history survives the server
    row = await registry.get_job(jid)
    assert row is not None and row["server_id"] is None and row["server_name"] == "s"
    assert [r["id"] for r in await registry.recent_jobs(server="s", state="completed")] == [jid]


async def test_queries_are_parameterised(registry: Registry) -> None:
    evil = "x'; DROP TABLE mcp_servers; --"
    assert await registry.get_server(evil) is None
    assert not await registry.remove_server(evil)
    assert await registry.list_servers() == []  # the table is still there


def test_redact_hides_literals_keeps_references() -> None:
    assert redact({"A": "env:TOKEN", "B": "sk-live-123"}) == {"A": "env:TOKEN", "B": "***"}
