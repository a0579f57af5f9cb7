"""Tables for the membership state machine (meshmail.gossip.state.Membership).

Each row starts from a member in a known state and incarnation, applies one message, and
names the state, incarnation, events and queued broadcasts that must follow. The state
machine runs on its own: no sockets, no tasks, time from an injected clock.
"""

from __future__ import annotations

import collections
import random

import attrs
import pytest

from meshmail.gossip import messages as m
from meshmail.gossip.config import GossipConfig
from meshmail.gossip.member import EventKind, Member
from meshmail.gossip.messages import State
from meshmail.gossip.state import Hooks, Membership
from meshmail.gossip.suspicion import Suspicion

ALIVE, SUSPECT, DEAD, LEFT = State.ALIVE, State.SUSPECT, State.DEAD, State.LEFT
JOINED, UPDATED, SUSPECTED, FAILED, LEFT_EVENT = (
    EventKind.JOINED, EventKind.UPDATED, EventKind.SUSPECT, EventKind.FAILED, EventKind.LEFT,
)
CONFIG = GossipConfig()  # LAN: gossip_to_the_dead_time 30 s, suspicion_mult 4
ME = ("10.0.0.1", 7946)
P = ("10.0.0.2", 7946)
ELSEWHERE = ("10.0.0.99", 7946)
#: Three more live members, so with us and p five are live: a suspicion then expects
#: suspicion_mult - 2 = 2 independent confirmations.
OTHERS = {"q": ("10.0.0.3", 7946), "r": ("10.0.0.4", 7946), "s": ("10.0.0.5", 7946)}
WALL = 1_700_000_000.0


@attrs.define
class Clock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


@attrs.define
class Recorder:
    """Records what the state machine asks of its driver."""

    events: list[tuple[EventKind, str, State, int]] = attrs.field(factory=list)
    suspected: list[tuple[str, Suspicion, str]] = attrs.field(factory=list)

    def hooks(self) -> Hooks:
        return Hooks(
            event=lambda kind, x: self.events.append((kind, x.name, x.state, x.incarnation)),
            suspected=lambda x, suspicion, accuser: self.suspected.append((x.name, suspicion, accuser)),
        )

    def clear(self) -> None:
        self.events.clear()
        self.suspected.clear()


@attrs.define
class Node:
    state: Membership
    recorder: Recorder
    clock: Clock

    def queued(self) -> list:
        """The broadcasts queued since the last drain, newest first (and drain them)."""
        messages = [m.from_wire(x) for x in self.state.broadcasts.take(1 << 20, 0)]
        self.drain()
        return messages

    def drain(self) -> None:
        while len(self.state.broadcasts):
            self.state.broadcasts.take(1 << 20, 0)


def alive(incarnation: int, node: str = "p", address: tuple[str, int] = P, meta: bytes = b"") -> m.Alive:
    return m.Alive(incarnation, node, *address, meta)


def suspect(incarnation: int, node: str = "p", source: str = "q") -> m.Suspect:
    return m.Suspect(incarnation, node, source)


def dead(incarnation: int, node: str = "p", source: str = "q") -> m.Dead:
    return m.Dead(incarnation, node, source)


def leave(incarnation: int, node: str = "p") -> m.Dead:
    return m.Dead(incarnation, node, node)


def handle(state: Membership, msg: object) -> None:
    if isinstance(msg, m.Alive):
        state.alive(msg)
    elif isinstance(msg, m.Suspect):
        state.suspect(msg)
    else:
        assert isinstance(msg, m.Dead)
        state.dead(msg)


def node(before: State | None = None, incarnation: int = 0) -> Node:
    """Us at incarnation 1, q, r and s alive, and p `before` at `incarnation` (None: unknown)."""
    clock, recorder = Clock(), Recorder()
    state = Membership(
        "me", config=CONFIG, rng=random.Random(0), counters=collections.Counter(), hooks=recorder.hooks(),
        clock=clock, wall_clock=lambda: WALL + clock(),
    )
    state.start(*ME)
    for name, address in OTHERS.items():
        state.alive(alive(1, name, address))
    if before is not None:
        state.alive(alive(incarnation))
        setup = {SUSPECT: suspect(incarnation), DEAD: dead(incarnation), LEFT: leave(incarnation)}
        if before in setup:
            handle(state, setup[before])
        assert (state.members["p"].state, state.members["p"].incarnation) == (before, incarnation)
    result = Node(state, recorder, clock)
    result.drain()
    recorder.clear()
    return result


