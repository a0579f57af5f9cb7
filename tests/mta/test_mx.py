"""The MX in one process in front of a real Dovecot (LMTP): mail for a live slave is in the
mailbox before the 250; an unknown user is refused at RCPT with Dovecot's reply; no relaying
to domains outside the cluster, however the address is dressed; mail for a slave that is down
is kept on disk, delivered when it is back, and still delivered after a restart; smuggling,
VRFY and EXPN are refused."""

from __future__ import annotations

import email
import random
import re
import smtplib
import socket
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
import trio
from helpers import mailkit
from helpers.config import minimal_config
from helpers.routes import DomainMap

from meshmail.config import ConfigError, loads
from meshmail.core.address import Address
from meshmail.gossip.member import MemberInfo
from meshmail.gossip.messages import State
from meshmail.metrics import Metrics
from meshmail.mta.deliver import Deliverer
from meshmail.mta.queue import Queue
from meshmail.mta.runner import PER_SLAVE, Runner
from meshmail.mta.service import MxReport, policy
from meshmail.mta.session import Mx
from meshmail.mta.spool import Spool
from meshmail.nodemeta import Endpoint, NodeMeta
from meshmail.protocols import mx as mx_codec
from meshmail.protocols.common import Closed
from meshmail.proxy.backend import Connector, backend_contexts
from meshmail.routing import Route, Router

USERS = {"alice@one.example": "alice-secret-1", "bob@one.example": "bob-secret-1"}


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory) -> Iterator[mailkit.Dovecot]:
    mailkit.require("dovecot")
    with mailkit.dovecot(tmp_path_factory.mktemp("mx") / "d1", USERS, name="d1") as instance:
        yield instance


