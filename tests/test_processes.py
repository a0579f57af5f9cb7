"""End to end: five real `meshmail run` processes on 127.0.0.1 converge, detect a kill -9,
see a SIGTERM as a graceful leave, and take a restarted node back at a higher incarnation.

Timings are the local profile with a shorter probe interval, so failures are detected in
seconds; every wait polls /status against a bound derived from those settings. One test
replays a rare failure of the leave test in the in-memory network, where it is certain.
"""

from __future__ import annotations

import math
import random
import signal
import time
from collections.abc import Callable, Iterator, Mapping

import hypothesis  # noqa: F401  (its entry point makes trio's scheduler seedable)
import pytest
import trio
from helpers.cluster import HOST, Cluster, View
from trio._core import _run as trio_run

from meshmail.config import load
from meshmail.gossip.config import GossipConfig, profile
from meshmail.gossip.keyring import Keyring, new_key
from meshmail.gossip.memberlist import Memberlist
from meshmail.gossip.memory import Link, MemoryNetwork
from meshmail.node import HTTP_GRACE, LEAVE_TIMEOUT, PEERS_FILE, PEERS_INTERVAL

N = 5
NAMES = [f"n{i + 1}" for i in range(N)]
#: Added to each node's [gossip] section on top of the local profile.
GOSSIP = "probe_interval = 0.5\n"
#: Start (imports, bind) and join of all nodes on a slow CI machine, including a push-pull
#: round (15 s in the local profile) for a member that missed a join broadcast.
STARTUP_TIMEOUT = 30.0
#: Spreading a suspicion, a confirmation or a verdict to every member: a few gossip
#: rounds (0.1 s) and retransmits on a cluster of five, with room for a loaded machine.
DISSEMINATION_SLACK = 2.0

pytestmark = pytest.mark.slow


def failure_bound(settings: GossipConfig, n: int) -> float:
    """Seconds from a kill -9 until every survivor reports the member dead.

    Every survivor probes the others in shuffled rounds, so some survivor probes the dead
    member within 2(n-1)-1 intervals, and that probe (probe_timeout, then the indirect and
    TCP probes) fails at the end of its own interval: 2(n-1) intervals. Each survivor that
    hears the suspicion declares the member dead at the latest after Lifeguard's maximum
    suspicion timeout, suspicion_max_timeout_mult * suspicion_mult * max(1, log10 n) *
    probe_interval, with n the members alive when the suspicion starts.
    """
    first_failed_probe = 2 * (n - 1) * settings.probe_interval
    suspicion_min = settings.suspicion_mult * max(1.0, math.log10(n)) * settings.probe_interval
    suspicion_max = settings.suspicion_max_timeout_mult * suspicion_min
    return first_failed_probe + suspicion_max + DISSEMINATION_SLACK


@pytest.fixture
def cluster(tmp_path) -> Iterator[Cluster]:
    """Five started nodes n1..n5 joined through n1; all are SIGKILLed afterwards."""
    cluster = Cluster.configured(N, tmp_path, gossip=GOSSIP)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
        print(cluster.logs())  # pytest shows it when the test failed


def converge(cluster: Cluster) -> dict[str, View]:
    """Wait until every node lists all N members alive; their views."""

    def everyone_alive(views: Mapping[str, View]) -> bool:
        return all(set(view) == set(NAMES) and all(s == "alive" for s, _ in view.values()) for view in views.values())

    return cluster.wait_until(f"all {N} nodes list all {N} alive", NAMES, everyone_alive, STARTUP_TIMEOUT)


def reported(state: str, victim: str) -> Callable[[Mapping[str, View]], bool]:
    """True once every view lists `victim` in `state`."""

    def condition(views: Mapping[str, View]) -> bool:
        return all(view.get(victim, ("absent", 0))[0] == state for view in views.values())

    return condition


