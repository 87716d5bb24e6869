"""The dispatcher: connections to every enabled server, one tool index under safe names, and calls as jobs.

Public verbs, as teams porting from the original design know them: `execute_tool` (submit, returns a job
id at once), `get_result` (wait for or read that job's outcome), `health_check`, and `call` (both together).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import mcp_types as types
from jsonschema import Draft202012Validator
from jsonschema.validators import validator_for
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED

from mcp_integration.connection import (
    Busy,
    ConnectError,
    ConnectionLost,
    ProgressCallback,
    Reconnecting,
    ServerConnection,
    Unauthorized,
    describe,
)
from mcp_integration.health import CircuitBreaker
from mcp_integration.jobs import Job, ToolCallError, ToolResult, WaitPolicy
from mcp_integration.limits import argument_problem
from mcp_integration.logs import outside_job
from mcp_integration.naming import assign_names
from mcp_integration.receipts import ReceiptPoller, default_http_client, looks_like_unpollable_ack, recognise
from mcp_integration.registry import Registry, ServerConfig, ToolSpec
from mcp_integration.secrets import SecretMissing, scrub
from mcp_integration.tasks import TaskHandle
from mcp_integration.timing import DurationStats
from mcp_integration.waiters import wait_receipt, wait_task

log = logging.getLogger(__name__)

# Receipt polls in flight per server: below the HTTP pool's size, so polls queue here (cheaply) and not
# inside the pool, whose queue scan is quadratic and starves the event loop with a thousand waiters.
MAX_POLLS_IN_FLIGHT = 32
# How long a call's submit may wait for its tool's past durations (learned timing) to load.
SEED_WAIT_S = 0.5
# A call facing a server that refuses connections quickly (restarting, say) waits out the connection's backoff
# between attempts when the wait is short (up to 1 s each, 2 s in all), then fails as unreachable; a call that
# meets a longer backoff fails at once with the reason ("reconnecting ...; next attempt in N s").
SUBMIT_CONNECT_PATIENCE_S = 2.0
SUBMIT_WAITS_OUT_S = 1.0


class CircuitOpen(ToolCallError):
    """A call refused without trying, because its server's breaker says it is down."""


@dataclass(frozen=True)
class ToolEntry:
    """One callable tool: the name the LLM sees, and where it really lives."""

    name: str
    spec: ToolSpec

    @property
    def server(self) -> str:
        return self.spec.server


@dataclass
class ServerState:
    cfg: ServerConfig
    conn: ServerConnection
    tools: list[ToolSpec] = field(default_factory=list)
    from_cache: bool = False
    discovered_at: float | None = None
    error: str | None = None
    skipped: list[str] = field(default_factory=list)
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    last_status: str = "unknown"
    # Health writes in order: a check's and a call's verdicts may be written concurrently.
    health_writes: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True)
class HealthReport:
    server: str
    ok: bool
    latency_ms: float | None
    error: str | None
    status: str = "unknown"  # up | degraded | down | unknown, after this check
    consecutive_failures: int = 0
    # check: a health check ran; call: a call's outcome moved the breaker; busy: a serial server was working on a
    # call of ours, so no check could tell anything (the status is the breaker's, unchanged)
    source: str = "check"


