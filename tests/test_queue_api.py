"""The queue's admin API (GET /queue, GET /queue/ID, POST /queue/flush, POST /queue/ID/retry,
DELETE /queue/ID) on the app of a node whose Runner holds a real spool in a temporary folder.
The slaves are unknown to the node and no delivery loop runs, so nothing leaves the queue but
what the routes do. Also: a served node exposes its MX's queue and the MX series."""

from __future__ import annotations

import logging
import random

import pytest
from helpers.config import minimal_config
from helpers.served import request

from meshmail.config import loads
from meshmail.core.clock import wall_ms
from meshmail.mta.deliver import UNREACHABLE, Deliverer
from meshmail.mta.queue import HOUR_MS, Queue, RetryPolicy
from meshmail.mta.runner import Runner
from meshmail.mta.spool import Envelope, Recipient, RecipientState, Spool, new_queue_id
from meshmail.node import new_context
from meshmail.proxy.backend import Connector, backend_contexts
from meshmail.security import accounts
from meshmail.state.records import AdminAccount, RemovedNode
from meshmail.state.replica import ClusterState
from meshmail.web import create_app, queue_api

DATA = b"From: a@outside.example\r\nSubject: queued\r\n\r\nhello\r\n"


@pytest.fixture
def queued(tmp_path):
    """(ctx, auth headers, runner) of a node "me" that never runs, its Runner over a spool in
    tmp_path/queue, in ctx.mta as the MX service puts it."""
    with ClusterState.open(tmp_path / "state", "me", wall_ms, fsync=False) as state:
        ctx = new_context(loads(minimal_config("me"), "test.toml"), state)
        ctx.replication.put("admin", "admin", AdminAccount("$scrypt$not-checked-here"))
        token = accounts.create_api_token(ctx.replication, "admin", "tests", wall_ms())
        spool = Spool.open(tmp_path / "queue")
        try:
            deliverer = Deliverer(Connector(backend_contexts(None, None, "/")), "mx.test")
            queue = Queue(RetryPolicy(), random.Random(1))
            ctx.mta = Runner(spool, queue, deliverer, ctx.router, "mx.test", "me", metrics=ctx.metrics)
            yield ctx, {"Authorization": f"Bearer {token.encode()}"}, ctx.mta
        finally:
            spool.close()


async def put(runner: Runner, n: int, sender: str, recipients: list[tuple[str, str]], **fields) -> Envelope:
    """Store and index message number `n` (ids sort by n), tried once, next try in an hour."""
    now = wall_ms()
    people = [Recipient(a, s, attempts=1, next_attempt_ms=now + HOUR_MS, reply=UNREACHABLE) for a, s in recipients]
    envelope = Envelope(new_queue_id(now - 1000 + n, n), sender, people, now - 1000 + n, "192.0.2.7", "client.test",
                        origin="me", **fields)  # fmt: skip
    envelope = await runner.spool.store(envelope, DATA)
    runner.queue.add(envelope)
    return envelope


async def three(runner: Runner) -> tuple[Envelope, Envelope, Envelope]:
    """a: at s1 and s2; b: at s1 (one recipient already delivered); c: at s2, from the null sender."""
    a = await put(runner, 1, "x@outside.example", [("ann@one.example", "s1"), ("bob@two.example", "s2")])
    b = await put(runner, 2, "y@outside.example", [("cy@one.example", "s1")])
    b = Envelope(**{**_fields(b), "recipients": [*b.recipients, Recipient("di@one.example", "s1",
                 RecipientState.DELIVERED, 1, 0)]})  # fmt: skip
    await runner.spool.update(b)
    runner.queue.add(b)
    c = await put(runner, 3, "", [("eve@two.example", "s2")])
    return a, b, c


def _fields(envelope: Envelope) -> dict:
    return {name: getattr(envelope, name) for name in envelope.__slots__ if not name.startswith("__")}


