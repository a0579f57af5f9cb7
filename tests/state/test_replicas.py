"""Replicas over a terrible network: deltas reordered, dropped, duplicated; then anti-entropy.

Each replica has its own hybrid clock over a physical clock that drifts and jumps back.
Deltas and anti-entropy payloads go through the wire codec. After one anti-entropy pass
between every pair, all replicas must hold the same entries and digests, and every key the
latest write made to it anywhere.
"""

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from meshmail.state.hlc import ClockSkewError, HybridClock
from meshmail.state.lww import Entry, LWWMap, chunks, decode_entries, encode_entries
from meshmail.state.records import AddressOverride, DomainRoute

KEYS = [f"domain/d{i}.org" for i in range(8)] + ["address/u@d1.org", "address/v@d2.org"]
START_MS = 1_700_000_000_000
GRACE_MS = 10_000


class Replica:
    """One node's map and clock; `physical_ms` is set by the test."""

    def __init__(self, index: int) -> None:
        self.name = f"m{index}"
        self.physical_ms = START_MS + 7 * index
        self.clock = HybridClock(self.name, lambda: self.physical_ms)
        self.map = LWWMap(buckets=16, groups=4)
        self.skewed = 0

    def write(self, key: str, live: bool) -> Entry:
        ts = self.clock.now()
        if not live:
            value = None
        elif key.startswith("address/"):
            value = AddressOverride(self.name)
        else:
            value = DomainRoute(self.name, "slave")
        entry = Entry(key, value, ts)
        self.map.merge(entry)
        return entry

    def receive(self, batch: bytes) -> None:
        for entry in decode_entries(batch, max_entries=1000).entries:
            try:
                self.clock.observe(entry.ts)
            except ClockSkewError:
                self.skewed += 1
                continue
            self.map.merge(entry)


def anti_entropy(a: Replica, b: Replica) -> None:
    """The two-level exchange: group digests, bucket digests of differing groups, entries."""
    groups = b.map.differing_groups(a.map.group_digests())
    if not groups:
        return
    buckets = a.map.differing(b.map.digests(groups), groups)
    to_b = list(chunks(a.map.entries_in(buckets), max_bytes=256))
    to_a = list(chunks(b.map.entries_in(buckets), max_bytes=256))
    for batch in to_b:
        b.receive(batch)
    for batch in to_a:
        a.receive(batch)


def full_pass(replicas: list[Replica]) -> None:
    for a, b in itertools.combinations(replicas, 2):
        anti_entropy(a, b)


def snapshot(replica: Replica) -> tuple:
    m = replica.map
    return {e.key: e for e in m.entries_in()}, m.digests(), m.group_digests(), len(m), m.tombstones


operations = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 4), st.sampled_from(KEYS), st.booleans()),
        st.tuples(st.just("deliver"), st.integers(0, 10_000), st.booleans()),
        st.tuples(st.just("drop"), st.integers(0, 10_000)),
        st.tuples(st.just("clock"), st.integers(0, 4), st.integers(-2_000, 3_000)),
        st.tuples(st.just("sync"), st.integers(0, 4), st.integers(0, 4)),
    ),
    min_size=20,
    max_size=150,
)


def run(replicas: list[Replica], ops: list[tuple]) -> list[Entry]:
    """Apply `ops` to `replicas`; returns every write made."""
    n = len(replicas)
    in_flight: list[tuple[Replica, bytes]] = []
    writes = []
    for op, *args in ops:
        if op == "write":
            writer = replicas[args[0] % n]
            entry = writer.write(args[1], args[2])
            writes.append(entry)
            in_flight += [(r, encode_entries([entry])) for r in replicas if r is not writer]
        elif op == "deliver" and in_flight:
            index = args[0] % len(in_flight)
            to, batch = in_flight[index] if args[1] else in_flight.pop(index)  # args[1]: duplicate
            to.receive(batch)
        elif op == "drop" and in_flight:
            in_flight.pop(args[0] % len(in_flight))
        elif op == "clock":
            replicas[args[0] % n].physical_ms += args[1]  # drifts, may go backwards
        elif op == "sync":
            anti_entropy(replicas[args[0] % n], replicas[args[1] % n])
    return writes


@settings(max_examples=300, deadline=None)
@given(st.integers(3, 5), operations)
def test_replicas_converge_after_anti_entropy(n, ops):
    replicas = [Replica(i) for i in range(n)]
    writes = run(replicas, ops)
    full_pass(replicas)
    first = snapshot(replicas[0])
    for replica in replicas[1:]:
        assert snapshot(replica) == first
    latest = {}
    for entry in writes:
        if entry.key not in latest or entry.ts > latest[entry.key].ts:
            latest[entry.key] = entry
    assert first[0] == latest
    assert all(r.skewed == 0 for r in replicas)
    full_pass(replicas)  # in sync: nothing moves
    assert all(snapshot(r) == first for r in replicas)


@settings(max_examples=200, deadline=None)
@given(st.integers(3, 5), operations, st.sets(st.integers(0, 4)))
def test_gc_never_resurrects_when_all_synced_within_the_grace(n, ops, early):
    replicas = [Replica(i) for i in range(n)]
    run(replicas, ops)
    full_pass(replicas)
    deleted = {e.key for e in replicas[0].map.entries_in() if e.is_tombstone}
    horizon = max(r.clock.now().wall_ms for r in replicas) + 1
    for r in replicas:
        r.physical_ms = horizon + GRACE_MS

    def assert_still_deleted() -> None:
        for r in replicas:
            assert not any(r.map.get(key) for key in deleted)

    # Some replicas collect before the others; exchanges go on meanwhile.
    for i in early:
        replicas[i % n].map.gc(horizon)
    full_pass(replicas)
    assert_still_deleted()
    assert all(replicas[i % n].map.tombstones == 0 for i in early)  # collected ones do not come back
    for r in replicas:
        r.map.gc(horizon)
    full_pass(replicas)
    assert_still_deleted()
    first = snapshot(replicas[0])
    assert first[4] == 0
    assert all(snapshot(r) == first for r in replicas)


def away_past_the_grace() -> tuple[Replica, Replica]:
    """`a` deletes a domain and collects the tombstone while `b`, holding it live, is away."""
    a, b = Replica(0), Replica(1)
    a.write("domain/d1.org", True)
    anti_entropy(a, b)
    a.physical_ms += 5
    a.write("domain/d1.org", False)
    a.physical_ms += GRACE_MS
    a.map.gc(a.physical_ms - GRACE_MS + 1)
    assert a.map.entry("domain/d1.org") is None
    return a, b


def test_a_replica_away_past_the_grace_brings_deleted_keys_back():
    """Why a node away longer than gc_grace must clear its map before it syncs again."""
    a, b = away_past_the_grace()
    anti_entropy(a, b)
    assert a.map.get("domain/d1.org") is not None


def test_a_replica_away_past_the_grace_resyncs_from_scratch():
    a, b = away_past_the_grace()
    b.map = LWWMap(buckets=16, groups=4)
    anti_entropy(a, b)
    assert a.map.get("domain/d1.org") is None and b.map.get("domain/d1.org") is None
    assert snapshot(a) == snapshot(b)


def test_future_deltas_are_refused_and_counted():
    a, b = Replica(0), Replica(1)
    a.physical_ms += 61_000  # past the default 60 s limit
    b.receive(encode_entries([a.write("domain/d1.org", True)]))
    assert b.skewed == 1 and b.map.get("domain/d1.org") is None
    assert b.clock.now().wall_ms < a.physical_ms - 60_000
