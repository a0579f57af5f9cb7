"""Last-writer-wins map with tombstones, bucket digests for anti-entropy, and its wire codec.

Every key holds the entry with the greatest hybrid timestamp; a delete is a tombstone entry.
This module moves no bytes and keeps no files: the gossip layer carries deltas and push-pull
payloads (see LWWMap for the exchange), the journal persists entries.
"""

from __future__ import annotations

import heapq
import struct
from collections.abc import Iterable, Iterator, Sequence
from hashlib import blake2b
from typing import Any

import attrs
import msgpack

from meshmail.state.hlc import Timestamp
from meshmail.state.records import (
    NAMESPACES,
    BadEntry,
    check_value,
    decode_value,
    encode_value,
    namespace_of,
    split_key,
)

#: Version of the entry batch format produced by encode_entries and chunks.
WIRE_VERSION = 1
DEFAULT_BUCKETS = 4096
DEFAULT_GROUPS = 64
#: Default size limit of one chunk: well under the gossip layer's 4 MiB push-pull extension.
DEFAULT_CHUNK_BYTES = 1 << 20

_MASK64 = (1 << 64) - 1
_ENTRY_HEAD = struct.Struct(">HQHB")


def _check_key(instance, attribute, key) -> None:
    split_key(key)


def _check_value(instance, attribute, value) -> None:
    if value is not None:
        check_value(namespace_of(instance.key), value)


@attrs.frozen(init=False)
class Entry:
    """What a map holds for one key: the value record, or None for a tombstone, and its time.

    Built as ``Entry(key, value, ts)``; construction validates the key and the value's type
    and raises BadEntry. The timestamp is stored as its three fields (one object less per
    entry in a map of millions); `ts` rebuilds it.
    """

    key: str = attrs.field(validator=_check_key)
    value: Any = attrs.field(validator=_check_value)
    wall_ms: int
    logical: int
    node: str

    def __init__(self, key: str, value: Any, ts: Timestamp) -> None:
        if type(ts) is not Timestamp:
            raise BadEntry(f"ts must be a Timestamp, not {type(ts).__name__}")
        self.__attrs_init__(key, value, ts.wall_ms, ts.logical, ts.node)

    @property
    def ts(self) -> Timestamp:
        return Timestamp(self.wall_ms, self.logical, self.node)

    @property
    def is_tombstone(self) -> bool:
        return self.value is None


@attrs.frozen
class DecodedEntries:
    """The result of decode_entries: valid entries, and how many were skipped because their
    namespace is unknown here (from a newer node; the caller may count them)."""

    entries: list[Entry]
    skipped: int


def _bucket_hash(key: str) -> int:
    return int.from_bytes(blake2b(key.encode(), digest_size=8, person=b"meshmail-bucket").digest(), "big")


def _entry_hash(entry: Entry) -> int:
    key = entry.key.encode()
    head = _ENTRY_HEAD.pack(len(key), entry.wall_ms, entry.logical, entry.value is None)
    return int.from_bytes(
        blake2b(head + key + entry.node.encode(), digest_size=8, person=b"meshmail-entry").digest(), "big"
    )


def _check_digests(remote: Any, count: int) -> None:
    if not isinstance(remote, list | tuple) or len(remote) != count:
        raise BadEntry(f"expected a list of {count} digests")
    for digest in remote:
        if type(digest) is not int or not 0 <= digest <= _MASK64:
            raise BadEntry("a digest is not a 64-bit unsigned int")


