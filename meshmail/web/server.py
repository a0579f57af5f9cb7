"""The http service: the node's API app on hypercorn, on one TCP port (TLS with a [tls] section)."""

from __future__ import annotations

import logging
import os
import ssl
import time
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from ..core.address import Address
from ..services import Context
from .app import create_app

log = logging.getLogger("meshmail.http")

#: How long in-flight requests may take to finish once the node is leaving.
HTTP_GRACE = 2.0
#: How long a client may take over its TLS handshake (hypercorn's default is 60 s): until it
#: is done, a connection holds a descriptor and some 30 KB of TLS state for nothing.
TLS_HANDSHAKE_TIMEOUT = 10.0
#: How long a request may go without a byte from its client, once it has started (hypercorn
#: waits forever); between requests the keep-alive timeout (5 s) applies.
READ_TIMEOUT = 30.0


class AcceptShortage(logging.Filter):
    """Quiets trio's accept loop under hypercorn while file descriptors run out: it retries
    every 0.1 s and logs each retry with a traceback. One line a minute says it instead."""

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self.last = -interval
        self.hidden = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("accept returned"):
            return True
        now = time.monotonic()
        if now - self.last < self.interval:
            self.hidden += 1
            return False
        record.msg = f"http: {record.getMessage()} ({self.hidden} more since the last such line; raise LimitNOFILE)"
        record.args, record.exc_info, record.exc_text = (), None, None
        self.last, self.hidden = now, 0
        return True


_shortage = AcceptShortage()
logging.getLogger("trio.serve_listeners").addFilter(_shortage)


def settings(ctx: Context, fd: int) -> HypercornConfig:
    """hypercorn's settings for serving on the listening socket `fd` (which it closes)."""
    config = HypercornConfig()
    config.bind = [f"fd://{fd}"]
    tls = ctx.config.tls
    if tls is not None:
        # Client certificates are optional: joining servers have none yet; nodes present theirs.
        config.certfile, config.keyfile, config.ca_certs = tls.cert, tls.key, tls.ca
        config.verify_mode = ssl.CERT_OPTIONAL
    # HTTP/1.1 only: an admin API needs nothing more, and hypercorn 0.18's HTTP/2 lets a
    # request body sent after an early answer raise out of the server (KeyError in h2.py).
    config.alpn_protocols = ["http/1.1"]
    config.accesslog = None
    config.errorlog = logging.getLogger("meshmail.http")
    config.graceful_timeout = HTTP_GRACE
    config.ssl_handshake_timeout = TLS_HANDSHAKE_TIMEOUT
    config.read_timeout = READ_TIMEOUT
    return config


async def serve(ctx: Context, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the node's API until the node stops; reports {"http": bound address}."""
    sock = await ctx.listen("http", ctx.config.http.bind)
    bound = Address(*sock.getsockname()[:2])
    app = create_app(ctx)
    async with trio.open_nursery() as nursery:
        config = settings(ctx, os.dup(sock.fileno()))
        await nursery.start(partial(hypercorn_serve, app, config, shutdown_trigger=ctx.stopping.wait))
        task_status.started({"http": bound})
