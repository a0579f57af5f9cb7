"""Tables for the timing maths of SWIM and Lifeguard (meshmail.gossip.timing, awareness).

Every expected value is worked out by hand from hashicorp/memberlist's formulas and
written next to its row, so a table fails if the code drifts from memberlist.
"""

from __future__ import annotations

import pytest

from meshmail.gossip.awareness import Awareness
from meshmail.gossip.timing import (
    push_pull_interval,
    retransmit_limit,
    scale_by_health,
    suspicion_min,
    suspicion_timeout,
)


@pytest.mark.parametrize(
    ("mult", "n", "interval", "expected"),
    [
        # mult * max(1, log10 n) * interval
        (4, 0, 1.0, 4.0),  # n = 0 is treated as one member: log10 1 = 0 -> 1
        (4, 1, 1.0, 4.0),  # log10 1 = 0 -> max(1, 0) = 1
        (4, 5, 1.0, 4.0),  # log10 5 = 0.699 -> 1
        (4, 10, 1.0, 4.0),  # log10 10 = 1
        (4, 100, 1.0, 8.0),  # log10 100 = 2 -> 4 * 2
        (4, 1000, 0.5, 6.0),  # 4 * 3 * 0.5
        (6, 100, 5.0, 60.0),  # WAN: 6 * 2 * 5
        (3, 10, 1.0, 3.0),  # local profile
        (4, 50, 1.0, 6.795880017),  # 4 * log10 50 = 4 * 1.698970004
        (4, 200, 1.0, 9.204119983),  # 4 * log10 200 = 4 * 2.301029996
    ],
)
def test_suspicion_min(mult: int, n: int, interval: float, expected: float) -> None:
    """The shortest suspicion grows with log10 of the cluster size, never below mult * interval."""
    assert suspicion_min(mult, n, interval) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("minimum", "maximum", "k", "c", "expected"),
    [
        # max - log(c + 1) / log(k + 1) * (max - min), never below min
        (2.0, 30.0, 3, 0, 30.0),  # no confirmation: the maximum
        (2.0, 30.0, 3, 1, 16.0),  # log 2 / log 4 = 0.5 -> 30 - 14
        (2.0, 30.0, 3, 2, 7.810525),  # log 3 / log 4 = 0.792481 -> 30 - 22.189475
        (2.0, 30.0, 3, 3, 2.0),  # k confirmations: the minimum
        (2.0, 30.0, 3, 4, 2.0),  # beyond k: 30 - 1.160964 * 28 < 2 -> clamped to the minimum
        (4.0, 24.0, 7, 1, 17.333333),  # log 2 / log 8 = 1/3 -> 24 - 20/3
        (4.0, 24.0, 7, 3, 10.666667),  # log 4 / log 8 = 2/3 -> 24 - 40/3
        (4.0, 24.0, 7, 7, 4.0),
        (4.0, 24.0, 1, 0, 24.0),
        (4.0, 24.0, 1, 1, 4.0),
        (4.0, 24.0, 0, 0, 4.0),  # nothing expected: the minimum at once
        (4.0, 24.0, 0, 5, 4.0),
        (4.0, 24.0, -1, 0, 4.0),
    ],
)
def test_suspicion_timeout(minimum: float, maximum: float, k: int, c: int, expected: float) -> None:
    """Lifeguard's timer starts at the maximum and decays logarithmically to the minimum at k."""
    assert suspicion_timeout(minimum, maximum, k, c) == pytest.approx(expected, abs=1e-6)


def test_suspicion_timeout_decreases_with_each_confirmation() -> None:
    """Every further confirmation up to k shortens the timer; none lengthens it."""
    timeouts = [suspicion_timeout(4.0, 24.0, 10, c) for c in range(12)]
    assert timeouts == sorted(timeouts, reverse=True)
    assert len(set(timeouts[:11])) == 11
    assert timeouts[10] == timeouts[11] == 4.0


