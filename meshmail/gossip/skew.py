"""Clock skew between members, as the freshness check finds it.

A packet or frame stamped further from our clock than the replay window is dropped as
stale. `ClockSkew` remembers by how much each member's clock differs (the largest offset
seen) and names the member and the offset in the log, at most once a minute per member.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ..core.address import Address, format_address

log = logging.getLogger("meshmail.gossip")

#: A member's skew is logged at most this often (seconds).
LOG_INTERVAL = 60.0
#: Members remembered; the one heard of least recently makes room.
MAX_MEMBERS = 256
#: Offsets at most this far apart (seconds) are one skew seen through several members.
AGREEMENT = 5.0


class ClockSkew:
    """The clock offsets of the members whose packets were stale; `offsets` maps a member's
    name to seconds, positive when its clock is ahead of ours."""

    def __init__(self, clock: Callable[[], float] = trio.current_time) -> None:
        self.offsets: dict[str, float] = {}
        self._logged: dict[str, float] = {}
        self._now = clock

    def observe(self, name: str, address: Address, offset: float) -> None:
        """Member `name` at `address` sent a packet stamped `offset` seconds from our clock."""
        previous = self.offsets.pop(name, 0.0)
        self.offsets[name] = offset if abs(offset) >= abs(previous) else previous
        if len(self.offsets) > MAX_MEMBERS:
            del self.offsets[next(iter(self.offsets))]
        now = self._now()
        if now - self._logged.get(name, -LOG_INTERVAL) < LOG_INTERVAL:
            return
        self._logged.pop(name, None)
        self._logged[name] = now
        if len(self._logged) > MAX_MEMBERS:
            del self._logged[next(iter(self._logged))]
        self._log(name, address, offset)

    def _log(self, name: str, address: Address, offset: float) -> None:
        way = "ahead of" if offset > 0 else "behind"
        # When other members' packets are off by about as much, the odd clock is ours.
        agreeing = sum(1 for other, x in self.offsets.items() if other != name and abs(x - offset) <= AGREEMENT)
        if agreeing:
            log.error(
                "packets from %s (%s) are %.0f s %s this node's clock, as are those of %d other member(s): "
                "this node's clock is likely the one that is off; fix NTP here",
                name,
                format_address(address),
                abs(offset),
                way,
                agreeing,
            )
        else:
            log.error(
                "packets from %s (%s) are %.0f s %s this node's clock: fix NTP on one of them",
                name,
                format_address(address),
                abs(offset),
                way,
            )
