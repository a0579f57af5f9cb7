"""`meshmail domains` and `meshmail route` against a real `meshmail run` process, found by
--url, --config or --data-dir; and the domain map surviving a kill -9 of the node."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.cli import assert_one_line_failure, closed_port, meshmail
from helpers.cluster import Cluster, Node

from meshmail.cli.render import format_route
from meshmail.config import load
from meshmail.security import files

#: Start of a node process (imports, bind, open the state) on a slow CI machine.
STARTUP_TIMEOUT = 30.0


def start(tmp_path: Path) -> Cluster:
    """One started node n1 whose config is also DIR/meshmail.toml in its data dir."""
    cluster = Cluster.configured(1, tmp_path)
    node = cluster.nodes["n1"]
    cluster.start()
    # Copied once started: the config then holds the ports n1 reported, which --data-dir needs.
    shutil.copy(node.config, Path(load(node.config).node.data_dir) / "meshmail.toml")
    wait_for(cluster)
    return cluster


def wait_for(cluster: Cluster) -> None:
    cluster.wait_until("n1 answers /status", ["n1"], lambda views: "n1" in views["n1"], STARTUP_TIMEOUT)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    cluster = start(tmp_path_factory.mktemp("domains-cli"))
    try:
        yield cluster
    finally:
        cluster.close()
        print(cluster.logs())


@pytest.fixture
def url(cluster, monkeypatch) -> str:
    """n1's URL; --url takes the API token from $MESHMAIL_TOKEN, set here to n1's."""
    node = cluster.nodes["n1"]
    monkeypatch.setenv("MESHMAIL_TOKEN", files.read_api_token(Path(load(node.config).node.data_dir)))
    return f"http://127.0.0.1:{node.http_port}"


def ok(*args: str) -> str:
    result = meshmail(*args)
    assert result.returncode == 0, result
    assert result.stderr == ""
    return result.stdout


@pytest.mark.parametrize("action", ["list", "show", "assign", "unassign", "conflicts"])
def test_help_of_each_action(action):
    result = meshmail("domains", action, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: meshmail domains {action}")
    assert "--data-dir DIR" in result.stdout


def test_help_of_route():
    assert meshmail("route", "--help").stdout.startswith("usage: meshmail route")


def test_assign_show_list_unassign(cluster, url):
    node: Node = cluster.nodes["n1"]
    data_dir = str(load(node.config).node.data_dir)
    # s1 and s2 never joined: forced (see test_assign_refuses_what_is_not_a_known_slave).
    assert ok("domains", "assign", "Example.COM", "s1", "--force", "--url", url) == "example.com -> s1 (admin)\n"
    assert ok("domains", "assign", "bücher.example", "s2", "--force", "--config", str(node.config)) == (
        "xn--bcher-kva.example (bücher.example) -> s2 (admin)\n"
    )
    for target in (["--url", url], ["--config", str(node.config)], ["--data-dir", data_dir]):
        assert ok("domains", "show", "example.com", *target) == "example.com -> s1 (admin)\n"
    assert ok("domains", "list", "--url", url).splitlines() == [
        f"{'DOMAIN':<38}  SLAVE  SOURCE",
        f"{'example.com':<38}  s1     admin",
        "xn--bcher-kva.example (bücher.example)  s2     admin",
    ]
    listed = json.loads(ok("domains", "list", "--slave", "s2", "--json", "--url", url))
    assert [d["display"] for d in listed["domains"]] == ["bücher.example"]
    assert ok("domains", "list", "--slave", "nobody", "--url", url) == "(no domains)\n"
    assert ok("domains", "unassign", "bücher.example", "--url", url) == "xn--bcher-kva.example unassigned\n"
    assert ok("domains", "unassign", "bücher.example", "--url", url) == "xn--bcher-kva.example was not assigned\n"
    assert ok("domains", "conflicts", "--url", url) == "(no conflicts)\n"
    assert json.loads(ok("domains", "conflicts", "--json", "--url", url)) == {"conflicts": []}
    table = ok("status", "--data-dir", data_dir)
    assert re.search(r"^state: 1 entries, 1 tombstones, 0 conflicts, digest [0-9a-f]{16}$", table, re.M), table


def test_assign_refuses_what_is_not_a_known_slave(url):
    assert_one_line_failure(
        meshmail("domains", "assign", "example.net", "nosuchslave", "--url", url),
        "answered 404: no slave named nosuchslave is known",
        "--force",
    )
    assert_one_line_failure(
        meshmail("domains", "assign", "example.net", "n1", "--url", url), "answered 400: n1 is a master, not a slave"
    )
    assert_one_line_failure(meshmail("domains", "show", "example.net", "--url", url), "example.net is not assigned")


def test_route(url):
    ok("domains", "assign", "routed.org", "n1", "--force", "--url", url)
    result = meshmail("route", "someone@routed.org", "--url", url)
    # n1 publishes no endpoints: a real answer, which is not a route (exit 1).
    assert result.returncode == 1 and result.stdout.startswith("someone@routed.org (imap): no route (no_endpoint)")
    result = meshmail("route", "someone@nowhere.org", "--protocol", "smtp", "--json", "--url", url)
    assert result.returncode == 1 and json.loads(result.stdout)["no_route"]["reason"] == "unknown_domain"


def test_failures_are_one_line(url):
    assert_one_line_failure(meshmail("domains", "show", "absent.org", "--url", url), "absent.org is not assigned")
    assert_one_line_failure(meshmail("domains", "show", "a..b", "--url", url), "'a..b' has an empty label")
    assert_one_line_failure(meshmail("domains", "assign", "localhost", "s1", "--url", url), "single label")
    assert_one_line_failure(meshmail("domains", "assign", "ok.org", "x" * 200, "--url", url), "1 to 128 characters")
    down = f"http://127.0.0.1:{closed_port()}"
    for args in (["domains", "list"], ["domains", "assign", "a.org", "s1"], ["route", "u@a.org"]):
        assert_one_line_failure(meshmail(*args, "--url", down), "cannot reach the node at", "refused")


def test_format_route():
    route = {"route": {"slave": "s1", "endpoint": "10.0.0.2:143", "state": "suspect"}}
    assert format_route("u@a.org", "imap", route) == "u@a.org (imap) -> s1 at 10.0.0.2:143 (suspect)"


def test_data_dir_without_a_config(tmp_path):
    assert_one_line_failure(meshmail("domains", "list", "--data-dir", str(tmp_path)), "meshmail.toml", "cannot read")


@pytest.mark.slow
def test_routes_from_disk_after_kill_9(tmp_path):
    """assign, kill -9, restart alone: the node answers from its map before talking to anyone."""
    cluster = start(tmp_path)
    try:
        node = cluster.nodes["n1"]
        config = str(node.config)
        ok("domains", "assign", "example.com", "s1", "--force", "--config", config)
        node.kill()
        node.start()
        wait_for(cluster)
        assert ok("domains", "show", "example.com", "--config", config) == "example.com -> s1 (admin)\n"
        status = json.loads(ok("status", "--json", "--config", config))
        assert status["state"]["domains"] == 1 and status["state"]["last_sync"] == {}
    finally:
        cluster.close()
        print(cluster.logs())


def test_https_to_a_plain_http_node(url):
    https = "https:" + url.removeprefix("http:")
    assert_one_line_failure(meshmail("domains", "list", "--url", https), "speaks plain HTTP, not HTTPS", f"use {url}")


def test_api_tokens_are_created_listed_and_revoked(cluster, url):
    """`admin api-token create` says whose token it made; list shows it with no secret;
    revoke (by a prefix of the id) ends it; the token of the node's own CLI keeps working."""
    data_dir = ["--data-dir", str(Path(load(cluster.nodes["n1"].config).node.data_dir))]
    made = ok("admin", "api-token", "create", "--note", "monitoring", *data_dir)
    token = made.splitlines()[1].strip()
    token_id = re.search(r"API token ([0-9a-f]{16}) for account node:n1", made).group(1)
    listed = json.loads(ok("admin", "api-token", "list", "--json", *data_dir))["tokens"]
    mine = [t for t in listed if t["id"] == token_id]
    assert mine and mine[0]["account"] == "node:n1" and mine[0]["note"] == "monitoring"
    assert token not in json.dumps(listed) and token.split("_")[-1] not in json.dumps(listed)
    assert "monitoring" in ok("admin", "api-token", "list", *data_dir)
    assert ok("domains", "list", "--url", url, "--token", token)  # the new token works
    assert ok("admin", "api-token", "revoke", token_id[:6], *data_dir).strip() == (
        f"meshmail: API token {token_id} revoked"
    )
    refused = meshmail("domains", "list", "--url", url, "--token", token)
    assert_one_line_failure(refused, "401")
    assert_one_line_failure(meshmail("admin", "api-token", "revoke", "ffff0000", *data_dir), "no API token id starts")
    assert ok("domains", "list", *data_dir)  # the node's own token was not touched
    assert ok("admin", "api-token", "create", "--quiet", *data_dir).startswith("mmapi1_")
