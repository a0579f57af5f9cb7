"""Who routes a domain that two slaves list (the README's "Who routes a domain"): the slave
that routes it keeps it while it is alive, suspect or dead, the other's claim is a conflict
on every master; a slave that leaves or is removed hands its domains to a claimant. With
two agents on two replicas, then with real `meshmail run` processes."""

from __future__ import annotations

import json
import signal
import urllib.error

from helpers.cli import assert_one_line_failure, cli, meshmail, ok
from helpers.cluster import Cluster

from meshmail.config import SlaveSection, SourceConfig
from meshmail.core.clock import wall_ms
from meshmail.gossip.member import MemberInfo
from meshmail.gossip.messages import State
from meshmail.metrics import Metrics
from meshmail.replication import Replication
from meshmail.security import files
from meshmail.slave.agent import SlaveAgent
from meshmail.state.hlc import Timestamp
from meshmail.state.lww import Entry, chunks, encode_entries
from meshmail.state.records import DomainRoute
from meshmail.state.replica import ClusterState

MASTERS = ["m1", "m2"]


def member(name: str, state: State = State.ALIVE) -> MemberInfo:
    return MemberInfo(name, "192.0.2.1", 7946, b"", 1, state, 0.0)


def exchange(a: ClusterState, b: ClusterState) -> None:
    """Both replicas end up holding every entry of both (what anti-entropy does)."""
    for batch in list(chunks(a.map.entries_in())):
        b.apply(batch)
    for batch in list(chunks(b.map.entries_in())):
        a.apply(batch)


async def test_two_claimants_of_a_left_slaves_domain_one_wins_the_other_claims(tmp_path):
    """s3 routed shared.example and left; s1 and s2 both list it and take it at once. The
    later write wins on both replicas; the other slave then claims it, a conflict both list."""
    members = {name: member(name) for name in ("s1", "s2")} | {"s3": member("s3", State.LEFT)}
    route = Entry("domain/shared.example", DomainRoute("s3", "slave"), Timestamp(wall_ms() - 1000, 0, "s3"))
    source = SourceConfig("static", "static", domains=("shared.example",))
    agents, states = [], []
    for name in ("s1", "s2"):
        state = ClusterState.open(tmp_path / name, name, wall_ms, fsync=False)
        state.apply(encode_entries([route]))
        agent = SlaveAgent(name, SlaveSection(sources=(source,)), {}, Replication(state, wall_ms), members, Metrics())
        agent.sources[0].domains = frozenset({"shared.example"})
        agents.append(agent)
        states.append(state)
    try:
        assert [await agent.publish() for agent in agents] == [1, 1]  # both take it
        exchange(*states)
        winner = states[0].domain("shared.example")
        assert winner == states[1].domain("shared.example") and winner.slave in ("s1", "s2")
        loser = "s2" if winner.slave == "s1" else "s1"
        assert [await agent.publish() for agent in agents] == [int(loser == "s1"), int(loser == "s2")]
        exchange(*states)
        for state in states:
            assert state.domain("shared.example") == winner
            assert state.conflicts() == [("shared.example", winner.slave, [loser])]
    finally:
        for state in states:
            state.close()


# --- real processes ----------------------------------------------------------------------------


def routes_to(fleet: Cluster, master: str, domain: str) -> str | None:
    result = cli("domains", "show", domain, "--json", "--data-dir", str(fleet.data_dir(master)))
    return json.loads(result.stdout)["slave"] if result.returncode == 0 else None


def routed(fleet: Cluster, master: str, domain: str) -> str | None:
    """What `routes_to` says, asked over the master's API: quick enough to poll."""
    try:
        return fleet.get(master, f"/domains/{domain}", files.read_api_token(fleet.data_dir(master)))["slave"]
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def wait_routing(fleet: Cluster, domain: str, slave: str, conflicts: list[dict]) -> None:
    """Until every master routes `domain` to `slave` and lists exactly `conflicts`; then
    `meshmail domains show` says so on every master."""
    fleet.wait(
        f"{domain} -> {slave} with conflicts {conflicts} on every master",
        MASTERS,
        lambda statuses: all(
            status["state"]["conflicts"] == conflicts and routed(fleet, master, domain) == slave
            for master, status in statuses.items()
        ),
    )
    assert [routes_to(fleet, master, domain) for master in MASTERS] == [slave] * len(MASTERS)


def conflict(routes: str, *others: str) -> list[dict]:
    return [{"domain": "shared.example", "routes_to": routes, "also_claimed_by": list(others)}]


def test_a_live_slave_keeps_its_domain_and_a_slave_that_goes_hands_it_over(fleet):
    fleet.init("m1")
    fleet.start("m1")
    fleet.wait_alive(["m1"])
    assert fleet.join("m2", fleet.token("m1", "master"), "master").returncode == 0
    slaves = fleet.token("m1", "slave", "--uses", "2")
    for name in ("s1", "s2"):
        assert fleet.join(name, slaves, "slave").returncode == 0
        config = fleet.data_dir(name) / files.CONFIG
        listed = '["shared.example", "one.example"]' if name == "s1" else '["shared.example"]'
        config.write_text(config.read_text() + f'[[slave.sources]]\ntype = "static"\ndomains = {listed}\n')
    fleet.start("m2", "s1")
    wait_routing(fleet, "shared.example", "s1", [])

    # 1. s2 starts later listing the domain: it does not take it; its claim is a conflict everywhere.
    fleet.start("s2")
    wait_routing(fleet, "shared.example", "s1", conflict("s1", "s2"))
    table = ok("domains", "conflicts", "--data-dir", str(fleet.data_dir("m2")))
    assert table.splitlines()[1].split() == ["shared.example", "s1", "s2"]

    # 2. s1 leaves gracefully: s2 takes the domain by itself. Back, s1 claims it in turn.
    fleet.nodes["s1"].send(signal.SIGTERM)
    assert fleet.nodes["s1"].process.wait(timeout=30) == 0
    wait_routing(fleet, "shared.example", "s2", [])
    assert routes_to(fleet, "m1", "one.example") == "s1"  # nobody else lists it: it stays
    fleet.start("s1")
    wait_routing(fleet, "shared.example", "s2", conflict("s2", "s1"))

    # ... and s2 removed: s1 takes it.
    ok("remove", "s2", "--data-dir", str(fleet.data_dir("m1")))
    wait_routing(fleet, "shared.example", "s1", [])

    # 3. An admin assigns only to a known slave, unless forced.
    m1 = ["--data-dir", str(fleet.data_dir("m1"))]
    assert_one_line_failure(meshmail("domains", "assign", "example.net", "m2", *m1), "m2 is a master, not a slave")
    assert_one_line_failure(meshmail("domains", "assign", "example.net", "nosuchslave", *m1), "--force")
    assert_one_line_failure(meshmail("domains", "assign", "example.net", "s2", *m1), "s2 was removed")
    assert ok("domains", "assign", "example.net", "s1", *m1) == "example.net -> s1 (admin)\n"
    assert ok("domains", "assign", "example.org", "m2", "--force", *m1) == "example.org -> m2 (admin)\n"
