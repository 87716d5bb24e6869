"""One live MCP client connection to one registered server, owned by a task of its own.

The SDK's client is an anyio context manager that must be entered and left in the same task; a dedicated
runner task holds it open, so any task may send requests while it lives, and closing is always clean.

A connection also tells a dead server from a slow one, on evidence a busy server cannot produce: the transport's
stream ending (process exited, pipe or socket closed, event stream ended), or a probe whose own request fails
outright (connection refused or reset, stream closed), sent when a request's own stream broke. The first time
requests wait (`watch`) on an opening and the server is silent for `probe_after_s`, it gets one probe (MCP
`ping`, or `server/discover` on 2026-07-28). An *unanswered* probe proves nothing: many real servers (n8n among
them) handle one request per session at a time and answer a ping only when the call in front of it ends. Such a
server is remembered as `serial` (which the health checks heed); its calls end at their idle timeout like any
slow server's. Answered or not, that is the opening's only probe while requests wait: a probe every half second
of silence (two a second through a long call) found no fault the transport did not already show (every hard
fault on every transport failed the call within 0.02 s with those probes off, bench/liveness.py), and was 4 %
more requests under bench/load.py. A lost connection is torn down in the background and
reopened by the next `open()`; opening that keeps failing backs off (exponential, jittered, capped).

What a server negotiated is remembered (`known`, kept across reopenings and handed to the dispatcher to store):
the next connection skips the `server/discover` probe, or on 2026-07-28 every handshake round trip (the first
opening adopts the stored DiscoverResult; a reopening, which follows a loss, negotiates: an adopted session sends
nothing at open, and a server that went away must be seen to be back before a call is sent to it). If the server
has changed protocol since, the first failure that could say so (at the handshake, or on the first request of an
adopted session) forgets it, and the connection negotiates afresh at once (protocol_memory.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import mcp_types as types
from mcp import Client
from mcp.client.caching import CacheConfig, CacheMode
from mcp.client.session import ClientSession
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS

from mcp_integration import __version__
from mcp_integration.aio import Backoff
from mcp_integration.elicitation import Answer
from mcp_integration.errors import Busy, ConnectError, ConnectionLost, NeedsLogin, Reconnecting, Unauthorized
from mcp_integration.explain import describe, refused_status
from mcp_integration.limits import storable
from mcp_integration.logs import outside_job
from mcp_integration.protocol_memory import KnownProtocol, could_be_mismatch, fingerprint, learned
from mcp_integration.registry import ServerConfig, ToolSpec
from mcp_integration.sampling import Sampled
from mcp_integration.tasks import TaskClient
from mcp_integration.tool_guard import ToolListGuard
from mcp_integration.tool_lists import ToolListStore
from mcp_integration.transports import open_transport
from mcp_integration.ws_transport import FrameTooLarge

__all__ = [
    "BACKOFF_CAP_S",
    "BACKOFF_FIRST_S",
    "CLIENT_INFO",
    "MAX_TOOLS",
    "MAX_TOOL_PAGES",
    "PROBE_AFTER_S",
    "PROBE_TIMEOUT_S",
    "AuthFor",
    "Learned",
    "ProgressCallback",
    "ServerConnection",
]


log = logging.getLogger(__name__)

ProgressCallback = Callable[[float, float | None, str | None], Awaitable[None]]
# The HTTP auth (an OAuth provider) of a server, or None: given by the composition root (`oauth.OAuthBroker`).
AuthFor = Callable[[ServerConfig], "httpx2.Auth | None"]
# A server's question during a call (the SDK's elicitation params and the request's _meta) to its answer.
QuestionHandler = Callable[[Any, Any], Awaitable[Answer]]
# A server's sampling request (the SDK's params and the request's _meta) to the completion; ValueError refuses it.
SampleHandler = Callable[[Any, Any], Awaitable[Sampled]]
# Told what a server negotiated on a connect that learned something (the dispatcher stores it); must not block.
Learned = Callable[[KnownProtocol], None]
_T = TypeVar("_T")

# Liveness while a request waits. After PROBE_AFTER_S without a word from the server, one probe goes out (shared
# by every waiting request: MCP `ping`, or `server/discover` on 2026-07-28, which has no ping). Its request
# failing outright (refused, reset, closed) means dead; an answer means alive; no answer within PROBE_TIMEOUT_S
# means the server is serial (it answers between requests only), which is no sign of death at all.
PROBE_AFTER_S = 0.5
PROBE_TIMEOUT_S = 1.5
# A server's tool list: at most this many pages, and this many tools (a cursor that never ends, or repeats, stops
# here with a warning instead of keeping discovery, and every command waiting on it, busy forever).
MAX_TOOL_PAGES = 100
MAX_TOOLS = 5_000
# Reopening after failed attempts: the first retry waits 0.5 s, doubling to 30 s, each times a jitter of 0.5-1.0 so
# many sessions do not reconnect to one server in lockstep. A successful open resets it.
BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 30.0
# How long a closed connection may take to wind down before its runner is cancelled. It only cuts short an HTTP
# session's DELETE to a dead server: the SDK's stdio shutdown (stdin closed, SIGTERM, SIGKILL, reap) is shielded
# and always completes, so no server process outlives its connection or is left a zombie.
_TEARDOWN_GRACE_S = 5.0

# Who we are, to every server (the SDK would say "mcp 0.1.0").
CLIENT_INFO = types.Implementation(name="voice-mcp", version=__version__)

# A probe's verdict when the server said nothing in time: busy or frozen, no telling which.
_SILENT = "(no answer in time)"

# Why a transport's stream ended, when the runner has no better reason.
_STREAM_ENDED = {
    "stdio": "the server process exited",
    "websocket": "the server closed the WebSocket",
    "sse": "the server closed its event stream",
    "streamable-http": "the connection to the server was lost",
}


class _Flag(asyncio.Event):
    """An event that also resolves `wakes`, the future its opening's runner waits on: one future per opening,
    where waiting on two events took two tasks and an `asyncio.wait`."""

    def __init__(self) -> None:
        super().__init__()
        self.wakes: asyncio.Future[None] | None = None

    def set(self) -> None:
        super().set()
        wakes = self.wakes
        if wakes is not None and not wakes.done():
            wakes.set_result(None)


class _Lost(_Flag):
    """Set when a connection is gone: also cancels the tasks waiting on its requests (`watch`), which then raise
    ConnectionLost instead of waiting for an answer that cannot come."""

    def __init__(self) -> None:
        super().__init__()
        self.waiters: set[asyncio.Task[Any]] = set()
        self.cancelled: set[asyncio.Task[Any]] = set()

    def set(self) -> None:
        if self.is_set():
            return
        super().set()
        for task in self.waiters:
            if not task.done():
                self.cancelled.add(task)
                task.cancel()


@dataclass(eq=False)
class _Link:
    """One opening of the connection: its runner, its client, and what is known of its liveness."""

    generation: int
    closing: _Flag = field(default_factory=_Flag)
    lost: _Lost = field(default_factory=_Lost)
    heard_at: float = field(default_factory=time.monotonic)  # the last message from the server
    runner: asyncio.Task[None] | None = None
    client: Client | None = None
    guard: ToolListGuard | None = None
    reason: str | None = None  # why it was lost, when known
    watching: int = 0  # requests waiting under `watch`
    watch_since: float = 0.0
    keeper: asyncio.TimerHandle | None = None  # when the watch next looks at the server's silence
    judging: asyncio.Task[None] | None = None  # a watch probe whose verdict is awaited
    watch_probed: bool = False  # the one probe an opening sends while requests wait has had its verdict
    probe: asyncio.Task[str | None] | None = None
    refused: int | None = None  # the last HTTP answer was 401 or 403 (None once a request succeeds again)
    auth: httpx2.Auth | None = None  # the OAuth provider signing this opening's requests, if any
    remembered: bool = False  # opened with a remembered protocol instead of negotiating one
    adopted: bool = False  # ... a 2026-07-28 one, adopted with no round trip (nothing was sent at open)
    proven: bool = False  # the server has answered a request of this opening with a result

    def heard(self, item: Any) -> None:
        """Every item the server's stream gives: silence is what triggers a probe."""
        self.heard_at = time.monotonic()
        if not self.proven and isinstance(getattr(item, "message", None), types.JSONRPCResponse):
            self.proven = True  # a result: the protocol this opening speaks is one the server speaks

    def saw_status(self, status: int) -> None:
        if status in (401, 403):
            self.refused = status
        elif status < 400:
            self.refused = None


