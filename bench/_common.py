"""What the benchmarks share: test servers as subprocesses (start one, read its port, stop them all) and a
database (DATABASE_URL or an embedded PostgreSQL)."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from mcp_integration.embedded_db import EmbeddedPostgres

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
