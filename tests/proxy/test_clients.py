"""Real clients through the proxy in one process, in front of a real Dovecot and Postfix: smtplib
submits over 587 (STARTTLS) and 465 to Postfix's submission service, which learns the client's own
address by XCLIENT and delivers to Dovecot; curl (its own IMAP, POP3 and SMTP code) lists, fetches
and sends over every port; a whole IMAP session with APPEND, IDLE, STORE and EXPUNGE is spliced."""

from __future__ import annotations

import imaplib
import re
import smtplib
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import mailkit
from helpers.config import minimal_config

from meshmail.config import loads
from meshmail.metrics import Metrics
from meshmail.nodemeta import Endpoint
from meshmail.proxy.backend import LOOP, Connector, backend_contexts
from meshmail.proxy.certs import ServerCertificate
from meshmail.proxy.session import Proxy
from meshmail.routing import Router

from .harness import CLIENT_HOST, DomainMap, Imap, ImapTls, serving, slave

USERS = {
    "ann@one.example": "secret-ann",
    "bob@one.example": "secret-bob",
    "curl@one.example": "secret-curl",
    "pop@one.example": "secret-pop",
    "imap@one.example": "secret-imap",
    "idle@one.example": "secret-idle",
}
#: How long mail may take from the proxy through Postfix's queue to Dovecot, and Postfix's log
#: (postlogd writes late) to show a line.
DELIVERY_TIMEOUT = 20.0
#: The subject of the message put in the INBOX of curl@ and pop@ before the curl tests fetch it.
SEEDED = "seeded for curl"
#: curl's exit code for a refused login (CURLE_LOGIN_DENIED).
CURL_LOGIN_DENIED = 67


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory) -> Iterator[mailkit.Dovecot]:
    root = tmp_path_factory.mktemp("clients")
    with mailkit.dovecot(
        root / "d1",
        USERS,
        name="d1",
        trusted_networks=["127.0.0.0/8"],
        auth_listener=True,
    ) as kit:
        yield kit


@pytest.fixture(scope="module")
def postfix(dovecot, tmp_path_factory) -> Iterator[mailkit.Postfix]:
    with mailkit.postfix(
        tmp_path_factory.mktemp("clients") / "p1",
        dovecot,
        ["one.example"],
        submission=True,
    ) as kit:
        yield kit


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> str:
    """The proxy's certificate (the file clients trust); its key beside it."""
    cert, _ = mailkit.write_certificate(tmp_path_factory.mktemp("cert"))
    return str(cert)


@pytest.fixture(scope="module")
def ports(dovecot, postfix, certificate, tmp_path_factory) -> Iterator[dict[str, int]]:
    """The proxy's six listeners; one.example is on slave s1, whose Dovecot serves IMAP and POP3
    and whose Postfix serves submission (both certificates in s1's CA file)."""
    cas = tmp_path_factory.mktemp("cas") / "s1.pem"
    cas.write_bytes(Path(dovecot.cafile).read_bytes() + Path(postfix.cafile).read_bytes())
    key = str(Path(certificate).with_name("key.pem"))
    extra = f'[proxy]\ncert = "{certificate}"\nkey = "{key}"\nbackend_cas = {{ s1 = "{cas}" }}\nfailure_delay = 0.2\n'
    section = loads(minimal_config(extra=extra)).proxy
    found = dovecot.endpoints()
    endpoints = {
        "imap": Endpoint(found["imap"], "starttls", "id"),
        "pop3": Endpoint(found["pop3"], "starttls"),
        "submission": Endpoint(postfix.submission_endpoint, "starttls", "xclient"),
    }
    router = Router(DomainMap({"one.example": "s1"}), {"s1": slave("s1", endpoints)})
    connector = Connector(backend_contexts(section, None, "/"), runtime=LOOP, retry_delay=0.1)
    proxy = Proxy(
        section,
        router,
        connector,
        ServerCertificate(certificate, key),
        Metrics(),
        hostname="m1",
    )
    with serving(proxy) as served:
        yield served


def client_context(certificate: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certificate)


def wait_for(found: Callable[[], object], what: str) -> object:
    """Poll `found()` until it is truthy and return it; fail naming `what` after DELIVERY_TIMEOUT."""
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while not (result := found()):
        assert time.monotonic() < deadline, f"no {what} after {DELIVERY_TIMEOUT:g} s"
        time.sleep(0.05)
    return result