class ServerConnection:
    def __init__(
        self,
        cfg: ServerConfig,
        *,
        connect_timeout: float = 10.0,
        probe_after_s: float = PROBE_AFTER_S,
        probe_timeout_s: float = PROBE_TIMEOUT_S,
        auth_for: AuthFor | None = None,
        known: KnownProtocol | None = None,
        on_learned: Learned | None = None,
    ) -> None:
        self.cfg = cfg
        self.auth_for = auth_for
        self._fingerprint = fingerprint(cfg)
        # What the server negotiated last (here or, through the registry, in an earlier process); used by the next
        # opening. Only a memory of this very server counts: one learned where the row pointed before is ignored.
        self.known = known if known is not None and known.fingerprint == self._fingerprint else None
        self.on_learned = on_learned
        self.connect_timeout = connect_timeout
        self.probe_after_s = probe_after_s
        self.probe_timeout_s = probe_timeout_s
        self._link: _Link | None = None
        self._generations = itertools.count(1)
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self._unopened = asyncio.Event()
        self._reopen = Backoff(BACKOFF_FIRST_S, BACKOFF_CAP_S)
        self._retry_at = 0.0
        self.last_error: str | None = None
        self.probes = 0  # liveness probes sent, over the connection's life (for metrics and tests)
        # The SDK's response cache for this server's tools/list, kept across openings (tool_lists.py).
        self.tool_lists = ToolListStore(cfg.name)
        # Learned, and kept across reopenings: the server answers one request at a time (a probe sent while a
        # request of ours was in flight went unanswered). It gets no more probes while requests wait.
        self.serial = False
        # The MCP tasks runtime (both dialects) on this connection's session; see tasks.py. A plain tool call's
        # length is bounded by the job engine (its wait policy), not here.
        self.tasks = TaskClient(lambda: self.client.session)
        # Who answers the server's questions (elicitation): set by the dispatcher, which knows the call's job.
        self.ask: QuestionHandler | None = None
        # Who writes a completion the server asks for (sampling), when its registry row allows it.
        self.sample: SampleHandler | None = None
        # Told when the server says its tool list changed (`notifications/tools/list_changed`): the dispatcher
        # lists it again. The SDK has already dropped its cached tools/list answer by then.
        self.tools_changed: Callable[[], None] | None = None

    # -- state ----------------------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        link = self._link
        return (
            link is not None
            and link.client is not None
            and link.runner is not None
            and not link.runner.done()
            and not link.lost.is_set()
            and not link.closing.is_set()
        )

    @property
    def lost(self) -> asyncio.Event:
        """Set when the current connection is gone (stream ended, server silent, or closed): waiters wake on it
        instead of discovering a dead server by timeout. A reopen brings a new, unset event."""
        return self._link.lost if self._link is not None else self._unopened

    @property
    def generation(self) -> int:
        """Which opening this is (0 before the first): lets a caller drop only the connection it used."""
        return self._link.generation if self._link is not None else 0

    @property
    def refused(self) -> int | None:
        """401 or 403 when the server's last HTTP answer refused our credentials, else None."""
        return self._link.refused if self._link is not None else None

    @property
    def needs_login(self) -> NeedsLogin | None:
        """Set when this server's OAuth provider found that only a person can authorise us now (`oauth.py`)."""
        auth = self._link.auth if self._link is not None else None
        return getattr(auth, "needs_login", None)

    def refusal(self) -> ConnectError | None:
        """Why the server refuses us, if it does: a login needed, an authorization flow that failed, or a plain
        401/403."""
        return self._refusal(self._link) if self._link is not None else None

    def _refusal(self, link: _Link) -> ConnectError | None:
        auth = link.auth
        needs = getattr(auth, "needs_login", None)
        if needs is not None:
            return needs
        failure = getattr(auth, "failure", None)
        if failure:
            return ConnectError(f"server {self.cfg.name!r}: authorization failed: {failure}")
        return Unauthorized(self.cfg.name, link.refused) if link.refused is not None else None

    @property
    def lost_reason(self) -> str | None:
        return self._link.reason if self._link is not None else None

    @property
    def remembered(self) -> bool:
        """The current opening used a remembered protocol (no `server/discover` probe; on 2026-07-28 no
        handshake at all)."""
        return self._link is not None and self._link.remembered

    @property
    def client(self) -> Client:
        client = self._link.client if self._link is not None else None
        if client is None:
            raise ConnectError(f"server {self.cfg.name!r} is not connected")
        return client

    @property
    def skipped_tools(self) -> list[str]:
        guard = self._link.guard if self._link is not None else None
        return list(guard.skipped) if guard else []

    # -- opening and closing --------------------------------------------------------------------------------

    async def open(self, *, force: bool = False) -> None:
        """Connect (once; concurrent callers share the attempt). Raises ConnectError with the reason, or
        `Reconnecting` at once while an earlier failure's backoff lasts (`force` tries anyway)."""
        async with self._lock:
            if self.is_open:
                return
            wait = self._retry_at - time.monotonic()
            if wait > 0 and not force:
                raise Reconnecting(
                    f"server {self.cfg.name!r}: reconnecting after {self.last_error}; next attempt in {wait:.1f} s",
                    wait,
                )
            memory = self._memory_for(self._link)
            self._retire(self._link)  # a dead connection is buried in the background, not waited for
            link, error = await self._connect(memory)
            if error is not None and link.remembered and self._mismatch(link, error):
                # The server may have changed protocol since we met it: negotiate afresh, at once.
                self._forget(describe(error))
                link, error = await self._connect(None)
            if error is not None:
                raise self._open_failed(link, error) from None
            self.last_error = None
            self._reopen.reset()
            self._retry_at = 0.0
            self._learn(link)

    async def _connect(self, memory: KnownProtocol | None) -> tuple[_Link, BaseException | None]:
        """One opening, with the remembered protocol if there is one: the link, and why it failed if it did."""
        mode, prior = memory.client_mode() if memory is not None else ("auto", None)
        link = self._link = _Link(
            next(self._generations), remembered=mode != "auto", adopted=mode not in ("auto", "legacy")
        )
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        link.runner = asyncio.create_task(
            self._run(link, ready, mode, prior), name=f"mcp-conn-{self.cfg.name}", context=outside_job()
        )
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that arrives as
            # the awaited thing completes (so a cancelled caller would carry on as if not cancelled).
            # Not shielded: a timeout or a cancellation cancels `ready` too, which the runner checks before it
            # sets it, and the opening is retired either way.
            async with asyncio.timeout(self.connect_timeout):
                await ready
        except asyncio.CancelledError:
            self._retire(link)
            raise
        except BaseException as exc:
            self._retire(link)
            return link, exc
        return link, None

    def _open_failed(self, link: _Link, exc: BaseException) -> ConnectError:
        if isinstance(exc, TimeoutError):
            return self._failed(f"no MCP handshake within {self.connect_timeout:g} s")
        if link.refused is None:
            link.refused = refused_status(exc)
        refusal = self._refusal(link)
        if refusal is not None:
            if isinstance(refusal, Unauthorized):
                self._failed(f"needs authorization (HTTP {refusal.status})")
            else:
                self._failed(str(refusal))
            return refusal
        return self._failed(describe(exc))

    # -- the remembered protocol ----------------------------------------------------------------------------

    def _memory_for(self, previous: _Link | None) -> KnownProtocol | None:
        memory = self.known
        if memory is not None and memory.era == "modern" and previous is not None:
            # A reopening follows a loss: the server went away, and may be back changed, or not at all. An
            # adopted session sends nothing at open, so this one negotiates (one round trip, which is also what
            # makes `open()` fail, and back off, on a server that is not back).
            return None
        return memory

    def _learn(self, link: _Link) -> None:
        client = link.client
        if client is None or link.adopted:
            return  # adopted from memory: nothing was negotiated, so nothing new was learned
        memory = learned(client.session, self._fingerprint)
        if memory is None:
            return
        self.known = memory
        if self.on_learned is not None:
            try:
                self.on_learned(memory)
            except Exception:  # storing it is best effort; the connection is open either way
                log.exception("server %s: the negotiated protocol was not passed on", self.cfg.name)

    def _mismatch(self, link: _Link, exc: BaseException, *, acted_on: bool = False) -> bool:
        # Not a refusal (401/403, a login needed): those are about credentials, and the server answered them.
        if link.refused is not None or refused_status(exc) is not None or self._refusal(link) is not None:
            return False
        return could_be_mismatch(exc, acted_on=acted_on)

    def _forget(self, reason: str) -> None:
        memory = self.known
        if memory is not None:
            log.info(
                "server %s: the protocol it spoke before (%s %s) did not work now (%s); negotiating afresh",
                self.cfg.name,
                memory.era,
                memory.protocol_version,
                reason,
            )
        self.known = None

    def forget_if_mismatch(self, exc: BaseException, *, generation: int, acted_on: bool = False) -> bool:
        """After a request failed on the opening `generation` names: if that opening used a remembered protocol,
        no request of it has succeeded yet, and the failure could mean the server changed protocol, forget the
        memory, drop the opening (the next `open()` negotiates afresh) and return True: the caller may try once
        more. `acted_on`: the request may have had side effects (a `tools/call`), so only errors a server gives
        before acting count."""
        link = self._link
        if link is None or link.generation != generation or not link.remembered or link.proven:
            return False
        if not self._mismatch(link, exc, acted_on=acted_on):
            return False
        self._forget(describe(exc))
        # Quietly: nothing was lost but a wrong guess, so no warning, no backoff.
        self._lose(link, "the remembered protocol did not fit", quiet=True)
        return True

    async def open_and_list_tools(self, known: Iterable[ToolSpec] = (), *, reuse: bool = False) -> list[ToolSpec]:
        """`open()` then `list_tools(known=known, reuse=reuse)`, once more on a fresh negotiation when a remembered
        protocol turns out not to fit the server (discovery is read-only, so any failure that could mean that is
        worth the retry)."""
        await self.open()
        generation = self.generation
        try:
            return await self.list_tools(known=known, reuse=reuse)
        except Exception as exc:
            if not (self.forget_if_mismatch(exc, generation=generation) or self._first_contact_failed(exc, generation)):
                raise
        await self.open()
        return await self.list_tools(known=known, reuse=reuse)

    def _first_contact_failed(self, exc: BaseException, generation: int) -> bool:
        """An adopted session's first request found no server (its open sent nothing, so this was the first
        contact): the opening is dropped, and the next one negotiates, failing (and backing off) as a connect to a
        dead server does."""
        link = self._link
        if link is None or link.generation != generation or not link.adopted or link.proven:
            return False
        closed = isinstance(exc, ConnectionLost) or (isinstance(exc, MCPError) and exc.error.code == CONNECTION_CLOSED)
        if not (closed or link.lost.is_set()):
            return False
        # Before the transport's own word of it: the reason is the same, the warning is the connect's.
        self._lose(link, _STREAM_ENDED.get(self.cfg.transport, "the connection was lost"), quiet=True)
        return True

    def _failed(self, reason: str) -> ConnectError:
        self.last_error = reason
        self._retry_at = time.monotonic() + self._reopen.next()
        return ConnectError(f"server {self.cfg.name!r}: {reason}")

    async def _run(
        self, link: _Link, ready: asyncio.Future[None], mode: str, prior: types.DiscoverResult | None
    ) -> None:
        try:
            link.auth = self.auth_for(self.cfg) if self.auth_for is not None else None
            opened = open_transport(
                self.cfg, connect_timeout=self.connect_timeout, on_status=link.saw_status, auth=link.auth
            )
            link.guard = ToolListGuard(
                opened, self.cfg.name, on_closed=lambda: self._stream_ended(link), on_heard=link.heard
            )
            # cache: the tools/list answer a server lets clients reuse (`ttlMs`), served only where discovery
            # asks for it (a session start, `list_tools(reuse=True)`); a refresh always asks the server. Keyed by
            # where the server is; one credential set per registry row, so one partition.
            # extensions: declares the tasks extension (2026) and routes task status pushes to self.tasks.
            # mode/prior: "auto" negotiates (the discover probe, the handshake as fallback); a remembered protocol
            # skips the probe ("legacy") or adopts the server's stored DiscoverResult (a 2026-07-28 version).
            async with Client(
                link.guard.transport(),
                mode=mode,
                prior_discover=prior,
                message_handler=self._message,
                cache=CacheConfig(store=self.tool_lists, partition="registry", target_id=self._fingerprint),
                extensions=self.tasks.extensions(),
                client_info=CLIENT_INFO,
                # Declared always (with no roots unless configured): filesystem-style servers ask, and warn when
                # a client cannot answer.
                list_roots_callback=self._roots,
                # Declared always: a server's question is put to whoever the call's job names (the voice session,
                # a terminal, --input), and is declined when there is nobody.
                elicitation_callback=self._elicit,
                # Declared only for servers the registry allows to sample (the session's LLM answers them).
                sampling_callback=self._sample if self.cfg.allow_sampling else None,
            ) as client:
                link.client = client
                self.tool_lists.speaking(client.session.protocol_version)
                link.heard_at = time.monotonic()
                if not ready.done():
                    ready.set_result(None)
                # Leaving on `lost` too: the transport is closed at once, so a dead stdio server is reaped now.
                ended = asyncio.get_running_loop().create_future()
                link.closing.wakes = link.lost.wakes = ended
                if not (link.closing.is_set() or link.lost.is_set()):
                    await ended
        except BaseException as exc:
            if not ready.done():
                # A cancelled connect (its opener gave up) leaves no exception behind that nobody retrieves.
                ready.cancel() if isinstance(exc, asyncio.CancelledError) else ready.set_exception(exc)
            elif not isinstance(exc, asyncio.CancelledError) and not link.closing.is_set():
                self._lose(link, describe(exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            link.client = None
            link.lost.set()
            if link.keeper is not None:
                link.keeper.cancel()
            if link.judging is not None:
                link.judging.cancel()

    def _stream_ended(self, link: _Link) -> None:
        # The server's stream ended (process exited, socket closed): the one moment a dead connection can be
        # told from a slow one without waiting. Our own close ends it too; that is no loss worth a warning.
        if link.closing.is_set():
            link.lost.set()
        else:
            said = link.guard.ending if link.guard is not None else None
            self._lose(link, said or _STREAM_ENDED.get(self.cfg.transport, "the connection was lost"))

    def _lose(self, link: _Link, reason: str, *, quiet: bool = False) -> None:
        """End the opening. `quiet`: no warning and no `last_error` (nothing was lost but a guess, or the
        connect's own failure says it)."""
        if link.lost.is_set():
            return
        link.reason = reason
        if not quiet:
            self.last_error = reason
            log.warning("server %s: connection lost: %s", self.cfg.name, reason)
        link.lost.set()

    def drop(self, reason: str, *, generation: int | None = None) -> None:
        """Give up the current connection (the next `open()` makes a new one), unless it is no longer the one
        `generation` names: a caller that saw an old connection fail must not drop its replacement."""
        link = self._link
        if link is not None and (generation is None or link.generation == generation):
            self._lose(link, reason)

    def _retire(self, link: _Link | None) -> None:
        if link is None:
            return
        link.closing.set()
        if link.runner is not None and not link.runner.done():
            # A connection that never finished its handshake has nothing to wind down gracefully: stop it now.
            grace = _TEARDOWN_GRACE_S if link.client is not None else 0.0
            task = asyncio.ensure_future(self._bury(link.runner, grace))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _bury(runner: asyncio.Task[None], grace: float) -> None:
        try:
            async with asyncio.timeout(grace):
                await asyncio.shield(runner)
        except TimeoutError:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        except asyncio.CancelledError:
            # We are being cancelled ourselves: end the runner too, and let the cancellation through.
            runner.cancel()
            raise
        except Exception:
            pass  # the runner's own failure is already recorded

    async def close(self) -> None:
        """Close the connection and wait until every earlier one has wound down (server processes reaped)."""
        async with self._lock:
            self._retire(self._link)
        while self._retiring:
            await asyncio.gather(*list(self._retiring), return_exceptions=True)

    async def _roots(self, _context: Any) -> types.ListRootsResult:
        roots = [types.Root(uri=r if r.startswith("file://") else Path(r).as_uri()) for r in self.cfg.roots]
        return types.ListRootsResult(roots=roots)

    async def _elicit(self, context: Any, params: Any) -> types.ElicitResult:
        ask = self.ask
        answer = await ask(params, getattr(context, "meta", None)) if ask is not None else None
        if answer is None:
            return types.ElicitResult(action="decline")
        return types.ElicitResult(action=answer.action, content=answer.content if answer.action == "accept" else None)

    async def _sample(self, context: Any, params: Any) -> types.CreateMessageResult | types.ErrorData:
        sample = self.sample
        try:
            if sample is None:
                raise ValueError("sampling is not served here")
            result = await sample(params, getattr(context, "meta", None))
        except ValueError as exc:
            log.info("server %s: sampling refused: %s", self.cfg.name, exc)
            return types.ErrorData(code=types.INVALID_REQUEST, message=f"sampling refused: {exc}")
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text=result.text),
            model=result.model,
            stop_reason=result.stop_reason,
        )

    async def _message(self, message: Any) -> None:
        if isinstance(message, FrameTooLarge):
            log.warning("server %s: %s; the connection is closed", self.cfg.name, message)
            return
        if isinstance(message, Exception):
            log.warning("server %s: transport error: %s", self.cfg.name, describe(message))
            return
        if isinstance(message, types.ToolListChangedNotification):
            if self.tools_changed is not None:
                self.tools_changed()
            return
        self.tasks.on_message(message)

    # -- liveness -------------------------------------------------------------------------------------------

    async def watch(self, request: Coroutine[Any, Any, _T]) -> _T:
        """Run one request on the open connection; raise ConnectionLost as soon as the connection is lost or the
        server stops answering probes, rather than waiting for an answer that cannot come.

        The request runs in the caller's own task, which the connection's loss cancels (`_Lost`): a task and a
        waiter of its own per request cost a call about a tenth of its CPU (bench/load.py)."""
        link = self._link
        me = asyncio.current_task()
        if link is None or me is None:
            return await request
        lost = link.lost
        if lost.is_set():
            request.close()
            raise ConnectionLost(self.cfg.name, link.reason or "the connection was lost")
        self._watch(link, +1)
        lost.waiters.add(me)
        try:
            return await request
        except asyncio.CancelledError:
            if me not in lost.cancelled:
                raise
            lost.cancelled.discard(me)
            if me.uncancel() > 0:
                raise  # cancelled by its caller too: that cancellation goes on
            raise ConnectionLost(self.cfg.name, link.reason or "the connection was lost") from None
        except MCPError as exc:
            if exc.error.code == CONNECTION_CLOSED and lost.is_set():
                raise ConnectionLost(self.cfg.name, link.reason or "the connection closed") from None
            raise
        finally:
            lost.waiters.discard(me)
            lost.cancelled.discard(me)
            self._watch(link, -1)

    def _watch(self, link: _Link, delta: int) -> None:
        if delta > 0 and link.watching == 0:
            link.watch_since = time.monotonic()
        link.watching += delta
        if link.watching > 0 and link.keeper is None and not link.watch_probed:
            self._keep_watch(link)

    def _keep_watch(self, link: _Link) -> None:
        """One timer per connection, however many requests wait, and left to lapse when none does: probe the
        server once it has been silent too long. A timer, not a task: calls that come one after another each
        started and cancelled a task of their own. Only a probe that fails outright ends the connection; one
        left unanswered marks the server serial; one answered shows a server that answers while it works. One
        probe per opening: after its verdict no other is sent while requests wait (see the module's note)."""
        link.keeper = None
        if not link.watching or link.lost.is_set() or self.serial or link.watch_probed:
            return
        if link.judging is not None and not link.judging.done():
            return  # the probe in flight gives this opening's verdict
        delay = max(link.heard_at, link.watch_since) + self.probe_after_s - time.monotonic()
        if delay > 0:
            link.keeper = asyncio.get_running_loop().call_later(delay, self._keep_watch, link)
        else:
            link.judging = asyncio.create_task(self._probe_and_judge(link), context=outside_job())

    async def _probe_and_judge(self, link: _Link) -> None:
        # Shielded: the probe is shared (check_alive may wait on it too) and ends by itself within its timeout.
        verdict = await asyncio.shield(self._probe(link))
        self._judge(link, verdict)
        link.judging = None
        link.watch_probed = True

    def _judge(self, link: _Link, verdict: str | None) -> None:
        if verdict is _SILENT:
            if not self.serial:
                self.serial = True
                log.info(
                    "server %s answers one request at a time (no reply to a ping while a call ran); "
                    "its calls are left to their idle timeout",
                    self.cfg.name,
                )
        elif verdict is not None:
            self._lose(link, verdict)

    def _probe(self, link: _Link) -> asyncio.Task[str | None]:
        if link.probe is None or link.probe.done():
            self.probes += 1
            link.probe = asyncio.create_task(self._probe_once(link), context=outside_job())
        return link.probe

    async def _probe_once(self, link: _Link) -> str | None:
        """None if the server answered (an error reply is still an answer), `_SILENT` if it did not answer in
        time (busy, or frozen: no telling), else why the connection is known to be dead."""
        client = link.client
        if client is None or link.lost.is_set():
            return link.reason or "the connection closed"
        started = time.monotonic()
        try:
            await _within(_still_there(client.session), self.probe_timeout_s)
        except TimeoutError:
            if link.lost.is_set():
                return link.reason or "the connection closed"
            return None if link.heard_at > started else _SILENT
        except MCPError as exc:
            if exc.error.code == CONNECTION_CLOSED:
                return link.reason or "the connection closed"
            return None
        except Exception as exc:
            return f"the connection failed: {describe(exc)}"
        link.heard_at = max(link.heard_at, time.monotonic())
        return None

    async def check_alive(self) -> bool:
        """Probe the server now (sharing a probe already in flight). False only on evidence of death, which also
        marks the connection lost. No answer in time is no such evidence: a serial server may still be working
        on the very request whose stream broke."""
        link = self._link
        if link is None or not self.is_open:
            return False
        verdict = await asyncio.shield(self._probe(link))
        if verdict is _SILENT:
            return True
        self._judge(link, verdict)
        return verdict is None

    @property
    def busy(self) -> bool:
        """A serial server is working on a request of ours: anything else sent now waits behind it."""
        link = self._link
        return self.serial and link is not None and link.watching > 0

    # -- requests -------------------------------------------------------------------------------------------

    async def list_tools(
        self, timeout: float | None = None, *, known: Iterable[ToolSpec] = (), reuse: bool = False
    ) -> list[ToolSpec]:
        """Every tool the server offers (all pages, within `timeout` and the page and tool caps), less malformed
        ones, repeats of a name, and those outside `allowed_tools`. A server cannot keep us listing forever.
        `known`: this server's tools as last stored (the tool cache); a tool listed unchanged is not made
        storable again. `reuse`: the answer the server let clients reuse (`ttlMs`) is taken while it holds,
        without asking; otherwise the server is asked (and a reusable answer stored for next time)."""
        client = self.client
        mode: CacheMode = "use" if reuse else "refresh"
        deadline = time.monotonic() + (timeout if timeout is not None else self.connect_timeout)
        tools: list[types.Tool] = []
        cursor: str | None = None
        seen_cursors: set[str] = set()
        for _ in range(MAX_TOOL_PAGES):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"listing its tools took longer than {timeout or self.connect_timeout:g} s")
            async with asyncio.timeout(left):
                page = await client.list_tools(cursor=cursor, cache_mode=mode)
            tools.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
            if cursor in seen_cursors or len(tools) >= MAX_TOOLS:
                log.warning(
                    "server %s: its tool list goes on past %d tools; kept the first ones", self.cfg.name, len(tools)
                )
                break
            seen_cursors.add(cursor)
        else:
            log.warning(
                "server %s: its tool list goes on past %d pages; kept what they held", self.cfg.name, MAX_TOOL_PAGES
            )
        allowed = set(self.cfg.allowed_tools)
        stored = {spec.name: spec for spec in known if spec.server == self.cfg.name}
        out: list[ToolSpec] = []
        names: set[str] = set()
        for t in tools[:MAX_TOOLS]:
            if allowed and t.name not in allowed:
                continue
            if t.name in names:
                log.warning("server %s: skipping a second tool named %r", self.cfg.name, t.name[:80])
                continue
            names.add(t.name)
            meta: dict[str, Any] = {}
            if t.execution is not None:
                meta["execution"] = t.execution.model_dump(by_alias=True, exclude_none=True)
            if t.annotations is not None:
                meta["annotations"] = t.annotations.model_dump(by_alias=True, exclude_none=True)
            description, schema = t.description or "", dict(t.input_schema)
            last = stored.get(t.name)
            if last is None or (last.description, last.input_schema, last.meta) != (description, schema, meta):
                # Storable as it is cached (no NUL, no lone surrogates), however the server wrote it.
                description, schema, meta = storable(description), storable(schema), storable(meta)
            # else: equal to what `storable` made of it last time, so storable as it is, told by a comparison in C
            # (every tool of a known server, at every session start). The server's own key order is kept.
            out.append(ToolSpec(self.cfg.name, t.name, description, schema, meta))
        return out

    async def ping(self, timeout: float | None = None) -> float:
        """Round-trip latency in ms: MCP `ping` where the protocol has it (removed in 2026-07-28), else tools/list.

        Raises `Busy` rather than ask a serial server that is working on a call of ours (the answer would only
        come after the call), and learns that a server is serial when a ping sent beside a call goes unanswered.
        """
        if self.busy:
            raise Busy(f"server {self.cfg.name!r} is busy with a call and answers one request at a time")
        link = self._link
        session = self.client.session
        started = time.perf_counter()
        try:
            await _within(_round_trip(session), self.connect_timeout if timeout is None else timeout)
        except TimeoutError:
            if link is not None and link.watching and not link.lost.is_set():
                self._judge(link, _SILENT)
                raise Busy(f"server {self.cfg.name!r} did not answer a ping while a call of ours ran") from None
            raise
        except Exception as exc:
            if link is not None:
                # The check still fails; the next opening negotiates afresh.
                self.forget_if_mismatch(exc, generation=link.generation)
            raise
        return (time.perf_counter() - started) * 1000