class Harness:
    """An MX on 127.0.0.1 in a trio loop in a thread, over a spool in `folder`; `members` is
    the members view the router reads (change a member's state to take a slave down)."""

    def __init__(self, dovecot: mailkit.Dovecot, folder: Path) -> None:
        self.members = {"s1": self.member(dovecot, State.ALIVE)}
        self.dovecot = dovecot
        self.folder = folder
        self.section = loads(minimal_config(extra='[mx]\nlisten = "127.0.0.1:0"\nretry_min = 1\nretry_max = 2\n')).mx
        self.port = 0
        self.report: MxReport | None = None
        self.smarthost: Address | None = None

    @staticmethod
    def member(dovecot: mailkit.Dovecot, state: State, incarnation: int = 1, up: bool = True) -> MemberInfo:
        endpoints = {"lmtp": Endpoint(f"127.0.0.1:{dovecot.ports['lmtp']}", up=up)}
        meta = NodeMeta(role="slave", endpoints=endpoints).encode()
        return MemberInfo("s1", "127.0.0.1", 7946, meta, incarnation, state, 0)

    def set_slave(self, state: State, service_up: bool = True) -> None:
        """The slave's gossiped state, and whether its health probe publishes its LMTP up."""
        self.members["s1"] = self.member(self.dovecot, state, self.members["s1"].incarnation + 1, service_up)

    def __enter__(self) -> Harness:
        ready = threading.Event()
        self.loop: dict = {}

        async def main() -> None:
            self.loop["token"], self.loop["stop"] = (
                trio.lowlevel.current_trio_token(),
                trio.Event(),
            )
            spool = Spool.open(self.folder)
            try:
                queue = Queue(policy(self.section), random.Random(7))
                queue.load((await spool.rescan()).envelopes)
                router = Router(DomainMap({"one.example": "s1"}), self.members)
                deliverer = Deliverer(Connector(backend_contexts(None, None, "/")), "mx.test")
                runner = self.runner = Runner(
                    spool, queue, deliverer, router, "mx.test", "m1", smarthost=self.smarthost
                )
                mx = Mx(self.section, router, deliverer, runner, None, Metrics(), "mx.test")
                self.report = MxReport(mx, runner)
                [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
                self.port = listener.socket.getsockname()[1]
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(runner.run)
                    nursery.start_soon(trio.serve_listeners, mx.handle, [listener])
                    ready.set()
                    await self.loop["stop"].wait()
                    nursery.cancel_scope.cancel()
            finally:
                spool.close()

        self.thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
        self.thread.start()
        assert ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        trio.from_thread.run_sync(self.loop["stop"].set, trio_token=self.loop["token"])
        self.thread.join(10)

    def status(self) -> dict:
        assert self.report is not None
        return trio.from_thread.run_sync(self.report.summary, trio_token=self.loop["token"])


def message(subject: str, recipient: str) -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = "sender@outside.example"
    mail["To"] = recipient
    mail["Subject"] = subject
    mail["Message-ID"] = f"<{subject}@outside.example>"
    mail.set_content(f"{subject}\n.leading dot\n")
    return mail


def delivered_ids(dovecot: mailkit.Dovecot, address: str) -> list[str]:
    return [line.split(b"<", 1)[1].split(b"@", 1)[0].decode() for mail in dovecot.mailbox(address)
            for line in mail.splitlines() if line.lower().startswith(b"message-id:")]  # fmt: skip


def wait_for(what: str, condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_live_slave_gets_the_message_before_the_250_and_unknown_users_are_refused(dovecot, tmp_path):
    with (
        Harness(dovecot, tmp_path / "queue") as mx,
        smtplib.SMTP("127.0.0.1", mx.port, timeout=20) as client,
    ):
        refused = client.send_message(message("inline-1", "alice@one.example"), to_addrs=["alice@one.example"])
        assert refused == {}
        assert "inline-1" in delivered_ids(dovecot, "alice@one.example")  # there when the 250 came
        body = [m for m in dovecot.mailbox("alice@one.example") if b"inline-1" in m][0]
        assert b"Received: from" in body and b"by mx.test (meshmail) with ESMTP" in body
        assert b"\n.leading dot\n" in body  # dot-stuffing undone, body otherwise untouched
        with pytest.raises(smtplib.SMTPRecipientsRefused) as caught:
            client.send_message(message("ghost", "ghost@one.example"), to_addrs=["ghost@one.example"])
        code, text = caught.value.recipients["ghost@one.example"]
        assert code == 550 and text.startswith(b"5.1.1"), text
        # One known and one unknown recipient: the known one gets it, the other is refused at RCPT.
        refused = client.send_message(
            message("mixed", "bob@one.example"),
            to_addrs=["bob@one.example", "nobody@one.example"],
        )
        assert list(refused) == ["nobody@one.example"] and "mixed" in delivered_ids(dovecot, "bob@one.example")
        assert mx.status()["recipients"]["delivered"] >= 2
        assert mx.status()["rejections"]["unknown_recipient"] == 2


@pytest.mark.parametrize(
    "recipient",
    [
        "someone@outside.example",
        "<@one.example:someone@outside.example>",  # a source route: the mailbox is what counts
        "someone@outside.example@one.example",
        "someone@[192.0.2.1]",
        "postmaster@outside.example",
    ],
)
def test_no_relaying_to_domains_outside_the_cluster(dovecot, tmp_path, recipient):
    with (
        Harness(dovecot, tmp_path / "queue") as mx,
        smtplib.SMTP("127.0.0.1", mx.port, timeout=20) as client,
    ):
        client.ehlo("relay-test.example")
        assert client.mail("spammer@outside.example")[0] == 250
        code, text = client.rcpt(recipient if recipient.startswith("<") else f"<{recipient}>")
        assert code in (550, 501) and (text.startswith(b"5.7.1") or code == 501), (
            code,
            text,
        )
        assert client.docmd("DATA")[0] in (503, 554)  # no valid recipient: nothing to send


def test_percent_hack_and_bang_paths_are_local_parts_the_slave_does_not_know(dovecot, tmp_path):
    with (
        Harness(dovecot, tmp_path / "queue") as mx,
        smtplib.SMTP("127.0.0.1", mx.port, timeout=20) as client,
    ):
        client.ehlo("relay-test.example")
        client.mail("spammer@outside.example")
        for recipient in (
            "victim%outside.example@one.example",
            "outside.example!victim@one.example",
        ):
            code, text = client.rcpt(f"<{recipient}>")
            assert code == 550 and text.startswith(b"5.1.1"), (recipient, code, text)


def test_mail_for_a_slave_that_is_down_waits_on_disk_and_goes_when_it_is_back(dovecot, tmp_path):
    folder = tmp_path / "queue"
    with Harness(dovecot, folder) as mx:
        mx.set_slave(State.DEAD)
        with smtplib.SMTP("127.0.0.1", mx.port, timeout=20) as client:
            for n in range(5):
                reply = client.send_message(
                    message(f"queued-{n}", "bob@one.example"),
                    to_addrs=["bob@one.example"],
                )
                assert reply == {}
        assert len(spooled(folder)) == 5  # on disk before each 250 (sent one by one: a file each)
        assert mx.status()["queued"] == 5 and mx.status()["slaves"]["s1"]["messages"] == 5
        assert not {f"queued-{n}" for n in range(5)} & set(delivered_ids(dovecot, "bob@one.example"))
        mx.set_slave(State.ALIVE)
        wait_for(
            "the queue delivered",
            lambda: {f"queued-{n}" for n in range(5)} <= set(delivered_ids(dovecot, "bob@one.example")),
        )
        wait_for("the spool emptied", lambda: not spooled(folder))
        assert mx.status()["queued"] == 0
    ids = delivered_ids(dovecot, "bob@one.example")
    assert all(ids.count(f"queued-{n}") == 1 for n in range(5))


def test_queued_mail_goes_as_soon_as_the_slave_answers_though_its_probe_still_says_down(dovecot, tmp_path):
    """The slave's own health probe runs every few seconds and gossip takes a moment more: a
    master with mail waiting tries the slave's LMTP itself and delivers once it greets. Here
    the published state never catches up at all."""
    folder = tmp_path / "queue"
    with Harness(dovecot, folder) as mx:
        mx.set_slave(State.ALIVE, service_up=False)
        dovecot.stop()
        try:
            with smtplib.SMTP("127.0.0.1", mx.port, timeout=20) as client:
                for n in range(3):
                    assert (
                        client.send_message(message(f"looked-{n}", "bob@one.example"), to_addrs=["bob@one.example"])
                        == {}
                    )
            time.sleep(1.0)  # several looks find nothing: the mail stays queued
            assert mx.status()["queued"] == 3
        finally:
            dovecot.start()
        wait_for(
            "the queue delivered without the probe saying so",
            lambda: {f"looked-{n}" for n in range(3)} <= set(delivered_ids(dovecot, "bob@one.example")),
        )
        wait_for("the spool emptied", lambda: not spooled(folder))


def test_a_look_that_found_the_slave_answering_counts_only_until_the_probe_catches_up(dovecot, tmp_path):
    """The look's "it answers" stands in for the probe only until the probe says "up" itself, or
    until the slave cannot be reached: a new outage soon after is the probe's word again, so
    the queue is not kicked and tried each tick against a service that is down."""

    def route_is_up() -> bool:
        return trio.from_thread.run_sync(
            lambda: isinstance(mx.runner._route("s1")[0], Route), trio_token=mx.loop["token"]
        )

    def queue_then_look(subject: str) -> None:
        """Mail while the service is down and published down; delivered by the look once it is back."""
        dovecot.stop()
        try:
            with smtplib.SMTP("127.0.0.1", mx.port, timeout=20) as client:
                assert client.send_message(message(subject, "bob@one.example"), to_addrs=["bob@one.example"]) == {}
            assert not route_is_up()
        finally:
            dovecot.start()
        wait_for(f"the look delivered {subject}", lambda: subject in delivered_ids(dovecot, "bob@one.example"))

    with Harness(dovecot, tmp_path / "queue") as mx:
        mx.set_slave(State.ALIVE, service_up=False)
        queue_then_look("first")
        assert route_is_up()  # the look's answer, the probe still publishing the service down
        mx.set_slave(State.ALIVE, service_up=True)  # the probe catches up
        assert route_is_up()
        mx.set_slave(State.ALIVE, service_up=False)  # a new outage, seconds after the look
        assert not route_is_up()

        queue_then_look("second")
        assert route_is_up()
        dovecot.stop()
        try:
            with smtplib.SMTP("127.0.0.1", mx.port, timeout=20) as client:
                assert client.send_message(message("third", "bob@one.example"), to_addrs=["bob@one.example"]) == {}
            assert mx.status()["queued"] == 1
            # The queue's next try finds it gone and drops the look's answer (not 30 s later).
            wait_for("the look's answer dropped", lambda: not route_is_up(), timeout=10.0)
        finally:
            dovecot.start()
        wait_for("the look delivered third", lambda: "third" in delivered_ids(dovecot, "bob@one.example"))


def test_a_restarted_mx_delivers_what_its_queue_holds(dovecot, tmp_path):
    folder = tmp_path / "queue"
    with Harness(dovecot, folder) as mx:
        mx.set_slave(State.DEAD)
        with smtplib.SMTP("127.0.0.1", mx.port, timeout=20) as client:
            client.send_message(
                message("restart-1", "alice@one.example"),
                to_addrs=["alice@one.example"],
            )
    assert len(spooled(folder)) == 1
    with Harness(dovecot, folder) as mx:  # a new process: the rescan finds it, the slave is up
        wait_for(
            "delivered after the restart",
            lambda: "restart-1" in delivered_ids(dovecot, "alice@one.example"),
        )
        wait_for("the spool emptied", lambda: not spooled(folder))


def spooled(folder: Path) -> list[str]:
    """The files in a spool folder that hold messages: batch files and message files."""
    return sorted(path.name for path in folder.iterdir() if path.suffix in (".cps", ".msg"))


def raw_session(port: int, lines: list[bytes]) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.recv(4096)
        sock.sendall(b"".join(lines))
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def test_smuggling_vrfy_and_expn_are_refused(dovecot, tmp_path):
    with Harness(dovecot, tmp_path / "queue") as mx:
        answer = raw_session(mx.port, [
            b"EHLO smuggler.example\r\n", b"MAIL FROM:<a@outside.example>\r\n", b"RCPT TO:<alice@one.example>\r\n",
            b"DATA\r\n", b"Subject: x\r\n\r\nbody\n.\nMAIL FROM:<b@outside.example>\r\n.\r\n",
            b"VRFY alice\r\n", b"EXPN staff\r\n", b"QUIT\r\n",
        ])  # fmt: skip
    assert b"554 5.6.0" in answer and b"502 5.5.1 VRFY" in answer and b"502 5.5.1 EXPN" in answer
    assert b"250 2.0.0" not in answer  # no message accepted, the smuggled one least of all
    assert not any(b"smuggler.example" in mail for mail in dovecot.mailbox("alice@one.example"))


def test_connection_and_message_rates_per_client_address_are_bounded(dovecot, tmp_path):
    harness = Harness(dovecot, tmp_path / "queue")
    harness.section = loads(
        minimal_config(extra='[mx]\nlisten = "127.0.0.1:0"\nmessages_per_minute = 2\nconnections_per_minute = 3\n')
    ).mx
    with harness as mx:
        with smtplib.SMTP("127.0.0.1", mx.port, timeout=20) as client:
            for n in range(2):
                assert (
                    client.send_message(message(f"rate-{n}", "alice@one.example"), to_addrs=["alice@one.example"]) == {}
                )
            client.ehlo("rate.example")
            code, text = client.mail("sender@outside.example")
            assert (code, text[:5]) == (451, b"4.7.1"), text
        with smtplib.SMTP("127.0.0.1", mx.port, timeout=20):
            pass
        with smtplib.SMTP("127.0.0.1", mx.port, timeout=20):
            pass
        with pytest.raises(smtplib.SMTPConnectError) as caught:  # the fourth connection this minute
            smtplib.SMTP("127.0.0.1", mx.port, timeout=20)
        assert caught.value.smtp_code == 421
        assert mx.status()["rejections"] == {"message_rate": 1, "connection_rate": 1}


def lmtp_connections(dovecot: mailkit.Dovecot) -> int:
    """LMTP connections Dovecot has logged so far."""
    lines = dovecot.log.read_text(errors="replace").splitlines()
    return sum(1 for line in lines if "lmtp(" in line and "Connect from" in line)


def test_a_drain_shares_its_lmtp_sessions(dovecot, tmp_path):
    """Forty messages for a slave that was down go out over at most PER_SLAVE sessions (its
    LMTP endpoint takes no client address), not one connection each."""
    folder = tmp_path / "queue"
    with Harness(dovecot, folder) as mx:
        mx.set_slave(State.DEAD)
        with smtplib.SMTP("127.0.0.1", mx.port, timeout=20) as client:
            for n in range(40):
                client.send_message(message(f"lane-{n}", "bob@one.example"), to_addrs=["bob@one.example"])
        before = lmtp_connections(dovecot)
        mx.set_slave(State.ALIVE)
        wanted = {f"lane-{n}" for n in range(40)}
        wait_for("the queue delivered", lambda: wanted <= set(delivered_ids(dovecot, "bob@one.example")))
        wait_for("the spool emptied", lambda: not spooled(folder))
    assert lmtp_connections(dovecot) - before <= PER_SLAVE
    assert all(delivered_ids(dovecot, "bob@one.example").count(subject) == 1 for subject in wanted)


def test_in_line_deliveries_share_sessions_and_survive_the_slave_closing_them(dovecot, tmp_path):
    """Messages delivered in-line one after another go over one kept session, not a connection
    each; a kept session the slave closed meanwhile (Dovecot restarted) costs nothing: the
    next message goes in-line on a new one, not to the queue."""
    with Harness(dovecot, tmp_path / "queue") as mx:
        before = lmtp_connections(dovecot)
        with smtplib.SMTP("127.0.0.1", mx.port, timeout=20) as client:
            for n in range(10):
                client.send_message(message(f"kept-{n}", "bob@one.example"), to_addrs=["bob@one.example"])
        assert lmtp_connections(dovecot) - before <= 2  # the recipient check's and the message's
        dovecot.stop()
        dovecot.start()
        with smtplib.SMTP("127.0.0.1", mx.port, timeout=20) as client:
            client.ehlo("client.test")
            client.mail("sender@outside.example")
            client.rcpt("bob@one.example")
            code, text = client.data(message("after-restart", "bob@one.example").as_string())
        assert (code, b"delivered" in text) == (250, True), text
        assert mx.status()["queued"] == 0
    assert {f"kept-{n}" for n in range(10)} | {"after-restart"} <= set(delivered_ids(dovecot, "bob@one.example"))


def postmaster_harness(dovecot: mailkit.Dovecot, folder: Path, postmaster: str | None) -> Harness:
    harness = Harness(dovecot, folder)
    setting = f'postmaster = "{postmaster}"\n' if postmaster else ""
    harness.section = loads(minimal_config(extra=f'[mx]\nlisten = "127.0.0.1:0"\nretry_min = 1\n{setting}')).mx
    return harness


def test_mail_to_postmaster_goes_to_the_configured_address(dovecot, tmp_path):
    """RFC 5321 section 4.5.1: <postmaster> and <postmaster@the MX's name> are taken, in any
    case, and delivered to [mx] postmaster (now the envelope recipient): in-line while its slave
    answers, through the queue while it is down."""
    with postmaster_harness(dovecot, tmp_path / "queue", "alice@one.example") as mx:
        with smtplib.SMTP("127.0.0.1", mx.port, timeout=20) as client:
            for subject, recipient in (("pm-bare", "<Postmaster>"), ("pm-host", "<POSTMASTER@Mx.Test>")):
                client.ehlo("client.test")
                assert client.mail("sender@outside.example")[0] == 250
                code, text = client.rcpt(recipient)
                assert (code, text) == (250, b"2.1.5 Recipient OK")
                code, text = client.data(message(subject, "postmaster").as_string())
                assert (code, b"delivered" in text) == (250, True), text
            client.ehlo("client.test")  # postmaster and the address it goes to: one delivery
            client.mail("sender@outside.example")
            for recipient in ("<postmaster>", "<alice@ONE.example>", "<alice@one.example>"):
                assert client.rcpt(recipient)[0] == 250
            code, text = client.data(message("pm-twice", "postmaster").as_string())
            assert (code, b"delivered" in text) == (250, True), text
        delivered = delivered_ids(dovecot, "alice@one.example")
        assert {"pm-bare", "pm-host"} <= set(delivered)
        assert delivered.count("pm-twice") == 1
        twice = [m for m in dovecot.mailbox("alice@one.example") if b"pm-twice" in m][0]
        assert b"for <alice@one.example>" in twice  # one envelope recipient left (else no "for")
        body = [m for m in dovecot.mailbox("alice@one.example") if b"pm-bare" in m][0]
        assert b"for <alice@one.example>" in body  # the envelope recipient is the configured one
        mx.set_slave(State.DEAD)
        with smtplib.SMTP("127.0.0.1", mx.port, timeout=20) as client:
            client.ehlo("client.test")
            client.mail("sender@outside.example")
            assert client.rcpt("<postmaster>")[0] == 250
            code, text = client.data(message("pm-queued", "postmaster").as_string())
            assert (code, b"queued" in text) == (250, True), text
        assert mx.status()["slaves"]["s1"]["messages"] == 1
        mx.set_slave(State.ALIVE)
        wait_for(
            "the queued postmaster mail delivered", lambda: "pm-queued" in delivered_ids(dovecot, "alice@one.example")
        )


def test_postmaster_is_refused_when_none_is_configured(dovecot, tmp_path):
    with (
        postmaster_harness(dovecot, tmp_path / "queue", None) as mx,
        smtplib.SMTP("127.0.0.1", mx.port, timeout=20) as client,
    ):
        client.ehlo("client.test")
        client.mail("sender@outside.example")
        for recipient in ("<postmaster>", "<postmaster@mx.test>"):
            assert client.rcpt(recipient) == (550, b"5.1.1 Postmaster is not configured here")
        assert client.rcpt("<postmaster@outside.example>")[1].startswith(b"5.7.1")  # not ours: relaying
        assert mx.status()["rejections"]["no_postmaster"] == 2


@pytest.mark.parametrize(
    ("value", "complaint"),
    [('"postmaster"', "has no '@'"), ('"a b@one.example"', "not a mail address"), ('""', "must not be empty"),
     ("1", "a string")],
)  # fmt: skip
def test_a_bad_postmaster_setting_is_a_clear_error(value, complaint):
    with pytest.raises(ConfigError) as caught:
        loads(minimal_config(extra=f"[mx]\npostmaster = {value}\n"))
    message = str(caught.value)
    assert "mx.postmaster" in message and complaint in message and "\n" not in message, message


def test_the_postmaster_setting_is_kept_in_normal_form():
    assert loads(minimal_config(extra='[mx]\npostmaster = "Hostmaster@ONE.example"\n')).mx.postmaster == (
        "Hostmaster@one.example"
    )


class SmtpSink:
    """A smarthost stand-in: an SMTP server on a real socket (the MX's own codec), keeping each
    message it takes as (sender, recipients, data)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = Address("127.0.0.1", self.server.getsockname()[1])
        self.messages: list[tuple[str, list[str], bytes]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            with sock:
                self._session(sock)

    def _session(self, sock: socket.socket) -> None:
        codec = mx_codec.MxServer(hostname="smarthost.test")
        sender, recipients, data = "", [], b""
        while True:
            event = codec.next_event()
            sock.sendall(codec.data_to_send())
            if event is None:
                codec.receive_data(sock.recv(65536))
            elif isinstance(event, mx_codec.MailFrom):
                sender, recipients, data = event.reverse_path, [], b""
                codec.accept()
            elif isinstance(event, mx_codec.RcptTo):
                recipients.append(event.address)
                codec.accept()
            elif isinstance(event, mx_codec.DataChunk):
                data += event.data
            elif isinstance(event, mx_codec.DataEnd):
                self.messages.append((sender, recipients, data))
                codec.accept()
            elif isinstance(event, Closed):
                sock.sendall(codec.data_to_send())
                return

    def close(self) -> None:
        self.server.close()


@pytest.mark.parametrize("smarthost", [True, False])
def test_bounces_to_senders_outside_the_cluster_go_through_the_smarthost(dovecot, tmp_path, smarthost):
    """A recipient the slave refuses at delivery (no check at RCPT here) bounces to a sender
    outside the cluster: through [mx] smarthost when there is one, else counted unsent."""
    sink = SmtpSink()
    harness = Harness(dovecot, tmp_path / "queue")
    harness.section = loads(minimal_config(extra='[mx]\nlisten = "127.0.0.1:0"\nverify_recipients = false\n')).mx
    harness.smarthost = sink.address if smarthost else None
    try:
        with harness as mx, smtplib.SMTP("127.0.0.1", mx.port, timeout=20) as client:
            refused = client.send_message(message("bounced", "alice@one.example"), from_addr="sender@outside.example",
                                          to_addrs=["alice@one.example", "ghost@one.example"])  # fmt: skip
            assert refused == {}
            if not smarthost:
                assert mx.status()["recipients"]["bounces_unsent"] == 1
                return
            wait_for("the DSN reached the smarthost", lambda: sink.messages)
            wait_for("the spool emptied", lambda: not spooled(tmp_path / "queue"))
            assert mx.status()["recipients"]["bounces"] == 1
    finally:
        sink.close()
    [(sender, recipients, data)] = sink.messages
    assert (sender, recipients) == ("", ["sender@outside.example"])
    notice = email.message_from_bytes(data)
    assert notice.get_content_type() == "multipart/report"
    assert notice.get_param("report-type") == "delivery-status"
    assert re.findall(rb"Final-Recipient: rfc822; (\S+)", data) == [b"ghost@one.example"]  # alice got it
    assert b"Subject: bounced" in data  # the original's headers
