"""The domain map's admin API on a real node (node.serve, real HTTP): assign, show, list,
unassign, route; invalid names and bodies answer 400 with the reason, never 500."""

from __future__ import annotations

import json
import urllib.parse

import pytest
import trio
from helpers.config import minimal_config
from helpers.http import announce_oversize
from helpers.served import request

from meshmail.config import loads
from meshmail.core.clock import wall_ms
from meshmail.node import new_context
from meshmail.security import accounts
from meshmail.state.records import AdminAccount, Redemption, RemovedNode
from meshmail.state.replica import ClusterState
from meshmail.web import create_app
from meshmail.web.status import state_document


def body(document: object) -> bytes:
    return json.dumps(document).encode()


def path(name: str) -> str:
    return "/domains/" + urllib.parse.quote(name, safe="")


async def test_assign_show_list_unassign(node):
    assert await request(node, "GET", "/domains") == (200, {"domains": []})
    assert await request(node, "GET", "/domains/example.com") == (404, {"error": "example.com is not assigned"})

    record = {"domain": "example.com", "display": "example.com", "slave": "s1", "source": "admin"}
    # s1 and s2 never joined: forced (test_assign_refuses_what_is_not_a_known_slave).
    assert await request(node, "PUT", "/domains/Example.COM.", body({"slave": "s1", "force": True})) == (200, record)
    assert await request(node, "GET", "/domains/example.com") == (200, record)
    assert await request(node, "GET", "/domains/EXAMPLE.com") == (200, record)

    unicode = {"domain": "xn--bcher-kva.example", "display": "bücher.example", "slave": "s2", "source": "admin"}
    assert await request(node, "PUT", path("Bücher.example"), body({"slave": "s2", "force": True})) == (200, unicode)
    assert await request(node, "PUT", "/domains/a.org", body({"slave": "s1", "force": True})) == (
        200,
        record | {"domain": "a.org", "display": "a.org"},
    )

    _, listed = await request(node, "GET", "/domains")
    assert [d["domain"] for d in listed["domains"]] == ["a.org", "example.com", "xn--bcher-kva.example"]
    _, listed = await request(node, "GET", "/domains?slave=s2")
    assert listed == {"domains": [unicode]}
    assert await request(node, "GET", "/domains?slave=nobody") == (200, {"domains": []})

    assert await request(node, "DELETE", "/domains/example.com") == (200, {"domain": "example.com", "removed": True})
    assert await request(node, "DELETE", "/domains/example.com") == (200, {"domain": "example.com", "removed": False})
    assert (await request(node, "GET", "/domains/example.com"))[0] == 404

    _, status = await request(node, "GET", "/status")
    state = status["state"]
    assert state["domains"] == 2 and state["tombstones"] == 1 and state["conflicts"] == []
    assert state["stale"] is False and state["last_sync"] == {}
    assert isinstance(state["digest"], str) and isinstance(state["counters"], dict)


async def test_route(node):
    await request(node, "PUT", "/domains/example.com", body({"slave": "solo", "force": True}))
    await request(node, "PUT", "/domains/ghost.org", body({"slave": "ghost", "force": True}))
    found = {
        "route": dict(slave="solo", endpoint="127.0.0.1:1143", state="alive", transport="plain", client_address="none")
    }
    assert await request(node, "GET", "/route?address=User@Example.com&protocol=imap") == (200, found)
    assert await request(node, "GET", "/route?address=user@example.com") == (200, found)  # imap by default
    for address, protocol, reason in [
        ("user@example.com", "smtp", "no_endpoint"),
        ("user@ghost.org", "imap", "slave_unknown"),
        ("user@nowhere.net", "imap", "unknown_domain"),
        ("no-at-sign", "imap", "invalid_address"),
    ]:
        query = urllib.parse.urlencode({"address": address, "protocol": protocol})
        status, answer = await request(node, "GET", f"/route?{query}")
        assert status == 200 and answer["no_route"]["reason"] == reason, answer
        assert answer["no_route"]["detail"]
    status, answer = await request(node, "GET", "/route?address=user@example.com&protocol=gopher")
    assert status == 400 and "unknown protocol 'gopher'" in answer["error"]
    assert (await request(node, "GET", "/route"))[0] == 400


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("localhost", "single label"),
        ("a..b", "empty label"),
        ("127.0.0.1", "number"),
        ("has space.com", "white space"),
        ("x" * 300 + ".com", "longer than 63"),
    ],
)
async def test_invalid_names_answer_400_with_the_reason(node, name, words):
    for method, document in [("GET", None), ("PUT", body({"slave": "s1"})), ("DELETE", None)]:
        status, answer = await request(node, method, path(name), document)
        assert status == 400, (method, answer)
        assert words in answer["error"]


ODD_NAMES = [
    "%00",
    "\x00.com",
    "a..b",
    "-a.com",
    "a-.com",
    "xn--.com",
    "xn--zz.com",
    "x" * 64 + ".com",
    ".".join(["a"] * 200),
    "é" * 300,
    "日本.jp",
    "ｅｘａｍｐｌｅ.com",
    "\u200b.com",
    "\ud800.com",
    "a\u0301.com",
    "[127.0.0.1]",
    "..",
    ".",
    "conflicts",
    "a b",
    "a\tb.com",
    "%2e%2e",
    "\U0001f4e7.example",
]


@pytest.mark.parametrize("name", ODD_NAMES)
async def test_odd_names_never_give_500(node, name):
    try:
        quoted = path(name)
    except UnicodeEncodeError:
        quoted = "/domains/" + urllib.parse.quote(name.encode("utf-8", "surrogatepass"), safe="")
    for method, document in [("PUT", body({"slave": "s1"})), ("GET", None), ("DELETE", None)]:
        status, answer = await request(node, method, quoted, document)
        assert status in (200, 400, 404), (method, status, answer)
        assert status == 200 or answer["error"]
    query = urllib.parse.urlencode({"address": f"user@{name}"}, encoding="utf-8", errors="surrogatepass")
    assert (await request(node, "GET", f"/route?{query}"))[0] == 200


