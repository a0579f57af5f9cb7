"""The transmit-limited broadcast queue (memberlist's TransmitLimitedQueue).

Each queued message is sent a limited number of times (retransmit_limit of the cluster
size), least-sent first and newest first among equals. A message queued under a key that
is already queued replaces the older one: a newer message about a node makes the old one
worthless.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import attrs
import trio

from .messages import wire_size


@attrs.define(eq=False)
class _Item:
    key: str
    wired: list
    size: int
    order: int
    transmits: int = 0
    sent: trio.Event | None = None


@attrs.define(eq=False)
class BroadcastQueue:
    """Messages waiting to be piggybacked; `limit()` gives the current retransmit limit."""

    limit: Callable[[], int]
    #: One dict per transmit count; insertion order is age, so newest is last.
    _tiers: list[dict[str, _Item]] = attrs.field(factory=list)
    _where: dict[str, int] = attrs.field(factory=dict)
    _counter: itertools.count = attrs.field(factory=itertools.count)

    def __len__(self) -> int:
        return len(self._where)

    def queue(self, key: str, wired: list, sent: trio.Event | None = None) -> None:
        """Queue a message in wire form; `sent` is set once it has gone out at least once."""
        self._drop(key)
        item = _Item(key, wired, wire_size(wired), next(self._counter), sent=sent)
        self._tier(0)[key] = item
        self._where[key] = 0

    def take(self, budget: int, overhead: int) -> list[list]:
        """Messages that fit in `budget` bytes (each costing `overhead` extra), counted as sent."""
        chosen: list[_Item] = []
        for tier in self._tiers:
            if budget < overhead + 8:
                break
            for item in reversed(tier.values()):
                cost = item.size + overhead
                if cost <= budget:
                    chosen.append(item)
                    budget -= cost
        limit = self.limit()
        for item in chosen:
            del self._tiers[item.transmits][item.key]
            if item.sent is not None:
                item.sent.set()
            item.transmits += 1
            if item.transmits >= limit:
                del self._where[item.key]
            else:
                self._tier(item.transmits)[item.key] = item
                self._where[item.key] = item.transmits
        return [item.wired for item in chosen]

    def _drop(self, key: str) -> None:
        tier = self._where.pop(key, None)
        if tier is not None:
            del self._tiers[tier][key]

    def _tier(self, transmits: int) -> dict[str, _Item]:
        while len(self._tiers) <= transmits:
            self._tiers.append({})
        return self._tiers[transmits]
