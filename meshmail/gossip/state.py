"""The membership state machine: this node's member table and the rules that change it.

`Membership` applies alive, suspect and dead news (memberlist's aliveNode, suspectNode and
deadNode) with incarnations, refutation and refused members. It queues broadcasts and
reports events through `Hooks`; it opens no socket, starts no task, and reads injected clocks.
"""

from __future__ import annotations

import collections
import logging
import random
import time
from collections.abc import Callable, Sequence

import attrs
import trio

from . import messages as m
from .awareness import Awareness
from .broadcast import BroadcastQueue
from .config import GossipConfig
from .member import EventKind, Member
from .messages import State
from .suspicion import Suspicion
from .timing import retransmit_limit, suspicion_min

log = logging.getLogger("meshmail.gossip")

_LIVE = (State.ALIVE, State.SUSPECT)
_GONE = (State.DEAD, State.LEFT)


def _nothing(*args: object) -> None:
    return None


@attrs.define
class Hooks:
    """What the state machine asks of the node that drives it; by default, nothing.

    `changed()` when membership changed (gossip now, not at the next tick);
    `event(kind, member)` for the subscribers; `suspected(member, suspicion, accuser)` when
    a suspicion starts, so its timer runs (and the accusation is checked by a probe);
    `recovered(member)` when another member turns alive: new, back from dead or left, or
    no longer suspect.
    """

    changed: Callable[[], None] = _nothing
    event: Callable[[EventKind, Member], None] = _nothing
    suspected: Callable[[Member, Suspicion, str], None] = _nothing
    recovered: Callable[[Member], None] = _nothing