class LWWMap:
    """A last-writer-wins map of namespaced keys to records, with per-bucket digests.

    Merging is commutative, associative and idempotent: replicas that have seen the same
    entries hold the same map whatever the order. Writes return whether they changed the
    map, so the caller knows which deltas to forward and journal. Iteration order (items,
    entries_in) is unspecified.

    Digests. Keys fall into `buckets` (default 4096) by a blake2b hash of the key, stable
    across processes. Each bucket keeps the sum mod 2**64 of a 64-bit blake2b hash of each
    entry's (key, timestamp, is-tombstone), updated in O(1) on every write. The value is
    left out: a timestamp names one write of one node, and a node that drops fields of a
    newer record it does not know must still compute the same digest. A sum, unlike XOR,
    does not cancel an entry counted twice. Buckets form `groups` (default 64) of
    consecutive ids, whose digests are kept too, for a two-level exchange:

    1. A sends ``group_digests()`` (about 580 bytes: the whole in-sync exchange, any size).
    2. B: ``g = differing_groups(remote)``; empty means in sync, else B sends g and
       ``digests(groups=g)`` (64 bucket digests per differing group).
    3. A: ``d = differing(remote, groups=g)``; both send ``entries_in(d)`` through chunks().

    At 1,000,000 entries one changed key costs about 55 KB against 102 MB for the whole map.
    The single-level form is ``differing(remote)`` against all of ``digests()`` (37 KB).
    `buckets` and `groups` are part of the protocol: every node must use the same.

    Tombstones. gc(horizon) drops tombstones older than the horizon and refuses older ones
    arriving later, so they do not bounce back. Live entries are always accepted, so a node
    away longer than the grace period must clear its map and resync from scratch, or it
    would bring deleted keys back. A tombstone refused for its age never enters a digest,
    so two maps compare equal only once both collected up to the same horizon: collect
    before comparing (cheap: gc visits only the tombstones it drops).
    """

    __slots__ = (
        "buckets",
        "groups",
        "_maps",
        "_digests",
        "_group_digests",
        "_live",
        "_tombstones",
        "_gc_horizon_ms",
        "_expiring",
        "_index",
    )

    def __init__(
        self, buckets: int = DEFAULT_BUCKETS, groups: int = DEFAULT_GROUPS, indexed: Iterable[str] = ()
    ) -> None:
        """`indexed`: namespaces (the part of a key before its first "/") whose keys items()
        finds without a scan; for the few small namespaces beside a large one."""
        if buckets < 1 or groups < 1 or buckets % groups:
            raise ValueError("buckets must be a positive multiple of groups")
        self._index: dict[str, set[str]] = {ns: set() for ns in indexed}
        self.buckets = buckets
        self.groups = groups
        self._maps: list[dict[str, Entry]] = [{} for _ in range(buckets)]
        self._digests = [0] * buckets
        self._group_digests = [0] * groups
        self._live = 0
        self._tombstones = 0
        self._gc_horizon_ms = 0
        #: (wall_ms, key) of every tombstone merged, oldest first (a heap), for gc. An item
        #: whose tombstone was replaced since stays until gc reaches it and skips it.
        self._expiring: list[tuple[int, str]] = []

    def __len__(self) -> int:
        """The number of live (non-tombstone) keys."""
        return self._live

    @property
    def tombstones(self) -> int:
        """The number of tombstones held."""
        return self._tombstones

    def bucket_of(self, key: str) -> int:
        """The bucket id of a key."""
        return _bucket_hash(key) % self.buckets

    def get(self, key: str) -> Any:
        """The value of a key, or None when it is absent or deleted."""
        entry = self._maps[self.bucket_of(key)].get(key)
        return None if entry is None else entry.value

    def entry(self, key: str) -> Entry | None:
        """The entry held for a key, tombstones included, or None."""
        return self._maps[self.bucket_of(key)].get(key)

    def put(self, key: str, value: Any, ts: Timestamp) -> bool:
        """Set a key at time `ts` (from HybridClock.now()); True if it changed the map."""
        if value is None:
            raise ValueError("put needs a value; use delete for a tombstone")
        return self.merge(Entry(key, value, ts))

    def delete(self, key: str, ts: Timestamp) -> bool:
        """Delete a key at time `ts` by writing a tombstone; True if it changed the map."""
        return self.merge(Entry(key, None, ts))

    def merge(self, entry: Entry) -> bool:
        """Apply an entry if its timestamp is greater than the one held for its key.

        An equal timestamp is the same write again and changes nothing. A tombstone older
        than the last gc() horizon is refused. Returns True if the map changed.
        """
        if entry.value is None and entry.wall_ms < self._gc_horizon_ms:
            return False
        bucket = self.bucket_of(entry.key)
        entries = self._maps[bucket]
        held = entries.get(entry.key)
        if held is not None:
            if (entry.wall_ms, entry.logical, entry.node) <= (held.wall_ms, held.logical, held.node):
                return False
            self._account(bucket, held, -1)
        elif self._index:
            keys = self._index.get(entry.key.partition("/")[0])
            if keys is not None:
                keys.add(entry.key)
        entries[entry.key] = entry
        self._account(bucket, entry, 1)
        if entry.value is None:
            heapq.heappush(self._expiring, (entry.wall_ms, entry.key))
        return True

    def _account(self, bucket: int, entry: Entry, sign: int) -> None:
        delta = sign * _entry_hash(entry)
        self._digests[bucket] = (self._digests[bucket] + delta) & _MASK64
        group = bucket * self.groups // self.buckets
        self._group_digests[group] = (self._group_digests[group] + delta) & _MASK64
        if entry.value is None:
            self._tombstones += sign
        else:
            self._live += sign

    def items(self, prefix: str = "") -> Iterator[tuple[str, Any]]:
        """(key, value) of every live key starting with `prefix`; without a scan when the
        prefix is ``<namespace>/`` of an indexed namespace (then sorted by key)."""
        ns, slash, rest = prefix.partition("/")
        keys = self._index.get(ns) if slash and not rest else None
        if keys is not None:
            for key in sorted(keys):
                value = self.get(key)
                if value is not None:
                    yield key, value
            return
        for entries in self._maps:
            for key, entry in entries.items():
                if entry.value is not None and key.startswith(prefix):
                    yield key, entry.value

    def count(self, ns: str) -> int:
        """The number of live keys of an indexed namespace."""
        return sum(1 for key in self._index[ns] if self.get(key) is not None)

    def gc(self, horizon_ms: int) -> int:
        """Drop tombstones with wall_ms < horizon_ms and refuse older ones from now on.

        Call it with now - gc_grace. Returns how many were dropped. Visits only the
        tombstones it drops (O(log n) each), so calling it before every exchange is cheap.
        """
        self._gc_horizon_ms = max(self._gc_horizon_ms, horizon_ms)
        dropped = 0
        expiring = self._expiring
        while expiring and expiring[0][0] < horizon_ms:
            wall_ms, key = heapq.heappop(expiring)
            bucket = self.bucket_of(key)
            entry = self._maps[bucket].get(key)
            if entry is None or entry.value is not None or entry.wall_ms != wall_ms:
                continue  # replaced since; a newer tombstone has its own item
            del self._maps[bucket][key]
            keys = self._index.get(key.partition("/")[0])
            if keys is not None:
                keys.discard(key)
            self._account(bucket, entry, -1)
            dropped += 1
        return dropped

    def group_digests(self) -> list[int]:
        """The digest of each group of buckets (first step of the exchange)."""
        return list(self._group_digests)

    def digests(self, groups: Iterable[int] | None = None) -> list[int]:
        """Bucket digests: of every bucket, or of the buckets of `groups` in that order."""
        if groups is None:
            return list(self._digests)
        return [self._digests[b] for b in self._buckets_of(groups)]

    def differing_groups(self, remote: Sequence[int]) -> list[int]:
        """Ids of the groups whose digest differs from `remote` (a peer's group_digests()).

        Raises BadEntry if `remote` is not a list of `groups` 64-bit ints.
        """
        _check_digests(remote, self.groups)
        return [g for g, (ours, theirs) in enumerate(zip(self._group_digests, remote, strict=True)) if ours != theirs]

    def differing(self, remote: Sequence[int], groups: Sequence[int] | None = None) -> list[int]:
        """Ids of the buckets whose digest differs from `remote`.

        `remote` is a peer's digests(groups); without `groups` it covers every bucket.
        Raises BadEntry on a wrong length, a bad digest or a bad group id.
        """
        ids = range(self.buckets) if groups is None else self._buckets_of(groups)
        _check_digests(remote, len(ids))
        return [b for b, theirs in zip(ids, remote, strict=True) if self._digests[b] != theirs]

    def entries_in(self, bucket_ids: Iterable[int] | None = None) -> Iterator[Entry]:
        """Every entry, tombstones included, of the given buckets (all buckets by default).

        Each bucket is copied when reached, so merging while iterating is safe. Raises
        BadEntry on a bucket id out of range (they may come from a peer).
        """
        for bucket in range(self.buckets) if bucket_ids is None else bucket_ids:
            if type(bucket) is not int or not 0 <= bucket < self.buckets:
                raise BadEntry(f"bucket id {bucket!r} out of range")
            yield from list(self._maps[bucket].values())

    def _buckets_of(self, groups: Iterable[int]) -> list[int]:
        per_group = self.buckets // self.groups
        ids: list[int] = []
        for group in groups:
            if type(group) is not int or not 0 <= group < self.groups:
                raise BadEntry(f"group id {group!r} out of range")
            ids.extend(range(group * per_group, (group + 1) * per_group))
        return ids


