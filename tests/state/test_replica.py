"""ClusterState: persistence across reopen, torn journal tails, bad remote input, claims and conflicts, GC,
resync after a long absence, and convergence of replicas through the anti-entropy messages."""

import os

import msgpack
import pytest

from meshmail.state.hlc import Timestamp
from meshmail.state.journal import LOG_NAME
from meshmail.state.lww import Entry, chunks, encode_entries
from meshmail.state.names import InvalidName
from meshmail.state.records import (
    AddressOverride,
    DomainClaim,
    DomainRoute,
    RemovedNode,
)
from meshmail.state.replica import DAY_MS, MAX_MESSAGE_BYTES, ClusterState, SyncError

START_MS = 1_700_000_000_000


class Node:
    """A ClusterState with a physical clock the test sets."""

    def __init__(self, directory, name: str, ms: int = START_MS, **kwargs) -> None:
        self.directory = directory
        self.name = name
        self.ms = ms
        self.kwargs = {"fsync": False, **kwargs}
        self.state = ClusterState.open(directory, name, lambda: self.ms, **self.kwargs)

    def reopen(self) -> ClusterState:
        self.state.close()
        self.state = ClusterState.open(self.directory, self.name, lambda: self.ms, **self.kwargs)
        return self.state


@pytest.fixture
def node(tmp_path):
    n = Node(tmp_path / "m1", "m1")
    yield n
    n.state.close()


def entries(state: ClusterState) -> dict:
    return {e.key: e for e in state.map.entries_in()}


def sync(a: ClusterState, b: ClusterState) -> int:
    """One anti-entropy exchange started by a; returns the bytes moved."""
    offer = a.sync_offer()
    answer = b.sync_answer(offer)
    request = a.sync_request(answer)
    moved = len(offer) + len(answer) + len(request)
    for batch in list(a.sync_entries(answer)):
        moved += len(batch)
        assert not b.apply(batch).rejected
    for batch in list(b.sync_entries(request)):
        moved += len(batch)
        assert not a.apply(batch).rejected
    return moved


def test_writes_survive_reopen_and_route_from_disk(node):
    s = node.state
    entry = s.assign_domain("Example.COM.", "slave-a")
    assert entry.key == "domain/example.com" and entry.value == DomainRoute("slave-a", "admin")
    s.assign_domain("bücher.example", "slave-b", source="slave")
    s.assign_domain("gone.org", "slave-a")
    assert s.unassign_domain("gone.org").is_tombstone
    assert s.unassign_domain("never.org") is None
    s.override_address("John@Example.com", "slave-c")
    s.override_address("x@example.com", "slave-c")
    assert s.clear_override("x@example.com").is_tombstone
    before = entries(s)
    s = node.reopen()
    assert entries(s) == before
    assert s.domain("example.com") == DomainRoute("slave-a", "admin")
    assert s.domain("xn--bcher-kva.example") == DomainRoute("slave-b", "slave")
    assert s.domain("gone.org") is None and s.domain("Example.com") is None
    assert s.override("John@example.com") == AddressOverride("slave-c")
    assert s.override("x@example.com") is None
    assert (s.live, s.tombstones) == (3, 2)
    assert sorted(s.domains()) == [
        ("example.com", s.domain("example.com")),
        ("xn--bcher-kva.example", s.domain("xn--bcher-kva.example")),
    ]
    assert [d for d, _ in s.domains(slave="slave-b")] == ["xn--bcher-kva.example"]


def test_republishing_the_same_route_writes_nothing(node):
    first = node.state.assign_domain("a.org", "s", source="slave")
    size = node.state._journal.log_size()
    assert node.state.assign_domain("A.org", "s", source="slave") == first
    assert node.state._journal.log_size() == size
    assert node.state.assign_domain("a.org", "s").value.source == "admin"


def test_unreadable_and_unknown_journal_records_are_counted_or_ignored(node):
    node.state.assign_domain("a.org", "s")
    node.state._journal.append_many([b"\xc1", msgpack.packb({"t": "from-a-newer-version", "x": 1}), b"\x01"])
    s = node.reopen()
    assert s.unreadable_records == 2
    assert s.domain("a.org") == DomainRoute("s", "admin")


