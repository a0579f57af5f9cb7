"""Replication of the cluster state over gossip: the glue between ClusterState and Memberlist.

Local writes go to disk, then out as small deltas through the gossip broadcast queue.
Anti-entropy rides on every push-pull: the two sides exchange group digests, then only the
entries of the buckets that differ, on the same encrypted stream. Bad input is counted in
`counters` (under "state.*"; meshmail.metrics exposes them) and never raised. The journal's
fsyncs of deltas, syncs, slave publishing and compaction run in worker threads, one at a
time, so the event loop the proxy shares never waits on the disk for them.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable
from typing import Any

import trio

from .gossip.memberlist import Conversation, Delegate, FrameError, Memberlist
from .state.journal import JournalError
from .state.lww import Entry, encode_entries
from .state.records import CONTROL_NAMESPACES, DomainRoute
from .state.replica import ApplyResult, ClusterState, SyncError

log = logging.getLogger("meshmail.state")

#: The end of a stream of entry chunks.
END = b""
#: Most entry chunks (1 MiB each) one side may send in one exchange.
MAX_CHUNKS = 4096
#: Deltas remembered by key to skip the duplicates gossip delivers.
RECENT_DELTAS = 65_536
#: Most deltas one batch of writes gossips (see write_domains).
MAX_DELTAS = 256
#: How often tombstones past gc_grace are dropped and a long-isolated node turns stale.
MAINTENANCE_INTERVAL = 3600.0
#: Most received delta entries persisted in one journal record.
PERSIST_BATCH = 4096


class Replication(Delegate):
    """Keeps one node's ClusterState in step with the cluster's.

    Args:
        state: the node's open ClusterState.
        physical_ms: Unix milliseconds, for the last-sync bookkeeping.
    """

    def __init__(self, state: ClusterState, physical_ms) -> None:
        self.state = state
        self.memberlist: Memberlist | None = None
        self.counters: collections.Counter[str] = collections.Counter()
        self._physical_ms = physical_ms
        self._recent: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._watchers: list[tuple[frozenset[str], Callable[[], None]]] = []
        #: Set at the first completed anti-entropy exchange with a peer since start: from then
        #: on the map holds what the cluster held then (what a slave agent waits for, so that
        #: it never claims a domain as unrouted because its own map was behind).
        self.synced = trio.Event()
        #: Held by whoever runs a journal write or compaction in a worker thread: one at a time, in order.
        self._writing = trio.Lock()
        #: Entries of received deltas, merged and not yet persisted (maintain() persists them).
        self._unpersisted: list[Entry] = []
        self._delta_arrived = trio.Event()

    def attach(self, memberlist: Memberlist) -> None:
        """Broadcast deltas through `memberlist` (whose delegate this is)."""
        self.memberlist = memberlist

    # Local writes: durable first, then gossiped. The methods that are not async (admin
    # actions, rare and small) write on the caller's thread; publish_domains, the bulk of a
    # slave's writes, persists in a worker thread.

    def assign_domain(self, name: str, slave: str, source: str = "admin") -> Entry:
        """Route `name` to `slave`; raises InvalidName with the reason."""
        return self._publish(self.state.assign_domain(name, slave, source))

    def unassign_domain(self, name: str) -> Entry | None:
        """Remove the route of `name`; None when there was none."""
        return self._publish(self.state.unassign_domain(name))

    def write_domains(
        self, routes: list[tuple[str, DomainRoute | None]], claims: Iterable[tuple[str, str, bool]] = ()
    ) -> list[Entry]:
        """Set or delete many domain routes and claims in one journal append
        (ClusterState.write_domains). Up to MAX_DELTAS of them go out as deltas; a larger batch
        (a slave's first publish) spreads by anti-entropy, which carries bulk far better than gossip."""
        return self._spread(self.state.write_domains(routes, claims))

    async def publish_domains(
        self, routes: list[tuple[str, DomainRoute | None]], claims: Iterable[tuple[str, str, bool]] = ()
    ) -> list[Entry]:
        """write_domains with the journal append and any compaction in a worker thread; the
        entries are durable, in the map and gossiped when it returns. Raises OSError or
        JournalError if the journal cannot be written (nothing is then in the map)."""
        async with self._writing:
            entries = self.state.stage_domains(routes, claims)
            if not entries:
                return []
            try:
                await self._disk(self.state.persist, entries)
            except BaseException:
                self.state.unstage()
                raise
            self.state.merge_staged(entries)
            await self._disk(self.state.compact_if_due)
        return self._spread(entries)

    def _spread(self, entries: list[Entry]) -> list[Entry]:
        """Gossip a batch of written entries: up to MAX_DELTAS as deltas; a larger batch (a
        slave's first publish) is left to anti-entropy, which carries bulk far better."""
        if len(entries) <= MAX_DELTAS:
            for entry in entries:
                self._publish(entry)
        else:
            self.counters["state.bulk_writes"] += 1
        return entries

    def put(self, ns: str, name: str, value: Any) -> Entry:
        """Write a record of a control namespace (ClusterState.put), durable, then gossip it."""
        entry = self._publish(self.state.put(ns, name, value))
        self._changed({ns})
        return entry

    def delete(self, ns: str, name: str) -> Entry | None:
        """Delete a record of a control namespace; None when there was none."""
        entry = self._publish(self.state.delete(ns, name))
        self._changed({ns})
        return entry

    def watch(self, namespaces: Iterable[str], callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback()` after any write to `namespaces`, local or from a peer, until the
        function returned is called."""
        watcher = (frozenset(namespaces), callback)
        self._watchers.append(watcher)
        return lambda: self._watchers.remove(watcher)

    def _changed(self, namespaces: Iterable[str]) -> None:
        touched = frozenset(namespaces)
        for wanted, callback in self._watchers:
            if wanted & touched:
                try:
                    callback()
                except Exception:
                    log.exception("a watcher of %s failed", ", ".join(sorted(wanted)))

    def _publish(self, entry: Entry | None) -> Entry | None:
        if entry is not None and self.memberlist is not None:
            self.memberlist.queue_broadcast(entry.key, encode_entries([entry]))
        return entry

    async def maintain(self, interval: float = MAINTENANCE_INTERVAL) -> None:
        """Until cancelled: persist the entries of received deltas as they arrive (in worker
        threads), and every `interval` seconds drop tombstones older than gc_grace and turn
        stale if no peer synced with us for longer than that (see ClusterState)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._persist_deltas)
            await self._collect_garbage(interval)

    async def _collect_garbage(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            now = self._physical_ms()
            self.state.gc(now)
            self._count_dropped()
            if self.state.mark_stale_if_away(now):
                self.counters["state.stale"] = 1

    async def _persist_deltas(self) -> None:
        try:
            while True:
                await self._delta_arrived.wait()
                self._delta_arrived = trio.Event()
                await self._flush_deltas()
                await self._in_thread(self.state.compact_if_due)
        finally:
            with trio.CancelScope(shield=True):  # a node stopping keeps what it received
                await self._flush_deltas()

    async def _flush_deltas(self) -> None:
        while self._unpersisted:
            # Taken off the queue once written, so that a cancellation before the write keeps them for the final flush.
            batch = self._unpersisted[:PERSIST_BATCH]
            try:
                await self._in_thread(self.state.persist, batch)
            except (OSError, JournalError) as exc:
                # Merged but not on disk: after a restart anti-entropy brings them back.
                log.error("cannot persist %d received entries: %s", len(batch), exc)
            del self._unpersisted[: len(batch)]

    async def _in_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run a journal write or compaction in a worker thread, after those before it."""
        async with self._writing:
            return await self._disk(function, *args)

    async def _disk(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` in a worker thread; inline when the journal skips fsync (tests and
        benchmarks), where a write is a copy to the page cache: cheaper than a thread, and it
        keeps simulated time (MockClock) from running on while a thread works."""
        if not self.state.fsyncs:
            await trio.lowlevel.checkpoint()
            return function(*args)
        return await trio.to_thread.run_sync(function, *args)

    # Gossip hooks.

    def notify_broadcast(self, key: str, payload: bytes) -> None:
        # Gossip delivers each delta several times; the exact bytes seen recently for a key
        # need no decoding. A delta missed here still arrives by anti-entropy.
        if self._recent.get(key) == payload:
            self._recent.move_to_end(key)
            self.counters["state.delta_duplicates"] += 1
            return
        self._recent[key] = payload
        if len(self._recent) > RECENT_DELTAS:
            self._recent.popitem(last=False)
        result, applied = self.state.receive(payload)
        if applied:
            self._unpersisted += applied
            self._delta_arrived.set()
        self._count(result, "delta")
        if result.applied and self.memberlist is not None:
            # News to us is news to pass on: deltas spread as an epidemic, like membership.
            self.memberlist.queue_broadcast(key, payload)

    async def sync_client(self, peer: str, conversation: Conversation) -> None:
        state = self.state
        await conversation.send(state.sync_offer())
        answer = await conversation.receive()
        try:
            request = state.sync_request(answer)
            # Encoded a chunk at a time between sends, so that a full map never holds the
            # event loop (each bucket is copied when reached: merges meanwhile are safe).
            ours = state.sync_entries(answer)
        except SyncError as exc:
            self._bad(peer, exc)
            return
        await conversation.send(request)
        await self._send_chunks(conversation, ours)
        await self._receive_chunks(peer, conversation)
        await self._synced(peer)

    async def sync_server(self, peer: str, conversation: Conversation) -> None:
        state = self.state
        offer = await conversation.receive()
        try:
            answer = state.sync_answer(offer)
        except SyncError as exc:
            self._bad(peer, exc)
            return
        await conversation.send(answer)
        request = await conversation.receive()
        await self._receive_chunks(peer, conversation)
        try:
            theirs = state.sync_entries(request)  # a chunk at a time, as in sync_client
        except SyncError as exc:
            self._bad(peer, exc)
            return
        await self._send_chunks(conversation, theirs)
        await self._synced(peer)

    async def _synced(self, peer: str) -> None:
        replaced = self.state.stale  # a stale map is replaced by the fresh replica now
        now = self._physical_ms()
        async with self._writing:  # replacing a stale map compacts: not while a write is staged
            if self.state.record_sync(peer, now, persist=False):
                await self._disk(self.state.persist_sync, now)
            await self._disk(self.state.compact_if_due)
        self.counters["state.syncs"] += 1
        self._count_dropped()
        self.synced.set()
        if replaced:
            self._changed(CONTROL_NAMESPACES)

    def _count_dropped(self) -> None:
        # Every exchange drops the tombstones past the grace too, so count them from the state.
        if self.state.tombstones_dropped:  # a name without labels shows in /status once above 0 (metrics.py)
            self.counters["state.tombstones_dropped"] = self.state.tombstones_dropped

    async def _send_chunks(self, conversation: Conversation, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            await conversation.send(chunk)
        await conversation.send(END)

    async def _receive_chunks(self, peer: str, conversation: Conversation) -> None:
        for _ in range(MAX_CHUNKS):
            chunk = await conversation.receive()
            if chunk == END:
                return
            result, applied = self.state.receive(chunk)
            self._count(result, "sync")
            if applied:
                await self._in_thread(self.state.persist, applied)
            else:
                await trio.lowlevel.checkpoint()
        raise FrameError("oversize")

    def _count(self, result: ApplyResult, how: str) -> None:
        if result.namespaces:
            self._changed(result.namespaces)
        self.counters[f"state.{how}_applied"] += result.applied
        for reason, count in result.rejected.items():
            self.counters[f"state.rejected.{reason}"] += count
        if result.skipped:
            self.counters["state.skipped_unknown_namespace"] += result.skipped

    def _bad(self, peer: str, exc: Exception) -> None:
        self.counters["state.rejected.bad_sync"] += 1
        log.warning("state sync with %s refused: %s", peer, exc)
