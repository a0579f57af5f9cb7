"""One inbound SMTP session: the thin trio driver around the MxServer codec.

RCPT resolves the domain in this master's own copy of the map: a domain outside the cluster
is refused (no relaying); a recipient of a slave that answers is checked there (an unknown
user is refused with the slave's own reply, so no bounce ever goes to a forged sender); one of
a slave that is down is accepted. At the end of DATA the message (with a Received header in
front, the body untouched) goes to each answering slave at once and the client hears 250 only
when every recipient was taken by its slave or is in the queue (on disk, fsync'd). What a
slave refuses for good is answered with its reply when it refused everything, else bounced.
"""

from __future__ import annotations

import collections
import email.utils
import logging
import secrets
import ssl
import time

import attrs
import trio

from ..config.sections import MxSection
from ..core.address import socket_address
from ..metrics import Metrics
from ..protocols import mx
from ..protocols.common import Closed, ProtocolError, StartTls
from ..protocols.lmtp import Transaction
from ..protocols.smtp import Reply
from ..proxy.backend import READ_SIZE
from ..proxy.certs import ServerCertificate
from ..routing import (
    INVALID_ADDRESS,
    SERVICE_DOWN,
    SLAVE_DOWN,
    UNKNOWN_DOMAIN,
    NoRoute,
    Route,
    Router,
)
from ..security.throttle import RateLimiter
from .deliver import UNREACHABLE, Client, Deliverer, resolve
from .runner import Runner

log = logging.getLogger("meshmail.mta")

RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied: not a domain of this cluster")
NO_POSTMASTER = Reply(550, "5.1.1", "Postmaster is not configured here")
CANNOT_ROUTE = Reply(451, "4.4.0", "Cannot route this recipient now, try again later")
BUSY = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_FAST = Reply(421, "4.7.0", "Too many connections from your address, slow down")
MESSAGES_TOO_FAST = Reply(451, "4.7.1", "Too many messages from your address, slow down")
NO_MEMORY = Reply(452, "4.3.1", "Insufficient system storage, try again later")
EARLY_TALKER = Reply(554, "5.5.0", "Talking before the greeting, goodbye")
TIMED_OUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
#: A session that ends gets this long to take its last line.
LAST_LINE_TIMEOUT = 1.0
#: NoRoute reasons for mail that is accepted and kept until the slave is back.
_WAITS = frozenset({SLAVE_DOWN, SERVICE_DOWN})


def received_header(client: Client, hostname: str, tls: bool, queue_id: str, recipients: list[str]) -> bytes:
    """The Received line this master adds in front of the message (RFC 5321 section 4.4)."""
    protocol = "ESMTPS" if tls else "ESMTP"
    helo = client.helo or "unknown"
    what = f"for <{recipients[0]}>" if len(recipients) == 1 else ""
    stamp = email.utils.formatdate(time.time(), localtime=False)
    return (
        f"Received: from {helo} ([{client.address[0]}])\r\n\tby {hostname} (meshmail) with {protocol} id {queue_id}"
        f"{' ' + what if what else ''};\r\n\t{stamp}\r\n"
    ).encode("utf-8", "replace")


