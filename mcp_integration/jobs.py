"""A tool call as a job: submitted, waited on, and ended in exactly one final state, with events on the way.

The Job owns its state and its transitions: the dispatcher and the waiters say what happened (`accept_task`,
`accept_receipt`, `polled`, `not_yet`, `working`, …), the job changes itself and tells its listeners. Its row in
`mcp_jobs` is kept by a `Recorder` (`job_store.py`) that follows those changes; recording is best effort, so a
database hiccup never costs the caller its answer.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

from mcp_integration.aio import Deadlines
from mcp_integration.elicitation import ASK_TIMEOUT_S, Answer, Asker, Question, answer_within, decline_all
from mcp_integration.errors import ToolCallError
from mcp_integration.logs import context_with
from mcp_integration.results import ToolResult
from mcp_integration.sampling import Sampled, SamplingRequest

__all__ = [
    "FINAL_STATES",
    "Job",
    "JobEvent",
    "JobKind",
    "JobState",
    "Recorder",
    "WaitPolicy",
]

log = logging.getLogger(__name__)

JobState = Literal["submitted", "working", "completed", "failed", "timed_out", "cancelled"]
JobKind = Literal["plain", "task", "receipt"]
FINAL_STATES: tuple[JobState, ...] = ("completed", "failed", "timed_out", "cancelled")
# What a job tells its listeners: accepted (the server took it: plain, task or receipt), progress, status (a state
# of ours or the server's, with its message), queued (waiting for a slot behind the server's other calls), poll,
# poll_error, wait_timeout (a caller stopped waiting; the job goes on), asked (the server put a question to the
# caller: `question`), answered (its `action`), done.
EventKind = Literal[
    "accepted", "progress", "status", "queued", "poll", "poll_error", "wait_timeout", "asked", "answered", "done"
]
# Events that show the server is at work: the caller's idle timeout starts again.
_ACTIVITY = frozenset({"progress", "status", "accepted", "answered"})


class JobEvent(NamedTuple):
    """One thing that happened to a job. A named tuple, not a frozen dataclass: a job makes three or more per
    call, and a frozen dataclass's __init__ (a Python setattr per field) cost more than the tuple's whole
    construction (bench/call_work.py)."""

    kind: EventKind
    data: dict[str, Any]
    at: float


Submit = Callable[["Job"], Awaitable[ToolResult]]


class Recorder(Protocol):
    """What keeps a job's record (`job_store.JobRecord`): told when the job starts, changes and ends."""

    def begin(self) -> None: ...
    def changed(self) -> None: ...
    def finish(self) -> None: ...
    async def written(self) -> None: ...  # until the latest state is in the table (or given up, logged)
    def stop_retrying(self) -> None: ...


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

    # What a job starts with, as class attributes: an instance sets its own only when it changes (most calls
    # never get a receipt, a task, a queue or a question), and each of these assignments in __init__ was paid by
    # every call (bench/call_work.py).
    kind: JobKind = "plain"
    state: JobState = "submitted"
    receipt: dict[str, Any] | None = None
    task_id: str | None = None
    polls = 0
    late = False
    result: ToolResult | None = None
    error: ToolCallError | None = None
    last_pending_at: float | None = None  # when a poll or push last said "not done yet"
    # Waiting for a free slot behind the server's other calls (since when): not the server's silence, so the
    # idle timeout does not run meanwhile; the total cap still does.
    queued_since: float | None = None
    # Waiting for the caller to answer a server's question (since when): the server waits on us, so neither its
    # silence nor ours counts against the idle timeout, and fillers pause.
    asking_since: float | None = None
    asker: Asker = staticmethod(decline_all)  # who answers the server's questions during this call
    # Each question and its outcome, and each completion served to the server, as recorded: most calls have
    # none, so a job gets a list of its own only with the first (`note_question`, `sampled`).
    elicitations: Sequence[dict[str, Any]] = ()
    samplings: Sequence[dict[str, Any]] = ()
    ask_timeout_s = ASK_TIMEOUT_S
    finished_at: float | None = None
    recorder: Recorder | None = None  # keeps the job in mcp_jobs, when set (before start)
    _is_done = False
    _expired = False  # the background limit cancelled the job's task
    _waiter_gave_up = False
    _task: asyncio.Task[None] | None = None

    def __init__(
        self,
        *,
        server: str,
        server_id: int | None,
        tool: str,
        arguments: dict[str, Any],
        policy: WaitPolicy | None = None,
        deadlines: Deadlines | None = None,
    ) -> None:
        # The id as text, made once: the log context, every row of the job and the dispatcher's index use it.
        self.key = _new_id()
        self.server = server
        self.server_id = server_id
        self.tool = tool
        self.arguments = arguments
        self.policy = policy or WaitPolicy()
        # Bounded: a chatty server can push thousands of status messages over a long job.
        self.events: deque[JobEvent] = deque(maxlen=200)
        self.submitted_at = self.last_activity = time.monotonic()
        # Both dropped when the job ends (see _finish).
        self._listeners: list[Callable[[JobEvent], None]] | tuple[()] = []
        # Futures of the waits for the end (`wait`, `outcome`), resolved when the job ends: a future (and a timer
        # for a bounded wait) each, where an Event per job and asyncio.timeout around it cost a call more than
        # its dispatch did.
        self._waiters: list[asyncio.Future[bool]] | tuple[()] = []
        # Where the background limit and the waits' deadlines are kept: the dispatcher's one timer for all its
        # jobs, or (a job made on its own) a timer of the job's own.
        self._deadlines = deadlines if deadlines is not None else Deadlines()

    @functools.cached_property
    def id(self) -> uuid.UUID:
        return uuid.UUID(self.key)

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self, submit: Submit) -> Job:
        # The task copies the context as it is created: every line logged for this job, by any module and by
        # the tasks it starts, names the job, its server and its tool.
        context = context_with(job_id=self.key, server=self.server, tool=self.tool)
        self._task = asyncio.create_task(self._run(submit), name=f"job-{self.key}", context=context)
        return self

    async def _run(self, submit: Submit) -> None:
        # The row is written beside the call, not before it: a slow database never delays the server's work.
        if self.recorder is not None:
            self.recorder.begin()
        task = asyncio.current_task()
        assert task is not None
        # The background limit as a timer that cancels this task, told apart from any other cancel as
        # asyncio.timeout does (by the task's cancel count), which cost a call twice this. Not wait_for: on
        # Python 3.11 wait_for can return a result that lands together with a cancel, and the cancel is lost
        # (issue 12 counted 6 in 65); a cancelled job must end cancelled.
        expiry = self._deadlines.add(self.policy.background_s, self._expire)
        try:
            try:
                result = await submit(self)
            finally:
                expiry.cancel()
        except asyncio.CancelledError:
            if self._expired and task.uncancel() == 0:
                reason = f"no result within {self.policy.background_s:g} s; stopped waiting"
                self._finish("timed_out", error=ToolCallError(self.server, self.tool, reason, "timeout"))
            else:
                self._finish_cancelled()
        except ToolCallError as exc:
            self._finish("timed_out" if exc.kind == "timeout" else "failed", error=exc)
        except Exception as exc:  # the last resort: a job never dies without a final state
            log.exception("job %s (%s/%s) crashed", self.id, self.server, self.tool)
            self._finish("failed", error=ToolCallError(self.server, self.tool, f"internal error: {type(exc).__name__}"))
        else:
            self._finish("completed", result=result)
        self._run_over()

    def _run_over(self) -> None:
        # After the answer is out (done is set): the final row never delays the caller. Queued, not awaited: a
        # job's task ends with its answer instead of waiting for the flush (a future and a wakeup per call);
        # `settled()` waits for the write.
        if self.recorder is not None:
            self.recorder.finish()
        # Its task, context and coroutine are no use to a finished job, which may be kept in a history.
        self._task = None

    def _finish_cancelled(self) -> None:
        self._finish("cancelled", error=ToolCallError(self.server, self.tool, "the call was cancelled", "cancelled"))

    def _expire(self) -> None:
        if self._task is not None and self._task.cancel():
            self._expired = True

    def _finish(self, state: JobState, *, result: ToolResult | None = None, error: ToolCallError | None = None) -> None:
        if error is not None:
            _forget_tracebacks(error)
        self.state = state
        self.result = result
        self.error = error
        self.finished_at = time.monotonic()
        self.late = self._waiter_gave_up
        self.emit("done", state=state, error=error.reason if error else None, late=self.late)
        self._is_done = True
        # "done" is the last event a job emits, and nothing waits for a finished job. Listeners are closures over
        # the job (the dispatcher's, metrics', the voice layer's): kept, each made a cycle that only the collector
        # could free, so every finished job lived on into the oldest generation and the full collections that
        # walk it (a quarter of the CPU ours spent beyond the bare SDK's, sampled by perf: docs/DECISIONS.md).
        waiters, self._waiters, self._listeners = self._waiters, (), ()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(True)

    @property
    def done(self) -> bool:
        return self._is_done

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
                expired = not await self._wait_done(timeout)
            else:
                limit = None if release_after is None else time.monotonic() + release_after
                expired = not await self._wait_idle(limit)
            if expired:
                self._waiter_gave_up = True
                self.emit("wait_timeout", waited_s=round(time.monotonic() - self.submitted_at, 3))
                raise ToolCallError(self.server, self.tool, self._timeout_reason(timeout), "timeout")
        if self.error is not None:
            # A copy: raised, an exception takes the traceback of every frame it passes, this one (and so this
            # job) included, and the job keeps its error.
            raise copy.copy(self.error)
        assert self.result is not None
        return self.result

    async def _wait_done(self, timeout: float | None) -> bool:
        """Whether the job ended within `timeout` (None: however long it takes). A cancel of the waiting task is
        never lost: it ends this wait with CancelledError whether or not the job ended in the same moment."""
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)  # a list until the job ends (see _finish)
        # Among the dispatcher's deadlines, not the loop's own timers: an idle deadline is half a minute away and
        # nearly always cancelled (see aio.Deadlines).
        timer = None if timeout is None else self._deadlines.add(timeout, functools.partial(_resolve, waiter, False))
        try:
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if not self._is_done:  # timed out or cancelled: the job goes on without this waiter
                self._waiters.remove(waiter)

    async def _wait_idle(self, limit: float | None = None) -> bool:
        """Whether the job ended before its idle timeout (or its cap, or `limit`). Activity only ever moves the
        idle deadline later, so this sleeps to the deadline it knows and looks again, rather than waking at each
        progress notification: one future and one timer per look, where an Event and two tasks per wake-up
        made the voice layer's wait cost more than the call's dispatch. While the timeout is paused (queued, or
        asking the caller) it looks again every `idle_s`: the pause's end starts a full idle period then."""
        while not self._is_done:
            now = time.monotonic()
            cap = self.submitted_at + self.policy.cap_s
            if self.queued_since is not None or self.asking_since is not None:
                deadline = min(now + self.policy.idle_s, cap)
            else:
                deadline = min(self.last_activity + self.policy.idle_s, cap)
            if limit is not None:
                deadline = min(deadline, limit)
            if now >= deadline:
                return False
            if await self._wait_done(deadline - now):
                return True
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
        if not self._is_done:
            await self._wait_done(None)
        return await self.wait(0)

    async def settled(self) -> None:
        """Wait until the job is done *and* its final state is written to mcp_jobs (the answer comes first)."""
        if self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
        if self.recorder is not None:
            await self.recorder.written()

    def stop_retrying(self) -> None:
        """From now on a record write that fails is logged, not retried (the process is closing)."""
        if self.recorder is not None:
            self.recorder.stop_retrying()

    async def cancel(self) -> None:
        """Stop the job: its strategy cancels on the server where it can (tasks); our waiting always stops."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if not self._is_done:
            # Cancelled before its task took its first step (a session closing just after a call was made): the
            # run never began, so its own ending never ran, and the job would have stayed "submitted" for good,
            # with no row, and its waiters held to their timeout.
            self._finish_cancelled()
            self._run_over()

    # -- events ---------------------------------------------------------------------------------------------

    def add_listener(self, listener: Callable[[JobEvent], None]) -> None:
        if not self._is_done:  # a finished job emits nothing more
            self._listeners.append(listener)

    def emit(self, kind: EventKind, **data: Any) -> None:
        event = JobEvent(kind, data, time.monotonic())
        self.events.append(event)
        if kind in _ACTIVITY:
            self.touch()
        # A copy: a listener may add or remove listeners; a tuple, as the cheapest copy.
        for listener in tuple(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("job %s: event listener failed", self.id)

    # -- transitions: what the dispatcher and the waiters report ---------------------------------------------

    def working(self) -> None:
        """The call went out to the server."""
        if self.state != "working" and not self.done:
            self.state = "working"
            self.emit("status", state="working")
            self._changed()

    def accept_plain(self) -> None:
        self.emit("accepted", job_kind="plain")

    def accept_task(self, task_id: str) -> None:
        """The server made a task of the call: we wait for it (its row says so while it runs)."""
        self.kind, self.task_id = "task", task_id
        self.emit("accepted", job_kind="task", task_id=task_id)
        self.working()
        self._changed()

    def accept_receipt(self, receipt: dict[str, Any], receipt_id: str, status: Any) -> None:
        """The server answered with a receipt, to be polled to the real answer."""
        self.kind, self.receipt = "receipt", receipt
        self.emit("accepted", job_kind="receipt", receipt_id=receipt_id, status=status)
        self.working()
        self._changed()

    async def ask(self, question: Question) -> Answer:
        """A server's question during this call, put to the job's asker (bounded by `ask_timeout_s`), checked
        against what was asked, and recorded (never a secret field's value)."""
        self.asking_since = time.monotonic()
        self.emit("asked", question=question)
        try:
            answer = await answer_within(self.asker, question, self.ask_timeout_s)
        finally:
            self.asking_since = None
        self.note_question(question.record(answer) | ({"why": answer.why} if answer.why else {}))
        self.emit("answered", action=answer.action, why=answer.why)
        return answer

    def note_question(self, record: dict[str, Any]) -> None:
        """A server's question during this call and its outcome, as recorded (never a secret field's value)."""
        self.elicitations = [*self.elicitations, record]
        self._changed()

    def sampled(self, request: SamplingRequest, result: Sampled | None, why: str | None = None) -> None:
        """A completion the session's LLM wrote for the server during this call (or why it did not)."""
        self.samplings = [*self.samplings, request.record(result, why)]
        self.touch()  # the server was waiting on us, not silent
        self._changed()

    @property
    def asking(self) -> bool:
        return self.asking_since is not None

    def progress(self, progress: float, total: float | None, message: str | None) -> None:
        self.emit("progress", progress=progress, total=total, message=message)

    def status(self, state: str, message: str | None = None) -> None:
        """What the server (or a reconnect) says of the job; `state` is theirs, not one of JobState."""
        self.emit("status", state=state, message=message)

    def polled(self, **data: Any) -> None:
        self.polls += 1
        self.emit("poll", n=self.polls, **data)

    def poll_failed(self, error: str, failures: int) -> None:
        self.emit("poll_error", error=error, failures=failures)

    def not_yet(self) -> None:
        """A poll or push said "not done yet": the server's finish lies after this (for learned timing)."""
        self.last_pending_at = time.monotonic()

    def _changed(self) -> None:
        if self.recorder is not None:
            self.recorder.changed()


def _new_id() -> str:
    """A random (version 4) UUID as text, as str(uuid.uuid4()) gives it, without a uuid.UUID: its validating
    __init__ and __str__ were a twentieth of what our side of a call cost (bench/call_work.py)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _forget_tracebacks(error: BaseException) -> None:
    """Drop the tracebacks of a job's error and of the errors behind it. Their frames hold the job, so a kept
    error would make a cycle (job, error, frames, job) that only the collector could free; a failure we did not
    foresee is logged with its traceback before it becomes a job's error."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        exc = todo.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        exc.__traceback__ = None
        todo += (exc.__cause__, exc.__context__)


def _resolve(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)
