"""Two masters and two slaves (real `meshmail run` processes) taking inbound mail on their MX:
s1 publishes a kit Dovecot's LMTP, s2 a kit Postfix over SMTP with XCLIENT (it delivers to a
Dovecot of its own). smtplib and swaks send through both masters. No master relays to a
domain outside the cluster, however the address is dressed and whichever loopback address the
client comes from. Mail for a slave that is down waits in the masters' queues and arrives
once when it is back: 500 messages through both masters; a master killed (kill -9) holding
mail; masters killed at random moments in the middle of many sessions (no 250 ever lost).

One cluster serves the whole module; every test starts from it healthy (`Mesh.healthy`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import random
import re
import smtplib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import mailkit
from helpers.cluster import Cluster
from helpers.config import set_key

from meshmail.security import files

MASTERS = ["m1", "m2"]
ANN, BOB = "ann@one.example", "bob@two.example"
#: The domain of every Message-ID sent here; the local part is what the tests count.
ID_DOMAIN = "mxcluster.test"
#: [mx] of the masters: quick retries, and rate limits out of the way of one busy test client.
MX_SETTINGS = {
    "retry_min": "1",
    "retry_max": "2",
    "messages_per_minute": "1000000",
    "connections_per_minute": "1000000",
    "max_sessions_per_client": "1000",
}
#: How long queued mail may take to arrive once its slave answers again (generous: a busy CI
#: machine, and the slave's probe and gossip must first tell the masters).
DRAIN_TIMEOUT = 90.0
_MESSAGE_ID = re.compile(rb"^message-id:\s*<([^@>]+)@" + re.escape(ID_DOMAIN.encode()) + rb">", re.I | re.M)


def message(message_id: str, recipient: str) -> bytes:
    return (
        f"From: sender@outside.example\r\nTo: {recipient}\r\nSubject: {message_id}\r\n"
        f"Message-ID: <{message_id}@{ID_DOMAIN}>\r\n\r\nThe body of {message_id}.\r\n"
    ).encode()


def delivered(dovecot: mailkit.Dovecot, address: str) -> collections.Counter[str]:
    """How often each Message-ID (local part) is in `address`'s mailbox."""
    folder = dovecot.maildir(address)
    found: collections.Counter[str] = collections.Counter()
    for sub in ("new", "cur"):
        if (folder / sub).is_dir():
            for path in (folder / sub).iterdir():
                head = path.read_bytes().split(b"\n\n", 1)[0]
                found.update(m.decode() for m in _MESSAGE_ID.findall(head))
    return found


