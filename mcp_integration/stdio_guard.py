"""A stdio server as the SDK starts it, with two guards the SDK does not give.

- **Its stderr is scrubbed.** The server gets a pipe of its own for stderr; a thread relays its lines to ours
  through `secrets.scrub`, so a server that prints the API token we gave it does not print it to our log.
- **Its whole process group ends with it.** The SDK starts each server in a new session (its own process group)
  and kills the group only when the server outlives the grace period after stdin closes. A server that forks a
  worker and exits at once leaves that worker running. We find the server's process by its stderr pipe and, once
  the SDK is done, end what is left of its group (SIGTERM, then SIGKILL after a grace period). Linux only, by
  /proc; elsewhere the SDK's own cleanup is all there is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mcp.client.stdio import StdioServerParameters, stdio_client

from mcp_integration.mcp_compat import TransportStreams
from mcp_integration.scrubber import scrub

__all__ = ["guarded_stdio"]

# How long what is left of a server's process group gets between SIGTERM and SIGKILL.
GROUP_GRACE_S = 2.0
_POLL_S = 0.02
# A server that writes one endless line to stderr is relayed in pieces of this size.
_MAX_LINE = 65_536


@asynccontextmanager
async def guarded_stdio(params: StdioServerParameters, server: str) -> AsyncIterator[TransportStreams]:
    read_fd, write_fd = os.pipe()
    errlog = os.fdopen(write_fd, "w", encoding="utf-8", errors="replace")
    pipe = os.fstat(write_fd).st_ino
    threading.Thread(target=_relay, args=(read_fd,), name=f"stderr-{server}", daemon=True).start()
    group: int | None = None
    try:
        async with stdio_client(params, errlog=errlog) as streams:
            group = _process_on_pipe(pipe)
            yield streams
    finally:
        errlog.close()  # our copy of the write end: the relay ends once the server's copies are gone too
        if group is not None:
            await _end_group(group)


def _relay(read_fd: int) -> None:
    with os.fdopen(read_fd, "rb") as lines:
        for raw in iter(lambda: lines.readline(_MAX_LINE), b""):
            text = scrub(raw.decode("utf-8", "replace"))
            stream = sys.stderr or sys.__stderr__
            if stream is None:
                continue
            with contextlib.suppress(OSError, ValueError):
                stream.write(text)
                stream.flush()


def _process_on_pipe(pipe: int) -> int | None:
    """The pid of our child process whose stderr is this pipe (the server; it leads its own process group)."""
    wanted = f"pipe:[{pipe}]"
    for pid in _children():
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/2") == wanted:
                return pid
    return None


def _children() -> list[int]:
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError, ValueError), open(f"/proc/self/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
    return pids


async def _end_group(pgid: int) -> None:
    if not _alive(pgid):
        return
    _signal(pgid, signal.SIGTERM)
    # Polled: nothing signals the end of a process group that is not ours to wait for.
    for _ in range(int(GROUP_GRACE_S / _POLL_S)):
        await asyncio.sleep(_POLL_S)
        if not _alive(pgid):
            return
    _signal(pgid, signal.SIGKILL)


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
