"""routing.Router: every outcome of resolve, endpoint parsing and caching, no raising on any text."""

from __future__ import annotations

import attrs
import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshmail.gossip.member import MemberInfo
from meshmail.gossip.messages import State
from meshmail.nodemeta import SERVICES, NodeMeta
from meshmail.routing import (
    INVALID_ADDRESS,
    NO_ENDPOINT,
    NORMALIZED_CACHE,
    REASONS,
    SLAVE_DOWN,
    SLAVE_UNKNOWN,
    UNKNOWN_DOMAIN,
    NoRoute,
    Route,
    Router,
    _normalize,
)
from meshmail.state.records import AddressOverride, DomainRoute
from meshmail.state.replica import ClusterState


class DictState:
    """A StateView over two dicts: the test double of the cluster state."""

    def __init__(self) -> None:
        self.domains: dict[str, DomainRoute] = {}
        self.overrides: dict[str, AddressOverride] = {}

    def domain(self, name: str) -> DomainRoute | None:
        return self.domains.get(name)

    def override(self, address: str) -> AddressOverride | None:
        return self.overrides.get(address)


def member(name: str, state: State = State.ALIVE, incarnation: int = 1, **endpoints: str) -> MemberInfo:
    meta = NodeMeta(role="slave", endpoints=endpoints).encode()
    return MemberInfo(name, "192.0.2.1", 7946, meta, incarnation, state, 0.0)


@pytest.fixture
def world() -> tuple[DictState, dict[str, MemberInfo], Router]:
    state = DictState()
    state.domains["example.com"] = DomainRoute(slave="s1", source="slave")
    state.domains["xn--bcher-kva.example"] = DomainRoute(slave="s1", source="admin")
    state.domains["ghost.example"] = DomainRoute(slave="gone", source="admin")
    state.domains["suspect.example"] = DomainRoute(slave="s2", source="slave")
    state.domains["dead.example"] = DomainRoute(slave="s3", source="slave")
    state.domains["left.example"] = DomainRoute(slave="s4", source="slave")
    state.domains["bare.example"] = DomainRoute(slave="s5", source="slave")
    state.overrides["moved@example.com"] = AddressOverride(slave="s2")
    members = {
        "s1": member("s1", imap="imap1.example:143", lmtp="[2001:db8::1]:24"),
        "s2": member("s2", State.SUSPECT, imap="10.0.0.2:143"),
        "s3": member("s3", State.DEAD, imap="10.0.0.3:143"),
        "s4": member("s4", State.LEFT, imap="10.0.0.4:143"),
        "s5": member("s5"),
    }
    return state, members, Router(state, members)


@pytest.mark.parametrize(
    ("address", "protocol", "expected"),
    [
        ("alice@example.com", "imap", Route("s1", ("imap1.example", 143), State.ALIVE)),
        ("Alice@EXAMPLE.com.", "imap", Route("s1", ("imap1.example", 143), State.ALIVE)),
        ('"alice"@example.com', "lmtp", Route("s1", ("2001:db8::1", 24), State.ALIVE)),
        ("bob@bücher.example", "imap", Route("s1", ("imap1.example", 143), State.ALIVE)),
        ("moved@example.com", "imap", Route("s2", ("10.0.0.2", 143), State.SUSPECT)),
        ("x@suspect.example", "imap", Route("s2", ("10.0.0.2", 143), State.SUSPECT)),
        ("no-at-sign", "imap", INVALID_ADDRESS),
        ("a@localhost", "imap", INVALID_ADDRESS),
        ("a b@example.com", "imap", INVALID_ADDRESS),
        ("a@" + "x" * 400 + ".com", "imap", INVALID_ADDRESS),
        ("a@unknown.example", "imap", UNKNOWN_DOMAIN),
        ("a@ghost.example", "imap", SLAVE_UNKNOWN),
        ("a@dead.example", "imap", SLAVE_DOWN),
        ("a@left.example", "imap", SLAVE_DOWN),
        ("a@bare.example", "imap", NO_ENDPOINT),
        ("alice@example.com", "pop3", NO_ENDPOINT),
    ],
)
def test_resolve_outcomes(world, address, protocol, expected):
    result = world[2].resolve(address, protocol)
    if isinstance(expected, Route):
        assert result == expected
    else:
        assert isinstance(result, NoRoute)
        assert result.reason == expected
        assert result.detail


def test_override_beats_domain(world):
    state, members, router = world
    assert router.resolve("moved@example.com", "imap").slave == "s2"
    assert router.resolve("other@example.com", "imap").slave == "s1"
    state.overrides["other@example.com"] = AddressOverride(slave="s3")
    assert router.resolve("other@example.com", "imap").reason == SLAVE_DOWN


def test_override_applies_without_a_domain_entry(world):
    state, members, router = world
    state.overrides["solo@nowhere.example"] = AddressOverride(slave="s1")
    assert router.resolve("solo@nowhere.example", "imap").slave == "s1"


def test_override_is_by_normalized_address(world):
    # The local part keeps its case (only the slave interprets it); the domain does not.
    state, members, router = world
    assert router.resolve("moved@EXAMPLE.COM", "imap").slave == "s2"
    assert router.resolve('"moved"@example.com', "imap").slave == "s2"
    assert router.resolve("Moved@example.com", "imap").slave == "s1"


@pytest.mark.parametrize("state", list(State))
def test_only_alive_and_suspect_route(world, state):
    states, members, router = world
    members["s1"] = attrs.evolve(members["s1"], state=state)
    result = router.resolve("a@example.com", "imap")
    if state in (State.ALIVE, State.SUSPECT):
        assert result == Route("s1", ("imap1.example", 143), state)
    else:
        assert result == NoRoute(SLAVE_DOWN, f"slave s1 of a@example.com is {state.name.lower()}", "s1")


