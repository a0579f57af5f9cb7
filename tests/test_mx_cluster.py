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
import os
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
from helpers.config import set_key, with_seeds

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
        """Start `master` again on its data dir and wait until it sees the others alive."""
        self.fleet.start(master)
        self.fleet.wait_alive(MASTERS + ["s1", "s2"], observers=[master])

    def healthy(self) -> None:
        """Every node and d1 running, s1's LMTP up on both masters, nothing queued."""
        for name, node in self.fleet.nodes.items():
            if node.exited() is not None:
                self.restart(name)
        if not self.d1.running:
            self.d1.start()
        self.lmtp_up(True)
        self.wait_empty(*MASTERS)

    def wait_empty(self, *masters: str) -> None:
        """Wait until the queues of `masters` hold nothing."""
        self.fleet.wait(
            f"{', '.join(masters)}: queue empty",
            list(masters),
            lambda statuses: all(status["mx"]["queued"] == 0 for status in statuses.values()),
        )

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
            _append(fleet.data_dir("s1") / files.CONFIG, _slave_config(d1.passwd, f'lmtp = "{d1.endpoints()["lmtp"]}"'))
            _append(
                fleet.data_dir("s2") / files.CONFIG,
                _slave_config(d2.passwd, f'smtp = {{ address = "{postfix.endpoint}", client_address = "xclient" }}'),
            )
            fleet.start("m2", "s1", "s2")
            # The masters seed each other, as in production: m1, made by init, has no seed of its
            # own, and a restart quicker than the others' failure detection would leave it alone.
            m1 = fleet.nodes["m1"]
            m1.config.write_text(with_seeds(m1.config.read_text(), [f"127.0.0.1:{fleet.nodes['m2'].gossip_port}"]))
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


#: RCPT arguments for a domain outside the cluster, however dressed: each master refuses them itself.
OUTSIDE = [
    "<someone@outside.example>",
    "<postmaster@outside.example>",
    '<"someone"@outside.example>',
    "<@one.example:someone@outside.example>",  # source routes: the mailbox after the colon counts
    "<@one.example,@two.example:someone@outside.example>",
    "<someone%two.example@outside.example>",
    "<someone@[192.0.2.1]>",
    "<someone@one.example.outside.example>",
]
#: RCPT arguments that end in a cluster domain but hide another in the local part (percent
#: hack, bang path, quoted address): the slave is asked and refuses the mailbox (Dovecot does
#: not know the user; Postfix sees the hidden destination and denies relaying).
HIDDEN = {
    "<someone%outside.example@one.example>": b"550 5.1.1",
    "<someone%outside.example@two.example>": b"554 5.7.1",
    '<"someone@outside.example"@one.example>': b"550 5.1.1",
    '<"someone@outside.example"@two.example>': b"554 5.7.1",
    '<"someone%outside.example"@two.example>': b"554 5.7.1",
    "<outside.example!someone@one.example>": b"550 5.1.1",
    "<outside.example!someone@two.example>": b"554 5.7.1",
}
#: Not addresses at all (a second @, a trailing dot): refused as bad syntax.
MALFORMED = [
    "<someone@outside.example@one.example>",
    "<someone@outside.example@two.example>",
    "<someone@outside.example%two.example>",
    "<someone@outside.example.>",
]


