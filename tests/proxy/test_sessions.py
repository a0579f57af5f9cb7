"""The proxy's sessions in one process, in front of a real Dovecot: imaplib and poplib log in over
STARTTLS and TLS ports, a whole IMAP session runs through the splice, Dovecot logs the client's
own address (ID), an unknown domain and a wrong password get the same reply, a stopped Dovecot
gives UNAVAILABLE, and bad input ends a session while the proxy keeps serving."""

from __future__ import annotations

import imaplib
import poplib
import socket
import ssl
import time
from collections.abc import Iterator

import pytest
import trio
from helpers import mailkit
from helpers.config import minimal_config

from meshmail.config import loads
from meshmail.gossip.member import MemberInfo
from meshmail.gossip.messages import State
from meshmail.metrics import Metrics
from meshmail.nodemeta import Endpoint, NodeMeta
from meshmail.proxy.backend import LOOP, Connector, backend_contexts
from meshmail.proxy.certs import ServerCertificate
from meshmail.proxy.service import ProxyReport, ProxyThread
from meshmail.proxy.session import Proxy
from meshmail.routing import Router

from .harness import CLIENT_HOST, DomainMap, Imap, ImapTls, serving


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory) -> Iterator[mailkit.Dovecot]:
    root = tmp_path_factory.mktemp("proxy")
    users = {"ann@one.example": "secret-1", "zed@one.example": "secret-z"}
    with mailkit.dovecot(root / "d1", users, name="d1", trusted_networks=["127.0.0.0/8"]) as instance:
        yield instance


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    cert, key = mailkit.write_certificate(tmp_path_factory.mktemp("cert"))
    return str(cert), str(key)


def slave_member(dovecot: mailkit.Dovecot) -> MemberInfo:
    found = dovecot.endpoints()
    endpoints = {
        "imap": Endpoint(found["imap"], "starttls", "id"),
        "pop3": Endpoint(found["pop3"], "starttls"),
    }
    return MemberInfo(
        "s1",
        "127.0.0.1",
        7946,
        NodeMeta(role="slave", endpoints=endpoints).encode(),
        1,
        State.ALIVE,
        0,
    )


@pytest.fixture(scope="module")
def proxy_ports(dovecot, certificate) -> Iterator[dict[str, int]]:
    """The proxy's six listeners on 127.0.0.1, served by a proxy loop in a thread."""
    cert, key = certificate
    extra = f'[proxy]\ncert = "{cert}"\nkey = "{key}"\ndefault_domain = "one.example"\n'
    extra += f'backend_cas = {{ s1 = "{dovecot.cafile}" }}\nmax_sessions_per_client = 8\nfailure_delay = 0.2\n'
    section = loads(minimal_config(extra=extra)).proxy
    certificate = ServerCertificate(cert, key)
    closed = MemberInfo("s2", "127.0.0.1", 7946, NodeMeta(role="slave", endpoints={
        "imap": Endpoint(f"127.0.0.1:{mailkit.free_ports(1)[0]}", "starttls")
    }).encode(), 1, State.ALIVE, 0)  # fmt: skip
    domains = DomainMap({"one.example": "s1", "gone.example": "s9", "closed.example": "s2"})
    router = Router(domains, {"s1": slave_member(dovecot), "s2": closed})
    connector = Connector(backend_contexts(section, None, "/"), runtime=LOOP, retry_delay=0.1)
    metrics = Metrics()
    proxy = Proxy(section, router, connector, certificate, metrics, hostname="m1")
    with serving(proxy) as ports:
        ports["_report"] = ProxyReport(proxy, metrics)  # type: ignore[assignment]
        ports["_proxy"] = proxy  # type: ignore[assignment]
        yield ports


def client_context(certificate) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certificate[0])


def test_imap_starttls_session_select_fetch_append(proxy_ports, certificate, dovecot):
    client = Imap("127.0.0.1", proxy_ports["imap"], timeout=10)
    client.starttls(client_context(certificate))
    assert client.login("ann@one.example", "secret-1")[0] == "OK"
    message = b"From: x@y.example\r\nSubject: through the proxy\r\n\r\n" + b"body line\r\n" * 2000
    assert client.append("INBOX", None, None, message)[0] == "OK"  # a literal of about 22 kB
    status, data = client.select("INBOX")
    assert status == "OK" and int(data[0]) >= 1
    status, fetched = client.fetch(data[0], "(BODY[HEADER.FIELDS (SUBJECT)])")
    assert status == "OK" and b"through the proxy" in fetched[0][1]
    assert client.logout()[0] == "BYE"
    deadline = time.monotonic() + 5
    while f"rip={CLIENT_HOST}" not in dovecot.log_tail():  # the ID fields reached Dovecot
        assert time.monotonic() < deadline, dovecot.log_tail()
        time.sleep(0.05)


def test_imaps_and_a_bare_user_name_with_the_default_domain(proxy_ports, certificate):
    client = ImapTls(
        "127.0.0.1",
        proxy_ports["imaps"],
        ssl_context=client_context(certificate),
        timeout=10,
    )
    assert client.login("zed", "secret-z")[0] == "OK"
    assert client.select("INBOX")[0] == "OK"
    client.logout()


