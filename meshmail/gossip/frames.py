"""Sealed packets and stream frames: a header and messages inside the keyring's envelope.

`Sealer` seals what this node sends and opens what it receives, checking freshness,
replays and refused senders; on streams each sealed frame has a 4-byte length prefix.
It neither sends nor decides anything: the network side does.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Callable, Container
from typing import Any

import trio

from . import messages as m
from .keyring import EnvelopeError, Keyring, ReplayGuard

_FRAME_HEADER = struct.Struct(">I")


class FrameError(Exception):
    """A stream frame that is too large, cut short, or does not open; `reason` is a counter.
    `sender` names the member a refused or stale frame came from; `offset` is how far a
    stale frame's send time is from our clock (seconds, positive when it is ahead)."""

    def __init__(self, reason: str, sender: str = "", offset: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sender = sender
        self.offset = offset


class Sealer:
    """Seals and opens the packets and frames of member `name` in cluster `cluster`.

    Args:
        refused: the names whose packets are refused, read at each open (it changes).
        max_frame: largest stream frame accepted, in bytes.
        replay_window: how far a packet's send time may be from ours, and how long nonces are kept.
        counters: where bytes in and out and ignored message types are counted.
    """

    def __init__(
        self,
        *,
        name: str,
        keyring: Keyring,
        cluster: str,
        refused: Container[str],
        max_frame: int,
        replay_window: float,
        wall_clock: Callable[[], float],
        counters: collections.Counter[str],
    ) -> None:
        self.name = name
        self.keyring = keyring
        self._aad = b"meshmail-gossip/1/" + cluster.encode()
        self._refused = refused
        self._max_frame = max_frame
        self._replay = ReplayGuard(replay_window)
        self._wall = wall_clock
        self._counters = counters

    def open(self, data: bytes) -> tuple[m.Header, list[Any]]:
        """Decrypt, check freshness and decode a packet or frame; raise FrameError(reason)."""
        try:
            nonce, plaintext = self.keyring.open(data, self._aad)
        except EnvelopeError as exc:
            raise FrameError(exc.reason) from None
        try:
            header, messages, unknown = m.unpack(plaintext)
        except m.MalformedMessage:
            raise FrameError("malformed") from None
        sent, now = header.sent_ms / 1000, self._wall()
        reason = self._replay.check(nonce, sent, now)
        if reason == "stale" and abs(sent - now) > self._replay.window:
            # Outside the window, not only below the floor: the two clocks disagree.
            raise FrameError(reason, header.sender, sent - now)
        if reason is not None:
            raise FrameError(reason)
        if header.sender in self._refused:
            raise FrameError("removed_member", header.sender)
        if unknown:
            # Types from a newer version: ignored by design, counted so an operator sees them.
            self._counters["ignored.unknown_type"] += unknown
        return header, messages

    def seal(self, wired: list[list]) -> bytes:
        """A packet or frame body holding messages already in wire form."""
        header = m.Header(m.PROTOCOL_VERSION, int(self._wall() * 1000), self.name)
        return self.keyring.seal(m.pack_wire(header, wired), self._aad)

    async def write_frame(self, stream: trio.abc.Stream, messages: list[Any]) -> None:
        data = self.seal([m.to_wire(x) for x in messages])
        self._counters["bytes_out"] += len(data) + _FRAME_HEADER.size
        await stream.send_all(_FRAME_HEADER.pack(len(data)) + data)

    async def read_frame(self, stream: trio.abc.Stream) -> tuple[m.Header, list[Any]]:
        """The next frame, opened; raises FrameError, or what the stream raises."""
        (size,) = _FRAME_HEADER.unpack(await _receive_exactly(stream, _FRAME_HEADER.size))
        if size > self._max_frame:
            raise FrameError("oversize")
        data = await _receive_exactly(stream, size)
        self._counters["bytes_in"] += len(data) + _FRAME_HEADER.size
        return self.open(data)


async def _receive_exactly(stream: trio.abc.Stream, size: int) -> bytes:
    buffer = bytearray()
    while len(buffer) < size:
        chunk = await stream.receive_some(min(size - len(buffer), 1 << 16))
        if not chunk:
            raise FrameError("truncated")
        buffer += chunk
    return bytes(buffer)
