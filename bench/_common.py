"""What the benchmarks share: test servers as subprocesses (start one, read its port, stop them all), a
database (DATABASE_URL or an embedded PostgreSQL), a schema and a Registry of its own for each run, and
cProfile output."""

from __future__ import annotations

import contextlib
import cProfile
import ctypes
import io
import os
import pstats
import select
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from mcp_integration.embedded_db import EmbeddedPostgres
from mcp_integration.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ROOT / "tests" / "servers"


def die_with_parent() -> None:
    # Linux: the server gets SIGKILL when the benchmark dies, so an interrupted run leaves nothing behind.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(script: str, args: list[str], procs: list[subprocess.Popen[str]], env: dict[str, str] | None = None) -> int:
    """Start a test server; returns the port it prints as `LISTENING <port>`."""
    cmd = [sys.executable, str(SERVERS / script), "--port", "0", *args]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        preexec_fn=die_with_parent,
    )
    procs.append(proc)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("LISTENING "):
        raise RuntimeError(f"{script} did not start (exit code {proc.poll()})")
    return int(line.split()[1])


def stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


@asynccontextmanager
async def bench_database(*, announce: bool = True) -> AsyncIterator[str]:
    """DATABASE_URL when set, else an embedded PostgreSQL in a temporary folder, stopped afterwards."""
    url = os.environ.get("DATABASE_URL")
    if url:
        if announce:
            print("database: DATABASE_URL")
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="bench-pg-") as tmp:
        embedded = EmbeddedPostgres(Path(tmp))
        try:
            url = await embedded.start()
            if announce:
                print("database: embedded PostgreSQL")
            yield url
        finally:
            await embedded.stop()


@asynccontextmanager
async def bench_schema(base_url: str) -> AsyncIterator[str]:
    """A fresh `bench_<hex>` schema: yields a conninfo whose search_path is it, and drops it on exit (so close
    whatever holds connections to it before leaving)."""
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(base_url, autocommit=True) as conn:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield make_conninfo(base_url, options=f"-c search_path={schema}")
    finally:
        async with await psycopg.AsyncConnection.connect(base_url, autocommit=True) as conn:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@asynccontextmanager
async def bench_registry(conninfo: str, *, max_size: int = 10) -> AsyncIterator[Registry]:
    """A Registry on `conninfo`, migrated, closed on exit (closing it earlier is fine: a second close is a no-op)."""
    registry = await Registry.open(conninfo, max_size=max_size)
    try:
        await registry.migrate()
        yield registry
    finally:
        await registry.close()


@contextlib.contextmanager
def profiled(enabled: bool, what: str, top: int = 40) -> Iterator[None]:
    """cProfile the block when enabled; its top functions by own and by cumulative time go to stderr."""
    if not enabled:
        yield
        return
    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        for key in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats(key).print_stats(top)
            print(f"\n---- profile of {what}, by {key} ----", file=sys.stderr)
            print("\n".join(out.getvalue().splitlines()[5:]), file=sys.stderr)