async def call(ctx, headers, method: str, path: str) -> tuple[int, dict]:
    client = create_app(ctx).test_client()
    response = await client.open(path, method=method, headers=headers)
    return response.status_code, await response.get_json()


async def test_list_and_show(queued):
    ctx, headers, runner = queued
    a, b, c = await three(runner)
    status, listed = await call(ctx, headers, "GET", "/queue")
    assert status == 200 and listed["more"] == 0
    assert [m["id"] for m in listed["messages"]] == [a.id, b.id, c.id]
    first = listed["messages"][0]
    assert first == {
        "id": a.id,
        "sender": "x@outside.example",
        "recipients": [{"address": "ann@one.example", "slave": "s1"}, {"address": "bob@two.example", "slave": "s2"}],
        "size": len(DATA),
        "received_ms": a.received_ms,
        "attempts": 1,
        "next_attempt_ms": a.recipients[0].next_attempt_ms,
        "in_flight": False,
        "last_reply": "451 4.4.1 The slave's mail service cannot be reached now",
    }
    assert listed["messages"][1]["recipients"] == [{"address": "cy@one.example", "slave": "s1"}]  # not the delivered
    assert listed["messages"][2]["sender"] == ""

    status, at_s2 = await call(ctx, headers, "GET", "/queue?slave=s2")
    assert [m["id"] for m in at_s2["messages"]] == [a.id, c.id]
    assert at_s2["messages"][0]["recipients"] == [{"address": "bob@two.example", "slave": "s2"}]
    assert await call(ctx, headers, "GET", "/queue?slave=nobody") == (200, {"messages": [], "more": 0})

    status, shown = await call(ctx, headers, "GET", f"/queue/{b.id}")
    assert status == 200
    assert shown["recipients"] == [
        {"address": "cy@one.example", "slave": "s1", "state": "queued", "attempts": 1,
         "next_attempt_ms": b.recipients[0].next_attempt_ms, "reply": str(UNREACHABLE)},
        {"address": "di@one.example", "slave": "s1", "state": "delivered", "attempts": 1, "next_attempt_ms": None,
         "reply": None},
    ]  # fmt: skip
    assert (shown["client_address"], shown["helo"], shown["origin"], shown["shadow"]) == (
        "192.0.2.7", "client.test", "me", False,
    )  # fmt: skip
    assert shown["slaves"] == {"s1": {"attempts": 1, "next_attempt_ms": b.recipients[0].next_attempt_ms,
                                      "in_flight": False}}  # fmt: skip


async def test_the_list_is_bounded_and_says_how_many_more(queued, monkeypatch):
    ctx, headers, runner = queued
    a, b, c = await three(runner)
    monkeypatch.setattr(queue_api, "LIST_LIMIT", 2)
    status, listed = await call(ctx, headers, "GET", "/queue")
    assert [m["id"] for m in listed["messages"]] == [a.id, b.id] and listed["more"] == 1  # the oldest first
    status, listed = await call(ctx, headers, "GET", "/queue?slave=s2")
    assert [m["id"] for m in listed["messages"]] == [a.id, c.id] and listed["more"] == 0


async def test_flush_and_retry_make_messages_due_now(queued):
    ctx, headers, runner = queued
    a, b, c = await three(runner)
    queue = runner.queue
    later = wall_ms() + HOUR_MS // 2
    assert queue.next_due_ms("s1") > later and queue.next_due_ms("s2") > later

    assert await call(ctx, headers, "POST", f"/queue/{c.id}/retry") == (200, {"id": c.id, "due": True})
    assert [e.id for e in queue.due("s2", wall_ms())] == [c.id]  # a, at s2 too, still waits
    queue.release(c.id, "s2")
    assert queue.due("s1", wall_ms()) == []

    assert await call(ctx, headers, "POST", "/queue/flush?slave=s1") == (200, {"slave": "s1", "flushed": 2})
    assert sorted(e.id for e in queue.due("s1", wall_ms())) == [a.id, b.id]
    assert [e.id for e in queue.due("s2", wall_ms())] == [c.id]  # only s1 (and the retried c)

    for slave in ("s1", "s2"):
        for entry in queue.entries(slave):
            queue.release(entry.id, slave)
    assert await call(ctx, headers, "POST", "/queue/flush?slave=nobody") == (200, {"slave": "nobody", "flushed": 0})
    assert await call(ctx, headers, "POST", "/queue/flush") == (200, {"slave": None, "flushed": 4})
    # The times on disk are left alone, as for a slave coming back: a restart keeps the old ones.
    assert (await runner.spool.read_envelope(a.id)).recipients[0].next_attempt_ms > later


