"""Handing mail to a slave: one connection per attempt to the slave's LMTP endpoint (or SMTP
where it publishes only that), the client's address passed as the endpoint asks (XCLIENT,
PROXY v2; XFORWARD where a later delivery is offered it), the message streamed through the
DeliveryClient codec, one reply per recipient back. Also the recipient check at RCPT time
(RCPT, then RSET), its answers kept for a minute.

Nothing here decides what a reply means for the message (session.py answers the client,
runner.py settles the queue).
"""

from __future__ import annotations

import collections
import ssl
from collections.abc import Callable

import attrs
import trio

from ..protocols import lmtp
from ..protocols.common import Closed, ProtocolError, StartTls
from ..protocols.smtp import Reply, Xclient
from ..proxy.backend import READ_SIZE, Connector, Unavailable
from ..routing import NO_ENDPOINT, NoRoute, Route, Router

#: The reply every recipient gets when the slave cannot be reached or breaks off.
UNREACHABLE = Reply(451, "4.4.1", "The slave's mail service cannot be reached now")
#: How long the answer of a recipient check is kept, and how many are kept.
VERIFY_TTL = 60.0
VERIFY_CACHE = 10_000
#: Bytes of the message handed to the codec at once.
CHUNK = 256 * 1024


def resolve(router: Router, address: str) -> tuple[Route | NoRoute, str]:
    """The route of `address` for delivery and its protocol: the slave's LMTP endpoint, or its
    SMTP endpoint where it publishes no LMTP."""
    return _preferred(lambda protocol: router.resolve(address, protocol))


def route_to(router: Router, slave: str) -> tuple[Route | NoRoute, str]:
    """`resolve` for the mail kept for `slave`."""
    return _preferred(lambda protocol: router.route_to(slave, protocol))


def _preferred(lookup: Callable[[str], Route | NoRoute]) -> tuple[Route | NoRoute, str]:
    route = lookup("lmtp")
    if isinstance(route, NoRoute) and route.reason == NO_ENDPOINT:
        smtp_route = lookup("smtp")
        if not (isinstance(smtp_route, NoRoute) and smtp_route.reason == NO_ENDPOINT):
            return smtp_route, "smtp"
    return route, "lmtp"


@attrs.frozen
class Client:
    """Who gave us the message: passed on to the slave as its endpoint asks."""

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

    async def deliver(
        self,
        route: Route,
        protocol: str,
        transaction: lmtp.Transaction,
        data: bytes,
        client: Client | None,
    ) -> list[Reply]:
        """One reply per recipient of `transaction` (UNREACHABLE for all when the slave could
        not be reached or broke off before answering them)."""
        try:
            with trio.fail_after(self.timeout):
                return await self._run(route, protocol, transaction, data, client)
        except (Unavailable, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                ssl.SSLError, ProtocolError):  # fmt: skip
            return [UNREACHABLE] * len(transaction.recipients)

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

    async def _run(
        self,
        route: Route,
        protocol: str,
        transaction: lmtp.Transaction,
        data: bytes,
        client: Client | None,
    ) -> list[Reply]:
        stream = await self.connector.connect(route)
        try:
            local = stream.socket.getsockname()[:2]
            origin = client.address if client is not None else local
            stream = await self.connector.prepare(stream, route, origin, client.local if client else local)
            codec = lmtp.DeliveryClient(
                lmtp=protocol == "lmtp",
                ehlo_name=self.hostname,
                starttls=route.transport == "starttls",
                require_tls=route.transport == "starttls",
                tls_active=route.transport == "tls",
                xclient=_xclient(route, client),
                xforward=_xforward(client),
            )
            return await self._converse(stream, codec, route, transaction, data)
        finally:
            await trio.aclose_forcefully(stream)

    async def _converse(
        self,
        stream: trio.abc.Stream,
        codec: lmtp.DeliveryClient,
        route: Route,
        transaction: lmtp.Transaction,
        data: bytes,
    ) -> list[Reply]:
        results: list[Reply] | None = None
        while True:
            event = codec.next_event()
            if out := codec.data_to_send():
                await stream.send_all(out)
            if event is None:
                codec.receive_data(await stream.receive_some(READ_SIZE))
            elif isinstance(event, StartTls):
                stream = await self.connector.start_tls(stream, route)
                codec.tls_started()
            elif isinstance(event, lmtp.Ready):
                codec.send(transaction)
            elif isinstance(event, lmtp.SendBody):
                await _send_body(stream, codec, data)
            elif isinstance(event, lmtp.Done):
                results = list(event.results)
                codec.quit()
            elif isinstance(event, lmtp.Failed):
                if out := codec.data_to_send():
                    await stream.send_all(out)
                reply = event.reply if event.reply is not None and not event.reply.positive else UNREACHABLE
                return results or [reply] * len(transaction.recipients)
            elif isinstance(event, Closed):
                if results is None:
                    return [UNREACHABLE] * len(transaction.recipients)
                return results


async def _send_body(stream: trio.abc.Stream, codec: lmtp.DeliveryClient, data: bytes) -> None:
    for start in range(0, len(data), CHUNK):
        codec.body(data[start : start + CHUNK])
        await stream.send_all(codec.data_to_send())
    codec.end_body()


def _xclient(route: Route, client: Client | None) -> Xclient | None:
    if client is None or route.client_address != "xclient":
        return None
    return Xclient(client.address[0], client.address[1], client.helo or None)


def _xforward(client: Client | None) -> lmtp.Xforward | None:
    if client is None:
        return None
    return lmtp.Xforward(client.address[0], client.address[1], helo=client.helo or None, proto="ESMTP")
