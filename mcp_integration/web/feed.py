"""The live feed: one change detector per process, fanned out to every open page.

While at least one page listens, a cheap fingerprint query runs once a `period` (or at once when poked, e.g.
by a health check of this process). It gives one fingerprint per group of parts; only the groups whose
fingerprint moved are rebuilt, once, and the same rendered text is handed to every stream: ten open pages
cost the database what one does. A stream receives every part on connect, then only the parts whose text
changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

__all__ = [
    "Frame",
    "LiveFeed",
    "Parts",
]


log = logging.getLogger(__name__)

Parts = dict[str, str]


@dataclass(frozen=True)
class Frame:
    version: int
    parts: Parts
    # Per part, the frame version that last changed it: a stream sends a part when this passes what it sent.
    changed_at: dict[str, int]


class LiveFeed:
    def __init__(
        self,
        fingerprint: Callable[[], Awaitable[dict[str, str]]],
        build: Callable[[frozenset[str]], Awaitable[Parts]],
        *,
        period: float = 1.0,
        on_error: Callable[[Exception], Parts] | None = None,
    ) -> None:
        # What changed, how to rebuild it, and what to show when the database cannot say.
        self._fingerprint, self._build, self._on_error = fingerprint, build, on_error
        self.period = period
        self._frame: Frame | None = None
        self._seen: dict[str, str] = {}
        self._next = asyncio.Event()  # set, then replaced, at each new frame
        self._poke = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listeners = 0
        self._closed = False
        self.builds = 0  # how many times the parts were rebuilt (the benchmark reads it)

    @property
    def listeners(self) -> int:
        return self._listeners

    def poke(self) -> None:
        """Something changed (a health check here, an action): look now rather than at the next tick."""
        self._poke.set()

    def close(self) -> None:
        """End every stream (the server is shutting down) and stop watching."""
        self._closed = True
        self._next.set()
        if self._task is not None:
            self._task.cancel()

    async def stream(self, *, keepalive_s: float | None = None) -> AsyncIterator[tuple[str, str]]:
        """(part, text) pairs: every part first, then each part whose text changed, until close(). With
        `keepalive_s`, an empty part name after that long without news (so proxies keep the stream open)."""
        if self._closed:
            return
        self._listeners += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._watch(), name="dashboard-feed")
        sent: dict[str, int] = {}
        try:
            while not self._closed:
                frame, waiter = self._frame, self._next
                if frame is not None:
                    for name, text in frame.parts.items():
                        if sent.get(name, -1) < frame.changed_at[name]:
                            sent[name] = frame.changed_at[name]
                            yield name, text
                try:
                    async with asyncio.timeout(keepalive_s):
                        await waiter.wait()
                except TimeoutError:
                    yield "", ""
        finally:
            self._listeners -= 1
            if self._listeners == 0 and self._task is not None:
                # Nobody watches: stop querying. The next page starts afresh rather than from a stale frame.
                self._task.cancel()
                self._task, self._seen, self._frame = None, {}, None

    async def _watch(self) -> None:
        failing = False
        while True:
            self._poke.clear()
            try:
                seen = await self._fingerprint()
                changed = frozenset(k for k, v in seen.items() if self._seen.get(k) != v)
                if changed:
                    parts = await self._build(changed)
                    self.builds += 1
                    self._seen = seen
                    self._publish(parts)
                if failing:
                    log.info("dashboard feed: the database answers again")
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning("dashboard feed: cannot read the database: %s", type(exc).__name__)
                failing, self._seen = True, {}
                if self._on_error is not None:
                    self._publish(self._on_error(exc))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.period):
                    await self._poke.wait()
            # A burst of pokes (fifty servers checked at once) becomes one look; and a health check pokes just
            # before it is written to the database, so give the write a moment.
            await asyncio.sleep(0.1)

    def _publish(self, parts: Parts) -> None:
        old = self._frame
        version = (old.version + 1) if old else 1
        merged = dict(old.parts) if old else {}
        changed_at = dict(old.changed_at) if old else {}
        for name, text in parts.items():
            if merged.get(name) != text:
                merged[name] = text
                changed_at[name] = version
        if old is not None and changed_at == old.changed_at:
            return
        self._frame = Frame(version, merged, changed_at)
        waiter, self._next = self._next, asyncio.Event()
        waiter.set()
