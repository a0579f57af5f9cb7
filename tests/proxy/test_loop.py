"""The proxy loop (meshmail/proxy/loop.py) and its streams: deadlines and cancellation as trio
has them, events, joins, threads, fds closed and reused, errors that end one task only, the
stall watch, and TLS over memory BIOs with one task receiving while another sends."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time

import pytest

from meshmail.proxy import loop
from meshmail.proxy.streams import SocketStream, TlsStream, connect


def test_move_on_after_ends_a_wait_at_its_deadline_on_the_mock_clock():
    async def main() -> tuple[bool, float]:
        a, b = socket.socketpair()
        began = loop.now()
        with loop.move_on_after(3600) as scope:
            await loop.wait_readable(a.fileno())
        a.close(), b.close()
        return scope.cancelled_caught, loop.now() - began

    caught, waited = loop.run(main(), loop.MockClock())
    assert caught is True
    assert waited == pytest.approx(3600, abs=0.5)


def test_fail_after_raises_too_slow_and_a_block_that_ends_in_time_does_not():
    async def main() -> list[str]:
        seen = []
        with loop.fail_after(10):
            await loop.sleep(1)
        seen.append("in time")
        try:
            with loop.fail_after(1):
                await loop.sleep(10)
        except loop.TooSlowError:
            seen.append("too slow")
        return seen

    assert loop.run(main(), loop.MockClock()) == ["in time", "too slow"]


@pytest.mark.parametrize("inner, caught_by", [(5.0, "inner"), (50.0, "outer")])
def test_the_nearest_deadline_of_nested_scopes_ends_the_wait_and_its_scope_catches(inner, caught_by):
    async def main() -> tuple[bool, bool, float, bool]:
        began = loop.now()
        after_inner = False
        with loop.move_on_after(20) as outer:
            with loop.move_on_after(inner) as nested:
                await loop.sleep(100)
            after_inner = True  # only when the inner scope caught it
            await loop.sleep(0)
        return nested.cancelled_caught, outer.cancelled_caught, loop.now() - began, after_inner

    inner_caught, outer_caught, waited, after_inner = loop.run(main(), loop.MockClock())
    assert (inner_caught, outer_caught, after_inner) == (
        caught_by == "inner",
        caught_by == "outer",
        caught_by == "inner",
    )
    assert waited == pytest.approx(min(inner, 20), abs=0.5)


def test_a_cancelled_task_ends_at_its_wait_and_cannot_wait_again():
    async def main() -> list[str]:
        seen: list[str] = []

        async def victim() -> None:
            try:
                await loop.sleep(3600)
            finally:
                seen.append("unwound")
                try:
                    await loop.sleep(1)
                except loop.Cancelled:
                    seen.append("no second wait")
                    raise

        task = loop.current_loop().spawn(victim())
        await loop.sleep(1)
        task.cancel()
        await task.join()
        seen.append(f"done={task.done} error={task.error}")
        return seen

    assert loop.run(main(), loop.MockClock()) == ["unwound", "no second wait", "done=True error=None"]


def test_an_event_wakes_every_waiter_and_a_set_event_does_not_block():
    async def main() -> list[int]:
        event, woken = loop.Event(), []

        async def waiter(n: int) -> None:
            await event.wait()
            woken.append(n)

        tasks = [loop.current_loop().spawn(waiter(n)) for n in range(3)]
        await loop.sleep(1)
        assert woken == []
        event.set()
        for task in tasks:
            await task.join()
        await event.wait()
        return sorted(woken)

    assert loop.run(main(), loop.MockClock()) == [0, 1, 2]


def test_run_in_thread_returns_the_result_or_raises_the_error_off_the_loop_thread():
    loop_thread = []

    def work() -> int:
        return threading.get_ident()

    def fail() -> None:
        raise LookupError("no such host")

    async def main() -> tuple[int, str]:
        loop_thread.append(threading.get_ident())
        ident = await loop.run_in_thread(work)
        try:
            await loop.run_in_thread(fail)
        except LookupError as exc:
            return ident, str(exc)
        return ident, ""

    ident, error = loop.run(main())
    assert ident != loop_thread[0]
    assert error == "no such host"


def test_call_soon_threadsafe_runs_on_the_loop_thread_and_stop_ends_run():
    proxy_loop = loop.Loop()
    ran_on: list[int] = []
    thread = threading.Thread(target=proxy_loop.run)
    thread.start()
    proxy_loop.call_soon_threadsafe(lambda: ran_on.append(threading.get_ident()))
    deadline = time.monotonic() + 10
    while not ran_on and time.monotonic() < deadline:
        time.sleep(0.01)
    proxy_loop.stop()
    thread.join(10)
    assert ran_on == [thread.ident]
    assert not thread.is_alive()


def test_a_stream_closed_while_another_task_waits_on_it_wakes_that_task_with_an_error():
    async def main() -> str:
        a, b = socket.socketpair()
        stream = SocketStream(a)

        async def reader() -> None:
            await stream.receive_some()

        task = loop.current_loop().spawn(reader())
        await loop.sleep(0.01)
        stream.close()
        await task.join()
        b.close()
        return repr(task.error)

    assert "closed while waited on" in loop.run(main())


def test_an_fd_number_closed_and_reused_is_waited_on_afresh():
    async def main() -> list[bytes]:
        got = []
        for round_ in range(3):
            a, b = socket.socketpair()
            stream = SocketStream(a)
            b.send(b"x%d" % round_)
            got.append(await stream.receive_some())
            with loop.move_on_after(0.01):
                await stream.receive_some()  # registers the fd, then the scope ends the wait
            stream.close()
            b.close()
        return got

    assert loop.run(main()) == [b"x0", b"x1", b"x2"]


def test_a_failing_task_is_logged_and_the_others_go_on(caplog):
    async def main() -> str:
        async def broken() -> None:
            await loop.sleep(0)
            raise ValueError("bad session")

        task = loop.current_loop().spawn(broken())
        await loop.sleep(0.05)
        await task.join()
        return repr(task.error)

    with caplog.at_level(logging.ERROR, logger="meshmail.proxy"):
        assert "bad session" in loop.run(main())
    assert any("a proxy task failed" in record.message for record in caplog.records)


def test_sleeps_end_in_the_order_of_their_deadlines():
    async def main() -> list[int]:
        order: list[int] = []

        async def sleeper(n: int) -> None:
            await loop.sleep(n)
            order.append(n)

        tasks = [loop.current_loop().spawn(sleeper(n)) for n in (30, 10, 20)]
        for task in tasks:
            await task.join()
        return order

    assert loop.run(main(), loop.MockClock()) == [10, 20, 30]


def test_a_step_that_holds_the_loop_shows_as_a_stall():
    proxy_loop = loop.Loop()

    async def hog() -> None:
        time.sleep(0.2)  # a blocking call, as the stall watch is there to find
        proxy_loop.stop()

    proxy_loop.spawn(hog())
    proxy_loop.run()
    assert proxy_loop.stall.longest(loop.now()) >= 0.2


def test_tls_carries_megabytes_both_ways_with_one_task_receiving_while_another_sends(contexts):
    """Each side sends 8 MB while it receives the other's 8 MB: the two tasks of a side share
    one TLS object, and whatever TLS has to send goes out whole and in order."""
    up, down = os.urandom(8_000_000), os.urandom(8_000_000)

    async def main() -> dict[str, str]:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            outer = socket.create_connection(listener.getsockname())
            inner, _ = listener.accept()
        client = TlsStream(SocketStream(outer), contexts[1], server_side=False, server_hostname="127.0.0.1")
        server = TlsStream(SocketStream(inner), contexts[0], server_side=True)
        current = loop.current_loop()
        handshakes = [current.spawn(client.do_handshake()), current.spawn(server.do_handshake())]
        for task in handshakes:
            await task.join()
        digests: dict[str, str] = {}

        async def receive(stream: TlsStream, name: str, size: int) -> None:
            digest, count = hashlib.sha256(), 0
            while count < size:
                data = await stream.receive_some()
                assert data, "ended early"
                digest.update(data)
                count += len(data)
            digests[name] = digest.hexdigest()

        async def send(stream: TlsStream, data: bytes) -> None:
            for at in range(0, len(data), 100_000):
                await stream.send_all(data[at : at + 100_000])

        tasks = [
            current.spawn(send(client, up)),
            current.spawn(send(server, down)),
            current.spawn(receive(server, "server", len(up))),
            current.spawn(receive(client, "client", len(down))),
        ]
        for task in tasks:
            await task.join()
            assert task.error is None, task.error
        client.close(), server.close()
        return digests

    assert loop.run(main()) == {
        "server": hashlib.sha256(up).hexdigest(),
        "client": hashlib.sha256(down).hexdigest(),
    }


def test_an_edge_that_comes_while_nobody_waits_ends_the_next_wait():
    """Registration is edge-triggered: bytes that arrive while the reader is busy elsewhere
    must still end its next wait, though no new edge follows."""

    async def main() -> bytes:
        a, b = socket.socketpair()
        stream = SocketStream(a)
        b.send(b"first")
        assert await stream.receive_some() == b"first"  # registered now; the socket is empty
        b.send(b"second")
        await loop.sleep(0.05)  # busy elsewhere: the edge comes and nobody waits for it
        with loop.fail_after(5):
            data = await stream.receive_some()
        stream.close(), b.close()
        return data

    assert loop.run(main()) == b"second"


def test_a_read_that_took_the_last_bytes_before_the_end_still_sees_the_end():
    """Bytes and the peer's close in one edge: after the short read of the bytes, the next
    read returns b"" at once (no edge follows an end)."""

    async def main() -> list[bytes]:
        a, b = socket.socketpair()
        stream = SocketStream(a)
        with loop.move_on_after(0.01):
            await loop.wait_readable(stream.fd)  # registered while the socket is still empty
        with loop.fail_after(5):
            got = []
            b.send(b"last words")
            b.close()
            await loop.sleep(0.05)
            got.append(await stream.receive_some())
            got.append(await stream.receive_some())
            got.append(await stream.receive_some())
        stream.close()
        return got

    assert loop.run(main()) == [b"last words", b"", b""]


def test_a_socket_closed_behind_the_loops_back_does_not_strand_the_next_one_with_its_number():
    async def main() -> tuple[bool, bytes]:
        a, b = socket.socketpair()
        old = SocketStream(a)
        b.send(b"x")
        assert await old.receive_some() == b"x"  # registered with epoll
        number = a.fileno()
        a.close(), b.close()  # not through SocketStream.close: the loop is not told
        c, d = socket.socketpair()
        new = SocketStream(c if c.fileno() == number else d)
        other = d if new.socket is c else c
        other.send(b"y")
        with loop.fail_after(5):
            data = await new.receive_some()
        reused = new.fd == number
        new.close(), other.close()
        return reused, data

    assert loop.run(main()) == (True, b"y")


def test_tasks_woken_in_a_round_run_in_it_and_each_yield_lets_the_loop_poll_first():
    """A spawned task, and the task its event wakes, run in the round that made them ready (no
    epoll call in between); a task that yields (checkpoint) runs again only after a poll."""
    proxy_loop = loop.Loop()
    polls: list[float] = []
    poll = proxy_loop._poll
    proxy_loop._poll = lambda timeout: polls.append(timeout) or poll(timeout)  # type: ignore[method-assign]
    counted: dict[str, int] = {}

    async def child(event: loop.Event) -> None:
        event.set()

    async def main() -> None:
        before = len(polls)
        event = loop.Event()
        task = proxy_loop.spawn(child(event))
        await event.wait()
        await task.join()
        counted["spawn and event"] = len(polls) - before
        before = len(polls)
        for _ in range(3):
            await loop.checkpoint()
        counted["yields"] = len(polls) - before
        proxy_loop.stop()

    proxy_loop.spawn(main())
    proxy_loop.run()
    assert counted == {"spawn and event": 0, "yields": 3}


def test_a_task_that_keeps_yielding_leaves_the_others_their_sockets():
    async def main() -> bytes:
        a, b = socket.socketpair()
        stream = SocketStream(a)
        spinning = True

        async def spinner() -> None:
            while spinning:
                await loop.checkpoint()

        loop.current_loop().spawn(spinner())
        await loop.sleep(0.01)
        b.send(b"through")
        with loop.fail_after(5):
            data = await stream.receive_some()
        spinning = False
        stream.close(), b.close()
        return data

    assert loop.run(main()) == b"through"


def test_connect_gives_a_connected_stream_or_the_refusal():
    async def main() -> tuple[bytes, type]:
        with socket.create_server(("127.0.0.1", 0)) as server:
            stream = await connect(socket.AF_INET, server.getsockname())
            peer, _ = server.accept()
            with peer:
                peer.send(b"greeting")
                data = await stream.receive_some()
            stream.close()
            closed = server.getsockname()
        try:
            await connect(socket.AF_INET, closed)
        except OSError as exc:
            return data, type(exc)
        raise AssertionError("a connect to a closed port succeeded")

    assert loop.run(main()) == (b"greeting", ConnectionRefusedError)
