"""A process's share of the fleet: its database signals and its health leases, opened once per process and used
by every session in it (each LiveKit job process opens one; a CLI or the status page opens its own).

The connection budget, per process: none held for listening when the machine runs a relay (`relay.py`), else
one; one more only while a monitor here holds health leases (in a fleet, one process holds them); and the
registry's pool, whose connections are closed when unused (`Settings.db_pool_idle_s`). README: "Connection
budget".
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from mcp_integration.config import Settings
from mcp_integration.health_lease import Leases
from mcp_integration.registry import Registry
from mcp_integration.signals import Signals

__all__ = ["Fleet"]

log = logging.getLogger(__name__)


@dataclass
class Fleet:
    signals: Signals
    leases: Leases

    @classmethod
    def open(cls, registry: Registry, settings: Settings) -> Fleet:
        relay = settings.relay_socket
        if relay and not os.path.exists(relay):
            # No relay where one was promised (a worker started by other means): listen directly, and say so,
            # as that costs a database connection per process.
            log.warning("no relay socket at %s: this process listens to PostgreSQL on a connection of its own", relay)
            relay = None
        conninfo = registry.pool.conninfo
        signals = Signals(conninfo, relay=relay).start()
        return cls(signals, Leases(conninfo, signals))

    async def aclose(self) -> None:
        await self.leases.aclose()
        await self.signals.aclose()
