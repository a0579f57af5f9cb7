"""Splicing a logged-in client to its backend: bytes both ways until both sides have closed,
either breaks, or nothing moved for the idle timeout; half-close passed on where the stream
allows it. Lines go through Python (a read and a send); between two plain sockets on Linux
the rest of a bulk burst stays in the kernel (os.splice through a pipe, borrowed from a small
pool while bytes flow). Either way a slow reader slows its writer down: a direction holds at
most one pipe's or one read's worth. Counts the bytes each way.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading

import attrs

from . import loop
from .streams import READ_SIZE, SocketStream, Stream

#: Bytes a pipe of the kernel path holds at most. Raising a pipe past the kernel's 64 KiB can
#: fail (above /proc/sys/fs/pipe-max-size, or past the user's pipe-user-pages-soft with many
#: sessions open); the pipe then keeps the size it has, which only costs throughput.
PIPE_SIZE = 1 << 18
#: Empty pipes kept for the next bursts: enough for the sessions moving bytes at one moment.
KEPT_PIPES = 64
#: Move pages rather than copy them where the kernel can; never block (the proxy loop polls the fds).
_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)


class _NoSplice(Exception):
    """The kernel path is out for this direction while it holds no bytes: no os.splice (not
    Linux), no fd left for a pipe, or EINVAL (a socket the kernel cannot splice from, which
    the first call finds out)."""


@attrs.define(eq=False)
class Splice:
    """Bytes moved each way: `up` client -> backend, `down` backend -> client."""

    up: int = 0
    down: int = 0
    idled_out: bool = False
    _last: float = attrs.field(factory=lambda: loop.now())

    async def run(self, client: Stream, backend: Stream, idle: float) -> None:
        """Move bytes both ways until both sides have closed, either breaks, or nothing moved
        for `idle` seconds. A side that ends is passed on as a half-close when the other stream
        can send EOF (plain TCP); TLS cannot, so the session ends there. Closes neither stream."""
        in_kernel = isinstance(client, SocketStream) and isinstance(backend, SocketStream)
        over = loop.Event()
        done = [False, False]

        async def pump(source: Stream, sink: Stream, index: int) -> None:
            try:
                await self._move(source, sink, index, in_kernel)
                half_closeable = isinstance(sink, SocketStream)
                if half_closeable:
                    await sink.send_eof()
                done[index] = True  # only now: the other side ending must not cut this EOF short
                if all(done) or not half_closeable:
                    over.set()
            except OSError:
                over.set()

        current = loop.current_loop()
        pumps = [current.spawn(pump(client, backend, 0)), current.spawn(pump(backend, client, 1))]
        try:
            while not over.is_set():
                with loop.move_on_at(self._last + idle):
                    await over.wait()
                if not over.is_set() and loop.now() >= self._last + idle:
                    self.idled_out = True
                    return
        finally:
            for task in pumps:
                task.cancel()

    def _moved(self, index: int, count: int) -> None:
        if index == 0:
            self.up += count
        else:
            self.down += count

    async def _move(self, source: Stream, sink: Stream, index: int, in_kernel: bool) -> None:
        """Move bytes from `source` to `sink` until `source` ends: one read through Python each
        time it is readable (an exchange of lines costs two calls, as few as it can), and with
        `in_kernel` (two plain sockets on Linux), when that read fills READ_SIZE, the rest of
        the burst through a pipe. A burst borrows an empty pipe from pipes() and gives it back
        empty, so an idle session holds no pipe fds and none of the user's pipe pages. Where
        the kernel path turns out unavailable (no fd left for a pipe, a socket it cannot splice
        from) the direction copies on. OSError when a socket breaks."""
        in_kernel = in_kernel and hasattr(os, "splice")
        while data := await source.receive_some(READ_SIZE):
            self._last = loop.now()
            await sink.send_all(data)
            self._moved(index, len(data))
            if not in_kernel or len(data) < READ_SIZE:
                continue  # a short read emptied the socket: wait for more
            assert isinstance(source, SocketStream) and isinstance(sink, SocketStream)
            kept = pipes()
            try:
                pipe = kept.take()
            except _NoSplice:
                in_kernel = False
                continue
            emptied = False
            try:
                ended = await self._burst(source.fd, sink.fd, pipe, index)
                emptied = True
            except _NoSplice:
                in_kernel, emptied, ended = False, True, False
            finally:
                kept.give(pipe, emptied)
            if ended:
                return
            source.drained = True  # the burst read until EAGAIN

    async def _burst(self, src: int, dst: int, pipe: tuple[int, int, int], index: int) -> bool:
        """Fill the pipe from `src` and empty it into `dst` until `src` has nothing more for now
        (False) or has ended (True); the pipe is empty either way, so a half-close passed on next
        loses nothing. Raises _NoSplice on EINVAL from a fill, which finds the pipe empty."""
        read_end, write_end, size = pipe
        while True:
            try:
                held = os.splice(src, write_end, size, flags=_FLAGS)
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    raise _NoSplice from exc
                raise
            if not held:
                return True
            self._last = loop.now()
            full = held == size
            while held:
                try:
                    sent = os.splice(read_end, dst, held, flags=_FLAGS)
                except BlockingIOError:
                    await loop.wait_writable(dst)
                    continue
                held -= sent
                self._moved(index, sent)
            if full:
                # A fast pair of sockets may never make a call wait: let the loop's other tasks run.
                await loop.checkpoint()


class _Pipes:
    """Empty pipes kept for the next burst (at most KEPT_PIPES): taking one costs nothing when
    one is kept, a new one otherwise (non-blocking, raised to PIPE_SIZE where the kernel allows)."""

    def __init__(self) -> None:
        self._kept: list[tuple[int, int, int]] = []

    def take(self) -> tuple[int, int, int]:
        """An empty pipe: its read end, write end and capacity. Raises _NoSplice when no fd is
        left (copying needs none)."""
        if self._kept:
            return self._kept.pop()
        try:
            read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise _NoSplice from exc
        try:
            size = fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            size = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
        return read_end, write_end, size

    def give(self, pipe: tuple[int, int, int], empty: bool) -> None:
        """Take `pipe` back: kept when `empty` and there is room, else closed."""
        if empty and len(self._kept) < KEPT_PIPES:
            self._kept.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        """Close the kept pipes."""
        while self._kept:
            self.give(self._kept.pop(), False)


_threads = threading.local()


def pipes() -> _Pipes:
    """The kept pipes of this thread's loop (a pipe is only ever used by one thread)."""
    kept = getattr(_threads, "pipes", None)
    if kept is None:
        kept = _threads.pipes = _Pipes()
    return kept
