"""Gossip membership in simulation: SWIM + Lifeguard on the in-memory network.

Every test is seeded and runs in simulated time (pytest-trio's `autojump_clock`, a
MockClock with autojump_threshold=0), so a run repeats exactly. The bounds asserted are
derived from the protocol's own parameters (LAN profile, memberlist's defaults) and
written next to each assertion; each test prints what it measured (`pytest -s`).
"""

from __future__ import annotations

import math

import pytest
import trio

from meshmail.gossip import messages
from meshmail.gossip.config import GossipConfig
from meshmail.gossip.member import EventKind
from meshmail.gossip.memory import Link
from meshmail.gossip.messages import State
from meshmail.gossip.net import RECONNECT_INTERVAL, RECOVERY_PUSH_PULL_INTERVAL
from meshmail.gossip.timing import suspicion_min

from .sim import Cluster, address_of, simulation, wait_until

#: The LAN profile: probe every 1 s (timeout 0.5 s), gossip to 3 members every 0.2 s,
#: suspicion_mult 4 with a maximum of 6 x the minimum, push-pull every 30 s.
LAN = GossipConfig()
#: Every link loses 10% of the packets (the loss test).
LOSSY = Link(latency=0.002, jitter=0.003, loss=0.1)


def gossip_rounds(n: int, config: GossipConfig = LAN) -> int:
    """Rounds of push gossip until one rumour has reached all n members with high probability.

    With fanout f a rumour grows about (f + 1)-fold a round, then needs about ln(n) / f more
    rounds for the last few members (Pittel's bound for push epidemics, generalized to f):
    ceil(log_{f+1} n) + ceil(ln n / f). For n = 200, f = 3: 4 + 2 = 6 rounds.
    """
    f = config.gossip_nodes
    return math.ceil(math.log(n, f + 1)) + math.ceil(math.log(n) / f)


def dissemination_time(n: int, config: GossipConfig = LAN) -> float:
    """Simulated seconds for one broadcast to reach all n members: gossip_rounds gossip intervals."""
    return gossip_rounds(n, config) * config.gossip_interval


def suspicion_bounds(n: int, config: GossipConfig = LAN) -> tuple[float, float]:
    """Lifeguard's suspicion timeout range for n members: (minimum, maximum = mult x minimum)."""
    minimum = suspicion_min(config.suspicion_mult, n, config.probe_interval)
    return minimum, minimum * config.suspicion_max_timeout_mult


async def start_converged(cluster: Cluster, n: int, limit: float) -> float:
    """Start n nodes, join them all through n0 and wait until all see all alive; return the wait."""
    await cluster.start_many(n)
    await cluster.join_all("n0")
    return await cluster.converge(cluster.all_alive(), limit)


@pytest.mark.slow
async def test_200_nodes_join_through_one_seed_within_log_n_gossip_rounds(autojump_clock):
    """200 nodes join one after the other through n0; all see all 200 alive within O(log N) rounds.

    Each join is a push-pull with the seed, which then holds an Alive message for every new
    member; the joiner learns the whole view at once, earlier joiners need the Alives of
    later ones by gossip. A 1400-byte packet carries packet_size // |Alive| of them, so the
    seed needs ceil(N / per_packet) gossip rounds to send each once, after which each needs
    gossip_rounds(N) rounds to reach everyone:
        bound = 2 x (ceil(N / per_packet) + gossip_rounds(N)) x gossip_interval
    after the last join (factor 2: random targets overlap, and packets also carry
    Suspect/Alive traffic). N = 200: |Alive| = 57 bytes, per_packet = 24, 2 x (9 + 6) x 0.2 = 6 s.
    Linear dissemination (one member learns per probe interval) would take minutes.
    """
    n = 200
    alive_size = messages.wire_size(messages.to_wire(messages.Alive(1, "n199", *address_of(n - 1))))
    per_packet = LAN.packet_size // alive_size
    bound = 2 * (math.ceil(n / per_packet) + gossip_rounds(n)) * LAN.gossip_interval
    async with simulation(seed=1) as cluster:
        await cluster.start_many(n)
        started = trio.current_time()
        await cluster.join_all("n0")
        join_phase = trio.current_time() - started
        took = await cluster.converge(cluster.all_alive(), bound)
        print(f"\n200 join: joins took {join_phase:.2f} s, all alive {took:.2f} s after the last (bound {bound:.2f} s)")
        assert len(cluster.view("n1")) == n
        assert not cluster.verdicts(EventKind.FAILED), "a member was declared dead while joining"