def live_count(state: Membership) -> int:
    return sum(x.state in (ALIVE, SUSPECT) for x in state.members.values())


# (id, p before: (state or None when unknown, incarnation), message,
#  p after: (state or None, incarnation), events, broadcasts queued)
ROWS = [
    # An unknown member: only an alive makes it known.
    ("unknown/alive", (None, 0), alive(1), (ALIVE, 1), [(JOINED, "p", ALIVE, 1)], [alive(1)]),
    ("unknown/suspect", (None, 0), suspect(1), (None, 0), [], []),
    ("unknown/dead", (None, 0), dead(1), (None, 0), [], []),
    # Alive at 5.
    ("alive/alive same incarnation", (ALIVE, 5), alive(5), (ALIVE, 5), [], []),
    ("alive/alive stale", (ALIVE, 5), alive(4), (ALIVE, 5), [], []),
    ("alive/alive newer", (ALIVE, 5), alive(6), (ALIVE, 6), [], [alive(6)]),
    ("alive/alive newer meta", (ALIVE, 5), alive(6, meta=b"m"), (ALIVE, 6), [(UPDATED, "p", ALIVE, 6)],
     [alive(6, meta=b"m")]),
    ("alive/alive new address", (ALIVE, 5), alive(6, address=ELSEWHERE), (ALIVE, 5), [], []),
    ("alive/suspect", (ALIVE, 5), suspect(5), (SUSPECT, 5), [(SUSPECTED, "p", SUSPECT, 5)], [suspect(5)]),
    ("alive/suspect stale", (ALIVE, 5), suspect(4), (ALIVE, 5), [], []),
    ("alive/suspect newer", (ALIVE, 5), suspect(7), (SUSPECT, 7), [(SUSPECTED, "p", SUSPECT, 7)], [suspect(7)]),
    ("alive/dead", (ALIVE, 5), dead(5), (DEAD, 5), [(FAILED, "p", DEAD, 5)], [dead(5)]),
    ("alive/dead stale", (ALIVE, 5), dead(4), (ALIVE, 5), [], []),
    ("alive/dead newer", (ALIVE, 5), dead(6), (DEAD, 6), [(FAILED, "p", DEAD, 6)], [dead(6)]),
    ("alive/leave", (ALIVE, 5), leave(5), (LEFT, 5), [(LEFT_EVENT, "p", LEFT, 5)], [leave(5)]),
    # Suspect at 5 (accused by q).
    ("suspect/alive same incarnation", (SUSPECT, 5), alive(5), (SUSPECT, 5), [], []),
    ("suspect/alive refutes", (SUSPECT, 5), alive(6), (ALIVE, 6), [(UPDATED, "p", ALIVE, 6)], [alive(6)]),
    ("suspect/confirmed by another", (SUSPECT, 5), suspect(5, source="r"), (SUSPECT, 5), [],
     [suspect(5, source="r")]),
    ("suspect/confirmed again by the accuser", (SUSPECT, 5), suspect(5), (SUSPECT, 5), [], []),
    ("suspect/suspect stale", (SUSPECT, 5), suspect(4), (SUSPECT, 5), [], []),
    ("suspect/suspect newer", (SUSPECT, 5), suspect(6, source="r"), (SUSPECT, 6), [(SUSPECTED, "p", SUSPECT, 6)],
     [suspect(6, source="r")]),
    ("suspect/dead", (SUSPECT, 5), dead(5), (DEAD, 5), [(FAILED, "p", DEAD, 5)], [dead(5)]),
    ("suspect/leave", (SUSPECT, 5), leave(5), (LEFT, 5), [(LEFT_EVENT, "p", LEFT, 5)], [leave(5)]),
    # Dead at 5 (declared by q), recently: not forgotten yet.
    ("dead/alive same incarnation", (DEAD, 5), alive(5), (DEAD, 5), [], []),
    ("dead/alive newer", (DEAD, 5), alive(6), (ALIVE, 6), [(JOINED, "p", ALIVE, 6)], [alive(6)]),
    ("dead/alive from a new address", (DEAD, 5), alive(1, address=ELSEWHERE), (ALIVE, 1),
     [(JOINED, "p", ALIVE, 1)], [alive(1, address=ELSEWHERE)]),
    ("dead/suspect", (DEAD, 5), suspect(5), (DEAD, 5), [], []),
    ("dead/suspect newer", (DEAD, 5), suspect(6), (DEAD, 5), [], []),
    ("dead/dead again", (DEAD, 5), dead(5, source="r"), (DEAD, 5), [], []),
    ("dead/leave beats dead", (DEAD, 5), leave(5), (LEFT, 5), [(LEFT_EVENT, "p", LEFT, 5)], [leave(5)]),
    # Left at 5.
    ("left/dead does not beat left", (LEFT, 5), dead(5), (LEFT, 5), [], []),
    ("left/dead newer does not beat left", (LEFT, 5), dead(6), (LEFT, 5), [], []),
    ("left/leave again", (LEFT, 5), leave(5), (LEFT, 5), [], []),
    ("left/suspect repeats the leave", (LEFT, 5), suspect(5), (LEFT, 5), [], [leave(5)]),
    ("left/suspect newer", (LEFT, 5), suspect(6), (LEFT, 5), [], []),
    ("left/alive same incarnation", (LEFT, 5), alive(5), (LEFT, 5), [], []),
    ("left/alive newer rejoins", (LEFT, 5), alive(6), (ALIVE, 6), [(JOINED, "p", ALIVE, 6)], [alive(6)]),
]


