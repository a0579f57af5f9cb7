"""One proxied client session, for any of the three protocols: the thin driver (a task of the
proxy loop, loop.py) around a
codec's server side. Greet, feed the codec, STARTTLS with the proxy's certificate; on
credentials resolve the account to its slave, log in there (backend.py) and answer the
client with the codec's accept, reject or unavailable; then splice (splice.py).

An unknown domain and a wrong password get the same reply at the same time after the
credentials arrived (proxy.failure_delay, doubled for each recent failure of the client
address or on the account), so replies never tell which accounts exist. Past the failure
budgets (security/throttle.py) a login is refused as "try later" without asking the slave.

When the node leaves, the proxy drains: sessions may go on for proxy.drain_timeout, then each
gets its protocol's goodbye (IMAP BYE, POP3 -ERR, SMTP 421) so that its client reconnects
through another master.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
from typing import Any

import attrs

from ..config.sections import ProxySection
from ..core.address import is_loopback, socket_address
from ..metrics import Metrics
from ..protocols import imap, pop3, smtp
from ..protocols.common import Closed, Credentials, ProtocolError, StartTls
from ..routing import INVALID_ADDRESS, UNKNOWN_DOMAIN, NoRoute, Router
from ..security.throttle import LoginThrottle
from . import loop
from .backend import Backend, Connector, Login, Refused, Unavailable
from .certs import ServerCertificate
from .splice import Splice
from .streams import READ_SIZE, SocketStream, Stream, TlsStream

log = logging.getLogger("meshmail.proxy")

#: The longest a "wrong credentials" reply waits, however many failures came before.
MAX_FAILURE_DELAY = 15.0
#: A session that ends gets this long to take its last line.
GOODBYE_TIMEOUT = 1.0
#: Backend connect times kept for the /status percentiles.
CONNECT_SAMPLES = 1000
#: NoRoute reasons that mean "no such account" to the client (answered as a wrong password);
#: the others mean "try later".
_NO_ACCOUNT = frozenset({INVALID_ADDRESS, UNKNOWN_DOMAIN})

#: Session ids: this process's random prefix and a count (unique across restarts, no syscall each).
_PREFIX = os.urandom(4).hex() + "-"
_NUMBERS = itertools.count(1)

ServerCodec = imap.ImapServer | pop3.Pop3Server | smtp.SubmissionServer


@attrs.frozen
class Kind:
    """What differs between the protocols: the route protocol, the codec's server side, the
    idle timeout's key in [proxy], and the lines that turn a client away when the proxy is
    full, end a session with no login in time, and end one when the proxy drains."""

    protocol: str
    server: type
    idle: str
    busy: bytes
    timed_out: bytes
    goodbye: bytes


IMAP = Kind(
    "imap", imap.ImapServer, "imap_idle",
    b"* BYE [UNAVAILABLE] Too many connections, try again later.\r\n",
    b"* BYE Disconnected for inactivity.\r\n",
    b"* BYE Server shutting down, reconnect to continue.\r\n",
)  # fmt: skip
POP3 = Kind(
    "pop3", pop3.Pop3Server, "pop3_idle",
    b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n",
    b"-ERR Disconnected for inactivity.\r\n",
    b"-ERR [SYS/TEMP] Server shutting down, reconnect to continue.\r\n",
)  # fmt: skip
SUBMISSION = Kind(
    "submission", smtp.SubmissionServer, "smtp_idle",
    b"421 4.7.0 Too many connections\r\n",
    b"421 4.4.2 Timeout exceeded, closing connection\r\n",
    b"421 4.3.2 Service shutting down, reconnect to continue\r\n",
)  # fmt: skip
#: How often a drain looks whether sessions are left.
DRAIN_POLL = 0.1
#: Listener name -> (its protocol, whether TLS starts at the first byte).
LISTENERS: dict[str, tuple[Kind, bool]] = {
    "imap": (IMAP, False),
    "imaps": (IMAP, True),
    "pop3": (POP3, False),
    "pop3s": (POP3, True),
    "submission": (SUBMISSION, False),
    "submissions": (SUBMISSION, True),
}


@attrs.define(eq=False)
class Proxy:
    """What every session shares: the [proxy] settings, the router, the backend connector, the
    certificate clients see (None without proxy.cert), the metrics, the open sessions and
    the failed-login budgets."""

    section: ProxySection
    router: Router
    connector: Connector
    certificate: ServerCertificate | None
    metrics: Metrics
    hostname: str = "localhost"
    open: int = 0
    by_client: collections.Counter[str] = attrs.field(factory=collections.Counter)
    sessions: set[Session] = attrs.field(factory=set)
    throttle: LoginThrottle = attrs.field(init=False)
    #: The latest backend connect times (seconds), for the /status percentiles.
    connect_times: collections.deque[float] = attrs.field(factory=lambda: collections.deque(maxlen=CONNECT_SAMPLES))
    _series: dict[tuple[int, tuple[str, ...]], Any] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        section = self.section
        self.throttle = LoginThrottle(section.failures_per_client, section.failures_per_account, section.failure_window)

    def series(self, metric: Any, *labels: str) -> Any:
        """metric.labels(*labels), looked up once (prometheus_client takes a lock each time)."""
        key = (id(metric), labels)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = metric.labels(*labels)
        return found

    def connected(self, seconds: float) -> None:
        """Count a backend connect that took `seconds` (the connector calls it)."""
        self.connect_times.append(seconds)
        self.metrics.proxy_backend_connect.observe(seconds)

    def failure_delay(self, failures: int) -> float:
        """Seconds from the credentials to a refusal after `failures` recent ones."""
        delay = self.section.failure_delay
        return min(delay * 2 ** min(failures, 16), max(delay, MAX_FAILURE_DELAY))

    async def drain(self, timeout: float) -> None:
        """Let open sessions go on for up to `timeout` seconds, then end the rest with their
        protocol's goodbye; returns once all have ended."""
        with loop.move_on_after(timeout):
            while self.sessions:
                await loop.sleep(DRAIN_POLL)
        for session in list(self.sessions):
            session.end()
        while self.sessions:
            await loop.sleep(DRAIN_POLL)

    async def handle(
        self, stream: SocketStream, listener: str, client: tuple[str, int], local: tuple[str, int] | None = None
    ) -> None:
        """Serve one client, from `client`, connected to `listener` (a key of LISTENERS) at
        `local` (None: ask the socket), then close it."""
        kind, tls_first = LISTENERS[listener]
        if local is None:
            try:
                local = socket_address(stream.socket.getsockname())
            except OSError:  # gone already
                stream.close()
                return
        if self.open >= self.section.max_sessions or self.by_client[client[0]] >= self.section.max_sessions_per_client:
            self.series(self.metrics.proxy_turned_away, kind.protocol).inc()
            with loop.move_on_after(1):
                try:
                    await stream.send_all(kind.busy)
                except OSError:
                    pass
            stream.close()
            return
        self.open += 1
        self.by_client[client[0]] += 1
        self.series(self.metrics.proxy_sessions, kind.protocol).inc()
        session = Session(self, kind, stream, client, local)
        self.sessions.add(session)
        try:
            await session.run(tls_first)
        finally:
            self.sessions.discard(session)
            self.open -= 1
            self.by_client[client[0]] -= 1
            if not self.by_client[client[0]]:
                del self.by_client[client[0]]
            self.series(self.metrics.proxy_sessions, kind.protocol).dec()


