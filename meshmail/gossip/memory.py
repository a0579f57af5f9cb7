"""An in-memory network for gossip simulations: latency, loss, duplication, reordering,
partitions and slow nodes, all driven by one seeded random.Random.

Used with trio.testing.MockClock(autojump_threshold=0), hundreds of nodes run for
simulated minutes in seconds. It stands in for the network only, never for a server the
product talks to.
"""

from __future__ import annotations

import collections
import errno
import heapq
import itertools
import math
import random

import attrs
import trio
import trio.testing

from ..core.address import Address
from .transport import Packet, Transport


@attrs.frozen
class Link:
    """Conditions of a one-way link; jitter is added uniformly, so packets reorder."""

    latency: float = 0.001
    jitter: float = 0.0
    loss: float = 0.0
    duplicate: float = 0.0


@attrs.define(eq=False)
class MemoryNetwork:
    """All simulated endpoints; run `run` in the test's nursery before starting nodes."""

    rng: random.Random
    default: Link = Link()
    links: dict[tuple[Address, Address], Link] = attrs.field(factory=dict)
    #: Extra delay before a node sees anything sent to it (a node whose processing lags).
    lag: dict[Address, float] = attrs.field(factory=dict)
    counters: dict[str, int] = attrs.field(factory=lambda: {"sent": 0, "delivered": 0, "lost": 0, "cut": 0})
    _endpoints: dict[Address, MemoryTransport] = attrs.field(factory=dict)
    _groups: dict[Address, int] = attrs.field(factory=dict)
    _heap: list = attrs.field(factory=list)
    _order: itertools.count = attrs.field(factory=itertools.count)
    _wakeup: trio.Event = attrs.field(factory=trio.Event)

    def transport(self, address: Address) -> MemoryTransport:
        return MemoryTransport(self, address)

    def partition(self, *groups: list[Address]) -> None:
        """Cut the network so only members of the same group reach each other."""
        self._groups = {address: index for index, group in enumerate(groups) for address in group}

    def heal(self) -> None:
        self._groups = {}

    def reachable(self, source: Address, destination: Address) -> bool:
        return self._groups.get(source, -1) == self._groups.get(destination, -1)

    def send(self, source: Address, destination: Address, data: bytes) -> None:
        self.counters["sent"] += 1
        if not self.reachable(source, destination):
            self.counters["cut"] += 1
            return
        link = self.links.get((source, destination), self.default)
        copies = 2 if self.rng.random() < link.duplicate else 1
        for _ in range(copies):
            if self.rng.random() < link.loss:
                self.counters["lost"] += 1
                continue
            delay = link.latency + self.rng.random() * link.jitter + self.lag.get(destination, 0.0)
            self._push(trio.current_time() + delay, destination, Packet(source, data))

    def _push(self, when: float, destination: Address, packet: Packet) -> None:
        if not self._heap or when < self._heap[0][0]:
            self._wakeup.set()
        heapq.heappush(self._heap, (when, next(self._order), destination, packet))

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Deliver packets when they are due, until cancelled."""
        task_status.started()
        while True:
            now = trio.current_time()
            while self._heap and self._heap[0][0] <= now:
                _, _, destination, packet = heapq.heappop(self._heap)
                endpoint = self._endpoints.get(destination)
                if endpoint is None or not endpoint.deliver(packet):
                    self.counters["lost"] += 1
                else:
                    self.counters["delivered"] += 1
            self._wakeup = trio.Event()
            with trio.move_on_at(self._heap[0][0] if self._heap else math.inf):
                await self._wakeup.wait()

    async def connect(self, source: Address, destination: Address) -> trio.abc.Stream:
        link = self.links.get((source, destination), self.default)
        await trio.sleep(link.latency + self.lag.get(destination, 0.0))
        endpoint = self._endpoints.get(destination)
        if endpoint is None or not self.reachable(source, destination):
            raise ConnectionRefusedError(errno.ECONNREFUSED, "unreachable in the simulated network")
        mine, theirs = trio.testing.memory_stream_pair()
        if not endpoint.offer_stream(source, theirs):
            raise ConnectionRefusedError(errno.ECONNREFUSED, "backlog full")
        return mine


@attrs.define(eq=False)
class MemoryTransport(Transport):
    network: MemoryNetwork
    _address: Address
    counters: collections.Counter[str] = attrs.field(factory=collections.Counter)
    _packets: tuple = attrs.field(factory=lambda: trio.open_memory_channel(4096))
    _streams: tuple = attrs.field(factory=lambda: trio.open_memory_channel(64))

    @property
    def address(self) -> Address:
        return self._address

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if self._address in self.network._endpoints:
            raise OSError(errno.EADDRINUSE, f"{self._address} is in use")
        self.network._endpoints[self._address] = self
        try:
            task_status.started(self._address)
            await trio.sleep_forever()
        finally:
            if self.network._endpoints.get(self._address) is self:
                del self.network._endpoints[self._address]

    def deliver(self, packet: Packet) -> bool:
        try:
            self._packets[0].send_nowait(packet)
        except trio.WouldBlock:
            return False
        return True

    def offer_stream(self, source: Address, stream: trio.abc.Stream) -> bool:
        try:
            self._streams[0].send_nowait((source, stream))
        except trio.WouldBlock:
            return False
        return True

    async def send_packet(self, address: Address, data: bytes) -> bool:
        self.network.send(self._address, address, data)
        await trio.lowlevel.checkpoint()
        return True

    async def receive_packet(self) -> Packet:
        return await self._packets[1].receive()

    async def connect(self, address: Address) -> trio.abc.Stream:
        return await self.network.connect(self._address, address)

    async def accept(self) -> tuple[Address, trio.abc.Stream]:
        return await self._streams[1].receive()
