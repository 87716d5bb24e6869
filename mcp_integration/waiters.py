"""Waiting for a job's answer after submit: an MCP task (push first, then polls) or a receipt (polls).

Both follow the same rules: never poll faster than the server asks, first poll near the expected finish,
back off with jitter on slow jobs, retry transient poll errors, and cancel on the server when cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import mcp_types as types
from mcp.shared.exceptions import MCPError

from mcp_integration.aio import first_set
from mcp_integration.errors import ToolCallError
from mcp_integration.jobs import Job
from mcp_integration.receipts import PermanentPollError, Receipt, ReceiptPoller, TransientPollError
from mcp_integration.results import ToolResult
from mcp_integration.timing import PollSchedule

if TYPE_CHECKING:
    from mcp_integration.connection import ServerConnection
    from mcp_integration.tasks import TaskClient, TaskHandle, TaskStatus

__all__ = [
    "MAX_POLL_FAILURES",
    "MAX_RETRY_AFTER_S",
    "PUSH_SAFETY_POLL_S",
    "wait_receipt",
    "wait_task",
]


log = logging.getLogger(__name__)

# With status pushes, polls are only a safety net for a lost notification (a dead stream wakes the waiter
# at once through `conn.lost`), so they can be rare: 1,000 pushed jobs then cost a handful of polls a second.
PUSH_SAFETY_POLL_S = 30.0
# Consecutive failed polls (network, 5xx) before a job is given up as failed.
MAX_POLL_FAILURES = 5
# The longest a result endpoint's Retry-After may hold back the next poll.
MAX_RETRY_AFTER_S = 60.0


async def wait_task(
    job: Job, conn: ServerConnection, handle: TaskHandle, *, floor_s: float, expected_s: float | None
) -> ToolResult:
    tasks = conn.tasks
    job.accept_task(handle.task_id)
    pushed: list[TaskStatus] = []
    wake = asyncio.Event()

    def on_push(status: TaskStatus) -> None:
        pushed.append(status)
        wake.set()

    unsubscribe = tasks.subscribe(handle.task_id, on_push)
    status = handle.first
    last_seen: tuple[str, str | None] | None = None
    failures = 0
    schedule = PollSchedule(floor_s=max(floor_s, status.poll_interval_s or 0.0), expected_s=expected_s)
    try:
        while True:
            if (status.status, status.message) != last_seen:
                last_seen = (status.status, status.message)
                job.status(status.status, status.message)
            if status.status == "completed":
                return _task_answer(job, status.result if status.result is not None else await tasks.result(handle))
            if status.status in ("failed", "cancelled"):
                reason = status.error or status.message or f"the task was {status.status} on the server"
                raise ToolCallError(job.server, job.tool, reason, "tool_error")
            if status.status == "input_required":
                reason = "the tool asked for input a voice call cannot give"
                raise ToolCallError(job.server, job.tool, reason, "tool_error")
            job.not_yet()
            if status.poll_interval_s:
                schedule.floor_s = max(schedule.floor_s, status.poll_interval_s)
            delay = schedule.next_delay(time.monotonic() - job.submitted_at)
            if tasks.push_available:
                delay = max(delay, PUSH_SAFETY_POLL_S)
            if not pushed and not conn.lost.is_set():
                wake.clear()
                await first_set(wake, conn.lost, timeout=delay)
            if pushed:
                status = pushed.pop(0)
                continue
            if conn.lost.is_set():
                await _reconnect(job, conn)
            try:
                status = await tasks.get(handle)
                failures = 0
            except asyncio.CancelledError:
                raise
            except MCPError as exc:
                if conn.lost.is_set():
                    continue  # the connection went mid-poll: reconnect, then ask again
                # The server answered, and the answer is that it cannot tell us (an unknown task, say).
                raise ToolCallError(job.server, job.tool, f"lost track of the task: {exc.error.message}") from None
            except Exception as exc:
                failures += 1
                job.poll_failed(type(exc).__name__, failures)
                if failures >= MAX_POLL_FAILURES:
                    raise ToolCallError(job.server, job.tool, f"lost track of the task: {exc}") from None
            finally:
                job.polled()
    except asyncio.CancelledError:
        await _cancel_quietly(tasks, handle, job)
        raise
    finally:
        unsubscribe()


async def _reconnect(job: Job, conn: ServerConnection) -> None:
    """The server's stream ended while a task waited. An HTTP server may still hold the task: reconnect and ask.
    A server that cannot be reached again fails the job now, not at the timeout."""
    job.status("reconnecting", "the connection to the server dropped")
    try:
        await conn.open(force=True)  # one real attempt now: the stream only just ended
    except Exception as exc:
        raise ToolCallError(
            job.server, job.tool, f"the server went away while the task was running ({exc})", "unreachable"
        ) from None


def _task_answer(job: Job, result: types.CallToolResult) -> ToolResult:
    out = ToolResult.from_mcp(result)
    if result.is_error:
        raise ToolCallError(job.server, job.tool, out.text or "the tool reported an error", "tool_error")
    return out


async def _cancel_quietly(tasks: TaskClient, handle: TaskHandle, job: Job) -> None:
    try:
        # Shielded: the job is being cancelled, but the server should still hear about it.
        await asyncio.shield(asyncio.wait_for(tasks.cancel(handle), 5.0))
        job.status("cancelled", "cancelled on the server")
    except BaseException as exc:  # best effort: our waiting stops either way
        log.info("job %s: task %s not cancelled on the server: %s", job.id, handle.task_id, type(exc).__name__)


async def wait_receipt(
    job: Job,
    poller: ReceiptPoller,
    receipt: Receipt,
    *,
    floor_s: float,
    expected_s: float | None,
    poll_slots: asyncio.Semaphore,
) -> ToolResult:
    job.accept_receipt(receipt.as_record(), receipt.job_id, receipt.status)
    schedule = PollSchedule(floor_s=floor_s, expected_s=expected_s)
    last_status: Any = receipt.status
    failures = 0
    server_asks = 0.0  # a Retry-After the result endpoint sent with its last answer
    while True:
        delay = schedule.next_delay(time.monotonic() - job.submitted_at)
        # A busy endpoint (429, 503) that says when to come back is not asked sooner; capped, so one absurd
        # header cannot park a job past its own limits.
        await asyncio.sleep(min(max(delay, server_asks), MAX_RETRY_AFTER_S))
        server_asks = 0.0
        try:
            async with poll_slots:
                outcome = await poller.poll_once(receipt)
        except TransientPollError as exc:
            failures += 1
            server_asks = exc.retry_after or 0.0
            job.polled(error=str(exc))
            if failures >= MAX_POLL_FAILURES:
                raise ToolCallError(job.server, job.tool, f"the result endpoint kept failing: {exc}") from None
            continue
        except PermanentPollError as exc:
            job.polled(error=str(exc))
            raise ToolCallError(job.server, job.tool, f"cannot fetch the result: {exc}") from None
        failures = 0
        job.polled(status=outcome.status)
        if outcome.status != last_status:
            last_status = outcome.status
            job.status(outcome.status)
        if not outcome.done:
            job.not_yet()
            continue
        if not outcome.ok:
            raise ToolCallError(job.server, job.tool, outcome.error or "the workflow failed", "tool_error")
        if outcome.result is None:
            raise ToolCallError(job.server, job.tool, "the workflow finished without an answer", "tool_error")
        return outcome.result