async def test_delete_removes_the_files_and_says_who(queued, caplog):
    ctx, headers, runner = queued
    a, b, c = await three(runner)
    with caplog.at_level(logging.INFO, logger="meshmail.mta"):
        assert await call(ctx, headers, "DELETE", f"/queue/{a.id}") == (200, {"id": a.id, "deleted": True})
    assert runner.spool.paths(a.id) == [] and a.id not in runner.queue
    assert [m.id for m in (await runner.spool.rescan()).envelopes] == [b.id, c.id]
    [line] = [r.getMessage() for r in caplog.records if "deleted" in r.getMessage()]
    assert line == (f"queued message {a.id} from <x@outside.example> to <ann@one.example>, <bob@two.example>"
                    " deleted by admin (token), undelivered")  # fmt: skip
    # b was updated, so it has a message file of its own: it goes too.
    assert runner.spool.paths(b.id) == [runner.spool.message_path(b.id)]
    assert (await call(ctx, headers, "DELETE", f"/queue/{b.id}"))[0] == 200
    assert runner.spool.paths(b.id) == [] and not runner.spool.message_path(b.id).exists()
    for method, path in [("GET", f"/queue/{a.id}"), ("DELETE", f"/queue/{a.id}"), ("POST", f"/queue/{a.id}/retry")]:
        assert await call(ctx, headers, method, path) == (404, {"error": f"no message {a.id} in this master's queue"})
    _, listed = await call(ctx, headers, "GET", "/queue")
    assert [m["id"] for m in listed["messages"]] == [c.id]


async def test_a_message_in_flight_is_left_alone(queued):
    ctx, headers, runner = queued
    a, b, c = await three(runner)
    taken = runner.queue.due("s1", wall_ms() + 2 * HOUR_MS)  # as the delivery loop takes them
    assert {e.id for e in taken} == {a.id, b.id}
    for method, path in [("DELETE", f"/queue/{a.id}"), ("POST", f"/queue/{a.id}/retry")]:
        status, answer = await call(ctx, headers, method, path)
        assert status == 409 and answer["error"].startswith(f"message {a.id} is being delivered now"), answer
    assert runner.spool.paths(a.id)
    status, shown = await call(ctx, headers, "GET", f"/queue/{a.id}")
    assert shown["slaves"]["s1"]["in_flight"] and not shown["slaves"]["s2"]["in_flight"]
    _, listed = await call(ctx, headers, "GET", "/queue")
    assert [m["in_flight"] for m in listed["messages"]] == [True, True, False]
    # A flush leaves what is in flight alone.
    assert await call(ctx, headers, "POST", "/queue/flush") == (200, {"slave": None, "flushed": 2})
    runner.queue.release(a.id, "s1")
    assert (await call(ctx, headers, "DELETE", f"/queue/{a.id}"))[0] == 200


async def test_a_shadow_copy_is_shown_but_not_retried_or_deleted(queued):
    ctx, headers, runner = queued
    shadow = await put(runner, 4, "z@outside.example", [("fay@one.example", "s1")], shadow=True)
    assert await call(ctx, headers, "GET", "/queue") == (200, {"messages": [], "more": 0})
    status, shown = await call(ctx, headers, "GET", f"/queue/{shadow.id}")
    assert status == 200 and shown["shadow"] is True and shown["slaves"] == {}
    for method, path in [("DELETE", f"/queue/{shadow.id}"), ("POST", f"/queue/{shadow.id}/retry")]:
        status, answer = await call(ctx, headers, method, path)
        assert status == 409 and "shadow copy" in answer["error"], answer


