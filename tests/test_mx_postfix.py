"""The MX of a real `meshmail run` master against the kit's real Postfix, in two roles.

As a slave's SMTP service that lets 127.0.0.0/8 use XFORWARD: for mail delivered in-line, and
for mail a client sends while that Postfix is stopped (it waits in the master's queue until
Postfix is back), Postfix records the original client's address besides the master's. As
the [mx] smarthost offering STARTTLS: a bounce to a sender outside the cluster reaches it
only over TLS with a certificate the master trusts ([mx] smarthost_ca); while the
certificate is not trusted, the bounce stays queued, is retried, and each failed attempt is
logged with its reason.

One cluster serves the module: master n1; slave n2 publishing a kit Dovecot's LMTP for
one.example; slave n3 publishing the XFORWARD Postfix (which delivers to that Dovecot) for
two.example. The smarthost Postfix delivers outside.example to the same Dovecot.
"""

from __future__ import annotations

import email
import json
import re
import smtplib
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from helpers import mailkit
from helpers.cluster import Cluster, Node
from helpers.config import QUICK_SLAVE, set_key, with_seeds

from meshmail.security import files

MASTER = "n1"
ANN, BOB = "ann@one.example", "bob@two.example"
#: A sender outside the cluster: its bounces go through the smarthost, which delivers them to the kit's Dovecot.
SENDER = "sender@outside.example"
#: Where the test's client connects from: neither the master's address nor 127.0.0.1.
CLIENT = "127.0.0.77"
CLIENT_HELO = "client.example"
#: [mx] of the master: quick retries; unknown users found at delivery (so they bounce); the
#: smarthost's certificate checked (the default, spelled out).
MX_SETTINGS = {
    "hostname": '"mx-n1.test"',
    "retry_min": "1",
    "retry_max": "2",
    "verify_recipients": "false",
    "smarthost_tls_verify": "true",
}
#: How long queued mail may take to arrive once its next hop answers (a busy CI machine).
DELIVERY_TIMEOUT = 30.0


class Mesh:
    """The cluster of this module and the kit's servers around it."""

    def __init__(
        self, fleet: Cluster, store: mailkit.Dovecot, slave_mta: mailkit.Postfix, smarthost: mailkit.Postfix,
        other_ca: Path,
    ) -> None:  # fmt: skip
        self.fleet, self.store, self.slave_mta, self.smarthost = fleet, store, slave_mta, smarthost
        #: A CA file that has nothing to do with the smarthost's certificate: what the master
        #: trusts until told otherwise.
        self.other_ca = other_ca
        self.trusted = other_ca
        self._trust(other_ca)

    def _trust(self, ca: Path) -> None:
        config = self.master.config
        config.write_text(set_key(config.read_text(), "mx", "smarthost_ca", f'"{ca}"'))

    @property
    def master(self) -> Node:
        return self.fleet.nodes[MASTER]

    def run_master(self, trusted: Path) -> None:
        """(Re)start the master with `trusted` as its [mx] smarthost_ca, unless it runs so. The
        queue stays on disk."""
        if self.trusted == trusted and self.master.exited() is None:
            return
        self.master.kill()
        self._trust(trusted)
        self.fleet.start(MASTER)
        self.trusted = trusted

    def mx_port(self) -> int:
        return int(json.loads(self.master.ready.read_text())["mx"].rsplit(":", 1)[1])

    def send(self, subject: str, sender: str, recipients: list[str]) -> tuple[int, bytes]:
        """One message from CLIENT through the master's MX; the reply to its end of DATA."""
        mail = EmailMessage()
        mail["From"], mail["To"], mail["Subject"] = sender, ", ".join(recipients), subject
        mail["Message-ID"] = f"<{subject}@outside.example>"
        mail.set_content(f"The body of {subject}.\n")
        with smtplib.SMTP(
            "127.0.0.1", self.mx_port(), local_hostname=CLIENT_HELO, timeout=30, source_address=(CLIENT, 0)
        ) as client:
            client.ehlo()
            assert client.mail(sender)[0] == 250
            for recipient in recipients:
                assert client.rcpt(recipient)[0] == 250
            return client.data(mail.as_string())

    def mx(self) -> dict:
        return self.fleet.status(MASTER)["mx"]

    def wait_mx(self, what: str, condition) -> dict:
        return self.fleet.wait(what, [MASTER], lambda found: condition(found[MASTER]["mx"]))[MASTER]["mx"]

    def endpoint_up(self, slave: str, service: str, up: bool) -> None:
        """Wait until the master sees `slave`'s `service` endpoint as `up` (its probe, then gossip)."""
        self.fleet.wait(
            f"{slave}'s {service} {'up' if up else 'down'} on {MASTER}",
            [MASTER],
            lambda found: any(
                member["name"] == slave and member["endpoints"].get(service, {}).get("up") is up
                for member in found[MASTER]["members"]
            ),
        )

    def queue(self) -> list[dict]:
        """The master's queue as `meshmail queue list` shows it."""
        token = files.read_api_token(self.fleet.data_dir(MASTER))
        return self.master.get("/queue", token)["messages"]