def delivered(dovecot: mailkit.Dovecot, address: str, subject: str) -> bytes:
    """The message with `subject` once it is in `address`'s maildir."""

    def message() -> bytes | None:
        return next(
            (m for m in dovecot.mailbox(address) if f"Subject: {subject}\n".encode() in m),
            None,
        )

    return wait_for(message, f"message {subject!r} in {address}'s maildir")  # type: ignore[return-value]


def a_message(sender: str, recipient: str) -> tuple[str, bytes]:
    """A unique subject and a message carrying it."""
    subject = f"through the proxy {uuid.uuid4().hex}"
    return (
        subject,
        f"From: {sender}\r\nTo: {recipient}\r\nSubject: {subject}\r\n\r\nHello.\r\n".encode(),
    )


# --- submission with smtplib ------------------------------------------------------------------


def submission(ports, certificate: str) -> smtplib.SMTP:
    """A client on 587 from CLIENT_HOST, after STARTTLS and the second EHLO."""
    client = smtplib.SMTP("127.0.0.1", ports["submission"], "client.example", 10, (CLIENT_HOST, 0))
    client.starttls(context=client_context(certificate))
    client.ehlo()
    return client


def authenticate(client: smtplib.SMTP, user: str, password: str, mechanism: str, initial: bool = True) -> None:
    """AUTH with `mechanism` (PLAIN or LOGIN), the first response on the AUTH line when `initial`;
    raises SMTPAuthenticationError with the reply otherwise."""
    client.user, client.password = user, password
    client.auth(
        mechanism,
        getattr(client, f"auth_{mechanism.lower()}"),
        initial_response_ok=initial,
    )


def send(client: smtplib.SMTP, sender: str, recipient: str, message: bytes) -> str:
    """One mail transaction; the queue id Postfix's answer to DATA names."""
    assert client.mail(sender)[0] == 250
    assert client.rcpt(recipient)[0] == 250
    code, answer = client.data(message)
    assert code == 250, answer
    return re.search(rb"queued as (\w+)", answer)[1].decode()  # type: ignore[index]


def logged(postfix: mailkit.Postfix, text: str) -> str:
    return wait_for(
        lambda: text in postfix.log.read_text(errors="replace"),
        f"{text!r} in {postfix.log}",
    )


@pytest.mark.parametrize(("mechanism", "initial"), [("PLAIN", True), ("LOGIN", False)])
def test_submission_over_starttls_reaches_the_mailbox_with_the_clients_address(
    ports, certificate, dovecot, postfix, mechanism, initial
):
    client = submission(ports, certificate)
    authenticate(client, "ann@one.example", USERS["ann@one.example"], mechanism, initial)
    subject, message = a_message("ann@one.example", "bob@one.example")
    queue_id = send(client, "ann@one.example", "bob@one.example", message)
    assert client.quit()[0] == 221
    assert b"Hello." in delivered(dovecot, "bob@one.example", subject)
    # The proxy connected from 127.0.0.1; XCLIENT told Postfix the client's own address.
    logged(
        postfix,
        f"{queue_id}: client=unknown[{CLIENT_HOST}], sasl_method=PLAIN, sasl_username=ann@one.example",
    )


def test_submissions_with_implicit_tls(ports, certificate, dovecot):
    client = smtplib.SMTP_SSL(
        "127.0.0.1", ports["submissions"], "client.example", timeout=10, source_address=(CLIENT_HOST, 0),
        context=client_context(certificate),
    )  # fmt: skip
    assert client.login("bob@one.example", USERS["bob@one.example"])[0] == 235
    subject, message = a_message("bob@one.example", "ann@one.example")
    send(client, "bob@one.example", "ann@one.example", message)
    client.quit()
    delivered(dovecot, "ann@one.example", subject)


def refusal(ports, certificate, user: str, password: str) -> tuple[int, bytes]:
    client = submission(ports, certificate)
    try:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            authenticate(client, user, password, "PLAIN")
    finally:
        client.close()
    return refused.value.smtp_code, refused.value.smtp_error


def test_wrong_password_and_unknown_domain_get_535(ports, certificate):
    wrong = refusal(ports, certificate, "ann@one.example", "wrong")
    unknown = refusal(ports, certificate, "ann@nowhere.example", USERS["ann@one.example"])
    assert wrong == unknown == (535, b"5.7.8 Authentication credentials invalid")


