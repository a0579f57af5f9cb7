"""A scripted gossip conversation for tests of the replication's stream handling."""

from __future__ import annotations


class Scripted:
    """A Conversation that plays back what a (bad) peer says and records our answers."""

    def __init__(self, *incoming: bytes) -> None:
        self.incoming = list(incoming)
        self.sent: list[bytes] = []

    async def send(self, payload: bytes) -> None:
        self.sent.append(payload)

    async def receive(self) -> bytes:
        return self.incoming.pop(0)