class Dispatcher:
    def __init__(
        self,
        registry: Registry | None,
        *,
        connect_timeout: float = 10.0,
        max_calls_per_server: int = 64,
        keep_jobs: int = 1000,
        background_s: float = 600.0,
    ) -> None:
        self.background_s = background_s
        self._stats = DurationStats()
        self._seeding: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._poll_slots: dict[str, asyncio.Semaphore] = {}
        self._http: httpx.AsyncClient | None = None
        self.registry = registry
        self.connect_timeout = connect_timeout
        self._servers: dict[str, ServerState] = {}
        self._index: dict[str, ToolEntry] = {}
        self._validators: dict[tuple[str, str], Any] = {}
        self._jobs: dict[uuid.UUID, Job] = {}
        self._keep_jobs = keep_jobs
        self._limits: dict[str, asyncio.Semaphore] = {}
        self._max_calls = max_calls_per_server
        self._background: set[asyncio.Task[Any]] = set()
        self._writes: set[asyncio.Task[Any]] = set()
        self._closing: set[asyncio.Task[Any]] = set()
        # Called with each new job before it starts (metrics, logs): they attach listeners to its events.
        self.job_observers: list[Callable[[Job], None]] = []
        # Every check written to mcp_server_health and its history (a CLI, the status page), or only changes of
        # status: each voice session runs its own monitor, and a hundred sessions must not write 300 rows a second.
        self.record_every_check = True
        # Called with each health check's report (metrics, the status page).
        self.health_observers: list[Callable[[HealthReport], None]] = []

    # -- servers and discovery ------------------------------------------------------------------------------

    async def start(
        self,
        *,
        wait: bool = True,
        servers: list[ServerConfig] | None = None,
        cached: dict[str, list[ToolSpec]] | None = None,
        recall_health: bool = True,
    ) -> None:
        """Load the enabled servers. With `wait=False` the index comes from the tool cache at once and fresh
        discovery runs in the background (`await dispatcher.refreshed()` to wait for it). `servers` and `cached`
        replace the registry's lists (a last-known copy kept on disk, when the database is unreachable; then pass
        `recall_health=False` too, or the breakers' recorded state is read from the unreachable database)."""
        if servers is None:
            if self.registry is None:
                raise ValueError("a dispatcher without a registry needs its servers passed in")
            servers = await self.registry.list_servers(enabled_only=True)
        for cfg in servers:
            self._servers[cfg.name] = ServerState(cfg, ServerConnection(cfg, connect_timeout=self.connect_timeout))
        # Beside discovery, not before it: one more query must not delay a session's start. A verdict this
        # process reaches first (a check, a call) wins over the recorded one.
        recalling = self._spawn(self._recall_health()) if self.registry is not None and recall_health else None
        if wait or (self.registry is None and cached is None):
            await self.refresh()
            if recalling is not None:
                await recalling
            return
        if cached is None:
            assert self.registry is not None
            cached = await self.registry.cached_tools()
        for name, state in self._servers.items():
            if name in cached:
                state.tools, state.from_cache = cached[name], True
        self._rebuild_index()
        self._spawn(self.refresh())

    async def _recall_health(self) -> None:
        """Start each breaker from the last recorded verdict, so a server that failed a minute ago in another
        session (or a CLI check) is not taken for healthy; a down one is probed at once, not refused blind."""
        assert self.registry is not None
        try:
            rows = await self.registry.health()
        except Exception as exc:
            log.info("no recorded health: %s", describe(exc))
            return
        for name, row in rows.items():
            if name in self._servers:
                self._servers[name].breaker.recall(row.status, row.consecutive_failures)
                self._servers[name].last_status = row.status

    async def refreshed(self) -> None:
        """Wait for background discovery started by `start(wait=False)`."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def refresh(self, names: list[str] | None = None) -> dict[str, str | None]:
        """Connect to and discover the given servers (default: all), concurrently. Returns each one's error."""
        wanted = list(self._servers) if names is None else names
        targets = [self._servers[n] for n in wanted if n in self._servers]
        errors = await asyncio.gather(*(self._discover(s) for s in targets))
        self._rebuild_index()
        return {s.cfg.name: e for s, e in zip(targets, errors, strict=True)}

    async def _discover(self, state: ServerState) -> str | None:
        try:
            await state.conn.open()
            tools = await state.conn.list_tools()
        except (ConnectError, SecretMissing) as exc:
            state.error = str(exc)
        except Exception as exc:
            state.error = f"server {state.cfg.name!r}: tools/list failed: {describe(exc)}"
        else:
            state.tools, state.from_cache, state.error = tools, False, None
            state.skipped = state.conn.skipped_tools
            state.discovered_at = time.time()
            if self.registry is not None and state.cfg.id is not None:
                # Off the critical path: the index is ready before the cache is written.
                self._spawn(self._save_tools(state.cfg, tools), self._writes)
            return None
        log.warning("%s", state.error)
        return state.error

    async def _save_tools(self, cfg: ServerConfig, tools: list[ToolSpec]) -> None:
        assert self.registry is not None and cfg.id is not None
        try:
            await self.registry.save_tools(cfg.id, tools)
        except Exception as exc:
            log.warning("server %s: tool cache not saved: %s", cfg.name, describe(exc))

    async def add_server(self, cfg: ServerConfig) -> str | None:
        """Add (or replace) a server while running; returns its discovery error, if any."""
        await self.remove_server(cfg.name)
        self._servers[cfg.name] = ServerState(cfg, ServerConnection(cfg, connect_timeout=self.connect_timeout))
        return (await self.refresh([cfg.name]))[cfg.name]

    async def remove_server(self, name: str) -> None:
        state = self._servers.pop(name, None)
        if state is not None:
            self._rebuild_index()  # its tools go at once; closing the connection may take a moment
            closing = self._spawn(state.conn.close(), self._closing)
            # Shielded: a caller cancelled meanwhile (a watcher stopping) must not leave a stdio process behind;
            # aclose() waits for whatever is still closing.
            await asyncio.shield(closing)

    def _rebuild_index(self) -> None:
        specs = {(s.cfg.name, t.name): t for s in self._servers.values() for t in s.tools}
        names = assign_names(specs)
        self._index = {names[key]: ToolEntry(names[key], spec) for key, spec in specs.items()}
        self._validators = {k: v for k, v in self._validators.items() if k in specs}

    @property
    def servers(self) -> dict[str, ServerState]:
        return dict(self._servers)

    @property
    def tools(self) -> list[ToolEntry]:
        return sorted(self._index.values(), key=lambda e: e.name)

    def resolve(self, tool: str, server: str | None = None) -> ToolEntry:
        """Find a tool by its safe name, by `server/tool`, or by its original name (with `server` if shared)."""
        if server is None and "/" in tool and tool not in self._index:
            server, tool = tool.split("/", 1)
        if server is None and tool in self._index:
            return self._index[tool]
        matches = [
            e
            for e in self._index.values()
            if (server is None or e.server == server) and (e.spec.name == tool or e.name == tool)
        ]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            where = f" on server {server!r}" if server else ""
            if server is not None and server not in self._servers:
                raise ToolCallError(server, tool, f"no enabled server named {server!r}", "unknown_tool")
            raise ToolCallError(server, tool, f"no tool named {tool!r}{where}", "unknown_tool")
        options = ", ".join(sorted(e.name for e in matches))
        raise ToolCallError(
            None, tool, f"{tool!r} is offered by several servers; use one of: {options}", "unknown_tool"
        )

    def validate_arguments(self, entry: ToolEntry, arguments: Any) -> None:
        if not isinstance(arguments, dict):
            raise ToolCallError(entry.server, entry.spec.name, "arguments must be a JSON object", "invalid_arguments")
        # Size and depth first: the schema check recurses, and the SDK cannot serialise a 10 000-level value.
        problem = argument_problem(arguments)
        if problem is not None:
            raise ToolCallError(entry.server, entry.spec.name, problem, "invalid_arguments")
        key = (entry.server, entry.spec.name)
        validator = self._validators.get(key)
        if validator is None:
            cls = validator_for(entry.spec.input_schema, default=Draft202012Validator)
            validator = self._validators[key] = cls(entry.spec.input_schema)
        try:
            error = next(iter(sorted(validator.iter_errors(arguments), key=lambda e: list(e.path))), None)
        except RecursionError:
            reason = "the tool's input schema nests too deeply to check these arguments"
            raise ToolCallError(entry.server, entry.spec.name, reason, "invalid_arguments") from None
        if error is not None:
            where = "/".join(str(p) for p in error.path)[:200]
            # The message quotes the offending value, which may be a megabyte long.
            message = error.message if len(error.message) <= 300 else error.message[:300] + "…"
            reason = f"argument {where!r}: {message}" if where else message
            raise ToolCallError(entry.server, entry.spec.name, f"invalid arguments: {reason}", "invalid_arguments")

    # -- calls ----------------------------------------------------------------------------------------------

    async def execute_tool(self, tool: str, arguments: dict[str, Any], *, server: str | None = None) -> str:
        """Submit a call and return its job id at once. Bad tool names and arguments raise ToolCallError here."""
        job = self.submit(tool, arguments, server=server)
        return str(job.id)

    def submit(self, tool: str, arguments: dict[str, Any], *, server: str | None = None) -> Job:
        entry = self.resolve(tool, server)
        self.validate_arguments(entry, arguments)
        state = self._servers[entry.server]
        cfg = state.cfg
        job = Job(
            server=entry.server,
            server_id=cfg.id,
            tool=entry.spec.name,
            arguments=arguments,
            registry=self.registry,
            policy=WaitPolicy(cfg.timeout_ms / 1000, cfg.max_wait_ms / 1000, self.background_s),
        )
        self._remember(job)
        job.add_listener(lambda e: self._on_call_done(state, job) if e.kind == "done" else None)
        for observe in self.job_observers:
            try:
                observe(job)
            except Exception:  # metrics or logs must never cost a caller the call
                log.exception("job observer failed")
        return job.start(lambda j: self._perform(j, state, entry.spec))

    async def get_result(self, job_id: str | uuid.UUID, timeout: float | None = None) -> ToolResult:
        """Wait for a job's result (a timeout ends this wait, not the job); read a finished one from mcp_jobs."""
        jid = uuid.UUID(str(job_id))
        job = self._jobs.get(jid)
        if job is not None:
            return await job.wait(timeout)
        row = await self.registry.get_job(jid) if self.registry else None
        if row is None:
            raise ToolCallError(None, "?", f"no job with id {jid}", "unknown_job")
        if row["state"] == "completed" and row["result"] is not None:
            return ToolResult(text=row["result"].get("text", ""), structured=row["result"].get("structured"))
        kind = {"timed_out": "timeout", "cancelled": "cancelled"}.get(row["state"], "server_error")
        reason = row["error"] or f"the job is {row['state']} in another process"
        raise ToolCallError(row["server_name"], row["tool"], reason, kind)

    async def call(
        self, tool: str, arguments: dict[str, Any], *, server: str | None = None, timeout: float | None = None
    ) -> ToolResult:
        return await self.submit(tool, arguments, server=server).wait(timeout)

    def job(self, job_id: str | uuid.UUID) -> Job | None:
        return self._jobs.get(uuid.UUID(str(job_id)))

    def _remember(self, job: Job) -> None:
        self._jobs[job.id] = job
        if len(self._jobs) > self._keep_jobs:
            # Forget the oldest finished jobs; their outcome stays readable from mcp_jobs.
            for jid in [j for j, v in self._jobs.items() if v.done][: len(self._jobs) - self._keep_jobs]:
                del self._jobs[jid]

    async def _perform(self, job: Job, state: ServerState, spec: ToolSpec) -> ToolResult:
        # Refused inside the job, not before it: a call to a down server is still a job, recorded and counted.
        self._refuse_if_down(state, job.tool)
        cfg = state.cfg
        limit = self._limits.setdefault(cfg.name, asyncio.Semaphore(self._max_calls))
        key = (cfg.name, spec.name)
        expected = await self._expected_duration(key)

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            job.emit("progress", progress=progress, total=total, message=message)

        if limit.locked():
            job.queue(True, ahead=self._max_calls)
        async with limit:
            job.queue(False)
            outcome = await self._send_call(job, state, spec, on_progress)
        floor = cfg.poll_interval / 1000
        if not isinstance(outcome, types.CallToolResult):
            result = await wait_task(job, state.conn, outcome, floor_s=floor, expected_s=expected)
        else:
            plain = ToolResult.from_mcp(outcome)
            if outcome.is_error:
                raise ToolCallError(cfg.name, job.tool, plain.text or "the tool reported an error", "tool_error")
            receipt = recognise(plain, poll_profile=cfg.poll_profile)
            if receipt is not None:
                slots = self._poll_slots.setdefault(cfg.name, asyncio.Semaphore(MAX_POLLS_IN_FLIGHT))
                result = await wait_receipt(
                    job, self._poller(cfg), receipt, floor_s=floor, expected_s=expected, poll_slots=slots
                )
            elif cfg.poll_profile != "none" and looks_like_unpollable_ack(plain):
                reason = "the server only acknowledged the request and gave no way to fetch the answer"
                raise ToolCallError(cfg.name, job.tool, reason, "tool_error")
            else:
                job.emit("accepted", job_kind="plain")
                result = plain
        if job.kind != "plain":
            self._stats.add(key, job.estimated_duration)
        return result

    async def _send_call(
        self, job: Job, state: ServerState, spec: ToolSpec, progress: ProgressCallback
    ) -> types.CallToolResult | TaskHandle:
        """Send the tools/call and wait for its first answer, failing fast if the server dies or goes silent
        meanwhile (the connection's liveness probe). A `404 Session not found` means the server (restarted, or
        expired our session) never ran the call: it is sent once more on a new connection."""
        cfg, conn = state.cfg, state.conn
        for attempt in range(2):
            await self._open_for_submit(state, job)
            job.set_state("working")
            generation = conn.generation
            try:
                return await conn.watch(
                    conn.tasks.call_tool(job.tool, job.arguments, tool_meta=spec.meta, progress=progress)
                )
            except ConnectionLost as exc:
                reason = f"lost the server during the call: {exc.reason}"
                raise ToolCallError(cfg.name, job.tool, reason, "unreachable") from None
            except ConnectError as exc:
                raise ToolCallError(cfg.name, job.tool, str(exc), "unreachable") from None
            except MCPError as exc:
                if conn.refused is not None:
                    # A 401/403 mid-session (a token that expired or was revoked): reconnecting will not help.
                    reason = f"needs authorization (HTTP {conn.refused})"
                    raise ToolCallError(cfg.name, job.tool, reason, "unauthorized") from None
                if attempt == 0 and _session_expired(exc):
                    why = "the server no longer knows our session"
                    conn.drop(why, generation=generation)
                    job.emit("status", state="reconnecting", message=why)
                    continue
                if _connection_lost(exc) and not await conn.check_alive():
                    # This request's stream broke and the server does not answer a probe either: it is gone.
                    reason = f"lost the server during the call: {conn.lost_reason or describe(exc)}"
                    raise ToolCallError(cfg.name, job.tool, reason, "unreachable") from None
                raise ToolCallError(cfg.name, job.tool, describe(exc)) from None
        raise AssertionError("not reached: the second attempt returns or raises")

    async def _open_for_submit(self, state: ServerState, job: Job) -> None:
        """Connect before submitting. Nothing has been sent yet, so a quick failure (refused: a server restarting)
        is retried while the connection's backoff stays short; a slow failure (a timeout) or a long backoff fails
        the call at once, so a dead server costs one connect timeout at most, not one per retry."""
        deadline = time.monotonic() + SUBMIT_CONNECT_PATIENCE_S
        while True:
            started = time.monotonic()
            try:
                await state.conn.open()
                return
            except SecretMissing as exc:
                raise ToolCallError(state.cfg.name, job.tool, str(exc), "unreachable") from None
            except Unauthorized as exc:
                reason = f"needs authorization (HTTP {exc.status})"
                raise ToolCallError(state.cfg.name, job.tool, reason, "unauthorized") from None
            except Reconnecting as exc:
                if exc.retry_in > SUBMIT_WAITS_OUT_S or time.monotonic() + exc.retry_in > deadline:
                    raise ToolCallError(state.cfg.name, job.tool, str(exc), "unreachable") from None
                await asyncio.sleep(exc.retry_in)
            except ConnectError as exc:
                if time.monotonic() - started > 1.0 or time.monotonic() >= deadline:
                    raise ToolCallError(
                        state.cfg.name, job.tool, f"cannot reach the server: {exc}", "unreachable"
                    ) from None

    async def _expected_duration(self, key: tuple[str, str]) -> float | None:
        if self.registry is not None and key not in self._stats.seeded:
            # One query per tool per process; jobs submitted meanwhile wait for it rather than poll blind.
            seeding = self._seeding.get(key)
            if seeding is None:
                seeding = self._seeding[key] = asyncio.ensure_future(self._seed(key))
            # Bounded: with the database down, the call goes now and polls blind rather than wait for the pool.
            await asyncio.wait([seeding], timeout=SEED_WAIT_S)
        return self._stats.expected(key)

    async def _seed(self, key: tuple[str, str]) -> None:
        assert self.registry is not None
        try:
            self._stats.seed(key, await self.registry.recent_durations(*key, limit=self._stats.keep))
        except Exception as exc:
            self._stats.seeded.add(key)
            log.info("no past durations for %s/%s: %s", *key, describe(exc))

    def _poller(self, cfg: ServerConfig) -> ReceiptPoller:
        if self._http is None:
            self._http = default_http_client()
        return ReceiptPoller(cfg, self._http)

    # -- health ---------------------------------------------------------------------------------------------

    async def health_check(self, server: str | None = None, *, timeout: float | None = None) -> dict[str, HealthReport]:
        """Check reachability now (connect if needed, then ping), for one server or all, concurrently. Each check
        feeds the server's circuit breaker and is recorded in the registry."""
        names = [server] if server else list(self._servers)
        unknown = [n for n in names if n not in self._servers]
        if unknown:
            raise ToolCallError(unknown[0], "-", f"no enabled server named {unknown[0]!r}", "unknown_server")
        reports = await asyncio.gather(*(self._check(self._servers[n], timeout) for n in names))
        return {r.server: r for r in reports}

    async def _check(self, state: ServerState, timeout: float | None) -> HealthReport:
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
            report = self._report(state, None, None, source="busy")
            self._notify_health(report)
            return report
        except TimeoutError:
            error = f"no answer to a health check within {timeout:g} s"
        except (ConnectError, SecretMissing) as exc:
            error = str(exc)
        except Exception as exc:
            error = describe(exc)
        if error is None:
            state.breaker.success(latency)
            if state.error is not None and self._servers.get(state.cfg.name) is state:
                # Down when discovered (no tools, or stale cached ones): back now, so discover it again.
                self._spawn(self.refresh([state.cfg.name]))
        else:
            state.breaker.failure()
        report = self._report(state, latency, error)
        await self._publish_health(state, report)
        return report

    def _report(
        self, state: ServerState, latency: float | None, error: str | None, source: str = "check"
    ) -> HealthReport:
        b = state.breaker
        said = None if error is None else scrub(error)  # what a refusing server said may quote our credentials
        return HealthReport(state.cfg.name, error is None, latency, said, b.status, b.failures, source)

    def _refuse_if_down(self, state: ServerState, tool: str) -> None:
        if not state.breaker.allow():
            wait = state.breaker.seconds_to_retry()
            reason = f"the server is not answering right now (down; next try in {wait:.0f} s)"
            raise CircuitOpen(state.cfg.name, tool, reason, "unreachable")

    def _on_call_done(self, state: ServerState, job: Job) -> None:
        """Calls feed the breaker too: a call that could not reach the server is a failure, one the server
        answered (even with an error) a success; a timeout tells nothing about reachability."""
        if self._servers.get(state.cfg.name) is not state:
            return  # removed or replaced meanwhile
        breaker, before = state.breaker, state.breaker.status
        error = job.error
        if isinstance(error, CircuitOpen):
            return  # refused without trying: says nothing new about the server
        if error is not None and error.kind == "unreachable":
            breaker.failure()
        elif job.state == "completed" or (
            error is not None and error.kind in ("tool_error", "server_error", "unauthorized")
        ):
            if before in ("up", "unknown") or breaker.failures == 0:
                return  # nothing new (a slow server stays degraded until a check finds it quick again)
            breaker.success()
        else:
            breaker.probe_inconclusive()
            return
        if breaker.status != before:
            report = self._report(state, None, error.reason if error else None, source="call")
            self._spawn(self._publish_health(state, report))

    async def _publish_health(self, state: ServerState, report: HealthReport) -> None:
        changed = report.status != state.last_status
        if changed:
            if report.status == "down":
                log.warning("server %s is down: %s", state.cfg.name, report.error)
            elif state.last_status in ("down", "degraded") and report.status == "up":
                log.info("server %s is back up", state.cfg.name)
            state.last_status = report.status
        self._notify_health(report)
        if self.registry is None or state.cfg.id is None:
            return
        if not self.record_every_check and not changed:
            return
        try:
            async with state.health_writes:
                await self.registry.record_health(
                    state.cfg.id,
                    report.status,
                    report.latency_ms,
                    report.consecutive_failures,
                    report.error,
                    checked=report.source == "check" and self.record_every_check,
                )
        except Exception as exc:
            log.warning("server %s: health not recorded: %s", state.cfg.name, describe(exc))

    def _notify_health(self, report: HealthReport) -> None:
        for observe in self.health_observers:
            try:
                observe(report)
            except Exception:
                log.exception("health observer failed")

    # -- shutdown -------------------------------------------------------------------------------------------

    def _spawn(self, coro: Any, into: set[asyncio.Task[Any]] | None = None) -> asyncio.Task[Any]:
        group = self._background if into is None else into
        task = asyncio.create_task(coro, context=outside_job())
        group.add(task)
        task.add_done_callback(group.discard)
        return task

    async def aclose(self) -> None:
        if self._writes:
            # Cache writes are finished, not cancelled: the next session starts from them.
            await asyncio.wait(list(self._writes), timeout=5.0)
        # Running jobs are cancelled together, and every job's final row written before we go; bounded, and with
        # no retries: a database outage must not hold a session's shutdown for minutes.
        jobs = list(self._jobs.values())
        for job in jobs:
            job.stop_retrying()
        ending = [asyncio.ensure_future(j.cancel() if not j.done else j.settled()) for j in jobs]
        if ending:
            _, late = await asyncio.wait(ending, timeout=5.0)
            for fut in late:
                fut.cancel()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.gather(*(s.conn.close() for s in self._servers.values()), *self._closing, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()


def _connection_lost(exc: MCPError) -> bool:
    # CONNECTION_CLOSED (-32000) is what the SDK raises for every request pending when a transport ends, and for
    # one Streamable HTTP request whose response stream broke off.
    return exc.error.code == CONNECTION_CLOSED or "closed" in exc.error.message.lower()


def _session_expired(exc: MCPError) -> bool:
    # Streamable HTTP answers an unknown session id with 404: the SDK passes on the server's JSON-RPC error
    # ("Session not found" from the Python and TypeScript SDKs) or, without one, says "Session terminated".
    message = exc.error.message.lower()
    return "session not found" in message or "session terminated" in message or "session expired" in message