def test_a_stopped_postfix_gets_454_and_a_started_one_logins_again(ports, certificate, postfix):
    postfix.stop()
    try:
        assert refusal(ports, certificate, "ann@one.example", USERS["ann@one.example"]) == (
            454,
            b"4.7.0 Temporary authentication failure",
        )
    finally:
        postfix.start()
    client = submission(ports, certificate)
    authenticate(client, "ann@one.example", USERS["ann@one.example"], "PLAIN")
    client.quit()


def test_mail_before_auth_gets_530(ports, certificate):
    client = submission(ports, certificate)
    assert client.mail("ann@one.example") == (530, b"5.7.0 Authentication required")
    assert client.noop()[0] == 250  # the session goes on
    client.quit()


# --- curl: its own IMAP, POP3 and SMTP clients ------------------------------------------------


@pytest.fixture(scope="module")
def seeded(dovecot) -> None:
    """One message (subject SEEDED) in the INBOX of curl@ and pop@, appended at Dovecot itself."""
    message = f"From: x@y.example\r\nSubject: {SEEDED}\r\n\r\nSeeded body.\r\n".encode()
    for user in ("curl@one.example", "pop@one.example"):
        client = imaplib.IMAP4_SSL("127.0.0.1", dovecot.ports["imaps"], ssl_context=dovecot.client_context())
        client.login(user, USERS[user])
        assert client.append("INBOX", None, None, message)[0] == "OK"
        client.logout()


def curl(certificate: str, url: str, user: str, *options: str, data: bytes = b"") -> subprocess.CompletedProcess:
    """curl from CLIENT_HOST, trusting the proxy's certificate, logged in as `user` (user:password)."""
    mailkit.require("curl")
    argv = [
        "curl",
        "--silent",
        "--show-error",
        "--max-time",
        "30",
        "--interface",
        CLIENT_HOST,
    ]
    argv += ["--cacert", certificate, "--user", user, *options, url]
    return subprocess.run(argv, input=data, capture_output=True, timeout=60, check=False)


def succeeded(result: subprocess.CompletedProcess) -> bytes:
    assert result.returncode == 0, result.stderr
    return result.stdout


#: Listener -> the URL scheme and options that speak it: STARTTLS required on the plain ports.
CURL = {
    "imap": ("imap", "--ssl-reqd"),
    "imaps": ("imaps",),
    "pop3": ("pop3", "--ssl-reqd"),
    "pop3s": ("pop3s",),
    "submission": ("smtp", "--ssl-reqd"),
    "submissions": ("smtps",),
}


def url(ports, listener: str, path: str = "") -> tuple[str, tuple[str, ...]]:
    scheme, *options = CURL[listener]
    return f"{scheme}://127.0.0.1:{ports[listener]}/{path}", tuple(options)


@pytest.mark.parametrize("listener", ["imap", "imaps"])
def test_curl_lists_and_fetches_over_imap(ports, certificate, seeded, listener):
    user = f"curl@one.example:{USERS['curl@one.example']}"
    where, options = url(ports, listener)
    assert re.search(
        rb'^\* LIST \([^)]*\) "[./]" INBOX\r?$',
        succeeded(curl(certificate, where, user, *options)),
        re.MULTILINE,
    )
    where, options = url(ports, listener, "INBOX;UID=1")
    fetched = succeeded(curl(certificate, where, user, *options))
    assert f"Subject: {SEEDED}".encode() in fetched and b"Seeded body." in fetched


@pytest.mark.parametrize("listener", ["pop3", "pop3s"])
def test_curl_lists_and_retrieves_over_pop3(ports, certificate, seeded, listener):
    user = f"pop@one.example:{USERS['pop@one.example']}"
    where, options = url(ports, listener)
    assert re.match(rb"1 \d+\r?\n", succeeded(curl(certificate, where, user, *options)))
    where, options = url(ports, listener, "1")
    retrieved = succeeded(curl(certificate, where, user, *options))
    assert f"Subject: {SEEDED}".encode() in retrieved and b"Seeded body." in retrieved


@pytest.mark.parametrize("listener", ["submission", "submissions"])
def test_curl_sends_over_smtp(ports, certificate, dovecot, listener):
    user = f"curl@one.example:{USERS['curl@one.example']}"
    subject, message = a_message("curl@one.example", "bob@one.example")
    where, options = url(ports, listener, "client.example")
    mail = (
        "--mail-from",
        "curl@one.example",
        "--mail-rcpt",
        "bob@one.example",
        "--upload-file",
        "-",
    )
    succeeded(curl(certificate, where, user, *options, *mail, data=message))
    delivered(dovecot, "bob@one.example", subject)