@pytest.mark.parametrize(
    ("document", "words"),
    [
        (b"", "not valid JSON"),
        (b"s1", "not valid JSON"),
        (b'["s1"]', "must be a JSON object"),
        (b"{}", '{"slave": "NODE"}'),
        (b'{"slave": ""}', '{"slave": "NODE"}'),
        (b'{"slave": 7}', '{"slave": "NODE"}'),
        (body({"slave": "n" * 129}), "1 to 128 characters"),
    ],
)
async def test_assign_refuses_bad_bodies(node, document, words):
    status, answer = await request(node, "PUT", "/domains/example.com", document)
    assert status == 400 and words in answer["error"]
    assert (await request(node, "GET", "/domains/example.com"))[0] == 404


async def test_a_body_over_the_limit_is_413_with_or_without_credentials(node):
    authorized = {"Authorization": f"Bearer {node.token}"}
    for headers in (authorized, {}):
        status, answer = await trio.to_thread.run_sync(
            announce_oversize, node.http, "PUT", "/domains/example.com", 70_000, headers
        )
        # Without credentials the 401 comes first: nothing is read of a stranger's body.
        assert (status, json.loads(answer)["error"][:28]) == (
            (413, "request body larger than 655") if headers else (401, "authentication required: a s")
        )
    assert (await request(node, "GET", "/domains/example.com"))[0] == 404


async def test_assign_refuses_what_is_not_a_known_slave(node):
    """A typo or a master as the target is refused with the reason, and --force named."""
    status, answer = await request(node, "PUT", "/domains/example.net", body({"slave": "nosuchslave"}))
    assert status == 404 and answer["error"].startswith("no slave named nosuchslave is known")
    assert '--force ("force": true)' in answer["error"]
    status, answer = await request(node, "PUT", "/domains/example.net", body({"slave": "solo"}))
    assert status == 400 and answer["error"].startswith("solo is a master, not a slave;")
    status, answer = await request(node, "PUT", "/domains/example.net", body({"slave": "solo", "force": "yes"}))
    assert status == 400 and '"force" must be true or false' in answer["error"]
    assert (await request(node, "GET", "/domains/example.net"))[0] == 404
    status, answer = await request(node, "PUT", "/domains/example.net", body({"slave": "solo", "force": True}))
    assert status == 200 and answer["slave"] == "solo"


@pytest.fixture
def app_ctx(tmp_path):
    """The Context of a node that never runs (no member is known), made as node.serve makes
    it, and the Authorization header of an API token written to its state."""
    with ClusterState.open(tmp_path, "me", wall_ms, fsync=False) as state:
        ctx = new_context(loads(minimal_config("me"), "test.toml"), state)
        ctx.replication.put("admin", "admin", AdminAccount("$scrypt$not-checked-here"))
        token = accounts.create_api_token(ctx.replication, "admin", "tests", wall_ms())
        yield ctx, {"Authorization": f"Bearer {token.encode()}"}


def admitted(replication, name: str, role: str = "slave") -> None:
    """Record that a master admitted `name` with a join token, as admission.admit does."""
    replication.put("redeemed", f"0123456789abcdef/{name:0>32}/m1", Redemption(name, role, "m1", wall_ms()))


async def test_a_slave_some_master_admitted_can_be_assigned_before_it_is_seen(app_ctx):
    ctx, headers = app_ctx
    admitted(ctx.replication, "s-new")
    admitted(ctx.replication, "m-new", "master")
    client = create_app(ctx).test_client()
    response = await client.put("/domains/a.org", json={"slave": "s-new"}, headers=headers)
    assert response.status_code == 200 and (await response.get_json())["slave"] == "s-new"
    response = await client.put("/domains/a.org", json={"slave": "m-new"}, headers=headers)
    assert response.status_code == 400 and "m-new is a master, not a slave" in (await response.get_json())["error"]
    ctx.replication.put("removed", "s-new", RemovedNode("admin", wall_ms()))
    response = await client.put("/domains/b.org", json={"slave": "s-new"}, headers=headers)
    assert response.status_code == 400 and "s-new was removed" in (await response.get_json())["error"]


async def test_conflicts_name_the_slave_that_routes_and_the_others(app_ctx):
    """Conflicts are the route and the claims other slaves' agents wrote."""
    ctx, headers = app_ctx
    replication = ctx.replication
    admitted(replication, "sa")
    replication.assign_domain("c.org", "sb", source="slave")
    replication.write_domains([], [("c.org", "sa", True)])
    replication.assign_domain("quiet.org", "sa", source="slave")
    client = create_app(ctx).test_client()
    response = await client.get("/domains/conflicts", headers=headers)
    assert response.status_code == 200
    assert await response.get_json() == {
        "conflicts": [{"domain": "c.org", "routes_to": "sb", "also_claimed_by": ["sa"]}]
    }
    # /status lists them too (its "state" block; this node has no memberlist for the rest).
    listed = state_document(replication, ctx.metrics)["conflicts"]
    assert listed == [{"domain": "c.org", "routes_to": "sb", "also_claimed_by": ["sa"]}]
    # An admin's decision ends the conflict.
    response = await client.put("/domains/c.org", json={"slave": "sa"}, headers=headers)
    assert response.status_code == 200
    assert await (await client.get("/domains/conflicts", headers=headers)).get_json() == {"conflicts": []}
