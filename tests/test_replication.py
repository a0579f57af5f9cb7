"""Replication over gossip: deltas through the broadcast queue, anti-entropy on push-pull.

Real Memberlists and ClusterStates (journals in tmp_path) on the in-memory network, in
simulated time.
"""

from __future__ import annotations

import random

import trio

from meshmail.gossip.keyring import Keyring
from meshmail.gossip.memberlist import Memberlist
from meshmail.gossip.memory import Link, MemoryNetwork
from meshmail.replication import Replication
from meshmail.state.hlc import Timestamp
from meshmail.state.lww import Entry, encode_entries
from meshmail.state.records import DomainRoute
from meshmail.state.replica import ClusterState

KEY = bytes(range(32))
START_MS = 1_700_000_000_000


def wall_ms() -> int:
    return START_MS + int(trio.current_time() * 1000)


class Cluster:
    def __init__(self, network: MemoryNetwork, nursery: trio.Nursery, tmp_path) -> None:
        self.network, self.nursery, self.tmp_path = network, nursery, tmp_path
        self.nodes: dict[str, tuple[Memberlist, Replication, trio.CancelScope]] = {}

    async def start(self, name: str, index: int) -> Replication:
        state = ClusterState.open(self.tmp_path / name, name, wall_ms, fsync=False)
        replication = Replication(state, wall_ms)
        memberlist = Memberlist(
            name=name,
            transport=self.network.transport((f"10.0.0.{index}", 7946)),
            keyring=Keyring([KEY]),
            cluster="t",
            rng=random.Random(index),
            wall_clock=lambda: wall_ms() / 1000,
            delegate=replication,
        )
        replication.attach(memberlist)
        scope = trio.CancelScope()

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with scope:
                await memberlist.run(task_status=task_status)
            state.close()

        await self.nursery.start(run)
        self.nodes[name] = (memberlist, replication, scope)
        return replication

    def stop(self, name: str) -> None:
        self.nodes.pop(name)[2].cancel()

    def address(self, name: str):
        return self.nodes[name][0].address

    async def wait_same(self, domain: str, expected, limit: float) -> None:
        with trio.fail_after(limit):
            while any(r.state.domain(domain) != expected for _, r, _ in self.nodes.values()):
                await trio.sleep(0.1)


async def test_deltas_reach_every_node_and_anti_entropy_repairs_a_node_that_missed_them(autojump_clock, tmp_path):
    """An assignment on one node reaches the others as a gossip delta within a few gossip
    rounds; a node that was down meanwhile gets it from the push-pull anti-entropy when it
    rejoins, and nothing else is exchanged when everyone is in sync."""
    network = MemoryNetwork(random.Random(1), Link(latency=0.002))
    async with trio.open_nursery() as nursery:
        await nursery.start(network.run)
        cluster = Cluster(network, nursery, tmp_path)
        a = await cluster.start("a", 1)
        for i, name in enumerate(("b", "c"), start=2):
            await cluster.start(name, i)
            await cluster.nodes[name][0].join([cluster.address("a")])
        a.assign_domain("Example.COM", "s1")
        await cluster.wait_same("example.com", DomainRoute("s1", "admin"), limit=2.0)

        cluster.stop("c")
        await trio.sleep(1.0)
        a.assign_domain("moved.example", "s2")
        a.unassign_domain("example.com")
        await cluster.wait_same("moved.example", DomainRoute("s2", "admin"), limit=2.0)

        c = await cluster.start("c", 3)  # reopens its journal: still has the old route
        assert c.state.domain("example.com") == DomainRoute("s1", "admin")
        await cluster.nodes["c"][0].join([cluster.address("b")])
        assert c.state.domain("moved.example") == DomainRoute("s2", "admin")
        assert c.state.domain("example.com") is None
        assert c.counters["state.syncs"] == 1 and c.counters["state.sync_applied"] >= 2
        assert len({r.state.digest_summary() for _, r, _ in cluster.nodes.values()}) == 1
        nursery.cancel_scope.cancel()


async def test_bad_deltas_are_counted_not_raised(autojump_clock, tmp_path):
    """Deltas with garbage bytes or invalid names are rejected and counted; the node goes on."""
    network = MemoryNetwork(random.Random(2))
    async with trio.open_nursery() as nursery:
        await nursery.start(network.run)
        cluster = Cluster(network, nursery, tmp_path)
        a = await cluster.start("a", 1)
        a.notify_broadcast("domain/x", b"\xc1garbage")
        assert a.counters["state.rejected.bad_batch"] == 1
        bad = Entry("domain/NOT..normal", DomainRoute("s", "admin"), Timestamp(START_MS, 0, "b"))
        future = Entry("domain/ok.example", DomainRoute("s", "admin"), Timestamp(START_MS + 10**8, 0, "b"))
        a.notify_broadcast("domain/y", encode_entries([bad, future]))
        assert a.counters["state.rejected.invalid_name"] == 1
        assert a.counters["state.rejected.future_timestamp"] == 1
        assert a.state.live == 0
        nursery.cancel_scope.cancel()
