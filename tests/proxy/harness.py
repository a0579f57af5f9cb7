"""The proxy in one process for tests with real clients: its six listeners on 127.0.0.1 served by a
proxy loop in a thread, a fixed domain map, and imaplib clients that connect from CLIENT_HOST so a
backend's log tells the client's address from the proxy's."""

from __future__ import annotations

import imaplib
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from helpers.routes import DomainMap, slave  # noqa: F401  (re-exported for the proxy tests)

from meshmail.proxy import loop
from meshmail.proxy.service import serve_listener
from meshmail.proxy.session import LISTENERS, Proxy

#: Clients connect from this address, the proxy from 127.0.0.1: the backends' logs tell them apart.
CLIENT_HOST = "127.0.0.2"


@contextmanager
def serving(proxy: Proxy) -> Iterator[dict[str, int]]:
    """Serve `proxy` on every listener of LISTENERS (ports from the kernel) on a proxy loop in a
    thread, as the node does; yields listener name -> port, and stops the loop on exit."""
    ports: dict[str, int] = {}
    proxy_loop = loop.Loop()
    listeners = []
    for name in LISTENERS:
        sock = socket.create_server(("127.0.0.1", 0))
        listeners.append(sock)
        ports[name] = sock.getsockname()[1]
        proxy_loop.spawn(serve_listener(sock, name, proxy))
    thread = threading.Thread(target=proxy_loop.run, daemon=True)
    thread.start()
    try:
        yield ports
    finally:
        proxy_loop.stop()
        thread.join(10)
        for sock in listeners:
            sock.close()


class Imap(imaplib.IMAP4):
    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(CLIENT_HOST, 0))


class ImapTls(imaplib.IMAP4_SSL):
    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(CLIENT_HOST, 0))
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)