async def test_a_damaged_message_answers_409_and_is_left_out_of_the_list(queued):
    ctx, headers, runner = queued
    a, b, c = await three(runner)
    [path] = runner.spool.paths(c.id)  # a batch file of its own: c was stored alone
    damaged = bytearray(path.read_bytes())
    damaged[40] ^= 0xFF  # inside the envelope: its checksum no longer matches
    path.write_bytes(bytes(damaged))
    status, answer = await call(ctx, headers, "GET", f"/queue/{c.id}")
    assert status == 409 and "cannot be read (header checksum mismatch)" in answer["error"], answer
    status, answer = await call(ctx, headers, "POST", f"/queue/{c.id}/retry")
    assert status == 409 and "cannot be read" in answer["error"], answer
    _, listed = await call(ctx, headers, "GET", "/queue")
    assert [m["id"] for m in listed["messages"]] == [a.id, b.id]
    assert (await call(ctx, headers, "DELETE", f"/queue/{c.id}"))[0] == 200  # an operator may drop it
    assert runner.spool.paths(c.id) == [] and not path.exists()


@pytest.mark.parametrize(
    ("method", "path", "words"),
    [
        ("GET", "/queue/has-dash", "'has-dash' is not a queue id"),
        ("GET", "/queue/" + "a" * 65, "is not a queue id"),
        ("POST", "/queue/b%C3%A4d/retry", "'bäd' is not a queue id"),
        ("DELETE", "/queue/x.y", "'x.y' is not a queue id"),
        ("GET", "/queue?slave=-bad", "slave: '-bad': a node name is"),
        ("GET", "/queue?slave=" + "s" * 64, "a node name is 1 to 63"),
        ("POST", "/queue/flush?slave=a%20b", "slave: 'a b'"),
    ],
)
async def test_bad_input_answers_400(queued, method, path, words):
    ctx, headers, _ = queued
    status, answer = await call(ctx, headers, method, path)
    assert status == 400 and words in answer["error"], answer


async def test_credentials_and_a_removed_node(queued):
    ctx, headers, runner = queued
    a, _, _ = await three(runner)
    for method, path in [("GET", "/queue"), ("POST", "/queue/flush"), ("DELETE", f"/queue/{a.id}")]:
        status, answer = await call(ctx, {}, method, path)
        assert status == 401 and "authentication required" in answer["error"]
    ctx.replication.put("removed", "me", RemovedNode("admin", wall_ms()))
    for method, path in [("POST", "/queue/flush"), ("POST", f"/queue/{a.id}/retry"), ("DELETE", f"/queue/{a.id}")]:
        status, answer = await call(ctx, headers, method, path)
        assert status == 403 and "removed from the cluster" in answer["error"], answer
    assert (await call(ctx, headers, "GET", "/queue"))[0] == 200  # reading is still fine
    assert runner.spool.paths(a.id)


async def test_a_node_without_an_mx_says_so(queued):
    ctx, headers, _ = queued
    ctx.mta = None
    for method, path in [("GET", "/queue"), ("GET", "/queue/abc"), ("POST", "/queue/flush")]:
        status, answer = await call(ctx, headers, method, path)
        assert status == 404 and answer["error"].startswith("this node runs no MX"), answer


async def test_a_served_master_exposes_its_mx_queue(node):
    assert await request(node, "GET", "/queue") == (200, {"messages": [], "more": 0})
    assert await request(node, "POST", "/queue/flush", b"") == (200, {"slave": None, "flushed": 0})
    status, answer = await request(node, "GET", "/queue/0123456789abcdef")
    assert status == 404 and answer["error"] == "no message 0123456789abcdef in this master's queue"
