"""The membership protocol: SWIM failure detection with Lifeguard, gossip and push-pull.

`Memberlist` owns this node's view of the cluster. Its state machine (`_alive`,
`_suspect`, `_dead`) is plain synchronous code that takes a message and updates the view,
queueing broadcasts and events; the trio tasks around it probe, gossip, push-pull and read
the transport. Time is trio's clock, randomness an injected random.Random, and the
network a Transport, so the same code runs on UDP/TCP and on the simulated network.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import trio

from . import messages as m
from .awareness import Awareness
from .broadcast import BroadcastQueue
from .config import GossipConfig
from .keyring import OVERHEAD, EnvelopeError, Keyring, ReplayGuard
from .member import EventKind, Member, MemberEvent, MemberInfo
from .messages import State
from .suspicion import Suspicion
from .timing import push_pull_interval, retransmit_limit, suspicion_min
from .transport import Address, Transport

log = logging.getLogger("meshmail.gossip")

_FRAME_HEADER = struct.Struct(">I")
#: Streams served at once; more are closed at once and counted.
MAX_CONCURRENT_STREAMS = 64
#: How often a failed (not left) member is offered a push-pull, as Serf's reconnect does.
RECONNECT_INTERVAL = 30.0

#: A removed member whose gossip keeps coming is told so at most this often (seconds).
REFUSAL_NOTICE_INTERVAL = 10.0

class Delegate:
    """Hooks for the layer above (Step 2 replicates cluster state through these)."""

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
    """Encrypted StateSync messages over a push-pull's stream, each within tcp_timeout."""

    def __init__(self, memberlist: Memberlist, stream: trio.abc.Stream) -> None:
        self._memberlist = memberlist
        self._stream = stream

    async def send(self, payload: bytes) -> None:
        """Send one message; raises trio.TooSlowError, trio.BrokenResourceError or OSError."""
        with trio.fail_after(self._memberlist.config.tcp_timeout):
            await self._memberlist._write_frame(self._stream, [m.StateSync(payload)])

    async def receive(self) -> bytes:
        """The next message; raises FrameError (bad or missing frame) or trio.TooSlowError."""
        with trio.fail_after(self._memberlist.config.tcp_timeout):
            _, messages = await self._memberlist._read_frame(self._stream)
        for msg in messages:
            if isinstance(msg, m.StateSync):
                return msg.payload
        raise FrameError("malformed")


