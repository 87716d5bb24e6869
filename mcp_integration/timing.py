"""When to poll: never faster than the server asks, first near when such jobs usually finish, then backing off.

Learned timing: the durations of a tool's recent jobs (seeded from `mcp_jobs`, then updated as jobs finish)
give an expected completion time; the first poll is scheduled just after it instead of at a fixed interval,
which saves the polls that could only ever see "still running".
"""

from __future__ import annotations

import random
import statistics
from collections import deque
from dataclasses import dataclass, field

__all__ = [
    "DurationStats",
    "PollSchedule",
]


@dataclass
class PollSchedule:
    """Delays between polls of one job.

    `floor_s` is the fastest the server allows (its pollInterval, else the row's poll_interval): no delay is
    ever below it. For the first `backoff_after_s` a job is polled at the floor, so a short job is noticed
    within one interval; after that the delay grows with the job's age (a tenth of it, with jitter), up to
    `cap_s`: a job that has run for minutes can wait seconds more, and a thousand of them cost little.
    """

    floor_s: float
    expected_s: float | None = None
    cap_s: float = 10.0
    backoff_after_s: float = 30.0
    age_fraction: float = 0.1
    rng: random.Random = field(default_factory=random.Random)
    polls: int = 0

    def next_delay(self, elapsed_s: float) -> float:
        self.polls += 1
        if self.polls == 1 and self.expected_s is not None and self.expected_s > elapsed_s:
            # Just after the usual finish, so the first poll is likely the last.
            return max(self.floor_s, self.expected_s - elapsed_s + min(0.05 * self.expected_s, self.floor_s / 2))
        if elapsed_s < self.backoff_after_s:
            # Exactly the floor: a job is then seen within one interval. Jobs submitted together are spread
            # by the dispatcher's per-server poll slots, not by jitter that would stretch the interval.
            return self.floor_s
        # Jitter, so that many slow jobs do not poll in lockstep.
        delay = elapsed_s * self.age_fraction * self.rng.uniform(0.85, 1.15)
        return max(self.floor_s, min(delay, max(self.cap_s, self.floor_s)))


class DurationStats:
    """Recent durations per (server, tool), in seconds."""

    def __init__(self, keep: int = 50, min_samples: int = 3, tight_ratio: float = 0.5) -> None:
        self.keep = keep
        self.min_samples = min_samples
        self.tight_ratio = tight_ratio
        self._samples: dict[tuple[str, str], deque[float]] = {}
        self.seeded: set[tuple[str, str]] = set()
        # What `expected` last said per tool, until its samples change: every call asks (its kind is known only
        # from the answer), and quantiles of fifty samples cost a quick call more than its dispatch.
        self._expected: dict[tuple[str, str], float | None] = {}

    def seed(self, key: tuple[str, str], durations: list[float]) -> None:
        d = self._samples.setdefault(key, deque(maxlen=self.keep))
        d.extendleft(reversed(durations[: self.keep - len(d)]))
        self.seeded.add(key)
        self._expected.pop(key, None)

    def add(self, key: tuple[str, str], duration_s: float) -> None:
        self._samples.setdefault(key, deque(maxlen=self.keep)).append(duration_s)
        self._expected.pop(key, None)

    def expected(self, key: tuple[str, str]) -> float | None:
        """When the first poll should come: the point before which few of this tool's jobs finish.

        Near the median when the tool's durations are tight (its p10 at least half its median); with widely
        spread durations, skipping early polls would find quick jobs late, so there is no expectation then.
        """
        if key in self._expected:
            return self._expected[key]
        d = self._samples.get(key)
        if d is None or len(d) < self.min_samples:
            return None
        median = statistics.median(d)
        low = statistics.quantiles(d, n=10, method="inclusive")[0] if len(d) >= 2 else median
        found = self._expected[key] = low if low >= self.tight_ratio * median else None
        return found
