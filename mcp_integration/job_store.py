"""A job's row in `mcp_jobs`: inserted beside the call, updated as the job changes, finished with its outcome.

Best effort, but nothing lost: a write that fails because the database is unreachable (a restart, an outage) is
retried with jittered backoff for up to RECORD_RETRY_S; a retried insert that finds its row counts as done; a
state on the way stops retrying once the job is done (the final write carries everything); the final write
retries a row that never landed. The answer never waits for any of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import psycopg
from psycopg_pool import PoolClosed

from mcp_integration.aio import Backoff
from mcp_integration.jobs import Job, JobKind, JobState
from mcp_integration.registry import Registry
from mcp_integration.scrubber import scrub_known

__all__ = ["INSERT_GRACE_S", "RECORD_RETRY_S", "JobRecord"]

log = logging.getLogger(__name__)

# A record write that failed because the database was unreachable is tried again, with backoff, for this long: a
# PostgreSQL restart takes seconds, and a job's final state must land once it is back.
RECORD_RETRY_S = 300.0
RECORD_BACKOFF_S = (0.5, 5.0)
# How long the row's insert waits for the call to start working, so it can say so at once.
INSERT_GRACE_S = 0.1


class JobRecord:
    """The `Recorder` of one job (set as `job.recorder` before the job starts)."""

    def __init__(self, job: Job, registry: Registry) -> None:
        self.job = job
        self.registry = registry
        self._lock = asyncio.Lock()
        self._pending: set[asyncio.Task[None]] = set()
        self._insert: asyncio.Future[bool] | None = None
        self._retry = True
        self._written: tuple[JobState, JobKind] | None = None  # the (state, kind) last written to the row

    def begin(self) -> None:
        self._insert = asyncio.ensure_future(self._record_insert())

    def changed(self) -> None:
        task = asyncio.get_running_loop().create_task(self._record_update(finished=False))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def finish(self) -> None:
        await asyncio.gather(*self._pending, return_exceptions=True)
        await self._record_update(finished=True)

    def stop_retrying(self) -> None:
        """From now on a record write that fails is logged, not retried (the process is closing)."""
        self._retry = False

    # -- writes ---------------------------------------------------------------------------------------------

    async def _record_insert(self) -> bool:
        """Write the job's row; True once it is there. A database restart delays the row, never drops it."""
        # A moment for the call to start (usually at once, once connected): the row then says `working`, which
        # spares the update that would follow at once. A slow connect does not hold the row back for long.
        await self.job.moved(INSERT_GRACE_S)
        return await self._with_retry("row", self._insert_row, give_up_when_done=False)

    async def _insert_row(self) -> None:
        job = self.job
        # The state as it is when the row is written: a call usually is `working` by then, which saves the
        # separate update (a third of the statements of a plain call).
        state: JobState = job.state if job.state in ("submitted", "working") else "working"
        try:
            await self.registry.insert_job(job.id, job.server_id, job.server, job.tool, job.kind, state)
        except psycopg.errors.UniqueViolation:
            return  # an earlier attempt committed, but its connection broke before the answer came back
        self._written = (state, job.kind)

    async def _record_update(self, *, finished: bool) -> None:
        job = self.job
        async with self._lock:
            inserted = False
            if self._insert is not None:
                (inserted,) = await asyncio.gather(self._insert, return_exceptions=True)
            if not finished and (job.done or (job.state, job.kind) == self._written):
                return  # already written with the row, or the final write will carry it
            if finished and inserted is not True:
                # The row never landed (a long outage): the final state is worth one more try at it.
                await self._with_retry("row", self._insert_row, give_up_when_done=False)
            # A state on the way is only worth retrying while the job runs: once it is done, the final write
            # carries everything, and must not queue behind stale retries.
            await self._with_retry(
                f"state {job.state}", lambda: self._update_row(finished), give_up_when_done=not finished
            )

    async def _update_row(self, finished: bool) -> None:
        job = self.job
        # Read at each attempt, so a retry writes the job as it is now, not as it was when the write failed.
        written = (job.state, job.kind)
        await self.registry.update_job(
            job.id,
            state=job.state,
            kind=job.kind,
            receipt=scrub_known(job.receipt),
            result=job.result.as_record() if job.result else None,
            error=job.error.reason if job.error else None,
            polls=job.polls,
            finished=finished,
            delivered_late=job.late if finished else None,
            elicitations=scrub_known(job.elicitations) if job.elicitations else None,
            samplings=job.samplings or None,
        )
        self._written = written

    async def _with_retry(self, what: str, write: Callable[[], Awaitable[None]], *, give_up_when_done: bool) -> bool:
        """Run one write; while the database is unreachable, try again with jittered backoff for up to
        RECORD_RETRY_S. Other errors (a bad row, a missing table) are not retried."""
        job = self.job
        deadline = time.monotonic() + RECORD_RETRY_S
        backoff = Backoff(*RECORD_BACKOFF_S, jitter=(0.8, 1.2))
        attempts = 0
        while True:
            attempts += 1
            try:
                await write()
            except psycopg.OperationalError as exc:  # includes the pool's PoolTimeout
                if give_up_when_done and job.done:
                    return False  # the final write carries this state
                delay = backoff.next()
                if isinstance(exc, PoolClosed) or not self._retry or time.monotonic() + delay > deadline:
                    log.warning(
                        "job %s: %s not recorded in mcp_jobs (%d tries): %s", job.id, what, attempts, _reason(exc)
                    )
                    return False
                if attempts == 1:
                    log.warning(
                        "job %s: %s not recorded yet (%s); retrying until the database is back",
                        job.id,
                        what,
                        _reason(exc),
                    )
                await asyncio.sleep(delay)
            except Exception as exc:
                log.warning("job %s: %s not recorded in mcp_jobs: %s", job.id, what, _reason(exc))
                return False
            else:
                if attempts > 1:
                    log.info("job %s: %s recorded in mcp_jobs after %d attempts", job.id, what, attempts)
                return True


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
