"""Server health: a circuit breaker per server, and a monitor that checks every enabled server in the background.

The breaker turns repeated failures (of health checks, and of calls that could not reach the server) into a
status: `up`, `degraded` (failing, or slow to answer), `down`. While a server is down its tools fail at once with
a clear reason instead of each caller waiting out a timeout; after a pause (growing with each failed probe) one
probe is let through — half-open — and a success brings the server back.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mcp_integration.dispatcher import Dispatcher, HealthReport

log = logging.getLogger(__name__)


@dataclass
class CircuitBreaker:
    """One server's failure count and status. Monotonic clock; `clock` is injectable for property tests."""

    down_after: int = 3  # consecutive failures before calls are refused
    slow_ms: float = 2000.0  # a check answered slower than this is `degraded`, not `up`
    open_s: float = 5.0  # first pause before a down server is probed again; doubles per failed probe
    max_open_s: float = 60.0
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    status: str = "unknown"
    failures: int = 0
    retry_at: float = 0.0
    _pause: float = 0.0
    _probing: bool = False

    def success(self, latency_ms: float | None = None) -> str:
        self.failures, self._pause, self._probing = 0, 0.0, False
        slow = latency_ms is not None and latency_ms > self.slow_ms
        self.status = "degraded" if slow else "up"
        return self.status

    def failure(self) -> str:
        self.failures += 1
        probed, self._probing = self._probing, False
        if self.failures >= self.down_after:
            # The pause grows only when it is over (or a probe failed): calls refused meanwhile don't extend it.
            if self.status != "down" or probed or self.clock() >= self.retry_at:
                self._pause = min(self.max_open_s, self._pause * 2 if self._pause else self.open_s)
                # Jitter: many sessions watching one server must not probe it in lockstep.
                self.retry_at = self.clock() + self._pause * random.uniform(0.8, 1.0)
            self.status = "down"
        else:
            self.status = "degraded"
        return self.status

    def recall(self, status: str, failures: int) -> None:
        """Resume from a recorded verdict, unless this process already has one; a down server may be probed at
        once."""
        if self.status == "unknown" and status in ("up", "degraded", "down"):
            self.status, self.failures = status, max(0, failures)
            if status == "down":
                self.failures = max(self.failures, self.down_after)
                self._pause, self.retry_at = self.open_s / 2, self.clock()

    def probe_inconclusive(self) -> None:
        """A trial call ended without telling (a timeout, a cancel): let the next one try."""
        self._probing = False

    def allow(self) -> bool:
        """May a call go to the server now? Always, unless it is down; then one probe per pause (half-open)."""
        if self.status != "down":
            return True
        if self._probing or self.clock() < self.retry_at:
            return False
        self._probing = True
        return True

    @property
    def probe_due(self) -> bool:
        return self.status != "down" or (not self._probing and self.clock() >= self.retry_at)

    def seconds_to_retry(self) -> float:
        return max(0.0, self.retry_at - self.clock()) if self.status == "down" else 0.0


class HealthMonitor:
    """Checks each enabled server every `interval_s` (down ones when their breaker allows a probe), recording each
    check in `mcp_server_health` and `mcp_health_checks` through the dispatcher. One per process or session."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        interval_s: float = 15.0,
        check_timeout_s: float = 5.0,
        keep_history_h: float = 24.0,
    ) -> None:
        self.dispatcher = dispatcher
        self.interval_s = interval_s
        self.check_timeout_s = check_timeout_s
        self.keep_history_h = keep_history_h
        self._task: asyncio.Task[None] | None = None
        self._next: dict[str, float] = {}
        self.rounds = 0

    def start(self) -> HealthMonitor:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name="mcp-health-monitor")
        return self

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def check_now(self, server: str | None = None) -> dict[str, HealthReport]:
        reports = await self.dispatcher.health_check(server, timeout=self.check_timeout_s)
        now = time.monotonic()
        for name in reports:
            self._next[name] = now + self.interval_s
        return reports

    async def _loop(self) -> None:
        # Ticks at most every second so a down server is probed when its breaker allows, not a full interval late.
        tick = min(1.0, self.interval_s)
        last_prune = 0.0
        while True:
            try:
                await self._round()
                # Pruned by the processes that write the history (the status page), at start and hourly.
                writes_history = self.dispatcher.record_every_check and self.dispatcher.registry is not None
                if writes_history and (last_prune == 0.0 or time.monotonic() - last_prune > 3600):
                    last_prune = time.monotonic()
                    assert self.dispatcher.registry is not None
                    await self.dispatcher.registry.prune_health_checks(self.keep_history_h)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the monitor outlives any one bad round (a database restart, say)
                log.warning("health monitor: round failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(tick)

    async def _round(self) -> None:
        now = time.monotonic()
        due = []
        for name, state in self.dispatcher.servers.items():
            if state.breaker.status == "down":
                if state.breaker.probe_due:
                    due.append(name)
            elif now >= self._next.get(name, 0.0):
                due.append(name)
        if due:
            await asyncio.gather(*(self.check_now(n) for n in due), return_exceptions=True)
            self.rounds += 1
        for gone in set(self._next) - set(self.dispatcher.servers):
            del self._next[gone]

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
