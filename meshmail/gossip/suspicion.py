"""A suspicion of one member and its Lifeguard timer.

The timer starts at the maximum and shrinks as other members independently confirm the
suspicion; the deadline lives in a trio CancelScope so a confirmation moves it in place.
"""

from __future__ import annotations

import attrs
import trio

from .timing import suspicion_timeout


@attrs.define(eq=False)
class Suspicion:
    start: float
    minimum: float
    maximum: float
    expected: int
    confirmed_by: set[str]
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)

    def __attrs_post_init__(self) -> None:
        self.scope.deadline = self.deadline

    @property
    def confirmations(self) -> int:
        # The member that raised the suspicion is not an independent confirmation.
        return len(self.confirmed_by) - 1

    @property
    def deadline(self) -> float:
        return self.start + suspicion_timeout(self.minimum, self.maximum, self.expected, self.confirmations)

    def confirm(self, source: str) -> bool:
        """Count a confirmation from `source`; True when it was new and moved the timer."""
        if self.confirmations >= self.expected or source in self.confirmed_by:
            return False
        self.confirmed_by.add(source)
        self.scope.deadline = self.deadline
        return True
