"""The machine's relay: one PostgreSQL connection listening for every job process of a worker.

LiveKit runs each voice session in a process of its own, so a LISTEN per process is a database connection per
session, held for the whole call. The worker's main process runs this relay instead: it listens (and sweeps for
free health leases) once, and passes each signal on over a Unix socket, one JSON line per signal. Job processes
find it through `VOICE_MCP_RELAY` (the socket's path; `Settings.relay_socket`).

A lease offer goes to one process at a time, in turn: offered to all at once, a free lease would bring every
process to the database in the same second. An offer nobody takes is made again at the next sweep, to the next.
A process that reads too slowly is dropped; it reconnects, and its `resync` makes up for what it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from mcp_integration.signals import Signal, Signals

__all__ = ["Relay"]

log = logging.getLogger(__name__)

# Unread bytes a process may fall behind by before it is dropped (a signal line is ~100 bytes).
MAX_BACKLOG = 256 * 1024


class Relay:
    def __init__(self, conninfo: str, path: str | Path) -> None:
        self.path = str(path)
        self.signals = Signals(conninfo)
        self.signals.sweep = True
        self._clients: list[asyncio.StreamWriter] = []
        self._turn = 0
        self._server: asyncio.Server | None = None
        self.signals.subscribe(self._pass_on)

    @property
    def clients(self) -> int:
        return len(self._clients)

    async def start(self) -> Relay:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left by a worker that was killed
        self._server = await asyncio.start_unix_server(self._serve, self.path)
        os.chmod(self.path, 0o600)  # the worker's own processes only
        self.signals.start()
        return self

    async def aclose(self) -> None:
        await self.signals.aclose()
        if self._server is not None:
            self._server.close()
            for writer in self._clients:
                writer.close()
            self._clients.clear()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.append(writer)
        try:
            await reader.read()  # nothing comes this way; EOF when the process goes
        except ConnectionError:
            pass
        finally:
            if writer in self._clients:
                self._clients.remove(writer)
            writer.close()

    def _pass_on(self, signal: Signal) -> None:
        if signal.kind == "leases":
            if not self._clients:
                return
            self._turn = (self._turn + 1) % len(self._clients)
            targets = [self._clients[self._turn]]
        else:
            # Every process hears the rest; a resync is our own reconnect: they missed what we missed.
            targets = list(self._clients)
        line = signal.line()
        for writer in targets:
            transport = writer.transport
            if transport.is_closing():
                continue
            if transport.get_write_buffer_size() > MAX_BACKLOG:
                log.warning("relay: a job process is not reading its signals; dropping it (it will resync)")
                writer.close()
                if writer in self._clients:
                    self._clients.remove(writer)
                continue
            writer.write(line)
