"""One proxied client session, for any of the three protocols: the thin trio driver around a
codec's server side. Greet, feed the codec, STARTTLS with the proxy's certificate; on
credentials resolve the account to its slave, log in there (backend.py) and answer the
client with the codec's accept, reject or unavailable; then splice (splice.py).

An unknown domain and a wrong password get the same reply at the same time after the
credentials arrived (FAILURE_DELAY), so replies never tell which accounts exist.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import secrets
import ssl

import attrs
import trio

from ..config.sections import ProxySection
from ..metrics import Metrics
from ..protocols import imap, pop3, smtp
from ..protocols.common import Closed, Credentials, ProtocolError, StartTls
from ..routing import INVALID_ADDRESS, UNKNOWN_DOMAIN, NoRoute, Router
from .backend import READ_SIZE, Backend, Connector, Login, Refused, Unavailable
from .splice import Splice

log = logging.getLogger("meshmail.proxy")

#: Seconds from the credentials to a "wrong credentials" reply, whatever made it wrong.
FAILURE_DELAY = 2.0
#: NoRoute reasons that mean "no such account" to the client (answered as a wrong password);
#: the others mean "try later".
_NO_ACCOUNT = frozenset({INVALID_ADDRESS, UNKNOWN_DOMAIN})

ServerCodec = imap.ImapServer | pop3.Pop3Server | smtp.SubmissionServer


@attrs.frozen
class Kind:
    """What differs between the protocols: the route protocol, the codec's server side, the
    idle timeout's key in [proxy], and the line that turns a client away when the proxy is full."""

    protocol: str
    server: type
    idle: str
    busy: bytes


