"""The splice over real sockets on 127.0.0.1: a mail client (`user`) connected to the proxy's
`client` stream, the proxy's `backend` stream connected to a mail `server`, all on the proxy
loop. Bytes arrive intact both ways and are counted, half-closes are passed on, a reset ends
the session, a slow reader holds its writer back, the idle timeout runs on the loop's
MockClock, plain sockets take the kernel path (os.splice) and a TLS side the copy path, and no
pipe outlives its splice."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import inspect
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable, Coroutine

import attrs
import pytest

from meshmail.proxy import loop
from meshmail.proxy.splice import PIPE_SIZE, Splice, pipes
from meshmail.proxy.streams import READ_SIZE, SocketStream, Stream, TlsStream

#: Idle seconds for tests that must end for another reason first.
LONG_IDLE = 3600.0


def on_loop(clock: bool = False) -> Callable:
    """Run an async test on a proxy loop of its own (with a MockClock when `clock`)."""

    def wrap(test: Callable[..., Coroutine]) -> Callable:
        def run(*args, **kwargs):
            return loop.run(test(*args, **kwargs), loop.MockClock() if clock else None)

        # A plain function to pytest (functools.wraps would show it the coroutine function).
        run.__name__, run.__doc__, run.__signature__ = test.__name__, test.__doc__, inspect.signature(test)
        return run

    return wrap


async def together(*coros: Coroutine) -> None:
    """Run `coros` as tasks at once; return when all have ended, raising the first error."""
    current = loop.current_loop()
    tasks = [current.spawn(coro) for coro in coros]
    for task in tasks:
        await task.join()
    for task in tasks:
        if task.error is not None:
            raise task.error


@contextlib.asynccontextmanager
async def splicing(splice: Splice, ends: Ends, idle: float = LONG_IDLE) -> AsyncIterator[loop.Task]:
    """`splice` running between `ends` as a task while the block runs; the block's end waits
    for the splice to end (raising its error)."""
    task = loop.current_loop().spawn(splice.run(ends.client, ends.backend, idle))
    yield task
    await task.join()
    if task.error is not None:
        raise task.error


@attrs.define
class Ends:
    user: Stream
    client: Stream
    backend: SocketStream
    server: SocketStream


def connected() -> tuple[SocketStream, SocketStream]:
    """Both ends of a fresh TCP connection on 127.0.0.1: the connecting one, the accepted one."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        outer = socket.create_connection(listener.getsockname())
        inner, _ = listener.accept()
    return SocketStream(outer), SocketStream(inner)


@contextlib.asynccontextmanager
async def open_ends(tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None) -> AsyncIterator[Ends]:
    """A user -> proxy connection (TLS with `tls`: the server and client contexts) and a plain
    proxy -> server connection; all four closed on exit."""
    user, client = connected()
    backend, server = connected()
    if tls:
        user = TlsStream(user, tls[1], server_side=False, server_hostname="127.0.0.1")
        client = TlsStream(client, tls[0], server_side=True)
        await together(user.do_handshake(), client.do_handshake())
    ends = Ends(user, client, backend, server)
    try:
        yield ends
    finally:
        for stream in (user, client, backend, server):
            stream.close()


async def read(stream: Stream, limit: int | None = None) -> tuple[int, str]:
    """Bytes read until EOF or `limit`: their count and SHA-256."""
    digest, count = hashlib.sha256(), 0
    while limit is None or count < limit:
        data = await stream.receive_some(READ_SIZE if limit is None else min(READ_SIZE, limit - count))
        if not data:
            break
        digest.update(data)
        count += len(data)
    return count, digest.hexdigest()


def summary(data: bytes) -> tuple[int, str]:
    return len(data), hashlib.sha256(data).hexdigest()


