"""The MX service of a master: opens the queue (DATA_DIR/queue, rescanned at start), listens on
[mx] listen, hands each connection to a session and runs the delivery loop; /status gets an
"mx" block. When the node leaves, it stops accepting and ends open sessions with 421 (a
sending server simply tries again, here or at another master); queued mail stays on disk.
"""

from __future__ import annotations

import logging
import os
import random
import socket
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
from .deliver import Deliverer
from .queue import Queue, RetryPolicy
from .runner import Runner
from .session import Mx
from .spool import Spool

log = logging.getLogger("meshmail.mta")

#: Open sessions get this long to finish their command when the node leaves.
STOP_GRACE = 5.0


class MxReport:
    """The /status "mx" block: sessions open, the queue per slave (messages, bytes), the oldest
    message's age, shadows held, recipients by result and refusals by reason (as counted on the
    MX_RECIPIENTS and MX_REJECTIONS series)."""

    def __init__(self, mx: Mx, runner: Runner) -> None:
        self.mx = mx
        self.runner = runner

    def summary(self) -> dict[str, Any]:
        stats = self.runner.queue.stats(wall_ms())
        recipients = self.runner.metrics.status_counters([MX_RECIPIENTS])
        rejections = self.mx.metrics.status_counters([MX_REJECTIONS])
        return {
            "sessions": self.mx.open,
            "queued": stats.messages,
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
    data_dir = ctx.config.node.data_dir
    spool = await trio.to_thread.run_sync(Spool.open, Path(data_dir) / "queue")
    try:
        scan = await spool.rescan()
        for queue_id, why in scan.corrupt:
            log.error(
                "queued message %s is damaged (%s): moved to queue/corrupt/",
                queue_id,
                why,
            )
        queue = Queue(policy(section), random.SystemRandom())
        queue.load(scan.envelopes)
        if scan.envelopes:
            log.info("queue: %d message(s) waiting", len(scan.envelopes))
        hostname = section.hostname or socket.getfqdn()
        deliverer = Deliverer(
            Connector(backend_contexts(ctx.config.proxy, ctx.config.tls, data_dir)),
            hostname,
            section.delivery_timeout,
        )
        runner = Runner(spool, queue, deliverer, ctx.router, hostname, ctx.name, metrics=ctx.metrics)
        proxy = ctx.config.proxy
        certificate = None
        if proxy is not None and proxy.cert is not None and proxy.key is not None:
            certificate = ServerCertificate(os.path.join(data_dir, proxy.cert), os.path.join(data_dir, proxy.key))
        mx = Mx(section, ctx.router, deliverer, runner, certificate, ctx.metrics, hostname)
        listener = ResilientListener(trio.SocketListener(await ctx.listen("mx", section.listen)), name="mx")
        ctx.reports["mx"] = MxReport(mx, runner)
        ctx.mta = runner
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(runner.run)
                if certificate is not None:
                    nursery.start_soon(certificate.watch)
                async with trio.open_nursery() as sessions:
                    async with trio.open_nursery() as accepting:
                        accepting.start_soon(_accept, listener, mx, sessions)
                        task_status.started({"mx": Address(*listener.listener.socket.getsockname()[:2])})
                        await ctx.stopping.wait()
                        accepting.cancel_scope.cancel()
                    await listener.aclose()
                    with trio.move_on_after(STOP_GRACE):
                        while mx.sessions:
                            await trio.sleep(0.1)
                    for session in list(mx.sessions):
                        session.end()
                nursery.cancel_scope.cancel()
        finally:
            ctx.reports.pop("mx", None)
            ctx.mta = None
    finally:
        spool.close()


async def _accept(listener: ResilientListener, mx: Mx, sessions: trio.Nursery) -> None:
    while True:
        stream = await listener.accept()
        sessions.start_soon(mx.handle, stream)
