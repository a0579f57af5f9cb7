"""Timing maths of SWIM and Lifeguard as pure functions (tested with tables).

Formulas follow hashicorp/memberlist so that the same settings give the same schedule.
"""

from __future__ import annotations

import math

#: Above this many members the push-pull interval grows, as in memberlist.
PUSH_PULL_SCALE_THRESHOLD = 32


def suspicion_min(suspicion_mult: int, n: int, probe_interval: float) -> float:
    """Shortest suspicion: mult * max(1, log10(n)) * probe interval."""
    return suspicion_mult * max(1.0, math.log10(max(1, n))) * probe_interval


def suspicion_timeout(minimum: float, maximum: float, expected: int, confirmations: int) -> float:
    """Lifeguard's decaying suspicion timeout.

    Starts at `maximum` with no independent confirmations and falls logarithmically to
    `minimum` once `expected` confirmations arrived; with nothing expected it is the minimum.
    """
    if expected < 1:
        return minimum
    fraction = math.log(confirmations + 1) / math.log(expected + 1)
    return max(minimum, maximum - fraction * (maximum - minimum))


def retransmit_limit(retransmit_mult: int, n: int) -> int:
    """How many times a broadcast is sent: mult * ceil(log10(n + 1))."""
    return retransmit_mult * math.ceil(math.log10(n + 1))


def push_pull_interval(base: float, n: int) -> float:
    """Push-pull less often in big clusters so the TCP load per node stays flat."""
    if n <= PUSH_PULL_SCALE_THRESHOLD:
        return base
    return base * (math.ceil(math.log2(n) - math.log2(PUSH_PULL_SCALE_THRESHOLD)) + 1)


def scale_by_health(timeout: float, score: int) -> float:
    """Lifeguard local health: a node with score s waits (s + 1) times longer."""
    return timeout * (score + 1)