IMAP = Kind("imap", imap.ImapServer, "imap_idle", b"* BYE [UNAVAILABLE] Too many connections, try again later.\r\n")
POP3 = Kind("pop3", pop3.Pop3Server, "pop3_idle", b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n")
SUBMISSION = Kind("submission", smtp.SubmissionServer, "smtp_idle", b"421 4.7.0 Too many connections\r\n")
#: Listener name -> (its protocol, whether TLS starts at the first byte).
LISTENERS: dict[str, tuple[Kind, bool]] = {
    "imap": (IMAP, False),
    "imaps": (IMAP, True),
    "pop3": (POP3, False),
    "pop3s": (POP3, True),
    "submission": (SUBMISSION, False),
    "submissions": (SUBMISSION, True),
}


def loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@attrs.define(eq=False)
class Proxy:
    """What every session shares: the [proxy] settings, the router, the backend connector, the
    client-facing TLS context (None without proxy.cert), the metrics and the session counts."""

    section: ProxySection
    router: Router
    connector: Connector
    server_tls: ssl.SSLContext | None
    metrics: Metrics
    hostname: str = "localhost"
    open: int = 0
    by_client: collections.Counter[str] = attrs.field(factory=collections.Counter)
    failure_delay: float = FAILURE_DELAY

    async def handle(self, stream: trio.SocketStream, listener: str) -> None:
        """Serve one client connected to `listener` (a key of LISTENERS), then close it."""
        kind, tls_first = LISTENERS[listener]
        client = _address(stream.socket.getpeername())
        if self.open >= self.section.max_sessions or self.by_client[client[0]] >= self.section.max_sessions_per_client:
            self.metrics.proxy_turned_away.labels(kind.protocol).inc()
            with trio.move_on_after(1):
                await stream.send_all(kind.busy)
            await trio.aclose_forcefully(stream)
            return
        self.open += 1
        self.by_client[client[0]] += 1
        self.metrics.proxy_sessions.labels(kind.protocol).inc()
        try:
            session = Session(self, kind, stream, client, _address(stream.socket.getsockname()))
            await session.run(tls_first)
        finally:
            self.open -= 1
            self.by_client[client[0]] -= 1
            if not self.by_client[client[0]]:
                del self.by_client[client[0]]
            self.metrics.proxy_sessions.labels(kind.protocol).dec()


def _address(sockaddr: tuple) -> tuple[str, int]:
    host = sockaddr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, sockaddr[1]


@attrs.define(eq=False)
class Session:
    proxy: Proxy
    kind: Kind
    stream: trio.abc.Stream
    client: tuple[str, int]
    local: tuple[str, int]
    id: str = attrs.field(factory=lambda: secrets.token_hex(8))

    @property
    def name(self) -> str:
        return f"{self.kind.protocol} {self.id} from {self.client[0]}:{self.client[1]}"

    async def run(self, tls_first: bool) -> None:
        backend: Backend | None = None
        account = ""
        try:
            with trio.move_on_after(self.proxy.section.login_timeout):
                if tls_first:
                    await self._start_tls()
                server = self._server(tls_first)
                found = await self._until_login(server)
                if found is None:
                    return
                backend, account = found
            if backend is None:
                log.info("%s: no login within %g s", self.name, self.proxy.section.login_timeout)
                return
            await self._splice(backend, account)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as exc:
            log.debug("%s: connection lost: %s", self.name, exc)
        finally:
            if backend is not None:
                await trio.aclose_forcefully(backend.stream)
            await trio.aclose_forcefully(self.stream)

    def _server(self, tls_active: bool) -> ServerCodec:
        tls_available = self.proxy.server_tls is not None
        require = self.proxy.section.require_tls and tls_available and not loopback(self.client[0])
        return self.kind.server(
            hostname=self.proxy.hostname, tls_available=tls_available, tls_active=tls_active, require_tls=require
        )

    async def _start_tls(self) -> None:
        assert self.proxy.server_tls is not None
        self.stream = trio.SSLStream(self.stream, self.proxy.server_tls, server_side=True)
        await self.stream.do_handshake()

    async def _until_login(self, server: ServerCodec) -> tuple[Backend, str] | None:
        """Answer the client until a login succeeds (the backend and the account) or the
        session ends (None)."""
        while True:
            try:
                event = server.next_event()
            except ProtocolError as exc:
                log.info("%s: %s", self.name, exc)
                await self.stream.send_all(server.data_to_send() + exc.reply)
                return None
            if out := server.data_to_send():
                await self.stream.send_all(out)
            if event is None:
                server.receive_data(await self.stream.receive_some(READ_SIZE))
            elif isinstance(event, StartTls):
                await self._start_tls()
                server.tls_started()
            elif isinstance(event, Closed):
                return None
            elif isinstance(event, Credentials):
                found = await self._login(server, event)
                if found is not None:
                    return found

    async def _login(self, server: ServerCodec, credentials: Credentials) -> tuple[Backend, str] | None:
        """Resolve, log in at the backend, answer the client; the backend and account on success."""
        started = trio.current_time()
        account = _account(credentials.user, self.proxy.section.default_domain)
        route = self.proxy.router.resolve(account, self.kind.protocol) if account else NoRoute(UNKNOWN_DOMAIN, "")
        slave = "-"
        try:
            if isinstance(route, NoRoute):
                raise (Refused if route.reason in _NO_ACCOUNT else Unavailable)(route.reason)
            slave = route.slave
            login = Login(
                account, credentials.password, credentials.authzid, self.client, self.local, self.id,
                getattr(server, "ehlo_name", None) or "localhost",
            )  # fmt: skip
            backend = await self.proxy.connector.login(self.kind.protocol, route, login)
        except Refused as exc:
            await trio.sleep_until(started + self.proxy.failure_delay)
            self._log_login(credentials.user, slave, f"refused ({exc})", started)
            server.reject()
            return None
        except Unavailable as exc:
            self._log_login(credentials.user, slave, f"unavailable ({exc})", started)
            server.unavailable()
            return None
        self._log_login(credentials.user, slave, "ok", started)
        if isinstance(server, imap.ImapServer):
            server.accept(backend.codec.capabilities or ("IMAP4rev1",))
        else:
            server.accept()
        await self.stream.send_all(server.data_to_send() + backend.trailing)
        if trailing := server.trailing_data():
            await backend.stream.send_all(trailing)
        return backend, account

    def _log_login(self, user: str, slave: str, result: str, started: float) -> None:
        self.proxy.metrics.proxy_logins.labels(self.kind.protocol, result.split(" ", 1)[0]).inc()
        ms = round((trio.current_time() - started) * 1000)
        protocol, (host, port) = self.kind.protocol, self.client
        log.info("%s login %r from %s:%d via %s: %s in %d ms", protocol, user, host, port, slave, result, ms)

    async def _splice(self, backend: Backend, account: str) -> None:
        splice = Splice()
        began = trio.current_time()
        await splice.run(self.stream, backend.stream, getattr(self.proxy.section, self.kind.idle))
        log.info(
            "%s session of %r from %s:%d ended%s: %d bytes from the client, %d to it, %.1f s",
            self.kind.protocol, account, *self.client, " (idle)" if splice.idled_out else "",
            splice.up, splice.down, trio.current_time() - began,
        )  # fmt: skip


def _account(user: str, default_domain: str | None) -> str | None:
    """The address a login name stands for: itself with an @, else user@default_domain."""
    if "@" in user:
        return user
    return f"{user}@{default_domain}" if default_domain else None