def test_invalid_names_are_refused_with_the_reason(node):
    with pytest.raises(InvalidName, match="single label"):
        node.state.assign_domain("localhost", "s")
    with pytest.raises(InvalidName):
        node.state.override_address("no-at-sign", "s")
    assert node.state.live == 0


def test_clock_is_monotonic_across_reopen_when_physical_time_goes_back(node):
    first = node.state.assign_domain("a.org", "s").ts
    node.ms -= 3_600_000
    s = node.reopen()
    second = s.assign_domain("a.org", "t").ts
    assert second > first
    assert s.domain("a.org").slave == "t"
    node.ms -= 1000
    assert node.reopen().clock.now() > second


def test_clock_floor_includes_observed_remote_timestamps(node):
    remote = Entry("domain/r.org", DomainRoute("s", "slave"), Timestamp(START_MS + 50_000, 7, "m9"))
    assert node.state.apply(encode_entries([remote])).applied == 1
    s = node.reopen()
    assert s.assign_domain("r.org", "local").ts > remote.ts


def test_torn_journal_tail_loses_at_most_the_last_record(tmp_path):
    directory = tmp_path / "m1"
    n = Node(directory, "m1")
    n.state.assign_domain("a.org", "s1")
    n.state.assign_domain("b.org", "s2")
    before_last = entries(n.state)
    log = directory / LOG_NAME
    last_start = log.stat().st_size
    n.state.assign_domain("c.org", "s3")
    after_last = entries(n.state)
    n.state.close()
    data = log.read_bytes()
    for cut in range(last_start, len(data) + 1):
        log.write_bytes(data[:cut])
        s = ClusterState.open(directory, "m1", lambda: n.ms, fsync=False)
        try:
            assert entries(s) == (after_last if cut == len(data) else before_last)
            assert s.assign_domain("d.org", "s4").ts > after_last["domain/b.org"].ts
        finally:
            s.close()


def batch_of(*items) -> bytes:
    return msgpack.packb({"v": 1, "e": list(items)})


def good(key="domain/ok.org", ms=START_MS, node="m2"):
    return [key, ms, 0, node, {"slave": "s1", "source": "slave"}]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        "text",
        None,
        12,
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"v": 2, "e": []}),
        msgpack.packb({"v": 1, "e": "x"}),
        batch_of(good(), [1, 2, 3, 4, 5]),
        batch_of(good(), ["domain/x.org", "soon", 0, "m2", None]),
        batch_of(good(), ["domain/x.org", START_MS, -1, "m2", None]),
        batch_of(good(), ["domain/x.org", START_MS, 0, "", None]),
        batch_of(good(), ["domain/x.org", START_MS, 0, "m2", {"slave": 5, "source": "slave"}]),
        batch_of(good(), ["domain/x.org", START_MS, 0, "m2", {"slave": "s", "source": "robot"}]),
        batch_of(good(), ["domain/x.org", START_MS, 0, "m2", [1]]),
        # A huge count in the array header with no items behind it.
        b"\x82\xa1v\x01\xa1e\xdd\xff\xff\xff\xff",
        b"\x82\xa1v\x01\xa1e\xdd\x00\x10\x00\x00" + msgpack.packb(good()) * 3,
        b"x" * (MAX_MESSAGE_BYTES + 1),
    ],
)
def test_bad_batches_are_rejected_whole_and_counted(node, data):
    result = node.state.apply(data)
    assert result.applied == 0 and result.rejected == {"bad_batch": 1} and result.error
    assert node.state.live == 0 and node.state.domain("ok.org") is None


