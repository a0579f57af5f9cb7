"""LWW map: writes, tombstones, GC, digests, records codec, entry batches, and the merge laws."""

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshmail.state.hlc import MAX_LOGICAL, Timestamp
from meshmail.state.lww import Entry, LWWMap, chunks, decode_entries, encode_entries
from meshmail.state.records import (
    AddressOverride,
    BadEntry,
    DomainRoute,
    decode_value,
    encode_value,
    make_key,
    split_key,
)

A = DomainRoute("slave-a", "slave")
B = DomainRoute("slave-b", "admin")


def T(wall_ms: int, logical: int = 0, node: str = "m1") -> Timestamp:
    return Timestamp(wall_ms, logical, node)


def state(m: LWWMap) -> dict:
    return {e.key: e for e in m.entries_in()}


# --- records -------------------------------------------------------------------------------


def test_values_round_trip_and_ignore_unknown_fields():
    assert decode_value("domain", encode_value("domain", B)) == B
    assert decode_value("address", {"slave": "s1", "weight": 3}) == AddressOverride("s1")
    assert decode_value("domain", {"slave": "s", "source": "admin"}) is decode_value(
        "domain", {"source": "admin", "slave": "s"}
    )


@pytest.mark.parametrize(
    "ns, obj, reason",
    [
        ("domain", ["slave-a", "slave"], "must be a map"),
        ("domain", {"slave": "slave-a"}, "bad domain value"),
        ("domain", {"slave": 7, "source": "slave"}, "bad domain value"),
        ("domain", {"slave": ["s"], "source": "slave"}, "bad domain value"),
        ("domain", {"slave": "s", "source": "robot"}, "bad domain value"),
        ("domain", {"slave": "x" * 129, "source": "slave"}, "bad domain value"),
        ("address", {"slave": ""}, "bad address value"),
        ("token", {}, "unknown namespace"),
    ],
)
def test_decode_value_rejects(ns, obj, reason):
    with pytest.raises(BadEntry, match=reason):
        decode_value(ns, obj)


def test_encode_value_checks_the_record_type():
    with pytest.raises(BadEntry, match="must be a DomainRoute"):
        encode_value("domain", AddressOverride("s"))


@pytest.mark.parametrize(
    "key, reason",
    [
        (b"domain/x", "must be a str"),
        ("domain", "not <namespace>/<name>"),
        ("domain/", "not <namespace>/<name>"),
        ("nope/x", "unknown namespace"),
        ("domain/" + "é" * 253, "longer than 512 bytes"),
        ("domain/\udc80", "not valid Unicode"),
    ],
)
def test_split_key_rejects(key, reason):
    with pytest.raises(BadEntry, match=reason):
        split_key(key)


def test_keys():
    assert make_key("address", "bob@example.com") == "address/bob@example.com"
    assert split_key("domain/a/b") == ("domain", "a/b")
    assert split_key("domain/" + "x" * 505) == ("domain", "x" * 505)


# --- map -----------------------------------------------------------------------------------


def test_put_get_delete():
    m = LWWMap()
    assert m.put("domain/example.com", A, T(10))
    assert m.get("domain/example.com") == A and len(m) == 1
    assert not m.put("domain/example.com", B, T(9))  # older: ignored
    assert m.get("domain/example.com") == A
    assert m.put("domain/example.com", B, T(10, 1))
    assert m.delete("domain/example.com", T(11))
    assert m.get("domain/example.com") is None
    assert m.entry("domain/example.com") == Entry("domain/example.com", None, T(11))
    assert (len(m), m.tombstones) == (0, 1)
    assert m.put("domain/example.com", A, T(12))  # a later write revives the key
    assert (len(m), m.tombstones) == (1, 0)


@pytest.mark.parametrize(
    "held, incoming, wins",
    [
        (T(10, 0, "a"), T(10, 0, "b"), True),  # tie broken by node id
        (T(10, 0, "b"), T(10, 0, "a"), False),
        (T(10, 5, "z"), T(11, 0, "a"), True),
        (T(11, 0, "a"), T(10, 5, "z"), False),
        (T(10, 0, "a"), T(10, 0, "a"), False),  # the same write again
    ],
)
def test_merge_keeps_the_greater_timestamp(held, incoming, wins):
    m = LWWMap()
    m.put("domain/x.org", A, held)
    assert m.merge(Entry("domain/x.org", B, incoming)) is wins
    assert m.get("domain/x.org") == (B if wins else A)


def test_merging_the_same_entry_twice_is_idempotent():
    m = LWWMap()
    entry = Entry("address/bob@x.org", AddressOverride("s2"), T(5))
    assert m.merge(entry) and not m.merge(entry)
    assert len(m) == 1


