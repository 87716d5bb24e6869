"""Server health: a circuit breaker per server, the checks that feed it, their records, and a monitor.

The breaker turns repeated failures (of health checks, and of calls that could not reach the server) into a
status: `up`, `degraded` (failing, or slow to answer), `down`. While a server is down its tools fail at once with
a clear reason instead of each caller waiting out a timeout; after a pause (growing with each failed probe) one
probe is let through — half-open — and a success brings the server back.

`Health` joins a dispatcher from outside: it gates the dispatcher's calls (`call_gates`) and hears their outcomes
(`call_observers`); the dispatcher knows nothing of breakers. `HealthMonitor` runs `Health.check` on a schedule.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from mcp_integration.aio import Backoff, spawn
from mcp_integration.dispatcher import Dispatcher, ServerState
from mcp_integration.errors import Busy, CircuitOpen, ConnectError, SecretMissing, ToolCallError
from mcp_integration.explain import describe
from mcp_integration.health_lease import Leases, holder_token
from mcp_integration.jobs import Job
from mcp_integration.scrubber import scrub
from mcp_integration.signals import Signal, Signals

__all__ = ["CircuitBreaker", "Health", "HealthMonitor", "HealthReport", "HealthStatus"]

log = logging.getLogger(__name__)

# needs_login: an OAuth server that answers but will not let us in until a person logs in (`servers login`); its
# breaker is left as it was: it is reachable, and no retry will change anything.
HealthStatus = Literal["up", "degraded", "down", "unknown", "needs_login"]


@dataclass
class CircuitBreaker:
    """One server's failure count and status. Monotonic clock; `clock` is injectable for property tests."""

    down_after: int = 3  # consecutive failures before calls are refused
    slow_ms: float = 2000.0  # a check answered slower than this is `degraded`, not `up`
    open_s: float = 5.0  # first pause before a down server is probed again; doubles per failed probe
    max_open_s: float = 60.0
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    status: HealthStatus = "unknown"
    failures: int = 0
    retry_at: float = 0.0
    _pauses: Backoff | None = None
    _probing: bool = False

    def __post_init__(self) -> None:
        # Jittered: many sessions watching one server must not probe it in lockstep.
        self._pauses = Backoff(self.open_s, self.max_open_s, jitter=(0.8, 1.0))

    def success(self, latency_ms: float | None = None) -> HealthStatus:
        assert self._pauses is not None
        self.failures, self._probing = 0, False
        self._pauses.reset()
        slow = latency_ms is not None and latency_ms > self.slow_ms
        self.status = "degraded" if slow else "up"
        return self.status

    def failure(self) -> HealthStatus:
        assert self._pauses is not None
        self.failures += 1
        probed, self._probing = self._probing, False
        if self.failures >= self.down_after:
            # The pause grows only when it is over (or a probe failed): calls refused meanwhile don't extend it.
            if self.status != "down" or probed or self.clock() >= self.retry_at:
                self.retry_at = self.clock() + self._pauses.next()
            self.status = "down"
        else:
            self.status = "degraded"
        return self.status

    def recall(self, status: str, failures: int) -> None:
        """Resume from a recorded verdict, unless this process already has one; a down server may be probed at
        once."""
        if self.status == "unknown" and status in ("up", "degraded", "down"):
            self.status, self.failures = status, max(0, failures)  # type: ignore[assignment]
            if status == "down":
                self.failures = max(self.failures, self.down_after)
                self.retry_at = self.clock()

    def adopt(self, status: str, failures: int) -> bool:
        """Another process's verdict (the fleet's checker, or a call made there): the breaker is shared, so a
        server found down anywhere is refused here too. True when this changed the status."""
        assert self._pauses is not None
        before = self.status
        if status == "down":
            if self.status != "down":
                self.status, self.failures, self._probing = "down", max(failures, self.down_after), False
                self.retry_at = self.clock() + self._pauses.next()
        elif status in ("up", "degraded") and self.status != status:
            self.status, self.failures, self._probing = status, max(0, failures), False  # type: ignore[assignment]
            self._pauses.reset()
        return self.status != before

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


@dataclass(frozen=True)
class HealthReport:
    server: str
    ok: bool
    latency_ms: float | None
    error: str | None
    status: HealthStatus = "unknown"  # after this check
    consecutive_failures: int = 0
    # check: a health check ran; call: a call's outcome moved the breaker; busy: a serial server was working on a
    # call of ours, so no check could tell anything (the status is the breaker's, unchanged); fleet: another
    # process's verdict, adopted
    source: Literal["check", "call", "busy", "fleet"] = "check"