async def test_stopped_node_is_declared_dead_by_all_within_lifeguard_bounds(autojump_clock):
    """One of 50 nodes stops; every survivor marks it dead, none too early, all within the maximum.

    Lower bound: a suspicion lasts at least suspicion_min = 4 x log10(50) x 1 s = 6.80 s
    from the first suspicion (which comes after the stop), so no FAILED verdict before
    first_suspect + 6.80 s (hence none before stop + 6.80 s).
    Upper bound: a survivor probes every member once per shuffled round of N-1 probes,
    so the first suspicion comes within (N-1) x probe_interval + probe_interval = 50 s of
    the stop; after it, the Lifeguard maximum 6 x 6.80 = 40.8 s plus dissemination of the
    Dead message (gossip_rounds(50) x 0.2 s = 1.2 s): every verdict by first_suspect + 42.0 s.
    """
    n = 50
    low, high = suspicion_bounds(n)
    detection = n * LAN.probe_interval
    async with simulation(seed=2) as cluster:
        await start_converged(cluster, n, limit=10.0)
        await trio.sleep(10.0)  # past the join traffic
        stopped = cluster.stop("n17")
        stop_time = trio.current_time()
        await cluster.converge({"n17": State.DEAD}, limit=detection + high + dissemination_time(n))

        first_suspect = min(x.time for x in cluster.verdicts(EventKind.SUSPECT, "n17"))
        failed = cluster.verdicts(EventKind.FAILED, "n17")
        assert sorted(x.observer for x in failed) == sorted(cluster.nodes), "one FAILED verdict per survivor"
        assert all(x.info.incarnation == stopped.memberlist.incarnation for x in failed)
        earliest, latest = min(x.time for x in failed), max(x.time for x in failed)
        print(
            f"\nstop: first suspicion {first_suspect - stop_time:.2f} s after the stop; verdicts "
            f"{earliest - first_suspect:.2f}..{latest - first_suspect:.2f} s after it (allowed {low:.2f}..{high:.2f} s)"
        )
        assert first_suspect - stop_time <= detection
        assert earliest >= first_suspect + low - 1e-9, "a survivor declared n17 dead before the minimum suspicion"
        assert earliest >= stop_time + low
        assert latest <= first_suspect + high + dissemination_time(n)
        assert not [x for x in cluster.verdicts(EventKind.FAILED) if x.member != "n17"], "a live member was failed"
        assert not cluster.lagging(cluster.all_alive()), "the survivors should all still be alive"


@pytest.mark.slow
async def test_no_false_failures_with_loss_and_a_lagging_node(autojump_clock):
    """10% loss on every link and one node that sees every packet 2 s late: no false verdict in 10 minutes.

    The lagging node n7 answers no probe within the 0.5 s timeout, so others suspect it; it
    learns the suspicion (buddy system) 2 s later and refutes well within the minimum
    suspicion (4 x log10(20) = 5.2 s). Its own probes time out too, until Lifeguard's
    local health stretches its timeouts; the members it suspects refute at once. Over 600
    simulated seconds no node may be declared FAILED by anyone. (n7 keeps being suspected
    and refuting, a 2 s lag being four probe timeouts, so it may be suspect at the end.)
    """
    n = 20
    async with simulation(seed=3, link=LOSSY) as cluster:
        await start_converged(cluster, n, limit=10.0)
        cluster.network.lag[cluster.nodes["n7"].address] = 2.0
        await trio.sleep(600.0)
        failed = cluster.verdicts(EventKind.FAILED)
        print(
            f"\nloss+lag: {len(cluster.verdicts(EventKind.SUSPECT))} suspect events, "
            f"{cluster.counter('refutations')} refutations, {len(failed)} failed, n7 health "
            f"{cluster.nodes['n7'].memberlist.health_score}, lost {cluster.network.counters['lost']} packets"
        )
        assert cluster.counter("refutations") > 0, "the lagging node should have been suspected and refuted"
        assert not failed, f"false FAILED verdicts: {[(x.observer, x.member, round(x.time, 2)) for x in failed][:10]}"
        assert not cluster.lagging(cluster.all_alive(set(cluster.nodes) - {"n7"}))
        assert {cluster.view(x)["n7"].state for x in cluster.nodes} <= {State.ALIVE, State.SUSPECT}


