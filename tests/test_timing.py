"""Poll scheduling and learned timing: pure rules, checked exhaustively with hypothesis where it matters."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_integration.timing import DurationStats, PollSchedule


@given(
    floor=st.floats(0.05, 30),
    expected=st.one_of(st.none(), st.floats(0, 600)),
    elapsed=st.floats(0, 600),
    n=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_never_polls_faster_than_the_floor_and_never_beyond_the_cap(floor, expected, elapsed, n, seed) -> None:
    s = PollSchedule(floor_s=floor, expected_s=expected, cap_s=10.0, rng=random.Random(seed))
    for _ in range(n):
        delay = s.next_delay(elapsed)
        assert delay >= floor
        if s.polls > 1:
            assert delay <= max(10.0, floor)


def test_first_poll_lands_just_after_the_expected_finish() -> None:
    s = PollSchedule(floor_s=1.0, expected_s=8.0)
    first = s.next_delay(elapsed_s=0.5)
    assert 7.5 <= first <= 8.0  # 8 - 0.5 plus a small margin
    assert s.next_delay(8.5) == 1.0  # then the interval


def test_no_history_means_the_interval_then_backoff_with_the_jobs_age() -> None:
    s = PollSchedule(floor_s=1.0, rng=random.Random(1))
    early = [s.next_delay(t) for t in (0, 5, 29)]
    assert early == [1.0, 1.0, 1.0]  # a short job is seen within one interval
    later = [s.next_delay(t) for t in (40, 60, 200, 1000)]
    assert 3.0 <= later[0] <= 5.0 and 5.0 <= later[1] <= 7.0  # about a tenth of the age
    assert later[2] == later[3] == 10.0  # capped


def test_duration_stats_need_a_few_samples_and_expect_a_low_quantile_when_tight() -> None:
    stats = DurationStats(min_samples=3)
    key = ("srv", "tool")
    assert stats.expected(key) is None
    stats.seed(key, [4.0, 5.0])
    assert stats.expected(key) is None
    stats.add(key, 4.5)
    assert stats.expected(key) == pytest.approx(4.1)  # p10 of 4, 4.5, 5: few jobs finish before it


def test_widely_spread_durations_give_no_expectation() -> None:
    # Skipping early polls would find the quick jobs late: no learned first poll then.
    stats = DurationStats(min_samples=3)
    stats.seed(("s", "t"), [0.5, 1.0, 2.0, 3.0, 4.0])
    assert stats.expected(("s", "t")) is None
