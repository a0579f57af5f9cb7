"""Logging in at a slave's mail service for a client: connect to the Route's endpoint (a few
tries), TLS as the endpoint says (plain, starttls, tls) with the slave's certificate checked,
the client's address passed as the endpoint asks (IMAP ID, XCLIENT, PROXY v2), then the
client's credentials through the codec's client side. Nothing here faces the client.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Callable

import attrs
import trio

from ..config.sections import ProxySection, TlsSection
from ..protocols import imap, pop3, proxyv2, smtp
from ..protocols.common import LoggedIn, LoginRefused, ProtocolError, StartTls
from ..routing import Route

log = logging.getLogger("meshmail.proxy")

#: Connection attempts to a backend, the pause between them, and the time all may take.
CONNECT_TRIES = 3
CONNECT_RETRY_DELAY = 1.0
CONNECT_DEADLINE = 10.0
#: The time a backend has to answer the whole login once connected.
LOGIN_DEADLINE = 20.0
#: Bytes read at once from either side.
READ_SIZE = 65536

BackendCodec = imap.ImapClient | pop3.Pop3Client | smtp.SmtpClient


class Unavailable(Exception):
    """The backend could not judge the credentials (unreachable, TLS or protocol failure,
    a temporary refusal); str() says why, for the log."""


class Refused(Exception):
    """The backend judged the credentials wrong; str() is its reply, for the log."""


@attrs.frozen
class Login:
    """One login to pass on: the credentials (the password out of repr), the account as the
    backend knows it, where the client came from and where it connected, and the EHLO name
    a submission client gave."""

    account: str
    password: str = attrs.field(repr=False)
    authzid: str
    client: tuple[str, int]
    local: tuple[str, int]
    session: str
    ehlo_name: str = "localhost"


@attrs.define(eq=False)
class Backend:
    """A logged-in backend connection: the stream to splice, the codec client that logged in
    (capabilities) and what the backend sent past its login answer."""

    stream: trio.abc.Stream
    codec: BackendCodec
    trailing: bytes


def client_codec(protocol: str, route: Route, login: Login) -> BackendCodec:
    """The codec client that logs `login` in at `route` over `protocol` (imap, pop3, submission)."""
    starttls, tls = route.transport == "starttls", route.transport == "tls"
    common = dict(starttls=starttls, require_tls=starttls, tls_active=tls)
    if protocol == "imap":
        forward = imap.forwarding_id(login.client, login.local, login.session) if route.client_address == "id" else {}
        return imap.ImapClient(login.account, login.password, login.authzid, forward=forward, **common)
    if protocol == "pop3":
        return pop3.Pop3Client(login.account, login.password, **common)
    xclient = None
    if route.client_address == "xclient":
        xclient = smtp.Xclient(login.client[0], login.client[1], login.ehlo_name)
    return smtp.SmtpClient(login.account, login.password, ehlo_name=login.ehlo_name, xclient=xclient, **common)


@attrs.define(eq=False)
class Connector:
    """Opens backend connections; `contexts(slave)` is the TLS context that checks a slave."""

    contexts: Callable[[str], ssl.SSLContext]
    #: Told the seconds each successful connect took (tries included), for the metrics.
    connected: Callable[[float], None] = lambda seconds: None
    tries: int = CONNECT_TRIES
    retry_delay: float = CONNECT_RETRY_DELAY
    connect_deadline: float = CONNECT_DEADLINE
    login_deadline: float = LOGIN_DEADLINE

    async def login(self, protocol: str, route: Route, login: Login) -> Backend:
        """Log `login` in at `route`. Raises Refused (wrong credentials) or Unavailable."""
        try:
            codec = client_codec(protocol, route, login)
        except ValueError as exc:  # credentials a backend command cannot carry
            raise Refused(str(exc)) from None
        stream = await self.connect(route)
        try:
            with trio.fail_after(self.login_deadline):
                stream = await self.prepare(stream, route, login.client, login.local)
                return await self._login(stream, codec, route)
        except (Refused, Unavailable):
            await trio.aclose_forcefully(stream)
            raise
        except trio.TooSlowError:
            await trio.aclose_forcefully(stream)
            raise Unavailable(f"no login answer within {self.login_deadline:g} s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError, ProtocolError) as exc:
            await trio.aclose_forcefully(stream)
            raise Unavailable(f"login broke off: {exc}") from None

    async def connect(self, route: Route) -> trio.SocketStream:
        """A TCP connection to the route's endpoint (a few tries); raises Unavailable."""
        host, port = route.endpoint
        why = ""
        began = trio.current_time()
        with trio.move_on_after(self.connect_deadline):
            for attempt in range(self.tries):
                if attempt:
                    await trio.sleep(self.retry_delay)
                try:
                    stream = await open_stream(host, port)
                except OSError as exc:
                    why = exc.strerror or str(exc)
                else:
                    self.connected(trio.current_time() - began)
                    return stream
        raise Unavailable(f"cannot connect to {route.slave} at {host}:{port}: {why or 'timed out'}")

    async def prepare(
        self, stream: trio.abc.Stream, route: Route, client: tuple[str, int], local: tuple[str, int]
    ) -> trio.abc.Stream:
        """`stream` made ready for the protocol: the PROXY v2 header sent where the endpoint
        asks for it, TLS started on a TLS endpoint."""
        if route.client_address == "proxy":
            await stream.send_all(proxyv2.build(client, local))
        if route.transport == "tls":
            stream = await self.start_tls(stream, route)
        return stream

    async def _login(self, stream: trio.abc.Stream, codec: BackendCodec, route: Route) -> Backend:
        while True:
            event = codec.next_event()
            if out := codec.data_to_send():
                await stream.send_all(out)
            if event is None:
                codec.receive_data(await stream.receive_some(READ_SIZE))
            elif isinstance(event, StartTls):
                stream = await self.start_tls(stream, route)
                codec.tls_started()
            elif isinstance(event, LoggedIn):
                return Backend(stream, codec, codec.trailing_data())
            elif isinstance(event, LoginRefused):
                raise (Unavailable if event.temporary else Refused)(event.reply)

    async def start_tls(self, stream: trio.abc.Stream, route: Route) -> trio.SSLStream:
        """TLS over `stream` with the slave's certificate checked (as `contexts` says)."""
        wrapped = trio.SSLStream(stream, self.contexts(route.slave), server_hostname=route.endpoint[0])
        await wrapped.do_handshake()
        return wrapped


