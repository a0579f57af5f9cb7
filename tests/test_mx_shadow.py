"""Shadow copies of queued mail, with real processes: two masters made by init and join (so
with the cluster's node certificates) and a slave whose Dovecot is stopped. A message a
master queues is held by the other master before the 250; delivered, the copy is dropped;
the master killed with its disk gone, the other delivers every message after the takeover
delay; the master back with its disk after a takeover delivers none of them again."""

from __future__ import annotations

import json
import shutil
import smtplib
from collections.abc import Iterator
from email.message import EmailMessage

import pytest
from helpers import mailkit
from helpers.cluster import Cluster
from helpers.config import QUICK_SLAVE, set_key

from meshmail.security import files

USER = "ann@one.example"
TAKEOVER = 2  # seconds a dead owner's copies wait before the holder delivers them


@pytest.fixture
def dovecot(tmp_path) -> Iterator[mailkit.Dovecot]:
    mailkit.require("dovecot")
    with mailkit.dovecot(tmp_path / "d1", {USER: "ann-secret-1"}, name="d1") as instance:
        yield instance


@pytest.fixture
def fleet(tmp_path, dovecot) -> Iterator[Cluster]:
    (tmp_path / "nodes").mkdir()
    fleet = Cluster(tmp_path / "nodes")
    try:
        fleet.init("m1")
        fast_takeover(fleet, "m1")
        fleet.start("m1")
        fleet.wait_alive(["m1"])
        assert fleet.join("m2", fleet.token("m1", "master"), "master").returncode == 0
        fast_takeover(fleet, "m2")
        assert fleet.join("s1", fleet.token("m1", "slave"), "slave").returncode == 0
        fleet.append_config(
            "s1",
            f"""
[endpoints]
lmtp = "127.0.0.1:{dovecot.ports["lmtp"]}"

{QUICK_SLAVE}
[[slave.sources]]
type = "static"
domains = ["one.example"]
""",
        )
        fleet.start("m2", "s1")
        fleet.wait_alive(["m1", "m2", "s1"])
        fleet.wait(
            "one.example routed", ["m1", "m2"], lambda found: all(s["state"]["domains"] >= 1 for s in found.values())
        )
        yield fleet
    finally:
        fleet.close()
        print(fleet.logs())


def fast_takeover(fleet: Cluster, name: str) -> None:
    config = fleet.data_dir(name) / files.CONFIG
    config.write_text(set_key(config.read_text(), "mx", "shadow_takeover", str(TAKEOVER)))


def mx_port(fleet: Cluster, name: str) -> int:
    return int(json.loads(fleet._node(name).ready.read_text())["mx"].rsplit(":", 1)[1])


def send(fleet: Cluster, master: str, subjects: list[str]) -> list[str]:
    """Send one message per subject through `master`'s MX; the 250 replies' texts."""
    replies = []
    with smtplib.SMTP("127.0.0.1", mx_port(fleet, master), timeout=30) as client:
        for subject in subjects:
            mail = EmailMessage()
            mail["From"], mail["To"], mail["Subject"] = "x@outside.example", USER, subject
            mail["Message-ID"] = f"<{subject}@outside.example>"
            mail.set_content(subject)
            client.ehlo("sender.example")
            client.mail("x@outside.example")
            client.rcpt(USER)
            code, text = client.data(mail.as_string())
            assert code == 250, text
            replies.append(text.decode())
    return replies


def arrived(dovecot: mailkit.Dovecot) -> list[str]:
    return [
        line.split(b"<", 1)[1].split(b"@", 1)[0].decode()
        for mail in dovecot.mailbox(USER)
        for line in mail.splitlines()
        if line.lower().startswith(b"message-id:")
    ]


def lmtp_down(fleet: Cluster) -> None:
    fleet.wait(
        "the masters see s1's LMTP down",
        ["m1", "m2"],
        lambda found: all(
            not m["endpoints"]["lmtp"]["up"] for s in found.values() for m in s["members"] if m["name"] == "s1"
        ),
    )


def mx(fleet: Cluster, name: str) -> dict:
    return fleet.status(name)["mx"]


def taken_over_after_m1_dies(
    fleet: Cluster, dovecot: mailkit.Dovecot, prefix: str, count: int, *, lose_disk: bool
) -> list[str]:
    """With s1's LMTP down, send `count` messages through m1 (each shadowed on m2), kill -9 m1
    (and delete its data dir with `lose_disk`), wait for m2 to take the copies over and, with
    the LMTP back, deliver them; the subjects sent."""
    dovecot.stop()
    lmtp_down(fleet)
    subjects = [f"{prefix}-{n}" for n in range(count)]
    send(fleet, "m1", subjects)
    assert mx(fleet, "m2")["shadows"] == count
    fleet.kill("m1")
    if lose_disk:
        shutil.rmtree(fleet.data_dir("m1"))  # the owner's disk is gone for good
    fleet.wait("m2 took the copies over", ["m2"],
               lambda found: found["m2"]["mx"]["recipients"].get("taken_over") == count, timeout=60)  # fmt: skip
    dovecot.start()
    fleet.wait("m2 delivered them", ["m2"], lambda found: found["m2"]["mx"]["queued"] == 0, timeout=60)
    return subjects


def test_the_other_master_holds_a_copy_until_delivery_and_delivers_it_when_the_owner_is_lost(fleet, dovecot):
    dovecot.stop()
    lmtp_down(fleet)
    replies = send(fleet, "m1", ["kept-1"])
    assert "queued as" in replies[0]
    assert mx(fleet, "m1")["queued"] == 1 and mx(fleet, "m2")["shadows"] == 1  # both before the 250
    dovecot.start()
    fleet.wait("delivered and the copy dropped", ["m1", "m2"],
               lambda found: found["m1"]["mx"]["queued"] == 0 and found["m2"]["mx"]["shadows"] == 0)  # fmt: skip
    assert arrived(dovecot) == ["kept-1"]

    subjects = taken_over_after_m1_dies(fleet, dovecot, "lost", 5, lose_disk=True)
    assert sorted(arrived(dovecot)) == sorted(["kept-1", *subjects])


def test_an_owner_back_with_its_disk_after_a_takeover_delivers_nothing_twice(fleet, dovecot):
    subjects = taken_over_after_m1_dies(fleet, dovecot, "twice", 3, lose_disk=False)
    fleet.start("m1")  # with its queue of the same 3 messages
    fleet.wait_alive(["m1", "m2"])
    fleet.wait("m1 learnt what m2 took", ["m1"], lambda found: found["m1"]["mx"]["queued"] == 0, timeout=60)
    assert sorted(arrived(dovecot)) == sorted(subjects)
    assert "were taken over by m2" in fleet._node("m1").log_tail()