def open_fds() -> set[str]:
    """The fds open now, the splice's kept empty pipes closed first (they outlive a splice by
    design, a bounded few; anything else would be a leak)."""
    pipes().close()
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def spliced(monkeypatch) -> list[tuple[int, int, int]]:
    """Every os.splice call that moved bytes: (fd in, fd out, bytes); the real call does the work."""
    calls: list[tuple[int, int, int]] = []
    real = os.splice

    def counted(fd_in: int, fd_out: int, count: int, *args, **kwargs) -> int:
        moved = real(fd_in, fd_out, count, *args, **kwargs)
        calls.append((fd_in, fd_out, moved))
        return moved

    monkeypatch.setattr(os, "splice", counted)
    return calls


def into(calls: list[tuple[int, int, int]], stream: SocketStream) -> int:
    """Bytes os.splice wrote into `stream`'s socket."""
    return sum(moved for _, fd_out, moved in calls if fd_out == stream.fd)


@pytest.mark.parametrize("size", [0, 1, 64 * 1024, 10_000_000])
@on_loop()
async def test_plain_sockets_get_every_byte_both_ways_bulk_through_the_kernel(size, spliced):
    """Less than a read's worth goes through Python (a read and a send); a bulk burst mostly
    stays in the kernel."""
    up, down = os.urandom(size), os.urandom(size)
    async with open_ends() as ends:
        fds = open_fds()
        splice = Splice()
        received: dict[str, tuple[int, str]] = {}

        async def send(stream: SocketStream, data: bytes) -> None:
            await stream.send_all(data)
            await stream.send_eof()

        async def receive(stream: Stream, name: str) -> None:
            received[name] = await read(stream)

        await together(
            splice.run(ends.client, ends.backend, LONG_IDLE),
            send(ends.user, up),
            send(ends.server, down),
            receive(ends.server, "server"),
            receive(ends.user, "user"),
        )
        assert received == {"server": summary(up), "user": summary(down)}
        assert (splice.up, splice.down, splice.idled_out) == (size, size, False)
        in_kernel = (into(spliced, ends.backend), into(spliced, ends.client))
        if size < READ_SIZE:
            assert in_kernel == (0, 0)
        if size >= 1_000_000:
            assert min(in_kernel) > size // 2
        assert open_fds() == fds


@pytest.mark.parametrize("size", [0, 1, 64 * 1024, 10_000_000])
@on_loop()
async def test_a_tls_side_gets_every_byte_both_ways_by_copying(size, contexts, spliced):
    up, down = os.urandom(size), os.urandom(size)
    async with open_ends(contexts) as ends:
        splice = Splice()
        received: dict[str, tuple[int, str]] = {}

        async def server() -> None:
            async def receive() -> None:
                received["server"] = await read(ends.server, size)

            await together(ends.server.send_all(down), receive())
            await ends.server.send_eof()  # TLS cannot pass this on: the session ends

        async def user() -> None:
            await ends.user.send_all(up)
            received["user"] = await read(ends.user, size)

        await together(splice.run(ends.client, ends.backend, LONG_IDLE), server(), user())
        assert received == {"server": summary(up), "user": summary(down)}
        assert (splice.up, splice.down, splice.idled_out) == (size, size, False)
        assert spliced == []


@on_loop()
async def test_a_tls_client_that_closes_is_passed_on_to_a_plain_backend(contexts):
    async with open_ends(contexts) as ends:
        splice = Splice()
        async with splicing(splice, ends):
            await ends.user.send_all(b"a1 LOGOUT\r\n")
            # It closes its side without reading the server's TLS 1.3 tickets (a close() now
            # would reset the connection, as the kernel does with unread bytes).
            ends.user.transport.socket.shutdown(socket.SHUT_WR)
            assert await read(ends.server) == summary(b"a1 LOGOUT\r\n")
            await ends.server.send_eof()
        assert (splice.up, splice.down, splice.idled_out) == (11, 0, False)