@pytest.mark.parametrize(
    ("mult", "n", "expected"),
    [
        # mult * ceil(log10(n + 1))
        (4, 0, 0),  # log10 1 = 0
        (4, 1, 4),  # log10 2 = 0.301 -> 1
        (4, 9, 4),  # log10 10 = 1 exactly -> 1
        (4, 10, 8),  # log10 11 = 1.04 -> 2
        (4, 99, 8),  # log10 100 = 2 exactly -> 2
        (4, 100, 12),  # log10 101 -> 3
        (4, 999, 12),
        (3, 1000, 12),  # log10 1001 -> 4
        (2, 50, 4),  # local profile: log10 51 = 1.71 -> 2
    ],
)
def test_retransmit_limit(mult: int, n: int, expected: int) -> None:
    """Broadcasts are sent mult * ceil(log10(n + 1)) times."""
    assert retransmit_limit(mult, n) == expected


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        # n <= 32: unchanged; else base * (ceil(log2 n - log2 32) + 1)
        (0, 30.0),
        (1, 30.0),
        (32, 30.0),
        (33, 60.0),  # log2 33 - 5 = 0.044 -> 1 + 1
        (64, 60.0),  # 6 - 5 = 1 -> 2
        (65, 90.0),  # 6.02 - 5 -> 2 + 1
        (128, 90.0),  # 7 - 5 = 2 -> 3
        (129, 120.0),
        (256, 120.0),  # 8 - 5 = 3 -> 4
        (257, 150.0),
        (1000, 180.0),  # 9.966 - 5 = 4.966 -> 5 + 1
    ],
)
def test_push_pull_interval(n: int, expected: float) -> None:
    """Above 32 members the push-pull interval grows by one base interval per doubling."""
    assert push_pull_interval(30.0, n) == expected


def test_push_pull_interval_memberlist_bands() -> None:
    """memberlist's own table (TestPushPullScale): 1 s up to 32, 2 s to 64, 3 s to 128."""
    for n in range(0, 33):
        assert push_pull_interval(1.0, n) == 1.0, n
    for n in range(33, 65):
        assert push_pull_interval(1.0, n) == 2.0, n
    for n in range(65, 129):
        assert push_pull_interval(1.0, n) == 3.0, n


@pytest.mark.parametrize(
    ("timeout", "score", "expected"),
    [
        (0.5, 0, 0.5),  # healthy: unchanged
        (0.5, 1, 1.0),
        (0.5, 7, 4.0),  # worst health with max multiplier 8: 8x
        (1.0, 3, 4.0),
        (3.0, 2, 9.0),
    ],
)
def test_scale_by_health(timeout: float, score: int, expected: float) -> None:
    """A node with health score s waits (s + 1) times longer."""
    assert scale_by_health(timeout, score) == expected


def test_awareness_memberlist_table() -> None:
    """memberlist's TestAwareness sequence: (delta, score, scaled 1 s timeout) with max 8."""
    steps = [
        (0, 0, 1.0),
        (-1, 0, 1.0),
        (-10, 0, 1.0),
        (1, 1, 2.0),
        (-1, 0, 1.0),
        (10, 7, 8.0),  # clamped to max - 1 = 7: at most 8x
        (-1, 6, 7.0),
        (-1, 5, 6.0),
        (-1, 4, 5.0),
        (-1, 3, 4.0),
        (-1, 2, 3.0),
        (-1, 1, 2.0),
        (-1, 0, 1.0),
        (-1, 0, 1.0),
    ]
    awareness = Awareness(max_multiplier=8)
    for delta, score, timeout in steps:
        awareness.apply(delta)
        assert (awareness.score, awareness.scale(1.0)) == (score, timeout), delta


@pytest.mark.parametrize("max_multiplier", [1, 2, 8])
def test_awareness_bounds(max_multiplier: int) -> None:
    """The score stays in [0, max - 1] however it is pushed, so a timeout grows at most max-fold."""
    awareness = Awareness(max_multiplier=max_multiplier)
    for delta in [5, 100, 1, -3, -1000, 7, 7, -1, 1 << 40]:
        awareness.apply(delta)
        assert 0 <= awareness.score <= max_multiplier - 1
        assert 0.5 <= awareness.scale(0.5) <= 0.5 * max_multiplier
    assert awareness.scale(0.5) == 0.5 * max_multiplier