def test_invalid_names_and_future_timestamps_are_rejected_per_entry(node):
    data = batch_of(
        good("domain/Upper.org"),
        good("domain/localhost"),
        good("domain/example.com."),
        good("address/a@B.org"),
        good("domain/future.org", ms=START_MS + 61_000),
        good("domain/ok.org"),
        [*good("domain/ok2.org"), "future field"],
        ["newns/thing", START_MS, 0, "m2", {"x": 1}],
    )
    result = node.state.apply(data)
    assert result.rejected == {"invalid_name": 4, "future_timestamp": 1}
    assert (result.applied, result.stale, result.skipped) == (2, 0, 1)
    assert node.state.domain("ok.org") == DomainRoute("s1", "slave")
    assert node.state.clock.high_water.wall_ms < START_MS + 61_000
    assert node.state.apply(data).stale == 2
    assert entries(node.reopen()).keys() == {"domain/ok.org", "domain/ok2.org"}


def test_writes_of_a_removed_node_after_its_removal_are_refused(node):
    """A removed node's records written before its removal still merge (anti-entropy must
    converge); newer ones are refused, wherever they are relayed from."""
    node.state.put("removed", "m2", RemovedNode("admin", START_MS))
    data = batch_of(good("domain/before.org", ms=START_MS - 1), good("domain/after.org", ms=START_MS + 1))
    result = node.state.apply(data)
    assert (result.applied, result.rejected) == (1, {"removed_writer": 1})
    assert node.state.domain("before.org") is not None and node.state.domain("after.org") is None
    assert node.state.apply(batch_of(good("domain/other.org", ms=START_MS + 1, node="m3"))).applied == 1


def test_conflicts_are_the_route_and_the_claims_of_other_slaves_on_every_replica(tmp_path):
    """A claim is a record like any other: every replica holding the same entries lists the
    same conflicts, whatever order the entries came in, and after a reopen."""
    route = Entry("domain/c.org", DomainRoute("sb", "slave"), Timestamp(START_MS, 0, "sb"))
    claim = Entry("claim/c.org/sa", DomainClaim(), Timestamp(START_MS + 5, 0, "sa"))
    own = Entry("claim/c.org/sb", DomainClaim(), Timestamp(START_MS + 6, 0, "sb"))  # the router's own: none
    nodes = [Node(tmp_path / name, name) for name in ("m1", "m2")]
    nodes[0].state.apply(encode_entries([route, claim, own]))
    nodes[1].state.apply(encode_entries([own, claim]))
    assert nodes[1].state.conflicts() == []  # no route yet: nothing to be in conflict with
    nodes[1].state.apply(encode_entries([route]))
    for n in nodes:
        assert n.state.conflicts() == [("c.org", "sb", ["sa"])]
        assert list(n.state.claims("sa")) == [("c.org", "sa")]
        assert n.reopen().conflicts() == [("c.org", "sb", ["sa"])]
        assert n.state.routes == 1  # claims are not routes
    a, b = nodes[0].state, nodes[1].state
    a.write_domains([], [("c.org", "sa", False)])  # sa no longer lists it
    assert a.conflicts() == [] and list(a.claims()) == [("c.org", "sb")]
    b.assign_domain("c.org", "sb", source="admin")  # an admin decides
    assert b.conflicts() == []
    b.put("removed", "sa", RemovedNode("admin", START_MS))
    b.assign_domain("c.org", "sb", source="slave")
    assert b.conflicts() == []  # a removed slave's claim counts no more
    for n in nodes:
        n.state.close()


def test_claim_keys_must_name_a_normal_domain_and_a_node(node):
    data = batch_of(
        ["claim/Upper.org/s1", START_MS, 0, "s1", {}],
        ["claim/ok.org", START_MS, 0, "s1", {}],
        ["claim/ok.org/no name", START_MS, 0, "s1", {}],
        ["claim/ok.org/s1", START_MS, 0, "s1", {"future": "field"}],
    )
    result = node.state.apply(data)
    assert (result.applied, result.rejected) == (1, {"invalid_name": 3})
    assert list(node.state.claims()) == [("ok.org", "s1")]


def test_conflict_records_of_older_versions_are_skipped(node):
    node.state._journal.append(msgpack.packb({"t": "conflicts", "c": [["c.org", ["sa"]]]}))
    state = node.reopen()
    assert state.unreadable_records == 0 and state.conflicts() == []


