"""What the layer above plugs into a gossip node: the `Delegate` hooks.

Replication implements them to carry cluster state in push-pull exchanges and broadcasts;
`Conversation` is its channel on a push-pull's stream after the member lists are swapped.
"""

from __future__ import annotations

import trio

from . import messages as m
from .frames import FrameError, Sealer


class Delegate:
    """Hooks for the layer above; the defaults carry nothing."""

    def local_state(self, join: bool) -> bytes:
        """Bytes to send in the push-pull extension slot."""
        return b""

    def merge_remote_state(self, data: bytes, join: bool) -> None:
        """Called with a peer's push-pull extension; must not raise for bad input."""

    def notify_broadcast(self, key: str, payload: bytes) -> None:
        """Called for each application broadcast received."""

    async def sync_client(self, peer: str, conversation: Conversation) -> None:
        """Called after a push-pull we started, on its stream: exchange replicated state."""

    async def sync_server(self, peer: str, conversation: Conversation) -> None:
        """Called after a push-pull we answered, on its stream; `peer` is its sender."""


class Conversation:
    """Encrypted StateSync messages over a push-pull's stream, each within `timeout` seconds."""

    def __init__(self, sealer: Sealer, stream: trio.abc.Stream, timeout: float) -> None:
        self._sealer = sealer
        self._stream = stream
        self._timeout = timeout

    async def send(self, payload: bytes) -> None:
        """Send one message; raises trio.TooSlowError, trio.BrokenResourceError or OSError."""
        with trio.fail_after(self._timeout):
            await self._sealer.write_frame(self._stream, [m.StateSync(payload)])

    async def receive(self) -> bytes:
        """The next message; raises FrameError (bad or missing frame) or trio.TooSlowError."""
        with trio.fail_after(self._timeout):
            _, messages = await self._sealer.read_frame(self._stream)
        for msg in messages:
            if isinstance(msg, m.StateSync):
                return msg.payload
        raise FrameError("malformed")
