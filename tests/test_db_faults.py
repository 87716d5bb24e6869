"""Database faults, on the real PostgreSQL: it is restarted, or stopped for a few seconds, while the pool, the
registry watcher and running jobs use it. Calls in flight finish or fail with a psycopg OperationalError, the next
ones work, no job is lost from mcp_jobs, and a session that starts while it is down starts from the on-disk copy.

The server is the one the tests use: the machine's cluster (pg_ctlcluster) when DATABASE_URL points at it, else
the embedded pgserver of the test run (its own pg_ctl). It is always started again, and waited for, in a finally.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from conftest import eventually, stdio_demo

from mcp_integration.config import Settings
from mcp_integration.dispatcher import Dispatcher
from mcp_integration.health import Health
from mcp_integration.jobs import Job
from mcp_integration.registry import Registry
from mcp_integration.registry_watch import RegistryWatcher
from mcp_integration.runtime import SessionStart, start_from_registry_or_snapshot
from mcp_integration.snapshot import read_snapshot, write_snapshot

READY_TIMEOUT_S = 60.0
SECRET = "s3cret-value-never-on-disk"


@dataclass
class PgControl:
    """Stops and starts the PostgreSQL behind a connection string, whichever way it was started."""

    url: str
    data_dir: Path
    cluster: tuple[str, str] | None  # (version, name) when it is a pg_ctlcluster cluster
    touched: bool = False

    @classmethod
    def find(cls, url: str) -> PgControl:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
        assert row is not None
        data_dir = Path(row[0]).resolve()
        if shutil.which("pg_lsclusters"):
            out = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True, check=True).stdout
            for line in out.splitlines():
                fields = line.split()
                if len(fields) >= 6 and Path(fields[5]).resolve() == data_dir:
                    return cls(url, data_dir, (fields[0], fields[1]))
        return cls(url, data_dir, None)

    def _ctl(self, action: str) -> None:
        self.touched = True
        if self.cluster is not None:
            cmd = ["pg_ctlcluster", "--skip-systemctl-redirect", *self.cluster, action]
            if action in ("stop", "restart"):
                cmd.append("--mode=fast")
            _run(cmd)
            return
        # The embedded pgserver: its own pg_ctl, run as the user that owns the data (pgserver's, under root).
        from pgserver._commands import POSTGRES_BIN_PATH

        user = "pgserver" if os.geteuid() == 0 else None
        args = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.data_dir), "-w"]
        if action == "start":
            # The options it was started with (socket folder, no TCP) come from postmaster.opts.
            args += ["-o", self._postmaster_options()]
        else:
            args += ["-m", "fast"]
        _run([*args, "-l", str(self.data_dir / "log"), action], user=user)

    def _postmaster_options(self) -> str:
        words = shlex.split((self.data_dir / "postmaster.opts").read_text())[1:]
        if "-D" in words:
            i = words.index("-D")
            del words[i : i + 2]
        return shlex.join(words)

    def stop(self) -> None:
        self._ctl("stop")

    def start(self) -> None:
        if not self.accepting():
            self._ctl("start")
        self.wait_ready()

    def restart(self) -> None:
        self._ctl("restart")
        self.wait_ready()

    def finish(self) -> None:
        """At the end of the run: the machine's cluster is left running; an embedded server we restarted is
        stopped here, since pgserver's own cleanup only knows the process it started itself."""
        if self.cluster is not None:
            self.start()
        elif self.touched and self.accepting():
            self._ctl("stop")

    def accepting(self) -> bool:
        try:
            with psycopg.connect(self.url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.accepting():
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not accept connections within {READY_TIMEOUT_S:g} s")
            time.sleep(0.2)


def _run(cmd: list[str], user: str | None = None) -> None:
    # Never a pipe: a server started by pg_ctl inherits its output, and reading a pipe to its end would wait
    # for the server to exit.
    subprocess.run(
        cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=READY_TIMEOUT_S, user=user
    )


@pytest.fixture(scope="session")
def pg(pg_base_url: str) -> Iterator[PgControl]:
    control = PgControl.find(pg_base_url)
    try:
        yield control
    finally:
        control.finish()


@pytest.fixture(autouse=True)
def _database_up(pg: PgControl) -> Iterator[None]:
    yield
    pg.start()  # whatever a test did, the next one (and the rest of the run) finds PostgreSQL up


@asynccontextmanager
async def database_down(pg: PgControl) -> AsyncIterator[None]:
    """PostgreSQL stopped for the body of the block; started again (and accepting) after it, always."""
    await asyncio.to_thread(pg.stop)
    try:
        yield
    finally:
        await asyncio.to_thread(pg.start)


async def test_pool_and_watcher_survive_a_restart(registry: Registry, pg: PgControl) -> None:
    dispatcher = Dispatcher(registry, connect_timeout=15)
    await dispatcher.start(wait=False, servers=[], cached={})
    watcher = RegistryWatcher(registry, dispatcher).start()
    await asyncio.wait_for(watcher.listening.wait(), 15)
    outcomes: list[object] = []
    hammering = True

    async def hammer() -> None:
        # Registry calls all through the restart: each returns, or raises OperationalError (never hangs, never
        # anything else); `pg_sleep` keeps one query in flight at the moment the server goes away.
        while hammering:
            try:
                await registry.list_servers()
                outcomes.append("ok")
            except psycopg.OperationalError as exc:
                outcomes.append(exc)
            await asyncio.sleep(0.05)

    async def long_query() -> None:
        async with registry.pool.connection() as conn:
            await conn.execute("SELECT pg_sleep(30)")

    in_flight = asyncio.create_task(long_query())
    load = asyncio.create_task(hammer())
    try:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(pg.restart)
        with pytest.raises(psycopg.OperationalError):
            await asyncio.wait_for(in_flight, 15)
        # The first call once PostgreSQL accepts connections again works: broken pooled connections are
        # noticed by the pool's check and replaced, not handed out.
        assert await registry.list_servers() == []
        ok_before = outcomes.count("ok")
        await eventually(lambda: outcomes.count("ok") > ok_before + 3, 15, "calls after the restart")
    finally:
        hammering = False
        await load
        in_flight.cancel()
        await asyncio.gather(in_flight, return_exceptions=True)
    assert all(o == "ok" or isinstance(o, psycopg.OperationalError) for o in outcomes)

    try:
        # The watch reconnects and LISTENs again: a server added after the restart reaches the dispatcher.
        await asyncio.wait_for(watcher.listening.wait(), 30)
        await registry.add_server(stdio_demo("after"))

        async def arrived() -> bool:
            return "after" in dispatcher.servers and any(t.server == "after" for t in dispatcher.tools)

        await eventually(arrived, 30, "the server added after the restart")
    finally:
        await watcher.aclose()
        await dispatcher.aclose()


async def test_a_pooled_connection_whose_session_ended_is_never_lent(registry: Registry, pg_url: str) -> None:
    """The pool's check spends no round trip on a quiet connection, yet never lends one whose server session
    ended while it sat idle (ended by an administrator or a restart: the server's goodbye waits on its socket)."""
    async with registry.pool.connection() as a, registry.pool.connection() as b:
        pids = [a.info.backend_pid, b.info.backend_pid]
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:
        for pid in pids:
            await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

        async def ended() -> bool:
            cur = await admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,))
            row = await cur.fetchone()
            return row is not None and row[0] == 0

        await eventually(ended, 10, "the sessions to end")
    for _ in range(6):  # more than the pool held: each ended connection was offered and refused
        async with registry.pool.connection() as conn:
            assert conn.info.backend_pid not in pids
            await conn.execute("SELECT 1")


