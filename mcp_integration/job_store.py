"""A job's row in `mcp_jobs`: queued when the job starts, each time it changes, and when it ends.

`JobRecord` only queues (`job_queue.JobQueue`, one per registry), synchronously: a call never waits for the
database, and no task is started per write. The row is built when its batch is flushed, from the job as it is
then, so every flush writes the job's latest state and the secrets we know never reach the table. `finish()`
queues the final state after the answer is out (`Job._run`), and the job's task ends there; `written()` waits
until it is in the table (or given up), so `Job.settled()` means "done and recorded", and nothing on the
answer's path waits for the database.

Retries (the database unreachable), dropping, and what a crash may lose: see `job_queue.py`.
"""

from __future__ import annotations

import time

from mcp_integration.job_queue import RECORD_RETRY_S, JobQueue, JobRow
from mcp_integration.jobs import Job
from mcp_integration.scrubber import known, scrub_known

__all__ = ["RECORD_RETRY_S", "JobRecord"]


class JobRecord:
    """The `Recorder` of one job (set as `job.recorder` before the job starts), and its queue's `RowSource`."""

    __slots__ = ("_submitted", "job", "queue", "retry")

    def __init__(self, job: Job, queue: JobQueue) -> None:
        # Until the job's final row is in the table (see finish): None after.
        self.job: Job | None = job
        self.queue = queue
        self.retry = True
        # The job's submit time on the wall clock, taken once: the row's finish time is this plus the job's
        # monotonic duration, so submitted_at <= finished_at whatever the wall clock does meanwhile.
        self._submitted = time.time() - (time.monotonic() - job.submitted_at)

    def begin(self) -> None:
        self.queue.put(self)

    def changed(self) -> None:
        if self.job is not None:  # nothing is recorded of a job after its final row
            self.queue.put(self)

    def finish(self) -> None:
        self.queue.put(self)
        # The job holds its record and the record its job: once the final row is in, the record lets go, so a
        # finished job is freed with its last reference instead of living on, in a cycle, into the collector's
        # oldest generation, whose full collections then walked every job made since the last one.
        self.queue.when_written(self, self._let_go)

    def _let_go(self) -> None:
        self.job = None

    async def written(self) -> None:
        await self.queue.written(self)

    def stop_retrying(self) -> None:
        """From now on a write that fails is logged and dropped, not retried (the process is closing)."""
        self.retry = False
        self.queue.retry_now()

    def label(self) -> str:
        return "a job" if self.job is None else f"job {self.job.id}: {self.job.state}"

    def row(self) -> JobRow:
        job = self.job
        assert job is not None, "a record is queued only while it holds its job"
        finished = job.finished_at
        return {
            "id": job.key,
            "server_id": job.server_id,
            "server_name": job.server,
            "tool": job.tool,
            "kind": job.kind,
            "state": job.state,
            "submitted_at": self._submitted,
            "finished_at": None if finished is None else self._submitted + (finished - job.submitted_at),
            "polls": job.polls,
            "delivered_late": job.late if job.done else False,
            "receipt": scrub_known(job.receipt),
            "result": job.result.as_record() if job.result else None,
            "error": known.scrub(job.error.reason) if job.error else None,
            "elicitations": scrub_known(job.elicitations) if job.elicitations else None,
            "samplings": job.samplings or None,
        }