class Membership:
    """The member table of node `name`, this node included once `start` has run.

    Args:
        config: timing settings (suspicion, gossip to the dead, retransmits).
        rng: randomness for the probe order and random picks.
        counters: where conflicts, suspicions, refutations and such are counted.
        hooks: the driver's callbacks.
        meta: this node's metadata.
        clock: monotonic seconds (trio's clock); wall_clock: Unix seconds for status.
    """

    def __init__(
        self,
        name: str,
        *,
        config: GossipConfig,
        rng: random.Random,
        counters: collections.Counter[str],
        hooks: Hooks | None = None,
        meta: bytes = b"",
        clock: Callable[[], float] = trio.current_time,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.config = config
        self.counters = counters
        self.hooks = hooks or Hooks()
        self.meta = meta
        self._rng = rng
        self._now = clock
        self._wall = wall_clock
        self.awareness = Awareness(config.awareness_max_multiplier)
        self.broadcasts = BroadcastQueue(lambda: retransmit_limit(config.retransmit_mult, self.live))
        self.members: dict[str, Member] = {}
        #: Members alive or suspect, self included.
        self.live = 0
        self.incarnation = 0
        self.suspicions: dict[str, Suspicion] = {}
        self.leaving = False
        #: Members taken out of the cluster (`meshmail remove`): their news is dropped.
        self.refused: set[str] = set()
        #: Set once a member told us that we were removed from the cluster.
        self.removed = False
        self._probe_order: list[str] = []
        self._probe_index = 0

    # ----------------------------------------------------------------- this node

    @property
    def running(self) -> bool:
        return self.name in self.members

    @property
    def local(self) -> Member:
        return self.members[self.name]

    def start(self, host: str, port: int) -> None:
        """Enter our own table, alive at incarnation 1, and queue the news."""
        self.incarnation = 1
        self.members[self.name] = Member(self.name, host, port, self.meta, 1, State.ALIVE, self._now(), self._wall())
        self.live = 1
        # Our own alive waits in the queue until the first members are known, so a
        # joining node tells others about itself directly instead of only through its seed.
        self._announce(1)

    def update_meta(self, meta: bytes) -> None:
        """Change this node's metadata and, once started, announce it at a new incarnation."""
        if len(meta) > m.MAX_META:
            raise ValueError(f"node metadata is {len(meta)} bytes; the limit is {m.MAX_META}")
        self.meta = meta
        if self.running:
            self._announce(self.incarnation + 1)

    def leave(self, sent: trio.Event | None = None) -> m.Dead:
        """Mark this node left and queue the news; return it (to send directly as well).
        `sent` is set once the queued news has gone out."""
        self.leaving = True
        me = self.local
        message = m.Dead(self.incarnation, self.name, self.name)
        self._set_state(me, State.LEFT)
        self.broadcasts.queue(self.name, m.to_wire(message), sent=sent)
        return message

    def refused_by_cluster(self, msg: m.Refused) -> None:
        """A member says `msg.node` was removed; when that is us, remember it."""
        if msg.node == self.name and not self.removed:
            self.removed = True
            self.counters["removed_from_cluster"] = 1
            log.error("a member says this node was removed from the cluster (meshmail remove): it is refused")

    # ------------------------------------------------------------ news

    def alive(self, msg: m.Alive) -> None:
        """Handle news that a member is alive (memberlist's aliveNode)."""
        if self.leaving and msg.node == self.name or msg.node in self.refused:
            return
        member = self.members.get(msg.node)
        if member is not None and member.address != (msg.host, msg.port) and self._conflicts(msg, member):
            return
        if msg.node == self.name:
            if msg.incarnation > self.incarnation or (msg.incarnation == self.incarnation and msg.meta != self.meta):
                self._refute(msg.incarnation)
            return
        if member is not None and not self._starts_over(msg, member) and msg.incarnation <= member.incarnation:
            return
        self._accept_alive(msg, member)

    def _conflicts(self, msg: m.Alive, member: Member) -> bool:
        """Whether an alive from a new address is a name conflict (counted and logged):
        it is unless the member was dead or left, and never about ourselves."""
        if member.state in _GONE and msg.node != self.name:
            return False
        self.counters["conflicts"] += 1
        log.warning(
            "name conflict: %s claimed by %s:%d while %s:%d is %s; refused",
            msg.node,
            msg.host,
            msg.port,
            member.host,
            member.port,
            member.state.name.lower(),
        )
        return True

    def _starts_over(self, msg: m.Alive, member: Member) -> bool:
        """Whether an alive is welcome at any incarnation: the member was dead or left and
        comes back from a new address, or was forgotten for protocol purposes once gossip
        to the dead stopped (as memberlist drops such nodes)."""
        if member.address != (msg.host, msg.port):
            return True
        return member.state in _GONE and self._now() - member.changed > self.config.gossip_to_the_dead_time

    def _accept_alive(self, msg: m.Alive, member: Member | None) -> None:
        self._clear_suspicion(msg.node)
        self.broadcasts.queue(msg.node, m.to_wire(msg))
        if member is None:
            now, wall = self._now(), self._wall()
            member = Member(msg.node, msg.host, msg.port, msg.meta, msg.incarnation, State.DEAD, now, wall)
            self.members[msg.node] = member
            self._probe_order.insert(self._rng.randint(0, len(self._probe_order)), msg.node)
        elif member.state in _GONE and msg.node not in self._probe_order:
            self._probe_order.insert(self._rng.randint(0, len(self._probe_order)), msg.node)
        old_state, old_meta = member.state, member.meta
        member.host, member.port, member.meta, member.incarnation = msg.host, msg.port, msg.meta, msg.incarnation
        if old_state != State.ALIVE:
            self._set_state(member, State.ALIVE)
            self.hooks.recovered(member)
        if old_state in _GONE:
            self.hooks.event(EventKind.JOINED, member)
        elif old_meta != msg.meta or old_state == State.SUSPECT:
            self.hooks.event(EventKind.UPDATED, member)

    def suspect(self, msg: m.Suspect) -> None:
        """Handle an accusation (memberlist's suspectNode), with Lifeguard confirmations."""
        member = self.members.get(msg.node)
        if member is None or msg.incarnation < member.incarnation or msg.node in self.refused:
            return
        if member.state == State.LEFT and msg.incarnation == member.incarnation:
            # The accuser missed the leave: tell the cluster again rather than let the
            # member end up "dead" somewhere.
            self.broadcasts.queue(msg.node, m.to_wire(m.Dead(member.incarnation, msg.node, msg.node)))
            return
        suspicion = self.suspicions.get(msg.node)
        if suspicion is not None and msg.incarnation == member.incarnation:
            if suspicion.confirm(msg.source):
                self.counters["suspicion_confirmations"] += 1
                self.broadcasts.queue(msg.node, m.to_wire(msg))
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
        self._start_suspicion(msg, member)

    def _start_suspicion(self, msg: m.Suspect, member: Member) -> None:
        self.counters["suspicions"] += 1
        self.broadcasts.queue(msg.node, m.to_wire(msg))
        member.incarnation = msg.incarnation
        self._set_state(member, State.SUSPECT)
        cfg = self.config
        expected = cfg.suspicion_mult - 2
        if self.live - 2 < expected:
            expected = 0
        minimum = suspicion_min(cfg.suspicion_mult, self.live, cfg.probe_interval)
        suspicion = Suspicion(member.changed, minimum, minimum * cfg.suspicion_max_timeout_mult, expected, {msg.source})
        self.suspicions[msg.node] = suspicion
        self.hooks.suspected(member, suspicion, msg.source)
        self.hooks.event(EventKind.SUSPECT, member)

    def suspicion_expired(self, name: str, suspicion: Suspicion) -> None:
        """The timer of `suspicion` ran out: unless refuted or settled meanwhile, the member is dead."""
        if self.suspicions.get(name) is not suspicion:
            return
        member = self.members[name]
        log.info("suspicion of %s timed out with %d confirmation(s)", name, suspicion.confirmations)
        self.dead(m.Dead(member.incarnation, name, self.name))

    def dead(self, msg: m.Dead) -> None:
        """Handle a failure or a leave (memberlist's deadNode)."""
        member = self.members.get(msg.node)
        if member is None or msg.incarnation < member.incarnation:
            return
        self._clear_suspicion(msg.node)
        if member.state == State.LEFT or (member.state == State.DEAD and not msg.is_leave):
            return
        if msg.node == self.name and not self.leaving:
            self._refute(msg.incarnation)
            return
        self.broadcasts.queue(msg.node, m.to_wire(msg))
        member.incarnation = msg.incarnation
        self._set_state(member, State.LEFT if msg.is_leave else State.DEAD)
        self.counters["left" if msg.is_leave else "failed"] += 1
        self.hooks.event(EventKind.LEFT if msg.is_leave else EventKind.FAILED, member)

    def merge(self, remote: Sequence[m.MemberState]) -> None:
        """Fold a peer's full view into ours; its "dead" only makes us suspect (memberlist)."""
        for s in remote:
            if s.state == State.ALIVE:
                self.alive(m.Alive(s.incarnation, s.node, s.host, s.port, s.meta))
            elif s.state == State.LEFT:
                self.dead(m.Dead(s.incarnation, s.node, s.node))
            else:
                self.suspect(m.Suspect(s.incarnation, s.node, self.name))

    def refuse(self, name: str) -> None:
        """Take member `name` out for good: its news is ignored from now on and it shows as left."""
        if name == self.name or name in self.refused:
            return
        self.refused.add(name)
        self._clear_suspicion(name)
        member = self.members.get(name)
        if member is not None and member.state != State.LEFT:
            self._set_state(member, State.LEFT)
            self.hooks.event(EventKind.LEFT, member)

    def reap(self, reap_after: float) -> None:
        """Forget the members dead or left for longer than reap_after."""
        now = self._now()
        for name, member in list(self.members.items()):
            if member.state in _GONE and now - member.changed > reap_after:
                del self.members[name]
                self.counters["reaped"] += 1

    def _refute(self, accused: int) -> None:
        """Someone thinks we are suspect or dead: outbid their incarnation and say we are alive."""
        self.counters["refutations"] += 1
        self.awareness.apply(1)
        self._announce(max(self.incarnation, accused) + 1)

    def _announce(self, incarnation: int) -> None:
        me = self.local
        self.incarnation = me.incarnation = incarnation
        me.meta = self.meta
        self.broadcasts.queue(self.name, m.to_wire(m.Alive(incarnation, self.name, me.host, me.port, self.meta)))

    def _set_state(self, member: Member, state: State) -> None:
        live_before = member.state in _LIVE
        live_after = state in _LIVE
        self.live += live_after - live_before
        # A change of membership is news: gossip it now, not at the next tick.
        self.hooks.changed()
        member.state = state
        member.changed = self._now()
        member.changed_wall = self._wall()

    def _clear_suspicion(self, name: str) -> None:
        suspicion = self.suspicions.pop(name, None)
        if suspicion is not None:
            suspicion.scope.cancel()

    # ------------------------------------------------------------ choosing members

    def pick(self, k: int, wanted: Callable[[Member], bool]) -> list[Member]:
        """Up to k random other members for which wanted() holds."""
        candidates = [x for x in self.members.values() if x.name != self.name and wanted(x)]
        return self._rng.sample(candidates, min(k, len(candidates)))

    def gossip_reaches(self, member: Member) -> bool:
        """Gossip goes to live members and, for a while, to dead ones so they can refute;
        never to members that left."""
        if member.state in _LIVE:
            return True
        return member.state == State.DEAD and self._now() - member.changed < self.config.gossip_to_the_dead_time

    def next_probe_target(self) -> Member | None:
        """The next live member in a shuffled round-robin (new members are inserted at random)."""
        for _ in range(len(self._probe_order) + 1):
            if self._probe_index >= len(self._probe_order):
                self._probe_order = [name for name, x in self.members.items() if name != self.name and x.state in _LIVE]
                self._rng.shuffle(self._probe_order)
                self._probe_index = 0
                if not self._probe_order:
                    return None
            member = self.members.get(self._probe_order[self._probe_index])
            self._probe_index += 1
            if member is not None and member.state in _LIVE:
                return member
        return None

    def push_pull_states(self) -> list[m.MemberState]:
        """Our full view for a push-pull exchange."""
        # Refused members are left out: a refusal is this node's decision (from the replicated
        # state), and listed as "left" it would read to the peer as a leave in their name.
        return [
            m.MemberState(x.name, x.host, x.port, x.incarnation, int(x.state), x.meta)
            for x in self.members.values()
            if x.name not in self.refused
        ]