def test_five_processes_converge(cluster):
    converge(cluster)
    addresses = {node.name: f"{HOST}:{node.gossip_port}" for node in cluster.nodes.values()}
    for node in cluster.nodes.values():
        document = cluster.status(node.name)
        assert document["node"] == node.name
        assert {m["name"]: m["address"] for m in document["members"]} == addresses
        assert all(m["incarnation"] >= 1 for m in document["members"])


def test_kill_9_is_reported_dead_by_all_others(cluster):
    converge(cluster)
    settings = load(cluster.nodes["n1"].config).gossip.settings
    bound = failure_bound(settings, N)
    # The settings used here: 0.5 s probes, suspicion 1.5 s .. 9 s, so 15 s in all.
    assert bound == pytest.approx(4.0 + 9.0 + DISSEMINATION_SLACK)

    cluster.nodes["n3"].kill()
    survivors = [name for name in NAMES if name != "n3"]
    views = cluster.wait_until(f"n3 reported dead within {bound:.1f} s", survivors, reported("dead", "n3"), bound)
    for name, view in views.items():
        assert all(view[other][0] != "dead" for other in survivors), f"{name} thinks a live node is dead: {view}"


def test_sigterm_is_reported_left_and_exits_0(cluster):
    converge(cluster)
    leaver = cluster.nodes["n2"]
    others = [name for name in NAMES if name != "n2"]
    seen_dead: list[dict] = []

    def left_everywhere(views: Mapping[str, View]) -> bool:
        if any(view.get("n2", ("absent", 0))[0] == "dead" for view in views.values()):
            seen_dead.append(dict(views))
        return reported("left", "n2")(views)

    leaver.send(signal.SIGTERM)
    # The leave waits at most LEAVE_TIMEOUT for its broadcast, HTTP then gets HTTP_GRACE.
    exit_bound = LEAVE_TIMEOUT + HTTP_GRACE + 5.0
    assert leaver.process.wait(timeout=exit_bound) == 0, cluster.logs()
    # A member that missed the few retransmits of the leave learns it by push-pull, in
    # time only if that comes before its own suspicion of n2 ends (see the test below).
    settings = load(leaver.config).gossip.settings
    bound = settings.push_pull_interval + settings.tcp_timeout + DISSEMINATION_SLACK
    cluster.wait_until(f"n2 reported left within {bound:.1f} s", others, left_everywhere, bound)
    assert seen_dead == [], "a graceful leave was reported as a failure"


def test_restarted_node_rejoins_with_a_higher_incarnation(cluster):
    before = converge(cluster)
    settings = load(cluster.nodes["n1"].config).gossip.settings
    highest_before = max(view["n4"][1] for view in before.values())
    others = [name for name in NAMES if name != "n4"]

    cluster.nodes["n4"].kill()
    dead = cluster.wait_until("n4 reported dead", others, reported("dead", "n4"), failure_bound(settings, N))
    highest_dead = max(view["n4"][1] for view in dead.values())
    restarted = cluster.nodes["n4"]
    restarted.start()  # same config: same name, same gossip address (the port of its first ready file)
    cluster.wait_until("n4 answers /status again", ["n4"], lambda views: True, STARTUP_TIMEOUT)

    def rejoined(views: Mapping[str, View]) -> bool:
        return all(
            set(view) == set(NAMES)
            and all(state == "alive" for state, _ in view.values())
            and view["n4"][1] > max(highest_before, highest_dead)
            for view in views.values()
        )

    # n4 refutes its death at once, but the refutation is gossiped only a few times
    # (retransmit_mult * ceil(log10(n + 1)) per node) and can miss a member; the push-pull
    # anti-entropy every push_pull_interval then brings it (seen: about 1 run in 10).
    bound = settings.push_pull_interval + settings.tcp_timeout + DISSEMINATION_SLACK
    cluster.wait_until(
        f"n4 alive again everywhere at a higher incarnation within {bound:.1f} s", NAMES, rejoined, bound
    )


