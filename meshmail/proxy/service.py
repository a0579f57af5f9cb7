"""The proxy service of a master: listens on the [proxy] addresses, hands each connection to a
session, and reports its sessions and logins in /status. A master without [proxy] runs it
listening on nothing.
"""

from __future__ import annotations

import logging
import os
import ssl
from typing import Any

import trio

from ..core.accept import ResilientListener
from ..core.address import Address
from ..metrics import PROXY, Metrics
from ..services import Context
from .backend import Connector, backend_contexts
from .session import Proxy

log = logging.getLogger("meshmail.proxy")


class ProxyReport:
    """The /status "proxy" block: sessions open by protocol, logins by result."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def summary(self) -> dict[str, Any]:
        block: dict[str, Any] = {"sessions": {}, "logins": {}}
        for name, value in self.metrics.status_counters(PROXY).items():
            group, _, key = name.removeprefix("proxy.").partition(".")
            if key:
                block.setdefault(group, {})[key] = value
            else:
                block[group] = value
        return block

    def document(self) -> dict[str, Any]:
        return self.summary()


async def serve(ctx: Context, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on every [proxy] listener and serve sessions until the node stops; then stop
    accepting and let open sessions finish (the node cancels them at its deadline). A
    certificate or CA file that cannot be read stops the start (ssl.SSLError or OSError)."""
    section = ctx.config.proxy
    if section is None:
        task_status.started({})
        return
    data_dir = ctx.config.node.data_dir
    server_tls = None
    if section.cert is not None and section.key is not None:
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(os.path.join(data_dir, section.cert), os.path.join(data_dir, section.key))
    connector = Connector(backend_contexts(section, ctx.config.tls, data_dir))
    proxy = Proxy(section, ctx.router, connector, server_tls, ctx.metrics, hostname=ctx.name)
    listeners = {}
    for name, address in section.listeners.items():
        sock = await ctx.listen(name, address)
        listeners[name] = ResilientListener(trio.SocketListener(sock), name=name)
    ctx.reports["proxy"] = ProxyReport(ctx.metrics)
    try:
        async with trio.open_nursery() as sessions:
            async with trio.open_nursery() as accepting:
                for name, listener in listeners.items():
                    accepting.start_soon(_accept, listener, name, proxy, sessions)
                task_status.started({name: Address(*sock_name(listener)) for name, listener in listeners.items()})
                await ctx.stopping.wait()
                accepting.cancel_scope.cancel()
    finally:
        ctx.reports.pop("proxy", None)


def sock_name(listener: ResilientListener) -> tuple[str, int]:
    inner = listener.listener
    assert isinstance(inner, trio.SocketListener)
    return inner.socket.getsockname()[:2]


async def _accept(listener: ResilientListener, name: str, proxy: Proxy, sessions: trio.Nursery) -> None:
    while True:
        stream = await listener.accept()
        sessions.start_soon(proxy.handle, stream, name)
