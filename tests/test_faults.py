"""Faults injected into real `meshmail run` processes: a network partition (namespaces and
iptables), file descriptor exhaustion, and memory under rounds of slow HTTPS connections.

Each waits by polling against a bound derived from the settings it runs with; memory is
judged by its growth from round to round, never by time.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from helpers import netns
from helpers.cluster import TIMEOUT, Cluster, states
from helpers.config import MESHMAIL

from meshmail.config import load
from meshmail.security import files

pytestmark = pytest.mark.slow

#: Added to each node's [gossip] section on top of the local profile: failures are seen in seconds.
GOSSIP = "probe_interval = 0.5\n"

# --------------------------------------------------------------------------- partition

NAMES = [f"n{i + 1}" for i in range(5)]
MAJORITY, MINORITY = NAMES[:3], NAMES[3:]
#: From the moment every member sees every other alive again, the domain maps agree within this.
STATE_AGREES_WITHIN = 3.0
#: A heal is seen once a dead member hears gossip (kept up for gossip_to_the_dead_time, 15 s
#: in the local profile) and refutes it, or at the latest at a reconnect push-pull (15-45 s).
HEAL_TIMEOUT = 60.0

needs_netns = pytest.mark.skipif(
    bool(netns.missing_tools()) and not os.environ.get("CI"),
    reason=f"needs {', '.join(netns.missing_tools())}: {netns.INSTALL}",
)


@pytest.fixture
def net() -> Iterator[netns.Net]:
    net = netns.Net(NAMES)
    try:
        net.create()
        yield net
    finally:
        net.close()


@pytest.fixture
def partitioned(net, tmp_path) -> Iterator[Cluster]:
    """Five started nodes, each in its namespace of `net`, all alive in every view."""
    cluster = Cluster.configured(len(NAMES), tmp_path, gossip=GOSSIP)
    net.place(cluster)
    try:
        cluster.start()
        cluster.wait_alive(NAMES)
        yield cluster
    finally:
        cluster.close()
        print(cluster.logs())  # pytest shows it when the test failed


def token(cluster: Cluster, name: str) -> str:
    return files.read_api_token(Path(load(cluster.nodes[name].config).node.data_dir))


def assign(cluster: Cluster, name: str, domain: str, slave: str) -> None:
    """`meshmail domains assign` run in node `name`'s namespace against its API."""
    node = cluster.nodes[name]
    argv = [*node.prefix, *MESHMAIL, "domains", "assign", domain, slave, "--force", "--url", node.url]
    env = {**os.environ, "MESHMAIL_TOKEN": token(cluster, name)}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=TIMEOUT, check=False)
    assert result.returncode == 0, result
    assert result.stdout == f"{domain} -> {slave} (admin)\n"


def sees(statuses: Mapping[str, dict], names: list[str], state: str) -> bool:
    return all(all(states(status).get(name) == state for name in names) for status in statuses.values())


def digests(statuses: Mapping[str, dict]) -> dict[str, str]:
    return {name: status["state"]["digest"] for name, status in statuses.items()}


@needs_netns
def test_partition_heals_and_the_later_write_wins(net, partitioned):
    cluster = partitioned
    cluster.wait("the domain maps agree before the cut", NAMES, lambda found: len(set(digests(found).values())) == 1)

    net.cut(MAJORITY, MINORITY)
    cluster.wait(f"{MAJORITY} see {MINORITY} dead", MAJORITY, lambda found: sees(found, MINORITY, "dead"))
    cluster.wait(f"{MINORITY} see {MAJORITY} dead", MINORITY, lambda found: sees(found, MAJORITY, "dead"))
    assign(cluster, "n1", "contested.example", "left")
    assign(cluster, "n1", "majority.example", "left")
    assign(cluster, "n4", "minority.example", "right")
    assign(cluster, "n4", "contested.example", "right")  # later: it wins
    sides = [
        cluster.wait(f"{side} agree", side, lambda found: len(set(digests(found).values())) == 1)
        for side in (MAJORITY, MINORITY)
    ]
    assert digests(sides[0])["n1"] != digests(sides[1])["n4"]

    net.heal()
    cluster.wait("every member alive in every view", NAMES, lambda found: sees(found, NAMES, "alive"), HEAL_TIMEOUT)
    found = cluster.wait(
        f"equal domain maps within {STATE_AGREES_WITHIN} s of the heal being seen",
        NAMES,
        lambda found: len(set(digests(found).values())) == 1,
        STATE_AGREES_WITHIN,
    )
    assert all(status["state"]["conflicts"] == [] for status in found.values())
    expected = {"contested.example": "right", "majority.example": "left", "minority.example": "right"}
    for name in NAMES:
        routes = cluster.get(name, "/domains", token(cluster, name))["domains"]
        assert {route["domain"]: route["slave"] for route in routes} == expected, name