# Wire format: msgpack map {"v": WIRE_VERSION, "e": [[key, wall_ms, logical, node, value], ...]}
# with value the record's {field: value} map or nil for a tombstone. Unknown map keys and
# extra trailing items of an entry are ignored, so later versions can add to both.


def _pack_entry(entry: Entry) -> bytes:
    value = None
    if entry.value is not None:
        value = encode_value(namespace_of(entry.key), entry.value)
    return msgpack.packb([entry.key, entry.wall_ms, entry.logical, entry.node, value])


def _batch(packed: list[bytes]) -> bytes:
    packer = msgpack.Packer()
    head = packer.pack_map_header(2) + packer.pack("v") + packer.pack(WIRE_VERSION) + packer.pack("e")
    return head + packer.pack_array_header(len(packed)) + b"".join(packed)


_BATCH_OVERHEAD = len(_batch([])) + 4  # an array32 header is 4 bytes longer than fixarray's


def encode_entries(entries: Iterable[Entry]) -> bytes:
    """One batch holding all `entries` (use chunks() when they may be many)."""
    return _batch([_pack_entry(e) for e in entries])


def chunks(entries: Iterable[Entry], max_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """Batches of `entries`, each at most `max_bytes` long, each decodable on its own.

    Yields nothing for no entries. Reads `entries` lazily, so a full map streams in
    bounded memory. Raises ValueError if one entry alone does not fit.
    """
    packed: list[bytes] = []
    size = _BATCH_OVERHEAD
    for entry in entries:
        item = _pack_entry(entry)
        if _BATCH_OVERHEAD + len(item) > max_bytes:
            raise ValueError(f"entry {entry.key[:80]!r} does not fit in {max_bytes} bytes")
        if size + len(item) > max_bytes:
            yield _batch(packed)
            packed, size = [], _BATCH_OVERHEAD
        packed.append(item)
        size += len(item)
    if packed:
        yield _batch(packed)


def decode_entries(data: bytes, max_entries: int) -> DecodedEntries:
    """Decode one batch made by encode_entries or chunks.

    Entries whose namespace is unknown here are skipped and counted in `skipped`. Anything
    else wrong (bad msgpack, version, types, timestamps, values, more than `max_entries`)
    rejects the whole batch with BadEntry naming the reason. Future timestamps are not
    checked here: pass each entry's ts to HybridClock.observe() before merging it.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BadEntry(f"batch must be bytes, not {type(data).__name__}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_array_len=max(max_entries, 16), max_map_len=64)
    except Exception as exc:  # msgpack raises a handful of unrelated types
        raise BadEntry(f"bad msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, dict) or type(obj.get("v")) is not int or not isinstance(obj.get("e"), list):
        raise BadEntry("batch is not {v: version, e: [entries]}")
    if obj["v"] != WIRE_VERSION:
        raise BadEntry(f"unsupported batch version {obj['v']}")
    items = obj["e"]
    if len(items) > max_entries:
        raise BadEntry(f"{len(items)} entries, more than {max_entries}")
    entries: list[Entry] = []
    skipped = 0
    for index, item in enumerate(items):
        if not isinstance(item, list) or len(item) < 5 or type(item[0]) is not str:
            raise BadEntry(f"entry {index} is not [key, wall_ms, logical, node, value]")
        key, wall_ms, logical, node, value = item[:5]
        ns = namespace_of(key)
        if ns not in NAMESPACES:
            skipped += 1
            continue
        try:
            ts = Timestamp(wall_ms, logical, node)
            entries.append(Entry(key, None if value is None else decode_value(ns, value), ts))
        except (TypeError, ValueError) as exc:  # BadEntry is a ValueError
            raise BadEntry(f"entry {index}: {exc}") from None
    return DecodedEntries(entries, skipped)
