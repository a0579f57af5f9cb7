"""The mail kit against standard-library clients: two Dovecots and one Postfix at once.

Checks what later tests rely on: logins with and without TLS, LMTP and SMTP delivery to the
right Dovecot, refusals, submission through Postfix, restart, PROXY v2 and IMAP ID forwarding.
"""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import socket
import ssl
import time
import uuid
from collections.abc import Callable

import pytest
from helpers import mailkit

#: How long a delivery through Postfix may take before the test fails (polled, not slept).
DELIVERY_DEADLINE = 20.0


def host_port(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.rsplit(":", 1)
    return host, int(port)


def wait_for(condition: Callable[[], bool], what: str, *logs: mailkit.Dovecot | mailkit.Postfix) -> None:
    deadline = time.monotonic() + DELIVERY_DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            tails = "\n".join(d.log_tail() for d in logs)
            raise AssertionError(f"{what}: not within {DELIVERY_DEADLINE} s\n{tails}")
        time.sleep(mailkit.POLL_INTERVAL)


def has_subject(dovecot: mailkit.Dovecot, address: str, subject: str) -> bool:
    return any(f"Subject: {subject}".encode() in m for m in dovecot.mailbox(address))


def message(subject: str, sender: str = "sender@example.test") -> bytes:
    return f"From: {sender}\r\nSubject: {subject}\r\n\r\nhello from the mail kit\r\n".encode()


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """Dovecot `a` (a.test, submission relayed through mx), Dovecot `b` (b.test), and Postfix
    `mx` hosting a.test -> a and b.test -> b."""
    root = tmp_path_factory.mktemp("mailkit")
    with (
        mailkit.dovecot(root / "a", {"alice@a.test": "alice-pw"}) as a,
        mailkit.dovecot(root / "b", {"bob@b.test": "bob-pw"}) as b,
        mailkit.postfix(root / "mx", a, ["a.test"], routes={"b.test": b}, xclient=True) as mx,
    ):
        a.relay_to(mx.endpoint)
        yield a, b, mx


def test_instances_are_separate(kit):
    a, b, mx = kit
    assert a.running and b.running and mx.running
    assert set(a.ports.values()).isdisjoint(b.ports.values())
    assert mx.port not in {*a.ports.values(), *b.ports.values()}
    assert a.base_dir != b.base_dir
    assert "submission" in a.endpoints() and "submission" not in b.endpoints()


def test_imap_login_plain_then_after_starttls(kit):
    a, _, _ = kit
    with imaplib.IMAP4(*host_port(a.endpoints()["imap"])) as imap:
        assert b"STARTTLS" in imap.welcome
        imap.login("alice@a.test", "alice-pw")
    with imaplib.IMAP4(*host_port(a.endpoints()["imap"])) as imap:
        imap.starttls(ssl_context=a.client_context())
        assert imap.sock.getpeercert()["subjectAltName"]
        imap.login("alice@a.test", "alice-pw")
    with imaplib.IMAP4(*host_port(a.endpoints()["imap"])) as imap, pytest.raises(imaplib.IMAP4.error):
        imap.login("alice@a.test", "wrong")


def test_imaps_verifies_the_kit_certificate(kit):
    a, _, _ = kit
    with imaplib.IMAP4_SSL(*host_port(a.endpoints()["imaps"]), ssl_context=a.client_context()) as imap:
        imap.login("alice@a.test", "alice-pw")
    with pytest.raises(ssl.SSLCertVerificationError):
        imaplib.IMAP4_SSL(*host_port(a.endpoints()["imaps"]), ssl_context=ssl.create_default_context())


def test_pop3_login_plain_then_after_stls(kit):
    _, b, _ = kit
    pop = poplib.POP3(*host_port(b.endpoints()["pop3"]), timeout=10)
    pop.user("bob@b.test")
    pop.pass_("bob-pw")
    pop.quit()
    pop = poplib.POP3(*host_port(b.endpoints()["pop3"]), timeout=10)
    pop.stls(context=b.client_context())
    pop.user("bob@b.test")
    pop.pass_("bob-pw")
    pop.stat()
    pop.quit()


def test_lmtp_delivery_is_visible_over_imap_and_in_the_maildir(kit):
    _, b, _ = kit
    subject = f"lmtp {uuid.uuid4()}"
    with smtplib.LMTP(*host_port(b.endpoints()["lmtp"])) as lmtp:
        assert lmtp.sendmail("sender@example.test", ["bob@b.test"], message(subject)) == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            lmtp.sendmail("sender@example.test", ["nobody@b.test"], message(subject))
        assert refused.value.recipients["nobody@b.test"][0] == 550
    assert has_subject(b, "bob@b.test", subject)
    with imaplib.IMAP4(*host_port(b.endpoints()["imap"])) as imap:
        imap.login("bob@b.test", "bob-pw")
        status, _ = imap.select("INBOX")
        assert status == "OK"
        status, found = imap.search(None, "SUBJECT", f'"{subject}"')
        assert status == "OK" and len(found[0].split()) == 1
        status, fetched = imap.fetch(found[0], "(RFC822)")
        assert status == "OK" and f"Subject: {subject}".encode() in fetched[0][1]


def test_postfix_delivers_to_the_dovecot_of_the_domain(kit):
    a, b, mx = kit
    subject = f"smtp {uuid.uuid4()}"
    with smtplib.SMTP(*host_port(mx.endpoint)) as smtp:
        assert smtp.sendmail("sender@example.test", ["bob@b.test"], message(subject)) == {}
    wait_for(lambda: has_subject(b, "bob@b.test", subject), "delivery to b through Postfix", mx, b)
    assert not any(subject.encode() in m for m in a.mailbox("alice@a.test"))


def test_postfix_refuses_other_domains_and_offers_xclient(kit):
    _, _, mx = kit
    with smtplib.SMTP(*host_port(mx.endpoint)) as smtp:
        smtp.ehlo()
        assert "xclient" in smtp.esmtp_features
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            smtp.sendmail("sender@example.test", ["someone@elsewhere.test"], message("no relay"))
    assert refused.value.recipients["someone@elsewhere.test"][0] in (454, 550, 554)


def test_submission_after_starttls_is_relayed_through_postfix(kit):
    a, b, mx = kit
    subject = f"submission {uuid.uuid4()}"
    with smtplib.SMTP(*host_port(a.endpoints()["submission"])) as smtp:
        smtp.starttls(context=a.client_context())
        smtp.ehlo()
        assert "PLAIN" in smtp.esmtp_features["auth"]
        smtp.login("alice@a.test", "alice-pw")
        smtp.sendmail("alice@a.test", ["bob@b.test"], message(subject, "alice@a.test"))
    wait_for(lambda: has_subject(b, "bob@b.test", subject), "submission relayed to b", a, mx, b)


def test_add_user_takes_effect_without_restart(kit):
    a, _, _ = kit
    with imaplib.IMAP4(*host_port(a.endpoints()["imap"])) as imap, pytest.raises(imaplib.IMAP4.error):
        imap.login("carol@a.test", "carol-pw")
    a.add_user("carol@a.test", "carol-pw")
    with imaplib.IMAP4(*host_port(a.endpoints()["imap"])) as imap:
        imap.login("carol@a.test", "carol-pw")


def test_logs_tell_what_happened(kit):
    a, _, mx = kit
    with imaplib.IMAP4(*host_port(a.endpoints()["imap"])) as imap:
        imap.login("alice@a.test", "alice-pw")
    wait_for(lambda: "Login: user=<alice@a.test>" in a.log_tail(), "login in the Dovecot log", a)
    wait_for(lambda: "status=sent" in mx.log_tail(), "delivery in the Postfix log", mx)


class ProxiedIMAP4(imaplib.IMAP4):
    """imaplib.IMAP4 that sends a PROXY protocol header before the greeting."""

    def __init__(self, host: str, port: int, header: bytes) -> None:
        self._header = header
        super().__init__(host, port)

    def _create_socket(self, timeout):
        sock = super()._create_socket(timeout)
        sock.sendall(self._header)
        return sock


def imap_lines(sock: socket.socket, *commands: bytes) -> bytes:
    """Send each tagged command and read up to its tagged reply; returns everything read."""
    reader = sock.makefile("rb")
    seen = reader.readline()
    for n, command in enumerate(commands):
        tag = f"t{n}".encode()
        sock.sendall(tag + b" " + command + b"\r\n")
        while not (line := reader.readline()).startswith(tag + b" "):
            if not line:
                raise AssertionError(f"connection closed after {seen!r}")
            seen += line
        seen += line
    return seen


def test_stop_restart_proxy_v2_and_id_forwarding(tmp_path_factory):
    root = tmp_path_factory.mktemp("mailkit-c")
    with mailkit.dovecot(root / "c", {"carol@c.test": "carol-pw"}, trusted_networks=["127.0.0.0/8"], haproxy=True) as c:
        host, port = host_port(c.endpoints()["imap"])
        header = mailkit.proxy_v2_header(("192.0.2.7", 40000), (host, port))
        with ProxiedIMAP4(host, port, header) as imap:
            imap.login("carol@c.test", "carol-pw")
        wait_for(lambda: "rip=192.0.2.7" in c.log_tail(), "PROXY v2 client address in the log", c)

        context = c.client_context()
        imaps = host_port(c.endpoints()["imaps"])
        with socket.create_connection(imaps) as raw, context.wrap_socket(raw, server_hostname=host) as sock:
            forward = b'ID ("x-originating-ip" "192.0.2.8" "x-originating-port" "40001")'
            replies = imap_lines(sock, forward, b"LOGIN carol@c.test carol-pw")
        assert b"t1 OK" in replies
        wait_for(lambda: "rip=192.0.2.8" in c.log_tail(), "IMAP ID client address in the log", c)

        group = c.process.pid
        c.stop()
        assert not c.running
        assert mailkit.live_processes_in_group(group) == []
        for endpoint in c.endpoints().values():
            with pytest.raises(OSError):
                socket.create_connection(host_port(endpoint), timeout=2).close()
        c.start()
        with ProxiedIMAP4(host, port, mailkit.PROXY_V2_LOCAL) as imap:
            imap.login("carol@c.test", "carol-pw")


def test_require_skips_locally_and_fails_under_ci(monkeypatch):
    monkeypatch.setattr(mailkit.shutil, "which", lambda name, path=None: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install postfix"):
        mailkit.require("postfix")
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="dovecot-imapd"):
        mailkit.require("dovecot")
