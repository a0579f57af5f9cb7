"""Accepting through a shortage of file descriptors: real sockets under a lowered
RLIMIT_NOFILE, the listener (and the gossip transport built on it) keeps serving."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import socket
from collections.abc import Iterator

import pytest
import trio

from meshmail.core.accept import ResilientListener
from meshmail.gossip.transport import NetTransport


@contextlib.contextmanager
def descriptors_left(free: int) -> Iterator[None]:
    """Lower the soft open-files limit so that only about `free` more descriptors open; restore it after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = {int(x) for x in os.listdir("/proc/self/fd")}
    limit = available = 0
    while available < free:
        available += limit not in used
        limit += 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def exhaust(address: tuple[str, int]) -> list[socket.socket]:
    """Connect clients to `address` until the process runs out of descriptors. No await
    in between, so every connection waits in the listen queue for an accept that cannot
    get a descriptor."""
    clients: list[socket.socket] = []
    with pytest.raises(OSError) as raised:
        while True:
            client = socket.socket()
            clients.append(client)
            client.setblocking(False)
            client.connect_ex(address)
    assert raised.value.errno == errno.EMFILE
    assert len(clients) > 10
    return clients


async def wait_for(predicate, what: str) -> None:
    """Poll a condition under the real clock; the limit only catches a hang."""
    with trio.fail_after(30):
        while not predicate():
            await trio.sleep(0.05)


def shortage_logs(caplog) -> list[logging.LogRecord]:
    return [x for x in caplog.records if x.name == "meshmail.accept"]


async def test_listener_waits_out_emfile_logs_once_and_accepts_again(caplog):
    """With no descriptor left, accept() neither raises nor spins: it counts each failure,
    logs one line (no traceback), backs off; once descriptors are free it accepts again."""
    caplog.set_level(logging.INFO)
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    address = sock.getsockname()
    listener = ResilientListener(trio.SocketListener(sock), name="test")
    accepted: list[trio.abc.Stream] = []

    async def accept_forever() -> None:
        while True:
            accepted.append(await listener.accept())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_forever)
        with descriptors_left(40):
            clients = exhaust(address)
            await wait_for(lambda: listener.counters["test.accept_shortage"] >= 3, "three failed accepts")
            assert accepted == []
            for client in clients:
                client.close()
        (record,) = shortage_logs(caplog)
        assert record.levelno == logging.ERROR and record.exc_info is None
        assert "test listener cannot accept connections: Too many open files (EMFILE)" in record.getMessage()

        async with await trio.open_tcp_stream(*address) as client:
            await client.send_all(b"hello")
            await wait_for(lambda: len(accepted) == len(clients) + 1, "the queued and the new connection")
            assert await accepted[-1].receive_some(5) == b"hello"
        assert len(shortage_logs(caplog)) == 1
        nursery.cancel_scope.cancel()
    await listener.aclose()


async def test_listener_raises_other_errors():
    """Only resource shortages are waited out: a closed listener still raises."""
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    listener = ResilientListener(trio.SocketListener(sock), name="test")
    await listener.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await listener.accept()


async def test_gossip_transport_survives_running_out_of_descriptors(caplog):
    """A NetTransport whose process runs out of descriptors keeps running (before, EMFILE
    escaped its accept loop and ended the node), counts the shortage in its counters, logs
    it once, and accepts streams again once descriptors are free."""
    caplog.set_level(logging.INFO)
    transport = NetTransport("127.0.0.1", 0)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(transport.run)
        with descriptors_left(40):
            clients = exhaust(address)
            await wait_for(lambda: transport.counters["gossip.accept_shortage"] >= 3, "three failed accepts")
            for client in clients:
                client.close()
        assert len(shortage_logs(caplog)) == 1
        async with await trio.open_tcp_stream(*address) as client:
            mine = client.socket.getsockname()[:2]
            with trio.fail_after(30):
                while True:
                    peer, stream = await transport.accept()
                    async with stream:
                        if peer == mine:
                            break
            await client.send_all(b"x")
        nursery.cancel_scope.cancel()
