"""A gossip node: SWIM failure detection with Lifeguard, gossip and push-pull.

`Memberlist` is the public face; it wires the state machine (state.py), probing
(probe.py), the network side (net.py, frames.py) and the delegate (delegate.py) into one
set of trio tasks. Time is trio's clock, randomness an injected random.Random, and the
network a Transport, so the same code runs on UDP/TCP and on the simulated network.
"""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import trio

from ..core.address import Address
from . import messages as m
from .config import GossipConfig
from .delegate import Conversation, Delegate
from .frames import FrameError, Sealer
from .keyring import Keyring
from .member import EventKind, Member, MemberEvent, MemberInfo
from .messages import State
from .net import Network
from .probe import Prober
from .state import Hooks, Membership
from .suspicion import Suspicion
from .transport import Transport

# Delegate, Conversation and FrameError are what the layer above needs, importable from here.
__all__ = ["Conversation", "Delegate", "FrameError", "Memberlist"]


class Memberlist:
    """One gossip node.

    Args:
        name: unique member name.
        transport: where packets and streams go; started by `run`.
        keyring: keys for the envelope of every packet and stream frame.
        cluster: cluster name, bound into every envelope so clusters never mix.
        config: timing and size settings.
        meta: this node's metadata (NodeMeta.encode()), at most 1 KiB.
        advertise: address told to others; defaults to the transport's bound address.
        rng: randomness for probe order and target choice (seed it in tests).
        wall_clock: Unix time for envelope timestamps and status (trio's clock in simulations).
        delegate: hooks for the push-pull extension slot and application broadcasts.
    """

    def __init__(
        self,
        *,
        name: str,
        transport: Transport,
        keyring: Keyring,
        cluster: str,
        config: GossipConfig | None = None,
        meta: bytes = b"",
        advertise: Address | None = None,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
        delegate: Delegate | None = None,
    ) -> None:
        self.name = name
        self.transport = transport
        self.keyring = keyring
        self.cluster = cluster
        self.config = config or GossipConfig()
        self.delegate = delegate or Delegate()
        #: What this node counted, the transport's troubles included.
        self.counters: collections.Counter[str] = transport.counters
        self._advertise = advertise
        rng = rng or random.Random()
        hooks = Hooks(
            changed=self._gossip_soon,
            event=self._publish,
            suspected=self._watch_suspicion,
            recovered=self._recovered,
        )
        self._state = Membership(
            name,
            config=self.config,
            rng=rng,
            counters=self.counters,
            hooks=hooks,
            meta=meta,
            clock=trio.current_time,
            wall_clock=wall_clock,
        )
        self._sealer = Sealer(
            name=name,
            keyring=keyring,
            cluster=cluster,
            refused=self._state.refused,
            max_frame=self.config.max_stream_frame,
            replay_window=self.config.replay_window,
            wall_clock=wall_clock,
            counters=self.counters,
        )
        self._net = Network(
            transport=transport,
            sealer=self._sealer,
            membership=self._state,
            delegate=self.delegate,
            config=self.config,
            rng=rng,
            counters=self.counters,
            on_message=self._on_message,
        )
        self._prober = Prober(
            membership=self._state,
            net=self._net,
            config=self.config,
            rng=rng,
            counters=self.counters,
        )
        self._subscribers: list[trio.MemorySendChannel] = []
        self._nursery: trio.Nursery | None = None

    # ----------------------------------------------------------------- public API

    @property
    def address(self) -> Address:
        return self._state.local.address

    @property
    def incarnation(self) -> int:
        return self._state.incarnation

    @property
    def health_score(self) -> int:
        return self._state.awareness.score

    @property
    def removed(self) -> bool:
        """Whether a member told us that this node was removed from the cluster."""
        return self._state.removed

    @property
    def refused(self) -> frozenset[str]:
        return frozenset(self._state.refused)

    @property
    def running(self) -> bool:
        """Whether run() has started (this node is in its own member list)."""
        return self._state.running

    @property
    def clock_offsets(self) -> dict[str, float]:
        """By member name, how far (seconds, positive: ahead) its clock was from ours in the
        stale packets dropped from it; the largest offset seen, for the few hundred members
        heard of last."""
        return dict(self._net.skew.offsets)

    def members(self) -> list[MemberInfo]:
        """Every member known, this node included, dead and left ones until reaped."""
        return [member.snapshot() for member in self._state.members.values()]

    def member(self, name: str) -> MemberInfo | None:
        """One member as this node sees it, or None if unknown (or reaped)."""
        member = self._state.members.get(name)
        return None if member is None else member.snapshot()

    def local(self) -> MemberInfo:
        return self._state.local.snapshot()

    def subscribe(self, max_buffer: int = 1024) -> trio.MemoryReceiveChannel:
        """A channel of MemberEvents; when the reader falls behind, events are dropped and counted."""
        send, receive = trio.open_memory_channel(max_buffer)
        self._subscribers.append(send)
        return receive

    def queue_broadcast(self, key: str, payload: bytes) -> None:
        """Gossip an application payload; a newer one with the same key replaces a queued older one."""
        self._state.broadcasts.queue("app/" + key, m.to_wire(m.Broadcast(key, payload)))

    def update_meta(self, meta: bytes) -> None:
        """Change this node's metadata and tell the cluster (once running)."""
        self._state.update_meta(meta)

    def refuse(self, name: str) -> None:
        """Take member `name` out of the cluster for good: from now on its packets and streams
        are dropped, news of it alive is ignored, and it shows as left. Idempotent."""
        self._state.refuse(name)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Start the transport and the protocol tasks; report the bound address; run until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            bound = await nursery.start(self.transport.run)
            host, port = self._advertise or bound
            self._state.start(host, port)
            net = self._net
            nursery.start_soon(net.packet_loop)
            nursery.start_soon(net.stream_loop, nursery)
            nursery.start_soon(self._prober.probe_loop)
            nursery.start_soon(net.gossip_loop)
            nursery.start_soon(net.push_pull_loop)
            nursery.start_soon(net.reconnect_loop)
            nursery.start_soon(net.recovery_loop)
            nursery.start_soon(self._reap_loop)
            task_status.started(bound)

    async def join(self, seeds: Iterable[Address]) -> int:
        """Exchange full state with each seed; return how many answered. Never raises for the network.

        A node restarted after a kill may learn from one seed that the cluster holds it dead,
        and refute with a new incarnation: the seeds that answered before heard the old one,
        which their dead record outranks. They are told again at once, rather than left to
        gossip that may miss them until the next push-pull."""
        told: list[tuple[tuple[str, int], int]] = []  # seeds that answered, and our incarnation then
        for seed in seeds:
            incarnation = self._state.incarnation
            if tuple(seed) != self.address and await self._net.push_pull(tuple(seed), join=True):
                told.append((tuple(seed), incarnation))
        for seed, incarnation in told:
            if incarnation != self._state.incarnation:
                await self._net.push_pull(seed, join=True)
        joined = len(told)
        if joined:
            # Announce ourselves now rather than at the next gossip tick.
            self._gossip_soon()
        return joined

    async def leave(self, timeout: float) -> None:
        """Tell the cluster this node leaves (state "left", not "dead"), waiting up to timeout."""
        sent = trio.Event()
        message = self._state.leave(sent)
        peers = self._state.pick(self.config.gossip_nodes, lambda x: x.state in (State.ALIVE, State.SUSPECT))
        with trio.move_on_after(timeout):
            for peer in peers:
                await self._net.send(peer.address, [message], piggyback=False)
            if peers:
                await sent.wait()

    # ------------------------------------------------------------ wiring

    def _on_message(self, msg: Any, source: Address) -> None:
        """Hand one message from a packet (other than a Ping) to its handler."""
        if isinstance(msg, m.Ack):
            self._prober.acked(msg)
        elif isinstance(msg, m.Nack):
            self._prober.nacked(msg)
        elif isinstance(msg, m.IndirectPing):
            assert self._nursery is not None
            self._nursery.start_soon(self._prober.probe_for, msg, source)
        elif isinstance(msg, m.Alive):
            self._state.alive(msg)
        elif isinstance(msg, m.Suspect):
            self._state.suspect(msg)
        elif isinstance(msg, m.Dead):
            self._state.dead(msg)
        elif isinstance(msg, m.Broadcast):
            self.delegate.notify_broadcast(msg.key, msg.payload)
        elif isinstance(msg, m.Refused):
            self._state.refused_by_cluster(msg)
        else:
            self.counters["dropped.unexpected_type"] += 1

    def _gossip_soon(self) -> None:
        self._net.gossip_soon()

    def _recovered(self, member: Member) -> None:
        self._net.recovered(member.name)

    def _watch_suspicion(self, member: Member, suspicion: Suspicion, accuser: str) -> None:
        if self._nursery is None:
            return
        self._nursery.start_soon(self._prober.suspicion_timer, member.name, suspicion)
        if accuser != self.name:
            # Check the accusation ourselves now rather than when the round-robin gets
            # there: a failed probe is an independent confirmation that shortens the
            # Lifeguard timer, and an ack means our probes keep the member honest.
            self._nursery.start_soon(self._prober.probe, member, trio.current_time() + self.config.probe_interval)

    def _publish(self, kind: EventKind, member: Member) -> None:
        if kind in (EventKind.FAILED, EventKind.LEFT):
            self._net.gone(member.name)
        event = MemberEvent(kind, member.snapshot())
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                self.counters["events_dropped"] += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(channel)

    async def _reap_loop(self) -> None:
        """Forget dead and left members after reap_after."""
        reap_after = self.config.reap_after
        while True:
            await trio.sleep(min(reap_after / 4, 60.0))
            self._state.reap(reap_after)
