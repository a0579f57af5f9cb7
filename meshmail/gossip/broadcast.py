"""The transmit-limited broadcast queue (memberlist's TransmitLimitedQueue).

Each queued message is sent a limited number of times (retransmit_limit of the cluster
size), least-sent first and newest first among equals. A message queued under a key that
is already queued replaces the older one: a newer message about a node makes the old one
worthless.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

import attrs
import trio

from .messages import wire_size

#: Items too large for what is left of a packet that one take looks past before stopping.
MAX_SKIPPED = 32


@attrs.define(eq=False)
class _Item:
    key: str
    wired: list
    size: int
    order: int
    transmits: int = 0
    replaced: bool = False
    sent: trio.Event | None = None


@attrs.define(eq=False)
class BroadcastQueue:
    """Messages waiting to be piggybacked; `limit()` gives the current retransmit limit."""

    limit: Callable[[], int]
    #: One heap per transmit count, of (-order, item): newest first. Replaced items stay
    #: in their heap, flagged, until a take pops them.
    _tiers: list[list[tuple[int, _Item]]] = attrs.field(factory=list)
    _items: dict[str, _Item] = attrs.field(factory=dict)
    _counter: itertools.count = attrs.field(factory=itertools.count)

    def __len__(self) -> int:
        return len(self._items)

    def queue(self, key: str, wired: list, sent: trio.Event | None = None) -> None:
        """Queue a message in wire form; `sent` is set once it has gone out at least once."""
        old = self._items.get(key)
        if old is not None:
            old.replaced = True
        item = self._items[key] = _Item(key, wired, wire_size(wired), next(self._counter), sent=sent)
        self._push(item)

    def take(self, budget: int, overhead: int) -> list[list]:
        """Messages that fit in `budget` bytes (each costing `overhead` extra), counted as sent."""
        chosen: list[_Item] = []
        for heap in self._tiers:
            skipped: list[tuple[int, _Item]] = []
            while heap and budget >= overhead + 8 and len(skipped) < MAX_SKIPPED:
                entry = heapq.heappop(heap)
                item = entry[1]
                if item.replaced:
                    continue
                if item.size + overhead <= budget:
                    chosen.append(item)
                    budget -= item.size + overhead
                else:
                    skipped.append(entry)
            for entry in skipped:
                heapq.heappush(heap, entry)
            if budget < overhead + 8:
                break
        limit = self.limit()
        for item in chosen:
            if item.sent is not None:
                item.sent.set()
            item.transmits += 1
            if item.transmits >= limit:
                del self._items[item.key]
            else:
                self._push(item)
        return [item.wired for item in chosen]

    def _push(self, item: _Item) -> None:
        while len(self._tiers) <= item.transmits:
            self._tiers.append([])
        heapq.heappush(self._tiers[item.transmits], (-item.order, item))