async def test_partition_heals_into_one_view(autojump_clock):
    """A 30/20 partition of 50 nodes for 60 s, then heal: one membership view again.

    During the partition each side declares the other dead (within 50 s probe round +
    40.8 s max suspicion at worst, in practice within seconds). After the heal nothing
    gossips across (the dead are gossiped to only for 30 s), so the view merges through the
    reconnect loop: every node offers a push-pull to one dead member every
    RECONNECT_INTERVAL x U(0.5, 1.5) <= 45 s. The first cross exchange comes within that;
    then refutations and Alives spread by gossip, and members the merge made suspect refute
    within a suspicion minimum. Bound after the heal:
        1.5 x RECONNECT_INTERVAL + suspicion_min(50) + gossip_rounds(50) x gossip_interval
        = 45 + 6.8 + 1.2 = 53 s.
    """
    n = 50
    bound = 1.5 * RECONNECT_INTERVAL + suspicion_bounds(n)[0] + dissemination_time(n)
    async with simulation(seed=4) as cluster:
        await start_converged(cluster, n, limit=10.0)
        await trio.sleep(5.0)
        left, right = list(cluster.nodes)[:30], list(cluster.nodes)[30:]
        cluster.network.partition([cluster.nodes[x].address for x in left], [cluster.nodes[x].address for x in right])
        await trio.sleep(60.0)
        across = [x for x in cluster.verdicts(EventKind.FAILED) if (x.observer in left) != (x.member in left)]
        # Not every view need be "all dead" here: a member missed by the Dead gossip keeps the
        # other side alive in its push-pull state, which revives it elsewhere (see the report).
        assert {x.observer for x in across} == set(cluster.nodes), "every node should fail the other side"
        cluster.network.heal()
        took = await cluster.converge(cluster.all_alive(), bound)
        print(f"\npartition: {len(across)} failures across; one view {took:.2f} s after the heal (bound {bound:.2f} s)")
        await trio.sleep(30.0)
        assert not cluster.lagging(cluster.all_alive()), "the healed view should stay whole"


async def test_suspected_node_refutes_and_stays_alive(autojump_clock):
    """A node that learns it is suspected raises its incarnation and is never declared dead.

    n5 is made to see every packet 3 s late, longer than a probe's deadline, until the
    first survivor suspects it; probes to n5 carry the Suspect (buddy system), n5 reads it
    3 s later, well inside the minimum suspicion (4 x log10(20) = 5.2 s), and refutes.
    """
    n = 20
    async with simulation(seed=5) as cluster:
        await start_converged(cluster, n, limit=10.0)
        n5 = cluster.nodes["n5"]
        assert n5.memberlist.incarnation == 1
        cluster.network.lag[n5.address] = 3.0
        await wait_until(lambda: bool(cluster.verdicts(EventKind.SUSPECT, "n5")), 30.0, what="a suspicion of n5")
        del cluster.network.lag[n5.address]
        await wait_until(lambda: n5.memberlist.counters["refutations"] > 0, 5.0, what="n5 to refute")
        await trio.sleep(60.0)
        incarnation = n5.memberlist.incarnation
        print(f"\nrefutation: n5 incarnation {incarnation}, {n5.memberlist.counters['refutations']} refutations")
        assert incarnation > 1
        assert all(cluster.view(x)["n5"].incarnation == incarnation for x in cluster.nodes)
        assert not cluster.lagging(cluster.all_alive())
        assert not cluster.verdicts(EventKind.FAILED), "a refuted suspicion must not end in FAILED"


