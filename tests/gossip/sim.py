"""A gossip cluster in simulated time for tests: seeded nodes on a MemoryNetwork.

`simulation()` starts the network and yields a `Cluster` that starts, stops and restarts
nodes, records every MemberEvent with its simulated time, and waits for a condition in
simulated time, failing with a message that names what did not converge. It is meant for
trio tests under MockClock(autojump_threshold=0) (pytest-trio's `autojump_clock`).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager

import attrs
import hypothesis  # noqa: F401  (its entry point makes trio's scheduler seedable)
import trio
from trio._core import _run as trio_run

from meshmail.core.address import Address
from meshmail.gossip.config import GossipConfig
from meshmail.gossip.keyring import Keyring
from meshmail.gossip.member import EventKind, MemberInfo
from meshmail.gossip.memberlist import Memberlist
from meshmail.gossip.memory import Link, MemoryNetwork
from meshmail.gossip.messages import State

KEY = bytes(range(32))
CLUSTER = "sim"
#: A quiet LAN: 2 to 5 ms one way.
LAN_LINK = Link(latency=0.002, jitter=0.003)


def address_of(index: int) -> Address:
    """The simulated address of node number `index` (up to 62,500 nodes)."""
    return (f"10.0.{index // 250}.{index % 250 + 1}", 7946)


@attrs.frozen
class Verdict:
    """One MemberEvent as observer `observer` (a node label) received it, at simulated `time`."""

    time: float
    observer: str
    kind: EventKind
    info: MemberInfo

    @property
    def member(self) -> str:
        return self.info.name


@attrs.define(eq=False)
class Node:
    """One running Memberlist; its `label` is unique in the cluster, its name need not be."""

    label: str
    memberlist: Memberlist
    scope: trio.CancelScope

    @property
    def address(self) -> Address:
        return self.memberlist.address


@attrs.define(eq=False)
class Cluster:
    """The nodes of one simulation, by label, and every event they published."""

    network: MemoryNetwork
    config: GossipConfig
    seed: int
    _nursery: trio.Nursery
    nodes: dict[str, Node] = attrs.field(factory=dict)
    events: list[Verdict] = attrs.field(factory=list)
    _generation: int = 0

    async def start(
        self,
        name: str,
        address: Address,
        *,
        label: str | None = None,
        meta: bytes = b"",
        wall_clock: Callable[[], float] = trio.current_time,
    ) -> Node:
        """Start a Memberlist called `name` at `address`; a label already in use is replaced.
        Its wall clock is trio's clock unless `wall_clock` gives it another (a skewed one)."""
        label = label or name
        self._generation += 1
        memberlist = Memberlist(
            name=name,
            transport=self.network.transport(address),
            keyring=Keyring([KEY]),
            cluster=CLUSTER,
            config=self.config,
            meta=meta,
            rng=random.Random(f"{self.seed}/{label}/{self._generation}"),
            wall_clock=wall_clock,
        )
        node = Node(label, memberlist, trio.CancelScope())
        await self._nursery.start(self._run, node)
        self.nodes[label] = node
        return node

    async def start_many(self, count: int) -> list[Node]:
        """Start nodes n0 .. n{count-1} at address_of(0 .. count-1), without joining them."""
        return [await self.start(f"n{i}", address_of(i)) for i in range(count)]

    async def _run(self, node: Node, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        events = node.memberlist.subscribe(max_buffer=1 << 16)
        with node.scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(node.memberlist.run)
                task_status.started()
                async for event in events:
                    self.events.append(Verdict(trio.current_time(), node.label, event.kind, event.member))

    def stop(self, label: str) -> Node:
        """Stop a node at once, as kill -9 would: it sends nothing more."""
        node = self.nodes.pop(label)
        node.scope.cancel()
        return node

    async def join(self, label: str, seed: str) -> None:
        """Join node `label` to the cluster through node `seed`; fail if the seed does not answer."""
        answered = await self.nodes[label].memberlist.join([self.nodes[seed].address])
        assert answered == 1, f"{label} could not join through {seed}"

    async def join_all(self, seed: str) -> None:
        """Join every other node through `seed`, one after the other (as a rollout would)."""
        for label in list(self.nodes):
            if label != seed:
                await self.join(label, seed)

    def view(self, label: str) -> dict[str, MemberInfo]:
        """Node `label`'s view of the cluster by member name."""
        return {x.name: x for x in self.nodes[label].memberlist.members()}

    def lagging(
        self, expected: dict[str, State], observers: Iterable[str] | None = None, *, first: bool = False
    ) -> list[str]:
        """Where an observer's view differs from `expected` (member name -> state).

        Returns lines like "n3 sees n7 as dead" (or "... does not know n7"); with `first`,
        stops at the first difference (cheap polling). Observers default to every running node.
        """
        found = []
        for label in self.nodes if observers is None else observers:
            members = self.nodes[label].memberlist.members()
            states = {x.name: x.state for x in members}
            for name, state in expected.items():
                seen = states.get(name)
                if seen is None:
                    found.append(f"{label} does not know {name}")
                elif seen != state:
                    found.append(f"{label} sees {name} as {seen.name.lower()}")
                else:
                    continue
                if first:
                    return found
        return found

    def all_alive(self, names: Iterable[str] | None = None) -> dict[str, State]:
        """The expected view in which every member in `names` (default: running nodes) is alive."""
        return dict.fromkeys(self.nodes if names is None else names, State.ALIVE)

    async def converge(self, expected: dict[str, State], limit: float, observers: Iterable[str] | None = None) -> float:
        """Wait until every observer's view matches `expected`; return the simulated time it took."""
        observers = list(self.nodes if observers is None else observers)
        return await wait_until(
            lambda: not self.lagging(expected, observers, first=True),
            limit,
            what=f"{len(observers)} views to agree on {len(expected)} members",
            explain=lambda: summarize(self.lagging(expected, observers)),
        )

    def verdicts(self, kind: EventKind, member: str | None = None, since: float = 0.0) -> list[Verdict]:
        """Events of `kind` (about `member`, if given) that any node received at or after `since`."""
        return [x for x in self.events if x.kind == kind and member in (None, x.member) and x.time >= since]

    def counter(self, name: str) -> int:
        """A Memberlist counter summed over the running nodes."""
        return sum(node.memberlist.counters[name] for node in self.nodes.values())


def summarize(lines: list[str], most: int = 12) -> str:
    more = f" (and {len(lines) - most} more)" if len(lines) > most else ""
    return "; ".join(lines[:most]) + more


async def wait_until(
    predicate: Callable[[], bool],
    limit: float,
    *,
    what: str,
    explain: Callable[[], str] | None = None,
    step: float = 0.05,
) -> float:
    """Poll `predicate` every `step` simulated seconds; return the time until it held.

    Raises AssertionError naming `what` (and `explain()`, what still differs) when it does
    not hold within `limit` simulated seconds.
    """
    start = trio.current_time()
    while not predicate():
        elapsed = trio.current_time() - start
        if elapsed > limit:
            detail = f": {explain()}" if explain is not None else ""
            raise AssertionError(f"waited {elapsed:.2f} s (limit {limit:.2f} s) for {what}{detail}")
        await trio.sleep(step)
    return trio.current_time() - start


@asynccontextmanager
async def simulation(seed: int, *, link: Link = LAN_LINK, config: GossipConfig | None = None) -> AsyncIterator[Cluster]:
    """A running MemoryNetwork seeded with `seed` and an empty Cluster; all stops on exit.

    Trio itself shuffles runnable tasks and breaks ties between equal deadlines by object
    id, so a seeded network alone does not repeat: its hypothesis plugin (loaded by importing
    hypothesis) makes that scheduling depend only on trio's private generator, seeded here.
    """
    assert trio_run._ALLOW_DETERMINISTIC_SCHEDULING, "importing hypothesis should make trio's scheduler seedable"
    trio_run._r.seed(seed)
    network = MemoryNetwork(random.Random(seed), link)
    async with trio.open_nursery() as nursery:
        await nursery.start(network.run)
        yield Cluster(network, config or GossipConfig(), seed, nursery)
        nursery.cancel_scope.cancel()
