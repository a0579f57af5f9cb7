"""Which incoming streams get a slot while they have not proved themselves yet.

Anyone who reaches the gossip port can open streams; only a member holding a cluster key
can send a first frame that opens. Until that frame has opened, a stream holds a slot in a
small pool shared fairly between source addresses: each source has a few slots at most,
and a source holding fewer slots than another can take the oldest slot of the biggest
holder. Streams that proved themselves are served from a pool of their own (net.py).
"""

from __future__ import annotations

import collections
import ipaddress
import itertools
from typing import Any

import attrs

#: Seconds an incoming stream has to deliver a first frame that opens (capped at tcp_timeout).
PROOF_DEADLINE = 2.0
#: Streams waiting for their first frame at once, from all sources.
MAX_UNPROVEN_STREAMS = 32
#: Streams waiting for their first frame at once from one source, once the pool is full
#: (while it has room, one address may hold more: many nodes of one host join at once).
MAX_UNPROVEN_PER_SOURCE = 4


def source_of(host: str) -> str:
    """The source a stream is counted under: its IPv4 address, or the /64 of its IPv6 address
    (one host commonly holds a whole /64)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network((address, 64), strict=False))
    return str(address)


@attrs.define(eq=False)
class Slot:
    """A place in the pool; `holder` is whatever the caller needs to end an evicted stream."""

    source: str
    holder: Any
    serial: int


class UnprovenPool:
    """The slots of streams that have not sent a frame that opens yet.

    `admit` answers each new stream with a slot or None, plus the slot evicted to make room
    (its stream must be ended by the caller); `release` frees a slot when its stream proved
    itself or ended. Nothing here waits or does I/O.
    """

    def __init__(self, size: int = MAX_UNPROVEN_STREAMS, per_source: int = MAX_UNPROVEN_PER_SOURCE) -> None:
        self.size = size
        self.per_source = per_source
        self._by_source: dict[str, list[Slot]] = collections.defaultdict(list)
        self._count = 0
        self._serial = itertools.count()

    def __len__(self) -> int:
        return self._count

    def admit(self, source: str, holder: Any) -> tuple[Slot | None, Slot | None, str]:
        """(slot, evicted, refusal): a slot for a stream from `source` or None with the
        refusal's reason ("source_limit" or "unproven_busy"), and the slot evicted for it."""
        mine = len(self._by_source.get(source, ()))
        evicted = None
        if self._count >= self.size:
            if mine >= self.per_source:
                return None, None, "source_limit"
            evicted = self._fair_victim(mine)
            if evicted is None:
                return None, None, "unproven_busy"
            self.release(evicted)
        slot = Slot(source, holder, next(self._serial))
        self._by_source[source].append(slot)
        self._count += 1
        return slot, evicted, ""

    def _fair_victim(self, mine: int) -> Slot | None:
        """The oldest slot of the source holding the most, if it holds more than `mine`."""
        most = max(len(slots) for slots in self._by_source.values())
        if most <= mine:
            return None
        return min((slots[0] for slots in self._by_source.values() if len(slots) == most), key=lambda x: x.serial)

    def release(self, slot: Slot) -> None:
        """Free `slot`; releasing a slot already freed (evicted) does nothing."""
        slots = self._by_source.get(slot.source)
        if slots is None or slot not in slots:
            return
        slots.remove(slot)
        self._count -= 1
        if not slots:
            del self._by_source[slot.source]
