"""The event loop's stall watch: how late a task wakes from a short sleep, as the longest stall
of each second over the last minute.

Everything on a node (gossip, state, proxy sessions) shares one trio loop, so a stall here is
a delay every one of them saw: a blocking call on the loop shows up as a long one.
"""

from __future__ import annotations

import math

import attrs
import trio

#: How often the watch wakes, in seconds: short enough to see stalls of a few ticks.
TICK = 0.05
#: Seconds remembered: longest() covers the last WINDOW seconds.
WINDOW = 60


@attrs.define(eq=False)
class StallWatch:
    """The longest stall of each of the last WINDOW seconds, in a ring of one bucket per second.

    `run()` is the task that measures; `record()` and `longest()` are the bookkeeping, pure
    functions of the times they are given (trio.current_time() seconds).
    """

    tick: float = attrs.field(default=TICK, validator=attrs.validators.gt(0))
    #: Second (floor of the loop time) each bucket holds, and its longest stall.
    _seconds: list[int] = attrs.field(init=False, factory=lambda: [-1] * WINDOW)
    _stalls: list[float] = attrs.field(init=False, factory=lambda: [0.0] * WINDOW)

    def record(self, now: float, stall: float) -> None:
        """Note a stall of `stall` seconds that ended at time `now`."""
        second = math.floor(now)
        slot = second % WINDOW
        if self._seconds[slot] != second:
            # The bucket held a second that has left the window: start it afresh.
            self._seconds[slot], self._stalls[slot] = second, 0.0
        self._stalls[slot] = max(self._stalls[slot], stall)

    def longest(self, now: float) -> float:
        """The longest stall that ended in the last WINDOW seconds up to `now` (0.0 if none)."""
        second = math.floor(now)
        held = zip(self._seconds, self._stalls, strict=True)
        return max((stall for at, stall in held if second - WINDOW < at <= second), default=0.0)

    async def run(self) -> None:
        """Sleep a tick at a time until cancelled, recording how much later than asked each wake-up came."""
        while True:
            start = trio.current_time()
            await trio.sleep(self.tick)
            now = trio.current_time()
            self.record(now, max(0.0, now - start - self.tick))