async def test_a_member_turning_alive_is_pushed_pulled_at_once_but_not_at_every_flap(autojump_clock):
    """Each time n2 comes back from a suspicion (it sees packets 3 s late for a while, then
    refutes), the others push-pull with it at once unless they exchanged with it less than
    RECOVERY_PUSH_PULL_INTERVAL ago (periodic push-pulls count): eight flaps in two and
    a half minutes cost n0 at most one exchange per interval, not eight."""
    async with simulation(seed=13) as cluster:
        await start_converged(cluster, 3, limit=10.0)
        n0, n2 = cluster.nodes["n0"].memberlist, cluster.nodes["n2"]
        assert n0.counters["recovery_push_pulls"] == 0, "members learned through push-pulls are synced by them"
        start, flaps = trio.current_time(), 0
        while flaps < 8:
            cluster.network.lag[n2.address] = 3.0
            await wait_until(lambda: n0.member("n2").state == State.SUSPECT, 60.0, what="n0 to suspect n2")
            del cluster.network.lag[n2.address]
            await wait_until(lambda: n0.member("n2").state == State.ALIVE, 10.0, what="n2 to refute")
            flaps += 1
            await trio.sleep(15.0)
        elapsed = trio.current_time() - start
        print(f"\nflapping: {flaps} flaps in {elapsed:.0f} s, n0 pushed-pulled {n0.counters['recovery_push_pulls']}")
        assert 1 <= n0.counters["recovery_push_pulls"] <= math.ceil(elapsed / RECOVERY_PUSH_PULL_INTERVAL) + 1


async def test_graceful_leave_is_left_not_dead(autojump_clock):
    """leave() is seen as LEFT by every other node, and never as FAILED, even after it stops."""
    async with simulation(seed=6) as cluster:
        await start_converged(cluster, 10, limit=10.0)
        await cluster.nodes["n3"].memberlist.leave(timeout=5.0)
        cluster.stop("n3")
        took = await cluster.converge({"n3": State.LEFT}, limit=dissemination_time(10) + 1.0)
        await trio.sleep(60.0)
        print(f"\nleave: LEFT everywhere {took:.2f} s after leave() returned")
        assert sorted(x.observer for x in cluster.verdicts(EventKind.LEFT, "n3")) == sorted(cluster.nodes)
        assert not cluster.verdicts(EventKind.FAILED), "a leave must not be reported as a failure"
        assert not cluster.lagging({"n3": State.LEFT})


async def test_restarted_node_rejoins_with_higher_incarnation(autojump_clock):
    """A node stopped until all see it dead, restarted with the same name and address, is alive again.

    The new process starts at incarnation 1; the seed's view says "dead at incarnation 1",
    which the restarted node refutes with incarnation 2, so every view takes it back.
    """
    async with simulation(seed=7) as cluster:
        await start_converged(cluster, 10, limit=10.0)
        old = cluster.stop("n4")
        await cluster.converge({"n4": State.DEAD}, limit=60.0)
        died = cluster.view("n0")["n4"].incarnation
        restarted_at = trio.current_time()
        new = await cluster.start("n4", old.address)
        await cluster.join("n4", "n0")
        took = await cluster.converge(cluster.all_alive(), limit=dissemination_time(10) + LAN.probe_interval)
        print(f"\nrejoin: alive everywhere {took:.2f} s after the restart, incarnation {new.memberlist.incarnation}")
        assert new.memberlist.incarnation > died
        assert all(cluster.view(x)["n4"].incarnation == new.memberlist.incarnation for x in cluster.nodes)
        joined = cluster.verdicts(EventKind.JOINED, "n4", since=restarted_at)
        assert {x.observer for x in joined} == set(cluster.nodes) - {"n4"}


async def test_a_restarted_node_joining_through_several_seeds_tells_each_its_new_incarnation(autojump_clock):
    """Restarted, n4 joins through n0, n1 and n2 in turn. n0 hears its old incarnation, which
    n0's dead record outranks, and answers that n4 is dead; n4 refutes with a new one, which
    n1 and n2 hear. When join() returns, n0 has been told the new one too, without waiting
    for gossip (which may miss it) or the next push-pull."""
    async with simulation(seed=17) as cluster:
        await start_converged(cluster, 6, limit=10.0)
        old = cluster.stop("n4")
        await cluster.converge({"n4": State.DEAD}, limit=60.0)
        new = await cluster.start("n4", old.address)
        seeds = ["n0", "n1", "n2"]
        assert await new.memberlist.join([cluster.nodes[x].address for x in seeds]) == 3
        for seed in seeds:
            seen = cluster.view(seed)["n4"]
            assert (seen.state, seen.incarnation) == (State.ALIVE, new.memberlist.incarnation), seed


