"""A real node (node.serve on 127.0.0.1, ports from the kernel) asked over real HTTP."""

from __future__ import annotations

import datetime
import json
import resource
import socket
import time

import pytest
import trio
from helpers.config import minimal_config
from helpers.http import announce_oversize
from helpers.served import request, start

from meshmail.config import loads
from meshmail.core.address import format_address
from meshmail.node import join_seeds
from meshmail.web.app import MAX_BODY


async def test_status_document(node):
    status, document = await request(node, "GET", "/status")
    assert status == 200
    assert document["node"] == "solo"
    assert document["role"] == "master"
    assert document["cluster"] == "test"
    assert document["address"] == format_address(node.gossip)
    assert document["incarnation"] >= 1
    assert isinstance(document["health_score"], int)
    assert isinstance(document["counters"], dict)
    [me] = document["members"]
    assert me["name"] == "solo"
    assert me["state"] == "alive"
    assert me["address"] == format_address(node.gossip)
    assert me["role"] == "master"
    assert me["endpoints"] == {
        "imap": {"address": "127.0.0.1:1143", "transport": "plain", "client_address": "none", "up": True}
    }
    assert me["tags"] == {"rack": "r1"}
    assert abs(me["changed_unix"] - time.time()) < 60
    changed = datetime.datetime.fromisoformat(me["changed"].replace("Z", "+00:00"))
    assert me["changed"].endswith("Z")
    assert abs(changed.timestamp() - me["changed_unix"]) < 0.001
    assert document["clock_offsets"] == {}  # nobody's packets were stale
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert document["process"]["fd_limit"] == limit and 0 < document["process"]["open_fds"] < limit


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/leave", b"leave now", "not valid JSON"),
        ("/leave", b"\xff\xfe", "not valid JSON"),
        ("/leave", b"[]", "must be a JSON object"),
        ("/join", b"", "not valid JSON"),
        ("/join", b"{seeds: 1}", "not valid JSON"),
        ("/join", b'"127.0.0.1:7946"', "must be a JSON object"),
        ("/join", b'{"seeds": "127.0.0.1:7946"}', "1 to 64 seeds"),
        ("/join", b'{"seeds": []}', "1 to 64 seeds"),
        ("/join", b'{"seeds": ["127.0.0.1"]}', "is not host:port"),
        ("/join", b'{"seeds": [7946]}', "expected a string"),
        ("/join", b"[" * 5000 + b"]" * 5000, "not valid JSON"),  # deeper than the parser's recursion
        ("/join", b'{"seeds": ["\\ud800:1"]}', "not valid JSON"),  # a lone surrogate is not text
        ("/login", b'{"account": "\\udfff", "password": "x"}', "not valid JSON"),
    ],
)
async def test_admin_endpoints_refuse_bad_bodies(node, path, body, words):
    status, document = await request(node, "POST", path, body)
    assert status == 400
    assert words in document["error"]
    status, document = await request(node, "GET", "/status")
    assert status == 200 and document["members"][0]["state"] == "alive"


async def test_a_body_over_the_limit_is_413(node):
    status, answer = await trio.to_thread.run_sync(
        announce_oversize, node.http, "POST", "/join", MAX_BODY + 1, {"Authorization": f"Bearer {node.token}"}
    )
    assert status == 413 and f"larger than {MAX_BODY} bytes" in json.loads(answer)["error"]
    status, document = await request(node, "GET", "/status")
    assert status == 200 and document["members"][0]["state"] == "alive"


async def test_join_with_no_answer(node):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    body = json.dumps({"seeds": [f"127.0.0.1:{port}"]}).encode()
    assert await request(node, "POST", "/join", body) == (200, {"joined": 0})


async def test_unknown_path_and_method_answer_json(node):
    assert (await request(node, "GET", "/nope"))[0] == 404
    status, document = await request(node, "GET", "/leave")
    assert status == 405 and document["error"]


async def test_leave_stops_the_node():
    config = loads(minimal_config("leaver"), "test.toml")
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            node = await start(nursery, config)
            assert await request(node, "POST", "/leave") == (202, {"leaving": True})
        # serve returned by itself: the nursery is done without being cancelled.


class _Seeds:
    """A memberlist stand-in that answers joins from a script."""

    name = "me"
    address = ("127.0.0.1", 7946)

    def __init__(self, answers: list[int]) -> None:
        self.answers = answers
        self.calls: list[tuple[float, list]] = []

    async def join(self, seeds) -> int:
        self.calls.append((trio.current_time(), list(seeds)))
        return self.answers.pop(0)

    def members(self) -> list:
        return []


async def test_seeds_are_retried_until_one_answers(autojump_clock):
    memberlist = _Seeds([0, 0, 0, 0, 0, 0, 1])
    seed = ("127.0.0.1", 7947)
    await join_seeds(memberlist, [memberlist.address, seed])
    assert [seeds for _, seeds in memberlist.calls] == [[seed]] * 7  # never itself
    assert [at for at, _ in memberlist.calls] == [0, 0.5, 1.5, 3.5, 7.5, 12.5, 17.5]


async def test_a_lone_seed_does_not_join():
    memberlist = _Seeds([])
    await join_seeds(memberlist, [memberlist.address])
    assert memberlist.calls == []


def _h2_early_answer_then_body(address: tuple[str, int]) -> None:
    """HTTP/2 with prior knowledge: a POST whose answer (400, too large) comes before the
    rest of its body, which then arrives for a stream the server already closed."""
    import h2.config
    import h2.connection

    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(connection.data_to_send())
        headers = [(":method", "POST"), (":path", "/login"), (":scheme", "http"), (":authority", "x"),
                   ("content-type", "application/json")]  # fmt: skip
        connection.increment_flow_control_window(1 << 30)
        connection.send_headers(1, headers)
        sock.sendall(connection.data_to_send())
        body = b"[" * (4 * MAX_BODY)
        sent = 0
        try:
            while sent < len(body):
                window = min(connection.local_flow_control_window(1), connection.max_outbound_frame_size)
                if window <= 0:
                    data = sock.recv(65536)  # window updates, or the early answer
                    if not data:
                        return  # the server closed the connection: that is its answer
                    connection.receive_data(data)
                    sock.sendall(connection.data_to_send())
                    continue
                connection.send_data(1, body[sent : sent + window])
                sent += window
                sock.sendall(connection.data_to_send())
            connection.end_stream(1)
            sock.sendall(connection.data_to_send())
            sock.recv(65536)
        except Exception:  # the server may reset the stream or close: that is its answer
            pass


async def test_no_request_can_stop_the_node(node):
    """Whatever one connection does, the node keeps serving HTTP (restarting its server if
    it must) and keeps gossiping."""
    before = (await request(node, "GET", "/status"))[1]["incarnation"]
    for _ in range(3):
        await trio.to_thread.run_sync(_h2_early_answer_then_body, node.http)
        with trio.fail_after(10):
            while True:
                try:
                    status, document = await request(node, "GET", "/status")
                    break
                except OSError:
                    await trio.sleep(0.1)
        assert status == 200 and document["members"][0]["state"] == "alive"
    assert document["incarnation"] == before
