"""The transmit-limited broadcast queue (meshmail.gossip.broadcast.BroadcastQueue).

Each message goes out at most `limit()` times, least-sent first and newest first among
equals; a newer message under the same key replaces the older one; `take` never exceeds
its byte budget; the `sent` event fires on the first transmission.
"""

from __future__ import annotations

import random

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from meshmail.gossip import messages as m
from meshmail.gossip.broadcast import BroadcastQueue

BIG = 1 << 20


def alive(node: str, incarnation: int = 1, meta: bytes = b"") -> list:
    return m.to_wire(m.Alive(incarnation, node, "10.0.0.1", 7946, meta))


def test_transmit_limit_respected() -> None:
    """A message is handed out exactly limit() times, then leaves the queue."""
    queue = BroadcastQueue(lambda: 3)
    queue.queue("a", alive("a"))
    sent = [queue.take(BIG, 0) for _ in range(5)]
    assert sent == [[alive("a")]] * 3 + [[], []]
    assert len(queue) == 0


def test_limit_is_read_at_take_time() -> None:
    """A cluster that shrinks lowers the limit for messages already queued."""
    limit = [4]
    queue = BroadcastQueue(lambda: limit[0])
    queue.queue("a", alive("a"))
    assert queue.take(BIG, 0) == [alive("a")]
    limit[0] = 2
    assert queue.take(BIG, 0) == [alive("a")]
    assert queue.take(BIG, 0) == []


def test_newer_message_with_same_key_invalidates_older() -> None:
    """Queueing under a key already queued replaces the old message and restarts its count."""
    queue = BroadcastQueue(lambda: 2)
    queue.queue("node-b", alive("node-b", 1))
    assert queue.take(BIG, 0) == [alive("node-b", 1)]
    suspect = m.to_wire(m.Suspect(1, "node-b", "node-a"))
    queue.queue("node-b", suspect)
    assert len(queue) == 1
    assert queue.take(BIG, 0) == [suspect]
    assert queue.take(BIG, 0) == [suspect]  # two fresh transmissions, not one left over
    assert queue.take(BIG, 0) == []


def test_other_keys_untouched_by_replacement() -> None:
    """Replacing one key leaves the other queued messages as they were."""
    queue = BroadcastQueue(lambda: 5)
    for name in "abc":
        queue.queue(name, alive(name))
    queue.queue("b", alive("b", 2))
    assert len(queue) == 3
    assert sorted(w[1]["node"] + str(w[1]["incarnation"]) for w in queue.take(BIG, 0)) == ["a1", "b2", "c1"]


def test_least_transmitted_first() -> None:
    """With room for one message, the one sent fewest times goes first; among fresh ones the newest."""
    one = m.wire_size(alive("a"))  # every alive() of a one-letter node has the same size
    queue = BroadcastQueue(lambda: 10)
    queue.queue("a", alive("a"))
    assert queue.take(one, 0) == [alive("a")]  # a: 1 transmission
    queue.queue("b", alive("b"))
    queue.queue("c", alive("c"))
    assert queue.take(one, 0) == [alive("c")]  # b and c at 0: the newest, c
    assert queue.take(one, 0) == [alive("b")]  # b is the only one still at 0
    # All at 1 now: each goes once more before any goes a third time.
    assert sorted(queue.take(one, 0)[0][1]["node"] for _ in range(3)) == ["a", "b", "c"]


def test_newest_first_among_equally_transmitted() -> None:
    """Among messages sent equally often, the newest queued goes first (memberlist orders by
    transmits, then by queue id descending) -- also after the first transmission.

    a, b, c are queued in that order and all sent once together; with room for one message
    the next take must pick c, then b, then a.
    """
    one = m.wire_size(alive("a"))
    queue = BroadcastQueue(lambda: 10)
    for name in "abc":
        queue.queue(name, alive(name))
    assert queue.take(BIG, 0) == [alive("c"), alive("b"), alive("a")]
    order = [queue.take(one, 0)[0][1]["node"] for _ in range(3)]
    assert order == ["c", "b", "a"], f"second round went {order}: not newest first"


def test_budget_skips_big_items_but_takes_smaller_ones() -> None:
    """A message that does not fit is skipped; smaller ones behind it still fill the packet."""
    big = alive("big", meta=b"x" * 500)
    small = alive("s")
    queue = BroadcastQueue(lambda: 3)
    queue.queue("s", small)
    queue.queue("big", big)  # newest: looked at first
    budget = m.wire_size(small) + 10
    assert queue.take(budget, 0) == [small]
    assert queue.take(m.wire_size(big) + 3 * 5, 5) == [big]  # overhead counted per message


def test_budget_too_small_for_anything() -> None:
    """A budget below one message's size gives nothing and counts nothing as sent."""
    queue = BroadcastQueue(lambda: 1)
    queue.queue("a", alive("a"))
    assert queue.take(m.wire_size(alive("a")) - 1, 0) == []
    assert queue.take(m.wire_size(alive("a")) + 10, 11) == []  # overhead included
    assert queue.take(0, 0) == []
    assert queue.take(-100, 0) == []
    assert queue.take(BIG, 0) == [alive("a")]


@settings(max_examples=200, derandomize=True, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 300), min_size=0, max_size=40),
    budgets=st.lists(st.integers(-10, 1500), min_size=1, max_size=30),
    overhead=st.integers(0, 20),
    limit=st.integers(1, 6),
)
def test_budget_never_exceeded(sizes: list[int], budgets: list[int], overhead: int, limit: int) -> None:
    """Whatever is queued, take() returns distinct messages costing at most the budget,
    and no message is handed out more than limit times in all."""
    queue = BroadcastQueue(lambda: limit)
    wired = {f"k{i}": alive(f"k{i}", meta=b"x" * size) for i, size in enumerate(sizes)}
    for key, message in wired.items():
        queue.queue(key, message)
    counts: dict[str, int] = {}
    for budget in budgets:
        taken = queue.take(budget, overhead)
        assert sum(m.wire_size(w) + overhead for w in taken) <= max(budget, 0)
        names = [w[1]["node"] for w in taken]
        assert len(names) == len(set(names))
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    assert all(count <= limit for count in counts.values())
    while batch := queue.take(BIG, 0):
        for w in batch:
            counts[w[1]["node"]] = counts.get(w[1]["node"], 0) + 1
    assert counts == dict.fromkeys(wired, limit)


def test_sent_event_set_on_first_transmission() -> None:
    """The `sent` event (a graceful leave waits on it) is set when the message first goes out."""
    queue = BroadcastQueue(lambda: 3)
    sent = trio.Event()
    queue.queue("me", m.to_wire(m.Dead(1, "me", "me")), sent=sent)
    queue.queue("other", alive("other"))
    assert not sent.is_set()
    assert queue.take(m.wire_size(alive("other")), 0) == [alive("other")]  # newest; no room for ours
    assert not sent.is_set()
    assert queue.take(BIG, 0)
    assert sent.is_set()


def test_many_keys_random_order_is_stable() -> None:
    """A seeded mix of queueing and taking keeps the queue length equal to the keys still owed."""
    rng = random.Random(7)
    queue = BroadcastQueue(lambda: 3)
    owed: dict[str, int] = {}
    for _ in range(2000):
        if rng.random() < 0.5:
            key = f"n{rng.randrange(50)}"
            queue.queue(key, alive(key, rng.randrange(100)))
            owed[key] = 3
        else:
            for w in queue.take(rng.randrange(0, 400), rng.randrange(3)):
                owed[w[1]["node"]] -= 1
        assert len(queue) == sum(1 for v in owed.values() if v > 0)
