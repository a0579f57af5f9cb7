"""A node that crashed anywhere in a write, an apply, a resync or the compaction they set off
comes back with a map that anti-entropy brings level with its peer's: after one exchange
each way the digests are equal, every acknowledged write is there on both, and the next
exchange moves nothing.

Both nodes hold what the digests cover besides live routes: tombstones (one of them past
the grace by the time the crashed node is back), claims, a removed node's record, an entry
written ahead of the crashed node's clock. The exchange is the one Replication runs on a
push-pull (offer, answer, request, entries both ways, then record_sync and maybe_compact).
Last, a real process SIGKILLed while it writes and compacts, reopened and synced each time.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from meshmail.state.hlc import Timestamp
from meshmail.state.lww import Entry, encode_entries
from meshmail.state.records import DomainRoute, RemovedNode
from meshmail.state.replica import DAY_MS, ClusterState

START_MS = 1_700_000_000_000
GRACE_MS = DAY_MS
#: Small enough that the operation under test compacts the journal.
COMPACT_BYTES = 1500
#: The peer's clock runs this far ahead (under the 60 s skew limit): its entries are ahead of ours.
PEER_AHEAD_MS = 30_000
REPO = Path(__file__).resolve().parents[2]


class Node:
    """A ClusterState with a physical clock the test sets, reopened as after a crash."""

    def __init__(self, directory, name: str) -> None:
        self.directory, self.name, self.ms = directory, name, START_MS
        self.state = self._open()

    def _open(self) -> ClusterState:
        return ClusterState.open(
            self.directory, self.name, lambda: self.ms, gc_grace_ms=GRACE_MS, compact_min_bytes=COMPACT_BYTES
        )

    def restart(self) -> ClusterState:
        self.state.close()  # releases the lock as the kernel does for a dead process; writes nothing
        self.state = self._open()
        return self.state


def exchange(client: Node, server: Node, *, finish: bool = True) -> int:
    """One anti-entropy exchange as Replication runs it; returns how many entries moved.
    Without `finish`, neither side records the sync yet."""
    a, b = client.state, server.state
    answer = b.sync_answer(a.sync_offer())
    request = a.sync_request(answer)
    ours = list(a.sync_entries(answer))
    moved = 0
    for chunk in ours:
        result = b.apply(chunk, compact=False)
        assert not result.rejected, result
        moved += result.applied + result.stale
    for chunk in list(b.sync_entries(request)):
        result = a.apply(chunk, compact=False)
        assert not result.rejected, result
        moved += result.applied + result.stale
    for node, peer in ((client, server), (server, client)) if finish else ():
        node.state.record_sync(peer.name, node.ms)
        node.state.maybe_compact()
    return moved


def entries(state: ClusterState) -> dict[str, Entry]:
    return {e.key: e for e in state.map.entries_in()}


def prepare(tmp_path, tag: str) -> tuple[Node, Node, dict[str, object]]:
    """m1 and its peer m2 in step, holding every kind of entry; returns them and the acknowledged
    writes {key: value or None}."""
    m1, m2 = Node(tmp_path / tag / "m1", "m1"), Node(tmp_path / tag / "m2", "m2")
    m2.ms += PEER_AHEAD_MS
    acked: dict[str, object] = {}

    def ack(entry: Entry | None) -> None:
        assert entry is not None
        acked[entry.key] = entry.value

    ack(m1.state.assign_domain("expired.org", "s1"))
    ack(m1.state.unassign_domain("expired.org"))  # past the grace once m1 is back
    m1.ms = m2.ms = START_MS + GRACE_MS // 2
    m2.ms += PEER_AHEAD_MS
    old = Entry("domain/by-gone.org", DomainRoute("s3", "admin"), Timestamp(START_MS + 5, 0, "gone"))
    assert m1.state.apply(encode_entries([old])).applied == 1
    ack(m1.state.entry("domain", "by-gone.org"))
    ack(m1.state.put("removed", "gone", RemovedNode("admin", START_MS + 10)))
    for i in range(20):
        ack(m1.state.assign_domain(f"d{i}.org", f"s{i % 3}", source="slave"))
    ack(m1.state.unassign_domain("d3.org"))
    for entry in m1.state.write_domains([], [("d1.org", "s2", True), ("d2.org", "s0", True)]):
        ack(entry)
    ack(m2.state.assign_domain("ahead.org", "s2"))  # written ahead of m1's clock
    ack(m2.state.clear_override("nobody@d1.org") or m2.state.override_address("u@d1.org", "s1"))
    exchange(m1, m2)
    exchange(m2, m1)
    assert m1.state.digest_summary() == m2.state.digest_summary()
    return m1, m2, acked


# Each operation prepares what it needs and returns what m1 does next, where it may crash.
Operation = Callable[[Node, Node, dict], Callable[[], object]]


def write(m1: Node, m2: Node, acked: dict) -> Callable[[], object]:
    routes = [(f"new{i}.org", DomainRoute("s1", "slave")) for i in range(40)]  # outgrows the snapshot

    def run() -> None:
        m1.state.write_domains(routes)
        acked.update((f"domain/{name}", route) for name, route in routes)

    return run


def apply(m1: Node, m2: Node, acked: dict) -> Callable[[], object]:
    written = [m2.state.assign_domain(f"peer{i}.org", "s2") for i in range(40)]
    written.append(m2.state.unassign_domain("d4.org"))
    acked.update((e.key, e.value) for e in written)  # acknowledged by m2, whatever m1 does
    return lambda: m1.state.apply(encode_entries(written))


def gc_and_compact(m1: Node, m2: Node, acked: dict) -> Callable[[], object]:
    m1.ms += GRACE_MS // 2 + 1  # the first tombstone is past the grace now
    m2.ms += GRACE_MS // 2 + 1
    exchange(m1, m2)  # keeps m1 from turning stale before the end of the test

    def run() -> None:
        m1.state.gc(m1.ms)
        m1.state.compact()

    return run


def resync(m1: Node, m2: Node, acked: dict) -> Callable[[], object]:
    """m1, back after more than the grace, replaces its stale map at the end of an exchange:
    record_sync compacts the fresh map into the journal."""
    m1.state.assign_domain("deleted-while-away.org", "s1")
    m1.state.record_sync("m2", m1.ms)
    m2.state.unassign_domain("d5.org")
    acked["domain/d5.org"] = None
    m1.ms += 2 * GRACE_MS
    m2.ms += 2 * GRACE_MS
    assert m1.restart().stale
    exchange(m1, m2, finish=False)
    m2.state.record_sync("m1", m2.ms)
    return lambda: m1.state.record_sync("m2", m1.ms)


OPERATIONS: dict[str, Operation] = {
    "write": write,
    "apply": apply,
    "gc_and_compact": gc_and_compact,
    "resync": resync,
}


def crashing_step_counts(tmp_path, crash_at, operation: Operation) -> int:
    m1, m2, acked = prepare(tmp_path, "count")
    run = operation(m1, m2, acked)
    with crash_at(None) as calls:
        run()
    assert calls.count("replace") >= 2, "the operation never compacted"
    for node in (m1, m2):
        node.state.close()
    return len(calls)


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_a_node_restarted_after_a_crash_at_any_step_converges_with_its_peer(tmp_path, crash_at, name):
    operation = OPERATIONS[name]
    steps = crashing_step_counts(tmp_path, crash_at, operation)
    generations = set()
    for step in range(steps + 1):
        m1, m2, acked = prepare(tmp_path, f"crash{step}")
        run = operation(m1, m2, acked)
        with crash_at(step):
            run()
        m1.ms += GRACE_MS // 2 + 1  # the first tombstone is past the grace now, on both
        m2.ms += GRACE_MS // 2 + 1
        m1.restart()
        generations.add(m1.state._journal.generation)
        assert not m1.state.stale or name == "resync"
        m2.state.assign_domain("while-m1-was-down.org", "s2")
        acked["domain/while-m1-was-down.org"] = DomainRoute("s2", "admin")

        exchange(m1, m2)
        exchange(m2, m1)
        a, b = m1.state, m2.state
        assert a.digest_summary() == b.digest_summary(), f"crash at step {step}"
        assert entries(a) == entries(b), f"crash at step {step}"
        for key, value in acked.items():
            assert a.map.get(key) == value, (step, key)
        assert exchange(m1, m2) == 0 and exchange(m2, m1) == 0
        assert not a.stale and a.unreadable_records == 0
        for node in (m1, m2):
            node.state.close()
    assert len(generations) == 2, "the crashes fell on one side of the commit only"


def test_a_restart_collects_the_same_tombstones_as_its_peer_before_they_compare(tmp_path):
    """A reopen drops the tombstones past the grace at once, where a running peer drops them at
    its next maintenance, up to an hour later; meanwhile the peer's copies were refused for their
    age and never sent across, so the digests stayed apart. Each exchange collects first."""
    m1, m2 = Node(tmp_path / "m1", "m1"), Node(tmp_path / "m2", "m2")
    m1.state.assign_domain("gone.org", "s1")
    m1.state.unassign_domain("gone.org")
    m1.state.assign_domain("kept.org", "s1")
    exchange(m1, m2)
    assert m2.state.tombstones == 1
    m1.ms = m2.ms = START_MS + GRACE_MS + 1
    m1.restart()
    assert m1.state.tombstones == 0
    exchange(m1, m2)
    exchange(m2, m1)
    assert m1.state.digest_summary() == m2.state.digest_summary()
    assert (m2.state.tombstones, m2.state.tombstones_dropped) == (0, 1)
    for node in (m1, m2):
        node.state.close()


# A real process killed with SIGKILL while it writes and compacts

CHILD = r"""
import random, sys, time
from meshmail.state.replica import ClusterState