@attrs.define(eq=False)
class Mx:
    """What every session shares: settings, router, deliverer, the queue runner, the
    certificate for STARTTLS, counts and rate limits."""

    section: MxSection
    router: Router
    deliverer: Deliverer
    runner: Runner
    certificate: ServerCertificate | None
    metrics: Metrics
    hostname: str
    open: int = 0
    by_client: collections.Counter[str] = attrs.field(factory=collections.Counter)
    connections: RateLimiter = attrs.field(init=False)
    messages: RateLimiter = attrs.field(init=False)
    #: Bytes of messages being received, across sessions (bounded by section.memory).
    receiving: int = 0
    sessions: set[Session] = attrs.field(factory=set)

    def __attrs_post_init__(self) -> None:
        self.connections = RateLimiter(self.section.connections_per_minute, 60.0)
        self.messages = RateLimiter(self.section.messages_per_minute, 60.0)

    def reject(self, reason: str) -> None:
        self.metrics.mx_rejections.labels(reason=reason).inc()

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one client connection, then close it."""
        client = socket_address(stream.socket.getpeername())
        now = trio.current_time()
        refusal = None
        if self.open >= self.section.max_sessions or self.by_client[client[0]] >= self.section.max_sessions_per_client:
            refusal, reason = BUSY, "too_many_sessions"
        elif self.connections.retry_after(client[0], now) > 0:
            refusal, reason = TOO_FAST, "connection_rate"
        self.connections.fail(client[0], now)
        if refusal is not None:
            self.reject(reason)
            with trio.move_on_after(LAST_LINE_TIMEOUT):
                try:
                    await stream.send_all(bytes(refusal))
                except (trio.BrokenResourceError, OSError):
                    pass
            await trio.aclose_forcefully(stream)
            return
        self.open += 1
        self.metrics.mx_sessions.inc()
        self.by_client[client[0]] += 1
        session = Session(self, stream, Client(client, socket_address(stream.socket.getsockname())))
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            self.open -= 1
            self.metrics.mx_sessions.dec()
            self.by_client[client[0]] -= 1
            if not self.by_client[client[0]]:
                del self.by_client[client[0]]


@attrs.define(eq=False)
class Pending:
    """The open transaction: sender, accepted recipients (address, its route or the NoRoute
    of a slave that is down) and the body so far."""

    sender: mx.MailFrom
    recipients: list[tuple[str, Route | NoRoute, str]] = attrs.field(factory=list)
    body: bytearray = attrs.field(factory=bytearray)
    over_memory: bool = False


@attrs.define(eq=False)
class Session:
    mx: Mx
    stream: trio.abc.Stream
    client: Client
    id: str = attrs.field(factory=lambda: secrets.token_hex(6))
    tls: bool = False
    pending: Pending | None = None
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)

    @property
    def name(self) -> str:
        return f"smtp {self.id} from {self.client.address[0]}:{self.client.address[1]}"

    def end(self) -> None:
        """End the session now with a 421 (from another task: the node is stopping)."""
        self.scope.cancel()

    async def run(self) -> None:
        try:
            with self.scope:
                if await self._talks_first():
                    self.mx.reject("early_talker")
                    await self._say_last(EARLY_TALKER)
                    return
                section = self.mx.section
                codec = mx.MxServer(
                    hostname=self.mx.hostname,
                    tls_available=self.mx.certificate is not None,
                    max_size=section.max_message_size,
                    max_recipients=section.max_recipients,
                )
                await self._serve(codec)
            if self.scope.cancelled_caught:
                await self._say_last(SHUTTING_DOWN)
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            ssl.SSLError,
            OSError,
        ) as exc:
            log.debug("%s: connection lost: %s", self.name, exc)
        finally:
            self._drop()
            await trio.aclose_forcefully(self.stream)

    async def _talks_first(self) -> bool:
        """Wait the greeting delay; whether the client sent anything meanwhile."""
        if not self.mx.section.greeting_delay:
            return False
        with trio.move_on_after(self.mx.section.greeting_delay):
            return bool(await self.stream.receive_some(1))
        return False

    async def _serve(self, codec: mx.MxServer) -> None:
        section = self.mx.section
        while True:
            try:
                event = codec.next_event()
            except ProtocolError as exc:
                log.info("%s: %s", self.name, exc)
                self.mx.reject("protocol")
                await self.stream.send_all(codec.data_to_send() + exc.reply)
                return
            if out := codec.data_to_send():
                await self.stream.send_all(out)
            if event is None:
                timeout = section.data_timeout if self.pending and self.pending.body else section.command_timeout
                with trio.move_on_after(timeout):
                    codec.receive_data(await self.stream.receive_some(READ_SIZE))
                    continue
                self.mx.reject("timeout")
                await self._say_last(TIMED_OUT)
                return
            if isinstance(event, Closed):
                return
            await self._event(codec, event)

    async def _event(self, codec: mx.MxServer, event: mx.Event) -> None:
        if isinstance(event, StartTls):
            assert self.mx.certificate is not None
            self.stream = trio.SSLStream(self.stream, self.mx.certificate.context, server_side=True)
            await self.stream.do_handshake()
            self.tls = True
            codec.tls_started()
        elif isinstance(event, mx.Hello):
            self.client = attrs.evolve(self.client, helo=event.name)
        elif isinstance(event, mx.MailFrom):
            self._drop()
            now = trio.current_time()
            if self.mx.messages.retry_after(self.client.address[0], now) > 0:
                self.mx.reject("message_rate")
                codec.refuse(MESSAGES_TOO_FAST)
                return
            self.mx.messages.fail(self.client.address[0], now)
            self.pending = Pending(event)
            codec.accept()
        elif isinstance(event, mx.RcptTo):
            reply = await self._recipient(event)
            codec.accept() if reply is None else codec.refuse(reply)
        elif isinstance(event, mx.DataChunk):
            self._take(event.data)
        elif isinstance(event, mx.DataEnd):
            if event.refusal is not None:
                self.mx.reject("message_refused")
                self._drop()
                return
            reply = await self._message()
            codec.accept(reply) if reply.positive else codec.refuse(reply)
        elif isinstance(event, mx.Reset):
            self._drop()

    async def _recipient(self, rcpt: mx.RcptTo) -> Reply | None:
        """None to accept the recipient, else the refusal. Mail to this server's postmaster
        goes to [mx] postmaster, which replaces it in the envelope. A mailbox named twice
        (postmaster and the address it goes to, say) is accepted and kept once, as Postfix's
        duplicate filter does, so the message arrives once."""
        assert self.pending is not None
        address = rcpt.address
        if rcpt.postmaster:
            if self.mx.section.postmaster is None:
                self.mx.reject("no_postmaster")
                return NO_POSTMASTER
            address = self.mx.section.postmaster
        if _mailbox(address) in {_mailbox(known) for known, _, _ in self.pending.recipients}:
            return None
        route, protocol = resolve(self.mx.router, address)
        if isinstance(route, NoRoute):
            if route.reason in (INVALID_ADDRESS, UNKNOWN_DOMAIN):
                if rcpt.postmaster:
                    log.warning("%s: mail to postmaster refused: mx.postmaster <%s> is not in a domain of the cluster",
                                self.name, address)  # fmt: skip
                    self.mx.reject("no_postmaster")
                    return NO_POSTMASTER
                self.mx.reject("relay_denied")
                return RELAY_DENIED
            if route.reason not in _WAITS:
                self.mx.reject("no_route")
                return CANNOT_ROUTE
        elif self.mx.section.verify_recipients:
            reply = await self.mx.deliverer.verify(route, protocol, self.pending.sender.reverse_path, address)
            if reply.code >= 500:
                self.mx.reject("unknown_recipient")
                return reply
        self.pending.recipients.append((address, route, protocol))
        return None

    def _take(self, data: bytes) -> None:
        pending = self.pending
        if pending is None or pending.over_memory:
            return
        if self.mx.receiving + len(data) > self.mx.section.memory:
            pending.over_memory = True
            self.mx.receiving -= len(pending.body)
            pending.body = bytearray()
            return
        pending.body += data
        self.mx.receiving += len(data)

    def _drop(self) -> None:
        if self.pending is not None:
            self.mx.receiving -= len(self.pending.body)
            self.pending = None

    async def _message(self) -> Reply:
        """Deliver or queue the finished message; the reply to the end of DATA."""
        pending = self.pending
        assert pending is not None
        try:
            if pending.over_memory:
                self.mx.reject("memory")
                return NO_MEMORY
            queue_id = self.mx.runner.new_id()
            addresses = [address for address, _, _ in pending.recipients]
            data = received_header(self.client, self.mx.hostname, self.tls, queue_id, addresses) + bytes(pending.body)
            return await self.mx.runner.accept(queue_id, pending.sender, pending.recipients, data, self.client)
        finally:
            self._drop()

    async def _say_last(self, reply: Reply) -> None:
        with trio.move_on_after(LAST_LINE_TIMEOUT):
            try:
                await self.stream.send_all(bytes(reply))
            except (
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                ssl.SSLError,
                OSError,
            ):
                pass


__all__ = ["Mx", "Session", "Transaction", "UNREACHABLE", "received_header"]


def _mailbox(address: str) -> str:
    """The address with its domain in lower case (domains are case-blind; local parts may not be)."""
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}"