def login_reply(port: int, certificate, user: str, password: str) -> str:
    client = Imap("127.0.0.1", port, timeout=10)
    client.starttls(client_context(certificate))
    try:
        client.login(user, password)
    except imaplib.IMAP4.error as exc:
        return str(exc)
    finally:
        client.shutdown()
    return "OK"


def test_unknown_domain_and_wrong_password_answer_alike(proxy_ports, certificate):
    wrong = login_reply(proxy_ports["imap"], certificate, "ann@one.example", "wrong")
    unknown = login_reply(proxy_ports["imap"], certificate, "ann@nowhere.example", "secret-1")
    assert wrong == unknown == "b'[AUTHENTICATIONFAILED] Authentication failed.'"


@pytest.mark.parametrize("user", ["x@gone.example", "x@closed.example"])
def test_a_slave_not_in_the_cluster_or_not_listening_is_unavailable(proxy_ports, certificate, user):
    assert login_reply(proxy_ports["imap"], certificate, user, "pw") == (
        "b'[UNAVAILABLE] Temporary server failure, try again later.'"
    )


def test_pop3_over_stls_and_pop3s(proxy_ports, certificate):
    client = poplib.POP3("127.0.0.1", proxy_ports["pop3"], timeout=10)
    client.stls(client_context(certificate))
    client.user("ann@one.example")
    try:
        answer = client.pass_("secret-1")
    except poplib.error_proto as exc:
        # Dovecot may still hold the mailbox the IMAP session of the test before just closed
        # ([IN-USE] there, passed on as [SYS/TEMP]: try again later); a client retries.
        assert b"[SYS/TEMP]" in exc.args[0], exc
        time.sleep(1)
        client = poplib.POP3("127.0.0.1", proxy_ports["pop3"], timeout=10)
        client.stls(client_context(certificate))
        client.user("ann@one.example")
        answer = client.pass_("secret-1")
    assert answer.startswith(b"+OK")
    assert client.stat()[0] >= 1  # the message appended over IMAP
    client.quit()
    secure = poplib.POP3_SSL(
        "127.0.0.1",
        proxy_ports["pop3s"],
        context=client_context(certificate),
        timeout=10,
    )
    secure.user("zed@one.example")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Authentication failed"):
        secure.pass_("wrong")
    secure.quit()


def exchange(port: int, data: bytes, wait: float) -> tuple[bytes, bool]:
    """Send `data` after the greeting; what came back within `wait` seconds, and whether the
    proxy then closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.recv(4096)
        received = b""
        try:
            sock.sendall(data)
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:  # closed with our bytes unread
            return received, True
        except TimeoutError:
            return received, False
        return received, True


#: Input a session refuses: garbage and an endless line end it, a huge literal is refused when
#: announced (the client never gets to send it) and the session goes on.
BAD_INPUT = {
    "garbage": b"\x00\xff" * 50 + b"\r\n" * 20,
    "a long line": b"A" * 100_000 + b"\r\n",
    "a huge literal": b"a LOGIN {4294967295}\r\n" * 2,
}
ERRORS = {"imap": (b"BAD", b"BYE"), "pop3": (b"-ERR",), "submission": (b"500", b"421")}


@pytest.mark.parametrize("what", BAD_INPUT)
@pytest.mark.parametrize("listener", ["imap", "pop3", "submission"])
def test_bad_input_ends_the_session_and_the_proxy_keeps_serving(proxy_ports, listener, what):
    port = proxy_ports[listener]
    reply, closed = exchange(port, BAD_INPUT[what], 1 if what == "a huge literal" else 10)
    assert closed == (what != "a huge literal")
    assert any(error in reply for error in ERRORS[listener]), reply
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # still greeting
        assert sock.recv(4096)[:4] in (b"* OK", b"+OK ", b"220 ")


def test_status_block(proxy_ports):
    block = proxy_ports["_report"].summary()
    assert block["logins"]["ok"] >= 1 and block["logins"]["refused"] >= 1
    assert set(block["sessions"]) <= {"imap", "pop3", "submission"}


async def test_a_listener_that_cannot_accept_ends_the_proxy_loop_and_the_service_sees_it(proxy_ports):
    """A fault of the proxy loop (here a listener whose accept() fails for good) must not leave
    a master that no longer serves: the node's side of the thread raises, and the supervisor
    restarts the proxy service."""
    proxy = proxy_ports["_proxy"]
    broken = socket.socket()
    broken.bind(("127.0.0.1", 0))  # never listening: accept() fails with EINVAL
    running = ProxyThread(proxy, {"imap": broken}, trio.lowlevel.current_trio_token())
    try:
        with pytest.raises(RuntimeError, match="the proxy loop ended: OSError"), trio.fail_after(10):
            await running.watch()
    finally:
        running.stop()
    assert broken.fileno() == -1  # closed with the loop
