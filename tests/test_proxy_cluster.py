"""Two masters and two slaves (real `meshmail run` processes) in front of two real Dovecots:
users of either slave log in through either master's proxy over IMAP (143 + STARTTLS, 993)
and POP3; an unknown domain and a wrong password answer alike and as fast; a stopped Dovecot
gives NO [UNAVAILABLE] and a started one logs in again; a master killed mid-session or
drained sends its clients to the other master; a new certificate is taken on SIGHUP."""

from __future__ import annotations

import imaplib
import json
import poplib
import signal
import socket
import ssl
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import mailkit
from helpers.cluster import Cluster
from helpers.config import QUICK_SLAVE

MASTERS = ["m1", "m2"]
USERS = {"ann@one.example": "secret-1", "bob@two.example": "secret-2"}
#: Seconds the proxies wait before a "wrong credentials" answer (short: the tests refuse often).
FAILURE_DELAY = 0.3


@pytest.fixture
def backends(tmp_path) -> Iterator[tuple[mailkit.Dovecot, mailkit.Dovecot]]:
    mailkit.require("dovecot")
    trusted = ["127.0.0.0/8"]  # the masters' address: Dovecot takes the client's address by ID from it
    with (
        mailkit.dovecot(
            tmp_path / "d1",
            {"ann@one.example": "secret-1"},
            name="d1",
            trusted_networks=trusted,
        ) as d1,
        mailkit.dovecot(
            tmp_path / "d2",
            {"bob@two.example": "secret-2"},
            name="d2",
            trusted_networks=trusted,
        ) as d2,
    ):
        yield d1, d2


def start_cluster(fleet: Cluster, d1: mailkit.Dovecot, d2: mailkit.Dovecot, folder: Path, **proxy: str) -> Path:
    """m1 and m2 with [proxy] (plus `proxy` settings, TOML values), s1 publishing d1 and s2
    d2, all running and both domains routed on both masters; returns the proxies' certificate."""
    cert, key = mailkit.write_certificate(folder / "proxy-cert")
    settings = {
        "imap": '"127.0.0.1:0"', "imaps": '"127.0.0.1:0"', "pop3": '"127.0.0.1:0"', "pop3s": "false",
        "submission": "false", "submissions": "false", "cert": f'"{cert}"', "key": f'"{key}"',
        "backend_cas": f'{{ s1 = "{d1.cafile}", s2 = "{d2.cafile}" }}', "failure_delay": str(FAILURE_DELAY),
    } | proxy  # fmt: skip
    section = "\n[proxy]\n" + "".join(f"{name} = {value}\n" for name, value in settings.items())
    fleet.init("m1")
    fleet.append_config("m1", section)
    fleet.start("m1")
    fleet.wait_alive(["m1"])
    assert fleet.join("m2", fleet.token("m1", "master"), "master").returncode == 0
    fleet.append_config("m2", section)
    slave_token = fleet.token("m1", "slave", "--uses", "2")
    for slave, dovecot in (("s1", d1), ("s2", d2)):
        assert fleet.join(slave, slave_token, "slave").returncode == 0
        found = dovecot.endpoints()
        fleet.append_config(
            slave,
            f"""
[endpoints]
imap = {{ address = "{found["imap"]}", transport = "starttls", client_address = "id" }}
pop3 = {{ address = "{found["pop3"]}", transport = "starttls" }}

{QUICK_SLAVE}
[[slave.sources]]
type = "dovecot"
path = "{dovecot.passwd}"
""",
        )
    fleet.start("m2", "s1", "s2")
    fleet.wait_alive(["m1", "m2", "s1", "s2"])
    fleet.wait(
        "both domains routed on every master",
        MASTERS,
        lambda statuses: all(status["state"]["domains"] >= 2 for status in statuses.values()),
    )
    return cert


def proxy_ports(fleet: Cluster, name: str) -> dict[str, int]:
    bound = json.loads(fleet._node(name).ready.read_text())
    return {service: int(bound[service].rsplit(":", 1)[1]) for service in ("imap", "imaps", "pop3")}


def imap_login(port: int, context: ssl.SSLContext, user: str, password: str, *, tls: bool = False) -> str:
    if tls:
        client = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context, timeout=20)
    else:
        client = imaplib.IMAP4("127.0.0.1", port, timeout=20)
        client.starttls(context)
    try:
        status, _ = client.login(user, password)
        assert client.select("INBOX")[0] == "OK"
        client.logout()
        return status
    except imaplib.IMAP4.error as exc:
        client.shutdown()
        return str(exc)