def test_gc_drops_old_tombstones_and_they_stay_dropped(node):
    s = node.state
    s.assign_domain("a.org", "s")
    s.unassign_domain("a.org")
    s.assign_domain("b.org", "s")
    assert s.gc(START_MS + 7 * DAY_MS) == 0
    assert s.gc(START_MS + 7 * DAY_MS + 1) == 1
    assert (s.live, s.tombstones) == (1, 0)
    node.ms = START_MS + 7 * DAY_MS + 1
    s = node.reopen()
    assert (s.live, s.tombstones) == (1, 0)
    old = Entry("domain/a.org", None, Timestamp(START_MS, 5, "m2"))
    assert s.apply(encode_entries([old])).applied == 0


def test_node_away_longer_than_gc_grace_routes_from_its_map_until_a_peer_resyncs_it(tmp_path):
    """Away longer than gc_grace: the old map keeps routing (it may be all the cluster has),
    but is never offered to a peer; the first completed sync replaces it with the peer's."""
    n = Node(tmp_path / "m1", "m1")
    peer = Node(tmp_path / "m2", "m2")
    n.state.assign_domain("deleted-elsewhere.org", "s")
    n.state.record_sync("m2", START_MS)
    high = n.state.clock.high_water
    n.ms = START_MS + 7 * DAY_MS  # exactly the grace: not stale
    assert not n.reopen().stale
    n.state.record_sync("m2", n.ms)
    n.ms += 7 * DAY_MS + 1
    s = n.reopen()
    assert s.stale and s.domain("deleted-elsewhere.org") == DomainRoute("s", "admin")
    assert s.clock.high_water >= high
    peer.ms = n.ms
    peer.state.assign_domain("kept.org", "t")
    sync(s, peer.state)
    sync(peer.state, s)
    assert peer.state.domain("deleted-elsewhere.org") is None, "a stale map leaked to a peer"
    assert s.domain("kept.org") == DomainRoute("t", "admin")  # fresh news routes at once
    s.record_sync("m2", n.ms)
    assert not s.stale and s.discarded == 1 and s.domain("deleted-elsewhere.org") is None
    assert not n.reopen().stale and n.state.domain("deleted-elsewhere.org") is None  # durable
    n.state.close()
    peer.state.close()


def test_running_node_cut_off_longer_than_gc_grace_can_turn_stale(node):
    s = node.state
    s.assign_domain("a.org", "s")
    s.record_sync("m2", START_MS)
    s.record_sync("m2", START_MS + DAY_MS)  # not persisted (within the interval) but counted here
    assert not s.mark_stale_if_away(START_MS + 8 * DAY_MS)
    assert s.mark_stale_if_away(START_MS + 8 * DAY_MS + 1)
    assert s.live == 1 and s.stale


def test_node_that_never_synced_keeps_its_map(tmp_path):
    n = Node(tmp_path / "m1", "m1")
    n.state.assign_domain("a.org", "s")
    n.ms += 30 * DAY_MS
    assert n.reopen().live == 1 and not n.state.stale
    n.state.close()


def test_compaction_keeps_everything(tmp_path):
    n = Node(tmp_path / "m1", "m1", compact_min_bytes=2000)
    for i in range(200):
        n.state.assign_domain(f"d{i}.org", f"s{i % 3}")
    n.state.record_sync("m2", START_MS)
    assert n.state._journal.generation > 0
    before = entries(n.state)
    s = n.reopen()
    assert entries(s) == before and s.synced_at == START_MS
    n.state.close()


@pytest.fixture
def trio_nodes(tmp_path):
    nodes = [Node(tmp_path / f"m{i}", f"m{i}", ms=START_MS + i) for i in range(3)]
    yield [n.state for n in nodes]
    for n in nodes:
        n.state.close()


