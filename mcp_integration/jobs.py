"""A tool call as a job: submitted, waited on, and ended in exactly one final state, with events on the way.

A job is recorded in `mcp_jobs` as it changes state; the recording is best effort, so a database hiccup never
costs the caller its answer (the log says what was not recorded).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mcp_types as types
import psycopg
from psycopg_pool import PoolClosed

from mcp_integration.limits import MAX_REASON_CHARS, bounded, cut_text
from mcp_integration.logs import log_context
from mcp_integration.secrets import scrub, scrub_known

if TYPE_CHECKING:
    from mcp_integration.registry import Registry

log = logging.getLogger(__name__)

FINAL_STATES = ("completed", "failed", "timed_out", "cancelled")
# A record write that failed because the database was unreachable is tried again, with backoff (first delay,
# cap), for this long: a PostgreSQL restart takes seconds, and a job's final state must land once it is back.
RECORD_RETRY_S = 300.0
RECORD_BACKOFF_S = (0.5, 5.0)
# How long the row's insert waits for the call to start working, so it can say so at once.
INSERT_GRACE_S = 0.1


class ToolCallError(Exception):
    """Every failure of a tool call, with the server, the tool and a reason fit to tell a person.

    `kind` says what went wrong: unknown_tool, invalid_arguments, unreachable, unauthorized (the server refused
    our credentials: HTTP 401/403), server_error, tool_error, timeout, cancelled.
    """

    def __init__(self, server: str | None, tool: str, reason: str, kind: str = "server_error") -> None:
        self.server = server
        self.tool = tool
        # A server's error message is its own text: bounded, storable in mcp_jobs (no NUL), and never carrying a
        # credential of ours (a server may echo the header it refused).
        self.reason = reason = cut_text(scrub(str(reason)), MAX_REASON_CHARS)
        self.kind = kind
        where = f"{server}/{tool}" if server else tool
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class ToolResult:
    """What a tool answered: its text for a language model, and its structured content when it sent some.

    However it is made (a tool's answer, a task's, a polled receipt's, a row read back), a result is bounded:
    `limits.MAX_RESULT_CHARS` of text and as much structured content, "(cut)" where something was left out,
    storable in mcp_jobs as is. Images, audio and blobs are placeholders in the text, never base64.
    """

    text: str
    structured: Any = None
    content: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Frozen, so the bounded values are set the one way a frozen dataclass allows. A server echoing a
        # credential of ours back in its answer does not get it to the LLM, the caller or mcp_jobs.
        text = self.text if isinstance(self.text, str) else str(self.text)
        object.__setattr__(self, "text", cut_text(scrub_known(text)))
        if self.structured is not None:
            object.__setattr__(self, "structured", scrub_known(bounded(self.structured)[0]))
        if self.content:
            object.__setattr__(self, "content", scrub_known(bounded([_without_payload(c) for c in self.content])[0]))

    @classmethod
    def from_mcp(cls, result: types.CallToolResult) -> ToolResult:
        parts: list[str] = []
        raw: list[dict[str, Any]] = []
        for item in result.content:
            raw.append(item.model_dump(by_alias=True, mode="json", exclude_none=True))
            if isinstance(item, types.TextContent):
                parts.append(item.text)
            elif isinstance(item, types.EmbeddedResource):
                res = item.resource
                text = res.text if isinstance(res, types.TextResourceContents) else None
                parts.append(text if text is not None else f"[binary resource {_short_uri(str(res.uri))}]")
            elif isinstance(item, types.ResourceLink):
                parts.append(f"[resource {item.name[:200]}: {_short_uri(str(item.uri))}]")
            else:
                mime = getattr(item, "mime_type", None)
                parts.append(f"[{item.type} content{f', {mime[:100]}' if isinstance(mime, str) else ''}]")
        text = "\n".join(parts)
        structured, _ = bounded(result.structured_content) if result.structured_content is not None else (None, False)
        if not text and structured is not None:
            text = json.dumps(structured, ensure_ascii=False)
        return cls(text=text, structured=structured, content=raw)

    def as_record(self) -> dict[str, Any]:
        return {"text": self.text, "structured": self.structured}


def _without_payload(item: Any) -> Any:
    """A content item for keeping: base64 data (images, audio, blobs) replaced by its size."""
    if not isinstance(item, dict):
        return item
    out = dict(item)
    for key in ("data", "blob"):
        if isinstance(out.get(key), str):
            out[key] = f"({len(out[key]):,} base64 characters not kept)"
    if isinstance(out.get("resource"), dict):
        out["resource"] = _without_payload(out["resource"])
    return out


def _short_uri(uri: str) -> str:
    # A data: URI is its payload; anything else is cut to what a reader could use.
    return uri.split(",", 1)[0] + ",…" if uri.startswith("data:") else uri[:300]


@dataclass(frozen=True)
class JobEvent:
    kind: str  # accepted | progress | status | done
    data: dict[str, Any]
    at: float


Submit = Callable[["Job"], Awaitable[ToolResult]]


@dataclass(frozen=True)
class WaitPolicy:
    """How long a caller waits (an idle timeout that activity resets, under a cap) and how long the job itself may
    go on after the caller stopped waiting (so a late result can still be delivered)."""

    idle_s: float = 35.0
    cap_s: float = 300.0
    background_s: float = 600.0


class Job:
    """One call of one tool. `start(submit)`, then `wait()`; `cancel()` stops it.

    A job ends in exactly one of FINAL_STATES. A caller's wait that times out does not end the job: it goes on
    (up to `policy.background_s`), and if it then completes, `late` is set and the `done` event says so.
    """

    def __init__(
        self,
        *,
        server: str,
        server_id: int | None,
        tool: str,
        arguments: dict[str, Any],
        registry: Registry | None,
        policy: WaitPolicy | None = None,
    ) -> None:
        self.id = uuid.uuid4()
        self.server = server
        self.server_id = server_id
        self.tool = tool
        self.arguments = arguments
        self.policy = policy or WaitPolicy()
        self.kind = "plain"
        self.state = "submitted"
        self.receipt: dict[str, Any] | None = None
        self.task_id: str | None = None
        self.polls = 0
        self.late = False
        self.result: ToolResult | None = None
        self.error: ToolCallError | None = None
        # Bounded: a chatty server can push thousands of status messages over a long job.
        self.events: deque[JobEvent] = deque(maxlen=200)
        self.submitted_at = time.monotonic()
        self.last_activity = self.submitted_at
        self.last_pending_at: float | None = None  # when a poll or push last said "not done yet"
        # Waiting for a free slot behind the server's other calls (since when): not the server's silence, so the
        # idle timeout does not run meanwhile; the total cap still does.
        self.queued_since: float | None = None
        self.finished_at: float | None = None
        self._registry = registry
        self._listeners: list[Callable[[JobEvent], None]] = []
        self._done = asyncio.Event()
        self._activity = asyncio.Event()
        self._waiter_gave_up = False
        self._task: asyncio.Task[None] | None = None
        self._record_lock = asyncio.Lock()
        self._pending_records: set[asyncio.Task[None]] = set()
        self._insert: asyncio.Future[bool] | None = None
        self._retry_records = True
        self._written: tuple[str, str] | None = None  # the (state, kind) last written to the row
        self._moved = asyncio.Event()  # the job left `submitted` (working, or done)

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self, submit: Submit) -> Job:
        # The task copies the context as it is created: every line logged for this job, by any module and by
        # the tasks it starts, names the job, its server and its tool.
        with log_context(job_id=str(self.id), server=self.server, tool=self.tool):
            self._task = asyncio.create_task(self._run(submit), name=f"job-{self.id}")
        return self

    async def _run(self, submit: Submit) -> None:
        # The row is written beside the call, not before it: a slow database never delays the server's work.
        self._insert = asyncio.ensure_future(self._record_insert())
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can return a result that lands together with
            # a cancel, and the cancel is lost (issue 12 counted 6 in 65); a cancelled job must end cancelled.
            async with asyncio.timeout(self.policy.background_s):
                result = await submit(self)
        except asyncio.CancelledError:
            self._finish(
                "cancelled", error=ToolCallError(self.server, self.tool, "the call was cancelled", "cancelled")
            )
        except TimeoutError:
            reason = f"no result within {self.policy.background_s:g} s; stopped waiting"
            self._finish("timed_out", error=ToolCallError(self.server, self.tool, reason, "timeout"))
        except ToolCallError as exc:
            self._finish("timed_out" if exc.kind == "timeout" else "failed", error=exc)
        except Exception as exc:  # the last resort: a job never dies without a final state
            log.exception("job %s (%s/%s) crashed", self.id, self.server, self.tool)
            self._finish("failed", error=ToolCallError(self.server, self.tool, f"internal error: {type(exc).__name__}"))
        else:
            self._finish("completed", result=result)
        await asyncio.gather(*self._pending_records, return_exceptions=True)
        await self._record_update(finished=True)

    def _finish(self, state: str, *, result: ToolResult | None = None, error: ToolCallError | None = None) -> None:
        self.state = state
        self.result = result
        self.error = error
        self.finished_at = time.monotonic()
        self.late = self._waiter_gave_up
        self.emit("done", state=state, error=error.reason if error else None, late=self.late)
        self._done.set()
        self._moved.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def duration(self) -> float:
        return (self.finished_at or time.monotonic()) - self.submitted_at

    @property
    def estimated_duration(self) -> float:
        """How long the server's work took, as well as we can tell: the finish lies between the last "not yet"
        and our detection, so the midpoint. Our own detection lag would otherwise bias learned timing late."""
        end = self.finished_at or time.monotonic()
        if self.last_pending_at is None:
            return end - self.submitted_at
        return (self.last_pending_at + end) / 2 - self.submitted_at

    def touch(self) -> None:
        """Activity (progress, a status change): the caller's idle timeout starts again."""
        self.last_activity = time.monotonic()
        self._activity.set()

    def queue(self, waiting: bool, *, ahead: int = 0) -> None:
        """The call waits for (or has just got) one of its server's call slots."""
        if waiting and self.queued_since is None:
            self.queued_since = time.monotonic()
            self.emit("queued", ahead=ahead)
        elif not waiting and self.queued_since is not None:
            self.queued_since = None
            self.touch()  # the server's silence is counted from now

    async def wait(self, timeout: float | None = None, *, release_after: float | None = None) -> ToolResult:
        """The result, or ToolCallError. Without `timeout`, the policy's idle timeout (reset by activity) under
        its cap, and `release_after` seconds at most if given (the voice layer's release point). Any timeout
        ends this wait only: the job goes on and may still deliver late."""
        if not self.done:
            if timeout is not None:
                expired = not await _wait_event(self._done, timeout)
            else:
                limit = None if release_after is None else time.monotonic() + release_after
                expired = not await self._wait_idle(limit)
            if expired:
                self._waiter_gave_up = True
                self.emit("wait_timeout", waited_s=round(time.monotonic() - self.submitted_at, 3))
                raise ToolCallError(self.server, self.tool, self._timeout_reason(timeout), "timeout")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    async def _wait_idle(self, limit: float | None = None) -> bool:
        while not self.done:
            now = time.monotonic()
            cap = self.submitted_at + self.policy.cap_s
            deadline = cap if self.queued_since is not None else min(self.last_activity + self.policy.idle_s, cap)
            if limit is not None:
                deadline = min(deadline, limit)
            if now >= deadline:
                return False
            self._activity.clear()
            done_wait = asyncio.ensure_future(self._done.wait())
            act_wait = asyncio.ensure_future(self._activity.wait())
            try:
                await asyncio.wait({done_wait, act_wait}, timeout=deadline - now, return_when=asyncio.FIRST_COMPLETED)
            finally:
                done_wait.cancel()
                act_wait.cancel()
        return True

    def _timeout_reason(self, timeout: float | None) -> str:
        if self.queued_since is not None:
            queued = time.monotonic() - self.queued_since
            return f"still queued behind other calls to this server after {queued:.0f} s; the job is still waiting"
        if timeout is not None:
            waited = f"after {timeout:g} s"
        elif time.monotonic() >= self.submitted_at + self.policy.cap_s:
            waited = f"within the {self.policy.cap_s:g} s limit"
        else:
            waited = f"and no progress for {self.policy.idle_s:g} s"
        return f"no answer yet {waited}; the job is still running"

    async def outcome(self) -> ToolResult:
        """The final result or error, however long the job takes (it is bounded by `policy.background_s`)."""
        await self._done.wait()
        return await self.wait(0)

    async def settled(self) -> None:
        """Wait until the job is done *and* its final state is written to mcp_jobs (the answer comes first)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    def stop_retrying(self) -> None:
        """From now on a record write that fails is logged, not retried (the process is closing)."""
        self._retry_records = False

    async def cancel(self) -> None:
        """Stop the job: its strategy cancels on the server where it can (tasks); our waiting always stops."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- events ---------------------------------------------------------------------------------------------

    def add_listener(self, listener: Callable[[JobEvent], None]) -> None:
        self._listeners.append(listener)

    def emit(self, kind: str, **data: Any) -> None:
        event = JobEvent(kind, data, time.monotonic())
        self.events.append(event)
        if kind in ("progress", "status", "accepted"):
            self.touch()
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("job %s: event listener failed", self.id)

    def set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self._moved.set()
            self.emit("status", state=state)
            self.record_soon()

    def record_soon(self) -> None:
        if self._registry is not None:
            task = asyncio.get_running_loop().create_task(self._record_update(finished=False))
            self._pending_records.add(task)
            task.add_done_callback(self._pending_records.discard)

    # -- the record in mcp_jobs -----------------------------------------------------------------------------

    async def _record_insert(self) -> bool:
        """Write the job's row; True once it is there. A database restart delays the row, never drops it."""
        if self._registry is None:
            return False
        # A moment for the call to start (usually at once, once connected): the row then says `working`, which
        # spares the update that would follow at once. A slow connect does not hold the row back for long.
        if not self._moved.is_set():
            await _wait_event(self._moved, INSERT_GRACE_S)
        return await self._record_with_retry("row", self._insert_row, give_up_when_done=False)

    async def _insert_row(self) -> None:
        assert self._registry is not None
        # The state as it is when the row is written: a call usually is `working` by then, which saves the
        # separate update (a third of the statements of a plain call).
        state = self.state if self.state in ("submitted", "working") else "working"
        try:
            await self._registry.insert_job(self.id, self.server_id, self.server, self.tool, self.kind, state)
        except psycopg.errors.UniqueViolation:
            return  # an earlier attempt committed, but its connection broke before the answer came back
        self._written = (state, self.kind)

    async def _record_update(self, *, finished: bool) -> None:
        if self._registry is None:
            return
        async with self._record_lock:
            inserted = False
            if self._insert is not None:
                (inserted,) = await asyncio.gather(self._insert, return_exceptions=True)
            if not finished and (self.done or (self.state, self.kind) == self._written):
                return  # already written with the row, or the final write will carry it
            if finished and inserted is not True:
                # The row never landed (a long outage): the final state is worth one more try at it.
                await self._record_with_retry("row", self._insert_row, give_up_when_done=False)
            # A state on the way is only worth retrying while the job runs: once it is done, the final write
            # carries everything, and must not queue behind stale retries.
            await self._record_with_retry(
                f"state {self.state}", lambda: self._update_row(finished), give_up_when_done=not finished
            )

    async def _update_row(self, finished: bool) -> None:
        assert self._registry is not None
        # Read at each attempt, so a retry writes the job as it is now, not as it was when the write failed.
        written = (self.state, self.kind)
        await self._registry.update_job(
            self.id,
            state=self.state,
            kind=self.kind,
            receipt=scrub_known(self.receipt),
            result=self.result.as_record() if self.result else None,
            error=self.error.reason if self.error else None,
            polls=self.polls,
            finished=finished,
            delivered_late=self.late if finished else None,
        )
        self._written = written

    async def _record_with_retry(
        self, what: str, write: Callable[[], Awaitable[None]], *, give_up_when_done: bool
    ) -> bool:
        """Run one write; while the database is unreachable (a restart, an outage), try again with jittered
        backoff for up to RECORD_RETRY_S. Other errors (a bad row, a missing table) are not retried."""
        deadline = time.monotonic() + RECORD_RETRY_S
        delay = RECORD_BACKOFF_S[0]
        attempts = 0
        while True:
            attempts += 1
            try:
                await write()
            except psycopg.OperationalError as exc:  # includes the pool's PoolTimeout
                if give_up_when_done and self.done:
                    return False  # the final write carries this state
                if isinstance(exc, PoolClosed) or not self._retry_records or time.monotonic() + delay > deadline:
                    log.warning(
                        "job %s: %s not recorded in mcp_jobs (%d tries): %s", self.id, what, attempts, _reason(exc)
                    )
                    return False
                if attempts == 1:
                    log.warning(
                        "job %s: %s not recorded yet (%s); retrying until the database is back",
                        self.id,
                        what,
                        _reason(exc),
                    )
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, RECORD_BACKOFF_S[1])
            except Exception as exc:
                log.warning("job %s: %s not recorded in mcp_jobs: %s", self.id, what, _reason(exc))
                return False
            else:
                if attempts > 1:
                    log.info("job %s: %s recorded in mcp_jobs after %d attempts", self.id, what, attempts)
                return True


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _wait_event(event: asyncio.Event, timeout: float) -> bool:
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
