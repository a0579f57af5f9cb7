"""The MX service of a master: opens the queue (DATA_DIR/queue, rescanned at start), listens on
[mx] listen, hands each connection to a session and runs the delivery loop; /status gets an
"mx" block. When the node leaves, it stops accepting and ends open sessions with 421 (a
sending server simply tries again, here or at another master); queued mail stays on disk.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import socket
import ssl
from pathlib import Path
from typing import Any

import trio

from ..core.accept import ResilientListener
from ..core.address import Address
from ..core.clock import wall_ms
from ..metrics import MX_RECIPIENTS, MX_REJECTIONS
from ..proxy.backend import Connector, backend_contexts
from ..proxy.certs import ServerCertificate
from ..services import Context
from . import shadow
from .deliver import SMARTHOST, Deliverer, smarthost_context
from .queue import Queue, RetryPolicy
from .runner import Runner
from .session import Mx
from .spool import Spool

log = logging.getLogger("meshmail.mta")

#: Open sessions get this long to finish their command when the node leaves.
STOP_GRACE = 5.0


class MxReport:
    """The /status "mx" block: sessions open, the queue per slave (messages, bytes), messages
    held back until their shadow's holder says what it took over (counted in "queued" too),
    the oldest message's age, shadows held, recipients by result and refusals by reason (as
    counted on the MX_RECIPIENTS and MX_REJECTIONS series)."""

    def __init__(self, mx: Mx, runner: Runner) -> None:
        self.mx = mx
        self.runner = runner

    def summary(self) -> dict[str, Any]:
        stats = self.runner.queue.stats(wall_ms())
        recipients = self.runner.metrics.status_counters([MX_RECIPIENTS])
        rejections = self.mx.metrics.status_counters([MX_REJECTIONS])
        return {
            "sessions": self.mx.open,
            "queued": stats.messages + self.runner.held_back,
            "held_back": self.runner.held_back,
            "queued_bytes": sum(slave.bytes for slave in stats.slaves.values()),
            "oldest_age_s": round(stats.oldest_age_ms / 1000, 1),
            "slaves": {name: {"messages": s.messages, "bytes": s.bytes} for name, s in sorted(stats.slaves.items())},
            "shadows": stats.shadows,
            "recipients": {name.removeprefix("mx.recipients."): n for name, n in recipients.items()},
            "rejections": {name.removeprefix("mx.rejections."): n for name, n in rejections.items()},
        }

    def document(self) -> dict[str, Any]:
        return self.summary()


def policy(section) -> RetryPolicy:
    """The retry policy [mx] asks for."""
    warn = round(section.delay_warning * 1000) or None
    return RetryPolicy(round(section.retry_min * 1000), round(section.retry_max * 1000),
                       round(section.queue_lifetime * 1000), warn)  # fmt: skip


async def serve(ctx: Context, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the MX until the node leaves. A queue folder in use by another process, or a
    certificate that cannot be read, stops the start (MeshmailError, OSError, ssl.SSLError)."""
    section = ctx.config.mx
    if section.listen is None:
        task_status.started({})
        return
    spool = await trio.to_thread.run_sync(Spool.open, Path(ctx.config.node.data_dir) / "queue")
    try:
        mx, holder_context = await _build(ctx, spool)
        listener = ResilientListener(trio.SocketListener(await ctx.listen("mx", section.listen)), name="mx")
        holders = None
        if holder_context is not None and section.shadow_listen is not None:
            sock = await ctx.listen("shadow", section.shadow_listen)
            holders = ResilientListener(trio.SocketListener(sock), name="shadow")
        ctx.reports["mx"] = MxReport(mx, mx.runner)
        ctx.mta = mx.runner
        events = ctx.members.subscribe()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(mx.runner.run)
                nursery.start_soon(_wake_on_news, events, mx.runner)
                if mx.certificate is not None:
                    nursery.start_soon(mx.certificate.watch)
                bound = {"mx": _bound(listener)}
                if holders is not None:
                    serve_one = functools.partial(
                        shadow.serve_holder,
                        runner=mx.runner, context=holder_context, limit=frame_limit(section), name=ctx.name,
                    )  # fmt: skip
                    nursery.start_soon(_accept, holders, serve_one, nursery)
                    bound["shadow"] = _bound(holders)
                await _serve_sessions(ctx, mx, listener, bound, task_status)
                nursery.cancel_scope.cancel()
        finally:
            events.close()
            ctx.reports.pop("mx", None)
            ctx.mta = None
    finally:
        spool.close()