@pytest.mark.parametrize("source", ["127.0.0.1", "127.0.0.9"])
@pytest.mark.parametrize("master", MASTERS)
def test_no_master_relays_to_a_domain_outside_the_cluster(healthy, master, source):
    mesh = healthy
    marker = f"relay-{master}-{source}"
    before = mesh.fleet.status(master)["mx"]["rejections"].get("relay_denied", 0)
    with mesh.client(master, source) as client:
        client.ehlo("relay-test.example")
        assert client.mail("<spammer@outside.example>")[0] == 250
        answers = {recipient: client.docmd("RCPT TO:" + recipient) for recipient in [*OUTSIDE, *HIDDEN, *MALFORMED]}
        refused = {r: f"{code} {text.decode()}".encode() for r, (code, text) in answers.items()}
        assert {r: answer[:9] for r, answer in refused.items()} == {
            **{r: b"550 5.7.1" for r in OUTSIDE},
            **HIDDEN,
            **{r: b"501 5.1.3" for r in MALFORMED},
        }, refused
        assert all(b"Relaying denied" in refused[r] for r in OUTSIDE)
        assert client.docmd("DATA")[0] in (503, 554)  # no recipient accepted: nothing to send
        # With one recipient of the cluster among them, only that one gets the message.
        client.rset()
        client.mail("<spammer@outside.example>")
        assert client.docmd(f"RCPT TO:<{ANN}>")[0] == 250
        assert all(client.docmd("RCPT TO:" + r)[0] >= 500 for r in OUTSIDE)
        assert client.data(message(marker, "someone@outside.example"))[0] == 250
    swaks = mesh.swaks(
        master, "--from", "spammer@outside.example", "--to", "someone@outside.example",
        "--header", f"Message-ID: <{marker}-swaks@{ID_DOMAIN}>", source=source,
    )  # fmt: skip
    assert swaks.returncode != 0 and "<** 550 5.7.1 Relaying denied" in swaks.stdout, swaks.stdout
    after = mesh.fleet.status(master)["mx"]["rejections"]["relay_denied"]
    assert after - before == 2 * len(OUTSIDE) + 1

    # Nothing left the machine: the marker reached ann alone, once; no kit mailbox holds
    # anything else of it; Postfix tried no delivery to an outside address.
    assert delivered(mesh.d1, ANN)[marker] == 1
    assert not delivered(mesh.d1, ANN)[f"{marker}-swaks"]
    assert not any(i.startswith(marker) for i in delivered(mesh.d2, BOB))
    for dovecot in (mesh.d1, mesh.d2):
        for path in dovecot.mail.rglob("*"):
            if path.is_file() and path.parent.name in ("new", "cur"):
                assert path.parents[2] in (mesh.d1.maildir(ANN).parent, mesh.d2.maildir(BOB).parent), path
    attempts = [
        line for line in mesh.postfix.log.read_text(errors="replace").splitlines()
        if re.search(r"to=<[^>]*outside\.example", line) and "NOQUEUE: reject: RCPT" not in line
    ]  # fmt: skip
    assert attempts == []


#: Sessions sending the 500 messages at once (an even number: session w sends messages w,
#: w + STORE_SESSIONS, ... through MASTERS[w % 2], so the messages alternate between masters).
STORE_SESSIONS = 10


def test_500_messages_for_a_slave_that_is_down_arrive_once_it_is_back(healthy):
    mesh = healthy
    ids = [f"stored-{n:03d}" for n in range(500)]
    mesh.slave_down()

    def session(worker: int) -> None:
        with mesh.client(MASTERS[worker % 2], f"127.0.3.{worker + 1}") as client:
            for n in range(worker, len(ids), STORE_SESSIONS):
                assert client.sendmail("sender@outside.example", [ANN], message(ids[n], ANN)) == {}

    with concurrent.futures.ThreadPoolExecutor(STORE_SESSIONS) as pool:
        list(pool.map(session, range(STORE_SESSIONS)))
    for master in MASTERS:  # every 250 came with the message on the master's disk
        block = mesh.fleet.status(master)["mx"]
        assert block["queued"] == 250 and block["slaves"] == {"s1": {"messages": 250, "bytes": block["queued_bytes"]}}
    assert not set(ids) & set(delivered(mesh.d1, ANN))

    mesh.d1.start()  # nothing said to the masters: s1's probe sees LMTP answer, gossip tells them
    found = mesh.wait_delivered(mesh.d1, ANN, set(ids))
    assert {i: found[i] for i in ids if found[i] != 1} == {}
    mesh.wait_empty(*MASTERS)


