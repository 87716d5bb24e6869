"""Small asyncio helpers the package shares: background tasks kept alive, waiting on events, jittered backoff.

Hand-written because each is a few lines that `tenacity`/`backoff` would wrap in decorators built for retrying
one call, while ours drive loops (reconnects, record writes, a watcher, a breaker's pauses) that also sleep,
give up or reset on their own terms.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mcp_integration.logs import outside_job

__all__ = ["Backoff", "first_set", "spawn", "wait_event"]

_T = TypeVar("_T")


def spawn(coro: Coroutine[Any, Any, _T], into: set[asyncio.Task[Any]], *, detached: bool = True) -> asyncio.Task[_T]:
    """Run `coro` as a task held in `into` until it ends (the event loop keeps tasks only weakly). `detached`:
    outside the current job's log context, for work that outlives the job that happened to start it."""
    task = asyncio.create_task(coro, context=outside_job() if detached else None)
    into.add(task)
    task.add_done_callback(into.discard)
    return task


async def first_set(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Wait until any of the events is set, or the timeout passes (no error either way)."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Whether the event was set within `timeout`. asyncio.timeout, not wait_for: on Python 3.11 wait_for can
    swallow a cancellation that arrives as the event is set."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


@dataclass
class Backoff:
    """Delays that double from `first_s` to `cap_s`, each times a random factor in `jitter`, so many clients of
    one server do not retry in lockstep. `reset()` after a success starts again from `first_s`."""

    first_s: float
    cap_s: float
    jitter: tuple[float, float] = (0.5, 1.0)
    attempts: int = field(default=0)

    def next(self) -> float:
        base = min(self.cap_s, self.first_s * 2 ** min(self.attempts, 60))
        self.attempts += 1
        return base * random.uniform(*self.jitter)

    def reset(self) -> None:
        self.attempts = 0
