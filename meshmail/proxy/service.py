"""The proxy service of a master: listens on the [proxy] addresses, hands each connection to a
session, and reports its sessions, logins and bytes in /status. A master without [proxy] runs
it listening on nothing.

When the node leaves, the proxy drains before the node leaves the cluster: it stops accepting
(the listening sockets close, so clients go to another master at once), lets open sessions go
on for proxy.drain_timeout, then ends the rest (session.py) and tells the node it is done.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import threading
from typing import Any

import trio

from ..core.accept import BACKOFF_FIRST, BACKOFF_MAX, SHORTAGE_ERRNOS, Shortages
from ..core.address import Address, socket_address
from ..core.stall import StallWatch
from ..metrics import PROXY, Metrics
from ..services import Context
from . import loop
from .backend import LOOP, Connector, backend_contexts
from .certs import ServerCertificate
from .session import Proxy
from .streams import SocketStream

log = logging.getLogger("meshmail.proxy")

#: Seconds the node waits for the proxy thread to end once its loop is told to stop.
THREAD_JOIN = 5.0


class ProxyReport:
    """The /status "proxy" block: sessions open by protocol, logins by result, bytes each way,
    the backend connect time's median and 99th percentile over the latest connects, and the
    longest stall in the last minute of the proxy loop (what sessions wait) and of the node's
    trio loop (gossip and state, which the sessions read routes from)."""

    def __init__(
        self, proxy: Proxy, metrics: Metrics, stall: StallWatch | None = None, node_stall: StallWatch | None = None
    ) -> None:
        self.proxy = proxy
        self.metrics = metrics
        self.stall = stall
        self.node_stall = node_stall

    def summary(self) -> dict[str, Any]:
        block: dict[str, Any] = {"sessions": {}, "logins": {}, "bytes": {}}
        for name, value in self.metrics.status_counters(PROXY).items():
            group, _, key = name.removeprefix("proxy.").partition(".")
            if key:
                block.setdefault(group, {})[key] = value
            else:
                block[group] = value
        times = sorted(self.proxy.connect_times)
        block["backend_connect_ms"] = {
            "p50": percentile(times, 0.50) * 1000,
            "p99": percentile(times, 0.99) * 1000,
            "samples": len(times),
        }
        if self.stall is not None:
            block["loop_stall_ms"] = round(self.stall.longest(loop.now()) * 1000, 1)
        if self.node_stall is not None:
            block["node_loop_stall_ms"] = round(self.node_stall.longest(trio.current_time()) * 1000, 1)
        return block

    def document(self) -> dict[str, Any]:
        return self.summary()


def percentile(ordered: list[float], fraction: float) -> float:
    """The value at `fraction` of the sorted `ordered` (nearest rank); 0 for none."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