async def test_jobs_are_answered_and_recorded_across_an_outage(
    registry: Registry, pg: PgControl, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mcp_integration.jobs")
    await registry.add_server(stdio_demo())
    d = Dispatcher(registry, connect_timeout=15)
    await d.start()
    try:
        # Learned timing reads past durations once per tool; done here, so the outage tests the job records.
        await d.call("echo", {"text": "warm"}, timeout=30)
        await d.call("slow", {"seconds": 0.05, "steps": 1}, timeout=30)

        running = d.submit("slow", {"seconds": 3, "steps": 3})

        async def recorded_working() -> bool:
            row = await registry.get_job(running.id)
            return row is not None and row["state"] == "working"

        await eventually(recorded_working, 15, "the running job's row")

        def retrying(job: Job) -> bool:
            return any(f"job {job.id}: " in m and "not recorded" in m for m in caplog.messages)

        async with database_down(pg):
            fresh = d.submit("echo", {"text": "while down"})
            # The answers never wait for the database: the running job ends while it is down, and a job
            # submitted now is answered though its row cannot be written; a registry call fails clearly.
            with pytest.raises(psycopg.OperationalError):
                await asyncio.wait_for(registry.list_servers(), 30)
            assert (await running.wait(30)).text == "done after 3s"
            assert (await fresh.wait(30)).text == "echo: while down"
            # Both writes fail while it is down (the running job's final state, the new job's row) and are
            # retried, not dropped.
            await eventually(lambda: retrying(running) and retrying(fresh), 30, "a failed write of each job")
            settle = asyncio.ensure_future(asyncio.gather(running.settled(), fresh.settled()))
            await asyncio.sleep(0.5)
            assert not settle.done()
        await asyncio.wait_for(settle, 60)

        for job, text in ((running, "done after 3s"), (fresh, "echo: while down")):
            row = await registry.get_job(job.id)
            assert row is not None, f"job {job.id} lost from mcp_jobs"
            assert row["state"] == "completed"
            assert row["finished_at"] is not None
            assert row["result"]["text"] == text
    finally:
        await d.aclose()


async def test_session_starts_from_the_snapshot_while_the_database_is_down(
    registry: Registry,
    pg: PgControl,
    pg_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("VOICE_MCP_TEST_SECRET", SECRET)
    cfg = stdio_demo()
    cfg.env = {"DEMO_TOKEN": "env:VOICE_MCP_TEST_SECRET", "MODE": "literal-from-registry"}
    saved = await registry.add_server(cfg)
    path = tmp_path / "data" / "registry-snapshot.json"

    online = Dispatcher(registry, connect_timeout=15)
    start = await start_dispatcher(online, path, timeout=10)
    try:
        assert start.source == "database"
        assert start.saved is not None and await asyncio.wait_for(start.saved, 30)
    finally:
        await online.aclose()
    # What the registry holds, no more: the reference, never the value it resolves to; owner-only.
    text = path.read_text()
    assert "env:VOICE_MCP_TEST_SECRET" in text and "literal-from-registry" in text
    assert SECRET not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    snap = read_snapshot(path)
    assert snap is not None and snap.servers == [saved]
    assert {t.name for t in snap.tools["demo"]} >= {"echo", "slow", "add"}

    caplog.set_level(logging.WARNING, logger="mcp_integration.snapshot")
    offline_registry: Registry | None = None
    offline: Dispatcher | None = None
    try:
        async with database_down(pg):
            # A new session's pool, opened while the database is down: it opens without waiting.
            offline_registry = await Registry.open(pg_url, wait=False)
            offline = Dispatcher(offline_registry, connect_timeout=15)
            began = await start_dispatcher(offline, path, timeout=2)
            assert began.source == "snapshot"
            assert began.age_s is not None and began.age_s < 300
            # The tools are there at once, from the snapshot's tool cache.
            assert {"echo", "slow"} <= {t.name for t in offline.tools}
            warnings = [r.getMessage() for r in caplog.records if r.name == "mcp_integration.runtime"]
            assert len(warnings) == 1
            assert "on-disk copy of the registry" in warnings[0] and " ago " in warnings[0]
            job = offline.submit("echo", {"text": "offline"})
            assert (await job.wait(30)).text == "echo: offline"
        # Back up: the same pool reconnects, and the job's row and final state land.
        await asyncio.wait_for(job.settled(), 60)
        row = await registry.get_job(job.id)
        assert row is not None and row["state"] == "completed" and row["result"]["text"] == "echo: offline"
    finally:
        if offline is not None:
            await offline.aclose()
        if offline_registry is not None:
            await offline_registry.close()


async def start_dispatcher(d: Dispatcher, path: Path, *, timeout: float) -> SessionStart:
    """A session start as the worker makes it (runtime.py), with this database timeout."""
    return await start_from_registry_or_snapshot(d, Health(d), path, Settings(db_start_timeout_s=timeout))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("content", [None, "{not json", '{"format": 99, "servers": [], "tools": {}}'])
async def test_unreachable_without_a_usable_snapshot_starts_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str | None
) -> None:
    path = tmp_path / "registry-snapshot.json"
    if content is not None:
        path.write_text(content)
    reg = await Registry.open(f"postgresql://postgres@127.0.0.1:{_closed_port()}/none", wait=False)
    d = Dispatcher(reg)
    try:
        began = await start_dispatcher(d, path, timeout=0.5)
        assert began.source == "empty" and began.reason
        assert d.tools == [] and d.servers == {}
        messages = [r.getMessage() for r in caplog.records if r.name == "mcp_integration.runtime"]
        assert any("no usable registry snapshot" in m for m in messages)
        if content is not None:
            assert any(str(path) in m and ("unreadable" in m or "not usable" in m) for m in messages)
    finally:
        await d.aclose()
        await reg.close()


def test_snapshot_write_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "snap.json"
    first = stdio_demo("one")
    write_snapshot(path, [first], {})
    second = stdio_demo("two")
    write_snapshot(path, [second], {})
    snap = read_snapshot(path)
    assert snap is not None and [s.name for s in snap.servers] == ["two"]
    assert [p.name for p in tmp_path.iterdir()] == ["snap.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