def test_members_as_a_function(world):
    state, members, _ = world
    calls = []

    def lookup(name):
        calls.append(name)
        return members.get(name)

    router = Router(state, lookup)
    assert router.resolve("a@example.com", "imap").slave == "s1"
    assert router.resolve("a@ghost.example", "imap").reason == SLAVE_UNKNOWN
    assert calls == ["s1", "gone"]


def test_endpoint_cache_follows_incarnation(world):
    state, members, router = world
    assert router.resolve("a@example.com", "imap").endpoint == ("imap1.example", 143)
    moved = member("s1", incarnation=2, imap="[::1]:1143")
    members["s1"] = moved
    assert router.resolve("a@example.com", "imap").endpoint == ("::1", 1143)
    assert router.resolve("a@example.com", "lmtp").reason == NO_ENDPOINT


def test_endpoint_cache_follows_meta_even_at_the_same_incarnation(world):
    state, members, router = world
    router.resolve("a@example.com", "imap")
    members["s1"] = member("s1", incarnation=1, imap="imap2.example:993")
    assert router.resolve("a@example.com", "imap").endpoint == ("imap2.example", 993)


def test_endpoints_are_parsed_once_per_incarnation(world, monkeypatch):
    state, members, router = world
    parsed = []
    original = NodeMeta.decode

    def counting(data):
        parsed.append(data)
        return original(data)

    monkeypatch.setattr(NodeMeta, "decode", counting)
    for _ in range(3):
        router.resolve("a@example.com", "imap")
        router.resolve("a@example.com", "lmtp")
    assert parsed == [members["s1"].meta]
    members["s1"] = attrs.evolve(members["s1"], incarnation=2)
    router.resolve("a@example.com", "imap")
    assert parsed == [members["s1"].meta] * 2


def test_a_vanished_slave_leaves_no_cached_endpoints(world):
    state, members, router = world
    router.resolve("a@example.com", "imap")
    del members["s1"]
    assert router.resolve("a@example.com", "imap").reason == SLAVE_UNKNOWN
    assert "s1" not in router._endpoints


def test_unreadable_meta_means_no_endpoint(world):
    state, members, router = world
    members["s1"] = attrs.evolve(members["s1"], meta=b"\xc1 not msgpack", incarnation=9)
    assert router.resolve("a@example.com", "imap").reason == NO_ENDPOINT


def test_an_unbracketed_ipv6_endpoint_is_refused_everywhere(world):
    # One address rule: NodeMeta refuses "::1:143" when built, and metadata carrying it from
    # the wire decodes to no endpoints, so routing never guesses which port was meant.
    state, members, router = world
    with pytest.raises(ValueError, match="brackets"):
        member("s1", incarnation=2, imap="::1:143")
    meta = msgpack.packb({"role": "slave", "endpoints": {"imap": ["::1:143", "plain", "none", True]}, "tags": {}})
    members["s1"] = MemberInfo("s1", "192.0.2.1", 7946, meta, 2, State.ALIVE, 0.0)
    result = router.resolve("a@example.com", "imap")
    assert result.reason == NO_ENDPOINT


@pytest.mark.parametrize("protocol", ["IMAP", "ftp", "", "imaps"])
def test_unknown_protocol_raises(world, protocol):
    with pytest.raises(ValueError, match="unknown protocol"):
        world[2].resolve("a@example.com", protocol)


def test_over_long_input_is_not_cached(world):
    before = _normalize.cache_info().currsize
    assert world[2].resolve("a" * 100_000 + "@example.com", "imap").reason == INVALID_ADDRESS
    assert _normalize.cache_info().currsize == before
    assert _normalize.cache_info().maxsize == NORMALIZED_CACHE


@given(address=st.one_of(st.text(max_size=400), st.emails()), protocol=st.sampled_from(SERVICES))
def test_resolve_never_raises(address, protocol):
    state = DictState()
    state.domains["example.com"] = DomainRoute(slave="s1", source="slave")
    router = Router(state, {"s1": member("s1", imap="[::1]:143")})
    for text in (address, address + "@example.com", "a@" + address, address + "@" + address):
        result = router.resolve(text, protocol)
        assert isinstance(result, (Route, NoRoute))
        if isinstance(result, NoRoute):
            assert result.reason in REASONS


def test_routes_from_a_reopened_cluster_state(tmp_path) -> None:
    """The real ClusterState is a StateView: assignments and overrides written, the state
    closed and opened again with no peers, and resolve answers from disk alone."""
    clock = iter(range(1_700_000_000_000, 1_700_000_100_000, 10))
    with ClusterState.open(tmp_path, "m1", lambda: next(clock)) as state:
        state.assign_domain("Bücher.Example.", "s1")
        state.override_address("moved@bücher.example", "s2")
    members = {"s1": member("s1", imap="192.0.2.10:143"), "s2": member("s2", imap="[2001:db8::2]:993")}
    with ClusterState.open(tmp_path, "m1", lambda: next(clock)) as state:
        router = Router(state, members)
        assert router.resolve("user@BÜCHER.example", "imap") == Route("s1", ("192.0.2.10", 143), State.ALIVE)
        assert router.resolve("moved@bücher.example", "imap") == Route("s2", ("2001:db8::2", 993), State.ALIVE)
        assert router.resolve("user@unknown.example", "imap").reason == UNKNOWN_DOMAIN
