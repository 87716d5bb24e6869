"""No DATABASE_URL: an embedded PostgreSQL starts under the data folder, end to end."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from mcp_integration.config import Settings
from mcp_integration.embedded_db import EmbeddedPostgres, open_registry
from mcp_integration.registry import Registry, ServerConfig


async def test_embedded_start_migrate_register_query_stop(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "data")
    url = await pg.start()
    try:
        assert (tmp_path / "data" / "pg" / "PG_VERSION").exists()
        reg = await Registry.open(url)
        try:
            assert await reg.migrate() == [v for v, _ in Registry.migration_files()]
            await reg.add_server(ServerConfig(name="local", transport="stdio", command="python"))
            assert [s.name for s in await reg.list_servers()] == ["local"]
        finally:
            await reg.close()
    finally:
        await pg.stop()
    with pytest.raises(psycopg.OperationalError):
        await psycopg.AsyncConnection.connect(url, connect_timeout=3)


async def test_open_registry_without_database_url_uses_embedded_and_keeps_data(tmp_path: Path) -> None:
    settings = Settings(database_url=None, data_dir=tmp_path, log_level="INFO", connect_timeout_s=5)
    async with open_registry(settings) as reg:
        await reg.add_server(ServerConfig(name="kept", transport="stdio", command="python"))
    async with open_registry(settings) as reg:  # a second start finds the data where it was left
        assert [s.name for s in await reg.list_servers()] == ["kept"]
