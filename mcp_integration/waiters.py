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

from mcp_integration.connection import first_set
from mcp_integration.jobs import Job, ToolCallError, ToolResult
from mcp_integration.receipts import PermanentPollError, Receipt, ReceiptPoller, TransientPollError
from mcp_integration.timing import PollSchedule

if TYPE_CHECKING:
    from mcp_integration.connection import ServerConnection
    from mcp_integration.tasks import TaskClient, TaskHandle, TaskStatus

log = logging.getLogger(__name__)

# With status pushes, polls are only a safety net for a lost notification (a dead stream wakes the waiter
# at once through `conn.lost`), so they can be rare: 1,000 pushed jobs then cost a handful of polls a second.
PUSH_SAFETY_POLL_S = 30.0
# Consecutive failed polls (network, 5xx) before a job is given up as failed.
MAX_POLL_FAILURES = 5


async def wait_task(
    job: Job, conn: ServerConnection, handle: TaskHandle, *, floor_s: float, expected_s: float | None
) -> ToolResult:
    tasks = conn.tasks
    job.kind = "task"
    job.record_soon()  # the row says task/receipt while it runs, not only once it is done
    job.task_id = handle.task_id
    job.emit("accepted", job_kind="task", task_id=handle.task_id)
    job.set_state("working")
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
                job.emit("status", state=status.status, message=status.message)
            if status.status == "completed":
                return _task_answer(job, status.result if status.result is not None else await tasks.result(handle))
            if status.status in ("failed", "cancelled"):
                reason = status.error or status.message or f"the task was {status.status} on the server"
                raise ToolCallError(job.server, job.tool, reason, "tool_error")
            if status.status == "input_required":
                reason = "the tool asked for input a voice call cannot give"
                raise ToolCallError(job.server, job.tool, reason, "tool_error")
            job.last_pending_at = time.monotonic()  # the server said "not yet" no earlier than this
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
                job.emit("poll_error", error=type(exc).__name__, failures=failures)
                if failures >= MAX_POLL_FAILURES:
                    raise ToolCallError(job.server, job.tool, f"lost track of the task: {exc}") from None
            finally:
                job.polls += 1
                job.emit("poll", n=job.polls)
    except asyncio.CancelledError:
        await _cancel_quietly(tasks, handle, job)
        raise
    finally:
        unsubscribe()


async def _reconnect(job: Job, conn: ServerConnection) -> None:
    """The server's stream ended while a task waited. An HTTP server may still hold the task: reconnect and ask.
    A server that cannot be reached again fails the job now, not at the timeout."""
    job.emit("status", state="reconnecting", message="the connection to the server dropped")
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
        job.emit("status", state="cancelled", message="cancelled on the server")
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
    job.kind = "receipt"
    job.record_soon()  # the row says task/receipt while it runs, not only once it is done
    job.receipt = receipt.as_record()
    job.emit("accepted", job_kind="receipt", receipt_id=receipt.job_id, status=receipt.status)
    job.set_state("working")
    schedule = PollSchedule(floor_s=floor_s, expected_s=expected_s)
    last_status: Any = receipt.status
    failures = 0
    while True:
        await asyncio.sleep(schedule.next_delay(time.monotonic() - job.submitted_at))
        job.polls += 1
        try:
            async with poll_slots:
                outcome = await poller.poll_once(receipt)
        except TransientPollError as exc:
            failures += 1
            job.emit("poll", n=job.polls, error=str(exc))
            if failures >= MAX_POLL_FAILURES:
                raise ToolCallError(job.server, job.tool, f"the result endpoint kept failing: {exc}") from None
            continue
        except PermanentPollError as exc:
            raise ToolCallError(job.server, job.tool, f"cannot fetch the result: {exc}") from None
        failures = 0
        job.emit("poll", n=job.polls, status=outcome.status)
        if outcome.status != last_status:
            last_status = outcome.status
            job.emit("status", state=outcome.status)
        if not outcome.done:
            job.last_pending_at = time.monotonic()
            continue
        if not outcome.ok:
            raise ToolCallError(job.server, job.tool, outcome.error or "the workflow failed", "tool_error")
        if outcome.result is None:
            raise ToolCallError(job.server, job.tool, "the workflow finished without an answer", "tool_error")
        return outcome.result