@pytest.mark.parametrize(
    ("before", "msg", "after", "events", "queued"), [row[1:] for row in ROWS], ids=[row[0] for row in ROWS]
)
def test_transition(before, msg, after, events, queued) -> None:
    n = node(*before)
    handle(n.state, msg)
    member = n.state.members.get("p")
    got = (None, 0) if member is None else (member.state, member.incarnation)
    assert got == after
    assert n.recorder.events == events
    assert n.queued() == queued
    assert n.state.live == live_count(n.state)
    assert (n.state.incarnation, n.state.local.state) == (1, ALIVE)


def test_new_suspicion_starts_a_timer_and_a_confirmation_moves_it() -> None:
    """A suspicion starts at its maximum (6 x the minimum of 4 s for 5 members), asks the
    driver for a timer, and an independent confirmation shortens it (Lifeguard)."""
    n = node(ALIVE, 5)
    n.state.suspect(suspect(5))
    [(name, suspicion, accuser)] = n.recorder.suspected
    assert (name, accuser) == ("p", "q")
    assert (suspicion.minimum, suspicion.maximum, suspicion.expected) == (4.0, 24.0, 2)
    assert suspicion.scope.deadline == n.clock.now + 24.0
    n.state.suspect(suspect(5, source="r"))
    assert n.state.counters["suspicion_confirmations"] == 1
    assert suspicion.scope.deadline == pytest.approx(n.clock.now + 24.0 - 20.0 * 0.6309297535714575)
    assert n.recorder.suspected == [(name, suspicion, accuser)]


def test_suspicion_expiry_declares_dead() -> None:
    n = node(SUSPECT, 5)
    suspicion = n.state.suspicions["p"]
    n.clock.now += 24.0
    n.state.suspicion_expired("p", suspicion)
    assert (n.state.members["p"].state, n.state.members["p"].incarnation) == (DEAD, 5)
    assert n.recorder.events == [(FAILED, "p", DEAD, 5)]
    assert n.queued() == [dead(5, source="me")]
    assert "p" not in n.state.suspicions


def test_refuted_suspicion_expires_harmlessly() -> None:
    """A timer that fires after its suspicion was cleared (refuted) changes nothing."""
    n = node(SUSPECT, 5)
    suspicion = n.state.suspicions["p"]
    n.state.alive(alive(6))
    assert suspicion.scope.cancel_called
    n.recorder.clear()
    n.drain()
    n.state.suspicion_expired("p", suspicion)
    assert n.state.members["p"].state == ALIVE
    assert n.recorder.events == []
    assert n.queued() == []


# (id, message about us, our incarnation after, broadcasts queued): we are at incarnation 1.
SELF_ROWS = [
    ("suspect refuted", suspect(1, node="me"), 2, [alive(2, "me", ME)]),
    ("suspect at a newer incarnation outbid", suspect(3, node="me"), 4, [alive(4, "me", ME)]),
    ("suspect stale", suspect(0, node="me"), 1, []),
    ("dead refuted", dead(1, node="me"), 2, [alive(2, "me", ME)]),
    ("dead at a newer incarnation outbid", dead(7, node="me"), 8, [alive(8, "me", ME)]),
    ("leave in our name refuted", leave(1, node="me"), 2, [alive(2, "me", ME)]),
    ("alive as we are", alive(1, "me", ME), 1, []),
    ("alive stale", alive(0, "me", ME), 1, []),
    ("alive with other meta refuted", alive(1, "me", ME, meta=b"x"), 2, [alive(2, "me", ME)]),
    ("alive newer refuted", alive(5, "me", ME), 6, [alive(6, "me", ME)]),
    ("alive from another address is a conflict", alive(5, "me", ELSEWHERE), 1, []),
]


