"""Handing mail to a slave: one connection per attempt to the slave's LMTP endpoint (or SMTP
where it publishes only that), the client's address passed as the endpoint asks (XCLIENT,
PROXY v2; XFORWARD where a later delivery is offered it), the message streamed through the
DeliveryClient codec, one reply per recipient back. Where the endpoint takes no client
address, sessions are kept open for a few seconds and used again. Also the recipient check
at RCPT time (RCPT, then RSET), its answers kept for a minute.

Nothing here decides what a reply means for the message (session.py answers the client,
runner.py settles the queue).
"""

from __future__ import annotations

import collections
import logging
import ssl
from collections.abc import Callable

import attrs
import trio

from ..core.address import Address
from ..gossip.messages import State
from ..protocols import lmtp
from ..protocols.common import Closed, ProtocolError, StartTls
from ..protocols.smtp import Reply, Xclient
from ..proxy.backend import READ_SIZE, Connector, Unavailable
from ..routing import NO_ENDPOINT, SLAVE_UNKNOWN, NoRoute, Route, Router

log = logging.getLogger("meshmail.mta")

#: The reply every recipient gets when the slave cannot be reached or breaks off.
UNREACHABLE = Reply(451, "4.4.1", "The slave's mail service cannot be reached now")
#: How long the answer of a recipient check is kept, and how many are kept.
VERIFY_TTL = 60.0
VERIFY_CACHE = 10_000
#: Bytes of the message handed to the codec at once.
CHUNK = 256 * 1024
#: Idle sessions kept per endpoint that takes no client address, and the seconds one may stay
#: idle (Postfix's LMTP client keeps its sessions 2 s): in-line deliveries and recipient
#: checks then skip the connect, greeting and LHLO.
POOL = 20
POOL_IDLE = 5.0


#: The queue of notices for senders outside the cluster, delivered to [mx] smarthost over SMTP
#: (no node has this name: "@" is not allowed in one).
SMARTHOST = "@smarthost"
#: The smarthost's transport: STARTTLS when it offers it, plain text otherwise.
MAY_STARTTLS = "may-starttls"


def smarthost_route(address: Address | None) -> tuple[Route | NoRoute, str]:
    """The route and protocol of the SMARTHOST queue (a NoRoute without a smarthost: what
    waits there then waits until one is configured, or expires)."""
    if address is None:
        return NoRoute(SLAVE_UNKNOWN, "no [mx] smarthost is set", SMARTHOST), "smtp"
    return Route(SMARTHOST, (address.host, address.port), State.ALIVE, MAY_STARTTLS), "smtp"


def smarthost_context(verify: bool, cafile: str | None = None) -> ssl.SSLContext:
    """The TLS context for the smarthost's STARTTLS: `cafile` (else the system's CAs) and its
    host name, or no check at all without `verify`."""
    context = ssl.create_default_context(cafile=cafile)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def resolve(router: Router, address: str) -> tuple[Route | NoRoute, str]:
    """The route of `address` for delivery and its protocol: the slave's LMTP endpoint, or its
    SMTP endpoint where it publishes no LMTP."""
    return _preferred(lambda protocol: router.resolve(address, protocol))


def route_to(router: Router, slave: str, *, unprobed: bool = False) -> tuple[Route | NoRoute, str]:
    """`resolve` for the mail kept for `slave` (`unprobed`: see Router.route_to)."""
    return _preferred(lambda protocol: router.route_to(slave, protocol, unprobed=unprobed))


def _preferred(lookup: Callable[[str], Route | NoRoute]) -> tuple[Route | NoRoute, str]:
    route = lookup("lmtp")
    if isinstance(route, NoRoute) and route.reason == NO_ENDPOINT:
        smtp_route = lookup("smtp")
        if not (isinstance(smtp_route, NoRoute) and smtp_route.reason == NO_ENDPOINT):
            return smtp_route, "smtp"
    return route, "lmtp"


@attrs.frozen
class Client:
    """Who gave us the message: passed on to the slave as its endpoint asks (port 0: not
    known, as for queued mail, whose envelope keeps the address only; then no PORT is sent)."""

    address: tuple[str, int]
    local: tuple[str, int]
    helo: str = ""


