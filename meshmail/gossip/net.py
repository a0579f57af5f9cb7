"""The network side of a gossip node: packets, streams, gossip rounds and push-pull.

`Network` reads and answers datagrams and streams through the transport, sealed by a
`Sealer`; it piggybacks queued broadcasts, runs the gossip and push-pull schedules, and
hands every other message to the node. Membership decisions stay in the state machine.
"""

from __future__ import annotations

import collections
import contextlib
import random
from collections.abc import Callable
from typing import Any

import trio

from ..core.address import Address
from . import messages as m
from .config import GossipConfig
from .delegate import Conversation, Delegate
from .frames import FrameError, Sealer
from .keyring import OVERHEAD
from .member import Member
from .messages import State
from .skew import ClockSkew
from .state import Membership
from .timing import push_pull_interval
from .transport import Transport
from .unproven import PROOF_DEADLINE, Slot, UnprovenPool, source_of

#: Streams that proved themselves (their first frame opened) served at once; more are
#: closed at once and counted. Streams still waiting for a first frame have their own pool.
MAX_CONCURRENT_STREAMS = 64
#: How often a failed (not left) member is offered a push-pull, as Serf's reconnect does.
RECONNECT_INTERVAL = 30.0
#: A removed member whose gossip keeps coming is told so at most this often (seconds).
REFUSAL_NOTICE_INTERVAL = 10.0
#: A member that turns alive (new, back from dead, refuted a suspicion) is pushed-pulled at
#: once, unless we exchanged with it less than this long ago (seconds): a member flapping
#: between suspect and alive costs one exchange per interval, not one per flap.
RECOVERY_PUSH_PULL_INTERVAL = 30.0
#: A node starts at most one such push-pull per this many seconds; members that turned
#: alive before it started need none of their own (a heal or a rolling start brings many
#: members back at once, and one exchange with any of them brings their side's state).
RECOVERY_PUSH_PULL_GAP = 1.0
#: Members remembered for that rate limit; past it the oldest are forgotten.
MAX_RECOVERY_ENTRIES = 4096

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Network:
    """Moves the messages of one node; `on_message(msg, source)` gets every packet message
    that is not a Ping (Pings are answered here, over UDP and TCP alike)."""

    def __init__(
        self,
        *,
        transport: Transport,
        sealer: Sealer,
        membership: Membership,
        delegate: Delegate,
        config: GossipConfig,
        rng: random.Random,
        counters: collections.Counter[str],
        on_message: Callable[[Any, Address], None],
    ) -> None:
        self.transport = transport
        self.sealer = sealer
        self.delegate = delegate
        self.config = config
        self.counters = counters
        self._state = membership
        self._rng = rng
        self._on_message = on_message
        self._streams = trio.Semaphore(MAX_CONCURRENT_STREAMS)
        self._unproven = UnprovenPool()
        #: The clock offsets of members whose packets were stale.
        self.skew = ClockSkew()
        self._gossip_now = trio.Event()
        #: Members that turned alive and wait for their push-pull, in order.
        self._recovering: dict[str, None] = {}
        self._recovering_now = trio.Event()
        #: When each member last answered or sent a push-pull, or a recovery push-pull with
        #: it started (trio time).
        self._pushed_pulled: dict[str, float] = {}
        #: Set while a push-pull's member list is merged: members it revives need no push-pull of their own.
        self._merging = False
        #: When each refused member was last told so (trio time), to tell it at most every
        #: REFUSAL_NOTICE_INTERVAL seconds.
        self._told_refused: dict[str, float] = {}
        header = m.Header(m.PROTOCOL_VERSION, 1 << 62, membership.name)
        # Envelope, header and the growth of the message array header past 15 entries.
        self._packet_budget = config.packet_size - OVERHEAD - len(m.pack_wire(header, [])) - 2

    def gossip_soon(self) -> None:
        """Run the next gossip round now rather than at the next tick."""
        self._gossip_now.set()

    # ------------------------------------------------------------ packets

    async def packet_loop(self) -> None:
        while True:
            packet = await self.transport.receive_packet()
            await self.handle_packet(packet.source, packet.data)

    async def handle_packet(self, source: Address, data: bytes) -> None:
        """Open, check and dispatch one datagram; every bad one is dropped and counted."""
        self.counters["packets_in"] += 1
        self.counters["bytes_in"] += len(data)
        if len(data) > 2 * self.config.packet_size:
            self.counters["dropped.oversize"] += 1
            return
        try:
            _, messages = self.sealer.open(data)
        except FrameError as exc:
            self._dropped(exc, source)
            if exc.reason == "removed_member":
                await self._tell_refused(exc.sender, source)
            return
        for msg in messages:
            if isinstance(msg, m.Ping):
                await self._answer_ping(msg, source)
            else:
                self._on_message(msg, source)

    def _dropped(self, exc: FrameError, source: Address) -> None:
        """Count a packet or frame that did not open; a stale one names its sender's clock skew."""
        self.counters["dropped." + exc.reason] += 1
        if exc.offset is not None:
            self.skew.observe(exc.sender, source, exc.offset)

    async def _answer_ping(self, msg: m.Ping, source: Address) -> None:
        if msg.node != self._state.name:
            self.counters["dropped.wrong_node"] += 1
            return
        await self.send(source, [m.Ack(msg.seq)])

    async def _tell_refused(self, name: str, address: Address) -> None:
        """Tell a removed member that it is (it would otherwise never learn: nobody talks to it)."""
        now = trio.current_time()
        if now - self._told_refused.get(name, -REFUSAL_NOTICE_INTERVAL) < REFUSAL_NOTICE_INTERVAL:
            return
        if len(self._told_refused) > 1024:
            self._told_refused.clear()
        self._told_refused[name] = now
        self.counters["refusal_notices"] += 1
        await self.send(address, [m.Refused(name)], piggyback=False)

    async def send(self, address: Address, messages: list[Any], *, piggyback: bool = True) -> None:
        """Send messages in one packet, filled up with queued broadcasts unless piggyback is False."""
        wired = [m.to_wire(x) for x in messages]
        if piggyback:
            used = sum(m.wire_size(w) for w in wired)
            wired += self._state.broadcasts.take(self._packet_budget - used, 0)
        await self._send_wired(address, wired)

    async def _send_wired(self, address: Address, wired: list[list]) -> None:
        data = self.sealer.seal(wired)
        self.counters["packets_out"] += 1
        self.counters["bytes_out"] += len(data)
        if not await self.transport.send_packet(address, data):
            self.counters["send_errors"] += 1

    # ------------------------------------------------------------ gossip

    async def gossip_loop(self) -> None:
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
            broadcasts = self._state.broadcasts
            if not len(broadcasts):
                continue
            targets = self._state.pick(cfg.gossip_nodes, self._state.gossip_reaches)
            for target in targets:
                wired = broadcasts.take(self._packet_budget, 0)
                if not wired:
                    break
                self.counters["gossip_packets"] += 1
                await self._send_wired(target.address, wired)

    # ------------------------------------------------------------ streams

    async def stream_loop(self, nursery: trio.Nursery) -> None:
        """Accept streams and serve each in `nursery`. A stream waits for its first frame
        in the unproven pool (unproven.py), shared fairly between sources and ended when
        no frame opened within the proof deadline; a stream whose first frame opened is
        served in a pool of its own, at most MAX_CONCURRENT_STREAMS at once."""
        while True:
            peer, stream = await self.transport.accept()
            self.counters["streams_in"] += 1
            scope = trio.CancelScope()
            slot, evicted, refusal = self._unproven.admit(source_of(peer[0]), scope)
            if evicted is not None:
                self.counters["dropped.stream_evicted"] += 1
                evicted.holder.cancel()
            if slot is None:
                self.counters["dropped.stream_" + refusal] += 1
                await stream.aclose()
                continue
            nursery.start_soon(self._handle_stream, peer, stream, slot)

    async def _handle_stream(self, peer: Address, stream: trio.abc.Stream, slot: Slot) -> None:
        """Serve one incoming stream, a TCP ping or a push-pull exchange, once it proved itself."""
        async with stream:
            first = None
            try:
                with slot.holder:  # cancelled when the stream is evicted
                    first = await self._first_frame(peer, stream)
            finally:
                self._unproven.release(slot)
            if first is None:
                return
            try:
                self._streams.acquire_nowait()
            except trio.WouldBlock:
                self.counters["dropped.busy"] += 1
                return
            try:
                await self._serve_stream(stream, *first)
            finally:
                self._streams.release()

    async def _first_frame(self, peer: Address, stream: trio.abc.Stream) -> tuple[m.Header, list[Any]] | None:
        """The stream's first frame if it arrives and opens within the proof deadline; None
        (counted) when it does not, or the stream was evicted (cancelled) meanwhile."""
        with trio.move_on_after(min(PROOF_DEADLINE, self.config.tcp_timeout)) as timer:
            try:
                return await self.sealer.read_frame(stream)
            except FrameError as exc:
                self._dropped(exc, peer)
                with contextlib.suppress(*_STREAM_ERRORS):
                    if exc.reason == "removed_member":
                        await self.sealer.write_frame(stream, [m.Refused(exc.sender)])
                    elif exc.offset is not None:
                        # An empty frame carries our clock: the sender learns of the skew too.
                        await self.sealer.write_frame(stream, [])
            except _STREAM_ERRORS:
                self.counters["streams_broken"] += 1
        if timer.cancelled_caught:
            self.counters["dropped.stream_unproven"] += 1
        return None

    async def _serve_stream(self, stream: trio.abc.Stream, header: m.Header, messages: list[Any]) -> None:
        push_pull_from = None
        with trio.move_on_after(self.config.tcp_timeout) as timer:
            try:
                for msg in messages:
                    if isinstance(msg, m.Ping) and msg.node == self._state.name:
                        await self.sealer.write_frame(stream, [m.Ack(msg.seq)])
                    elif isinstance(msg, m.PushPull):
                        await self.sealer.write_frame(stream, [self._local_push_pull(msg.join)])
                        self._note_push_pull(header.sender)
                        self._merge_push_pull(msg)
                        push_pull_from = header.sender
                        if msg.join:
                            self._gossip_now.set()
            except _STREAM_ERRORS:
                self.counters["streams_broken"] += 1
        if timer.cancelled_caught:
            self.counters["streams_timed_out"] += 1
        elif push_pull_from is not None:
            await self._sync(push_pull_from, stream, client=False)

    async def _sync(self, peer: str, stream: trio.abc.Stream, *, client: bool) -> None:
        """Let the delegate exchange replicated state on a push-pull's stream; every
        failure is counted, none escapes (each message has its own tcp_timeout)."""
        conversation = Conversation(self.sealer, stream, self.config.tcp_timeout)
        try:
            if client:
                await self.delegate.sync_client(peer, conversation)
            else:
                await self.delegate.sync_server(peer, conversation)
        except FrameError as exc:
            self.counters["dropped." + exc.reason] += 1
        except trio.TooSlowError:
            self.counters["streams_timed_out"] += 1
        except _STREAM_ERRORS:
            self.counters["streams_broken"] += 1

    # ------------------------------------------------------------ push-pull

    async def push_pull(self, address: Address, *, join: bool) -> bool:
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
                    await self.sealer.write_frame(stream, [self._local_push_pull(join)])
                    header, messages = await self.sealer.read_frame(stream)
            except FrameError as exc:
                self._dropped(exc, address)
                return False
            except (*_STREAM_ERRORS, trio.TooSlowError):
                self.counters["push_pull_failures"] += 1
                return False
            self._note_push_pull(header.sender)
            for msg in messages:
                if isinstance(msg, m.Refused):
                    self._state.refused_by_cluster(msg)
            answer = next((msg for msg in messages if isinstance(msg, m.PushPull)), None)
            if answer is None:
                return False
            self.counters["push_pulls"] += 1
            self._merge_push_pull(answer)
            await self._sync(header.sender, stream, client=True)
        return True

    def _local_push_pull(self, join: bool) -> m.PushPull:
        return m.PushPull(join, self._state.push_pull_states(), self.delegate.local_state(join))

    def _merge_push_pull(self, msg: m.PushPull) -> None:
        self._merging = True
        try:
            self._state.merge(msg.members)
        finally:
            self._merging = False
        if msg.extension:
            self.delegate.merge_remote_state(msg.extension, msg.join)

    def _note_push_pull(self, name: str) -> None:
        self._pushed_pulled.pop(name, None)
        self._pushed_pulled[name] = trio.current_time()
        if len(self._pushed_pulled) > MAX_RECOVERY_ENTRIES:
            del self._pushed_pulled[next(iter(self._pushed_pulled))]

    def _pushed_pulled_lately(self, name: str) -> bool:
        started = self._pushed_pulled.get(name)
        return started is not None and trio.current_time() - started < RECOVERY_PUSH_PULL_INTERVAL

    def _wants_recovery_push_pull(self, member: Member) -> bool:
        return member.state == State.ALIVE and not self._pushed_pulled_lately(member.name)

    def gone(self, name: str) -> None:
        """Member `name` failed or left: what it wrote since is in no exchange we had with it,
        so the next time it turns alive it is pushed-pulled whenever we last exchanged."""
        self._pushed_pulled.pop(name, None)

    def recovered(self, name: str) -> None:
        """Member `name` turned alive: push-pull with it soon, so replicated state agrees at
        once rather than at the next periodic push-pull. Not when a push-pull told us (that
        exchange is the sync), nor when we exchanged with it, or tried to for a recovery,
        less than RECOVERY_PUSH_PULL_INTERVAL ago."""
        if self._merging or self._pushed_pulled_lately(name) or len(self._recovering) >= MAX_RECOVERY_ENTRIES:
            return
        self._recovering[name] = None
        self._recovering_now.set()

    async def recovery_loop(self) -> None:
        """Push-pull with the first member that turned alive and is still alive; the others
        waiting meanwhile are covered by that exchange. At most one per RECOVERY_PUSH_PULL_GAP."""
        while True:
            await self._recovering_now.wait()
            self._recovering_now = trio.Event()
            waiting = [self._state.members.get(name) for name in self._recovering]
            self._recovering.clear()
            member = next((x for x in waiting if x is not None and self._wants_recovery_push_pull(x)), None)
            if member is None:
                continue
            self.counters["recovery_push_pulls"] += 1
            self._note_push_pull(member.name)
            started = trio.current_time()
            await self.push_pull(member.address, join=False)
            await trio.sleep_until(started + RECOVERY_PUSH_PULL_GAP)

    async def push_pull_loop(self) -> None:
        base = self.config.push_pull_interval
        await trio.sleep(self._rng.random() * base)
        while True:
            peers = self._state.pick(1, lambda x: x.state == State.ALIVE)
            if peers:
                await self.push_pull(peers[0].address, join=False)
            await trio.sleep(push_pull_interval(base, self._state.live))

    async def reconnect_loop(self) -> None:
        """Offer a push-pull to one failed member now and then, so partitions heal."""
        while True:
            await trio.sleep(RECONNECT_INTERVAL * (0.5 + self._rng.random()))
            peers = self._state.pick(1, lambda x: x.state == State.DEAD)
            if peers:
                self.counters["reconnect_attempts"] += 1
                await self.push_pull(peers[0].address, join=False)