@pytest.mark.parametrize(("msg", "incarnation", "queued"), [r[1:] for r in SELF_ROWS], ids=[r[0] for r in SELF_ROWS])
def test_news_about_ourselves(msg, incarnation, queued) -> None:
    """We are never suspect or dead in our own view: accusations are outbid with a higher
    incarnation, each refutation raising our health score (Lifeguard)."""
    n = node()
    handle(n.state, msg)
    me = n.state.local
    assert (me.state, me.incarnation, n.state.incarnation) == (ALIVE, incarnation, incarnation)
    assert n.queued() == queued
    assert n.recorder.events == []
    refuted = incarnation > 1
    assert n.state.counters["refutations"] == refuted
    assert n.state.awareness.score == refuted


def test_name_conflict_is_counted() -> None:
    n = node(ALIVE, 5)
    n.state.alive(alive(6, address=ELSEWHERE))
    n.state.alive(alive(5, "me", ELSEWHERE))
    assert n.state.counters["conflicts"] == 2
    assert n.state.members["p"].address == P


def test_leaving_we_stop_refuting() -> None:
    """Once we leave, our own leave comes back without a refutation and alives about us are ignored."""
    n = node()
    message = n.state.leave()
    assert message == leave(1, node="me")
    assert n.queued() == [leave(1, node="me")]
    for msg in (leave(1, node="me"), alive(3, "me", ME), suspect(1, node="me")):
        handle(n.state, msg)
    assert (n.state.local.state, n.state.incarnation) == (LEFT, 1)
    assert n.state.counters["refutations"] == 0
    assert n.state.live == live_count(n.state) == 3


# (id, p before, p after refuse(p), events): refusing is final whatever p was.
REFUSE_ROWS = [
    ("alive", ALIVE, [(LEFT_EVENT, "p", LEFT, 5)]),
    ("suspect", SUSPECT, [(LEFT_EVENT, "p", LEFT, 5)]),
    ("dead", DEAD, [(LEFT_EVENT, "p", LEFT, 5)]),
    ("left", LEFT, []),
]


@pytest.mark.parametrize(("before", "events"), [r[1:] for r in REFUSE_ROWS], ids=[r[0] for r in REFUSE_ROWS])
def test_refused_member_shows_left_and_stays_out(before, events) -> None:
    """A refused member shows as left and no news brings it back, not even after it would
    have been forgotten; a refusal is not gossiped (each node decides from replicated state)."""
    n = node(before, 5)
    n.state.refuse("p")
    n.state.refuse("p")
    assert n.recorder.events == events
    assert "p" not in n.state.suspicions
    assert n.queued() == []
    for elapsed in (0.0, CONFIG.gossip_to_the_dead_time + 1):
        n.clock.now += elapsed
        for msg in (alive(9), alive(1, address=ELSEWHERE), suspect(9), dead(9), suspect(5)):
            handle(n.state, msg)
        assert (n.state.members["p"].state, n.state.members["p"].incarnation) == (LEFT, 5)
    assert n.recorder.events == events
    assert n.queued() == []
    assert "p" not in {x.node for x in n.state.push_pull_states()}


def test_we_cannot_refuse_ourselves() -> None:
    n = node()
    n.state.refuse("me")
    assert n.state.refused == set()
    assert n.state.local.state == ALIVE


# (id, p before, seconds since p's change, alive about p, accepted, gossip still reaches p)
FORGET_ROWS = [
    ("dead, soon: stale incarnation ignored", DEAD, 29.0, 3, False, True),
    ("dead, at the limit: still remembered", DEAD, 30.0, 3, False, False),
    ("dead, forgotten: any incarnation", DEAD, 30.5, 3, True, False),
    ("dead, forgotten: incarnation 1", DEAD, 31.0, 1, True, False),
    ("left, soon: stale incarnation ignored", LEFT, 29.0, 5, False, False),
    ("left, forgotten: any incarnation", LEFT, 31.0, 1, True, False),
    ("alive: never forgotten", ALIVE, 1000.0, 3, False, True),
    ("suspect: never forgotten", SUSPECT, 1000.0, 3, False, True),
]


