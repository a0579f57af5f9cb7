"""Logging in at a slave's mail service for a client: connect to the Route's endpoint (a few
tries), TLS as the endpoint says (plain, starttls, tls) with the slave's certificate checked,
the client's address passed as the endpoint asks (IMAP ID, XCLIENT, PROXY v2), then the
client's credentials through the codec's client side. Nothing here faces the client.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from ..config.sections import ProxySection, TlsSection
from ..protocols import imap, pop3, proxyv2, smtp
from ..protocols.common import LoggedIn, LoginRefused, ProtocolError, StartTls
from ..routing import Route
from . import loop, streams
from .streams import READ_SIZE

log = logging.getLogger("meshmail.proxy")

#: Connection attempts to a backend, the pause between them, and the time all may take.
CONNECT_TRIES = 3
CONNECT_RETRY_DELAY = 1.0
CONNECT_DEADLINE = 10.0
#: The time a backend has to answer the whole login once connected.
LOGIN_DEADLINE = 20.0

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

    stream: Any
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


@attrs.frozen
class Runtime:
    """The event loop a Connector runs on: trio (the MX) or the proxy's own loop (loop.py),
    which offer the same calls under these names."""

    now: Callable[[], float]
    sleep: Callable[[float], Awaitable[None]]
    move_on_after: Callable[[float], Any]
    fail_after: Callable[[float], Any]
    too_slow: type[Exception]
    #: A connected stream to an IP address: (family, (host, port)) -> stream.
    connect_ip: Callable[[int, tuple[str, int]], Awaitable[Any]]
    #: TLS as the client over a stream: (stream, context, server_hostname) -> stream.
    wrap_tls: Callable[[Any, ssl.SSLContext, str], Any]
    #: Addresses of a host name, off the loop: (host, port) -> [(family, sockaddr)].
    lookup: Callable[[str, int], Awaitable[list[tuple[int, tuple]]]]
    close: Callable[[Any], Awaitable[None]]
    #: What a broken connection raises besides OSError.
    broken: tuple[type[BaseException], ...]


async def _trio_connect(family: int, address: tuple[str, int]) -> trio.SocketStream:
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def _trio_lookup(host: str, port: int) -> list[tuple[int, tuple]]:
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


async def _loop_lookup(host: str, port: int) -> list[tuple[int, tuple]]:
    infos = await loop.run_in_thread(lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


async def _loop_close(stream: streams.Stream) -> None:
    stream.close()


TRIO = Runtime(
    trio.current_time, trio.sleep, trio.move_on_after, trio.fail_after, trio.TooSlowError, _trio_connect,
    lambda stream, context, host: trio.SSLStream(stream, context, server_hostname=host),
    _trio_lookup, trio.aclose_forcefully, (trio.BrokenResourceError, trio.ClosedResourceError),
)  # fmt: skip
LOOP = Runtime(
    lambda: loop.now(), loop.sleep, loop.move_on_after, loop.fail_after, loop.TooSlowError, streams.connect,
    lambda stream, context, host: streams.TlsStream(stream, context, server_side=False, server_hostname=host),
    _loop_lookup, _loop_close, (),
)  # fmt: skip


@attrs.define(eq=False)
class Connector:
    """Opens backend connections; `contexts(slave)` is the TLS context that checks a slave.
    The proxy's sessions use it on the proxy loop (runtime LOOP), the MX on trio (TRIO)."""

    contexts: Callable[[str], ssl.SSLContext]
    #: Told the seconds each successful connect took (tries included), for the metrics.
    connected: Callable[[float], None] = lambda seconds: None
    runtime: Runtime = TRIO
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
        runtime = self.runtime
        stream = await self.connect(route)
        try:
            with runtime.fail_after(self.login_deadline):
                stream = await self.prepare(stream, route, login.client, login.local)
                return await self._login(stream, codec, route)
        except (Refused, Unavailable):
            await runtime.close(stream)
            raise
        except runtime.too_slow:
            await runtime.close(stream)
            raise Unavailable(f"no login answer within {self.login_deadline:g} s") from None
        except (*runtime.broken, OSError, ProtocolError) as exc:
            await runtime.close(stream)
            raise Unavailable(f"login broke off: {exc}") from None

    async def connect(self, route: Route) -> Any:
        """A TCP connection to the route's endpoint (a few tries); raises Unavailable."""
        host, port = route.endpoint
        why = ""
        runtime = self.runtime
        began = runtime.now()
        with runtime.move_on_after(self.connect_deadline):
            for attempt in range(self.tries):
                if attempt:
                    await runtime.sleep(self.retry_delay)
                try:
                    stream = await self._open(host, port)
                except OSError as exc:
                    why = exc.strerror or str(exc)
                else:
                    self.connected(runtime.now() - began)
                    return stream
        raise Unavailable(f"cannot connect to {route.slave} at {host}:{port}: {why or 'timed out'}")

    async def _open(self, host: str, port: int) -> Any:
        """A TCP connection to `host`: an IP address directly (one connect, no resolver: the
        common case costs the least CPU per login), a name through the resolver, off the loop,
        trying its addresses in turn."""
        family = _ip_family(host)
        if family is not None:
            return await self.runtime.connect_ip(family, (host, port))
        error: OSError = OSError(f"{host} has no address")
        for family, sockaddr in await self.runtime.lookup(host, port):
            try:
                return await self.runtime.connect_ip(family, sockaddr)
            except OSError as exc:
                error = exc
        raise error

    async def prepare(self, stream: Any, route: Route, client: tuple[str, int], local: tuple[str, int]) -> Any:
        """`stream` made ready for the protocol: the PROXY v2 header sent where the endpoint
        asks for it, TLS started on a TLS endpoint."""
        if route.client_address == "proxy":
            await stream.send_all(proxyv2.build(client, local))
        if route.transport == "tls":
            stream = await self.start_tls(stream, route)
        return stream

    async def _login(self, stream: Any, codec: BackendCodec, route: Route) -> Backend:
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

    async def start_tls(self, stream: Any, route: Route) -> Any:
        """TLS over `stream` with the slave's certificate checked (as `contexts` says)."""
        wrapped = self.runtime.wrap_tls(stream, self.contexts(route.slave), route.endpoint[0])
        await wrapped.do_handshake()
        return wrapped


@functools.lru_cache(maxsize=1024)  # the few endpoints of a cluster, at every login
def _ip_family(host: str) -> int | None:
    """AF_INET or AF_INET6 for an IP address, None for a name."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


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
