"""The proxy in one process for tests with real clients: its six listeners on 127.0.0.1 served by a
trio loop in a thread, a fixed domain map, and imaplib clients that connect from CLIENT_HOST so a
backend's log tells the client's address from the proxy's."""

from __future__ import annotations

import functools
import imaplib
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import trio
from helpers.routes import DomainMap, slave  # noqa: F401  (re-exported for the proxy tests)

from meshmail.proxy.session import LISTENERS, Proxy

#: Clients connect from this address, the proxy from 127.0.0.1: the backends' logs tell them apart.
CLIENT_HOST = "127.0.0.2"


@contextmanager
def serving(proxy: Proxy) -> Iterator[dict[str, int]]:
    """Serve `proxy` on every listener of LISTENERS (ports from the kernel) in a trio loop in a
    thread; yields listener name -> port, and stops the loop on exit."""
    ports: dict[str, int] = {}
    ready = threading.Event()
    loop: dict[str, object] = {}

    async def main() -> None:
        loop["token"], loop["stop"] = trio.lowlevel.current_trio_token(), trio.Event()
        async with trio.open_nursery() as nursery:
            for name in LISTENERS:
                [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
                ports[name] = listener.socket.getsockname()[1]
                nursery.start_soon(
                    trio.serve_listeners,
                    functools.partial(proxy.handle, listener=name),
                    [listener],
                )
            ready.set()
            await loop["stop"].wait()
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield ports
    finally:
        trio.from_thread.run_sync(loop["stop"].set, trio_token=loop["token"])
        thread.join(5)


class Imap(imaplib.IMAP4):
    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(CLIENT_HOST, 0))


class ImapTls(imaplib.IMAP4_SSL):
    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(CLIENT_HOST, 0))
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)