@attrs.define(eq=False)
class Session:
    proxy: Proxy
    kind: Kind
    stream: Stream
    client: tuple[str, int]
    local: tuple[str, int]
    id: str = attrs.field(factory=lambda: f"{_PREFIX}{next(_NUMBERS):x}")
    #: Cancelled to end the session early (a drain); the session then says its goodbye.
    scope: loop.CancelScope = attrs.field(factory=loop.CancelScope)

    @property
    def name(self) -> str:
        return f"{self.kind.protocol} {self.id} from {self.client[0]}:{self.client[1]}"

    def end(self) -> None:
        """End the session now with the protocol's goodbye (from another task)."""
        self.scope.cancel()

    async def run(self, tls_first: bool) -> None:
        backend: Backend | None = None
        try:
            with self.scope:
                with loop.move_on_after(self.proxy.section.login_timeout):
                    if tls_first:
                        await self._start_tls()
                    server = self._server(tls_first)
                    found = await self._until_login(server)
                    if found is None:
                        return
                    backend, account = found
                if backend is None:
                    log.info("%s: no login within %g s", self.name, self.proxy.section.login_timeout)
                    await self._say_last(self.kind.timed_out)
                    return
                await self._splice(backend, account)
            if self.scope.cancelled_caught:
                log.info("%s: ended by the drain", self.name)
                await self._say_last(self.kind.goodbye)
        except OSError as exc:  # ssl.SSLError is one
            log.debug("%s: connection lost: %s", self.name, exc)
        finally:
            if backend is not None:
                backend.stream.close()
            self.stream.close()

    async def _say_last(self, line: bytes) -> None:
        """Tell the client why the session ends, if it listens (a TLS stream cut mid-write
        can no longer say anything)."""
        with loop.move_on_after(GOODBYE_TIMEOUT):
            try:
                await self.stream.send_all(line)
            except OSError:
                pass

    def _server(self, tls_active: bool) -> ServerCodec:
        tls_available = self.proxy.certificate is not None
        require = self.proxy.section.require_tls and tls_available and not is_loopback(self.client[0])
        return self.kind.server(
            hostname=self.proxy.hostname, tls_available=tls_available, tls_active=tls_active, require_tls=require
        )

    async def _start_tls(self) -> None:
        assert self.proxy.certificate is not None
        assert isinstance(self.stream, SocketStream)
        self.stream = TlsStream(self.stream, self.proxy.certificate.context, server_side=True)
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
        """Resolve, log in at the backend, answer the client; the backend and account on success.

        A refusal counts against the budgets when it is known. (Counting every login as failed
        until it succeeds would stop parallel guessing a little sooner, but it also refuses the
        many simultaneous logins of one busy address, as an office behind NAT: guessers are
        held by the failure delay and the per-account budget instead.)"""
        proxy, started, host = self.proxy, loop.now(), self.client[0]
        account = _account(credentials.user, proxy.section.default_domain)
        key = (account or credentials.user).lower()
        if proxy.throttle.retry_after(key, host, started) > 0:
            await loop.sleep_until(started + proxy.failure_delay(proxy.throttle.failures(key, host, started)))
            self._log_login(credentials.user, "-", "limited (too many failed logins)", started)
            server.unavailable()
            return None
        failures = proxy.throttle.failures(key, host, started)
        route = proxy.router.resolve(account, self.kind.protocol) if account else NoRoute(UNKNOWN_DOMAIN, "")
        slave = "-"
        try:
            if isinstance(route, NoRoute):
                raise (Refused if route.reason in _NO_ACCOUNT else Unavailable)(route.reason)
            slave = route.slave
            login = Login(
                account, credentials.password, credentials.authzid, self.client, self.local, self.id,
                getattr(server, "ehlo_name", None) or "localhost",
            )  # fmt: skip
            backend = await proxy.connector.login(self.kind.protocol, route, login)
        except Refused as exc:
            proxy.throttle.fail(key, host, loop.now())
            await loop.sleep_until(started + proxy.failure_delay(failures))
            self._log_login(credentials.user, slave, f"refused ({exc})", started)
            server.reject()
            return None
        except Unavailable as exc:
            self._log_login(credentials.user, slave, f"unavailable ({exc})", started)
            server.unavailable()
            return None
        proxy.throttle.remember(key, host)
        if isinstance(server, imap.ImapServer):
            server.accept(backend.codec.capabilities or ("IMAP4rev1",))
        else:
            server.accept()
        try:
            await self.stream.send_all(server.data_to_send() + backend.trailing)
            if trailing := server.trailing_data():
                await backend.stream.send_all(trailing)
        except BaseException:  # the session ends here: the backend connection with it
            backend.stream.close()
            raise
        finally:  # the client has its answer first: the log line costs it no time
            self._log_login(credentials.user, slave, "ok", started)
        return backend, account

    def _log_login(self, user: str, slave: str, result: str, started: float) -> None:
        proxy = self.proxy
        proxy.series(proxy.metrics.proxy_logins, self.kind.protocol, result.split(" ", 1)[0]).inc()
        ms = round((loop.now() - started) * 1000)
        protocol, (host, port) = self.kind.protocol, self.client
        log.info("%s login %r from %s:%d via %s: %s in %d ms", protocol, user, host, port, slave, result, ms)

    async def _splice(self, backend: Backend, account: str) -> None:
        splice = Splice()
        began = loop.now()
        try:
            await splice.run(self.stream, backend.stream, getattr(self.proxy.section, self.kind.idle))
        finally:
            proxy = self.proxy
            proxy.series(proxy.metrics.proxy_bytes, "from_clients").inc(splice.up)
            proxy.series(proxy.metrics.proxy_bytes, "to_clients").inc(splice.down)
            log.info(
                "%s session of %r from %s:%d ended%s: %d bytes from the client, %d to it, %.1f s",
                self.kind.protocol, account, *self.client, " (idle)" if splice.idled_out else "",
                splice.up, splice.down, loop.now() - began,
            )  # fmt: skip


def _account(user: str, default_domain: str | None) -> str | None:
    """The address a login name stands for: itself with an @, else user@default_domain."""
    if "@" in user:
        return user
    return f"{user}@{default_domain}" if default_domain else None