def test_the_seedless_first_node_restarted_after_kill_9_finds_the_others_through_its_peers_file(cluster):
    """n1's config names no seed (the first master of a cluster). The addresses of the members
    it last saw alive are in its data dir; restarted, it joins through them: without them it
    would stay alone, since the others no longer probe a member they hold for dead."""
    converge(cluster)
    settings = load(cluster.nodes["n1"].config).gossip.settings
    others = {f"{HOST}:{node.gossip_port}" for node in cluster.nodes.values() if node.name != "n1"}
    peers = cluster.data_dir("n1") / PEERS_FILE
    deadline = time.monotonic() + PEERS_INTERVAL + STARTUP_TIMEOUT
    while not (peers.exists() and set(peers.read_text().split()) == others):
        assert time.monotonic() < deadline, f"n1's {PEERS_FILE} never listed the others"
        time.sleep(0.2)
    cluster.nodes["n1"].kill()
    survivors = [name for name in NAMES if name != "n1"]
    cluster.wait_until("n1 reported dead", survivors, reported("dead", "n1"), failure_bound(settings, N))
    cluster.nodes["n1"].start()
    # Its join reaches every peer at once; the others' reconnect offers (every 30 s) and
    # push-pulls (every push_pull_interval) would come later.
    bound = settings.tcp_timeout + 2 * DISSEMINATION_SLACK
    cluster.wait_until(
        f"n1 and the others alive to each other within {bound:.1f} s",
        NAMES,
        lambda views: all(
            set(view) == set(NAMES) and all(s == "alive" for s, _ in view.values()) for view in views.values()
        ),
        bound,
    )


async def test_a_member_that_missed_the_leave_news_still_reports_left(autojump_clock):
    """The rare failure of the SIGTERM test above, made certain in the in-memory network.

    n1 misses every packet of n2's leave (its incoming links drop for a moment), and
    push-pull is out of the way. n1 then probes n2, suspects it and gossips the suspicion,
    but the members that know n2 left ignore a suspicion of a non-alive member, so nobody
    tells n1, and its suspicion ends in "dead", which is never corrected to "left".
    """
    # Seeded like tests/gossip/sim.py (trio's scheduler too): unseeded, about 1 run in 5 had a
    # third member miss every retransmit of the leave as well, which is not this test's case.
    assert trio_run._ALLOW_DETERMINISTIC_SCHEDULING, "importing hypothesis should make trio's scheduler seedable"
    trio_run._r.seed(7)
    network = MemoryNetwork(random.Random(7))
    keyring = Keyring([new_key()])
    settings = profile("local", push_pull_interval=600.0)
    addresses = [("10.0.0.1", 7946 + i) for i in range(N)]
    stops: dict[str, trio.CancelScope] = {}

    async def run(node: Memberlist, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as stops[node.name]:
            await node.run(task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(network.run)
        nodes = []
        for i, address in enumerate(addresses):
            node = Memberlist(
                name=NAMES[i],
                transport=network.transport(address),
                keyring=keyring,
                cluster="test",
                config=settings,
                rng=random.Random(i),
                wall_clock=trio.current_time,
            )
            await nursery.start(run, node)
            nodes.append(node)
        for node in nodes[1:]:
            assert await node.join([addresses[0]]) == 1
        await trio.sleep(30)
        n1, leaver = nodes[0], nodes[1]
        assert {m.name: m.state.name for m in n1.members()} == dict.fromkeys(NAMES, "ALIVE")

        for source in addresses[1:]:
            network.links[(source, addresses[0])] = Link(loss=1.0)
        await leaver.leave(timeout=LEAVE_TIMEOUT)
        await trio.sleep(1)  # every retransmit of the leave is done (gossip_interval 0.1 s)
        stops["n2"].cancel()  # n2 stops, as its process would
        network.links.clear()
        others = [m.state.name for node in nodes[2:] for m in node.members() if m.name == "n2"]
        assert others == ["LEFT"] * (N - 2)

        await trio.sleep(60)  # far beyond n1's probes and its longest suspicion (18 s)
        assert next(m.state.name for m in n1.members() if m.name == "n2") == "LEFT"
        nursery.cancel_scope.cancel()
