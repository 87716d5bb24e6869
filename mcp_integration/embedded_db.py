"""An embedded PostgreSQL (the pgserver package) for machines with no DATABASE_URL: a new user needs no server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from mcp_integration.config import Settings
from mcp_integration.registry import Registry

__all__ = [
    "EmbeddedPostgres",
    "open_registry",
]


log = logging.getLogger(__name__)


class EmbeddedPostgres:
    """Starts PostgreSQL under `data_dir/pg`; `stop()` (or process exit) shuts it down."""

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = Path(data_dir) / "pg"
        self._server: Any = None

    async def start(self) -> str:
        import pgserver  # imported here: only the embedded path pays for it

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        # pgserver blocks while initdb/pg_ctl run; keep the event loop free.
        self._server = await asyncio.to_thread(pgserver.get_server, self.pgdata, cleanup_mode="stop")
        uri = self._server.get_uri()
        log.info("embedded PostgreSQL running under %s", self.pgdata)
        return uri

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.cleanup)


@asynccontextmanager
async def open_registry(settings: Settings, *, migrate: bool = True) -> AsyncIterator[Registry]:
    """The registry on DATABASE_URL, or on an embedded PostgreSQL when none is set; migrated, closed after."""
    embedded = None
    url = settings.database_url
    if url is None:
        embedded = EmbeddedPostgres(settings.data_dir)
        url = await embedded.start()
    try:
        registry = await Registry.open(url)
        try:
            if migrate:
                await registry.migrate()
            yield registry
        finally:
            await registry.close()
    finally:
        if embedded is not None:
            await embedded.stop()
