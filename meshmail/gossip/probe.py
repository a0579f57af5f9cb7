"""Failure detection: SWIM's probe round with Lifeguard's additions, and suspicion timers.

Each round pings one member directly, then through others (with nacks) and over TCP; a
probe that gets no ack becomes a suspicion in the state machine. Timeouts are scaled by
local health (awareness). Packets and frames go out through `Network`.
"""

from __future__ import annotations

import collections
import random
from typing import Any

import attrs
import trio

from ..core.address import Address
from . import messages as m
from .config import GossipConfig
from .frames import FrameError
from .member import Member
from .messages import State
from .net import Network
from .state import Membership
from .suspicion import Suspicion


@attrs.define(eq=False)
class _AckWaiter:
    acked: trio.Event = attrs.field(factory=trio.Event)
    nacks: int = 0


class Prober:
    """Probes the members of `membership` and answers for the acks and nacks that come back."""

    def __init__(
        self,
        *,
        membership: Membership,
        net: Network,
        config: GossipConfig,
        rng: random.Random,
        counters: collections.Counter[str],
    ) -> None:
        self._state = membership
        self._net = net
        self.config = config
        self._rng = rng
        self.counters = counters
        self._acks: dict[int, _AckWaiter] = {}
        self._seq = 0

    def acked(self, msg: m.Ack) -> None:
        waiter = self._acks.get(msg.seq)
        if waiter is not None:
            waiter.acked.set()

    def nacked(self, msg: m.Nack) -> None:
        waiter = self._acks.get(msg.seq)
        if waiter is not None:
            waiter.nacks += 1

    async def probe_loop(self) -> None:
        # Spread the first probe over one interval so nodes started together do not align.
        await trio.sleep(self._rng.random() * self.config.probe_interval)
        while True:
            start = trio.current_time()
            interval = self._state.awareness.scale(self.config.probe_interval)
            target = self._state.next_probe_target()
            if target is not None:
                await self.probe(target, start + interval)
            await trio.sleep_until(start + interval)

    async def probe(self, member: Member, deadline: float) -> None:
        """One SWIM probe: direct ping, then indirect pings and a TCP ping, then suspicion."""
        awareness = self._state.awareness
        seq, waiter = self._new_waiter()
        try:
            await self._ping(member, seq)
            with trio.move_on_after(awareness.scale(self.config.probe_timeout)):
                await waiter.acked.wait()
            if waiter.acked.is_set():
                awareness.apply(-1)
                return
            helpers = await self._ping_indirectly(member, seq, waiter, deadline)
            if waiter.acked.is_set():
                return
            self.counters["probe_failures"] += 1
            awareness.apply(helpers - waiter.nacks if helpers else 1)
        finally:
            self._acks.pop(seq, None)
        if member.state in (State.ALIVE, State.SUSPECT) and member.name in self._state.members:
            self._state.suspect(m.Suspect(member.incarnation, member.name, self._state.name))

    async def _ping(self, member: Member, seq: int) -> None:
        messages: list[Any] = [self._ping_message(seq, member.name)]
        if member.state == State.SUSPECT:
            # Lifeguard's buddy system: tell the suspect directly so it can refute at once.
            messages.append(m.Suspect(member.incarnation, member.name, self._state.name))
        self.counters["probes"] += 1
        await self._net.send(member.address, messages)

    async def _ping_indirectly(self, member: Member, seq: int, waiter: _AckWaiter, deadline: float) -> int:
        """Ask other members to ping `member` and try TCP, until an ack or `deadline`;
        return how many members were asked."""
        peers = self._state.pick(
            self.config.indirect_checks,
            lambda x: x.state == State.ALIVE and x.name != member.name,
        )
        me = self._state.local
        request = m.IndirectPing(seq, member.name, member.host, member.port, me.name, *me.address, nack=True)
        for peer in peers:
            self.counters["indirect_probes"] += 1
            await self._net.send(peer.address, [request])
        async with trio.open_nursery() as nursery:
            if self.config.tcp_fallback_probe:
                nursery.start_soon(self._tcp_probe, member, seq, waiter)
            with trio.move_on_at(deadline):
                await waiter.acked.wait()
            nursery.cancel_scope.cancel()
        return len(peers)

    async def _tcp_probe(self, member: Member, seq: int, waiter: _AckWaiter) -> None:
        try:
            stream = await self._net.transport.connect(member.address)
        except OSError:
            return
        sealer = self._net.sealer
        async with stream:
            try:
                await sealer.write_frame(stream, [self._ping_message(seq, member.name)])
                _, reply = await sealer.read_frame(stream)
            except (FrameError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
        if any(isinstance(x, m.Ack) and x.seq == seq for x in reply):
            self.counters["tcp_fallback_acks"] += 1
            waiter.acked.set()

    async def probe_for(self, request: m.IndirectPing, requester: Address) -> None:
        """Probe a member on someone else's behalf and report the ack, or a nack."""
        seq, waiter = self._new_waiter()
        try:
            await self._net.send((request.host, request.port), [self._ping_message(seq, request.node)])
            with trio.move_on_after(self.config.probe_timeout):
                await waiter.acked.wait()
        finally:
            self._acks.pop(seq, None)
        if waiter.acked.is_set():
            await self._net.send(requester, [m.Ack(request.seq)])
        elif request.nack:
            await self._net.send(requester, [m.Nack(request.seq)])

    async def suspicion_timer(self, name: str, suspicion: Suspicion) -> None:
        """Wait out a suspicion (confirmations move its deadline); then the member is dead
        unless the suspicion was cleared meanwhile."""
        with suspicion.scope:
            await trio.sleep_forever()
        self._state.suspicion_expired(name, suspicion)

    def _ping_message(self, seq: int, target: str) -> m.Ping:
        return m.Ping(seq, target, self._state.name, *self._state.local.address)

    def _new_waiter(self) -> tuple[int, _AckWaiter]:
        self._seq += 1
        waiter = self._acks[self._seq] = _AckWaiter()
        return self._seq, waiter