@dataclass
class _Watch:
    """What Health keeps per server: the dispatcher's state it belongs to, its breaker, what was last said."""

    state: ServerState
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    last_status: HealthStatus = "unknown"
    # Health writes in order: a check's and a call's verdicts may be written concurrently.
    writes: asyncio.Lock = field(default_factory=asyncio.Lock)


class Health:
    """The breakers of a dispatcher's servers, the checks that feed them, and their records in the registry."""

    def __init__(
        self, dispatcher: Dispatcher, *, record_every_check: bool = True, signals: Signals | None = None
    ) -> None:
        self.dispatcher = dispatcher
        self.registry = dispatcher.registry
        # Every check written to mcp_server_health and its history (a CLI, the status page), or only changes of
        # status: each voice session has its own monitor, and a hundred sessions must not write 300 rows a second.
        self.record_every_check = record_every_check
        # Called with each report (metrics, the status page).
        self.observers: list[Callable[[HealthReport], None]] = []
        self._watches: dict[str, _Watch] = {}
        self._background: set[asyncio.Task[object]] = set()
        dispatcher.call_gates.append(self._gate)
        dispatcher.call_observers.append(self._call_done)
        # Other processes' verdicts, through LISTEN/NOTIFY: the breaker is shared by the fleet.
        self._unsubscribe = signals.subscribe(self._signalled) if signals is not None else None

    def breaker(self, server: str) -> CircuitBreaker:
        return self._watch(self.dispatcher.servers[server]).breaker

    def _watch(self, state: ServerState) -> _Watch:
        # A server replaced in the dispatcher (its row changed) starts with a fresh breaker.
        watch = self._watches.get(state.cfg.name)
        if watch is None or watch.state is not state:
            watch = self._watches[state.cfg.name] = _Watch(state)
        return watch

    async def recall(self, *, adopt: bool = False) -> None:
        """Start each breaker from the last recorded verdict, so a server that failed a minute ago in another
        session (or a CLI check) is not taken for healthy; a down one is probed at once, not refused blind. A
        verdict this process reaches first (a check, a call) wins, unless `adopt` (after missed signals: the
        record is the fleet's verdict)."""
        if self.registry is None:
            return
        try:
            rows = await self.registry.health()
        except Exception as exc:
            log.info("no recorded health: %s", describe(exc))
            return
        servers = self.dispatcher.servers
        for name, row in rows.items():
            if name in servers:
                watch = self._watch(servers[name])
                if watch.breaker.status == "unknown":
                    watch.breaker.recall(row.status, row.consecutive_failures)
                    watch.last_status = watch.breaker.status
                elif adopt:
                    self._adopt(watch, row.status, row.consecutive_failures)

    def _signalled(self, signal: Signal) -> None:
        if signal.kind == "resync":
            spawn(self.recall(adopt=True), self._background)
            return
        if signal.kind != "health":
            return
        server_id, status = signal.data.get("server_id"), signal.data.get("status")
        for state in self.dispatcher.servers.values():
            if state.cfg.id is not None and state.cfg.id == server_id and isinstance(status, str):
                self._adopt(self._watch(state), status, int(signal.data.get("failures") or 0))

    def _adopt(self, watch: _Watch, status: str, failures: int) -> None:
        if watch.breaker.adopt(status, failures):
            name = watch.state.cfg.name
            if watch.breaker.status == "down":
                log.warning("server %s is down (found by another process of the fleet)", name)
            b = watch.breaker
            self._notify(HealthReport(name, b.status != "down", None, None, b.status, b.failures, "fleet"))
        watch.last_status = watch.breaker.status  # heard from the fleet: not ours to publish again

    # -- checks ---------------------------------------------------------------------------------------------

    async def check(self, server: str | None = None, *, timeout: float | None = None) -> dict[str, HealthReport]:
        """Check reachability now (connect if needed, then ping), for one server or all, concurrently. Each check
        feeds the server's circuit breaker and is recorded in the registry."""
        servers = self.dispatcher.servers
        names = [server] if server else list(servers)
        unknown = [n for n in names if n not in servers]
        if unknown:
            raise ToolCallError(unknown[0], "-", f"no enabled server named {unknown[0]!r}", "unknown_server")
        reports = await asyncio.gather(*(self._check(self._watch(servers[n]), timeout) for n in names))
        return {r.server: r for r in reports}

    async def _check(self, watch: _Watch, timeout: float | None) -> HealthReport:
        state = watch.state
        deadline = None if timeout is None else time.monotonic() + timeout

        async def probe() -> float:
            # force: the breaker already paces checks; the connection's own backoff is for calls.
            await state.conn.open(force=True)
            # The ping gives up a moment before the check does, so an unanswered ping beside a call of ours can
            # still be told apart (Busy) from a server that answers nothing.
            left = None if deadline is None else max(0.01, (deadline - time.monotonic()) * 0.9)
            return await state.conn.ping(left)

        latency: float | None = None
        error: str | None = None
        try:
            async with asyncio.timeout(timeout):
                latency = await probe()
        except Busy:
            # A server that answers one request at a time, working on a call of ours: a ping would wait behind the
            # call and say nothing of its health. The breaker keeps what it knew.
            report = self._report(watch, None, None, source="busy")
            self._notify(report)
            return report
        except TimeoutError:
            error = f"no answer to a health check within {timeout:g} s"
        except (ConnectError, SecretMissing) as exc:
            error = str(exc)
        except Exception as exc:
            error = describe(exc)
        needs = state.conn.needs_login if error is not None else None
        if needs is not None:
            # An OAuth server that only a person can let us use again: reachable, so its breaker is left alone.
            report = dataclasses.replace(self._report(watch, None, str(needs)), status="needs_login")
            await self._publish(watch, report)
            return report
        if error is None:
            watch.breaker.success(latency)
            if state.error is not None and self.dispatcher.servers.get(state.cfg.name) is state:
                # Down when discovered (no tools, or stale cached ones): back now, so discover it again.
                spawn(self.dispatcher.refresh([state.cfg.name]), self._background)
        else:
            watch.breaker.failure()
        report = self._report(watch, latency, error)
        await self._publish(watch, report)
        return report

    def _report(
        self,
        watch: _Watch,
        latency: float | None,
        error: str | None,
        source: Literal["check", "call", "busy"] = "check",
    ) -> HealthReport:
        b = watch.breaker
        said = None if error is None else scrub(error)  # what a refusing server said may quote our credentials
        return HealthReport(watch.state.cfg.name, error is None, latency, said, b.status, b.failures, source)

    # -- calls ----------------------------------------------------------------------------------------------

    def _gate(self, server: str, tool: str) -> None:
        state = self.dispatcher.servers.get(server)
        if state is None:
            return
        breaker = self._watch(state).breaker
        if not breaker.allow():
            wait = breaker.seconds_to_retry()
            reason = f"the server is not answering right now (down; next try in {wait:.0f} s)"
            raise CircuitOpen(server, tool, reason, "unreachable")

    def _call_done(self, state: ServerState, job: Job) -> None:
        """Calls feed the breaker too: a call that could not reach the server is a failure, one the server
        answered (even with an error) a success; a timeout tells nothing about reachability."""
        watch = self._watch(state)
        breaker, before = watch.breaker, watch.breaker.status
        error = job.error
        if isinstance(error, CircuitOpen):
            return  # refused without trying: says nothing new about the server
        if error is not None and error.kind == "unreachable":
            breaker.failure()
        elif job.state == "completed" or (
            error is not None and error.kind in ("tool_error", "server_error", "unauthorized", "needs_login")
        ):
            if before in ("up", "unknown") or breaker.failures == 0:
                return  # nothing new (a slow server stays degraded until a check finds it quick again)
            breaker.success()
        else:
            breaker.probe_inconclusive()
            return
        if breaker.status != before:
            report = self._report(watch, None, error.reason if error else None, source="call")
            spawn(self._publish(watch, report), self._background)

    # -- records ----------------------------------------------------------------------------------------------

    async def _publish(self, watch: _Watch, report: HealthReport) -> None:
        name = watch.state.cfg.name
        changed = report.status != watch.last_status
        if changed:
            if report.status == "down":
                log.warning("server %s is down: %s", name, report.error)
            elif watch.last_status in ("down", "degraded") and report.status == "up":
                log.info("server %s is back up", name)
            watch.last_status = report.status
        self._notify(report)
        server_id = watch.state.cfg.id
        if self.registry is None or server_id is None:
            return
        if not self.record_every_check and not changed:
            return
        try:
            async with watch.writes:
                await self.registry.record_health(
                    server_id,
                    report.status,
                    report.latency_ms,
                    report.consecutive_failures,
                    report.error,
                    checked=report.source == "check" and self.record_every_check,
                )
        except Exception as exc:
            log.warning("server %s: health not recorded: %s", name, describe(exc))

    def _notify(self, report: HealthReport) -> None:
        for observe in self.observers:
            try:
                observe(report)
            except Exception:
                log.exception("health observer failed")

    async def aclose(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)