@pytest.mark.parametrize(
    "key, value, ts",
    [
        ("domain/x.org", AddressOverride("s"), T(1)),
        ("address/bob@x.org", A, T(1)),
        ("unknown/x", A, T(1)),
        ("domain/x.org", {"slave": "s", "source": "slave"}, T(1)),
        ("domain/x.org", A, (1, 0, "m1")),
    ],
)
def test_entries_are_validated(key, value, ts):
    with pytest.raises(BadEntry):
        Entry(key, value, ts)


def test_put_none_is_not_a_delete():
    with pytest.raises(ValueError, match="use delete"):
        LWWMap().put("domain/x.org", None, T(1))


def test_items_by_prefix_skip_tombstones():
    m = LWWMap(buckets=8, groups=2)
    m.put("domain/a.org", A, T(1))
    m.put("domain/b.org", B, T(1))
    m.put("address/u@a.org", AddressOverride("s"), T(1))
    m.delete("domain/c.org", T(1))
    assert dict(m.items("domain/")) == {"domain/a.org": A, "domain/b.org": B}
    assert len(dict(m.items())) == 3 == len(m)


def test_gc_drops_old_tombstones_and_refuses_them_later():
    m = LWWMap()
    m.put("domain/live.org", A, T(1))
    m.delete("domain/old.org", T(100))
    m.delete("domain/new.org", T(200))
    assert m.gc(150) == 1
    assert m.entry("domain/old.org") is None and m.tombstones == 1 and len(m) == 1
    assert m.get("domain/live.org") == A  # live entries are never collected
    assert not m.merge(Entry("domain/old.org", None, T(100)))  # would bounce back otherwise
    assert m.merge(Entry("domain/old.org", A, T(120)))  # live entries are always accepted


def test_gc_updates_the_digest():
    m, empty = LWWMap(), LWWMap()
    m.put("domain/a.org", A, T(1))
    m.delete("domain/a.org", T(2))
    assert m.digests() != empty.digests()
    m.gc(3)
    assert m.digests() == empty.digests() and m.group_digests() == empty.group_digests()


def test_digest_does_not_depend_on_history():
    one, other = LWWMap(), LWWMap()
    one.put("domain/a.org", A, T(1))
    one.put("domain/a.org", B, T(2))
    one.put("domain/b.org", A, T(3))
    other.put("domain/b.org", A, T(3))
    other.put("domain/a.org", B, T(2))
    assert one.digests() == other.digests() and one.group_digests() == other.group_digests()


def test_digests_find_the_one_changed_bucket():
    ours, theirs = LWWMap(), LWWMap()
    for i in range(2000):
        entry = Entry(f"domain/d{i}.org", A, T(i))
        ours.merge(entry)
        theirs.merge(entry)
    assert ours.differing_groups(theirs.group_digests()) == []
    theirs.put("domain/d7.org", B, T(5000))
    groups = ours.differing_groups(theirs.group_digests())
    assert len(groups) == 1
    buckets = ours.differing(theirs.digests(groups), groups)
    assert buckets == [ours.bucket_of("domain/d7.org")]
    assert ours.differing(theirs.digests()) == buckets
    assert "domain/d7.org" in {e.key for e in theirs.entries_in(buckets)}
    for entry in theirs.entries_in(buckets):
        ours.merge(entry)
    assert ours.digests() == theirs.digests()


@pytest.mark.parametrize(
    "remote, groups",
    [
        ([0] * 63, None),
        ("0" * 64, None),
        ([0] * 63 + [-1], None),
        ([0] * 63 + [1 << 64], None),
        ([0] * 63 + [True], None),
        ([0] * 64, [64]),
        ([0] * 64, ["0"]),
    ],
)
def test_bad_remote_digests_are_refused(remote, groups):
    m = LWWMap()
    with pytest.raises(BadEntry):
        if groups is None:
            m.differing_groups(remote)
        else:
            m.differing(remote, groups)


@pytest.mark.parametrize("bucket", [-1, 4096, "1", None])
def test_entries_in_refuses_bad_bucket_ids(bucket):
    with pytest.raises(BadEntry, match="out of range"):
        list(LWWMap().entries_in([bucket]))


@pytest.mark.parametrize("buckets, groups", [(0, 1), (10, 3), (8, 0)])
def test_bucket_layout_is_checked(buckets, groups):
    with pytest.raises(ValueError):
        LWWMap(buckets, groups)


# --- wire batches --------------------------------------------------------------------------


def sample_entries(n: int) -> list[Entry]:
    return [
        Entry(f"domain/d{i}.example.com", None if i % 10 == 0 else A, T(1_700_000_000_000 + i, i % 3, f"m{i % 4}"))
        for i in range(n)
    ]


def test_batch_round_trip():
    entries = sample_entries(50) + [Entry("address/bob@x.org", AddressOverride("s9"), T(1))]
    decoded = decode_entries(encode_entries(entries), max_entries=100)
    assert decoded.entries == entries and decoded.skipped == 0


