"""Lifeguard local health ("awareness"): how much this node distrusts its own timing.

Failed probes and accusations against us raise the score, successful probes lower it;
probe timeouts are multiplied by score + 1, at most awareness_max_multiplier.
"""

from __future__ import annotations

import attrs

from .timing import scale_by_health


@attrs.define
class Awareness:
    max_multiplier: int
    score: int = 0

    def apply(self, delta: int) -> None:
        """Move the score by delta, kept within [0, max_multiplier - 1]."""
        self.score = min(max(self.score + delta, 0), self.max_multiplier - 1)

    def scale(self, timeout: float) -> float:
        return scale_by_health(timeout, self.score)
