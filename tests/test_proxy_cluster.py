"""Two masters and two slaves (real `meshmail run` processes) in front of two real Dovecots:
users of either slave log in through either master's proxy over IMAP (143 + STARTTLS, 993)
and POP3; an unknown domain and a wrong password answer alike; a stopped Dovecot gives
NO [UNAVAILABLE]."""

from __future__ import annotations

import imaplib
import json
import poplib
import ssl
from collections.abc import Iterator

import pytest
from helpers import mailkit
from helpers.cluster import Cluster

from meshmail.security import files

MASTERS = ["m1", "m2"]
USERS = {"ann@one.example": "secret-1", "bob@two.example": "secret-2"}


@pytest.fixture
def backends(tmp_path) -> Iterator[tuple[mailkit.Dovecot, mailkit.Dovecot]]:
    mailkit.require("dovecot")
    trusted = ["127.0.0.0/8"]  # the masters' address: Dovecot takes the client's address by ID from it
    with (
        mailkit.dovecot(tmp_path / "d1", {"ann@one.example": "secret-1"}, name="d1", trusted_networks=trusted) as d1,
        mailkit.dovecot(tmp_path / "d2", {"bob@two.example": "secret-2"}, name="d2", trusted_networks=trusted) as d2,
    ):
        yield d1, d2


@pytest.fixture
def fleet(tmp_path) -> Iterator[Cluster]:
    (tmp_path / "nodes").mkdir()
    fleet = Cluster(tmp_path / "nodes")
    try:
        yield fleet
    finally:
        fleet.close()
        print(fleet.logs())


def append(fleet: Cluster, name: str, text: str) -> None:
    config = fleet.data_dir(name) / files.CONFIG
    config.write_text(config.read_text() + text)


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


def test_users_of_both_slaves_log_in_through_either_master(fleet, backends, tmp_path):
    d1, d2 = backends
    cert, key = mailkit.write_certificate(tmp_path / "proxy-cert")
    context = ssl.create_default_context(cafile=str(cert))
    proxy = (
        f'\n[proxy]\nimap = "127.0.0.1:0"\nimaps = "127.0.0.1:0"\npop3 = "127.0.0.1:0"\npop3s = false\n'
        f'submission = false\nsubmissions = false\ncert = "{cert}"\nkey = "{key}"\n'
        f'backend_cas = {{ s1 = "{d1.cafile}", s2 = "{d2.cafile}" }}\n'
    )
    fleet.init("m1")
    append(fleet, "m1", proxy)
    fleet.start("m1")
    fleet.wait_alive(["m1"])
    assert fleet.join("m2", fleet.token("m1", "master"), "master").returncode == 0
    append(fleet, "m2", proxy)
    slave_token = fleet.token("m1", "slave", "--uses", "2")
    for slave, dovecot in (("s1", d1), ("s2", d2)):
        assert fleet.join(slave, slave_token, "slave").returncode == 0
        found = dovecot.endpoints()
        append(fleet, slave, f"""
[endpoints]
imap = {{ address = "{found["imap"]}", transport = "starttls", client_address = "id" }}
pop3 = {{ address = "{found["pop3"]}", transport = "starttls" }}

[slave]
poll_interval = 0.2
settle = 0.5
probe_interval = 0.5
probe_timeout = 0.4

[[slave.sources]]
type = "dovecot"
path = "{dovecot.passwd}"
""")
    fleet.start("m2", "s1", "s2")
    fleet.wait_alive(["m1", "m2", "s1", "s2"])
    fleet.wait(
        "both domains routed on every master",
        MASTERS,
        lambda statuses: all(status["state"]["domains"] >= 2 for status in statuses.values()),
    )

    for master in MASTERS:
        ports = proxy_ports(fleet, master)
        for user, password in USERS.items():
            assert imap_login(ports["imap"], context, user, password) == "OK", (master, user)
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

    d1.stop()
    assert imap_login(ports["imap"], context, "ann@one.example", "secret-1") == (
        "b'[UNAVAILABLE] Temporary server failure, try again later.'"
    )
    assert imap_login(ports["imap"], context, "bob@two.example", "secret-2") == "OK"