@pytest.mark.parametrize("first", ["user", "server"])
@on_loop()
async def test_a_half_close_is_passed_on_and_the_other_way_keeps_going(first, spliced):
    async with open_ends() as ends:
        splice = Splice()
        closer, peer = (ends.user, ends.server) if first == "user" else (ends.server, ends.user)
        async with splicing(splice, ends):
            await closer.send_all(b"question")
            await closer.send_eof()
            assert await read(peer) == summary(b"question")  # then EOF
            await peer.send_all(b"answer")
            assert await read(closer, 6) == summary(b"answer")
            await peer.send_eof()
            assert await read(closer) == (0, hashlib.sha256().hexdigest())
        assert {splice.up, splice.down} == {8, 6}
        assert splice.idled_out is False
        assert into(spliced, ends.backend) + into(spliced, ends.client) == 0  # lines go through Python


@pytest.mark.parametrize("side", ["user", "server"])
@on_loop()
async def test_a_reset_from_either_side_ends_the_session(side):
    async with open_ends() as ends:
        fds = open_fds()
        splice = Splice()
        with loop.fail_after(30):  # only against a hang: without the reset it would idle an hour
            async with splicing(splice, ends):
                await ends.user.send_all(b"x")
                assert await read(ends.server, 1) == summary(b"x")
                resetting = ends.user if side == "user" else ends.server
                resetting.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                closed = str(resetting.fd)
                resetting.close()
        assert splice.idled_out is False
        assert splice.up == 1
        assert open_fds() == fds - {closed}


def buffered(ends: Ends) -> int:
    """What the sockets along user -> server can hold: each sender's and receiver's buffer as
    Linux reports it (twice the size set, for its bookkeeping)."""
    sending = [ends.user, ends.backend]
    receiving = [ends.client, ends.server]
    return sum(s.socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) for s in sending) + sum(
        s.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) for s in receiving
    )


async def until_stalled(progress) -> None:
    """Return once progress() has stayed the same over a few looks a moment apart."""
    seen, still = -1, 0
    while still < 4:
        await loop.sleep(0.2)
        still = still + 1 if progress() == seen else 0
        seen = progress()


@pytest.mark.parametrize("path", ["kernel", "copy"])
@on_loop()
async def test_a_slow_reader_holds_its_writer_back(path, monkeypatch):
    """While the server reads nothing, the user can push no more than the socket buffers on the
    way and one pipe (or one read) of the proxy hold; then every byte arrives."""
    if path == "copy":
        monkeypatch.delattr(os, "splice")  # as on a system without it
    blob = os.urandom(16 * 1024 * 1024)
    async with open_ends() as ends:
        for stream in (ends.user, ends.client, ends.backend, ends.server):
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        splice = Splice()
        pushed = 0

        async def write() -> None:
            nonlocal pushed
            for offset in range(0, len(blob), 16 * 1024):
                await ends.user.send_all(blob[offset : offset + 16 * 1024])
                pushed += 16 * 1024
            await ends.user.send_eof()

        async with splicing(splice, ends):
            writer = loop.current_loop().spawn(write())
            await until_stalled(lambda: pushed)
            # Linux lets a socket overshoot its buffer by up to one packet: hence the slack.
            assert 0 < pushed <= buffered(ends) + max(PIPE_SIZE, READ_SIZE) + 4 * 65536
            assert await read(ends.server) == summary(blob)
            await ends.server.send_eof()
            await writer.join()
        assert splice.up == len(blob)


@on_loop()
async def test_a_splice_cancelled_while_a_pipe_is_full_closes_it():
    async with open_ends() as ends:
        fds = open_fds()
        splice = Splice()
        moved = 0

        async def write() -> None:
            nonlocal moved
            while True:
                await ends.user.send_all(bytes(16 * 1024))
                moved += 16 * 1024

        current = loop.current_loop()
        tasks = [current.spawn(splice.run(ends.client, ends.backend, LONG_IDLE)), current.spawn(write())]
        await until_stalled(lambda: moved)
        assert len(set(os.listdir("/proc/self/fd")) - fds) == 2  # the pipe of the direction that is stuck
        for task in tasks:
            task.cancel()
            await task.join()
        await loop.checkpoint()  # the pumps the splice cancelled end on the next round
        assert open_fds() == fds


