"""Write-behind for `mcp_jobs`: job rows queued in memory and written in batches, one statement per flush.

A job's record costs its call a dictionary insert: `put()` is synchronous and starts nothing. One flusher task per
queue (per `Registry`, so per pool) waits for a lull of FLUSH_QUIET_S after the last new record, FLUSH_MAX_WAIT_S at
most after the first, and FLUSH_INTERVAL_S after the previous flush (not at all once FLUSH_ROWS are queued), then
writes every pending record in one statement, on
one connection, in one round trip (prepared by psycopg after a few uses: its text never changes). Records are
coalesced per job and built when flushed, so a row always carries its job's latest state: a job that started and
ended within one window is a single INSERT of its final state.

Nothing is lost while the process lives: a flush that fails because the database is unreachable (a restart, an
outage, the pool's timeout) keeps its records queued, merged with newer states, and is tried again with jittered
backoff; a record still failing after RECORD_RETRY_S, or whose job no longer retries (the process is closing), is
dropped with one warning that counts them. A statement failing for any other reason (a bad row) is retried row
by row, so that row alone is dropped. `aclose()` drains what is queued once, within a bounded time.

A crash (the process killed) loses at most the records of the last flush window (queued, not yet written: at most
FLUSH_MAX_WAIT_S, 0.1 s, of them), or, while the database is unreachable, every record still waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

import psycopg
from psycopg_pool import PoolClosed

from mcp_integration.aio import Backoff, spawn, wait_event
from mcp_integration.explain import describe

if TYPE_CHECKING:
    from mcp_integration.registry import Registry

__all__ = [
    "FINAL_DRAIN_S",
    "FLUSH_INTERVAL_S",
    "FLUSH_MAX_WAIT_S",
    "FLUSH_QUIET_S",
    "FLUSH_ROWS",
    "RECORD_BACKOFF_S",
    "RECORD_RETRY_S",
    "JobQueue",
    "JobRow",
    "RowSource",
    "job_row",
]

log = logging.getLogger(__name__)

# A flush waits for this long a lull in new records: a burst of calls (a hundred started together, or answered
# one after another as their answers arrive) is one flush after it, not several amid it, where each flush held up
# the answers still being read. A lull comes within a few ms of a burst's end.
FLUSH_QUIET_S = 0.005
# ...but not longer than this after the first record queued: a row is visible to a person at once, and this is
# what a crash may lose.
FLUSH_MAX_WAIT_S = 0.1
# ...and starts at least this long after the previous one: under a steady stream of calls, whose records come one
# by one, flushes (each a connection checkout and a statement) stay at a bounded rate, whatever the call rate.
FLUSH_INTERVAL_S = 0.025
# ...unless this many records are queued: the statement is then worth sending at once.
FLUSH_ROWS = 100
# A record whose flush failed because the database was unreachable is tried again, with backoff, for this long: a
# PostgreSQL restart takes seconds, and a job's final state must land once it is back.
RECORD_RETRY_S = 300.0
RECORD_BACKOFF_S = (0.5, 5.0)
# How long closing may take to write what is still queued: an outage must not hold a shutdown.
FINAL_DRAIN_S = 5.0
# Jobs named in a warning, at most (the rest are counted).
_NAMED = 10


class JobRow(TypedDict):
    """A job's row in `mcp_jobs` as it is now, as `Registry.write_jobs` sends it (one element of a jsonb array):
    the id as text, times in seconds since the epoch (`time.time()`), `error` already scrubbed of the secrets we
    know. A dict built in one literal when its batch is flushed (`job_store.JobRecord.row`): the dataclass it
    replaced, copied into such a dict at the write, was a fifth of what a record cost (bench/call_work.py)."""

    id: str
    server_id: int | None
    server_name: str
    tool: str
    kind: str
    state: str
    submitted_at: float
    finished_at: float | None
    # What the job has gathered so far; the last write carries all of it.
    polls: int
    delivered_late: bool
    receipt: Any
    result: Any
    error: str | None
    elicitations: list[dict[str, Any]] | None
    samplings: list[dict[str, Any]] | None


def job_row(
    job_id: uuid.UUID, server_id: int | None, server_name: str, tool: str, kind: str, state: str, submitted_at: float
) -> JobRow:
    """A whole row as a job just submitted has it, for rows written by hand (tests, benchmarks): set the rest
    on the dict."""
    return {
        "id": str(job_id),
        "server_id": server_id,
        "server_name": server_name,
        "tool": tool,
        "kind": kind,
        "state": state,
        "submitted_at": submitted_at,
        "finished_at": None,
        "polls": 0,
        "delivered_late": False,
        "receipt": None,
        "result": None,
        "error": None,
        "elicitations": None,
        "samplings": None,
    }


class RowSource(Protocol):
    """What a queued record is (`job_store.JobRecord`): asked for its row when it is flushed, so a retry writes
    the job as it is then. Queued by identity, one entry per source."""

    @property
    def retry(self) -> bool: ...  # False: a failed write is dropped, not tried again (the process is closing)
    def row(self) -> JobRow: ...
    def label(self) -> str: ...  # "job <id>: <state>", for warnings
    def settled(self) -> None: ...  # its latest queued row is written, or given up


@dataclass(slots=True)
class _Entry:
    source: RowSource
    failing_since: float | None = None  # when a write of it first failed (database unreachable)
    announced: bool = False  # its "not recorded yet" warning was logged
    # Called once it is written or given up: `written()` and `flushed()` waiting for it (callbacks, not a
    # future per waiter and entry: `flushed()` over a hundred records is one future, not a hundred tasks).
    waiters: list[Callable[[], None]] | None = None
    settled: bool = False  # written, or given up

    def wait(self, done: Callable[[], None]) -> None:
        if self.waiters is None:
            self.waiters = []
        self.waiters.append(done)

    def settle(self) -> None:
        if self.settled:
            return
        self.settled = True
        self.source.settled()
        for done in self.waiters or ():
            done()


@dataclass
class FlushStats:
    """What the queue did, for tests and benchmarks: each flush is one statement (and one round trip) unless a
    bad row sent it row by row."""

    flushes: int = 0  # attempts to write a batch, failed ones included
    statements: int = 0
    rows: int = 0  # rows written
    largest: int = 0  # rows in the largest batch
    failed_flushes: int = 0  # the database was unreachable
    lost: int = 0  # records given up


class JobQueue:
    """The write-behind queue of one registry's `mcp_jobs` rows. `put()` a source whenever its job changes;
    `await written(source)` for its latest state to be in the table (or given up); `aclose()` drains."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.stats = FlushStats()
        self._pending: dict[RowSource, _Entry] = {}
        self._in_flight: dict[RowSource, _Entry] = {}
        self._first_at = 0.0  # when the oldest pending record was queued
        self._last_at = 0.0  # when the newest was
        self._flushed_at = 0.0  # when the last flush started
        self._wake = asyncio.Event()  # a first record queued, FLUSH_ROWS reached, or closing
        self._interrupt = asyncio.Event()  # cuts a backoff short: closing, or a job stopped retrying
        self._backoff = Backoff(*RECORD_BACKOFF_S, jitter=(0.8, 1.2))
        self._tasks: set[asyncio.Task[Any]] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False

    # -- what records do ------------------------------------------------------------------------------------

    def put(self, source: RowSource) -> None:
        """Queue `source`'s row (built when flushed: its latest state wins). Synchronous, and nothing waits."""
        if self._closed:
            log.warning("%s not recorded in mcp_jobs: the registry is closed", source.label())
            return
        if source in self._pending:
            return
        self._pending[source] = _Entry(source)
        n = len(self._pending)
        self._last_at = time.monotonic()
        if n == 1:
            self._first_at = self._last_at
            if self._flusher is None or self._flusher.done():
                self._flusher = spawn(self._run(), self._tasks)
            self._wake.set()
        elif n >= FLUSH_ROWS:
            self._wake.set()

    async def written(self, source: RowSource) -> None:
        """Until `source`'s latest queued state is written to mcp_jobs, or given up (logged)."""
        entry = self._pending.get(source) or self._in_flight.get(source)
        if entry is not None:
            await _all_settled([entry])

    async def flushed(self) -> None:
        """Until every record queued so far is written (or given up)."""
        await _all_settled([*self._in_flight.values(), *self._pending.values()])

    def retry_now(self) -> None:
        """Cut a backoff short: the next attempt comes at once (a job stopped retrying: its record is tried once
        more, then dropped if the database is still away)."""
        if self._pending or self._in_flight:
            self._interrupt.set()

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._in_flight)

    async def aclose(self, timeout: float = FINAL_DRAIN_S) -> None:
        """Write what is queued, once (no retries), within `timeout`; then refuse new records."""
        self._closing = True
        self._wake.set()
        self._interrupt.set()
        deadline = time.monotonic() + timeout
        # A loop: a record queued while the flusher ends starts another, which drains it too.
        while self._flusher is not None and not self._flusher.done():
            _, late = await asyncio.wait([self._flusher], timeout=max(0.0, deadline - time.monotonic()))
            if late:
                self._flusher.cancel()
                await asyncio.gather(self._flusher, return_exceptions=True)
        self._closed = True
        left = [*self._in_flight.values(), *self._pending.values()]
        self._in_flight, self._pending = {}, {}
        if left:
            self._lost(left, f"not written within {timeout:g} s of closing")

    # -- the flusher ----------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._pending:
                if self._closing:
                    return
                continue
            while not self._closing and len(self._pending) < FLUSH_ROWS:
                lull = min(self._last_at + FLUSH_QUIET_S, self._first_at + FLUSH_MAX_WAIT_S)
                left = max(lull, self._flushed_at + FLUSH_INTERVAL_S) - time.monotonic()
                if left <= 0:
                    break
                await wait_event(self._wake, left)
                self._wake.clear()
            self._flushed_at = time.monotonic()
            retry_in = await self._flush()
            if retry_in is None:
                self._backoff.reset()
            elif not self._closing:
                await wait_event(self._interrupt, retry_in)
                self._interrupt.clear()
            if self._pending or self._closing:
                self._wake.set()

    async def _flush(self) -> float | None:
        """Write every pending record. None when done; else the database was unreachable, and this is how long
        to wait before the next attempt (the records wait for it, or are dropped: see `_failed`)."""
        batch = self._pending
        self._pending = {}
        self._in_flight = batch
        try:
            return await self._write(batch)
        except BaseException:
            # Cancelled mid-write (closing ran out of time): the records are still ours to count as lost.
            self._requeue([e for e in batch.values() if not e.settled])
            raise
        finally:
            self._in_flight = {}

    async def _write(self, batch: dict[RowSource, _Entry]) -> float | None:
        rows: list[tuple[_Entry, JobRow]] = []
        for entry in batch.values():
            try:
                rows.append((entry, entry.source.row()))
            except Exception as exc:  # a record that cannot even be built must not hold up the others
                log.warning("%s not recorded in mcp_jobs: %s", entry.source.label(), describe(exc))
                entry.settle()
        if not rows:
            return None
        self.stats.flushes += 1
        self.stats.largest = max(self.stats.largest, len(rows))
        written: list[_Entry] = []
        left = rows  # not yet written when the database went away
        try:
            timeout = FINAL_DRAIN_S if self._closing else None
            async with self.registry.pool.connection(timeout=timeout) as conn:
                try:
                    self.stats.statements += 1
                    await self.registry.write_jobs(conn, [row for _, row in rows])
                    written, left = [e for e, _ in rows], []
                except psycopg.OperationalError:
                    raise
                except Exception as exc:
                    # One bad row fails the statement: the rest are written one by one, and only it is dropped.
                    log.info("a batch of %d job records failed (%s); writing them one by one", len(rows), describe(exc))
                    for i, (entry, row) in enumerate(rows):
                        left = rows[i:]
                        try:
                            self.stats.statements += 1
                            await self.registry.write_jobs(conn, [row])
                        except psycopg.OperationalError:
                            raise
                        except Exception as exc:
                            log.warning("%s not recorded in mcp_jobs: %s", entry.source.label(), describe(exc))
                            entry.settle()
                        else:
                            written.append(entry)
                    left = []
        except psycopg.OperationalError as exc:  # includes the pool's PoolTimeout and PoolClosed
            self._written(written)
            self.stats.failed_flushes += 1
            return self._failed([e for e, _ in left], exc)
        self._written(written)
        return None

    def _written(self, entries: list[_Entry]) -> None:
        self.stats.rows += len(entries)
        late = 0
        for entry in entries:
            late += entry.failing_since is not None
            entry.settle()
        if late:
            log.info("%d job record(s) written to mcp_jobs once the database was back", late)

    def _failed(self, entries: list[_Entry], exc: psycopg.OperationalError) -> float:
        """The database was unreachable: keep the records for another attempt (merged with any newer state of
        the same job), or drop those past RECORD_RETRY_S or no longer retrying. Returns the wait until the
        next attempt."""
        now = time.monotonic()
        delay = self._backoff.next()
        give_up = isinstance(exc, PoolClosed) or self._closing
        lost: list[_Entry] = []
        new: list[_Entry] = []
        kept: list[_Entry] = []
        for entry in entries:
            if entry.failing_since is None:
                entry.failing_since = now
            if give_up or not entry.source.retry or now + delay > entry.failing_since + RECORD_RETRY_S:
                lost.append(entry)
                continue
            if not entry.announced:
                entry.announced = True
                new.append(entry)
            kept.append(entry)
        self._requeue(kept)
        if new:
            log.warning(
                "%d job record(s) not recorded yet (%s); retrying until the database is back: %s",
                len(new),
                describe(exc),
                _names(new),
            )
        if lost:
            self._lost(lost, describe(exc))
        return delay

    def _requeue(self, entries: list[_Entry]) -> None:
        """Back to pending, each merged with a newer state of its job queued meanwhile: one entry, failing since
        the first attempt, with the waiters of both."""
        for entry in entries:
            newer = self._pending.get(entry.source)
            if newer is None:
                self._pending[entry.source] = entry
            else:
                newer.failing_since, newer.announced = entry.failing_since, entry.announced
                newer.waiters = [*(entry.waiters or ()), *(newer.waiters or ())]
        if entries:
            self._first_at = self._last_at = 0.0  # their window is long past: the next attempt writes at once

    def _lost(self, entries: list[_Entry], why: str) -> None:
        self.stats.lost += len(entries)
        log.warning("%d job record(s) lost, not recorded in mcp_jobs (%s): %s", len(entries), why, _names(entries))
        for entry in entries:
            entry.settle()


async def _all_settled(entries: list[_Entry]) -> None:
    """Until each of these entries is written or given up (or, requeued, the entry it was merged into is)."""
    entries = [e for e in entries if not e.settled]  # one settled mid-batch is still in flight: nothing to wait
    left = len(entries)
    if not left:
        return
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def one() -> None:
        nonlocal left
        left -= 1
        if left == 0 and not fut.done():
            fut.set_result(None)

    for entry in entries:
        entry.wait(one)
    await fut


def _names(entries: Iterable[_Entry]) -> str:
    entries = list(entries)
    named = ", ".join(e.source.label() for e in entries[:_NAMED])
    return named + (f" and {len(entries) - _NAMED} more" if len(entries) > _NAMED else "")
