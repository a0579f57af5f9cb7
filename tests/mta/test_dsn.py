"""Delivery status notifications, read back with the standard library's email parser as a
mail client would: the report's structure, the per-recipient fields, the original headers."""

from __future__ import annotations

import email
import email.policy
import random

import attrs

from meshmail.mta import dsn
from meshmail.mta.queue import EXPIRED
from meshmail.mta.spool import Envelope, Recipient, RecipientState
from meshmail.protocols.smtp import Reply

T0 = 1_700_000_000_000
ORIGINAL = (
    b"From: Alice <alice@example.net>\r\nTo: bob@example.org\r\nSubject: quarterly figures\r\n"
    b"Message-ID: <abc@example.net>\r\n\r\nthe body is not sent back\r\n"
)


def failed_envelope(sender: str = "alice@example.net") -> Envelope:
    return Envelope(
        id="065svpb800000005",
        sender=sender,
        recipients=[
            Recipient("bob@example.org", "s1", RecipientState.FAILED, 1, 0, Reply(550, "5.1.1", "User unknown")),
            Recipient("carol@example.org", "s1", RecipientState.FAILED, 9, 0, EXPIRED),
            Recipient("dave@example.org", "s1", RecipientState.DELIVERED, 1, 0, Reply(250, "2.0.0", "Ok")),
        ],
        received_ms=T0,
        helo="mail.example.net",
        size=len(ORIGINAL),
    )


def parse(notification: dsn.Notification) -> email.message.EmailMessage:
    return email.message_from_bytes(notification.data, policy=email.policy.default)


def test_a_failure_report_is_a_multipart_report_a_mail_client_reads():
    env = failed_envelope()
    note = dsn.build(
        env, env.recipients[:2], ORIGINAL, hostname="m1.mesh.example", now_ms=T0 + 1000, rng=random.Random()
    )
    assert note.recipient == "alice@example.net"
    message = parse(note)
    assert message.defects == []
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message["From"].addresses[0].addr_spec == "MAILER-DAEMON@m1.mesh.example"
    assert message["To"].addresses[0].addr_spec == "alice@example.net"
    assert message["Auto-Submitted"] == "auto-replied"
    text, status, headers = message.get_payload()
    assert text.get_content_type() == "text/plain" and "bob@example.org" in text.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, bob, carol = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; m1.mesh.example"
    assert per_message["Received-From-MTA"] == "dns; mail.example.net"
    assert per_message["X-Meshmail-Queue-ID"] == env.id
    assert bob["Final-Recipient"] == "rfc822; bob@example.org"
    assert bob["Action"] == "failed" and bob["Status"] == "5.1.1"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown"
    # Expired without a reply from the slave: the expiry status, no diagnostic of ours.
    assert carol["Action"] == "failed" and carol["Status"] == "4.4.7" and carol["Diagnostic-Code"] is None
    assert headers.get_content_type() == "text/rfc822-headers"
    attached = headers.get_payload(decode=True)
    assert b"Subject: quarterly figures\r\n" in attached and b"the body is not sent back" not in attached
    assert email.message_from_bytes(attached)["Message-ID"] == "<abc@example.net>"


def test_a_delay_warning_says_delayed_and_until_when_it_retries():
    env = failed_envelope()
    waiting = attrs.evolve(env.recipients[0], state=RecipientState.QUEUED, reply=Reply(451, "4.3.0", "busy"))
    until = T0 + 5 * 86_400_000
    note = dsn.build(
        env, [waiting], ORIGINAL, hostname="m1.mesh.example", now_ms=T0, action=dsn.DELAYED, retry_until_ms=until
    )
    message = parse(note)
    assert message["Subject"].startswith("Delayed Mail")
    _, fields = message.get_payload()[1].get_payload()
    assert fields["Action"] == "delayed" and fields["Status"] == "4.3.0"
    assert email.utils.parsedate_to_datetime(fields["Will-Retry-Until"]).timestamp() * 1000 == until


def test_nothing_is_sent_to_the_null_sender_or_for_no_recipient():
    env = failed_envelope(sender="")
    assert dsn.build(env, env.recipients[:1], ORIGINAL, hostname="m1", now_ms=T0) is None
    assert dsn.build(failed_envelope(), [], ORIGINAL, hostname="m1", now_ms=T0) is None


def test_eight_bit_original_headers_are_declared_and_long_ones_cut_at_a_line():
    original = b"Subject: r\xc3\xa9sum\xc3\xa9\r\n" + b"X-Filler: " + b"y" * 70 + b"\r\n"
    original = original * 2000 + b"\r\nbody"
    env = failed_envelope()
    message = parse(dsn.build(env, env.recipients[:1], original, hostname="m1", now_ms=T0))
    headers = message.get_payload()[2]
    assert headers["Content-Transfer-Encoding"] == "8bit"
    attached = headers.get_payload(decode=True)
    assert len(attached) <= dsn.MAX_ORIGINAL_HEADERS and attached.endswith(b"\r\n")
    assert attached.startswith("Subject: résumé\r\n".encode())
