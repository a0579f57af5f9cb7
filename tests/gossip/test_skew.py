"""Clock skew in the simulation: a member whose wall clock is a minute and a half off has its
packets dropped as stale, and both sides say so in the log, naming the member and the offset."""

from __future__ import annotations

import logging

import trio

from .sim import address_of, simulation, wait_until

SKEW = 93.0


def skew_lines(caplog, about: str) -> list[str]:
    """The clock skew lines logged about member `about`."""
    lines = [x.getMessage() for x in caplog.records if x.name == "meshmail.gossip"]
    return [x for x in lines if x.startswith(f"packets from {about} (")]


async def test_a_skewed_joiner_is_named_with_its_offset_once_a_minute(autojump_clock, caplog):
    """n2's clock is 93 s ahead. Its join through n0 fails (its frame is stale there);
    n0 logs which member and by how much, at most once a minute however often n2 retries,
    and keeps the offset. n0 answers the stale frame with one stamped by its own clock, so
    n2 learns the same of itself; once two members agree, n2 says its own clock is off."""
    caplog.set_level(logging.INFO, logger="meshmail.gossip")
    async with simulation(seed=11) as cluster:
        await cluster.start_many(2)
        await cluster.join("n1", "n0")
        n2 = await cluster.start("n2", address_of(2), wall_clock=lambda: trio.current_time() + SKEW)
        n0 = cluster.nodes["n0"].memberlist

        assert await n2.memberlist.join([cluster.nodes["n0"].address]) == 0
        assert n0.counters["dropped.stale"] == 1
        assert round(n0.clock_offsets["n2"]) == SKEW
        assert skew_lines(caplog, "n2") == [
            "packets from n2 (10.0.0.3:7946) are 93 s ahead of this node's clock: fix NTP on one of them"
        ]
        assert round(n2.memberlist.clock_offsets["n0"]) == -SKEW
        assert skew_lines(caplog, "n0") == [
            "packets from n0 (10.0.0.1:7946) are 93 s behind this node's clock: fix NTP on one of them"
        ]

        for _ in range(29):  # 150 s of retries, every 5 s
            await trio.sleep(5.0)
            await n2.memberlist.join([cluster.nodes["n0"].address])
        assert n0.counters["dropped.stale"] == 30
        assert len(skew_lines(caplog, "n2")) == 3, "at most once a minute: at about 0, 60 and 120 s"
        assert list(n0.clock_offsets) == ["n2"] and n0.member("n2") is None

        assert await n2.memberlist.join([cluster.nodes["n1"].address]) == 0
        assert skew_lines(caplog, "n1")[-1] == (
            "packets from n1 (10.0.0.2:7946) are 93 s behind this node's clock, as are those of 1 other "
            "member(s): this node's clock is likely the one that is off; fix NTP here"
        )


async def test_a_clock_that_jumps_in_a_running_cluster_is_named_by_every_member(autojump_clock, caplog):
    """n2's clock jumps 93 s ahead while it runs: its probes and gossip are dropped as
    stale by n0 and n1, which name it; n2 drops theirs and, as both agree, names its own clock."""
    caplog.set_level(logging.INFO, logger="meshmail.gossip")
    offset = [0.0]
    async with simulation(seed=12) as cluster:
        await cluster.start_many(2)
        await cluster.start("n2", address_of(2), wall_clock=lambda: trio.current_time() + offset[0])
        await cluster.join_all("n0")
        await cluster.converge(cluster.all_alive(), 5.0)
        assert not any(node.memberlist.clock_offsets for node in cluster.nodes.values())

        offset[0] = SKEW
        await wait_until(lambda: len(skew_lines(caplog, "n2")) == 2, 10.0, what="n0 and n1 to name n2")
        for label in ("n0", "n1"):
            assert round(cluster.nodes[label].memberlist.clock_offsets["n2"]) == SKEW
        await wait_until(lambda: "fix NTP here" in " ".join(skew_lines(caplog, "n0") + skew_lines(caplog, "n1")),
                         10.0, what="n2 to name its own clock")
        assert cluster.counter("dropped.stale") > 0
