"""ClusterState: the replicated map one node holds, with its clock and journal, behind one object.

Local writes, remote deltas, reads for routing, conflicts, tombstone GC, compaction and the
anti-entropy messages. Sans-IO apart from the journal's synchronous file I/O: no sockets, no
trio; the caller moves the bytes, and splits a write so that its disk part runs in a worker
thread when it must not block (see "Off the caller's thread" in ClusterState).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from hashlib import blake2b
from typing import Any

import attrs
import msgpack

from meshmail.core.nodes import NODE_NAME
from meshmail.state.hlc import ClockSkewError, HybridClock, Timestamp
from meshmail.state.journal import Journal
from meshmail.state.lww import Entry, LWWMap, chunks, decode_entries, encode_entries
from meshmail.state.names import InvalidName, normalize_address, normalize_domain
from meshmail.state.records import (
    CONTROL_NAMESPACES,
    AddressOverride,
    BadEntry,
    DomainClaim,
    DomainRoute,
    check_value,
    make_key,
    namespace_of,
    split_key,
)

DAY_MS = 24 * 3600 * 1000
DEFAULT_GC_GRACE_MS = 7 * DAY_MS
#: Largest anti-entropy message or entry batch accepted; chunks we send are at most SYNC_CHUNK_BYTES.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
SYNC_CHUNK_BYTES = 1024 * 1024
#: Most entries one batch may hold (a 1 MiB chunk of the smallest entries holds about 20,000).
MAX_BATCH_ENTRIES = 65_536
#: The log is folded into a snapshot once it is larger than this and than the snapshot.
DEFAULT_COMPACT_MIN_BYTES = 4 * 1024 * 1024
#: record_sync persists the sync time at most this often: an older value only makes the
#: away-too-long check stricter.
SYNC_PERSIST_INTERVAL_MS = 10 * 60 * 1000
#: Version of the anti-entropy messages (sync_offer, sync_answer, sync_request).
SYNC_VERSION = 1

_DOMAIN = "domain/"
_ADDRESS = "address/"
_CLAIM = "claim/"
#: Namespaces the map indexes (found without a scan): the control records and the claims,
#: which are few beside the domains (one per domain two slaves list).
_INDEXED = (*CONTROL_NAMESPACES, "claim")


class SyncError(ValueError):
    """An anti-entropy message that cannot be used; the message says why. Count it and drop it."""


@attrs.frozen
class ApplyResult:
    """What apply() did with a batch: entries applied, stale (older than or equal to what we
    hold), rejected by reason ("bad_batch", "invalid_name", "future_timestamp"), skipped for an
    unknown namespace (from a newer node), and for a bad batch the reason in words."""

    applied: int = 0
    stale: int = 0
    rejected: dict[str, int] = attrs.field(factory=dict)
    skipped: int = 0
    error: str | None = None
    #: The namespaces of the applied entries (what a watcher of some namespace checks).
    namespaces: frozenset[str] = frozenset()


# Journal records: msgpack maps {"t": type, ...}; unknown types and fields are ignored.
#   {"t": "entries", "b": <encode_entries batch>, "h": [wall_ms, logical]}  ("h": clock high water)
#   {"t": "hlc", "h": [wall_ms, logical]}
#   {"t": "synced", "ms": unix_ms}                      (last anti-entropy with any peer)
# Older versions also wrote "conflicts" records (the claims this node saw lose a merge);
# conflicts are claim records in the map now, and those records are skipped.


def _record(kind: str, **fields: Any) -> bytes:
    return msgpack.packb({"t": kind, **fields})


def _hlc_field(ts: Timestamp) -> list[int]:
    return [ts.wall_ms, ts.logical]


class ClusterState:
    """The replicated map of one node: domain routes, claims and address overrides, and the
    cluster's own records.

    Durability. Every local write is in the journal (fsynced) before it returns; apply()
    persists what it applied in one append. The clock's high water mark goes with each
    record, so timestamps stay monotonic across restarts even if the physical clock goes back.
    On open the map is loaded from disk: a node routes before it has talked to anyone.

    Conflicts. A slave that lists a domain another slave routes writes a claim record
    (``claim/<domain>/<slave>``, see write_domains) rather than the route; conflicts() is each
    routed domain with the claims of the other slaves, the same on every node that holds the
    same map. An admin's route ends a conflict; so does the claimant dropping the domain.

    Tombstones and long absence. gc() drops tombstones older than gc_grace, after which a
    peer could bring the deleted key back with an old live entry. So the time of the last
    sync with any peer is persisted, and a node opened more than gc_grace after it is `stale`:
    its old map still routes (if the whole cluster was down that long it is all there is),
    but anti-entropy offers and fills an empty replica, which replaces the map at the first
    completed sync (`discarded` then says how many keys went). That is how a node that was
    away too long never brings deleted entries back. A node that never synced keeps its map.

    Anti-entropy (the two-level exchange of LWWMap, as bytes; A starts, B answers):
    A ``offer = sync_offer()``; B ``answer = sync_answer(offer)``; A ``request =
    sync_request(answer)`` and sends ``sync_entries(answer)``; B sends
    ``sync_entries(request)``; each side apply()s the chunks it receives. In sync, the
    exchange is the offer (about 600 bytes) and an answer of a few bytes. Every message is
    at most MAX_MESSAGE_BYTES; bad input raises SyncError.

    Off the caller's thread. A trio caller must not block its loop on an fsync, so each write
    also comes in steps: local writes are stage_domains() on the loop, persist() in a worker
    thread, then merge_staged() (or unstage() if persist failed) on the loop; a peer's batch
    is receive() on the loop (merged at once, as apply() does), then persist() in a thread;
    compaction is compact_if_due() in a thread. persist() and compaction take a lock that the
    inline writes hold across their append and merge, so the log is never folded into a
    snapshot while it holds an entry the map does not, and a staged write holds compaction
    off until it is merged or unstaged. Everything else is for one thread: the caller's loop.
    The caller runs one staged write or compaction at a time (replication.Replication does).
    """

    def __init__(
        self,
        journal: Journal,
        clock: HybridClock,
        physical_ms: Callable[[], int],
        *,
        gc_grace_ms: int,
        compact_min_bytes: int,
    ) -> None:
        """Use ClusterState.open."""
        self._journal = journal
        self.clock = clock
        self._physical_ms = physical_ms
        self.gc_grace_ms = gc_grace_ms
        self.compact_min_bytes = compact_min_bytes
        #: What routing reads.
        self.map = LWWMap(indexed=_INDEXED)
        #: What anti-entropy offers and fills: the same map, except while `stale`.
        self._replica = self.map
        #: Away longer than gc_grace: the old map still routes, but is never offered to a
        #: peer (it may hold entries deleted meanwhile); a fresh replica fills from peers
        #: and replaces it at the first completed sync.
        self.stale = False
        self._last_sync: dict[str, int] = {}
        self._synced_at: int | None = None
        #: Entries dropped when a stale map was replaced by a fresh one from a peer.
        self.discarded = 0
        #: Journal records that could not be read on open (from a newer version, or a bug).
        self.unreadable_records = 0
        #: Tombstones dropped by gc() since open, past the grace.
        self.tombstones_dropped = 0
        #: Held across every journal write and the merge that goes with it (see the class docstring).
        self._disk = threading.Lock()
        #: Local writes staged and not yet merged or unstaged: compaction waits for them.
        self._staged = 0

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        node_id: str,
        physical_ms: Callable[[], int],
        *,
        max_skew_ms: int = 60_000,
        gc_grace_ms: int = DEFAULT_GC_GRACE_MS,
        fsync: bool = True,
        compact_min_bytes: int = DEFAULT_COMPACT_MIN_BYTES,
    ) -> ClusterState:
        """Open the journal in `directory`, load the map, and restore the clock.

        `physical_ms` returns Unix milliseconds (injected; it may go backwards). Raises
        JournalError as Journal.open does (in use, not a journal, damaged beyond a crash).
        """
        journal = Journal.open(directory, fsync=fsync)
        try:
            state = cls._load(journal, node_id, physical_ms, max_skew_ms, gc_grace_ms, compact_min_bytes)
        except BaseException:
            journal.close()
            raise
        return state

    @classmethod
    def _load(cls, journal, node_id, physical_ms, max_skew_ms, gc_grace_ms, compact_min_bytes) -> ClusterState:
        clock = HybridClock(node_id, physical_ms, max_skew_ms)
        state = cls(journal, clock, physical_ms, gc_grace_ms=gc_grace_ms, compact_min_bytes=compact_min_bytes)
        floor = (0, 0)
        for raw in journal.load():
            try:
                floor = max(floor, state._replay(raw))
            except (ValueError, TypeError, KeyError, msgpack.UnpackException):
                state.unreadable_records += 1
        state.clock = HybridClock(node_id, physical_ms, max_skew_ms, floor=Timestamp(*floor, clock.node))
        now = physical_ms()
        state.gc(now)
        state.tombstones_dropped = 0  # dropped before the restart already; the journal kept them
        state.mark_stale_if_away(now)
        return state

    def _replay(self, raw: bytes) -> tuple[int, int]:
        """Apply one journal record; returns the highest (wall_ms, logical) it holds."""
        record = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        kind = record["t"]
        high = (0, 0)
        if "h" in record:
            wall_ms, logical = record["h"]
            Timestamp(wall_ms, logical, self.clock.node)  # validates both
            high = (wall_ms, logical)
        if kind == "entries":
            for entry in decode_entries(record["b"], max_entries=1 << 30).entries:
                self.map.merge(entry)
                high = max(high, (entry.wall_ms, entry.logical))
        elif kind == "synced":
            self._synced_at = int(record["ms"])
        return high

    @property
    def fsyncs(self) -> bool:
        """Whether journal writes are fsynced (False only when opened with fsync=False)."""
        return self._journal.fsyncs

    def close(self) -> None:
        """Close the journal. Idempotent."""
        self._journal.close()

    def __enter__(self) -> ClusterState:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Local writes.

    def assign_domain(self, name: str, slave: str, source: str = "admin") -> Entry:
        """Route domain `name` to `slave`; `source` is "admin" or "slave" (the slave published it).

        Returns the entry, durable, for the caller to broadcast as ``encode_entries([entry])``.
        If the domain already has this very route, nothing is written and the held entry is
        returned (a slave republishing its domains causes no churn). Raises InvalidName for a bad name,
        ValueError or TypeError for a bad slave or source.
        """
        return self._write(make_key("domain", normalize_domain(name)), DomainRoute(slave, source))

    def unassign_domain(self, name: str) -> Entry | None:
        """Delete the route of domain `name` (a tombstone); None if it has none."""
        return self._write(make_key("domain", normalize_domain(name)), None)

    def override_address(self, address: str, slave: str) -> Entry:
        """Route the mailbox `address` to `slave`, whatever its domain's route says."""
        return self._write(make_key("address", str(normalize_address(address))), AddressOverride(slave))

    def clear_override(self, address: str) -> Entry | None:
        """Delete the override of `address`; None if it has none."""
        return self._write(make_key("address", str(normalize_address(address))), None)

    def put(self, ns: str, name: str, value: Any) -> Entry:
        """Set ``<ns>/<name>`` to a record of that namespace (durable, like assign_domain).

        For the cluster's own records (records.CONTROL_NAMESPACES); domains and addresses go
        through their methods, which normalize the name. Raises BadEntry for a bad key or value.
        """
        if ns not in CONTROL_NAMESPACES:
            raise BadEntry(f"put() is for the control namespaces, not {ns!r}")
        key = make_key(ns, name)
        check_value(ns, value)
        return self._write(key, value)

    def delete(self, ns: str, name: str) -> Entry | None:
        """Delete ``<ns>/<name>`` of a control namespace (a tombstone); None if it was absent."""
        if ns not in CONTROL_NAMESPACES:
            raise BadEntry(f"delete() is for the control namespaces, not {ns!r}")
        return self._write(make_key(ns, name), None)

    def get(self, ns: str, name: str) -> Any:
        """The record at ``<ns>/<name>``, or None. O(1)."""
        return self.map.get(f"{ns}/{name}")

    def entry(self, ns: str, name: str) -> Entry | None:
        """The entry (with its timestamp) at ``<ns>/<name>``, tombstones included, or None."""
        return self.map.entry(f"{ns}/{name}")

    def records(self, ns: str, prefix: str = "") -> Iterator[tuple[str, Any]]:
        """(name, record) of the live keys of control namespace `ns` whose name starts with
        `prefix`, sorted by name; no scan of the domain map."""
        start = len(ns) + 1
        for key, value in self.map.items(ns + "/"):
            if key.startswith(prefix, start):
                yield key[start:], value

    def write_domains(
        self, routes: Iterable[tuple[str, DomainRoute | None]], claims: Iterable[tuple[str, str, bool]] = ()
    ) -> list[Entry]:
        """Set (or with None delete) many domain routes, and set or delete claims, in one journal
        append: what a slave publishing thousands of domains needs. `claims` are (domain, slave,
        whether it claims the domain). Names must be in normal form (normalize_domain); returns
        the entries written (unchanged routes and claims write nothing)."""
        return self._write_many(_domain_items(routes, claims))

    def _write(self, key: str, value: Any) -> Entry | None:
        written = self._write_many([(key, value)])
        if written:
            return written[0]
        held = self.map.entry(key)
        # Nothing to write: a tombstone of an absent key, or the very value held (a slave
        # agent republishing its routes causes no churn).
        return None if held is None or held.value is None else held

    def _write_many(self, items: list[tuple[str, Any]]) -> list[Entry]:
        entries = self._stage(items)
        if not entries:
            return []
        # Journal first: if the disk fails, the map does not hold what was never persisted.
        with self._disk:
            self._append(entries)
            for entry in entries:
                self._merge(entry)
        self.maybe_compact()
        return entries

    def _stage(self, items: list[tuple[str, Any]]) -> list[Entry]:
        """The entries writing `items` takes: none for a value held already or a tombstone of an absent key."""
        entries: list[Entry] = []
        pending: dict[str, Entry] = {}
        for key, value in items:
            held = pending.get(key) or self.map.entry(key)
            if held is None or held.value is None:
                if value is None:
                    continue
            elif held.value == value:
                continue
            entry = Entry(key, value, self.clock.now())
            pending[key] = entry
            entries.append(entry)
        return entries

    # Local writes in steps, for a caller that persists in a worker thread (see the class docstring).

    def stage_domains(
        self, routes: Iterable[tuple[str, DomainRoute | None]], claims: Iterable[tuple[str, str, bool]] = ()
    ) -> list[Entry]:
        """The entries write_domains would write, with their timestamps, neither persisted nor
        merged. Unless the list is empty, persist() it, then merge_staged() it or unstage()."""
        entries = self._stage(_domain_items(routes, claims))
        if entries:
            self._staged += 1
        return entries

    def merge_staged(self, entries: list[Entry]) -> None:
        """Merge staged entries once persist() returned; the caller then runs compact_if_due."""
        self._staged -= 1
        for entry in entries:
            self._merge(entry)

    def unstage(self) -> None:
        """Give up staged entries whose persist() failed: the map never holds them."""
        self._staged -= 1

    def persist(self, entries: list[Entry]) -> None:
        """Append `entries` (staged, or applied by receive) to the journal in one record; durable
        when this returns. Blocking file I/O, safe in a worker thread. Raises OSError or JournalError."""
        with self._disk:
            self._append(entries)

    # Remote input.

    def apply(self, data: bytes, *, compact: bool = True) -> ApplyResult:
        """Merge a batch of entries from a peer (a delta or an anti-entropy chunk).

        With compact=False the journal is not compacted here: a sync applying many chunks
        compacts once at its end (maybe_compact) rather than rewriting a growing map each time.

        A malformed batch is rejected whole (rejected["bad_batch"], `error` says why). An entry
        whose domain or address key is not in normal form is rejected ("invalid_name"), one
        more than max_skew_ms in the future too ("future_timestamp"); the others are merged.
        Applied entries are persisted in one journal append. Never raises for bad input;
        raises OSError or JournalError if the journal cannot be written.
        """
        result, applied = self.receive(data)
        if applied:
            self.persist(applied)
            if compact:
                self.maybe_compact()
        return result

    def receive(self, data: bytes) -> tuple[ApplyResult, list[Entry]]:
        """apply() without the disk: merge the batch, and return what was applied for the
        caller to persist() (in a worker thread if it likes) before it counts as durable."""
        try:
            if not isinstance(data, bytes | bytearray | memoryview) or len(data) > MAX_MESSAGE_BYTES:
                raise BadEntry(f"batch must be bytes of at most {MAX_MESSAGE_BYTES}")
            decoded = decode_entries(data, MAX_BATCH_ENTRIES)
        except BadEntry as exc:
            return ApplyResult(rejected={"bad_batch": 1}, error=str(exc)), []
        rejected: dict[str, int] = {}
        applied: list[Entry] = []
        stale = 0
        # Writes of a node after it was removed are refused: a removed master that did not
        # hear of its removal must not go on admitting nodes or minting tokens through
        # whoever relays its records. (Against a node that forges its clock, rotate the key.)
        removed_at = {name: record.at_ms for name, record in self.records("removed")}
        for entry in decoded.entries:
            if not _normal_key(entry.key):
                rejected["invalid_name"] = rejected.get("invalid_name", 0) + 1
                continue
            if removed_at and entry.node in removed_at and entry.wall_ms > removed_at[entry.node]:
                rejected["removed_writer"] = rejected.get("removed_writer", 0) + 1
                continue
            try:
                self.clock.observe_parts(entry.wall_ms, entry.logical, entry.node)
            except ClockSkewError:
                rejected["future_timestamp"] = rejected.get("future_timestamp", 0) + 1
                continue
            if self._merge(entry):
                applied.append(entry)
            else:
                stale += 1
        namespaces = frozenset(namespace_of(entry.key) for entry in applied)
        return ApplyResult(len(applied), stale, rejected, decoded.skipped, namespaces=namespaces), applied

    def _merge(self, entry: Entry) -> bool:
        """Merge into the routing map and, while stale, into the fresh replica too."""
        fresh = self._replica is not self.map and self._replica.merge(entry)
        return self.map.merge(entry) or fresh

    def _append(self, entries: list[Entry]) -> None:
        batch = encode_entries(entries)
        self._journal.append(_record("entries", b=batch, h=_hlc_field(self.clock.high_water)))

    # Reads.

    def domain(self, name: str) -> DomainRoute | None:
        """The route of domain `name`, or None. O(1), no normalization: pass the normal form
        (names.normalize_domain); another spelling of the name is not found."""
        return self.map.get(_DOMAIN + name)

    def override(self, address: str) -> AddressOverride | None:
        """The override of `address` ("local@domain" in normal form, see domain()), or None."""
        return self.map.get(_ADDRESS + address)

    def domains(self, slave: str | None = None) -> Iterator[tuple[str, DomainRoute]]:
        """(domain, route) of every routed domain, or of those routed to `slave`; unordered."""
        for key, route in self.map.items(_DOMAIN):
            if slave is None or route.slave == slave:
                yield key[len(_DOMAIN) :], route

    def claims(self, slave: str | None = None) -> Iterator[tuple[str, str]]:
        """(domain, slave) of every claim, or of those of `slave`; sorted, no scan of the map."""
        for key, _ in self.map.items(_CLAIM):
            domain, _, claimant = key[len(_CLAIM) :].rpartition("/")
            if slave is None or claimant == slave:
                yield domain, claimant

    @property
    def live(self) -> int:
        """The number of live keys of every namespace."""
        return len(self.map)

    @property
    def routes(self) -> int:
        """The number of live domain routes and address overrides."""
        return len(self.map) - sum(self.map.count(ns) for ns in _INDEXED)

    @property
    def tombstones(self) -> int:
        return self.map.tombstones

    def digest_summary(self) -> str:
        """A short hex digest of the whole map: equal on replicas holding the same entries
        (after dropping the tombstones past the grace, as an exchange does)."""
        self._collect()
        packed = b"".join(d.to_bytes(8, "big") for d in self.map.group_digests())
        return blake2b(packed, digest_size=8).hexdigest()

    @property
    def last_sync(self) -> dict[str, int]:
        """peer -> Unix ms of the last anti-entropy with it, since open."""
        return dict(self._last_sync)

    @property
    def synced_at(self) -> int | None:
        """Unix ms of the last sync with any peer as persisted (None: never, or resynced)."""
        return self._synced_at

    # Conflicts.

    def conflicts(self) -> list[tuple[str, str, list[str]]]:
        """(domain, slave that routes it, [other slaves that claim it]) per conflicting domain,
        sorted. A domain an admin routed has none (an admin decided), and a removed slave's
        claims are not counted (it can never drop them)."""
        claimants: dict[str, list[str]] = {}
        for domain, slave in self.claims():
            claimants.setdefault(domain, []).append(slave)
        result = []
        for domain, slaves in claimants.items():
            route = self.domain(domain)
            if route is None or route.source != "slave":
                continue
            others = sorted(s for s in slaves if s != route.slave and self.get("removed", s) is None)
            if others:
                result.append((domain, route.slave, others))
        return sorted(result)

    # Maintenance.

    def gc(self, now_ms: int) -> int:
        """Drop tombstones older than now_ms - gc_grace; returns how many. The journal keeps
        them until the next compaction (they are dropped again on open). Cheap when there is
        nothing to drop: the exchange calls it every time."""
        horizon = now_ms - self.gc_grace_ms
        if self._replica is not self.map:
            self._replica.gc(horizon)
        dropped = self.map.gc(horizon)
        self.tombstones_dropped += dropped
        return dropped

    def _collect(self) -> None:
        # A tombstone past the grace is refused by a peer that collected it, so it cannot be
        # sent across: both sides drop it before comparing digests, or the digests of a node
        # that collected (at open, say) and of one that did not yet would differ until its
        # next maintenance.
        self.gc(self._physical_ms())

    def maybe_compact(self) -> bool:
        """Compact if the log outgrew compact_min_bytes and the snapshot; True if it did."""
        return self.compact_if_due()

    def compact_if_due(self) -> bool:
        """maybe_compact, safe in a worker thread while the caller's thread merges (the map is
        copied a bucket at a time); it waits while a staged write is neither merged nor unstaged."""
        with self._disk:
            log = self._journal.log_size()
            if self._staged or log <= self.compact_min_bytes or log <= self._journal.size() - log:
                return False
            self._journal.compact(self._snapshot_records())
            return True

    def compact(self) -> None:
        """Replace the journal by a snapshot of the whole map, the clock and the sync time."""
        with self._disk:
            self._journal.compact(self._snapshot_records())

    def _snapshot_records(self) -> Iterator[bytes]:
        yield _record("hlc", h=_hlc_field(self.clock.high_water))
        if self._synced_at is not None:
            yield _record("synced", ms=self._synced_at)
        for batch in chunks(self.map.entries_in(), SYNC_CHUNK_BYTES):
            yield _record("entries", b=batch)

    def mark_stale_if_away(self, now_ms: int) -> bool:
        """Become `stale` if the last sync with any peer is more than gc_grace before now_ms.

        Called by open; a running node cut off from every peer that long may call it too.
        The map keeps routing (if the whole cluster was down that long, it is all there is),
        but from now on anti-entropy offers and fills an empty replica, which replaces the
        map at the next completed sync (`record_sync`). A node that never synced is not stale.
        """
        last = max([self._synced_at or 0, *self._last_sync.values()])
        if self.stale or not last or now_ms - last <= self.gc_grace_ms:
            return self.stale
        self.stale = True
        self._replica = LWWMap(indexed=_INDEXED)
        return True

    def record_sync(self, peer: str, now_ms: int, *, persist: bool = True) -> bool:
        """Note a completed anti-entropy exchange with `peer` at now_ms (persisted, at most
        every SYNC_PERSIST_INTERVAL_MS). A stale node now routes from the fresh replica, and
        compacts here: once in the life of a node away too long.

        Returns whether the sync time was due to be persisted; with persist=False the caller
        then does it (persist_sync, in a worker thread if it likes)."""
        if self.stale:
            self.discarded = sum(1 for e in self.map.entries_in() if self._replica.entry(e.key) is None)
            self.map = self._replica
            self.stale = False
            self._last_sync.clear()
            self._synced_at = None
            self.compact()
        self._last_sync[peer] = now_ms
        due = self._synced_at is None or now_ms - self._synced_at >= SYNC_PERSIST_INTERVAL_MS
        if due and persist:
            self.persist_sync(now_ms)
        return due

    def persist_sync(self, now_ms: int) -> None:
        """Persist now_ms as the time of the last sync (record_sync does when due); safe in a worker thread."""
        with self._disk:
            self._journal.append(_record("synced", ms=now_ms))
            self._synced_at = now_ms

    # Anti-entropy.

    def sync_offer(self) -> bytes:
        """Exchange step 1, from A: our group digests."""
        self._collect()
        return msgpack.packb({"v": SYNC_VERSION, "g": self._replica.group_digests()})

    def sync_answer(self, offer: bytes) -> bytes:
        """Exchange step 2, from B: the groups that differ from the offer and our bucket digests of them."""
        message = self._decode(offer)
        self._collect()
        try:
            groups = self._replica.differing_groups(message.get("g"))
        except BadEntry as exc:
            raise SyncError(f"bad offer: {exc}") from None
        return msgpack.packb({"v": SYNC_VERSION, "g": groups, "d": self._replica.digests(groups)})

    def sync_request(self, answer: bytes) -> bytes:
        """Exchange step 3, from A: the buckets that differ, for the peer to send its entries of them."""
        return msgpack.packb({"v": SYNC_VERSION, "b": self._buckets(answer)})

    def sync_entries(self, answer_or_request: bytes) -> Iterator[bytes]:
        """Our entries of the buckets that differ, as batches for apply(), each at most
        SYNC_CHUNK_BYTES. Raises SyncError (before yielding anything) on a bad message."""
        return chunks(self._replica.entries_in(self._buckets(answer_or_request)), SYNC_CHUNK_BYTES)

    def _buckets(self, message_bytes: bytes) -> list[int]:
        """Bucket ids named by a request, or differing according to an answer."""
        message = self._decode(message_bytes)
        try:
            if "b" in message:
                buckets = message["b"]
                if not isinstance(buckets, list) or len(buckets) > self._replica.buckets:
                    raise BadEntry("b is not a list of bucket ids")
                for bucket in buckets:
                    if type(bucket) is not int or not 0 <= bucket < self._replica.buckets:
                        raise BadEntry(f"bucket id {bucket!r} out of range")
                return list(dict.fromkeys(buckets))
            groups = message.get("g")
            if not isinstance(groups, list) or len(groups) > self._replica.groups:
                raise BadEntry("g is not a list of group ids")
            return self._replica.differing(message.get("d"), groups)
        except BadEntry as exc:
            raise SyncError(f"bad sync message: {exc}") from None

    def _decode(self, data: bytes) -> dict:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise SyncError(f"sync message must be bytes, not {type(data).__name__}")
        if len(data) > MAX_MESSAGE_BYTES:
            raise SyncError(f"sync message of {len(data)} bytes, over {MAX_MESSAGE_BYTES}")
        try:
            message = msgpack.unpackb(
                data, raw=False, strict_map_key=True, max_array_len=self._replica.buckets, max_map_len=16
            )
        except Exception as exc:  # msgpack raises a handful of unrelated types
            raise SyncError(f"bad msgpack: {type(exc).__name__}") from None
        if not isinstance(message, dict) or message.get("v") != SYNC_VERSION:
            raise SyncError(f"not a sync message of version {SYNC_VERSION}")
        return message


def _domain_items(
    routes: Iterable[tuple[str, DomainRoute | None]], claims: Iterable[tuple[str, str, bool]]
) -> list[tuple[str, Any]]:
    items = [(make_key("domain", name), route) for name, route in routes]
    items += [(make_key("claim", f"{name}/{slave}"), DomainClaim() if on else None) for name, slave, on in claims]
    return items


def _normal_key(key: str) -> bool:
    """Whether a domain, claim or address key names its domain, slave or address in normal form."""
    ns, name = split_key(key)
    try:
        if ns == "domain":
            return normalize_domain(name) == name
        if ns == "claim":
            domain, _, slave = name.rpartition("/")
            return normalize_domain(domain) == domain and NODE_NAME.fullmatch(slave) is not None
        if ns == "address":
            return str(normalize_address(name)) == name
    except InvalidName:
        return False
    return True