def mailbox(dovecot: mailkit.Dovecot, address: str, subject: str) -> list[bytes]:
    """The messages in `address`'s INBOX whose Message-ID is <SUBJECT@outside.example>."""
    return [mail for mail in dovecot.mailbox(address) if f"{subject}@outside.example".encode() in mail]


def wait_for(what: str, condition, timeout: float = DELIVERY_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return found


def _slave_config(endpoints: str, domain: str) -> str:
    return f"""
[endpoints]
{endpoints}
{QUICK_SLAVE}
[[slave.sources]]
type = "static"
domains = ["{domain}"]
"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Iterator[Mesh]:
    mailkit.require("dovecot", "postfix")
    root = tmp_path_factory.mktemp("mxpostfix")
    users = {ANN: "ann-secret-1", BOB: "bob-secret-1", SENDER: "sender-secret-1"}
    with (
        mailkit.dovecot(root / "store", users, name="store") as store,
        mailkit.postfix(root / "slave-mta", store, ["two.example"], xforward=True) as slave_mta,
        mailkit.postfix(root / "smarthost", store, ["outside.example"], tls=True) as smarthost,
    ):
        other_ca, _ = mailkit.write_certificate(root / "other-ca")
        (root / "nodes").mkdir()
        fleet = Cluster.configured(3, root / "nodes")
        try:
            master = fleet.nodes[MASTER].config
            text = master.read_text()
            for key, value in (MX_SETTINGS | {"smarthost": f'"{smarthost.endpoint}"'}).items():
                text = set_key(text, "mx", key, value)
            master.write_text(text)
            for name, endpoints, domain in (
                ("n2", f'lmtp = "{store.endpoints()["lmtp"]}"', "one.example"),
                ("n3", f'smtp = "{slave_mta.endpoint}"', "two.example"),
            ):
                config = fleet.nodes[name].config
                config.write_text(
                    config.read_text().replace(f'name = "{name}"', f'name = "{name}"\nrole = "slave"')
                    + _slave_config(endpoints, domain)
                )
            mesh = Mesh(fleet, store, slave_mta, smarthost, other_ca)
            fleet.start()
            fleet.wait(
                "both domains routed on the master", [MASTER], lambda found: found[MASTER]["state"]["domains"] >= 2
            )
            # A restarted master seeds itself from a slave: it is not left alone when it comes back
            # before the others have noticed it was gone.
            master.write_text(with_seeds(master.read_text(), [f"127.0.0.1:{fleet.nodes['n2'].gossip_port}"]))
            mesh.endpoint_up("n3", "smtp", True)
            yield mesh
        finally:
            fleet.close()
            print(fleet.logs())


def postfix_log(postfix: mailkit.Postfix) -> str:
    return postfix.log.read_text(errors="replace")


def postfix_clients(postfix: mailkit.Postfix) -> dict[str, str]:
    """{subject of a message sent here: what Postfix's smtpd logged as its client}: the
    "client=..." line of the queue id that its "message-id=<SUBJECT@outside.example>" line names."""
    log = postfix_log(postfix)
    clients = dict(re.findall(r" ([0-9A-F]{6,}): (client=.*)", log))
    ids = re.findall(r" ([0-9A-F]{6,}): message-id=<([^@>]+)@outside\.example>", log)
    return {subject: clients.get(queue_id, "?") for queue_id, subject in ids}


def test_queued_mail_reaches_the_smtp_slave_with_the_clients_address_by_xforward(mesh):
    """Postfix allows XFORWARD from the master: for the message delivered in-line and for the one
    delivered from the queue once Postfix is back, it records the master as the connecting
    client and CLIENT as the original one."""
    mesh.endpoint_up("n3", "smtp", True)
    code, text = mesh.send("xforward-inline", SENDER, [BOB])
    assert (code, b"delivered" in text) == (250, True), text
    mesh.slave_mta.stop()
    try:
        mesh.endpoint_up("n3", "smtp", False)
        code, text = mesh.send("xforward-queued", SENDER, [BOB])
        assert (code, b"queued" in text) == (250, True), text
        assert mesh.mx()["slaves"] == {"n3": {"messages": 1, "bytes": mesh.mx()["queued_bytes"]}}
        assert not mailbox(mesh.store, BOB, "xforward-queued")
    finally:
        mesh.slave_mta.start()
    [mail] = wait_for("the queued message delivered", lambda: mailbox(mesh.store, BOB, "xforward-queued"))
    mesh.wait_mx("the queue emptied", lambda mx: mx["queued"] == 0)
    assert len(mailbox(mesh.store, BOB, "xforward-queued")) == 1
    # The master's own Received line names the client; the body is as sent.
    assert f"Received: from {CLIENT_HELO} ([{CLIENT}])\n\tby mx-n1.test (meshmail) with ESMTP".encode() in mail, mail
    assert mail.endswith(b"\n\nThe body of xforward-queued.\n")
    clients = postfix_clients(mesh.slave_mta)
    assert {subject: clients.get(subject) for subject in ("xforward-inline", "xforward-queued")} == {
        subject: f"client=unknown[127.0.0.1], orig_client=unknown[{CLIENT}]"
        for subject in ("xforward-inline", "xforward-queued")
    }, postfix_log(mesh.slave_mta)


def test_bounces_to_outside_senders_go_to_the_smarthost_over_checked_tls_only(mesh):
    """A recipient the slave refuses at delivery bounces to a sender outside the cluster,
    through the smarthost. While the master does not trust the smarthost's certificate, the
    notice is not handed over (not in plain text either) and stays queued, retried; once the
    master trusts it (restarted with that CA), the queued notice arrives over TLS."""
    mesh.run_master(mesh.other_ca)
    mesh.endpoint_up("n2", "lmtp", True)
    before = mesh.mx()["recipients"]
    code, text = mesh.send("bounced", SENDER, [ANN, "ghost@one.example"])
    assert (code, b"delivered" in text) == (250, True), text
    assert mailbox(mesh.store, ANN, "bounced")  # in-line, before the 250; ghost refused there
    mx = mesh.wait_mx(  # or, wrongly, handed over: the assertions below then say so at once
        "the notice tried at the smarthost twice",
        lambda mx: mx["recipients"].get("deferred", 0) >= before.get("deferred", 0) + 2 or mx["queued"] == 0,
    )
    assert mx["recipients"]["bounces"] == before.get("bounces", 0) + 1
    assert mx["slaves"] == {"@smarthost": {"messages": 1, "bytes": mx["queued_bytes"]}}
    [notice] = [m for m in mesh.queue() if m["sender"] == ""]
    assert notice["recipients"] == [{"address": SENDER, "slave": "@smarthost"}]
    assert notice["attempts"] >= 2 and notice["last_reply"].startswith("451 4.4.1 "), notice
    log = postfix_log(mesh.smarthost)
    assert log.count("lost connection after STARTTLS from unknown[127.0.0.1]") >= 2, log
    assert "TLS connection established" not in log and ": client=" not in log, log  # nothing in plain text
    assert mesh.store.mailbox(SENDER) == []
    warned = f"delivery to @smarthost at {mesh.smarthost.endpoint} failed: "
    assert any(
        warned in line and "CERTIFICATE_VERIFY_FAILED" in line for line in mesh.master.log.read_text().splitlines()
    )

    mesh.run_master(mesh.smarthost.cafile)
    [arrived] = wait_for("the notice delivered", lambda: mesh.store.mailbox(SENDER))
    mesh.wait_mx("the queue emptied", lambda mx: mx["queued"] == 0)
    report = email.message_from_bytes(arrived)
    assert (
        report.get_content_type() == "multipart/report" and report["Subject"] == "Undelivered Mail Returned to Sender"
    )
    assert re.findall(rb"Final-Recipient: rfc822; (\S+)", arrived) == [b"ghost@one.example"]  # ann got it
    assert b"\nSubject: bounced\n" in arrived  # the original's headers
    [queue_id] = re.findall(rb"by mx-\d+\.mailkit\.test \(Postfix\) with ESMTPS id ([0-9A-F]+)", arrived)
    log = postfix_log(mesh.smarthost)
    assert "Anonymous TLS connection established from unknown[127.0.0.1]" in log, log
    assert f"{queue_id.decode()}: client=unknown[127.0.0.1]" in log
    assert re.search(rf"{queue_id.decode()}: from=<>, size=\d+, nrcpt=1", log), log
