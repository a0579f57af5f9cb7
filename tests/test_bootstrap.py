"""Cluster bootstrap end to end with real processes: `meshmail init`, `token create`, `join`,
`run --data-dir`, refusals of bad joins, `remove`, and keyring rotation on a live cluster.

Every node is a `meshmail run --data-dir DIR` process on 127.0.0.1 (ports from the kernel);
every command is the real CLI in a subprocess; /status is read over HTTPS checked against
the cluster CA, as an operator's monitoring would.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from helpers.cli import cli, ok, refused
from helpers.cluster import HOST, PASSWORD, POLL_INTERVAL, Cluster, states
from helpers.config import MESHMAIL

from meshmail.security import files
from meshmail.security.tokens import JoinTokenText, new_secret, parse_join_token


@pytest.fixture
def fleet(tmp_path) -> Iterator[Cluster]:
    fleet = Cluster(tmp_path)
    try:
        yield fleet
    finally:
        fleet.close()
        print(fleet.logs())


def test_init_join_and_a_second_master_admits_a_fifth_node(fleet):
    fleet.init("m1")
    data = fleet.data_dir("m1")
    for secret in (files.KEYRING, files.CA_KEY, files.NODE_KEY):
        assert (data / secret).stat().st_mode & 0o777 == 0o600, secret
    assert "name = \"m1\"" in (data / files.CONFIG).read_text()
    refused(cli("init", "--name", "other", *fleet.placement("m1"), "--admin-password-file", str(fleet.root / "x")),
            "already holds a node")  # fmt: skip
    fleet.start("m1")
    fleet.wait_alive(["m1"])
    assert (data / files.API_TOKEN).stat().st_mode & 0o777 == 0o600

    master_token = fleet.token("m1", "master")
    slave_token = fleet.token("m1", "slave", "--uses", "2", "--note", "two slaves")
    assert parse_join_token(master_token).masters == (fleet.url("m1").removeprefix("https://"),)
    assert ok("join", master_token, "--role", "master", "--name", "m2", *fleet.placement("m2")).startswith(
        "meshmail: m2 joined cluster prod as master"
    )
    assert fleet.join("s1", slave_token, "slave").returncode == 0
    assert fleet.join("s2", slave_token, "slave").returncode == 0
    assert (fleet.data_dir("m2") / files.CA_KEY).exists() and not (fleet.data_dir("s1") / files.CA_KEY).exists()
    for name in ("m2", "s1", "s2"):
        fleet.start(name)
    fleet.wait_alive(["m1", "m2", "s1", "s2"])
    statuses = {name: fleet.status(name) for name in ("m1", "m2", "s1", "s2")}
    assert {status["cluster_id"] for status in statuses.values()} == {statuses["m1"]["cluster_id"]}
    assert {name: status["role"] for name, status in statuses.items()} == {
        "m1": "master", "m2": "master", "s1": "slave", "s2": "slave"
    }  # fmt: skip

    listed = json.loads(ok("token", "list", "--json", "--data-dir", str(fleet.data_dir("m1"))))["tokens"]
    by_note = {token["note"]: token for token in listed}
    assert by_note["two slaves"]["used"] == 2 and by_note["two slaves"]["status"] == "used"

    # The second master admits a fifth node with a token it mints itself.
    fifth = fleet.token("m2", "slave")
    assert parse_join_token(fifth).masters[0] == fleet.url("m2").removeprefix("https://")
    assert fleet.join("s3", fifth, "slave").returncode == 0
    fleet.start("s3")
    fleet.wait_alive(["m1", "m2", "s1", "s2", "s3"])


def forged(token: str, **changes: Any) -> str:
    """The token with some fields changed and a valid checksum."""
    parsed = parse_join_token(token)
    fields = {
        "token_id": parsed.token_id, "secret": parsed.secret,
        "ca_fingerprint": parsed.ca_fingerprint, "masters": parsed.masters,
    }  # fmt: skip
    fields.update(changes)
    return JoinTokenText(**fields).encode()


def test_refused_joins_change_nothing(fleet):
    fleet.init("m1")
    fleet.start("m1")
    fleet.wait_alive(["m1"])
    m1 = str(fleet.data_dir("m1"))
    # A second cluster, whose master answers at an address of the first one's token.
    fleet.init("x1", cluster="other")
    fleet.start("x1")
    fleet.wait_alive(["x1"])

    def before() -> tuple[str, list]:
        status = fleet.status("m1")
        return status["state"]["digest"], json.loads(ok("token", "list", "--json", "--data-dir", m1))["tokens"]

    single = fleet.token("m1", "slave")
    assert fleet.join("s1", single, "slave").returncode == 0
    revoked = fleet.token("m1", "slave")
    ok("token", "revoke", parse_join_token(revoked).token_id, "--data-dir", m1)
    short = fleet.token("m1", "slave", "--ttl", "1s")
    time.sleep(1.5)
    elsewhere = forged(single, masters=(fleet.url("x1").removeprefix("https://"),))
    cases = {
        "expired": (short, "slave", "expired"),
        "used up": (single, "slave", "no uses left"),
        "revoked": (revoked, "slave", "revoked"),
        "wrong secret": (forged(fleet.token("m1", "slave"), secret=new_secret()), "slave", "not valid here"),
        "slave token as master": (fleet.token("m1", "slave"), "master", "for joining as slave, not as master"),
        "another cluster's CA": (elsewhere, "slave", "belongs to another cluster"),
        "wrong CA pin": (forged(single, ca_fingerprint=os.urandom(32)), "slave", "belongs to another cluster"),
        "malformed": ("mmjoin1.AAAA", "slave", "cut or mistyped"),
        "not a token": ("hello", "slave", "not a meshmail join token"),
        "truncated": (single[:-5], "slave", "cut or mistyped"),
    }
    for case, (token, role, words) in cases.items():
        digest, tokens = before()
        line = refused(fleet.join("joiner", token, role), words)
        assert PASSWORD not in line and parse_join_token(single).secret.hex() not in line, case
        assert not fleet.data_dir("joiner").exists() or not any(fleet.data_dir("joiner").iterdir()), case
        assert before() == (digest, tokens), f"{case}: the cluster changed"


def test_a_replayed_join_request_is_refused(fleet):
    """The same request (same nonce) sent twice with a token that has uses left."""
    fleet.init("m1")
    fleet.start("m1")
    fleet.wait_alive(["m1"])
    token = parse_join_token(fleet.token("m1", "slave", "--uses", "5"))
    from meshmail.security import ca

    body = json.dumps(
        {
            "token_id": token.token_id,
            "secret": base64.b64encode(token.secret).decode(),
            "role": "slave",
            "name": "s1",
            "nonce": os.urandom(16).hex(),
            "hosts": [HOST],
            "csr": ca.new_csr(ca.new_key(), "s1").decode(),
        }
    ).encode()
    context = ssl.create_default_context(cafile=str(fleet.data_dir("m1") / files.CA_CERT))
    context.check_hostname = False

    def post() -> tuple[int, dict]:
        request = urllib.request.Request(
            fleet.url("m1") + "/cluster/join", body, {"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=10, context=context) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    status, grant = post()
    assert status == 200 and grant["name"] == "s1" and "ca_key" not in grant
    status, answer = post()
    assert (status, answer["reason"]) == (409, "replayed")
    tokens = json.loads(ok("token", "list", "--json", "--data-dir", str(fleet.data_dir("m1"))))["tokens"]
    assert [t["used"] for t in tokens] == [1]


def counter(status: dict[str, Any], name: str) -> int:
    return status["counters"].get(name, 0)


def test_remove_then_rotate_the_keyring_on_a_live_cluster(fleet):
    """remove a node, then rotate: install, use, remove on a live 3-node cluster. No member
    is marked failed, every member ends with only the new key, and a server that holds only
    the old key (it joined before the rotation but started after it) can no longer talk."""
    fleet.init("m1")
    fleet.start("m1")
    fleet.wait_alive(["m1"])
    m1 = ["--data-dir", str(fleet.data_dir("m1"))]
    assert fleet.join("m2", fleet.token("m1", "master"), "master").returncode == 0
    slaves = fleet.token("m1", "slave", "--uses", "3")
    for name in ("s1", "gone", "late"):
        assert fleet.join(name, slaves, "slave").returncode == 0
    for name in ("m2", "s1", "gone"):
        fleet.start(name)
    live = ["m1", "m2", "s1"]
    fleet.wait_alive([*live, "gone"])

    # remove: everyone refuses its gossip, its API token stops working, routes to it end.
    gone_token = files.read_api_token(fleet.data_dir("gone"))
    assert fleet.get("m1", "/domains", gone_token) == {"domains": []}
    ok("domains", "assign", "gone.example", "gone", *m1)
    refused(cli("remove", "nosuch", *m1), "no node named nosuch")  # a typo burns no name
    assert "removed from the cluster" in ok("remove", "gone", *m1)
    fleet.wait(
        "gone is left everywhere and its gossip refused",
        live,
        lambda statuses: all(
            states(status)["gone"] == "left" and counter(status, "dropped.removed_member") > 0
            for status in statuses.values()
        ),
    )
    # Nobody talks to it any more, but the first node that drops its gossip tells it so.
    fleet.wait("gone knows it was removed", ["gone"], lambda statuses: statuses["gone"]["removed"] is True)
    with pytest.raises(urllib.error.HTTPError) as refusal:
        fleet.get("m2", "/domains", gone_token)
    assert refusal.value.code == 401
    route = json.loads(cli("route", "user@gone.example", "--json", *m1).stdout)
    assert route["no_route"]["reason"] == "slave_down"
    # The removed node says so, refuses writes (they would reach nobody) and cannot run again.
    gone = ["--data-dir", str(fleet.data_dir("gone"))]
    assert "this node was removed from the cluster" in ok("status", *gone)
    refused(cli("domains", "assign", "gone.example", "gone", "--force", *gone), "removed from the cluster")
    fleet.kill("gone")
    refused(cli("run", *gone), "node gone was removed from the cluster", "join it with a new token")

    # rotate, watching every live member's view while it happens.
    before = {name: fleet.status(name) for name in live}
    [old] = [key["id"] for key in json.loads(ok("keyring", "list", "--json", *m1))["keys"]]
    rotation = subprocess.Popen(
        [*MESHMAIL, "keyring", "rotate", *m1], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    views = []
    while rotation.poll() is None:
        views += [states(fleet.status(name)) for name in live]
        time.sleep(POLL_INTERVAL)
    out, err = rotation.communicate()
    assert rotation.returncode == 0, err
    assert f"key {old} removed" in out
    assert all(view[name] == "alive" for view in views for name in live), "a member was not alive during rotation"
    after = {name: fleet.status(name) for name in live}
    assert all(counter(after[name], "failed") == counter(before[name], "failed") for name in live)
    keys = json.loads(ok("keyring", "list", "--json", *m1))
    [new] = keys["keys"]
    assert new["id"] != old and (new["installed_on"], new["primary_on"], keys["members"]) == (3, 3, 3)
    fleet.wait(
        "every member holds only the new key",
        live,
        lambda statuses: all(status["keys"] == [new["id"]] for status in statuses.values()),
    )
    for name in live:
        assert len(files.load_keyring(fleet.data_dir(name))) == 1

    # A server with only the old key: its packets fail authentication and it never joins.
    refused_before = counter(fleet.status("m1"), "dropped.auth_failed")
    fleet.start("late")
    fleet.wait(
        "the old key's packets are refused",
        ["m1"],
        lambda statuses: counter(statuses["m1"], "dropped.auth_failed") > refused_before,
    )
    time.sleep(3)  # a node with the right key is alive everywhere within about a second
    assert all("late" not in states(fleet.status(name)) for name in live)
    assert set(states(fleet.status("late"))) == {"late"}
