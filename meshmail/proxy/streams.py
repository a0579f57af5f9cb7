"""Byte streams for the proxy loop (loop.py): a non-blocking TCP socket, and TLS over one
through the ssl module's memory BIOs. Both offer what the sessions use of a trio stream:
receive_some (b"" at the end), send_all, close; the socket also send_eof (a half-close).
Errors are OSError (ssl.SSLError is one).
"""

from __future__ import annotations

import errno
import socket
import ssl

from . import loop

#: Bytes read at once from either side.
READ_SIZE = 65536


class SocketStream:
    """A connected TCP socket, made non-blocking, with Nagle off (lines go out at once).

    A read shorter than asked for emptied the socket's receive queue, so the next read waits
    for epoll first instead of trying a read that would only say EAGAIN; a new connection is
    taken as empty too (mail servers speak first, and a client waits for the greeting)."""

    def __init__(self, sock: socket.socket) -> None:
        if sock.gettimeout() != 0.0:
            sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a test's socketpair)
        self.socket = sock
        self.fd = sock.fileno()
        loop.forget(self.fd)  # a socket closed behind the loop's back may have had this number
        self.closed = False
        self.drained = True

    async def receive_some(self, size: int = READ_SIZE) -> bytes:
        if self.drained:
            await loop.wait_readable(self.fd)
        while True:
            try:
                data = self.socket.recv(size)
            except BlockingIOError:
                await loop.wait_readable(self.fd)
                continue
            self.drained = len(data) < size
            return data

    async def send_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.socket.send(view)
            except BlockingIOError:
                await loop.wait_writable(self.fd)
                continue
            view = view[sent:]

    async def send_eof(self) -> None:
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            loop.forget(self.fd)
            self.socket.close()


async def connect(family: int, address: tuple) -> SocketStream:
    """A TCP connection to `address` (an IP address and port of `family`); OSError if refused."""
    stream = SocketStream(socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK))
    try:
        code = stream.socket.connect_ex(address)
        if code == errno.EINPROGRESS:
            if _connected(stream.socket):
                code = 0
            else:
                await loop.wait_writable(stream.fd)
                code = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise OSError(code, errno.errorcode.get(code, str(code)))
        return stream
    except BaseException:
        stream.close()
        raise


def _connected(sock: socket.socket) -> bool:
    """Whether a connect that said EINPROGRESS is done already: over loopback the handshake
    completes within the connect call, so no wait for writability (a loop round) is needed."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


class TlsStream:
    """TLS over `transport` (a SocketStream): ssl.SSLObject with memory BIOs. One task may
    receive while another sends; what TLS has to send is written by one of them at a time."""

    def __init__(
        self, transport: SocketStream, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side, server_hostname)
        self._flushing: loop.Event | None = None

    def cipher(self) -> tuple[str, str, int] | None:
        return self._tls.cipher()

    async def do_handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
                continue
            await self._flush()
            return

    async def receive_some(self, size: int = READ_SIZE) -> bytes:
        while True:
            try:
                return self._tls.read(size)
            except ssl.SSLWantReadError:
                if self._outgoing.pending:
                    await self._flush()  # TLS 1.3 tickets, key updates
                await self._fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""  # close_notify, or a peer that just closed the connection (mail clients do)

    async def send_all(self, data: bytes | memoryview) -> None:
        self._tls.write(data)
        await self._flush()

    def close(self) -> None:
        self.transport.close()

    async def _fill(self) -> None:
        data = await self.transport.receive_some(READ_SIZE)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def _flush(self) -> None:
        """Send what TLS has produced; while another task sends, wait for it, then send the rest."""
        while self._flushing is not None:
            await self._flushing.wait()
        if not self._outgoing.pending:
            return
        self._flushing = loop.Event()
        try:
            while data := self._outgoing.read():
                await self.transport.send_all(data)
        finally:
            done, self._flushing = self._flushing, None
            done.set()


Stream = SocketStream | TlsStream
