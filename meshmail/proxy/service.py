"""The proxy service of a master: listens on the [proxy] addresses, hands each connection to a
session, and reports its sessions, logins and bytes in /status. A master without [proxy] runs
it listening on nothing.

When the node leaves, the proxy drains before the node leaves the cluster: it stops accepting
(the listening sockets close, so clients go to another master at once), lets open sessions go
on for proxy.drain_timeout, then ends the rest (session.py) and tells the node it is done.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import trio

from ..core.accept import ResilientListener
from ..core.address import Address
from ..core.stall import StallWatch
from ..metrics import PROXY, Metrics
from ..services import Context
from .backend import Connector, backend_contexts
from .certs import ServerCertificate
from .session import Proxy

log = logging.getLogger("meshmail.proxy")


class ProxyReport:
    """The /status "proxy" block: sessions open by protocol, logins by result, bytes each way,
    the backend connect time's median and 99th percentile over the latest connects, and the
    event loop's longest stall in the last minute (sessions share the loop with gossip)."""

    def __init__(self, proxy: Proxy, metrics: Metrics, stall: StallWatch | None = None) -> None:
        self.proxy = proxy
        self.metrics = metrics
        self.stall = stall

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
            block["loop_stall_ms"] = round(self.stall.longest(trio.current_time()) * 1000, 1)
        return block

    def document(self) -> dict[str, Any]:
        return self.summary()


def percentile(ordered: list[float], fraction: float) -> float:
    """The value at `fraction` of the sorted `ordered` (nearest rank); 0 for none."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


async def serve(ctx: Context, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on every [proxy] listener and serve sessions until the node leaves; then drain.
    A certificate or CA file that cannot be read stops the start (ssl.SSLError or OSError)."""
    section = ctx.config.proxy
    if section is None:
        task_status.started({})
        return
    data_dir = ctx.config.node.data_dir
    certificate = None
    if section.cert is not None and section.key is not None:
        certificate = ServerCertificate(os.path.join(data_dir, section.cert), os.path.join(data_dir, section.key))
    connector = Connector(backend_contexts(section, ctx.config.tls, data_dir))
    proxy = Proxy(section, ctx.router, connector, certificate, ctx.metrics, hostname=ctx.name)
    connector.connected = proxy.connected
    listeners = {}
    for name, address in section.listeners.items():
        sock = await ctx.listen(name, address)
        listeners[name] = ResilientListener(trio.SocketListener(sock), name=name)
    drained = trio.Event()
    ctx.drains.append(drained)
    ctx.reports["proxy"] = ProxyReport(proxy, ctx.metrics, ctx.stall)
    try:
        async with trio.open_nursery() as sessions:
            async with trio.open_nursery() as accepting:
                if certificate is not None:
                    accepting.start_soon(certificate.watch)
                for name, listener in listeners.items():
                    accepting.start_soon(_accept, listener, name, proxy, sessions)
                task_status.started({name: Address(*sock_name(listener)) for name, listener in listeners.items()})
                await ctx.stopping.wait()
                accepting.cancel_scope.cancel()
            for listener in listeners.values():
                await listener.aclose()
            if proxy.sessions:
                log.info("draining %d proxy sessions (up to %g s)", len(proxy.sessions), section.drain_timeout)
            await proxy.drain(section.drain_timeout)
    finally:
        drained.set()
        ctx.reports.pop("proxy", None)


def sock_name(listener: ResilientListener) -> tuple[str, int]:
    inner = listener.listener
    assert isinstance(inner, trio.SocketListener)
    return inner.socket.getsockname()[:2]


async def _accept(listener: ResilientListener, name: str, proxy: Proxy, sessions: trio.Nursery) -> None:
    while True:
        stream = await listener.accept()
        sessions.start_soon(proxy.handle, stream, name)