def test_chunks_stay_under_the_limit_and_carry_everything():
    entries = sample_entries(3000)
    batches = list(chunks(entries, max_bytes=4096))
    assert len(batches) > 10
    assert all(len(b) <= 4096 for b in batches)
    assert [e for b in batches for e in decode_entries(b, 3000).entries] == entries
    assert list(chunks([], 4096)) == []


def test_chunks_refuse_an_entry_that_cannot_fit():
    with pytest.raises(ValueError, match="does not fit"):
        list(chunks(sample_entries(1), max_bytes=30))


def batch(*items, **envelope) -> bytes:
    return msgpack.packb({"v": 1, "e": list(items), **envelope})


GOOD = ["domain/x.org", 5, 0, "m1", {"slave": "s", "source": "slave"}]


def test_decode_is_lenient_on_additions():
    newer = batch(GOOD + ["extra"], ["token/abc", 1, 0, "m1", {"x": 1}], ["token/def", 1, 0, "m1", None], more=1)
    decoded = decode_entries(newer, 10)
    assert decoded.entries == [Entry("domain/x.org", DomainRoute("s", "slave"), T(5))]
    assert decoded.skipped == 2


def with_item(index: int, value) -> list:
    item = list(GOOD)
    item[index] = value
    return item


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\xc1", "bad msgpack"),
        (b"", "bad msgpack"),
        (msgpack.packb([1, []]), "not {v: version"),
        (msgpack.packb({"v": "1", "e": []}), "not {v: version"),
        (msgpack.packb({"v": 1, "e": {}}), "not {v: version"),
        (msgpack.packb({"v": 2, "e": []}), "unsupported batch version 2"),
        (batch(*[GOOD] * 11), "11 entries, more than 10"),
        (b"\x82\xa1v\x01\xa1e\xdd\xff\xff\xff\xff", "bad msgpack"),  # claims 4 billion entries
        (batch(GOOD[:4]), "entry 0 is not"),
        (batch("domain/x.org"), "entry 0 is not"),
        (batch(with_item(0, 7)), "entry 0 is not"),
        (batch(GOOD, with_item(1, -5)), "entry 1: wall_ms -5 out of range"),
        (batch(with_item(1, 1 << 63)), "wall_ms .* out of range"),
        (batch(with_item(1, 5.0)), "wall_ms must be an int"),
        (batch(with_item(2, MAX_LOGICAL + 1)), "logical .* out of range"),
        (batch(with_item(2, False)), "logical must be an int"),
        (batch(with_item(3, "")), "entry 0"),
        (batch(with_item(3, 42)), "entry 0"),
        (batch(with_item(4, {"slave": 1, "source": "slave"})), "bad domain value"),
        (batch(with_item(4, [])), "must be a map"),
        (batch(with_item(0, "domain/")), "not <namespace>/<name>"),
        (batch(with_item(0, "domain/" + "x" * 600)), "longer than 512 bytes"),
    ],
)
def test_decode_rejects(data, reason):
    with pytest.raises(BadEntry, match=reason):
        decode_entries(data, max_entries=10)


def test_decode_rejects_non_bytes():
    with pytest.raises(BadEntry, match="must be bytes"):
        decode_entries([GOOD], 10)


# --- merge laws ----------------------------------------------------------------------------

KEYS = [f"domain/d{i}.org" for i in range(6)] + ["address/u@d1.org", "address/v@d2.org"]
timestamps = st.builds(Timestamp, st.integers(0, 5), st.integers(0, 2), st.sampled_from(["a", "b", "c"]))


def write(key: str, ts: Timestamp) -> Entry:
    """An entry whose value follows from (key, ts), as one timestamp names one write."""
    if ts.wall_ms % 2 == 0:
        return Entry(key, None, ts)
    if key.startswith("address/"):
        return Entry(key, AddressOverride(ts.node), ts)
    return Entry(key, DomainRoute(ts.node, "slave"), ts)


entries_st = st.lists(st.builds(write, st.sampled_from(KEYS), timestamps), max_size=20)


def merged(*batches: list[Entry]) -> LWWMap:
    m = LWWMap(buckets=4, groups=2)
    for entries in batches:
        for entry in entries:
            m.merge(entry)
    return m


def same(one: LWWMap, other: LWWMap) -> bool:
    return state(one) == state(other) and one.digests() == other.digests()


@given(entries_st, entries_st)
def test_merge_is_commutative(x, y):
    assert same(merged(x, y), merged(y, x))


@given(entries_st, entries_st, entries_st)
def test_merge_is_associative(x, y, z):
    left = merged(list(merged(x, y).entries_in()), z)
    right = merged(x, list(merged(y, z).entries_in()))
    assert same(left, right)


@given(entries_st)
def test_merge_is_idempotent(x):
    assert same(merged(x), merged(x, x))
    assert same(merged(x), merged(list(merged(x).entries_in())))


@given(entries_st)
def test_merge_keeps_the_greatest_timestamp_per_key(x):
    m = merged(x)
    for key in {e.key for e in x}:
        assert m.entry(key).ts == max(e.ts for e in x if e.key == key)