@on_loop()
async def test_without_os_splice_plain_sockets_are_copied(monkeypatch):
    monkeypatch.delattr(os, "splice")
    data = os.urandom(300_000)
    async with open_ends() as ends:
        splice = Splice()
        async with splicing(splice, ends):
            await ends.user.send_all(data)
            await ends.user.send_eof()
            assert await read(ends.server) == summary(data)
            await ends.server.send_eof()
        assert (splice.up, splice.down) == (len(data), 0)


@on_loop()
async def test_einval_on_the_first_splice_falls_back_to_copying(monkeypatch):
    """A socket the kernel cannot splice from (EINVAL before any byte moved) is copied instead."""
    refused = []

    def einval(fd_in: int, fd_out: int, count: int, *args, **kwargs) -> int:
        refused.append(fd_in)
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(os, "splice", einval)
    data = os.urandom(3 * READ_SIZE // 2)  # waiting in the socket buffers: the first read is a full one
    async with open_ends() as ends:
        fds = open_fds()
        splice = Splice()
        await ends.user.send_all(data)
        await ends.user.send_eof()
        async with splicing(splice, ends):
            assert await read(ends.server) == summary(data)
            await ends.server.send_all(b"bye")
            await ends.server.send_eof()
            assert await read(ends.user) == summary(b"bye")
        assert (splice.up, splice.down) == (len(data), 3)
        assert refused == [ends.client.fd]  # "bye" fits one read: no splice tried
        assert open_fds() == fds


@pytest.mark.parametrize("tls", [False, True])
@on_loop(clock=True)
async def test_a_session_where_nothing_moves_for_the_idle_time_ends(tls, contexts):
    async with open_ends(contexts if tls else None) as ends:
        splice = Splice()
        began = loop.now()
        await splice.run(ends.client, ends.backend, 1800.0)
        assert splice.idled_out is True
        assert loop.now() - began == pytest.approx(1800.0, abs=0.5)


@pytest.mark.parametrize("tls", [False, True])
@pytest.mark.parametrize("sender", ["user", "server"])
@on_loop(clock=True)
async def test_bytes_either_way_put_the_idle_end_off(tls, sender, contexts):
    async with open_ends(contexts if tls else None) as ends:
        splice = Splice()
        writer, reader = (ends.user, ends.server) if sender == "user" else (ends.server, ends.user)
        async with splicing(splice, ends, 600.0):
            for _ in range(4):
                await loop.sleep(500.0)
                await writer.send_all(b".")
                assert await read(reader, 1) == summary(b".")
            last = loop.now()
        assert splice.idled_out is True
        assert loop.now() - last == pytest.approx(600.0, abs=0.5)
        assert splice.up + splice.down == 4


@on_loop()
async def test_lines_need_no_pipe_bursts_reuse_kept_pipes_and_an_idle_session_holds_none(monkeypatch):
    made = []
    real = os.pipe2

    def counted(flags: int) -> tuple[int, int]:
        made.append(flags)
        return real(flags)

    monkeypatch.setattr(os, "pipe2", counted)
    pipes().close()
    burst = os.urandom(4 * READ_SIZE)
    async with open_ends() as ends, splicing(Splice(), ends):
        for n in range(20):
            line, answer = b"a%d NOOP\r\n" % n, b"a%d OK\r\n" % n
            await ends.user.send_all(line)
            assert await read(ends.server, len(line)) == summary(line)
            await ends.server.send_all(answer)
            assert await read(ends.user, len(answer)) == summary(answer)
        assert made == []
        for _ in range(10):
            await together(ends.server.send_all(burst), read(ends.user, len(burst)))
        held = set(os.listdir("/proc/self/fd"))
        pipes().close()
        assert len(held - set(os.listdir("/proc/self/fd"))) == 2 * len(made)  # only kept pipes were open
        await ends.user.send_eof()
        await ends.server.send_eof()
    assert len(made) == 1  # bursts one after the other, one way: one pipe