@attrs.define(eq=False)
class Deliverer:
    """Opens connections to slaves and runs transactions on them. `hostname` is said in
    LHLO/EHLO; `timeout` bounds one whole attempt."""

    connector: Connector
    hostname: str
    timeout: float = 120.0
    _verified: collections.OrderedDict[tuple[str, str], tuple[float, Reply]] = attrs.field(
        factory=collections.OrderedDict
    )
    #: Idle sessions by (slave, endpoint, transport, protocol): (idle since, session).
    _idle: dict[tuple, list[tuple[float, Connection]]] = attrs.field(factory=dict)

    async def deliver(
        self,
        route: Route,
        protocol: str,
        transaction: lmtp.Transaction,
        data: bytes,
        client: Client | None,
    ) -> list[Reply]:
        """One reply per recipient of `transaction` (UNREACHABLE for each recipient the slave
        did not answer: unreachable, or it broke off): on a connection of its own, or on an
        idle session where the endpoint takes no client address (see `shares_sessions`)."""
        if shares_sessions(route, protocol):
            return await self._pooled(route, protocol, transaction, data)
        connection = Connection(self, route, protocol, client)
        try:
            with trio.fail_after(self.timeout):
                await connection.open()
                return await connection.send(transaction, data)
        except DELIVERY_ERRORS as exc:
            _broke_off(route, exc)
            return connection.replies(transaction)
        finally:
            await connection.close()

    async def _pooled(self, route: Route, protocol: str, transaction: lmtp.Transaction, data: bytes) -> list[Reply]:
        """`deliver` on an idle session, or a new one kept afterwards. An idle session the
        slave closed meanwhile fails before the body went out: the message goes on another."""
        key = (route.slave, route.endpoint, route.transport, protocol)
        idle = self._idle.setdefault(key, [])
        while idle:
            since, connection = idle.pop()
            if trio.current_time() - since > POOL_IDLE or not connection.ready:
                await connection.close()
                continue
            try:
                with trio.fail_after(self.timeout):
                    replies = await connection.send(transaction, data)
            except DELIVERY_ERRORS as exc:
                await connection.close()
                if connection.body_sent:
                    _broke_off(route, exc)
                    return connection.replies(transaction)
                continue
            await self._keep(key, connection)
            return replies
        connection = Connection(self, route, protocol, None)
        try:
            with trio.fail_after(self.timeout):
                await connection.open()
                replies = await connection.send(transaction, data)
        except DELIVERY_ERRORS as exc:
            _broke_off(route, exc)
            await connection.close()
            return connection.replies(transaction)
        await self._keep(key, connection)
        return replies

    async def _keep(self, key: tuple, connection: Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if connection.ready and len(idle) < POOL:
            idle.append((trio.current_time(), connection))
        else:
            await connection.close()

    async def verify(self, route: Route, protocol: str, sender: str, address: str) -> Reply:
        """The slave's answer to RCPT for `address` (cached for VERIFY_TTL); UNREACHABLE when
        it cannot say."""
        key = (route.slave, address.lower())
        now = trio.current_time()
        cached = self._verified.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        transaction = lmtp.Transaction(sender, (address,), verify=True)
        [reply] = await self.deliver(route, protocol, transaction, b"", None)
        if reply is not UNREACHABLE:
            self._verified[key] = (now + VERIFY_TTL, reply)
            self._verified.move_to_end(key)
            while len(self._verified) > VERIFY_CACHE:
                self._verified.popitem(last=False)
        return reply


class Lost(Exception):
    """The slave ended the session (`reply`: its last word, if any)."""

    def __init__(self, reply: Reply | None) -> None:
        super().__init__(str(reply) if reply else "connection closed")
        self.reply = reply


@attrs.define(eq=False)
class Connection:
    """One session with a slave for transactions one after another: open, send, send...,
    close. The client's address (XCLIENT, PROXY v2, XFORWARD) is the session's, so a session
    serving several messages is opened with `client` None."""

    deliverer: Deliverer
    route: Route
    protocol: str
    client: Client | None
    stream: trio.abc.Stream | None = None
    codec: lmtp.DeliveryClient | None = None
    #: The body of the last transaction went out (before it, the slave cannot have taken it).
    body_sent: bool = False
    _data: bytes = b""
    _last: Reply | None = None  # the slave's reply when it ended the session

    @property
    def ready(self) -> bool:
        """Open and idle: it takes the next transaction."""
        return self.stream is not None and self.codec is not None and self.codec.ready

    async def open(self) -> None:
        """Connect and greet, up to the first transaction. Raises one of DELIVERY_ERRORS."""
        connector, route, client = self.deliverer.connector, self.route, self.client
        self.stream = stream = await connector.connect(route)
        local = stream.socket.getsockname()[:2]
        origin = client.address if client is not None else local
        self.stream = await connector.prepare(stream, route, origin, client.local if client else local)
        self.codec = lmtp.DeliveryClient(
            lmtp=self.protocol == "lmtp",
            ehlo_name=self.deliverer.hostname,
            starttls=route.transport in ("starttls", MAY_STARTTLS),
            require_tls=route.transport == "starttls",
            tls_active=route.transport == "tls",
            xclient=_xclient(route, client),
            xforward=_xforward(client),
        )
        await self._until(lmtp.Ready)

    async def send(self, transaction: lmtp.Transaction, data: bytes) -> list[Reply]:
        """One reply per recipient. Raises one of DELIVERY_ERRORS (replies() then says what is
        known); the session then cannot be used again."""
        assert self.codec is not None
        self.codec.send(transaction)
        self._data, self.body_sent = data, False
        done = await self._until(lmtp.Done)
        return list(done.results)

    def replies(self, transaction: lmtp.Transaction) -> list[Reply]:
        """After a failed send: the replies known, UNREACHABLE (or the slave's last refusal)
        for the rest."""
        known = self.codec.results if self.codec is not None else []
        last = self._last if isinstance(self._last, Reply) and not self._last.positive else UNREACHABLE
        return [
            known[i] if i < len(known) and known[i] is not None else last for i in range(len(transaction.recipients))
        ]

    async def close(self) -> None:
        """QUIT politely when the session is idle (briefly), then close."""
        if self.stream is None:
            return
        if self.codec is not None:
            with trio.move_on_after(CLOSE_TIMEOUT):
                try:
                    self.codec.quit()
                    await self._until(Closed)
                except (*DELIVERY_ERRORS, RuntimeError):
                    pass
        await trio.aclose_forcefully(self.stream)
        self.stream = None

    async def _until(self, wanted: type):
        codec, route = self.codec, self.route
        assert codec is not None and self.stream is not None
        while True:
            event = codec.next_event()
            if out := codec.data_to_send():
                await self.stream.send_all(out)
            if event is None:
                codec.receive_data(await self.stream.receive_some(READ_SIZE))
            elif isinstance(event, wanted):
                return event
            elif isinstance(event, StartTls):
                self.stream = await self.deliverer.connector.start_tls(self.stream, route)
                codec.tls_started()
            elif isinstance(event, lmtp.SendBody):
                self.body_sent = True
                await _send_body(self.stream, codec, self._data)
            elif isinstance(event, lmtp.Failed):
                self._last = event.reply
                raise Lost(event.reply)
            elif isinstance(event, Closed):
                raise Lost(None)


@attrs.define(eq=False)
class Lane:
    """Messages handed to one slave one after another. Where the endpoint takes no client
    address (an LMTP service with client_address "none", as Dovecot's) they share one session,
    opened again after a failure; otherwise each message gets a session of its own, which
    carries its client (XCLIENT, PROXY v2, XFORWARD)."""

    deliverer: Deliverer
    route: Route
    protocol: str
    connection: Connection | None = None

    @property
    def shared(self) -> bool:
        return shares_sessions(self.route, self.protocol)

    async def deliver(self, transaction: lmtp.Transaction, data: bytes, client: Client | None) -> list[Reply]:
        """One reply per recipient, as Deliverer.deliver."""
        if not self.shared:
            return await self.deliverer.deliver(self.route, self.protocol, transaction, data, client)
        try:
            with trio.fail_after(self.deliverer.timeout):
                if self.connection is not None and not self.connection.ready:
                    await self.close()
                if self.connection is None:
                    self.connection = Connection(self.deliverer, self.route, self.protocol, None)
                    await self.connection.open()
                return await self.connection.send(transaction, data)
        except DELIVERY_ERRORS as exc:
            _broke_off(self.route, exc)
            replies = (
                self.connection.replies(transaction) if self.connection else [UNREACHABLE] * len(transaction.recipients)
            )
            await self.close()
            return replies

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()
            self.connection = None


def shares_sessions(route: Route, protocol: str) -> bool:
    """Whether messages from different clients may share a session with this endpoint: an LMTP
    service that takes no client address (as Dovecot's), so a session carries no one's."""
    return protocol == "lmtp" and route.client_address == "none"


#: What ends an attempt at a slave: the slave's address could not be reached, the session
#: broke, timed out, or the slave ended it.
DELIVERY_ERRORS = (
    Unavailable, Lost, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError,
    ssl.SSLError, ProtocolError,
)  # fmt: skip
#: Seconds a polite QUIT may take.
CLOSE_TIMEOUT = 2.0


async def _send_body(stream: trio.abc.Stream, codec: lmtp.DeliveryClient, data: bytes) -> None:
    for start in range(0, len(data), CHUNK):
        codec.body(data[start : start + CHUNK])
        await stream.send_all(codec.data_to_send())
    codec.end_body()


def _broke_off(route: Route, error: BaseException) -> None:
    """Log why an attempt at `route` failed (the replies say only that it did): an operator
    looks here for a refused connection or a certificate that did not check out."""
    why, cause = type(error).__name__, error
    while cause is not None:  # trio's stream errors carry the reason (an SSL error, say) as their cause
        if str(cause):
            why = str(cause)
            break
        cause = cause.__cause__ or cause.__context__
    host, port = route.endpoint
    log.warning("delivery to %s at %s:%d failed: %s", route.slave, host, port, why)


def _xclient(route: Route, client: Client | None) -> Xclient | None:
    if client is None or route.client_address != "xclient":
        return None
    return Xclient(client.address[0], client.address[1] or None, client.helo or None)


def _xforward(client: Client | None) -> lmtp.Xforward | None:
    if client is None:
        return None
    return lmtp.Xforward(client.address[0], client.address[1] or None, helo=client.helo or None, proto="ESMTP")
