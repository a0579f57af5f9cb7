"""The journal's fsyncs and compaction run in worker threads, never on the event loop's thread,
and still in order: every write is on disk when it is acknowledged, and nothing is lost to a
compaction racing an append."""

from __future__ import annotations

import os
import threading

import pytest
import trio
from helpers.scripted import Scripted

from meshmail.replication import Replication
from meshmail.state.hlc import Timestamp
from meshmail.state.lww import Entry, encode_entries
from meshmail.state.records import DomainRoute
from meshmail.state.replica import ClusterState

START_MS = 1_700_000_000_000


def now_ms() -> int:
    return START_MS


@pytest.fixture
def fsync_threads(monkeypatch) -> list[int]:
    """The thread of every os.fsync call (the real fsync still runs)."""
    threads: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        threads.append(threading.get_ident())
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return threads


def delta(name: str, slave: str, ms: int = START_MS) -> bytes:
    return encode_entries([Entry(f"domain/{name}", DomainRoute(slave, "admin"), Timestamp(ms, 0, "peer"))])


async def test_a_slave_publishing_fsyncs_in_a_worker_thread_and_is_durable_when_it_returns(tmp_path, fsync_threads):
    with ClusterState.open(tmp_path, "a", now_ms) as state:
        replication = Replication(state, now_ms)
        fsync_threads.clear()  # the ones of open()
        routes = [(f"d{i}.example", DomainRoute("s1", "slave")) for i in range(500)]
        entries = await replication.publish_domains(routes, [("x.example", "s1", True)])
        assert len(entries) == 501 and state.domain("d499.example") == DomainRoute("s1", "slave")
        assert fsync_threads and threading.get_ident() not in fsync_threads
    with ClusterState.open(tmp_path, "a", now_ms) as state:  # a crash now would keep them
        assert state.domain("d0.example") == DomainRoute("s1", "slave") and state.claims("s1") is not None
        assert list(state.claims("s1")) == [("x.example", "s1")]


async def test_received_deltas_are_persisted_off_the_loop_in_order_and_kept_at_a_stop(tmp_path, fsync_threads):
    """Deltas are merged at once (routing sees them) and persisted by maintain() in worker
    threads; the later of two deltas for one key wins on disk as in the map, and what is
    still queued when the node stops is flushed before it ends."""
    with ClusterState.open(tmp_path, "a", now_ms) as state:
        replication = Replication(state, now_ms)
        fsync_threads.clear()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(replication.maintain)
            await trio.testing.wait_all_tasks_blocked()
            for i in range(50):
                replication.notify_broadcast(f"domain/k{i}", delta(f"k{i}.example", "s1"))
            replication.notify_broadcast("domain/k0b", delta("k0.example", "s2", START_MS + 1))
            assert state.domain("k0.example") == DomainRoute("s2", "admin")  # merged before any fsync
            with trio.fail_after(10):
                while len(fsync_threads) == 0:
                    await trio.sleep(0.01)
            replication.notify_broadcast("domain/last", delta("last.example", "s1"))
            nursery.cancel_scope.cancel()  # "last" may still be queued: the stop flushes it
        assert fsync_threads and threading.get_ident() not in fsync_threads
    with ClusterState.open(tmp_path, "a", now_ms) as state:
        assert state.domain("k0.example") == DomainRoute("s2", "admin")
        assert state.domain("k49.example") == DomainRoute("s1", "admin")
        assert state.domain("last.example") == DomainRoute("s1", "admin")


async def test_an_anti_entropy_exchange_persists_chunks_sync_time_and_compaction_off_the_loop(tmp_path, fsync_threads):
    """A peer's chunks, the sync time and the compaction they make due all fsync in worker threads."""
    with ClusterState.open(tmp_path / "peer", "peer", now_ms, fsync=False) as peer:
        for i in range(2000):
            peer.assign_domain(f"p{i}.example", "s1")
        with ClusterState.open(tmp_path / "a", "a", now_ms, compact_min_bytes=1024) as state:
            replication = Replication(state, now_ms)
            fsync_threads.clear()
            offer = state.sync_offer()
            answer = peer.sync_answer(offer)
            chunks = list(peer.sync_entries(state.sync_request(answer)))
            await replication.sync_client("peer", Scripted(answer, *chunks, b""))
            assert state.live == 2000 and state.synced_at == START_MS
            assert state._journal.generation == 1  # compacted after the exchange
            assert fsync_threads and threading.get_ident() not in fsync_threads
    with ClusterState.open(tmp_path / "a", "a", now_ms) as state:
        assert state.live == 2000 and state.synced_at == START_MS


def test_a_staged_write_holds_compaction_off_until_merged(tmp_path):
    """Compaction folds the log into a snapshot of the map: an entry persisted but not merged
    yet would be lost from disk, so compact_if_due waits for it."""
    with ClusterState.open(tmp_path, "a", now_ms, fsync=False, compact_min_bytes=64) as state:
        entries = state.stage_domains([(f"d{i}.example", DomainRoute("s1", "slave")) for i in range(20)])
        state.persist(entries)
        assert state.compact_if_due() is False
        state.merge_staged(entries)
        assert state.compact_if_due() is True
        failed = state.stage_domains([("gone.example", DomainRoute("s1", "slave"))])
        state.unstage()  # its persist failed: the map never holds it
        assert state.domain("gone.example") is None
        assert failed
        generation = state._journal.generation
        for i in range(40):  # the log outgrows the snapshot: the inline writes compact again
            state.assign_domain(f"inline{i}.example", "s1")
        assert state._journal.generation > generation
    with ClusterState.open(tmp_path, "a", now_ms, fsync=False) as state:
        assert state.domain("d19.example") == DomainRoute("s1", "slave")
        assert state.domain("inline39.example") == DomainRoute("s1", "admin")


async def test_concurrent_writers_deltas_and_compactions_lose_nothing(tmp_path):
    """Slave publishing, deltas, admin writes on the loop and compactions all at once: every
    entry is on disk afterwards and the journal reopens clean (no interleaved appends)."""
    with ClusterState.open(tmp_path, "a", now_ms, compact_min_bytes=2048) as state:
        replication = Replication(state, now_ms)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(replication.maintain)

            async def publisher(n: int) -> None:
                for batch in range(10):
                    routes = [(f"w{n}-{batch}-{i}.example", DomainRoute(f"s{n}", "slave")) for i in range(30)]
                    await replication.publish_domains(routes)

            async with trio.open_nursery() as writers:
                for n in range(3):
                    writers.start_soon(publisher, n)
                for i in range(200):
                    replication.notify_broadcast(f"domain/r{i}", delta(f"r{i}.example", "s9"))
                    if i % 20 == 0:
                        replication.assign_domain(f"admin{i}.example", "s8")
                    await trio.sleep(0)
            nursery.cancel_scope.cancel()
        assert state._journal.generation > 0  # compactions happened meanwhile
        expected = state.digest_summary()
    with ClusterState.open(tmp_path, "a", now_ms) as state:
        assert state._journal.report.clean
        assert state.live == 3 * 10 * 30 + 200 + 10
        assert state.digest_summary() == expected
