"""Hybrid logical clock (Kulkarni et al. 2014) that stamps every write to the replicated map.

A timestamp is physical milliseconds plus a bounded logical counter, with the node id as the
final tie-breaker, so timestamps from different nodes are totally ordered. This module only
keeps time: it never reads the system clock itself (the caller injects one) and never persists.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import attrs
from attrs import validators as v

#: Longest node id accepted anywhere in the state layer.
MAX_NODE = 128
#: Highest logical counter. When a burst would exceed it, the clock borrows the next millisecond.
MAX_LOGICAL = 0xFFFF
MAX_WALL_MS = (1 << 63) - 1


def _exact_int(low: int, high: int):
    """Validator: a plain int (not bool) in [low, high]."""

    def check(instance, attribute, value) -> None:
        if type(value) is not int:
            raise TypeError(f"{attribute.name} must be an int, not {type(value).__name__}")
        if not low <= value <= high:
            raise ValueError(f"{attribute.name} {value} out of range [{low}, {high}]")

    return check


def _intern(value):
    # Node ids repeat on every entry; one shared string per node keeps the map small.
    return sys.intern(value) if type(value) is str else value


def node_field():
    """An attrs field holding a node id: a non-empty str of at most MAX_NODE chars, interned."""
    return attrs.field(converter=_intern, validator=[v.instance_of(str), v.min_len(1), v.max_len(MAX_NODE)])


@attrs.frozen(order=True)
class Timestamp:
    """A point of hybrid time; ordered by (wall_ms, logical, node)."""

    wall_ms: int = attrs.field(validator=_exact_int(0, MAX_WALL_MS))
    logical: int = attrs.field(validator=_exact_int(0, MAX_LOGICAL))
    node: str = node_field()


class ClockSkewError(Exception):
    """A remote timestamp is further ahead of our physical clock than max_skew_ms allows."""

    def __init__(self, remote: Timestamp, physical_ms: int, max_skew_ms: int) -> None:
        self.remote = remote
        self.ahead_ms = remote.wall_ms - physical_ms
        super().__init__(
            f"timestamp from {remote.node} is {self.ahead_ms} ms ahead of our clock (limit {max_skew_ms} ms)"
        )


class HybridClock:
    """The hybrid clock of one node.

    `physical_ms` returns Unix milliseconds; it may jump backwards, the clock stays monotonic.
    `floor` is a high_water value persisted by an earlier run: every timestamp issued is
    greater than it.
    """

    __slots__ = ("node", "_physical_ms", "max_skew_ms", "_wall", "_logical")

    def __init__(
        self,
        node: str,
        physical_ms: Callable[[], int],
        max_skew_ms: int = 60_000,
        floor: Timestamp | None = None,
    ) -> None:
        self.node = Timestamp(0, 0, node).node  # validated and interned
        self._physical_ms = physical_ms
        self.max_skew_ms = max_skew_ms
        self._wall = floor.wall_ms if floor else 0
        self._logical = floor.logical if floor else 0

    @property
    def high_water(self) -> Timestamp:
        """The greatest timestamp issued or observed; persist it and pass it back as `floor`."""
        return Timestamp(self._wall, self._logical, self.node)

    def now(self) -> Timestamp:
        """A fresh timestamp for a local event or a send, greater than any issued or observed."""
        physical = self._physical_ms()
        if physical > self._wall:
            self._wall, self._logical = physical, 0
        else:
            self._tick(self._logical + 1)
        return self.high_water

    def observe(self, remote: Timestamp) -> Timestamp:
        """Merge a received timestamp into the clock and return the timestamp of the receive event.

        Raises ClockSkewError, leaving the clock unchanged, when `remote` is more than
        max_skew_ms ahead of the physical clock; the caller drops the message and counts it.
        """
        self.observe_parts(remote.wall_ms, remote.logical, remote.node)
        return self.high_water

    def observe_parts(self, wall_ms: int, logical: int, node: str) -> None:
        """observe() for a timestamp given as its parts, building no Timestamp unless it is
        refused (this runs once per entry of a full sync)."""
        physical = self._physical_ms()
        if wall_ms - physical > self.max_skew_ms:
            raise ClockSkewError(Timestamp(wall_ms, logical, node), physical, self.max_skew_ms)
        wall = max(self._wall, wall_ms, physical)
        if wall == self._wall == wall_ms:
            self._tick(max(self._logical, logical) + 1)
        elif wall == self._wall:
            self._tick(self._logical + 1)
        elif wall == wall_ms:
            self._wall = wall
            self._tick(logical + 1)
        else:
            self._wall, self._logical = wall, 0

    def _tick(self, logical: int) -> None:
        # Past MAX_LOGICAL events in one millisecond, move to the next millisecond: the clock
        # runs at most a little ahead of physical time instead of overflowing the counter.
        if logical > MAX_LOGICAL:
            self._wall += 1
            logical = 0
        self._logical = logical