class FrameError(Exception):
    """A stream frame that is too large, cut short, or does not open; `reason` is a counter.
    `sender` names the member a refused frame came from."""

    def __init__(self, reason: str, sender: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.sender = sender


@attrs.define(eq=False)
class _AckWaiter:
    acked: trio.Event = attrs.field(factory=trio.Event)
    nacks: int = 0


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
        self.counters: collections.Counter[str] = collections.Counter()
        self._meta = meta
        self._advertise = advertise
        self._rng = rng or random.Random()
        self._wall = wall_clock
        self._aad = b"meshmail-gossip/1/" + cluster.encode()
        self._replay = ReplayGuard(self.config.replay_window)
        self._awareness = Awareness(self.config.awareness_max_multiplier)
        self._broadcasts = BroadcastQueue(lambda: retransmit_limit(self.config.retransmit_mult, self._live))
        self._members: dict[str, Member] = {}
        self._live = 0  # members alive or suspect, self included
        self._suspicions: dict[str, Suspicion] = {}
        self._acks: dict[int, _AckWaiter] = {}
        self._seq = 0
        self._incarnation = 0
        self._probe_order: list[str] = []
        self._probe_index = 0
        self._subscribers: list[trio.MemorySendChannel] = []
        self._leaving = False
        #: Members taken out of the cluster (`meshmail remove`): their gossip is dropped.
        self._refused: set[str] = set()
        #: When each refused member was last told so (trio time), to tell it at most every
        #: REFUSAL_NOTICE_INTERVAL seconds.
        self._told_refused: dict[str, float] = {}
        #: Set once a member told us that we were removed from the cluster.
        self.removed = False
        self._nursery: trio.Nursery | None = None
        self._streams = trio.Semaphore(MAX_CONCURRENT_STREAMS)
        self._gossip_now = trio.Event()
        header = m.Header(m.PROTOCOL_VERSION, 1 << 62, name)
        # Envelope, header and the growth of the message array header past 15 entries.
        self._packet_budget = self.config.packet_size - OVERHEAD - len(m.pack_wire(header, [])) - 2

    # ----------------------------------------------------------------- public API

    @property
    def address(self) -> Address:
        return self._members[self.name].address

    @property
    def incarnation(self) -> int:
        return self._incarnation

    @property
    def health_score(self) -> int:
        return self._awareness.score

    def members(self) -> list[MemberInfo]:
        """Every member known, this node included, dead and left ones until reaped."""
        return [member.snapshot() for member in self._members.values()]

    def member(self, name: str) -> MemberInfo | None:
        """One member as this node sees it, or None if unknown (or reaped)."""
        member = self._members.get(name)
        return None if member is None else member.snapshot()

    def local(self) -> MemberInfo:
        return self._members[self.name].snapshot()

    def subscribe(self, max_buffer: int = 1024) -> trio.MemoryReceiveChannel:
        """A channel of MemberEvents; when the reader falls behind, events are dropped and counted."""
        send, receive = trio.open_memory_channel(max_buffer)
        self._subscribers.append(send)
        return receive

    def queue_broadcast(self, key: str, payload: bytes) -> None:
        """Gossip an application payload; a newer one with the same key replaces a queued older one."""
        self._broadcasts.queue("app/" + key, m.to_wire(m.Broadcast(key, payload)))

    def update_meta(self, meta: bytes) -> None:
        """Change this node's metadata and tell the cluster (once running)."""
        if len(meta) > m.MAX_META:
            raise ValueError(f"node metadata is {len(meta)} bytes; the limit is {m.MAX_META}")
        self._meta = meta
        if self.running:
            self._announce_self(self._incarnation + 1)

    @property
    def running(self) -> bool:
        """Whether run() has started (this node is in its own member list)."""
        return self.name in self._members

    def refuse(self, name: str) -> None:
        """Take member `name` out of the cluster for good: from now on its packets and streams
        are dropped, news of it alive is ignored, and it shows as left. Idempotent."""
        if name == self.name or name in self._refused:
            return
        self._refused.add(name)
        self._clear_suspicion(name)
        member = self._members.get(name)
        if member is not None and member.state != State.LEFT:
            self._set_state(member, State.LEFT)
            self._publish(EventKind.LEFT, member)

    @property
    def refused(self) -> frozenset[str]:
        return frozenset(self._refused)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Start the transport and the protocol tasks; report the bound address; run until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            bound = await nursery.start(self.transport.run)
            host, port = self._advertise or bound
            now = trio.current_time()
            self._incarnation = 1
            self._members[self.name] = Member(self.name, host, port, self._meta, 1, State.ALIVE, now, self._wall())
            self._live = 1
            # Our own alive waits in the queue until the first members are known, so a
            # joining node tells others about itself directly instead of only through its seed.
            self._announce_self(1)
            for loop in (
                self._packet_loop,
                self._stream_loop,
                self._probe_loop,
                self._gossip_loop,
                self._push_pull_loop,
                self._reconnect_loop,
                self._reap_loop,
            ):
                nursery.start_soon(loop)
            task_status.started(bound)

    async def join(self, seeds: Iterable[Address]) -> int:
        """Exchange full state with each seed; return how many answered. Never raises for the network."""
        joined = 0
        for seed in seeds:
            if tuple(seed) != self.address and await self._push_pull(tuple(seed), join=True):
                joined += 1
        if joined:
            # Announce ourselves now rather than at the next gossip tick.
            self._gossip_now.set()
        return joined

    async def leave(self, timeout: float) -> None:
        """Tell the cluster this node leaves (state "left", not "dead"), waiting up to timeout."""
        self._leaving = True
        me = self._members[self.name]
        sent = trio.Event()
        message = m.Dead(self._incarnation, self.name, self.name)
        self._set_state(me, State.LEFT)
        self._broadcasts.queue(self.name, m.to_wire(message), sent=sent)
        peers = self._pick(self.config.gossip_nodes, lambda x: x.state in (State.ALIVE, State.SUSPECT))
        with trio.move_on_after(timeout):
            for peer in peers:
                await self._send(peer.address, [message], piggyback=False)
            if peers:
                await sent.wait()

    # ------------------------------------------------------------ state machine

    def _alive(self, msg: m.Alive) -> None:
        """Handle news that a member is alive (memberlist's aliveNode)."""
        if self._leaving and msg.node == self.name or msg.node in self._refused:
            return
        now = trio.current_time()
        member = self._members.get(msg.node)
        is_self = msg.node == self.name
        fresh = member is None
        if member is not None and member.address != (msg.host, msg.port):
            if member.state not in (State.DEAD, State.LEFT) or is_self:
                self.counters["conflicts"] += 1
                log.warning(
                    "name conflict: %s claimed by %s:%d while %s:%d is %s; refused",
                    msg.node, msg.host, msg.port, member.host, member.port, member.state.name.lower(),
                )
                return
            fresh = True  # a dead or left member came back from a new address
        elif member is not None and member.state in (State.DEAD, State.LEFT):
            # Forgotten for protocol purposes once gossip to the dead stopped (as memberlist
            # drops such nodes): a restarted member is then welcome at any incarnation.
            fresh = now - member.changed > self.config.gossip_to_the_dead_time
        if is_self:
            if msg.incarnation < self._incarnation or (msg.incarnation == self._incarnation and msg.meta == self._meta):
                return
            self._refute(msg.incarnation)
            return
        if not fresh and msg.incarnation <= member.incarnation:
            return
        self._clear_suspicion(msg.node)
        self._broadcasts.queue(msg.node, m.to_wire(msg))
        if member is None:
            member = Member(msg.node, msg.host, msg.port, msg.meta, msg.incarnation, State.DEAD, now, self._wall())
            self._members[msg.node] = member
            self._probe_order.insert(self._rng.randint(0, len(self._probe_order)), msg.node)
        elif member.state in (State.DEAD, State.LEFT) and msg.node not in self._probe_order:
            self._probe_order.insert(self._rng.randint(0, len(self._probe_order)), msg.node)
        old_state, old_meta = member.state, member.meta
        member.host, member.port, member.meta, member.incarnation = msg.host, msg.port, msg.meta, msg.incarnation
        if old_state != State.ALIVE:
            self._set_state(member, State.ALIVE)
        if old_state in (State.DEAD, State.LEFT):
            self._publish(EventKind.JOINED, member)
        elif old_meta != msg.meta or old_state == State.SUSPECT:
            self._publish(EventKind.UPDATED, member)

    def _suspect(self, msg: m.Suspect) -> None:
        """Handle an accusation (memberlist's suspectNode), with Lifeguard confirmations."""
        member = self._members.get(msg.node)
        if member is None or msg.incarnation < member.incarnation or msg.node in self._refused:
            return
        if member.state == State.LEFT and msg.incarnation == member.incarnation:
            # The accuser missed the leave: tell the cluster again rather than let the
            # member end up "dead" somewhere.
            self._broadcasts.queue(msg.node, m.to_wire(m.Dead(member.incarnation, msg.node, msg.node)))
            return
        suspicion = self._suspicions.get(msg.node)
        if suspicion is not None and msg.incarnation == member.incarnation:
            if suspicion.confirm(msg.source):
                self.counters["suspicion_confirmations"] += 1
                self._broadcasts.queue(msg.node, m.to_wire(msg))
            return
        if member.state == State.SUSPECT and msg.incarnation > member.incarnation:
            # An accusation at a newer incarnation means the suspect refuted the one we
            # hold (its alive did not reach us, or was replaced in the queues by this very
            # message): that suspicion is void, and the new one starts its own timer.
            self._clear_suspicion(msg.node)
        elif member.state != State.ALIVE:
            return
        if msg.node == self.name:
            self._refute(msg.incarnation)
            return
        self.counters["suspicions"] += 1
        self._broadcasts.queue(msg.node, m.to_wire(msg))
        member.incarnation = msg.incarnation
        self._set_state(member, State.SUSPECT)
        cfg = self.config
        expected = cfg.suspicion_mult - 2
        if self._live - 2 < expected:
            expected = 0
        minimum = suspicion_min(cfg.suspicion_mult, self._live, cfg.probe_interval)
        suspicion = Suspicion(member.changed, minimum, minimum * cfg.suspicion_max_timeout_mult, expected, {msg.source})
        self._suspicions[msg.node] = suspicion
        if self._nursery is not None:
            self._nursery.start_soon(self._suspicion_timer, msg.node, suspicion)
            if msg.source != self.name:
                # Check the accusation ourselves now rather than when the round-robin gets
                # there: a failed probe is an independent confirmation that shortens the
                # Lifeguard timer, and an ack means our probes keep the member honest.
                self._nursery.start_soon(self._probe, member, trio.current_time() + cfg.probe_interval)
        self._publish(EventKind.SUSPECT, member)

    def _dead(self, msg: m.Dead) -> None:
        """Handle a failure or a leave (memberlist's deadNode)."""
        member = self._members.get(msg.node)
        if member is None or msg.incarnation < member.incarnation:
            return
        self._clear_suspicion(msg.node)
        if member.state == State.LEFT or (member.state == State.DEAD and not msg.is_leave):
            return
        if msg.node == self.name and not self._leaving:
            self._refute(msg.incarnation)
            return
        self._broadcasts.queue(msg.node, m.to_wire(msg))
        member.incarnation = msg.incarnation
        self._set_state(member, State.LEFT if msg.is_leave else State.DEAD)
        self.counters["left" if msg.is_leave else "failed"] += 1
        self._publish(EventKind.LEFT if msg.is_leave else EventKind.FAILED, member)

    def _merge(self, remote: Sequence[m.MemberState]) -> None:
        """Fold a peer's full view into ours; its "dead" only makes us suspect (memberlist)."""
        for s in remote:
            if s.state == State.ALIVE:
                self._alive(m.Alive(s.incarnation, s.node, s.host, s.port, s.meta))
            elif s.state == State.LEFT:
                self._dead(m.Dead(s.incarnation, s.node, s.node))
            else:
                self._suspect(m.Suspect(s.incarnation, s.node, self.name))

    def _refute(self, accused: int) -> None:
        """Someone thinks we are suspect or dead: outbid their incarnation and say we are alive."""
        self.counters["refutations"] += 1
        self._awareness.apply(1)
        self._announce_self(max(self._incarnation, accused) + 1)

    def _announce_self(self, incarnation: int) -> None:
        me = self._members[self.name]
        self._incarnation = me.incarnation = incarnation
        me.meta = self._meta
        self._broadcasts.queue(self.name, m.to_wire(m.Alive(incarnation, self.name, me.host, me.port, self._meta)))

    def _set_state(self, member: Member, state: State) -> None:
        live_before = member.state in (State.ALIVE, State.SUSPECT)
        live_after = state in (State.ALIVE, State.SUSPECT)
        self._live += live_after - live_before
        # A change of membership is news: gossip it now, not at the next tick.
        self._gossip_now.set()
        member.state = state
        member.changed = trio.current_time()
        member.changed_wall = self._wall()

    def _clear_suspicion(self, name: str) -> None:
        suspicion = self._suspicions.pop(name, None)
        if suspicion is not None:
            suspicion.scope.cancel()

    async def _suspicion_timer(self, name: str, suspicion: Suspicion) -> None:
        with suspicion.scope:
            await trio.sleep_forever()
        if self._suspicions.get(name) is not suspicion:
            return  # refuted or settled meanwhile
        member = self._members[name]
        log.info("suspicion of %s timed out with %d confirmation(s)", name, suspicion.confirmations)
        self._dead(m.Dead(member.incarnation, name, self.name))

    def _publish(self, kind: EventKind, member: Member) -> None:
        event = MemberEvent(kind, member.snapshot())
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                self.counters["events_dropped"] += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(channel)

    # ------------------------------------------------------------ probing

    def _next_probe_target(self) -> Member | None:
        for _ in range(len(self._probe_order) + 1):
            if self._probe_index >= len(self._probe_order):
                self._probe_order = [
                    name for name, x in self._members.items()
                    if name != self.name and x.state in (State.ALIVE, State.SUSPECT)
                ]
                self._rng.shuffle(self._probe_order)
                self._probe_index = 0
                if not self._probe_order:
                    return None
            member = self._members.get(self._probe_order[self._probe_index])
            self._probe_index += 1
            if member is not None and member.state in (State.ALIVE, State.SUSPECT):
                return member
        return None

    async def _probe_loop(self) -> None:
        # Spread the first probe over one interval so nodes started together do not align.
        await trio.sleep(self._rng.random() * self.config.probe_interval)
        while True:
            start = trio.current_time()
            interval = self._awareness.scale(self.config.probe_interval)
            target = self._next_probe_target()
            if target is not None:
                await self._probe(target, start + interval)
            await trio.sleep_until(start + interval)

    async def _probe(self, member: Member, deadline: float) -> None:
        """One SWIM probe: direct ping, then indirect pings and a TCP ping, then suspicion."""
        cfg = self.config
        seq, waiter = self._new_waiter()
        try:
            ping = m.Ping(seq, member.name, self.name, *self.address)
            messages: list[Any] = [ping]
            if member.state == State.SUSPECT:
                # Lifeguard's buddy system: tell the suspect directly so it can refute at once.
                messages.append(m.Suspect(member.incarnation, member.name, self.name))
            self.counters["probes"] += 1
            await self._send(member.address, messages)
            with trio.move_on_after(self._awareness.scale(cfg.probe_timeout)):
                await waiter.acked.wait()
            if waiter.acked.is_set():
                self._awareness.apply(-1)
                return
            peers = self._pick(
                cfg.indirect_checks,
                lambda x: x.state == State.ALIVE and x.name != member.name,
            )
            request = m.IndirectPing(seq, member.name, member.host, member.port, self.name, *self.address, nack=True)
            for peer in peers:
                self.counters["indirect_probes"] += 1
                await self._send(peer.address, [request])
            async with trio.open_nursery() as nursery:
                if cfg.tcp_fallback_probe:
                    nursery.start_soon(self._tcp_probe, member, seq, waiter)
                with trio.move_on_at(deadline):
                    await waiter.acked.wait()
                nursery.cancel_scope.cancel()
            if waiter.acked.is_set():
                return
            self.counters["probe_failures"] += 1
            self._awareness.apply(len(peers) - waiter.nacks if peers else 1)
        finally:
            self._acks.pop(seq, None)
        if member.state in (State.ALIVE, State.SUSPECT) and member.name in self._members:
            self._suspect(m.Suspect(member.incarnation, member.name, self.name))

    async def _tcp_probe(self, member: Member, seq: int, waiter: _AckWaiter) -> None:
        try:
            stream = await self.transport.connect(member.address)
        except OSError:
            return
        async with stream:
            try:
                await self._write_frame(stream, [m.Ping(seq, member.name, self.name, *self.address)])
                _, reply = await self._read_frame(stream)
            except (FrameError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
        if any(isinstance(x, m.Ack) and x.seq == seq for x in reply):
            self.counters["tcp_fallback_acks"] += 1
            waiter.acked.set()

    async def _indirect_probe(self, request: m.IndirectPing, requester: Address) -> None:
        """Probe a member on someone else's behalf and report the ack, or a nack."""
        seq, waiter = self._new_waiter()
        try:
            await self._send((request.host, request.port), [m.Ping(seq, request.node, self.name, *self.address)])
            with trio.move_on_after(self.config.probe_timeout):
                await waiter.acked.wait()
        finally:
            self._acks.pop(seq, None)
        if waiter.acked.is_set():
            await self._send(requester, [m.Ack(request.seq)])
        elif request.nack:
            await self._send(requester, [m.Nack(request.seq)])

    def _new_waiter(self) -> tuple[int, _AckWaiter]:
        self._seq += 1
        waiter = self._acks[self._seq] = _AckWaiter()
        return self._seq, waiter

    def _pick(self, k: int, wanted: Callable[[Member], bool]) -> list[Member]:
        """Up to k random other members for which wanted() holds."""
        candidates = [x for x in self._members.values() if x.name != self.name and wanted(x)]
        return self._rng.sample(candidates, min(k, len(candidates)))

    # ------------------------------------------------------------ packets

    async def _packet_loop(self) -> None:
        while True:
            packet = await self.transport.receive_packet()
            await self._handle_packet(packet.source, packet.data)

    async def _handle_packet(self, source: Address, data: bytes) -> None:
        """Open, check and dispatch one datagram; every bad one is dropped and counted."""
        self.counters["packets_in"] += 1
        self.counters["bytes_in"] += len(data)
        if len(data) > 2 * self.config.packet_size:
            self.counters["dropped.oversize"] += 1
            return
        try:
            _, messages = self._open(data)
        except FrameError as exc:
            self.counters["dropped." + exc.reason] += 1
            if exc.reason == "removed_member":
                await self._tell_refused(exc.sender, source)
            return
        for msg in messages:
            await self._dispatch(msg, source)

    def _refused_by_cluster(self, msg: m.Refused) -> None:
        if msg.node == self.name and not self.removed:
            self.removed = True
            self.counters["removed_from_cluster"] = 1
            log.error("a member says this node was removed from the cluster (meshmail remove): it is refused")

    async def _tell_refused(self, name: str, address: Address) -> None:
        """Tell a removed member that it is (it would otherwise never learn: nobody talks to it)."""
        now = trio.current_time()
        if now - self._told_refused.get(name, -REFUSAL_NOTICE_INTERVAL) < REFUSAL_NOTICE_INTERVAL:
            return
        if len(self._told_refused) > 1024:
            self._told_refused.clear()
        self._told_refused[name] = now
        self.counters["refusal_notices"] += 1
        await self._send(address, [m.Refused(name)], piggyback=False)

    async def _dispatch(self, msg: Any, source: Address) -> None:
        if isinstance(msg, m.Ping):
            if msg.node != self.name:
                self.counters["dropped.wrong_node"] += 1
                return
            await self._send(source, [m.Ack(msg.seq)])
        elif isinstance(msg, m.Ack):
            waiter = self._acks.get(msg.seq)
            if waiter is not None:
                waiter.acked.set()
        elif isinstance(msg, m.Nack):
            waiter = self._acks.get(msg.seq)
            if waiter is not None:
                waiter.nacks += 1
        elif isinstance(msg, m.IndirectPing):
            assert self._nursery is not None
            self._nursery.start_soon(self._indirect_probe, msg, source)
        elif isinstance(msg, m.Alive):
            self._alive(msg)
        elif isinstance(msg, m.Suspect):
            self._suspect(msg)
        elif isinstance(msg, m.Dead):
            self._dead(msg)
        elif isinstance(msg, m.Broadcast):
            self.delegate.notify_broadcast(msg.key, msg.payload)
        elif isinstance(msg, m.Refused):
            self._refused_by_cluster(msg)
        else:
            self.counters["dropped.unexpected_type"] += 1

    def _open(self, data: bytes) -> tuple[m.Header, list[Any]]:
        """Decrypt, check freshness and decode a packet or frame; raise FrameError(reason)."""
        try:
            nonce, plaintext = self.keyring.open(data, self._aad)
        except EnvelopeError as exc:
            raise FrameError(exc.reason) from None
        try:
            header, messages, unknown = m.unpack(plaintext)
        except m.MalformedMessage:
            raise FrameError("malformed") from None
        reason = self._replay.check(nonce, header.sent_ms / 1000, self._wall())
        if reason is not None:
            raise FrameError(reason)
        if header.sender in self._refused:
            raise FrameError("removed_member", header.sender)
        if unknown:
            # Types from a newer version: ignored by design, counted so an operator sees them.
            self.counters["ignored.unknown_type"] += unknown
        return header, messages

    def _seal(self, wired: list[list]) -> bytes:
        header = m.Header(m.PROTOCOL_VERSION, int(self._wall() * 1000), self.name)
        return self.keyring.seal(m.pack_wire(header, wired), self._aad)

    async def _send(self, address: Address, messages: list[Any], *, piggyback: bool = True) -> None:
        wired = [m.to_wire(x) for x in messages]
        if piggyback:
            used = sum(m.wire_size(w) for w in wired)
            wired += self._broadcasts.take(self._packet_budget - used, 0)
        await self._send_wired(address, wired)

    async def _send_wired(self, address: Address, wired: list[list]) -> None:
        data = self._seal(wired)
        self.counters["packets_out"] += 1
        self.counters["bytes_out"] += len(data)
        if not await self.transport.send_packet(address, data):
            self.counters["send_errors"] += 1

    # ------------------------------------------------------------ gossip

    async def _gossip_loop(self) -> None:
        cfg = self.config
        while True:
            eager = False
            with trio.move_on_after(cfg.gossip_interval):
                await self._gossip_now.wait()
                eager = True
            self._gossip_now = trio.Event()
            if eager:
                # Eager rounds spend the same retransmits sooner; cap them at ten per interval.
                await trio.sleep(cfg.gossip_interval / 10)
            if not len(self._broadcasts):
                continue
            targets = self._pick(cfg.gossip_nodes, self._gossip_reaches)
            for target in targets:
                wired = self._broadcasts.take(self._packet_budget, 0)
                if not wired:
                    break
                self.counters["gossip_packets"] += 1
                await self._send_wired(target.address, wired)

    def _gossip_reaches(self, member: Member) -> bool:
        """Gossip goes to live members and, for a while, to dead ones so they can refute;
        never to members that left."""
        if member.state in (State.ALIVE, State.SUSPECT):
            return True
        return member.state == State.DEAD and trio.current_time() - member.changed < self.config.gossip_to_the_dead_time

    # ------------------------------------------------------------ streams

    async def _stream_loop(self) -> None:
        assert self._nursery is not None
        while True:
            peer, stream = await self.transport.accept()
            try:
                self._streams.acquire_nowait()
            except trio.WouldBlock:
                self.counters["dropped.busy"] += 1
                await stream.aclose()
                continue
            self._nursery.start_soon(self._handle_stream, stream)

    async def _handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one incoming stream: a TCP ping or a push-pull exchange."""
        try:
            async with stream:
                await self._serve_stream(stream)
        finally:
            self._streams.release()

    async def _serve_stream(self, stream: trio.abc.Stream) -> None:
        self.counters["streams_in"] += 1
        push_pull_from = None
        with trio.move_on_after(self.config.tcp_timeout) as timer:
            try:
                header, messages = await self._read_frame(stream)
                for msg in messages:
                    if isinstance(msg, m.Ping) and msg.node == self.name:
                        await self._write_frame(stream, [m.Ack(msg.seq)])
                    elif isinstance(msg, m.PushPull):
                        await self._write_frame(stream, [self._local_push_pull(msg.join)])
                        self._merge_push_pull(msg)
                        push_pull_from = header.sender
                        if msg.join:
                            self._gossip_now.set()
            except FrameError as exc:
                self.counters["dropped." + exc.reason] += 1
                if exc.reason == "removed_member":
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        await self._write_frame(stream, [m.Refused(exc.sender)])
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self.counters["streams_broken"] += 1
        if timer.cancelled_caught:
            self.counters["streams_timed_out"] += 1
        elif push_pull_from is not None:
            await self._sync(push_pull_from, stream, client=False)

    async def _sync(self, peer: str, stream: trio.abc.Stream, *, client: bool) -> None:
        """Let the delegate exchange replicated state on a push-pull's stream; every
        failure is counted, none escapes (each message has its own tcp_timeout)."""
        conversation = Conversation(self, stream)
        try:
            if client:
                await self.delegate.sync_client(peer, conversation)
            else:
                await self.delegate.sync_server(peer, conversation)
        except FrameError as exc:
            self.counters["dropped." + exc.reason] += 1
        except trio.TooSlowError:
            self.counters["streams_timed_out"] += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.counters["streams_broken"] += 1

    async def _push_pull(self, address: Address, *, join: bool) -> bool:
        """Exchange full state with the member at address, then let the delegate sync
        replicated state on the same stream; True when the member answered."""
        try:
            with trio.fail_after(self.config.tcp_timeout):
                stream = await self.transport.connect(address)
        except (OSError, trio.TooSlowError):
            self.counters["push_pull_failures"] += 1
            return False
        async with stream:
            try:
                with trio.fail_after(self.config.tcp_timeout):
                    await self._write_frame(stream, [self._local_push_pull(join)])
                    header, messages = await self._read_frame(stream)
            except FrameError as exc:
                self.counters["dropped." + exc.reason] += 1
                return False
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
                self.counters["push_pull_failures"] += 1
                return False
            for msg in messages:
                if isinstance(msg, m.Refused):
                    self._refused_by_cluster(msg)
            answer = next((msg for msg in messages if isinstance(msg, m.PushPull)), None)
            if answer is None:
                return False
            self.counters["push_pulls"] += 1
            self._merge_push_pull(answer)
            await self._sync(header.sender, stream, client=True)
        return True

    def _local_push_pull(self, join: bool) -> m.PushPull:
        # Refused members are left out: a refusal is this node's decision (from the replicated
        # state), and listed as "left" it would read to the peer as a leave in their name.
        states = [
            m.MemberState(x.name, x.host, x.port, x.incarnation, int(x.state), x.meta)
            for x in self._members.values()
            if x.name not in self._refused
        ]
        return m.PushPull(join, states, self.delegate.local_state(join))

    def _merge_push_pull(self, msg: m.PushPull) -> None:
        self._merge(msg.members)
        if msg.extension:
            self.delegate.merge_remote_state(msg.extension, msg.join)

    async def _write_frame(self, stream: trio.abc.Stream, messages: list[Any]) -> None:
        data = self._seal([m.to_wire(x) for x in messages])
        self.counters["bytes_out"] += len(data) + _FRAME_HEADER.size
        await stream.send_all(_FRAME_HEADER.pack(len(data)) + data)

    async def _read_frame(self, stream: trio.abc.Stream) -> tuple[m.Header, list[Any]]:
        (size,) = _FRAME_HEADER.unpack(await _receive_exactly(stream, _FRAME_HEADER.size))
        if size > self.config.max_stream_frame:
            raise FrameError("oversize")
        data = await _receive_exactly(stream, size)
        self.counters["bytes_in"] += len(data) + _FRAME_HEADER.size
        return self._open(data)

    async def _push_pull_loop(self) -> None:
        base = self.config.push_pull_interval
        await trio.sleep(self._rng.random() * base)
        while True:
            peers = self._pick(1, lambda x: x.state == State.ALIVE)
            if peers:
                await self._push_pull(peers[0].address, join=False)
            await trio.sleep(push_pull_interval(base, self._live))

    async def _reconnect_loop(self) -> None:
        """Offer a push-pull to one failed member now and then, so partitions heal."""
        while True:
            await trio.sleep(RECONNECT_INTERVAL * (0.5 + self._rng.random()))
            peers = self._pick(1, lambda x: x.state == State.DEAD)
            if peers:
                self.counters["reconnect_attempts"] += 1
                await self._push_pull(peers[0].address, join=False)

    async def _reap_loop(self) -> None:
        """Forget dead and left members after reap_after."""
        reap_after = self.config.reap_after
        while True:
            await trio.sleep(min(reap_after / 4, 60.0))
            now = trio.current_time()
            for name, member in list(self._members.items()):
                if member.state in (State.DEAD, State.LEFT) and now - member.changed > reap_after:
                    del self._members[name]
                    self.counters["reaped"] += 1


async def _receive_exactly(stream: trio.abc.Stream, size: int) -> bytes:
    buffer = bytearray()
    while len(buffer) < size:
        chunk = await stream.receive_some(min(size - len(buffer), 1 << 16))
        if not chunk:
            raise FrameError("truncated")
        buffer += chunk
    return bytes(buffer)

