"""How gossip bytes move: the Transport interface and its UDP + TCP implementation.

A transport delivers datagrams (probes, gossip) and byte streams (push-pull, the TCP
fallback probe). It knows nothing of envelopes or messages. The in-memory network for
simulations lives in memory.py and implements the same interface.
"""

from __future__ import annotations

import abc
import collections
import socket

import attrs
import trio

from ..core.accept import ResilientListener
from ..core.address import Address

#: Largest datagram read; anything larger than the configured packet size is dropped later.
MAX_DATAGRAM = 65536


@attrs.frozen
class Packet:
    source: Address
    data: bytes


class Transport(abc.ABC):
    """The network as the gossip node sees it; `counters` is where it counts its troubles
    (the node running on it counts into the same Counter)."""

    counters: collections.Counter[str]

    @property
    @abc.abstractmethod
    def address(self) -> Address:
        """The bound (host, port); valid once `run` has started."""

    @abc.abstractmethod
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Bind, report the bound address through task_status, then serve until cancelled."""

    @abc.abstractmethod
    async def send_packet(self, address: Address, data: bytes) -> bool:
        """Send one datagram; False when the network refused it (datagrams may be lost anyway)."""

    @abc.abstractmethod
    async def receive_packet(self) -> Packet:
        """The next datagram that arrived."""

    @abc.abstractmethod
    async def connect(self, address: Address) -> trio.abc.Stream:
        """Open a stream to a peer. Raises OSError when it cannot be reached."""

    @abc.abstractmethod
    async def accept(self) -> tuple[Address, trio.abc.Stream]:
        """The next incoming stream and its peer address."""


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


@attrs.define(eq=False)
class NetTransport(Transport):
    """UDP datagrams and TCP streams on the same host and port."""

    host: str
    port: int = 0
    #: Deep (the kernel caps it at net.core.somaxconn): a burst of connections waits in the
    #: queue instead of having its SYNs dropped and retried a second later.
    backlog: int = 4096
    counters: collections.Counter[str] = attrs.field(factory=collections.Counter)
    _address: Address | None = None
    _udp: trio.socket.SocketType | None = None
    _incoming: tuple = attrs.field(factory=lambda: trio.open_memory_channel(64))

    @property
    def address(self) -> Address:
        if self._address is None:
            raise RuntimeError("transport is not running")
        return self._address

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        family = _family(self.host)
        udp = trio.socket.socket(family, socket.SOCK_DGRAM)
        tcp = trio.socket.socket(family, socket.SOCK_STREAM)
        with udp, tcp:
            # Bind TCP first and reuse its port for UDP when the port was 0.
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await tcp.bind((self.host, self.port))
            port = tcp.getsockname()[1]
            await udp.bind((self.host, port))
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    udp.setsockopt(socket.SOL_SOCKET, option, 2 << 20)
                except OSError:
                    pass
            tcp.listen(self.backlog)
            self._udp = udp
            self._address = (self.host, port)
            listener = ResilientListener(trio.SocketListener(tcp), name="gossip", counters=self.counters)
            send, _ = self._incoming
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._accept_loop, listener, send)
                task_status.started(self._address)
                await trio.sleep_forever()

    async def _accept_loop(self, listener: ResilientListener, send: trio.MemorySendChannel) -> None:
        while True:
            stream = await listener.accept()
            assert isinstance(stream, trio.SocketStream)
            try:
                peer = stream.socket.getpeername()[:2]
            except OSError:
                await stream.aclose()
                continue
            await send.send((peer, stream))

    async def send_packet(self, address: Address, data: bytes) -> bool:
        if self._udp is None:
            return False
        try:
            await self._udp.sendto(data, address)
        except OSError:
            # Refused, unreachable, too big, or an address this socket cannot reach: the
            # probe that needed it fails as it would on a lossy network.
            return False
        return True

    async def receive_packet(self) -> Packet:
        if self._udp is None:
            raise RuntimeError("transport is not running")
        while True:
            try:
                data, source = await self._udp.recvfrom(MAX_DATAGRAM)
            except ConnectionRefusedError:
                # Linux reports an earlier sendto's ICMP error on the next recvfrom.
                continue
            return Packet(source[:2], data)

    async def connect(self, address: Address) -> trio.abc.Stream:
        return await trio.open_tcp_stream(*address)

    async def accept(self) -> tuple[Address, trio.abc.Stream]:
        _, receive = self._incoming
        return await receive.receive()
