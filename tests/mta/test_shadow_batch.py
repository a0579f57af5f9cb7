"""Shadow copies stored at the same time share frames: in one process, a real shadow store (a
Runner over a real Spool behind serve_holder, mutual TLS with certificates from a fresh
cluster CA) and the owner's Links to it. Several copies go in one frame over few connections;
a holder that dies between storing a frame's copies and answering leaves the owner with every
message queued locally and marked unshadowed, and the holder with its copies on disk."""

from __future__ import annotations

import functools
import random
from pathlib import Path

import attrs
import pytest
import trio

from meshmail.config.sections import TlsSection
from meshmail.gossip.member import MemberInfo
from meshmail.gossip.messages import State
from meshmail.mta import shadow
from meshmail.mta.queue import Queue, RetryPolicy
from meshmail.mta.runner import Runner
from meshmail.mta.spool import Envelope, Recipient, Spool, new_queue_id
from meshmail.nodemeta import NodeMeta
from meshmail.security import ca

LIMIT = 1 << 22
DATA = b"Subject: copy\r\n\r\n" + b"x" * 10_000 + b"\r\n"


def node_tls(folder: Path, authority: ca.Authority, name: str) -> TlsSection:
    key = ca.new_key()
    cert = ca.sign_node(authority, key.public_key(), name, "master", ["127.0.0.1"])
    folder.mkdir()
    (folder / "ca.pem").write_bytes(ca.cert_pem(authority.cert))
    (folder / "node.pem").write_bytes(ca.cert_pem(cert))
    (folder / "node.key").write_bytes(ca.key_pem(key))
    return TlsSection(str(folder / "ca.pem"), str(folder / "node.pem"), str(folder / "node.key"))


@attrs.define
class Pair:
    """m1 (the owner, with Links to m2) and m2 (the holder: its runner and TLS context)."""

    owner: Runner
    holder: Runner
    holder_context: object
    links: shadow.Links
    connections: int = 0


def runner(folder: Path, name: str) -> Runner:
    return Runner(Spool.open(folder), Queue(RetryPolicy(), random.Random(1)), None, None, "mx.test", name)  # type: ignore[arg-type]


@pytest.fixture
def pair(tmp_path):
    authority = ca.new_authority("test")
    server_context, _ = shadow.contexts(node_tls(tmp_path / "tls-m2", authority, "m2"))
    _, client_context = shadow.contexts(node_tls(tmp_path / "tls-m1", authority, "m1"))
    owner, holder = runner(tmp_path / "q1", "m1"), runner(tmp_path / "q2", "m2")
    members: list[MemberInfo] = []
    owner.links = shadow.Links("m1", lambda: members, client_context, LIMIT)
    yield Pair(owner, holder, server_context, owner.links), members
    owner.spool.close()
    holder.spool.close()


async def serve(pair: Pair, members: list[MemberInfo], nursery: trio.Nursery, handler=None) -> None:
    """Run m2's shadow store on 127.0.0.1 and publish it in m2's member record."""

    async def one(stream: trio.SocketStream) -> None:
        pair.connections += 1
        await (handler or shadow.serve_holder)(stream, pair.holder, pair.holder_context, LIMIT, "m2")

    [listener] = await nursery.start(functools.partial(trio.serve_tcp, one, 0, host="127.0.0.1"))
    host, port = listener.socket.getsockname()[:2]
    meta = NodeMeta(role="master", shadow=f"{host}:{port}").encode()
    members.append(MemberInfo("m2", "127.0.0.1", 1, meta, 1, State.ALIVE, 0.0))


def message(n: int) -> Envelope:
    return Envelope(
        new_queue_id(1_700_000_000_000 + n, n), "a@b.test", [Recipient("u@one.test", "s1")], 1, size=len(DATA)
    )


