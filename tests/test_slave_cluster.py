"""Two masters and two slaves (real `meshmail run` processes, joined with tokens) in front
of two real Dovecot instances (tests/helpers/mailkit.py): the slaves publish their domains from
their sources and their Dovecot's services with health; every master routes each domain
to the right slave; editing a source moves a domain; stopping a Dovecot marks its
services down in every master's /status, starting it marks them up.

One first master m1 serves the whole module; each test joins slaves of its own names to it.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import mailkit
from helpers.cli import cli, ok
from helpers.cluster import Cluster

from meshmail.security import files

MASTERS = ["m1", "m2"]
#: Slave timings for the test: files polled every 0.2 s, read once settled for 0.5 s,
#: services probed every 0.3 s.
SLAVE_SETTINGS = """
[slave]
poll_interval = 0.2
settle = 0.5
probe_interval = 0.3
probe_timeout = 0.25
"""


def endpoints(dovecot: mailkit.Dovecot) -> str:
    found = dovecot.endpoints()
    return f"""
[endpoints]
imap = {{ address = "{found["imap"]}", transport = "starttls", client_address = "id" }}
pop3 = {{ address = "{found["pop3"]}", transport = "starttls" }}
lmtp = "{found["lmtp"]}"
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Cluster]:
    """A cluster whose first master m1 is made by init, started and alive; every process it
    started is killed at the end."""
    root = tmp_path_factory.mktemp("slavecluster") / "nodes"
    root.mkdir()
    fleet = Cluster(root)
    try:
        fleet.init("m1")
        fleet.start("m1")
        fleet.wait_alive(["m1"])
        yield fleet
    finally:
        fleet.close()
        print(fleet.logs())


@pytest.fixture
def backends(tmp_path) -> Iterator[tuple[mailkit.Dovecot, mailkit.Dovecot]]:
    mailkit.require("dovecot")
    with (
        mailkit.dovecot(tmp_path / "d1", {"ann@one.example": "secret-1"}, name="d1") as d1,
        mailkit.dovecot(tmp_path / "d2", {"bob@two.example": "secret-2"}, name="d2") as d2,
    ):
        yield d1, d2


def route(master: str, fleet: Cluster, address: str, protocol: str = "imap") -> dict:
    result = cli("route", address, "--protocol", protocol, "--json", "--data-dir", str(fleet.data_dir(master)))
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def wait_routes(fleet: Cluster, what: str, check: Callable[[dict], bool], address: str, protocol: str = "imap") -> None:
    """Until every master's route for `address` passes `check`: polled over the masters' API
    (quicker than the CLI), then `meshmail route` must agree on every master."""
    query = urllib.parse.urlencode({"address": address, "protocol": protocol})
    fleet.wait(
        what,
        MASTERS,
        lambda _: all(
            check(fleet.get(master, f"/route?{query}", files.read_api_token(fleet.data_dir(master))))
            for master in MASTERS
        ),
    )
    assert all(check(route(master, fleet, address, protocol)) for master in MASTERS), what


def endpoint_states(status: dict, slave: str) -> dict[str, bool]:
    [member] = [m for m in status["members"] if m["name"] == slave]
    return {service: endpoint["up"] for service, endpoint in member["endpoints"].items()}


