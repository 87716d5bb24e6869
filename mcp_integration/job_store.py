"""A job's row in `mcp_jobs`: queued when the job starts, each time it changes, and when it ends.

`JobRecord` only queues (`job_queue.JobQueue`, one per registry), synchronously: a call never waits for the
database, and no task is started per write. The row is built when its batch is flushed, from the job as it is
then, so every flush writes the job's latest state and the secrets we know never reach the table; a finished
job's row is made once and kept until it is written (a retry writes it again), and the record lets go of the job
as it makes it. `finish()` queues the final state after the answer is out (`Job._run`), and the job's task ends
there; `written()` waits until it is in the table (or given up), so `Job.settled()` means "done and recorded",
and nothing on the answer's path waits for the database.

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

    __slots__ = ("_final", "_submitted", "job", "queue", "retry")

    def __init__(self, job: Job, queue: JobQueue) -> None:
        # Until the job's final row is made (see row): None after.
        self.job: Job | None = job
        self._final: JobRow | None = None
        self.queue = queue
        self.retry = True
        # The job's submit time on the wall clock, taken once: the row's finish time is this plus the job's
        # monotonic duration, so submitted_at <= finished_at whatever the wall clock does meanwhile.
        self._submitted = time.time() - (time.monotonic() - job.submitted_at)

    def begin(self) -> None:
        self.queue.put(self)

    def changed(self) -> None:
        if self.job is not None:  # nothing changes after the final row
            self.queue.put(self)

    def finish(self) -> None:
        self.queue.put(self)

    async def written(self) -> None:
        await self.queue.written(self)

    def stop_retrying(self) -> None:
        """From now on a write that fails is logged and dropped, not retried (the process is closing)."""
        self.retry = False
        self.queue.retry_now()

    def settled(self) -> None:
        if self.job is None:
            self._final = None  # the final row is in the table (or given up): nothing will ask for it again

    def label(self) -> str:
        if self._final is not None:
            return f"job {self._final['id']}: {self._final['state']}"
        return "a job" if self.job is None else f"job {self.job.id}: {self.job.state}"

    def row(self) -> JobRow:
        if self._final is not None:
            return self._final  # a retry of the final row
        job = self.job
        assert job is not None
        finished = job.finished_at
        row: JobRow = {
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
        if job.done:
            # A finished job's row is its last. The job holds its record and the record its job: kept, that cycle
            # left each finished job to the collector's oldest generation, whose full collections then walked
            # every job made since the last one. So the record keeps the row and lets go of the job.
            self._final, self.job = row, None
        return row