def test_a_master_killed_holding_queued_mail_delivers_it_after_its_restart(healthy):
    mesh = healthy
    ids = {f"killed-{n:02d}" for n in range(20)}
    mesh.slave_down()
    with mesh.client("m1") as client:
        for message_id in sorted(ids):
            assert client.sendmail("sender@outside.example", [ANN], message(message_id, ANN)) == {}
    assert mesh.queued("m1") == 20
    mesh.fleet.kill("m1")
    mesh.restart("m1")  # the same data dir: the queue is rescanned
    assert mesh.queued("m1") == 20 and not ids & set(delivered(mesh.d1, ANN))

    mesh.d1.start()
    found = mesh.wait_delivered(mesh.d1, ANN, ids)
    assert {i: found[i] for i in ids if found[i] != 1} == {}
    mesh.wait_empty("m1")


#: Crash injection: rounds, sessions at once, messages per session: the full 20 rounds of 200
#: sessions with MESHMAIL_LONG=1 (`make test-long`, many minutes on two cores), 6 rounds of 50
#: in the default run, which keeps this file within a few minutes.
CRASH_ROUNDS, CRASH_SESSIONS, CRASH_MESSAGES = (20, 200, 6) if os.environ.get("MESHMAIL_LONG") else (6, 50, 6)


def sessions_until_killed(mesh: Mesh, master: str, prefix: str, rng: random.Random) -> tuple[set[str], int]:
    """CRASH_SESSIONS sessions to `master` at once, each sending CRASH_MESSAGES messages
    (Message-IDs prefix-SESSION-N) until `master` is killed (kill -9), after a random number of
    250s and a random moment more. The ids that got a 250, and that number."""
    port, total = mesh.port(master), CRASH_SESSIONS * CRASH_MESSAGES
    acknowledged: list[str] = []
    lock = threading.Lock()

    def session(worker: int) -> None:
        try:
            source = f"127.0.4.{worker + 1}"
            with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as client:
                for n in range(CRASH_MESSAGES):
                    message_id = f"{prefix}-{worker}-{n}"
                    if client.sendmail("sender@outside.example", [ANN], message(message_id, ANN)) == {}:
                        with lock:
                            acknowledged.append(message_id)
        except (smtplib.SMTPException, OSError):
            pass  # the master is gone: what had no 250 is the client's to send again

    threads = [threading.Thread(target=session, args=(worker,)) for worker in range(CRASH_SESSIONS)]
    for thread in threads:
        thread.start()
    kill_after = rng.randrange(total // 20, total * 3 // 4)
    deadline = time.monotonic() + 60
    while len(acknowledged) < kill_after and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(rng.uniform(0, 0.02))
    mesh.fleet.kill(master)
    for thread in threads:
        thread.join(60)
    assert 0 < len(acknowledged) < total, (kill_after, len(acknowledged))
    return set(acknowledged), kill_after


def test_kill_9_in_the_middle_of_many_sessions_loses_no_message_that_got_250(healthy):
    mesh = healthy
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    report = []
    for round_ in range(CRASH_ROUNDS):
        master = MASTERS[round_ % 2]
        mesh.slave_down()
        acknowledged, kill_after = sessions_until_killed(mesh, master, f"crash-{round_}", rng)
        mesh.d1.start()  # while the master is down: its restart then finds the slave up
        mesh.restart(master)
        mesh.wait_delivered(mesh.d1, ANN, acknowledged)
        mesh.wait_empty(master)  # also what was on disk without its 250 reaching the client
        this_round = {i: n for i, n in delivered(mesh.d1, ANN).items() if i.startswith(f"crash-{round_}-")}
        report.append(
            f"round {round_}: {master} killed after {kill_after}+ 250s; {len(acknowledged)} got 250,"
            f" {len(this_round)} delivered ({len(set(this_round) - acknowledged)} without a 250),"
            f" {sum(n > 1 for n in this_round.values())} twice or more"
        )
        assert acknowledged <= set(this_round), f"seed {seed}: " + "; ".join(report)
    print(f"crash injection (seed {seed}):\n" + "\n".join(report))