def test_slaves_publish_domains_and_health_to_every_master(fleet, backends, tmp_path):
    d1, d2 = backends
    assert fleet.join("m2", fleet.token("m1", "master"), "master").returncode == 0
    slave_token = fleet.token("m1", "slave", "--uses", "2")
    assert fleet.join("s1", slave_token, "slave").returncode == 0
    assert fleet.join("s2", slave_token, "slave").returncode == 0

    # s1 lists its domains DirectAdmin-style; s2 takes them from its Dovecot's passwd-file.
    s1_domains = tmp_path / "s1-domains"
    s1_domains.write_text("# /etc/virtual/domains\none.example\nMoving.Example\n")
    sources = {
        "s1": f'[[slave.sources]]\ntype = "directadmin"\npath = "{s1_domains}"\n',
        "s2": f'[[slave.sources]]\ntype = "dovecot"\npath = "{d2.passwd}"\n',
    }
    for slave, dovecot in (("s1", d1), ("s2", d2)):
        config = fleet.data_dir(slave) / files.CONFIG
        config.write_text(config.read_text() + endpoints(dovecot) + SLAVE_SETTINGS + sources[slave])
    fleet.start("m2", "s1", "s2")
    fleet.wait_alive(["m1", "m2", "s1", "s2"])

    # Every master routes each domain to its slave, with the endpoint and how to use it.
    d1_imap, d2_imap = d1.endpoints()["imap"], d2.endpoints()["imap"]
    wait_routes(fleet, "one.example -> s1", lambda r: r.get("route", {}).get("slave") == "s1", "ann@one.example")
    wait_routes(fleet, "two.example -> s2", lambda r: r.get("route", {}).get("slave") == "s2", "bob@two.example")
    for master in MASTERS:
        assert route(master, fleet, "ann@one.example")["route"] == {
            "slave": "s1", "endpoint": d1_imap, "state": "alive", "transport": "starttls", "client_address": "id"
        }  # fmt: skip
        assert route(master, fleet, "bob@two.example", "pop3")["route"]["endpoint"] == d2.endpoints()["pop3"]
        assert route(master, fleet, "bob@two.example", "lmtp")["route"]["endpoint"] == d2.endpoints()["lmtp"]
        assert route(master, fleet, "x@moving.example")["route"]["endpoint"] == d1_imap
    shown = ok("slave", "domains", "--data-dir", str(fleet.data_dir("s1")))
    assert "moving.example  directadmin  published" in shown and "imap: up" in shown

    # Move a domain: out of s1's list, into s2's passwd-file (a new user there).
    s1_domains.write_text("one.example\n")
    d2.add_user("carl@moving.example", "secret-3")
    moved = lambda r: r.get("route", {}).get("endpoint") == d2_imap  # noqa: E731
    wait_routes(fleet, "moving.example -> s2", moved, "x@moving.example")

    # Stop s1's Dovecot: every master sees its services down and stops routing to them.
    d1.stop()
    fleet.wait(
        "s1's services down in every master's /status",
        MASTERS,
        lambda statuses: all(
            endpoint_states(status, "s1") == {"imap": False, "pop3": False, "lmtp": False}
            for status in statuses.values()
        ),
    )
    assert route("m2", fleet, "ann@one.example")["no_route"]["reason"] == "service_down"
    assert endpoint_states(fleet.status("m1"), "s2") == {"imap": True, "pop3": True, "lmtp": True}
    d1.start()
    fleet.wait(
        "s1's services up again in every master's /status",
        MASTERS,
        lambda statuses: all(all(endpoint_states(status, "s1").values()) for status in statuses.values()),
    )
    assert route("m1", fleet, "ann@one.example")["route"]["endpoint"] == d1.endpoints()["imap"]


def test_a_slave_with_a_missing_source_does_not_start(fleet, tmp_path):
    assert fleet.join("s3", fleet.token("m1", "slave"), "slave").returncode == 0
    config = fleet.data_dir("s3") / files.CONFIG
    absent = tmp_path / "absent"
    config.write_text(config.read_text() + f'[[slave.sources]]\ntype = "directadmin"\npath = "{absent}"\n')
    for check in ((), ("--check",)):  # run --check checks what run checks
        result = cli("run", "--data-dir", str(fleet.data_dir("s3")), *check, timeout=60)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [f"meshmail: slave source directadmin: {absent} does not exist"]


def test_a_generated_slave_config_documents_endpoints_and_sources(fleet):
    assert fleet.join("s4", fleet.token("m1", "slave"), "slave").returncode == 0
    text = (fleet.data_dir("s4") / files.CONFIG).read_text()
    assert "# [endpoints]" in text and '# type = "cpanel"' in text and "ca_key" not in text
    assert "# [endpoints]" not in (fleet.data_dir("m1") / files.CONFIG).read_text()
    assert Path(fleet.data_dir("s4") / files.CONFIG).stat().st_mode & 0o777 == 0o640