def test_three_replicas_converge_after_divergent_writes(trio_nodes):
    a, b, c = trio_nodes
    for i in range(50):
        a.assign_domain(f"a{i}.org", "sa", source="slave")
        b.assign_domain(f"b{i}.org", "sb")
    c.assign_domain("a1.org", "sc", source="slave")  # later than a's: wins
    b.assign_domain("a2.org", "sb")
    a.unassign_domain("a3.org")
    c.override_address("u@a4.org", "sc")
    sync(a, b)
    sync(c, b)
    sync(a, c)
    sync(b, a)
    digests = {s.digest_summary() for s in trio_nodes}
    assert len(digests) == 1
    assert entries(a) == entries(b) == entries(c)
    assert a.domain("a1.org").slave == "sc" and c.domain("a2.org").slave == "sb"
    assert b.domain("a3.org") is None and b.override("u@a4.org") == AddressOverride("sc")
    # In sync: the exchange stays small and moves no entries.
    assert sync(a, b) < 1000


def test_empty_node_receives_a_large_map_in_bounded_chunks(trio_nodes):
    a, b, _ = trio_nodes
    batch = [
        Entry(f"domain/d{i}.example", DomainRoute(f"s{i % 7}", "slave"), Timestamp(START_MS, i % 100, "m0"))
        for i in range(10_000)
    ]
    for data in chunks(batch, 200_000):
        assert a.apply(data).applied > 0
    assert a.live == 10_000
    offer = b.sync_offer()
    answer = a.sync_answer(offer)
    request = b.sync_request(answer)
    assert list(b.sync_entries(answer)) == []
    sent = list(a.sync_entries(request))
    assert all(len(x) <= 1024 * 1024 for x in sent)
    for data in sent:
        b.apply(data)
    assert entries(a) == entries(b)
    assert a.digest_summary() == b.digest_summary()
    # One change costs a small fraction of the full transfer.
    a.assign_domain("d1.example", "moved")
    assert sync(b, a) < sum(map(len, sent)) // 20
    assert b.domain("d1.example").slave == "moved"


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"\xc1",
        None,
        msgpack.packb([1]),
        msgpack.packb({"v": 9, "g": []}),
        msgpack.packb({"v": 1, "g": [1, 2]}),
        msgpack.packb({"v": 1, "g": ["x"] * 64}),
        msgpack.packb({"v": 1, "g": [-1] * 64}),
        msgpack.packb({"v": 1, "g": [2**64 - 1, 1.5] * 32}),
        b"\x82\xa1v\x01\xa1g\xdd\xff\xff\xff\xff",
        b"x" * (MAX_MESSAGE_BYTES + 1),
    ],
)
def test_bad_offers_raise_sync_error(node, message):
    with pytest.raises(SyncError):
        node.state.sync_answer(message)


@pytest.mark.parametrize(
    "message",
    [
        b"\xc1",
        msgpack.packb({"v": 1}),
        msgpack.packb({"v": 1, "b": [4096]}),
        msgpack.packb({"v": 1, "b": ["1"]}),
        msgpack.packb({"v": 1, "b": list(range(4096)) * 2}),
        msgpack.packb({"v": 1, "g": [64], "d": [0] * 64}),
        msgpack.packb({"v": 1, "g": [0], "d": [0] * 63}),
        msgpack.packb({"v": 1, "g": list(range(65)), "d": []}),
        msgpack.packb({"v": 1, "g": [0], "d": "x"}),
    ],
)
def test_bad_answers_and_requests_raise_sync_error(node, message):
    with pytest.raises(SyncError):
        node.state.sync_request(message)
    with pytest.raises(SyncError):
        node.state.sync_entries(message)


def test_journal_in_use_is_refused(node, tmp_path):
    from meshmail.state.journal import JournalError

    with pytest.raises(JournalError):
        ClusterState.open(node.directory, "m1", lambda: START_MS)
    assert os.path.isdir(node.directory)


def test_default_fsync_path_round_trips(tmp_path):
    with ClusterState.open(tmp_path / "m1", "m1", lambda: START_MS) as s:
        s.assign_domain("a.org", "s")
        s.record_sync("m2", START_MS)
        s.compact()
    with ClusterState.open(tmp_path / "m1", "m1", lambda: START_MS) as s:
        assert s.domain("a.org") == DomainRoute("s", "admin") and s.synced_at == START_MS
