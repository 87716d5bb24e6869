"""Job records written behind the calls (job_queue.py, job_store.py), on the real PostgreSQL.

A burst of jobs costs a few statements, each one round trip, prepared once per connection; rows are whole and
right (times, fields, no secret); an unreachable database delays records and loses none; a bad record is
dropped alone; closing drains. Outages are made by a TCP relay in front of the test database, closed and
reopened on the same port, so the shared PostgreSQL itself is never stopped; libpq's own protocol trace counts
round trips.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import eventually, stdio_demo
from psycopg import AsyncConnection, pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from mcp_integration import job_queue
from mcp_integration.dispatcher import Dispatcher
from mcp_integration.errors import ToolCallError
from mcp_integration.job_store import JobRecord
from mcp_integration.jobs import Job, WaitPolicy
from mcp_integration.registry import Registry, check_pooled, connect_defaults
from mcp_integration.results import ToolResult
from mcp_integration.scrubber import known

SECRET = "tok-9f8e7d6c5b4a-never-stored"

# -- helpers ------------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def own_registry(
    conninfo: str, *, max_size: int = 2, timeout: float = 1.0, trace: Path | None = None
) -> AsyncIterator[Registry]:
    """A registry on its own pool, set up as `Registry.open` sets one up but with a short checkout timeout (an
    unreachable database fails a flush in a second, not five) and, with `trace`, libpq's protocol trace of every
    connection appended to that file."""
    fds: list[int] = []

    async def configure(conn: AsyncConnection[Any]) -> None:
        if trace is not None:
            fd = os.open(trace, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            fds.append(fd)
            conn.pgconn.trace(fd)
            conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)

    pool = AsyncConnectionPool(
        conninfo,
        min_size=1,
        max_size=max_size,
        open=False,
        check=check_pooled,
        timeout=timeout,
        reconnect_timeout=5.0,
        configure=configure,
        kwargs={**connect_defaults(conninfo), "autocommit": True, "row_factory": dict_row},
    )
    await pool.open(wait=True, timeout=10)
    registry = Registry(pool)
    try:
        yield registry
    finally:
        await registry.close()
        for fd in fds:
            os.close(fd)


class Relay:
    """A TCP relay to PostgreSQL: `down()` refuses connections and cuts the open ones (the database restarting,
    or unreachable); `up()` relays again on the same port."""

    def __init__(self, pg_url: str) -> None:
        params = conninfo_to_dict(pg_url)
        self.host = str(params.get("host") or "127.0.0.1")
        self.target_port = int(params.get("port") or 5432)
        self.port = 0
        self.server: asyncio.Server | None = None
        self.links: set[asyncio.StreamWriter] = set()
        self.pg_url = pg_url

    @property
    def url(self) -> str:
        return make_conninfo(self.pg_url, host="127.0.0.1", port=str(self.port))

    async def up(self) -> None:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.links):
            writer.transport.abort()
        self.links.clear()
        self.server = None

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.host.startswith("/"):  # the embedded server listens on a Unix socket only
            up_reader, up_writer = await asyncio.open_unix_connection(f"{self.host}/.s.PGSQL.{self.target_port}")
        else:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        self.links |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.links -= {writer, up_writer}


@pytest.fixture
async def relay(pg_url: str) -> AsyncIterator[Relay]:
    r = Relay(pg_url)
    await r.up()
    try:
        yield r
    finally:
        if r.server is not None:
            await r.down()


def new_job(registry: Registry, tool: str = "echo", *, server_id: int | None = None) -> Job:
    job = Job(server="demo", server_id=server_id, tool=tool, arguments={}, policy=WaitPolicy(5, 30, 60))
    job.recorder = JobRecord(job, registry.job_queue)
    return job


def answered(text: str, *, hold: asyncio.Event | None = None) -> Callable[[Job], Awaitable[ToolResult]]:
    """A submit that starts working, waits for `hold` if given, and answers `text`."""

    async def submit(job: Job) -> ToolResult:
        job.working()
        if hold is not None:
            await hold.wait()
        return ToolResult(text=text)

    return submit


def round_trips(trace: Path) -> list[str]:
    """The statements of a libpq trace, one per round trip, each as its SQL text ("" for the pool's empty check
    query, "PREPARE <text>" for a statement being prepared)."""
    names: dict[str, str] = {}
    out: list[str] = []
    current: str | None = None
    # One message per line, except that a query's own line breaks continue it on the next lines.
    messages = re.split(r"\n(?=[FB]\t\d+\t)", trace.read_text())
    for line in messages:
        fields = line.split("\t", 3)
        if len(fields) < 3 or fields[0] != "F":
            continue
        message, rest = fields[2].strip(), fields[3].strip() if len(fields) > 3 else ""
        if message == "Query":
            out.append(rest.strip('"'))
        elif message == "Parse":
            m = re.match(r'"([^"]*)" "(.*)" \d+', rest, re.S)
            assert m is not None, line
            name, text = m.groups()
            if name:
                names[name] = text
                current = f"PREPARE {text}"
            else:
                current = text
        elif message == "Bind":
            m = re.match(r'"[^"]*" "([^"]*)"', rest)
            assert m is not None, line
            if m.group(1):
                current = names[m.group(1)]
        elif message == "Sync":
            out.append(current or "")
            current = None
    return out


async def rows_of(registry: Registry, jobs: list[Job]) -> dict[Any, dict[str, Any]]:
    async with registry.pool.connection() as conn:
        cur = await conn.execute("SELECT * FROM mcp_jobs WHERE id = ANY(%s)", ([j.id for j in jobs],))
        return {r["id"]: r for r in await cur.fetchall()}


# -- batching -----------------------------------------------------------------------------------------------------


async def test_a_burst_of_jobs_takes_a_few_prepared_round_trips(
    registry: Registry, pg_url: str, tmp_path: Path
) -> None:
    trace = tmp_path / "libpq.trace"
    async with own_registry(pg_url, max_size=1, trace=trace) as reg:
        # 200 jobs that start and end at once: each is one row, written with its final state.
        burst = [new_job(reg).start(answered(f"answer {i}")) for i in range(200)]
        await asyncio.wait_for(asyncio.gather(*(j.settled() for j in burst)), 30)
        stats = reg.job_queue.stats
        assert stats.rows == 200 and stats.lost == 0
        assert stats.flushes <= 3, stats
        burst_trips = round_trips(trace)
        writes = [s for s in burst_trips if "INSERT INTO mcp_jobs" in s]
        assert len(writes) == stats.flushes
        # One round trip per flush, and none for the pool's check of a healthy connection: not 400 statements on
        # 400 checkouts.
        assert len(burst_trips) == stats.flushes, burst_trips

        # One job after another: the statement's text never changes, so psycopg prepares it on the connection
        # after a few executions and then only binds it.
        for i in range(8):
            await new_job(reg).start(answered(f"one {i}")).settled()
        trips = round_trips(trace)
        prepared = [t for t in trips if t.startswith("PREPARE ") and "INSERT INTO mcp_jobs" in t]
        assert len(prepared) == 1
        after = trips[trips.index(prepared[0]) + 1 :]
        assert [t for t in after if "INSERT INTO mcp_jobs" in t], "the prepared statement was not used"
        # Nothing else reached the database: job rows only.
        assert all("INSERT INTO mcp_jobs" in t for t in trips), trips

    rows = await rows_of(registry, burst)
    assert len(rows) == 200
    assert {r["state"] for r in rows.values()} == {"completed"}
    assert sorted(r["result"]["text"] for r in rows.values()) == sorted(f"answer {i}" for i in range(200))


async def test_records_that_never_pause_are_still_written_within_the_window(registry: Registry, pg_url: str) -> None:
    """Jobs that start one after another with no lull, and too few to fill a batch: the write of their first rows
    starts FLUSH_MAX_WAIT_S after the first of them, while the stream goes on. That window is what a crash may
    lose; without the bound, rows would wait for the stream to pause."""
    every, stream_s = job_queue.FLUSH_QUIET_S * 0.6, job_queue.FLUSH_MAX_WAIT_S * 2
    assert stream_s / every < job_queue.FLUSH_ROWS  # neither a lull nor a full batch ends a window
    async with own_registry(pg_url) as reg:
        started = time.monotonic()
        holds: list[asyncio.Event] = []
        jobs: list[Job] = []
        while time.monotonic() - started < stream_s:
            hold = asyncio.Event()
            holds.append(hold)
            jobs.append(new_job(reg).start(answered("later", hold=hold)))
            await asyncio.sleep(every)
        # The jobs still wait (none has been let go): a flush counted now started while records kept coming. Counted
        # as the write starts, not as it ends: a slow commit (an fsync) must not fail this.
        assert reg.job_queue.stats.flushes >= 1, "no write started while records kept coming"
        for hold in holds:
            hold.set()
        await asyncio.wait_for(reg.jobs_flushed(), 10)
        assert reg.job_queue.stats.lost == 0
    rows = await rows_of(registry, jobs)
    assert len(rows) == len(jobs) and {r["state"] for r in rows.values()} == {"completed"}


async def test_a_running_job_is_visible_and_its_final_state_replaces_it(registry: Registry) -> None:
    hold = asyncio.Event()
    job = new_job(registry).start(answered("late answer", hold=hold))
    await eventually(lambda: registry.job_queue.pending == 0 and job.state == "working", 5, "the first flush")
    await registry.jobs_flushed()
    row = await registry.get_job(job.id)
    assert row is not None and row["state"] == "working" and row["finished_at"] is None and row["result"] is None
    hold.set()
    await job.settled()
    row = await registry.get_job(job.id)
    assert row is not None and row["state"] == "completed" and row["result"]["text"] == "late answer"


# -- what a row holds ---------------------------------------------------------------------------------------------


async def test_rows_are_whole_right_and_scrubbed(registry: Registry) -> None:
    known.add(SECRET)
    server = await registry.add_server(stdio_demo())
    hold = asyncio.Event()

    async def receipt_job(job: Job) -> ToolResult:
        job.accept_receipt({"job_id": "r1", "status_url": f"https://h/?t={SECRET}"}, "r1", "accepted")
        job.polled(status="running")
        job.elicitations = [{"message": f"token {SECRET}?", "action": "accept"}]
        job.samplings = [{"model": "m", "max_tokens": 10}]
        await hold.wait()
        return ToolResult(text=f"done with {SECRET}", structured={"key": SECRET, "n": 3})

    async def failing_job(job: Job) -> ToolResult:
        job.working()
        raise ToolCallError("demo", "echo", f"refused Bearer {SECRET}", "tool_error")

    before = time.time()
    slow = new_job(registry, "report", server_id=server.id)
    await asyncio.sleep(0.3)  # the row is written well after the submit: submitted_at must still be the submit's
    slow.start(receipt_job)
    failed = new_job(registry, server_id=server.id).start(failing_job)
    # The caller gives up waiting: the answer then comes late, and the row says so.
    with pytest.raises(ToolCallError):
        await slow.wait(0.05)
    hold.set()
    await asyncio.gather(slow.settled(), failed.settled())
    rows = await rows_of(registry, [slow, failed])

    r = rows[slow.id]
    assert (r["server_id"], r["server_name"], r["tool"], r["kind"], r["state"]) == (
        server.id,
        "demo",
        "report",
        "receipt",
        "completed",
    )
    assert r["polls"] == 1 and r["delivered_late"] is True and r["error"] is None
    assert r["result"] == {"text": "done with ***", "structured": {"key": "***", "n": 3}}
    assert r["receipt"] == {"job_id": "r1", "status_url": "https://h/?t=***"}
    assert r["elicitations"] == [{"message": "token ***?", "action": "accept"}]
    assert r["samplings"] == [{"model": "m", "max_tokens": 10}]
    submitted = r["submitted_at"].timestamp()
    assert before - 0.01 <= submitted <= before + 0.05, (before, submitted)
    assert r["submitted_at"] <= r["finished_at"] <= r["updated_at"]
    assert abs((r["finished_at"] - r["submitted_at"]).total_seconds() - slow.duration) < 0.002

    f = rows[failed.id]
    assert f["state"] == "failed" and f["kind"] == "plain" and f["result"] is None
    assert f["error"] == "refused Bearer ***" and f["delivered_late"] is False
    assert f["submitted_at"] <= f["finished_at"]
    async with registry.pool.connection() as conn:
        dump = await (await conn.execute("SELECT row_to_json(j)::text AS t FROM mcp_jobs j")).fetchall()
    assert SECRET not in " ".join(d["t"] for d in dump)


async def test_a_job_whose_server_was_removed_keeps_its_row(registry: Registry) -> None:
    server = await registry.add_server(stdio_demo("gone"))
    hold = asyncio.Event()
    job = new_job(registry, server_id=server.id).start(answered("still here", hold=hold))
    await registry.remove_server("gone")
    hold.set()
    await job.settled()
    row = await registry.get_job(job.id)
    assert row is not None and row["server_id"] is None and row["state"] == "completed"


# -- failures -----------------------------------------------------------------------------------------------------


async def test_records_wait_out_an_unreachable_database_and_all_land(
    registry: Registry, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mcp_integration.job_queue")
    async with own_registry(relay.url) as reg:
        hold = asyncio.Event()
        running = new_job(reg).start(answered("after the outage", hold=hold))
        await eventually(lambda: running.state == "working", 5, "working")
        await reg.jobs_flushed()
        assert (await rows_of(registry, [running]))[running.id]["state"] == "working"

        await relay.down()
        fresh = new_job(reg).start(answered("during the outage"))
        hold.set()  # the running job ends while the database is away
        await asyncio.wait_for(asyncio.gather(running.outcome(), fresh.outcome()), 5)  # answers never wait

        def warned() -> bool:
            text = " ".join(r.getMessage() for r in caplog.records if "not recorded yet" in r.getMessage())
            return f"job {running.id}: " in text and f"job {fresh.id}: " in text

        await eventually(warned, 20, "a warning naming both jobs")
        settled = asyncio.ensure_future(asyncio.gather(running.settled(), fresh.settled()))
        # More failed attempts (each as slow as a failing connect on a busy machine): nothing is dropped.
        await eventually(lambda: reg.job_queue.stats.failed_flushes >= 2, 30, "a second failed flush")
        assert not settled.done()
        rows = await rows_of(registry, [running, fresh])
        assert rows[running.id]["state"] == "working" and fresh.id not in rows
        assert reg.job_queue.stats.lost == 0

        await relay.up()
        await asyncio.wait_for(settled, 40)
        rows = await rows_of(registry, [running, fresh])
        assert rows[running.id]["state"] == "completed" and rows[running.id]["result"]["text"] == "after the outage"
        assert rows[fresh.id]["state"] == "completed" and rows[fresh.id]["result"]["text"] == "during the outage"
        assert rows[fresh.id]["finished_at"] is not None and reg.job_queue.stats.lost == 0
    assert any("once the database was back" in r.getMessage() for r in caplog.records)


async def test_records_are_dropped_with_one_warning_when_retrying_ends(
    registry: Registry, relay: Relay, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with own_registry(relay.url) as reg:
        await relay.down()
        # A job that stops retrying (its session is closing) is tried once more at once, then dropped.
        closing = [new_job(reg).start(answered(f"c{i}")) for i in range(3)]
        await asyncio.gather(*(j.outcome() for j in closing))
        await eventually(lambda: reg.job_queue.stats.failed_flushes >= 1, 10, "a failed flush")
        for job in closing:
            job.stop_retrying()
        await asyncio.wait_for(asyncio.gather(*(j.settled() for j in closing)), 10)
        lost = [r.getMessage() for r in caplog.records if "lost, not recorded" in r.getMessage()]
        assert len(lost) == 1 and lost[0].startswith("3 job record(s) lost"), lost

        # Past RECORD_RETRY_S, records are dropped too (here at their first failure).
        monkeypatch.setattr(job_queue, "RECORD_RETRY_S", 0.1)
        expired = new_job(reg).start(answered("too late"))
        await asyncio.wait_for(expired.settled(), 15)
        assert reg.job_queue.stats.lost == 4
        await relay.up()
        assert await rows_of(registry, [*closing, expired]) == {}


async def test_a_bad_record_does_not_block_the_others(registry: Registry, caplog: pytest.LogCaptureFixture) -> None:
    async def bad(job: Job) -> ToolResult:
        # PostgreSQL refuses a NUL in jsonb: this row cannot be written, whatever we do.
        job.samplings = [{"note": "a\x00b"}]
        return ToolResult(text="bad")

    jobs = [new_job(registry).start(answered("good 1")), new_job(registry).start(bad)]
    jobs.append(new_job(registry).start(answered("good 2")))
    await asyncio.wait_for(asyncio.gather(*(j.settled() for j in jobs)), 10)
    rows = await rows_of(registry, jobs)
    assert set(rows) == {jobs[0].id, jobs[2].id}
    assert {r["result"]["text"] for r in rows.values()} == {"good 1", "good 2"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"job {jobs[1].id}: " in w and "not recorded in mcp_jobs" in w for w in warnings), warnings
    # The queue goes on: the next job is written in one statement again.
    statements = registry.job_queue.stats.statements
    await new_job(registry).start(answered("after")).settled()
    assert registry.job_queue.stats.statements == statements + 1


async def test_waiting_for_the_queue_ends_whenever_it_is_asked(registry: Registry) -> None:
    """`jobs_flushed()` (one future for all that is queued, not one per record) ends whether it is asked before,
    during or after a flush, also when the batch holds a record settled mid-write (a bad row, dropped)."""

    async def bad(job: Job) -> ToolResult:
        job.samplings = [{"note": "a\x00b"}]  # refused by PostgreSQL: dropped on its own, mid-batch
        return ToolResult(text="bad")

    for delay in (0.0, 0.001, 0.003, 0.006, 0.012, 0.025):
        jobs = [new_job(registry).start(answered(f"ok {i}")) for i in range(30)]
        jobs.append(new_job(registry).start(bad))
        await asyncio.gather(*(j.wait(10) for j in jobs))
        await asyncio.sleep(delay)
        await asyncio.wait_for(registry.jobs_flushed(), 10)
        assert registry.job_queue.pending == 0
        assert len(await rows_of(registry, jobs)) == 30
    await asyncio.wait_for(registry.jobs_flushed(), 1)  # nothing queued: at once


# -- closing ------------------------------------------------------------------------------------------------------


async def test_closing_the_registry_drains_what_is_queued(
    registry: Registry, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with own_registry(pg_url) as reg:
        jobs = [new_job(reg).start(answered(f"last {i}")) for i in range(20)]
        await asyncio.gather(*(j.outcome() for j in jobs))
        assert reg.job_queue.pending == 20  # answered, not yet written
    rows = await rows_of(registry, jobs)
    assert len(rows) == 20 and {r["state"] for r in rows.values()} == {"completed"}
    # A job that ends after its registry closed is logged, and does not hang.
    late = new_job(reg).start(answered("too late"))
    await asyncio.wait_for(late.settled(), 5)
    assert any(f"job {late.id}: " in r.getMessage() and "registry is closed" in r.getMessage() for r in caplog.records)


async def test_a_call_that_exits_right_after_its_answer_keeps_its_row(registry: Registry, pg_url: str) -> None:
    # What `python -m mcp_integration call` does: answer, close the dispatcher, close the registry, exit.
    async with own_registry(pg_url) as reg:
        await reg.add_server(stdio_demo())
        d = Dispatcher(reg, connect_timeout=15)
        await d.start()
        try:
            job = d.submit("echo", {"text": "bye"})
            assert (await job.wait(30)).text == "echo: bye"
        finally:
            await d.aclose()
    row = await registry.get_job(job.id)
    assert row is not None and row["state"] == "completed" and row["result"]["text"] == "echo: bye"


async def test_learned_timing_reads_the_database_once_per_tool(registry: Registry, pg_url: str, tmp_path: Path) -> None:
    """A call's path holds no query of its own: past durations are read once per tool, then kept in memory."""
    trace = tmp_path / "libpq.trace"
    async with own_registry(pg_url, max_size=1, trace=trace) as reg:
        await reg.add_server(stdio_demo())
        d = Dispatcher(reg, connect_timeout=15)
        await d.start()
        try:
            await d.submit("echo", {"text": "first"}).settled()
            seeded = len(round_trips(trace))
            for i in range(10):
                await d.submit("echo", {"text": str(i)}).settled()
        finally:
            await d.aclose()
    later = round_trips(trace)[seeded:]
    assert [t for t in later if t and "INSERT INTO mcp_jobs" not in t] == []
    assert sum("recent" in t or "finished_at - submitted_at" in t for t in round_trips(trace)[:seeded]) == 1