async def keep_all(pair: Pair, count: int, first: int = 0) -> list[Envelope]:
    kept: list[Envelope | None] = [None] * count

    async def keep(n: int) -> None:
        kept[n] = await pair.owner._keep(message(first + n), DATA)

    async with trio.open_nursery() as nursery:
        for n in range(count):
            nursery.start_soon(keep, n)
    return kept  # type: ignore[return-value]


def test_copies_stored_at_once_share_frames_and_connections(pair):
    pair, members = pair

    async def main() -> list[Envelope]:
        async with trio.open_nursery() as nursery:
            await serve(pair, members, nursery)
            kept = await keep_all(pair, 40)
            nursery.cancel_scope.cancel()
        return kept

    kept = trio.run(main)
    assert all(envelope.copy_at == "m2" for envelope in kept)
    held = pair.holder.spool.scan().envelopes
    assert sorted(e.id for e in held) == sorted(e.id for e in kept)
    assert all(e.shadow and e.origin == "m1" for e in held)
    assert pair.connections <= shadow.IN_FLIGHT  # not one connection (and handshake) per copy
    assert pair.holder.spool.commit_rounds < 40 / 2  # the holder shares its fsyncs across a frame


def test_a_holder_dying_between_storing_and_answering_loses_nothing(pair):
    pair, members = pair
    stored = trio.Event()

    real, death = pair.holder, trio.CancelScope()

    class DiesAfterStoring:
        """The holder's runner: the first frame's copies go to disk, then the holder dies."""

        async def hold(self, origin, copies) -> list:
            await real.hold(origin, copies)
            stored.set()
            death.cancel()  # the process is gone before any answer leaves
            await trio.sleep_forever()

    def dies(stream, _runner, *rest):
        return shadow.serve_holder(stream, DiesAfterStoring(), *rest)

    async def holder(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with death:
            async with trio.open_nursery() as nursery:
                await serve(pair, members, nursery, dies)
                task_status.started()

    async def main() -> list[Envelope]:
        async with trio.open_nursery() as nursery:
            await nursery.start(holder)
            return await keep_all(pair, 10)

    kept = trio.run(main)
    assert stored.is_set()
    # The owner was never told a copy was kept: every message is on its disk, none marked copied.
    assert len(kept) == 10 and all(envelope.copy_at == "" for envelope in kept)
    on_disk = {e.id: e for e in pair.owner.spool.scan().envelopes}
    assert sorted(on_disk) == sorted(e.id for e in kept) and all(e.copy_at == "" for e in on_disk.values())
    # What the holder stored before it died stays there (a duplicate beats a loss).
    assert pair.holder.spool.scan().envelopes


def test_a_holder_on_older_code_gets_one_store_per_copy(pair, monkeypatch):
    """A master from before the `copies` request (a rolling upgrade) answers it as an unknown
    op: the owner then sends that holder one `store` per copy, and every copy is kept."""
    pair, members = pair
    ops: list[str] = []
    answer = shadow._answer

    async def older(runner, origin, request):
        ops.append(request.get("op"))
        if request.get("op") == "copies":
            return {"error": f"unknown op {request.get('op')!r}"}  # what the older code says
        return await answer(runner, origin, request)

    monkeypatch.setattr(shadow, "_answer", older)

    async def main() -> list[Envelope]:
        async with trio.open_nursery() as nursery:
            await serve(pair, members, nursery)
            kept = await keep_all(pair, 12)
            kept += await keep_all(pair, 3, first=12)
            nursery.cancel_scope.cancel()
        return kept

    kept = trio.run(main)
    assert all(envelope.copy_at == "m2" for envelope in kept)
    assert sorted(e.id for e in pair.holder.spool.scan().envelopes) == sorted(e.id for e in kept)
    assert 1 <= ops.count("copies") <= shadow.IN_FLIGHT  # the frames under way when it first said so
    assert ops.count("store") == len(kept)
    assert "copies" not in ops[ops.index("store") :]  # remembered: no more frames of copies