def eventually_logs_in(port: int, context: ssl.SSLContext, user: str, password: str, timeout: float = 20) -> str:
    """Log in until it works or `timeout` passes; the last answer."""
    deadline = time.monotonic() + timeout
    while (answer := imap_login(port, context, user, password)) != "OK" and time.monotonic() < deadline:
        time.sleep(0.3)
    return answer


class RawImap:
    """A plain IMAP connection from `source` (a loopback address): loopback clients may log in
    without TLS, and each source address has failed-login budgets of its own."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0))
        self.buffer = b""
        assert self.line().startswith(b"* OK")

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"closed; unread {self.buffer!r}")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def command(self, tag: str, text: str) -> bytes:
        """Send `tag text`; the tagged answer (untagged lines skipped)."""
        self.sock.sendall(f"{tag} {text}\r\n".encode())
        while not (line := self.line()).startswith(tag.encode() + b" "):
            pass
        return line

    def close(self) -> None:
        self.sock.close()


def timed_refusal(port: int, source: str, user: str, password: str) -> float:
    client = RawImap(port, source)
    try:
        began = time.perf_counter()
        answer = client.command("a", f'LOGIN "{user}" "{password}"')
        elapsed = time.perf_counter() - began
    finally:
        client.close()
    assert answer == b"a NO [AUTHENTICATIONFAILED] Authentication failed.", answer
    return elapsed


def test_users_of_both_slaves_log_in_through_either_master(fleet, backends, tmp_path):
    d1, d2 = backends
    cert = start_cluster(fleet, d1, d2, tmp_path, failures_per_client="3")
    context = ssl.create_default_context(cafile=str(cert))

    for master in MASTERS:
        ports = proxy_ports(fleet, master)
        for user, password in USERS.items():
            assert imap_login(ports["imap"], context, user, password) == "OK", (
                master,
                user,
            )
            assert imap_login(ports["imaps"], context, user, password, tls=True) == "OK", (master, user)
            pop = poplib.POP3("127.0.0.1", ports["pop3"], timeout=20)
            pop.stls(context)
            pop.user(user)
            assert pop.pass_(password).startswith(b"+OK")
            pop.quit()
    assert "rip=127.0.0.1" in d1.log_tail() and "rip=127.0.0.1" in d2.log_tail()

    ports = proxy_ports(fleet, "m2")
    wrong = imap_login(ports["imap"], context, "ann@one.example", "wrong")
    unknown = imap_login(ports["imap"], context, "ann@unknown.example", "secret-1")
    assert wrong == unknown == "b'[AUTHENTICATIONFAILED] Authentication failed.'"
    status = fleet.status("m2")
    assert status["proxy"]["logins"]["ok"] >= 6 and status["proxy"]["logins"]["refused"] == 2
    assert status["proxy"]["bytes"]["to_clients"] > 0 and status["proxy"]["bytes"]["from_clients"] > 0
    assert status["proxy"]["backend_connect_ms"]["samples"] >= 6 and status["proxy"]["loop_stall_ms"] >= 0
    assert status["proxy"]["node_loop_stall_ms"] >= 0

    # The same answer as fast: each pair from fresh client addresses (failures make the
    # delay grow per address and per account), the median of the differences.
    differences = []
    for pair in range(5):
        sources = f"127.0.1.{2 * pair + 1}", f"127.0.1.{2 * pair + 2}"
        wrong_s = timed_refusal(ports["imap"], sources[0], f"wrong{pair}@one.example", "not-the-password")
        unknown_s = timed_refusal(
            ports["imap"],
            sources[1],
            f"ghost{pair}@unknown.example",
            "not-the-password",
        )
        assert wrong_s >= FAILURE_DELAY and unknown_s >= FAILURE_DELAY
        differences.append(abs(wrong_s - unknown_s))
    assert statistics.median(differences) < 0.050, differences

    d1.stop()
    assert imap_login(ports["imap"], context, "ann@one.example", "secret-1") == (
        "b'[UNAVAILABLE] Temporary server failure, try again later.'"
    )
    assert imap_login(ports["imap"], context, "bob@two.example", "secret-2") == "OK"
    d1.start()  # nothing done on the masters: the slave's probe sees it answer again
    assert eventually_logs_in(ports["imap"], context, "ann@one.example", "secret-1") == "OK"

    # Failed logins from one address: each answer slower, then refused for a while.
    port = ports["imap"]
    client = RawImap(port, "127.0.2.1")
    for attempt in range(3):  # a failed login may be retried on the same connection (up to 3)
        assert client.command(f"a{attempt}", 'LOGIN "ann@one.example" "wrong"').startswith(b"a%d NO [AUTH" % attempt)
    client.close()
    # Over the budget: even the right password is refused as "try later", the slave not asked.
    client = RawImap(port, "127.0.2.1")
    answer = client.command("b", 'LOGIN "ann@one.example" "secret-1"')
    assert answer == b"b NO [UNAVAILABLE] Temporary server failure, try again later.", answer
    client.close()
    other = RawImap(port, "127.0.2.2")  # another client address has its own budget
    assert other.command("c", 'LOGIN "ann@one.example" "secret-1"').startswith(b"c OK")
    other.close()
    assert "limited (too many failed logins)" in fleet._node("m2").log_tail()
    assert fleet.status("m2")["proxy"]["logins"]["limited"] == 1


def test_master_lifecycle_sighup_kill_and_drain(fleet, backends, tmp_path):
    d1, d2 = backends
    cert = start_cluster(fleet, d1, d2, tmp_path, drain_timeout="2")
    ports = {master: proxy_ports(fleet, master) for master in MASTERS}

    # A renewed certificate is taken on SIGHUP without dropping sessions.
    port = ports["m1"]["imaps"]
    unchecked = ssl.create_default_context()
    unchecked.check_hostname, unchecked.verify_mode = False, ssl.CERT_NONE

    def served_certificate() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
            with unchecked.wrap_socket(raw) as tls:
                return tls.getpeercert(binary_form=True)

    old = ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert served_certificate() == old
    session = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=unchecked, timeout=20)
    session.login("ann@one.example", "secret-1")
    mailkit.write_certificate(cert.parent)  # a renewal: new key and certificate, same files
    fleet._node("m1").send(signal.SIGHUP)
    new = ssl.PEM_cert_to_DER_cert(cert.read_text())
    deadline = time.monotonic() + 20
    while served_certificate() != new:
        assert time.monotonic() < deadline, fleet.logs()
        time.sleep(0.2)
    assert session.noop()[0] == "OK"  # the open session goes on with its old certificate
    session.logout()
    assert "reloaded (SIGHUP)" in fleet._node("m1").log_tail()

    # kill -9 mid-session: the client's next command fails; it logs in through m1.
    session = RawImap(ports["m2"]["imap"])
    assert session.command("a", 'LOGIN "bob@two.example" "secret-2"').startswith(b"a OK")
    assert session.command("b", "SELECT INBOX").startswith(b"b OK")
    fleet.kill("m2")
    with pytest.raises((EOFError, OSError)):
        session.command("c", "NOOP")
    session.close()
    again = RawImap(ports["m1"]["imap"])
    assert again.command("a", 'LOGIN "bob@two.example" "secret-2"').startswith(b"a OK")
    again.close()
    fleet.start("m2")
    fleet.wait_alive(MASTERS)
    ports["m2"] = proxy_ports(fleet, "m2")  # its proxy listeners took new ports (port 0)

    # Drain m2 (SIGTERM): it stops accepting, tells the cluster, and after drain_timeout
    # ends the open session with BYE; the client logs in again through m1.
    session = RawImap(ports["m2"]["imap"])
    assert session.command("a", 'LOGIN "ann@one.example" "secret-1"').startswith(b"a OK")
    assert session.command("b", "SELECT INBOX").startswith(b"b OK")
    fleet._node("m2").send(signal.SIGTERM)
    fleet.wait(
        "m1 sees m2 draining",
        ["m1"],
        lambda statuses: any(m["name"] == "m2" and m["draining"] for m in statuses["m1"]["members"]),
    )
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", ports["m2"]["imap"]), timeout=5)
    assert session.line() == b"* BYE Server shutting down, reconnect to continue."
    session.close()
    assert fleet._node("m2").process.wait(timeout=30) == 0
    again = RawImap(ports["m1"]["imap"])
    assert again.command("a", 'LOGIN "ann@one.example" "secret-1"').startswith(b"a OK")
    again.close()
    assert "ended by the drain" in fleet._node("m2").log_tail()
