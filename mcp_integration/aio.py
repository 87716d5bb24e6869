"""Small asyncio helpers the package shares: background tasks kept alive, waiting on events, jittered backoff,
long timers kept behind one.

Hand-written because each is a few lines that `tenacity`/`backoff` would wrap in decorators built for retrying
one call, while ours drive loops (reconnects, record writes, a watcher, a breaker's pauses) that also sleep,
give up or reset on their own terms. `Deadlines` because asyncio keeps each timer, cancelled ones too, in one
heap until it comes due.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mcp_integration.logs import outside_job

__all__ = ["Backoff", "Deadline", "Deadlines", "first_set", "spawn", "wait_event"]

log = logging.getLogger(__name__)

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


class Deadline:
    """One deadline of a `Deadlines`: `cancel()` it when it is no longer wanted (a no-op once it fired)."""

    __slots__ = ("callback", "owner")

    def __init__(self, owner: Deadlines, callback: Callable[[], object]) -> None:
        self.owner = owner
        self.callback: Callable[[], object] | None = callback

    def cancel(self) -> None:
        if self.callback is not None:
            self.callback = None
            self.owner._cancelled()


class Deadlines:
    """The long timers of one event loop's jobs (each job's background limit, minutes long; each wait's idle
    deadline, half a minute), nearly all cancelled within seconds, kept behind one loop timer.

    An asyncio timer is a handle in the loop's heap, and a cancelled one stays there until it would have come
    due (or until cancelled ones are half the heap): every call's long timers kept the loop's heap dozens deep,
    and each push and pop there compares handles in Python (`TimerHandle.__lt__`), for the HTTP client's short
    timeouts too (`bench/call_work.py` counted them). Here a deadline is a tuple in a heap of our own, compared
    in C; a cancel only marks it (the heap is rebuilt when most of it is cancelled), and the one loop timer
    waits for the earliest deadline.
    """

    _COMPACT_AT = 256  # cancelled entries, at least, before the heap is rebuilt without them

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()  # ties in time fire in the order they were set
        self._cancelled_n = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def __len__(self) -> int:
        """Deadlines still wanted."""
        return len(self._heap) - self._cancelled_n

    def add(self, delay: float, callback: Callable[[], object]) -> Deadline:
        """Call `callback` in `delay` seconds, unless the returned deadline is cancelled first."""
        loop = asyncio.get_running_loop()
        entry = Deadline(self, callback)
        when = loop.time() + delay
        heapq.heappush(self._heap, (when, next(self._order), entry))
        self._schedule(loop, when)
        return entry

    def _schedule(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        # The loop timer moves only earlier (a callback that adds a deadline while others fire included).
        if when < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._timer_at = loop.call_at(when, self._fire, loop), when

    def _cancelled(self) -> None:
        self._cancelled_n += 1
        if self._cancelled_n >= self._COMPACT_AT and 2 * self._cancelled_n > len(self._heap):
            self._heap = [item for item in self._heap if item[2].callback is not None]
            heapq.heapify(self._heap)
            self._cancelled_n = 0

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer, self._timer_at = None, math.inf
        now = loop.time()
        heap = self._heap
        while heap:
            when, _, entry = heap[0]
            callback = entry.callback
            if callback is not None and when > now:
                self._schedule(loop, when)
                return
            heapq.heappop(heap)
            if callback is None:
                self._cancelled_n -= 1
                continue
            entry.callback = None
            try:
                callback()
            except Exception:  # one deadline's failure must not keep the others from firing
                log.exception("deadline callback failed")


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
