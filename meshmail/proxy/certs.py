"""The certificate clients see: loaded from proxy.cert and proxy.key, and loaded again on
SIGHUP or when either file changes (an ACME client renewing it), without dropping sessions:
sessions keep the context they started with, new ones get the new one. A new pair that
cannot be loaded (half written, key and certificate that do not match) is logged and the
old one stays in use until the files change again.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import threading

import attrs
import trio

log = logging.getLogger("meshmail.proxy")

#: How often the files are looked at for a change (seconds).
CERT_POLL = 5.0


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server-side TLS context with `cert` and `key`; raises OSError or ssl.SSLError."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@attrs.define(eq=False)
class ServerCertificate:
    """The current context for `cert` and `key` (paths); raises OSError or ssl.SSLError at
    creation when they cannot be loaded."""

    cert: str
    key: str
    context: ssl.SSLContext = attrs.field(init=False)
    _stamp: tuple = attrs.field(init=False, default=())

    def __attrs_post_init__(self) -> None:
        self._stamp = self.stamp()
        self.context = server_context(self.cert, self.key)

    def stamp(self) -> tuple:
        """What tells a changed file: each one's inode, size and modification time."""
        found = []
        for path in (self.cert, self.key):
            try:
                info = os.stat(path)
            except OSError:
                found.append(None)
            else:
                found.append((info.st_ino, info.st_size, info.st_mtime_ns))
        return tuple(found)

    def reload(self, why: str) -> bool:
        """Load the files again; whether the new pair is now in use."""
        self._stamp = self.stamp()
        try:
            self.context = server_context(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            log.error("proxy certificate %s not reloaded (%s): %s; the previous one stays in use", self.cert, why, exc)
            return False
        log.info("proxy certificate %s reloaded (%s)", self.cert, why)
        return True

    async def watch(self, poll: float = CERT_POLL) -> None:
        """Reload on SIGHUP (in the main thread only: signals reach no other) and whenever
        the files change; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            if threading.current_thread() is threading.main_thread():
                nursery.start_soon(self._on_signals)
            while True:
                await trio.sleep(poll)
                if self.stamp() != self._stamp:
                    self.reload("the files changed")

    async def _on_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                self.reload("SIGHUP")