async def _build(ctx: Context, spool: Spool) -> tuple[Mx, ssl.SSLContext | None]:
    """The MX over `spool` (rescanned): its runner with the shadow links, and the TLS context
    of the shadow store (None without [tls])."""
    section, data_dir = ctx.config.mx, ctx.config.node.data_dir
    scan = await spool.rescan()
    for queue_id, why in scan.corrupt:
        log.error("queued message %s is damaged (%s): moved to queue/corrupt/", queue_id, why)
    hostname = section.hostname or socket.getfqdn()
    if section.postmaster is None:
        log.warning("mx.postmaster is not set: mail to <postmaster> is refused (RFC 5321 wants it taken)")
    slaves = backend_contexts(ctx.config.proxy, ctx.config.tls, data_dir)
    ca = None if section.smarthost_ca is None else os.path.join(data_dir, section.smarthost_ca)
    outside = smarthost_context(section.smarthost_tls_verify, ca)
    connector = Connector(lambda name: outside if name == SMARTHOST else slaves(name))
    deliverer = Deliverer(connector, hostname, section.delivery_timeout)
    queue = Queue(policy(section), random.SystemRandom())
    runner = Runner(
        spool, queue, deliverer, ctx.router, hostname, ctx.name, metrics=ctx.metrics,
        takeover_after=section.shadow_takeover, smarthost=section.smarthost,
    )  # fmt: skip
    holder_context = None
    if ctx.config.tls is not None:
        holder_context, client_context = shadow.contexts(ctx.config.tls.under(data_dir))
        if section.shadow:
            runner.links = shadow.Links(ctx.name, ctx.members.members, client_context, frame_limit(section))
        runner.taken = await trio.to_thread.run_sync(shadow.TakenLog, Path(data_dir) / "queue" / "taken.log")
    elif section.shadow:
        log.warning("mx.shadow needs [tls] (the nodes' certificates): queued mail is kept on this master only")
    runner.load(scan.envelopes)
    if scan.envelopes:
        log.info("queue: %d message(s) on disk", len(scan.envelopes))
    proxy = ctx.config.proxy
    certificate = None
    if proxy is not None and proxy.cert is not None and proxy.key is not None:
        certificate = ServerCertificate(os.path.join(data_dir, proxy.cert), os.path.join(data_dir, proxy.key))
    return Mx(section, ctx.router, deliverer, runner, certificate, ctx.metrics, hostname), holder_context


async def _serve_sessions(ctx: Context, mx: Mx, listener: ResilientListener, bound: dict, task_status) -> None:
    """Accept sessions until the node leaves; then stop accepting, give open sessions
    STOP_GRACE to finish and end the rest with 421."""
    async with trio.open_nursery() as sessions:
        async with trio.open_nursery() as accepting:
            accepting.start_soon(_accept, listener, mx.handle, sessions)
            task_status.started(bound)
            await ctx.stopping.wait()
            accepting.cancel_scope.cancel()
        await listener.aclose()
        with trio.move_on_after(STOP_GRACE):
            while mx.sessions:
                await trio.sleep(0.1)
        for session in list(mx.sessions):
            session.end()


async def _wake_on_news(events: trio.MemoryReceiveChannel, runner: Runner) -> None:
    """Membership news (a slave back, its endpoint up again) wakes the delivery loop, so what
    waits for that slave goes at once rather than at the loop's next look."""
    async for _ in events:
        runner.wake()


def frame_limit(section) -> int:
    """The largest shadow request: a message of the largest size and its envelope."""
    return section.max_message_size + 4 * 1024 * 1024


def _bound(listener: ResilientListener) -> Address:
    inner = listener.listener
    assert isinstance(inner, trio.SocketListener)
    return Address(*inner.socket.getsockname()[:2])


async def _accept(listener: ResilientListener, handle, sessions: trio.Nursery) -> None:
    while True:
        stream = await listener.accept()
        sessions.start_soon(handle, stream)