@pytest.mark.parametrize(
    ("before", "elapsed", "incarnation", "accepted", "reaches"),
    [r[1:] for r in FORGET_ROWS],
    ids=[r[0] for r in FORGET_ROWS],
)
def test_dead_member_forgotten_after_gossip_to_the_dead_time(before, elapsed, incarnation, accepted, reaches) -> None:
    """Gossip goes to a dead member for gossip_to_the_dead_time (30 s) so it can refute;
    after that it is forgotten for protocol purposes and a restart at any incarnation is
    welcome (memberlist drops such nodes). A left member never gets gossip."""
    n = node(before, 5)
    n.clock.now += elapsed
    member = n.state.members["p"]
    assert n.state.gossip_reaches(member) is reaches
    n.state.alive(alive(incarnation))
    if accepted:
        assert (member.state, member.incarnation) == (ALIVE, incarnation)
        assert n.recorder.events == [(JOINED, "p", ALIVE, incarnation)]
        assert n.queued() == [alive(incarnation)]
    else:
        assert (member.state, member.incarnation) == (before, 5)
        assert n.recorder.events == []


def test_push_pull_merge() -> None:
    """A peer's full view: alive and left are taken as such, its "dead" only makes us suspect."""
    n = node(ALIVE, 5)
    n.state.merge([
        m.MemberState("p", *P, 5, int(DEAD), b""),
        m.MemberState("q", *OTHERS["q"], 1, int(LEFT), b""),
        m.MemberState("t", "10.0.0.6", 7946, 2, int(ALIVE), b""),
    ])
    view = {x.name: (x.state, x.incarnation) for x in n.state.members.values()}
    assert view == {"me": (ALIVE, 1), "p": (SUSPECT, 5), "q": (LEFT, 1), "r": (ALIVE, 1), "s": (ALIVE, 1),
                    "t": (ALIVE, 2)}
    assert n.recorder.events == [(SUSPECTED, "p", SUSPECT, 5), (LEFT_EVENT, "q", LEFT, 1), (JOINED, "t", ALIVE, 2)]
    assert n.recorder.suspected[0][2] == "me"


def test_reap_forgets_dead_and_left_members() -> None:
    n = node(DEAD, 5)
    n.state.dead(leave(1, node="q"))
    n.clock.now += CONFIG.reap_after
    n.state.reap(CONFIG.reap_after)
    assert "p" in n.state.members
    n.clock.now += 1
    n.state.reap(CONFIG.reap_after)
    assert sorted(n.state.members) == ["me", "r", "s"]
    assert n.state.counters["reaped"] == 2


def test_update_meta_announces_a_new_incarnation() -> None:
    n = node()
    n.state.update_meta(b"v2")
    assert (n.state.incarnation, n.state.local.meta) == (2, b"v2")
    assert n.queued() == [alive(2, "me", ME, meta=b"v2")]
    with pytest.raises(ValueError, match="limit is 1024"):
        n.state.update_meta(bytes(m.MAX_META + 1))


def test_member_records_the_time_of_each_change() -> None:
    n = node(ALIVE, 5)
    n.clock.now = 250.0
    n.state.suspect(suspect(5))
    member: Member = n.state.members["p"]
    assert (member.changed, member.changed_wall) == (250.0, WALL + 250.0)


@pytest.mark.parametrize(
    ("before", "msg", "recovered"),
    [
        (None, alive(1), True),  # a new member
        (DEAD, alive(6), True),
        (LEFT, alive(6), True),
        (SUSPECT, alive(6), True),  # a refuted suspicion
        (ALIVE, alive(6), False),  # news, but it never stopped being alive
        (ALIVE, alive(6, meta=b"x"), False),
        (SUSPECT, suspect(6), False),
    ],
)
def test_recovered_hook_fires_when_another_member_turns_alive(before, msg, recovered) -> None:
    """The driver pushes-pulls with a member that turned alive; the hook says when."""
    n = node(before, 5)
    seen: list[str] = []
    n.state.hooks.recovered = lambda x: seen.append(x.name)
    handle(n.state, msg)
    assert seen == (["p"] if recovered else [])