async def test_name_conflict_keeps_the_original(autojump_clock):
    """A second node claiming a live member's name from another address is refused and counted.

    The impostor "n3" at a new address joins through n0 while n3 lives: every other node
    keeps n3 at its original address and alive, and the conflict is counted.
    """
    async with simulation(seed=8) as cluster:
        await start_converged(cluster, 10, limit=10.0)
        original = cluster.nodes["n3"].address
        await cluster.start("n3", address_of(99), label="impostor")
        await cluster.join("impostor", "n0")
        await trio.sleep(60.0)
        honest = [x for x in cluster.nodes if x != "impostor"]
        conflicts = sum(cluster.nodes[x].memberlist.counters["conflicts"] for x in honest)
        print(f"\nconflict: {conflicts} conflicts counted by the honest nodes")
        assert conflicts > 0
        assert all((cluster.view(x)["n3"].host, cluster.view(x)["n3"].port) == original for x in honest)
        assert not cluster.lagging(cluster.all_alive(honest), honest)
        assert not cluster.verdicts(EventKind.FAILED)


async def test_events_are_delivered_to_subscribers(autojump_clock):
    """joined, updated, suspect, failed and left reach a subscriber, with the member's new data."""
    async with simulation(seed=9) as cluster:
        await start_converged(cluster, 4, limit=10.0)
        # joined: a fifth node comes in.
        await cluster.start("n4", address_of(4))
        await cluster.join("n4", "n1")
        await cluster.converge(cluster.all_alive(), limit=5.0)
        # updated: n2 changes its metadata.
        cluster.nodes["n2"].memberlist.update_meta(b"role=slave")
        await wait_until(lambda: cluster.view("n0")["n2"].meta == b"role=slave", 5.0, what="n0 to see n2's meta")
        # suspect, then failed: n3 stops.
        cluster.stop("n3")
        await cluster.converge({"n3": State.DEAD}, limit=60.0)
        # left: n1 leaves.
        await cluster.nodes["n1"].memberlist.leave(timeout=5.0)
        cluster.stop("n1")
        await cluster.converge({"n1": State.LEFT}, limit=5.0)

        seen = [(x.kind, x.member) for x in cluster.events if x.observer == "n0"]
        assert (EventKind.JOINED, "n4") in seen
        assert (EventKind.UPDATED, "n2") in seen
        assert seen.index((EventKind.SUSPECT, "n3")) < seen.index((EventKind.FAILED, "n3"))
        assert (EventKind.LEFT, "n1") in seen
        updated = [x for x in cluster.events if x.kind == EventKind.UPDATED and x.member == "n2"]
        assert all(x.info.meta == b"role=slave" and x.info.incarnation == 2 for x in updated)


@pytest.mark.parametrize("seed", [11, 12, 13])
async def test_membership_converges_under_duplication_and_reordering(autojump_clock, seed):
    """With 20% of packets duplicated and 50 ms of jitter (packets reorder), membership still converges.

    20 nodes join and must all see all alive within the 200-node join bound scaled down
    (2 x (1 + gossip_rounds(20)) x 0.2 s = 2.4 s after the last join) plus the jitter; then
    a stopped node must be declared dead by all, with no other verdict, within one probe
    round plus the Lifeguard maximum.
    """
    n = 20
    link = Link(latency=0.002, jitter=0.05, duplicate=0.2)
    join_bound = 2 * (1 + gossip_rounds(n)) * LAN.gossip_interval + link.jitter
    async with simulation(seed=seed, link=link) as cluster:
        took = await start_converged(cluster, n, limit=join_bound)
        await trio.sleep(30.0)
        cluster.stop("n9")
        dead = await cluster.converge({"n9": State.DEAD}, limit=n * LAN.probe_interval + suspicion_bounds(n)[1])
        print(f"\nseed {seed}: all alive {took:.2f} s after the last join, n9 dead everywhere after {dead:.2f} s")
        assert not cluster.lagging(cluster.all_alive())
        assert cluster.network.counters["delivered"] > cluster.network.counters["sent"], "duplicates were delivered"
        assert not [x for x in cluster.verdicts(EventKind.FAILED) if x.member != "n9"]