class Mesh:
    """The cluster of this module: masters m1 and m2, slaves s1 (Dovecot d1's LMTP) and s2
    (Postfix `postfix` over SMTP with XCLIENT, delivering to Dovecot d2)."""

    def __init__(self, fleet: Cluster, d1: mailkit.Dovecot, d2: mailkit.Dovecot, postfix: mailkit.Postfix) -> None:
        self.fleet = fleet
        self.d1, self.d2, self.postfix = d1, d2, postfix

    def port(self, master: str) -> int:
        """The MX port `master` reported in its ready file (a restart binds a new one)."""
        bound = json.loads(self.fleet.nodes[master].ready.read_text())
        return int(bound["mx"].rsplit(":", 1)[1])

    def client(self, master: str, source: str = "127.0.0.1") -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port(master), timeout=30, source_address=(source, 0))

    def send(self, master: str, message_id: str, recipient: str, source: str = "127.0.0.1") -> None:
        with self.client(master, source) as client:
            assert client.sendmail("sender@outside.example", [recipient], message(message_id, recipient)) == {}

    def swaks(self, master: str, *args: str, source: str = "127.0.0.1") -> subprocess.CompletedProcess:
        return subprocess.run(
            ["swaks", "--server", "127.0.0.1", "--port", str(self.port(master)), "--local-interface", source,
             "--helo", "swaks.example", *args],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    def lmtp_up(self, up: bool) -> None:
        """Wait until both masters see s1's LMTP endpoint as `up` (s1's probe, then gossip)."""

        def seen(statuses: dict[str, dict]) -> bool:
            return all(
                member["endpoints"].get("lmtp", {}).get("up") is up
                for status in statuses.values()
                for member in status["members"]
                if member["name"] == "s1"
            )

        self.fleet.wait(f"s1's lmtp {'up' if up else 'down'} on both masters", MASTERS, seen)

    def slave_down(self) -> None:
        self.d1.stop()
        self.lmtp_up(False)

    def queued(self, master: str) -> int:
        return self.fleet.status(master)["mx"]["queued"]

    def restart(self, master: str) -> None:
        """Start `master` again on its data dir and wait until the cluster sees it alive."""
        self.fleet.start(master)
        self.fleet.wait_alive(MASTERS + ["s1", "s2"])

    def healthy(self) -> None:
        """Every node and d1 running, s1's LMTP up on both masters, nothing queued."""
        for name, node in self.fleet.nodes.items():
            if node.exited() is not None:
                self.restart(name)
        if not self.d1.running:
            self.d1.start()
        self.lmtp_up(True)
        self.fleet.wait("queues empty", MASTERS, lambda statuses: all(s["mx"]["queued"] == 0 for s in statuses.values()))

    def wait_delivered(
        self, dovecot: mailkit.Dovecot, address: str, ids: set[str], timeout: float = DRAIN_TIMEOUT
    ) -> collections.Counter[str]:
        """Poll the mailbox until every one of `ids` is there; the counts of the whole mailbox."""
        deadline = time.monotonic() + timeout
        while not ids <= set(found := delivered(dovecot, address)):
            if time.monotonic() > deadline:
                missing = sorted(ids - set(found))
                queued = {m: self.queued(m) for m in MASTERS if self.fleet.nodes[m].exited() is None}
                raise AssertionError(
                    f"{len(missing)} of {len(ids)} messages not delivered to {address} within {timeout:.0f} s"
                    f" (e.g. {missing[:5]}); queued on the masters: {queued}\n{self.fleet.logs()}"
                )
            time.sleep(0.2)
        return found


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def _slave_config(source: Path, endpoints: str) -> str:
    return f"""
[endpoints]
{endpoints}

[slave]
poll_interval = 0.2
settle = 0.5
probe_interval = 0.3
probe_timeout = 0.25

[[slave.sources]]
type = "dovecot"
path = "{source}"
"""


def _configure_mx(fleet: Cluster, master: str) -> None:
    config = fleet.data_dir(master) / files.CONFIG
    text = config.read_text()
    for key, value in (MX_SETTINGS | {"hostname": f'"mx-{master}.test"'}).items():
        text = set_key(text, "mx", key, value)
    config.write_text(text)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Iterator[Mesh]:
    mailkit.require("dovecot", "postfix", "swaks")
    root = tmp_path_factory.mktemp("mxcluster")
    (root / "nodes").mkdir()
    fleet = Cluster(root / "nodes")
    with (
        mailkit.dovecot(root / "d1", {ANN: "secret-1"}, name="d1") as d1,
        mailkit.dovecot(root / "d2", {BOB: "secret-2"}, name="d2") as d2,
        mailkit.postfix(root / "p2", d2, ["two.example"], xclient=True) as postfix,
    ):
        try:
            fleet.init("m1")
            _configure_mx(fleet, "m1")
            fleet.start("m1")
            fleet.wait_alive(["m1"])
            assert fleet.join("m2", fleet.token("m1", "master"), "master").returncode == 0
            _configure_mx(fleet, "m2")
            slave_token = fleet.token("m1", "slave", "--uses", "2")
            for slave in ("s1", "s2"):
                assert fleet.join(slave, slave_token, "slave").returncode == 0
            _append(
                fleet.data_dir("s1") / files.CONFIG, _slave_config(d1.passwd, f'lmtp = "{d1.endpoints()["lmtp"]}"')
            )
            _append(
                fleet.data_dir("s2") / files.CONFIG,
                _slave_config(d2.passwd, f'smtp = {{ address = "{postfix.endpoint}", client_address = "xclient" }}'),
            )
            fleet.start("m2", "s1", "s2")
            fleet.wait_alive(MASTERS + ["s1", "s2"])
            fleet.wait(
                "both domains routed on both masters",
                MASTERS,
                lambda statuses: all(status["state"]["domains"] >= 2 for status in statuses.values()),
            )
            yield Mesh(fleet, d1, d2, postfix)
        finally:
            fleet.close()
            print(fleet.logs())


@pytest.fixture
def healthy(mesh: Mesh) -> Mesh:
    mesh.healthy()
    return mesh


def postfix_clients(postfix: mailkit.Postfix) -> dict[str, str]:
    """{Message-ID local part: the client address Postfix logged for it}, by the queue id of
    its "client=" and "message-id=" lines."""
    log = postfix.log.read_text(errors="replace")
    clients = dict(re.findall(r" ([0-9A-F]{6,}): client=[^\[]*\[([^\]]+)\]", log))
    ids = re.findall(r" ([0-9A-F]{6,}): message-id=<([^@>]+)@" + re.escape(ID_DOMAIN) + ">", log)
    return {message_id: clients.get(queue_id, "?") for queue_id, message_id in ids}


def test_smtplib_and_swaks_deliver_through_either_master_to_both_kinds_of_slave(healthy):
    mesh = healthy
    for master in MASTERS:
        for recipient, dovecot in ((ANN, mesh.d1), (BOB, mesh.d2)):
            user = recipient.split("@")[0]
            mesh.send(master, f"smtplib-{master}-{user}", recipient, source="127.0.0.4")
            if dovecot is mesh.d1:  # in-line over LMTP: in the mailbox before the 250
                assert f"smtplib-{master}-{user}" in delivered(mesh.d1, ANN)
            answer = mesh.swaks(
                master, "--from", "sender@outside.example", "--to", recipient,
                "--header", f"Message-ID: <swaks-{master}-{user}@{ID_DOMAIN}>", source="127.0.0.3",
            )  # fmt: skip
            assert answer.returncode == 0, answer.stdout + answer.stderr
            assert re.search(r"<-  250 2\.0\.0 Ok: delivered as \S+", answer.stdout), answer.stdout

    sent = {f"{how}-{master}-{user}" for how in ("smtplib", "swaks") for master in MASTERS for user in ("ann", "bob")}
    ann = mesh.wait_delivered(mesh.d1, ANN, {i for i in sent if i.endswith("-ann")}, timeout=30)
    bob = mesh.wait_delivered(mesh.d2, BOB, {i for i in sent if i.endswith("-bob")}, timeout=30)
    assert all(ann[i] == 1 for i in sent if i.endswith("-ann")) and all(bob[i] == 1 for i in sent if i.endswith("-bob"))
    for address, dovecot in ((ANN, mesh.d1), (BOB, mesh.d2)):
        for text in dovecot.mailbox(address):
            if b"swaks-m2-" in text:
                # The master's Received line names the client's address, the body is as sent.
                assert b"from swaks.example ([127.0.0.3])\n\tby mx-m2.test (meshmail) with ESMTP" in text, text

    # s2's Postfix heard, by XCLIENT, where each message really came from.
    clients = postfix_clients(mesh.postfix)
    assert {i: clients.get(i) for i in sent if i.endswith("-bob")} == {
        f"{how}-{master}-bob": source
        for how, source in (("smtplib", "127.0.0.4"), ("swaks", "127.0.0.3"))
        for master in MASTERS
    }, mesh.postfix.log_tail()