@pytest.mark.parametrize("listener", ["imap", "pop3s", "submission"])
def test_curl_reports_a_refused_login(ports, certificate, listener):
    where, options = url(ports, listener, "client.example" if listener == "submission" else "")
    extra = ("--mail-rcpt", "bob@one.example", "--upload-file", "-") if listener == "submission" else ()
    result = curl(
        certificate,
        where,
        "curl@one.example:wrong",
        *options,
        *extra,
        data=b"Subject: x\r\n\r\nx\r\n",
    )
    assert result.returncode == CURL_LOGIN_DENIED, result.stderr


# --- a whole IMAP session ---------------------------------------------------------------------


def subjects(client: imaplib.IMAP4) -> list[bytes]:
    """The subjects in the selected mailbox, by sequence number."""
    status, data = client.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert status == "OK", data
    return [part[1].strip() for part in data if isinstance(part, tuple)]


def test_imap_session_append_fetch_store_expunge(ports, certificate):
    user, password = "imap@one.example", USERS["imap@one.example"]
    client = Imap("127.0.0.1", ports["imap"], timeout=10)
    client.starttls(client_context(certificate))
    assert client.login(user, password)[0] == "OK"
    first, second = a_message(user, user), a_message(user, user)
    for _, message in (first, second):
        assert client.append("INBOX", None, None, message)[0] == "OK"  # imaplib sends a {literal}
    status, data = client.select("INBOX")
    assert status == "OK" and int(data[0]) == 2
    status, data = client.fetch("1", "(BODY[])")
    assert status == "OK" and data[0][1] == first[1]
    assert client.store("1", "+FLAGS", "(\\Deleted)")[0] == "OK"
    status, data = client.expunge()
    assert status == "OK" and data == [b"1"]
    assert client.logout()[0] == "BYE"
    fresh = ImapTls("127.0.0.1", ports["imaps"], ssl_context=client_context(certificate), timeout=10)
    fresh.login(user, password)
    assert fresh.select("INBOX", readonly=True)[1] == [b"1"]
    assert subjects(fresh) == [f"Subject: {second[0]}".encode()]
    fresh.logout()


class RawImap:
    """An IMAP client over TLS that sends lines as given and reads what comes back, line by line
    (imaplib has no IDLE before Python 3.14)."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        sock = socket.create_connection(("127.0.0.1", port), 10, source_address=(CLIENT_HOST, 0))
        self.sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        self.lines = self.sock.makefile("rb")
        assert self.line().startswith(b"* OK")

    def line(self) -> bytes:
        line = self.lines.readline()
        assert line.endswith(b"\r\n"), f"connection closed: {line!r}"
        return line.rstrip(b"\r\n")

    def send(self, line: bytes) -> None:
        self.sock.sendall(line + b"\r\n")

    def until(self, pattern: bytes) -> bytes:
        """Read lines until one matches `pattern`; return it."""
        while re.match(pattern, line := self.line()) is None:
            pass
        return line

    def close(self) -> None:
        self.lines.close()
        self.sock.close()


def test_imap_idle_sees_an_append_from_another_session(ports, certificate):
    user, password = "idle@one.example", USERS["idle@one.example"]
    idling = RawImap(ports["imaps"], client_context(certificate))
    try:
        idling.send(f'a LOGIN "{user}" "{password}"'.encode())
        assert idling.until(rb"a ").startswith(b"a OK")
        idling.send(b"b SELECT INBOX")
        exists = int(idling.until(rb"\* \d+ EXISTS").split()[1])
        assert idling.until(rb"b ").startswith(b"b OK")
        idling.send(b"c IDLE")
        assert idling.line().startswith(b"+ ")
        other = Imap("127.0.0.1", ports["imap"], timeout=10)
        other.starttls(client_context(certificate))
        other.login(user, password)
        assert other.append("INBOX", None, None, a_message(user, user)[1])[0] == "OK"
        other.logout()
        assert idling.until(rb"\* \d+ EXISTS") == f"* {exists + 1} EXISTS".encode()
        idling.send(b"DONE")
        assert idling.until(rb"c ").startswith(b"c OK")
        idling.send(b"d LOGOUT")
        assert idling.until(rb"d ").startswith(b"d OK")
    finally:
        idling.close()