async def _round_trip(session: ClientSession) -> None:
    if session.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS:
        await session.send_ping()
    else:
        await session.list_tools()


async def _still_there(session: ClientSession) -> None:
    """The liveness probe: the cheapest request the protocol has. On 2026-07-28 that is `server/discover`, not the
    health check's tools/list: a server may take seconds to build its tool list, which says nothing of death."""
    if session.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS:
        await session.send_ping()
    else:
        await session.send_discover(session.protocol_version)


async def _within(request: Coroutine[Any, Any, _T], timeout: float) -> _T:
    """`wait_for` that does not wait for the abandoned request to wind down: the SDK's courtesy cancel behind it
    may be stuck for seconds on a dead server's blocked stream, and the point of a timeout here is to be prompt."""
    task = asyncio.ensure_future(request)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        _abandon(task)
        raise
    if not done:
        _abandon(task)
        raise TimeoutError
    return task.result()


# Abandoned requests, referenced until they end (the event loop holds tasks only weakly).
_abandoned: set[asyncio.Future[Any]] = set()


def _abandon(task: asyncio.Future[Any]) -> None:
    task.cancel()
    _abandoned.add(task)
    task.add_done_callback(_forget)


def _forget(task: asyncio.Future[Any]) -> None:
    _abandoned.discard(task)
    if not task.cancelled():
        task.exception()  # an abandoned request's late failure is expected; keep asyncio from logging it