async def open_stream(host: str, port: int) -> trio.SocketStream:
    """A TCP connection to `host`: an IP address directly (one connect, no resolver, no
    happy-eyeballs race: the common case costs the least CPU per login), a name through
    trio.open_tcp_stream."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def backend_contexts(
    section: ProxySection | None, tls: TlsSection | None, data_dir: str
) -> Callable[[str], ssl.SSLContext]:
    """The TLS context for each slave: its proxy.backend_cas file, else proxy.backend_ca, else the
    cluster CA, else the system's CAs; none checks anything with tls_verify = false (without
    [proxy]: the cluster CA checks all). Contexts are built once per file (a bad file raises
    OSError or ssl.SSLError at once). The MX's deliveries use the same."""
    if section is not None and not section.tls_verify:
        unchecked = ssl.create_default_context()
        unchecked.check_hostname = False
        unchecked.verify_mode = ssl.CERT_NONE
        log.warning("proxy.tls_verify is false: the slaves' certificates are not checked")
        return lambda slave: unchecked
    per_slave = section.backend_cas if section is not None else {}
    default_file = (section.backend_ca if section is not None else None) or (tls.ca if tls is not None else None)
    built: dict[str | None, ssl.SSLContext] = {}

    def context_for(path: str | None) -> ssl.SSLContext:
        if path not in built:
            built[path] = ssl.create_default_context(cafile=None if path is None else os.path.join(data_dir, path))
        return built[path]

    for path in {default_file, *per_slave.values()}:
        context_for(path)
    return lambda slave: context_for(per_slave.get(slave, default_file))