async def serve(ctx: Context, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on every [proxy] listener and serve sessions on the proxy loop (loop.py, its own
    thread) until the node leaves; then drain. A certificate or CA file that cannot be read
    stops the start (ssl.SSLError or OSError).

    The sessions read the router from the proxy thread while gossip and state change it on
    trio's: each lookup is a few dict reads, atomic under the interpreter lock, so a session
    sees a route either before or after a change, never half of one."""
    section = ctx.config.proxy
    if section is None:
        task_status.started({})
        return
    data_dir = ctx.config.node.data_dir
    certificate = None
    if section.cert is not None and section.key is not None:
        certificate = ServerCertificate(os.path.join(data_dir, section.cert), os.path.join(data_dir, section.key))
    connector = Connector(backend_contexts(section, ctx.config.tls, data_dir), runtime=LOOP)
    proxy = Proxy(section, ctx.router, connector, certificate, ctx.metrics, hostname=ctx.name)
    connector.connected = proxy.connected
    listeners: dict[str, socket.socket] = {}
    for name, address in section.listeners.items():
        listening = await ctx.listen(name, address)
        listeners[name] = socket.socket(fileno=listening.detach())
    drained = trio.Event()
    ctx.drains.append(drained)
    running = ProxyThread(proxy, listeners, trio.lowlevel.current_trio_token())
    ctx.reports["proxy"] = ProxyReport(proxy, ctx.metrics, running.loop.stall, ctx.stall)
    try:
        async with trio.open_nursery() as nursery:
            if certificate is not None:
                nursery.start_soon(certificate.watch)
            nursery.start_soon(running.watch)
            task_status.started({name: Address(*sock.getsockname()[:2]) for name, sock in listeners.items()})
            await ctx.stopping.wait()
            nursery.cancel_scope.cancel()
        await running.drain(section.drain_timeout)
    finally:
        running.stop()
        drained.set()
        ctx.reports.pop("proxy", None)


class ProxyThread:
    """The proxy loop in a thread of its own, accepting on `listeners` for `proxy`; `token`
    is the node's trio loop, which hears when the proxy loop ends."""

    def __init__(self, proxy: Proxy, listeners: dict[str, socket.socket], token: trio.lowlevel.TrioToken) -> None:
        self.proxy = proxy
        self.listeners = listeners
        self.loop = loop.Loop()
        self.ended = trio.Event()
        self._token = token
        self._error: BaseException | None = None
        self._acceptors = [self.loop.spawn(self._accept(sock, name)) for name, sock in listeners.items()]
        self._thread = threading.Thread(target=self._run, name="proxy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.loop.run()
        except BaseException as exc:  # noqa: BLE001 (told to the node's loop, which raises it)
            self._error = exc
        finally:
            try:
                self._token.run_sync_soon(self.ended.set)
            except trio.RunFinishedError:
                pass

    async def _accept(self, sock: socket.socket, name: str) -> None:
        try:
            await serve_listener(sock, name, self.proxy)
        except Exception as exc:  # a listener that cannot accept: the whole proxy restarts
            self.loop.fail(exc)

    async def watch(self) -> None:
        """Return never while the proxy loop runs; raise once it ended on its own (a failed
        listener or a fault of the loop), so that the node restarts the proxy service."""
        await self.ended.wait()
        raise RuntimeError(f"the proxy loop ended: {self._error!r}")

    async def drain(self, timeout: float) -> None:
        """Stop accepting (the listening sockets close, so clients go to another master), let
        open sessions go on for `timeout` seconds, then end the rest; returns when all ended."""
        done = trio.Event()
        token = self._token

        async def drain() -> None:
            for task in self._acceptors:
                task.cancel()
            for sock in self.listeners.values():
                loop.forget(sock.fileno())
                sock.close()
            if self.proxy.sessions:
                log.info("draining %d proxy sessions (up to %g s)", len(self.proxy.sessions), timeout)
            try:
                await self.proxy.drain(timeout)
            finally:
                token.run_sync_soon(done.set)

        self.loop.call_soon_threadsafe(lambda: self.loop.spawn(drain()))
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_ended, scope)
                await done.wait()
                nursery.cancel_scope.cancel()

    async def _until_ended(self, scope: trio.CancelScope) -> None:
        await self.ended.wait()
        scope.cancel()  # a loop that is gone drains nothing more

    def stop(self) -> None:
        """End the loop and its thread (briefly blocking: the loop ends at its next round)."""
        self.loop.stop()
        self._thread.join(THREAD_JOIN)
        for sock in self.listeners.values():
            sock.close()


async def serve_listener(sock: socket.socket, name: str, proxy: Proxy) -> None:
    """Accept connections on `sock` for the `name` listener, each served by a task of its own;
    shortages of fds or memory are waited out (core/accept.py counts and logs them)."""
    sock.setblocking(False)
    current, shortages = loop.current_loop(), Shortages(name)
    fd, delay = sock.fileno(), BACKOFF_FIRST
    # The address clients reach: the listener's own unless it listens on every address.
    host, port = sock.getsockname()[:2]
    local = None if ipaddress.ip_address(host).is_unspecified else socket_address((host, port))
    while True:
        try:
            conn, peer = sock.accept()
        except BlockingIOError:
            await loop.wait_readable(fd)
            continue
        except OSError as exc:
            if exc.errno not in SHORTAGE_ERRNOS:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # that one connection is gone: the listener is fine
                raise
            shortages.note(exc.errno, loop.now())
            await loop.sleep(delay)
            delay = min(2 * delay, BACKOFF_MAX)
            continue
        delay = BACKOFF_FIRST
        current.spawn(proxy.handle(SocketStream(conn), name, socket_address(peer), local))