class HealthMonitor:
    """Checks each enabled server every `interval_s` (down ones when their breaker allows a probe), recording each
    check in `mcp_server_health` and `mcp_health_checks` through `Health`.

    With `leases` (a fleet: many sessions and processes on one registry) it checks only the servers whose health
    lease it holds (`health_lease.py`), claiming free ones when they are offered; the other monitors learn each
    change of status through `Signals`. Without, it checks every server itself (a CLI, a test)."""

    def __init__(
        self,
        health: Health,
        *,
        interval_s: float = 15.0,
        check_timeout_s: float = 5.0,
        keep_history_h: float = 24.0,
        leases: Leases | None = None,
    ) -> None:
        self.health = health
        self.dispatcher = health.dispatcher
        self.interval_s = interval_s
        self.check_timeout_s = check_timeout_s
        self.keep_history_h = keep_history_h
        self.leases = leases
        self.token = holder_token()
        self._task: asyncio.Task[None] | None = None
        self._next: dict[str, float] = {}
        self.rounds = 0

    def start(self) -> HealthMonitor:
        if self._task is None or self._task.done():
            if self.leases is not None:
                self.leases.join(self.token, self._claim)
            self._task = asyncio.create_task(self._loop(), name="mcp-health-monitor")
        return self

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def holding(self) -> list[str]:
        """The servers this monitor checks: all of them, or, in a fleet, those whose lease it holds."""
        if self.leases is None:
            return list(self.dispatcher.servers)
        held = self.leases.held(self.token)
        return [n for n, s in self.dispatcher.servers.items() if s.cfg.id in held]

    async def check_now(self, server: str | None = None) -> dict[str, HealthReport]:
        reports = await self.health.check(server, timeout=self.check_timeout_s)
        now = time.monotonic()
        for name in reports:
            self._next[name] = now + self.interval_s
        if self.leases is not None:
            for name in reports:
                state = self.dispatcher.servers.get(name)
                if state is not None and state.cfg.id is not None:
                    due_in = await self.leases.checked(self.token, state.cfg.id, self.interval_s)
                    if due_in is not None:
                        self._next[name] = time.monotonic() + due_in  # the fleet's rhythm, not ours
        return reports

    async def _claim(self, offered: list[int]) -> None:
        """Claim the offered leases this monitor can check (all its servers' after a resync)."""
        assert self.leases is not None
        ids = {s.cfg.id: n for n, s in self.dispatcher.servers.items() if s.cfg.id is not None}
        wanted = [i for i in (offered or ids) if i in ids]
        try:
            got = await self.leases.claim(self.token, wanted, self.interval_s)
        except Exception as exc:
            log.info("health leases not claimed: %s", describe(exc))
            return
        now = time.monotonic()
        for server_id, due_in in got.items():
            self._next.setdefault(ids[server_id], now + due_in)

    async def _loop(self) -> None:
        # Ticks at most every second so a down server is probed when its breaker allows, not a full interval late.
        tick = min(1.0, self.interval_s)
        last_prune = 0.0
        if self.leases is not None:
            await self._claim([])
        while True:
            holding: list[str] = []  # asked once a tick: in a fleet it reads the lease table's cache
            try:
                holding = await self._round()
                # Pruned by the processes that write the history (the status page, a fleet's checker), at start
                # and hourly.
                writes_history = self.health.record_every_check and self.dispatcher.registry is not None
                if writes_history and holding and (last_prune == 0.0 or time.monotonic() - last_prune > 3600):
                    last_prune = time.monotonic()
                    assert self.dispatcher.registry is not None
                    await self.dispatcher.registry.prune_health_checks(self.keep_history_h)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the monitor outlives any one bad round (a database restart, say)
                log.warning("health monitor: round failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(self._until_due(holding, tick))

    def _until_due(self, holding: list[str], tick: float) -> float:
        """Until the next check of `holding` is due, so checks keep their interval, or `tick` at most."""
        now = time.monotonic()
        due = [self._next.get(n, now) for n in holding if self.health.breaker(n).status != "down"]
        return max(0.01, min([tick, *(d - now for d in due)]))

    async def _round(self) -> list[str]:
        """Check the servers due; returns those this monitor holds."""
        now = time.monotonic()
        holding = self.holding
        due = []
        for name in holding:
            breaker = self.health.breaker(name)
            if breaker.status == "down":
                if breaker.probe_due:
                    due.append(name)
            elif now >= self._next.get(name, 0.0):
                due.append(name)
        if due:
            await asyncio.gather(*(self.check_now(n) for n in due), return_exceptions=True)
            self.rounds += 1
        for gone in set(self._next) - set(holding):
            del self._next[gone]
        return holding

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.leases is not None:
            try:
                await self.leases.leave(self.token)
            except Exception as exc:  # the lease lapses by itself; another monitor takes it over
                log.info("health leases not released: %s", describe(exc))
