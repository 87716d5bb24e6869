"""The dispatcher: connections to every enabled server, one tool index under safe names, and calls as jobs.

Public verbs, as teams porting from the original design know them: `execute_tool` (submit, returns a job
id at once), `get_result` (wait for or read that job's outcome), and `call` (both together); health checks are
`health.Health`'s, which holds the circuit breakers and gates the calls through `call_gates`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import mcp_types as types
from jsonschema import Draft202012Validator
from jsonschema.validators import validator_for
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED

from mcp_integration.aio import Deadlines, spawn
from mcp_integration.connection import AuthFor, ProgressCallback, ServerConnection
from mcp_integration.elicitation import Answer, Asker, Question, decline_all
from mcp_integration.errors import (
    ConnectError,
    ConnectionLost,
    NeedsLogin,
    Reconnecting,
    SecretMissing,
    ToolCallError,
    Unauthorized,
)
from mcp_integration.explain import describe
from mcp_integration.job_store import JobRecord
from mcp_integration.jobs import Job, WaitPolicy
from mcp_integration.limits import argument_problem, flat_schema_check
from mcp_integration.naming import assign_names
from mcp_integration.protocol_memory import KnownProtocol
from mcp_integration.receipts import ReceiptPoller, default_http_client, read_acknowledgment
from mcp_integration.registry import Registry, ServerConfig, StartCache, ToolSpec
from mcp_integration.results import ToolResult
from mcp_integration.sampling import Sampled, Sampler, SamplingRequest
from mcp_integration.tasks import TaskHandle
from mcp_integration.timing import DurationStats
from mcp_integration.tool_lists import StoredList
from mcp_integration.waiters import wait_receipt, wait_task

__all__ = [
    "MAX_POLLS_IN_FLIGHT",
    "RECALL_WAIT_S",
    "SEED_WAIT_S",
    "SUBMIT_CONNECT_PATIENCE_S",
    "SUBMIT_WAITS_OUT_S",
    "Dispatcher",
    "ServerState",
    "ToolEntry",
]


log = logging.getLogger(__name__)

# Receipt polls in flight per server: below the HTTP pool's size, so polls queue here (cheaply) and not
# inside the pool, whose queue scan is quadratic and starves the event loop with a thousand waiters.
MAX_POLLS_IN_FLIGHT = 32
# How long a call's submit may wait for its tool's past durations (learned timing) to load.
SEED_WAIT_S = 0.5
# How long a start may wait for the servers' remembered protocols: they only save round trips, so with the
# database slow the servers negotiate afresh instead.
RECALL_WAIT_S = 1.0
# A call facing a server that refuses connections quickly (restarting, say) waits out the connection's backoff
# between attempts when the wait is short (up to 1 s each, 2 s in all), then fails as unreachable; a call that
# meets a longer backoff fails at once with the reason ("reconnecting ...; next attempt in N s").
SUBMIT_CONNECT_PATIENCE_S = 2.0
SUBMIT_WAITS_OUT_S = 1.0


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


class Dispatcher:
    def __init__(
        self,
        registry: Registry | None,
        *,
        connect_timeout: float = 10.0,
        max_calls_per_server: int = 64,
        keep_jobs: int = 1000,
        background_s: float = 600.0,
        auth_for: AuthFor | None = None,
    ) -> None:
        self.background_s = background_s
        self.auth_for = auth_for
        self._stats = DurationStats()
        self._seeding: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._poll_slots: dict[str, asyncio.Semaphore] = {}
        self._http: httpx.AsyncClient | None = None
        self.registry = registry
        self.connect_timeout = connect_timeout
        self._servers: dict[str, ServerState] = {}
        # What each server negotiated, as the registry has it (or will once written): a connect that learns
        # something else writes it (protocol_memory.py).
        self._protocols: dict[str, KnownProtocol] = {}
        # Each server's tool list as the registry's cache holds it (read at start, or written since): a discovery
        # that finds the same list only marks it fresh instead of rewriting it.
        self._stored: dict[str, list[ToolSpec]] = {}
        self._index: dict[str, ToolEntry] = {}
        # The same entries by (server, original name) and (server, safe name): a call naming its server is found
        # without a scan of every tool.
        self._by_server: dict[tuple[str, str], ToolEntry] = {}
        # Per tool: the schema it was compiled from, its validator, and the fast check for flat schemas.
        self._validators: dict[tuple[str, str], tuple[Any, Any, Callable[[Any], bool] | None]] = {}
        self._policies: dict[tuple[int, int, float], WaitPolicy] = {}
        # Every job's background limit and every wait's deadline, behind one loop timer (see aio.Deadlines).
        self._deadlines = Deadlines()
        self._jobs: dict[str, Job] = {}  # by Job.key
        self._keep_jobs = keep_jobs
        self._limits: dict[str, asyncio.Semaphore] = {}
        self._max_calls = max_calls_per_server
        self._background: set[asyncio.Task[Any]] = set()
        # Servers being listed again after they said their tools changed: True when told again meanwhile.
        self._relisting: dict[str, bool] = {}
        self._writes: set[asyncio.Task[Any]] = set()
        self._closing: set[asyncio.Task[Any]] = set()
        # Called with each new job before it starts (metrics, logs): they attach listeners to its events.
        self.job_observers: list[Callable[[Job], None]] = []
        # Asked before each call is sent, with (server, tool): raising ToolCallError refuses it (health.py's circuit
        # breakers; the refusal is still a job, recorded and counted).
        self.call_gates: list[Callable[[str, str], None]] = []
        # Who answers a server's questions (elicitation) during a call, unless the call names its own asker: the
        # voice session sets its own; by default nobody is there, and the question is declined.
        self.asker: Asker = decline_all
        # Who writes completions for servers allowed to sample (`allow_sampling`): the voice session's LLM.
        self.sampler: Sampler | None = None
        # Told of each finished call, with the server's state as it was when the call was made.
        self.call_observers: list[Callable[[ServerState, Job], None]] = []

    # -- servers and discovery ------------------------------------------------------------------------------

    def _connection(self, cfg: ServerConfig) -> ServerConnection:
        conn = ServerConnection(
            cfg,
            connect_timeout=self.connect_timeout,
            auth_for=self.auth_for,
            known=self._protocols.get(cfg.name),
            on_learned=lambda memory: self._learned(cfg, memory),
        )
        conn.ask = lambda params, meta: self._question(cfg.name, params, meta)
        conn.sample = lambda params, meta: self._sampling(cfg.name, params, meta)
        conn.tools_changed = lambda: self._tools_changed(cfg)
        return conn

    def _tools_changed(self, cfg: ServerConfig) -> None:
        """The server said its tool list changed: listed again in the background, and the index follows (the voice
        layer offers what the index holds at each turn). Changes told during a listing make one more after it."""
        state = self._servers.get(cfg.name)
        if state is None or state.cfg is not cfg:
            return  # a replaced server's old connection
        if cfg.name in self._relisting:
            self._relisting[cfg.name] = True
            return
        self._relisting[cfg.name] = False
        log.info("server %s: its tool list changed; listing it again", cfg.name)
        spawn(self._relist(cfg.name), self._background)

    async def _relist(self, name: str) -> None:
        try:
            await self.refresh([name])
            while self._relisting[name]:
                self._relisting[name] = False
                await self.refresh([name])
        finally:
            del self._relisting[name]

    def _job_for(self, server: str, *metas: Any) -> Job | None:
        """The job of the call a server's request came in: the task it names, else the server's one running
        call, else its latest (a session rarely runs two calls to one server that ask)."""
        running = [j for j in self._jobs.values() if j.server == server and j.state == "working" and not j.done]
        related = next((r for r in map(_related_task, metas) if r), None)
        job = next((j for j in running if related and j.task_id == related), None)
        return job if job is not None else (running[-1] if running else None)

    async def _sampling(self, server: str, params: Any, meta: Any) -> Sampled:
        """A server's request for a completion; raises ValueError with the reason it is refused."""
        job = self._job_for(server, meta, getattr(params, "meta", None))
        request = SamplingRequest.from_request(server, job.tool if job else None, params)
        if self.sampler is None:
            if job is not None:
                job.sampled(request, None, "no LLM in this process")
            raise ValueError("no LLM is here to sample (a voice session serves sampling)")
        try:
            result = await self.sampler(request)
        except Exception as exc:
            if job is not None:
                job.sampled(request, None, f"{type(exc).__name__}: {exc}"[:200])
            raise ValueError("the LLM could not answer") from None
        if job is not None:
            job.sampled(request, result)
        return result

    async def _question(self, server: str, params: Any, meta: Any) -> Answer:
        """A server's question (elicitation) goes to the job of the call it came in (`_job_for`)."""
        job = self._job_for(server, meta, getattr(params, "meta", None))
        try:
            question = Question.from_request(server, job.tool if job else None, params)
        except ValueError as exc:
            log.warning("server %s asked a question that cannot be put to anyone: %s", server, exc)
            if job is not None:
                job.note_question(
                    {"message": str(getattr(params, "message", ""))[:200], "action": "decline", "why": str(exc)}
                )
            return Answer("decline", why=str(exc))
        if job is None:
            log.info("server %s asked %r outside any call; declined", server, question.message[:80])
            return Answer("decline", why="asked outside any call")
        return await job.ask(question)

    async def start(
        self,
        *,
        wait: bool = True,
        servers: list[ServerConfig] | None = None,
        cached: dict[str, list[ToolSpec]] | None = None,
        protocols: Mapping[str, KnownProtocol] | None = None,
        cached_is_stored: bool = True,
        lists: Mapping[str, StoredList] | None = None,
    ) -> None:
        """Load the enabled servers. With `wait=False` the index comes from the tool cache at once and fresh
        discovery runs in the background (`await dispatcher.refreshed()` to wait for it). `servers`, `cached` and
        `protocols` replace the registry's lists; `cached_is_stored=False` says `cached` is a copy from elsewhere
        (the on-disk snapshot, when the database is unreachable), not what the registry holds. Without `cached`,
        the tool cache and the remembered protocols are read in one query (with `wait=True` too: the protocols
        save round trips, and an unchanged tool list is then not rewritten). `lists`: the tools/list answers the
        servers let clients reuse (read with the cache): a server whose answer still holds is not asked for it
        (tool_lists.py), and with its protocol remembered too, a start sends it nothing at all."""
        if servers is None:
            if self.registry is None:
                raise ValueError("a dispatcher without a registry needs its servers passed in")
            servers = await self.registry.list_servers(enabled_only=True)
        if cached is None and self.registry is not None:
            recalled = await self._recall(bounded=wait)
            self._stored.update(recalled.tools)
            cached = None if wait else recalled.tools
            protocols = recalled.protocols if protocols is None else protocols
            lists = recalled.lists if lists is None else lists
        elif cached is not None and cached_is_stored:
            self._stored.update(cached)
        self._protocols.update(protocols or {})
        for cfg in servers:
            state = self._servers[cfg.name] = ServerState(cfg, self._connection(cfg))
            state.conn.tool_lists.seed((lists or {}).get(cfg.name))
        if wait or (self.registry is None and cached is None):
            await self.refresh(reuse=True)
            return
        assert cached is not None
        for name, state in self._servers.items():
            if name in cached:
                state.tools, state.from_cache = cached[name], True
        self._rebuild_index()
        spawn(self.refresh(reuse=True), self._background)

    async def refreshed(self) -> None:
        """Wait for background discovery started by `start(wait=False)`."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def refresh(self, names: list[str] | None = None, *, reuse: bool = False) -> dict[str, str | None]:
        """Connect to and discover the given servers (default: all), concurrently. Returns each one's error.
        `reuse` (a session start): a tools/list answer the server let clients reuse is taken while it holds;
        otherwise every server is asked."""
        wanted = list(self._servers) if names is None else names
        targets = [self._servers[n] for n in wanted if n in self._servers]
        confirmed: list[int] = []
        errors = await asyncio.gather(*(self._discover(s, confirmed, reuse) for s in targets))
        self._rebuild_index()
        if confirmed and self.registry is not None:
            # Unchanged lists are marked fresh together, once every discovery is done: one statement, and none
            # competing with the discoveries still under way.
            spawn(self._touch_tools(confirmed), self._writes)
        return {s.cfg.name: e for s, e in zip(targets, errors, strict=True)}

    async def _discover(self, state: ServerState, confirmed: list[int], reuse: bool = False) -> str | None:
        """Connect and list; a new list is written to the cache at once, an unchanged one's id is added to
        `confirmed`."""
        try:
            tools = await state.conn.open_and_list_tools(known=self._stored.get(state.cfg.name, ()), reuse=reuse)
        except (ConnectError, SecretMissing) as exc:
            state.error = str(exc)
        except Exception as exc:
            refusal = state.conn.refusal()
            state.error = str(refusal) if refusal else f"server {state.cfg.name!r}: tools/list failed: {describe(exc)}"
        else:
            state.tools, state.from_cache, state.error = tools, False, None
            state.skipped = state.conn.skipped_tools
            state.discovered_at = time.time()
            if self.registry is not None and state.cfg.id is not None:
                self._keep_list(state)
                if _same_tools(self._stored.get(state.cfg.name), tools):
                    confirmed.append(state.cfg.id)
                else:
                    # Off the critical path: the index is ready before the cache is written.
                    spawn(self._save_tools(state.cfg, tools), self._writes)
            return None
        log.warning("%s", state.error)
        return state.error

    def _keep_list(self, state: ServerState) -> None:
        """A reusable tools/list answer the discovery got from the server: stored in the background for the next
        session start. One it got without a `ttlMs`, where one was stored: the stored one is dropped (the list
        may have changed, and it would be served as it was until it expired)."""
        store = state.conn.tool_lists
        learned = store.take_learned()
        if learned is not None or store.take_dropped():
            spawn(self._write_tool_list(state.cfg, learned), self._writes)

    async def _write_tool_list(self, cfg: ServerConfig, stored: StoredList | None) -> None:
        """Store a server's reusable tools/list answer, or (None) drop the one stored."""
        assert self.registry is not None and cfg.id is not None
        try:
            if stored is None:
                await self.registry.forget_tool_list(cfg.id)
            else:
                await self.registry.save_tool_list(cfg.id, stored)
        except Exception as exc:
            log.info(
                "server %s: reusable tool list not %s: %s",
                cfg.name,
                "dropped" if stored is None else "stored",
                describe(exc),
            )

    async def _save_tools(self, cfg: ServerConfig, tools: list[ToolSpec]) -> None:
        assert self.registry is not None and cfg.id is not None
        try:
            await self.registry.save_tools(cfg.id, tools)
        except Exception as exc:
            log.warning("server %s: tool cache not saved: %s", cfg.name, describe(exc))
        else:
            self._stored[cfg.name] = tools

    async def _touch_tools(self, server_ids: list[int]) -> None:
        assert self.registry is not None
        try:
            await self.registry.touch_tools(server_ids)
        except Exception as exc:
            log.warning("tool cache not marked fresh: %s", describe(exc))

    async def _recall(self, *, bounded: bool) -> StartCache:
        """The tool cache and the remembered protocols, in one read. `bounded` (discovery follows anyway): what is
        not read within RECALL_WAIT_S is done without."""
        assert self.registry is not None
        if not bounded:
            return await self.registry.start_cache()
        try:
            async with asyncio.timeout(RECALL_WAIT_S):
                return await self.registry.start_cache()
        except Exception as exc:
            log.info("tool cache and remembered protocols not read (%s); servers negotiate afresh", describe(exc))
            return StartCache({}, {}, {})

    @property
    def protocols(self) -> dict[str, KnownProtocol]:
        """What each server negotiated, by name (for the on-disk snapshot)."""
        return dict(self._protocols)

    def _learned(self, cfg: ServerConfig, memory: KnownProtocol) -> None:
        """A connect negotiated `memory`: stored in the background when it is news (a first meeting, a server
        that changed, a DiscoverResult asked again because the one remembered had gone stale), never on the
        connect's path."""
        state = self._servers.get(cfg.name)
        if state is not None and state.cfg is not cfg:
            return  # a replaced server's old connection
        known = self._protocols.get(cfg.name)
        if known == memory and known is not None and known.fresh():
            return
        self._protocols[cfg.name] = memory
        if self.registry is not None and cfg.id is not None:
            spawn(self._save_protocol(cfg, memory), self._writes)

    async def _save_protocol(self, cfg: ServerConfig, memory: KnownProtocol) -> None:
        assert self.registry is not None and cfg.id is not None
        try:
            await self.registry.save_protocol(cfg.id, memory)
        except Exception as exc:
            log.info("server %s: negotiated protocol not stored: %s", cfg.name, describe(exc))
            if self._protocols.get(cfg.name) == memory:
                del self._protocols[cfg.name]  # so the next connect tries to store it again

    async def add_server(self, cfg: ServerConfig) -> str | None:
        """Add (or replace) a server while running; returns its discovery error, if any."""
        await self.remove_server(cfg.name)
        self._servers[cfg.name] = ServerState(cfg, self._connection(cfg))
        return (await self.refresh([cfg.name]))[cfg.name]

    async def remove_server(self, name: str) -> None:
        self._stored.pop(name, None)  # a server added again under this name has a cache of its own
        state = self._servers.pop(name, None)
        if state is not None:
            self._rebuild_index()  # its tools go at once; closing the connection may take a moment
            closing = spawn(state.conn.close(), self._closing)
            # Shielded: a caller cancelled meanwhile (a watcher stopping) must not leave a stdio process behind;
            # aclose() waits for whatever is still closing.
            await asyncio.shield(closing)

    def _rebuild_index(self) -> None:
        specs = {(s.cfg.name, t.name): t for s in self._servers.values() for t in s.tools}
        names = assign_names(specs)
        self._index = {names[key]: ToolEntry(names[key], spec) for key, spec in specs.items()}
        self._by_server = {(e.server, e.spec.name): e for e in self._index.values()}
        for e in self._index.values():
            self._by_server.setdefault((e.server, e.name), e)
        # A validator stays only while its tool's schema is the one it was compiled from: a server may change a
        # tool's schema under the same name.
        self._validators = {k: v for k, v in self._validators.items() if k in specs and specs[k].input_schema == v[0]}

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
        if server is not None:
            found = self._by_server.get((server, tool))
            if found is not None:
                return found
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
        compiled = self._validators.get(key)
        if compiled is None:
            # Once per tool (the index rebuild drops tools that went): the validator and, for the flat schemas
            # most tools have, a check that proves arguments valid without jsonschema's walk.
            schema = entry.spec.input_schema
            cls = validator_for(schema, default=Draft202012Validator)
            compiled = self._validators[key] = (schema, cls(schema), flat_schema_check(schema))
        _, validator, surely_valid = compiled
        if surely_valid is not None and surely_valid(arguments):
            return
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
        return job.key

    def submit(
        self, tool: str, arguments: dict[str, Any], *, server: str | None = None, asker: Asker | None = None
    ) -> Job:
        entry = self.resolve(tool, server)
        self.validate_arguments(entry, arguments)
        state = self._servers[entry.server]
        cfg = state.cfg
        policy = self._policy(cfg)
        job = Job(
            server=entry.server,
            server_id=cfg.id,
            tool=entry.spec.name,
            arguments=arguments,
            policy=policy,
            deadlines=self._deadlines,
        )
        job.asker = asker or self.asker
        if self.registry is not None:
            job.recorder = JobRecord(job, self.registry.job_queue)
        self._remember(job)
        job.add_listener(lambda e: self._call_done(state, job) if e.kind == "done" else None)
        for observe in self.job_observers:
            try:
                observe(job)
            except Exception:  # metrics or logs must never cost a caller the call
                log.exception("job observer failed")
        return job.start(lambda j: self._perform(j, state, entry.spec))

    async def get_result(self, job_id: str | uuid.UUID, timeout: float | None = None) -> ToolResult:
        """Wait for a job's result (a timeout ends this wait, not the job); read a finished one from mcp_jobs."""
        jid = uuid.UUID(str(job_id))
        job = self._jobs.get(str(jid))
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
        self,
        tool: str,
        arguments: dict[str, Any],
        *,
        server: str | None = None,
        timeout: float | None = None,
        asker: Asker | None = None,
    ) -> ToolResult:
        return await self.submit(tool, arguments, server=server, asker=asker).wait(timeout)

    def job(self, job_id: str | uuid.UUID) -> Job | None:
        return self._jobs.get(str(uuid.UUID(str(job_id))))

    def _policy(self, cfg: ServerConfig) -> WaitPolicy:
        """The wait policy of calls to this server: one (frozen) per set of limits, not one per call."""
        key = (cfg.timeout_ms, cfg.max_wait_ms, self.background_s)
        policy = self._policies.get(key)
        if policy is None:
            if len(self._policies) > 256:  # servers edited over a long session: do not grow forever
                self._policies.clear()
            policy = self._policies[key] = WaitPolicy(cfg.timeout_ms / 1000, cfg.max_wait_ms / 1000, self.background_s)
        return policy

    def _remember(self, job: Job) -> None:
        self._jobs[job.key] = job
        # Forget the oldest finished jobs (their outcome stays readable from mcp_jobs), a batch at a time: a scan
        # on every submit once the history is full cost each call more than its job record.
        if len(self._jobs) > self._keep_jobs + max(16, self._keep_jobs // 8):
            excess = len(self._jobs) - self._keep_jobs
            for jid in [j for j, v in self._jobs.items() if v.done][:excess]:
                del self._jobs[jid]

    async def _perform(self, job: Job, state: ServerState, spec: ToolSpec) -> ToolResult:
        # Refused inside the job, not before it: a call to a down server is still a job, recorded and counted.
        for gate in self.call_gates:
            gate(state.cfg.name, job.tool)
        cfg = state.cfg
        limit = self._limits.get(cfg.name)
        if limit is None:  # not setdefault: that built a Semaphore on every call to throw it away
            limit = self._limits[cfg.name] = asyncio.Semaphore(self._max_calls)
        key = (cfg.name, spec.name)
        if self.registry is not None and key not in self._stats.seeded:
            await self._seeded(key)  # awaited only until loaded: most calls have no coroutine to await here
        expected = self._stats.expected(key)

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            job.progress(progress, total, message)

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
            receipt, bare_ack = read_acknowledgment(plain, poll_profile=cfg.poll_profile)
            if receipt is not None:
                slots = self._poll_slots.setdefault(cfg.name, asyncio.Semaphore(MAX_POLLS_IN_FLIGHT))
                result = await wait_receipt(
                    job, self._poller(cfg), receipt, floor_s=floor, expected_s=expected, poll_slots=slots
                )
            elif bare_ack:
                reason = "the server only acknowledged the request and gave no way to fetch the answer"
                raise ToolCallError(cfg.name, job.tool, reason, "tool_error")
            else:
                job.accept_plain()
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
            job.working()
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
                refusal = conn.refusal()
                if refusal is not None:
                    # A 401/403 mid-session (a token that expired or was revoked, a scope only a person can grant):
                    # reconnecting will not help.
                    raise _refused(cfg.name, job.tool, refusal) from None
                if attempt == 0 and _session_expired(exc):
                    why = "the server no longer knows our session"
                    conn.drop(why, generation=generation)
                    job.status("reconnecting", why)
                    continue
                if attempt == 0 and conn.forget_if_mismatch(exc, generation=generation, acted_on=True):
                    # Refused before it ran, on a protocol remembered from before the server changed: resent once
                    # on a fresh negotiation.
                    job.status("reconnecting", "the server's protocol changed")
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
            except (Unauthorized, NeedsLogin) as exc:
                raise _refused(state.cfg.name, job.tool, exc) from None
            except Reconnecting as exc:
                if exc.retry_in > SUBMIT_WAITS_OUT_S or time.monotonic() + exc.retry_in > deadline:
                    raise ToolCallError(state.cfg.name, job.tool, str(exc), "unreachable") from None
                await asyncio.sleep(exc.retry_in)
            except ConnectError as exc:
                if time.monotonic() - started > 1.0 or time.monotonic() >= deadline:
                    raise ToolCallError(
                        state.cfg.name, job.tool, f"cannot reach the server: {exc}", "unreachable"
                    ) from None

    async def _seeded(self, key: tuple[str, str]) -> None:
        """Until the tool's past durations are loaded. One query per tool per process; jobs submitted meanwhile
        wait for it rather than poll blind."""
        seeding = self._seeding.get(key)
        if seeding is None:
            seeding = self._seeding[key] = asyncio.ensure_future(self._seed(key))
        # Bounded: with the database down, the call goes now and polls blind rather than wait for the pool.
        await asyncio.wait([seeding], timeout=SEED_WAIT_S)

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

    def _call_done(self, state: ServerState, job: Job) -> None:
        if self._servers.get(state.cfg.name) is not state:
            return  # removed or replaced meanwhile: what the call says is about a server no longer here
        for observe in self.call_observers:
            try:
                observe(state, job)
            except Exception:
                log.exception("call observer failed")

    # -- shutdown -------------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._writes:
            # Cache writes are finished, not cancelled: the next session starts from them.
            await asyncio.wait(list(self._writes), timeout=5.0)
        # Running jobs are cancelled together, and every job's final row written before we go; bounded, and with
        # no retries: a database outage must not hold a session's shutdown for minutes.
        jobs = list(self._jobs.values())
        for job in jobs:
            job.stop_retrying()

        async def end(job: Job) -> None:
            if not job.done:
                await job.cancel()
            await job.settled()

        ending = [asyncio.ensure_future(end(j)) for j in jobs]
        if self.registry is not None:
            # Records queued for jobs no longer held (the oldest are forgotten) are written too, in the same bound.
            ending.append(asyncio.ensure_future(self.registry.jobs_flushed()))
        if ending:
            _, late = await asyncio.wait(ending, timeout=5.0)
            for fut in late:
                fut.cancel()
        # The deadlines are left to fire, not dropped: a wait on a job that outlived the bound above still ends at
        # its timeout (a deadline that fires for an ended job does nothing).
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.gather(*(s.conn.close() for s in self._servers.values()), *self._closing, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()


def _same_tools(stored: list[ToolSpec] | None, found: list[ToolSpec]) -> bool:
    if stored is None or len(stored) != len(found):
        return False
    return sorted(stored, key=lambda t: t.name) == sorted(found, key=lambda t: t.name)


def _related_task(meta: Any) -> str | None:
    if meta is None:
        return None
    data = meta if isinstance(meta, dict) else getattr(meta, "model_extra", None) or {}
    related = data.get("io.modelcontextprotocol/related-task")
    return related.get("taskId") if isinstance(related, dict) else None


def _connection_lost(exc: MCPError) -> bool:
    # CONNECTION_CLOSED (-32000) is what the SDK raises for every request pending when a transport ends, and for
    # one Streamable HTTP request whose response stream broke off.
    return exc.error.code == CONNECTION_CLOSED or "closed" in exc.error.message.lower()


def _session_expired(exc: MCPError) -> bool:
    # Streamable HTTP answers an unknown session id with 404: the SDK passes on the server's JSON-RPC error
    # ("Session not found" from the Python and TypeScript SDKs) or, without one, says "Session terminated".
    message = exc.error.message.lower()
    return "session not found" in message or "session terminated" in message or "session expired" in message


def _refused(server: str, tool: str, refusal: ConnectError) -> ToolCallError:
    if isinstance(refusal, NeedsLogin):
        return ToolCallError(server, tool, _login_reason(refusal), "needs_login")
    if isinstance(refusal, Unauthorized):
        return ToolCallError(server, tool, f"needs authorization (HTTP {refusal.status})", "unauthorized")
    return ToolCallError(server, tool, str(refusal), "unauthorized")


def _login_reason(exc: NeedsLogin) -> str:
    wanted = f" with scope {exc.scope!r}" if exc.scope else ""
    return f"needs a login{wanted}: run `python -m mcp_integration servers login {exc.server}`"