directory, seed, written = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
state = ClusterState.open(directory, "m1", lambda: int(time.time() * 1000), compact_min_bytes=3000)
while True:
    if written and rng.random() < 0.2:
        state.unassign_domain("k%d.org" % rng.randrange(written))
    state.assign_domain("k%d.org" % written, "s%d" % (written % 3))
    written += 1
    sys.stdout.write("%d\n" % written)  # every key below this number is durable, live or deleted
    sys.stdout.flush()
"""


@pytest.mark.parametrize("seed", range(3))
def test_a_node_sigkilled_while_it_writes_and_compacts_converges_with_its_peer(tmp_path, seed):
    rng = random.Random(seed)
    directory = tmp_path / "m1"
    m2 = Node(tmp_path / "m2", "m2")
    durable = 0
    compactions = 0
    for round_ in range(3):  # each child continues the journal the last one left
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(directory), str(seed * 10 + round_), str(durable)],
            stdout=subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert child.stdout is not None
        try:
            target = durable + rng.randint(50, 300)
            while durable < target:
                line = child.stdout.readline()
                assert line, "the child died on its own"
                durable = int(line)
            time.sleep(rng.random() / 200)  # so the kill lands anywhere in a write or a compaction
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        for line in child.stdout.read().splitlines():  # reported before it died
            durable = int(line)
        child.stdout.close()

        m1 = Node(directory, "m1")
        compactions = max(compactions, m1.state._journal.generation)
        m1.ms = m2.ms = int(time.time() * 1000)
        m2.state.assign_domain(f"peer{round_}.org", "s2")
        exchange(m1, m2)
        exchange(m2, m1)
        assert m1.state.digest_summary() == m2.state.digest_summary(), f"round {round_}"
        for state in (m1.state, m2.state):
            assert all(state.map.entry(f"domain/k{i}.org") for i in range(durable)), f"round {round_}"
        assert exchange(m1, m2) == 0
        while m1.state.map.entry(f"domain/k{durable}.org"):  # written, not yet reported, when it died
            durable += 1
        m1.state.close()
    assert compactions > 0
    m2.state.close()
