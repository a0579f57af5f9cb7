"""Stream admission: the unproven pool as a table, then a flood of idle connections from
several loopback addresses against a real node, through which a real join still succeeds."""

from __future__ import annotations

import random

import pytest
import trio

from meshmail.gossip.config import profile
from meshmail.gossip.keyring import Keyring
from meshmail.gossip.memberlist import Memberlist
from meshmail.gossip.messages import State
from meshmail.gossip.transport import NetTransport
from meshmail.gossip.unproven import (
    MAX_UNPROVEN_PER_SOURCE,
    PROOF_DEADLINE,
    UnprovenPool,
    source_of,
)


@pytest.mark.parametrize(
    ("host", "source"),
    [
        ("10.0.0.1", "10.0.0.1"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("not-an-ip", "not-an-ip"),
    ],
)
def test_source_of(host, source):
    assert source_of(host) == source


def test_a_source_holds_more_slots_only_while_the_pool_has_room():
    pool = UnprovenPool(size=4, per_source=2)
    assert all(pool.admit("a", n)[0] is not None for n in range(3))  # room: one host, many nodes
    slot, evicted, _ = pool.admit("b", 4)
    assert slot is not None and evicted is None and len(pool) == 4
    assert pool.admit("a", 5) == (None, None, "source_limit")  # full, and a holds its share
    slot, evicted, _ = pool.admit("c", 6)  # full: c takes the oldest slot of a, the biggest holder
    assert slot is not None and evicted.source == "a" and len(pool) == 4


def test_a_full_pool_makes_room_by_taking_the_oldest_slot_of_the_biggest_holder():
    pool = UnprovenPool(size=4, per_source=3)
    a1, _, _ = pool.admit("a", "a1")
    pool.admit("b", "b1")
    pool.admit("a", "a2")
    pool.admit("b", "b2")
    slot, evicted, _ = pool.admit("c", "c1")  # a and b hold 2 each: a's oldest is the oldest
    assert slot is not None and evicted is a1 and len(pool) == 4
    slot, evicted, _ = pool.admit("c", "c2")  # b holds 2, c 1
    assert evicted is not None and evicted.holder == "b1"
    # a, b and c hold 1, 1 and 2: c is the biggest holder and may not take from others,
    # but a source holding fewer slots than c may take c's oldest.
    assert pool.admit("c", "c3") == (None, None, "unproven_busy")
    slot, evicted, _ = pool.admit("d", "d1")
    assert evicted is not None and evicted.source == "c"
    pool.release(evicted)  # its stream ends later and releases it again: nothing happens
    assert len(pool) == 4


def test_release_frees_the_slot():
    pool = UnprovenPool(size=1, per_source=1)
    slot, _, _ = pool.admit("a", None)
    assert pool.admit("a", None) == (None, None, "source_limit")
    pool.release(slot)
    assert len(pool) == 0 and pool.admit("a", None)[0] is not None


#: Idle connections held open by the flood, and the loopback addresses they come from.
FLOOD = 500
FLOOD_SOURCES = [f"127.0.0.{i}" for i in range(2, 12)]


async def idle_connection(address, source: str, opened: list[int]) -> None:
    """Connect from `source` and send nothing; when the node closes the connection, reopen it."""
    while True:
        sock = trio.socket.socket()
        with sock:
            try:
                await sock.bind((source, 0))
                await sock.connect(address)
                opened[0] += 1
                while await sock.recv(1024):
                    pass
            except OSError:
                await trio.sleep(0.01)


def node(name: str) -> Memberlist:
    return Memberlist(
        name=name, transport=NetTransport("127.0.0.1", 0), keyring=Keyring([bytes(range(32))]), cluster="flood",
        config=profile("lan"), rng=random.Random(name),
    )


async def test_a_flood_of_idle_connections_does_not_stop_a_join():
    """500 connections that send nothing, from 10 addresses, reopened as soon as they are
    closed: once the pool is full each address holds at most MAX_UNPROVEN_PER_SOURCE slots,
    each for at most PROOF_DEADLINE, and a newcomer takes the slot of the biggest holder, so a real join
    through the flooded node succeeds while the flood goes on (before, the flood held
    every stream slot for tcp_timeout, 10 s, and joins failed)."""
    seed, newcomer = node("seed"), node("newcomer")
    opened = [0]
    async with trio.open_nursery() as nursery:
        address = await nursery.start(seed.run)
        await nursery.start(newcomer.run)
        for i in range(FLOOD):
            nursery.start_soon(idle_connection, address, FLOOD_SOURCES[i % len(FLOOD_SOURCES)], opened)
        with trio.fail_after(60):  # only catches a hang
            while opened[0] < 2 * FLOOD:  # every connection opened, and reopened
                await trio.sleep(0.05)
        flooded = opened[0]
        with trio.fail_after(3 * PROOF_DEADLINE):
            assert await newcomer.join([address]) == 1
        assert opened[0] > flooded, "the flood went on during the join"
        assert seed.member("newcomer").state == State.ALIVE
        assert newcomer.member("seed").state == State.ALIVE
        assert seed.counters["dropped.stream_source_limit"] > 0
        assert seed.counters["dropped.stream_evicted"] >= 1
        assert seed.counters["streams_in"] > FLOOD
        assert MAX_UNPROVEN_PER_SOURCE * len(FLOOD_SOURCES) > 32, "the flood fills the whole unproven pool"
        nursery.cancel_scope.cancel()
