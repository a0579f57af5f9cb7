"""Delivery status notifications (RFC 3464): the message sent back to the sender of a queued
message when recipients failed (Action: failed) or are still being retried (Action: delayed).

It builds bytes; sending them (from the null sender, so a DSN never begets another) is the
delivery loop's business.
"""

from __future__ import annotations

import datetime
import email.utils
import random
from collections.abc import Sequence

import attrs

from ..protocols.smtp import Reply
from .queue import EXPIRED
from .spool import Envelope, Recipient

#: The original header section is attached up to this many bytes (cut at a line end).
MAX_ORIGINAL_HEADERS = 64 * 1024
FAILED = "failed"
DELAYED = "delayed"


@attrs.frozen
class Notification:
    """A DSN ready to send: from the null sender to `recipient` (the original sender)."""

    recipient: str
    data: bytes


def _date(ms: int) -> str:
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC))


def _status(reply: Reply | None, action: str) -> str:
    if reply is not None and reply.enhanced:
        return reply.enhanced
    if reply is not None:
        return f"{reply.code // 100}.0.0"
    return "4.0.0" if action == DELAYED else "5.0.0"


def original_headers(data: bytes) -> bytes:
    """The header section of a message (without the blank line that ends it), at most
    MAX_ORIGINAL_HEADERS bytes cut at a line end, with CRLF line ends."""
    lines = []
    size = 0
    for line in data.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break
        line = line.rstrip(b"\r\n") + b"\r\n"
        size += len(line)
        if size > MAX_ORIGINAL_HEADERS:
            break
        lines.append(line)
    return b"".join(lines)


def _recipient_fields(recipient: Recipient, action: str, now_ms: int, retry_until_ms: int | None) -> list[str]:
    fields = [
        f"Final-Recipient: rfc822; {recipient.address}",
        f"Action: {action}",
        f"Status: {_status(recipient.reply, action)}",
    ]
    # Only what the slave said is a diagnostic; our own expiry reply is not.
    if recipient.reply is not None and recipient.reply != EXPIRED:
        fields.append(f"Diagnostic-Code: smtp; {recipient.reply}")
    fields.append(f"Last-Attempt-Date: {_date(now_ms)}")
    if action == DELAYED and retry_until_ms is not None:
        fields.append(f"Will-Retry-Until: {_date(retry_until_ms)}")
    return fields


def _explanation(action: str, recipients: Sequence[Recipient], hostname: str) -> str:
    if action == FAILED:
        opening = (
            f"This is the mail system at {hostname}.\r\n\r\n"
            "Your message could not be delivered to one or more recipients; it is attached\r\n"
            "below (headers only). No further attempts will be made.\r\n"
        )
    else:
        opening = (
            f"This is the mail system at {hostname}.\r\n\r\n"
            "Your message has not been delivered yet to one or more recipients. It is still\r\n"
            "queued and will be retried; you do not need to send it again.\r\n"
        )
    listed = "".join(f"\r\n<{r.address}>: {r.reply if r.reply is not None else 'no reply'}" for r in recipients)
    return opening + listed + "\r\n"


def build(
    envelope: Envelope,
    recipients: Sequence[Recipient],
    data: bytes,
    *,
    hostname: str,
    now_ms: int,
    action: str = FAILED,
    retry_until_ms: int | None = None,
    rng: random.Random | None = None,
) -> Notification | None:
    """The DSN for `recipients` of the queued message `envelope` with bytes `data`: a
    multipart/report (report-type=delivery-status) from MAILER-DAEMON@`hostname` to the
    sender, with a text part, the per-message and per-recipient fields, and the original
    headers (text/rfc822-headers). `action` is FAILED or DELAYED (then `retry_until_ms` gives
    Will-Retry-Until). None for the null sender or no recipients: nothing is ever sent to <>.
    """
    if not envelope.sender or not recipients:
        return None
    if action not in (FAILED, DELAYED):
        raise ValueError(f"action must be {FAILED} or {DELAYED}")
    rng = rng or random.SystemRandom()
    token = f"{rng.getrandbits(64):016x}"
    boundary = f"{envelope.id}.{token}/{hostname}"
    subject = "Undelivered Mail Returned to Sender" if action == FAILED else "Delayed Mail (still being retried)"
    headers = original_headers(data)
    eight_bit = any(byte > 0x7F for byte in headers)
    per_message = [
        f"Reporting-MTA: dns; {hostname}",
        f"X-Meshmail-Queue-ID: {envelope.id}",
    ]
    if envelope.helo:
        per_message.append(f"Received-From-MTA: dns; {envelope.helo}")
    per_message.append(f"Arrival-Date: {_date(envelope.received_ms)}")
    blocks = ["\r\n".join(per_message)]
    blocks += ["\r\n".join(_recipient_fields(r, action, now_ms, retry_until_ms)) for r in recipients]
    status = "\r\n\r\n".join(blocks) + "\r\n"
    top = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{envelope.sender}>",
        f"Subject: {subject}",
        f"Date: {_date(now_ms)}",
        f"Message-ID: <{envelope.id}.{token}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Description: Notification",
        "",
        _explanation(action, recipients, hostname),
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        status,
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}",
        "Content-Description: Undelivered message headers" if action == FAILED else "Content-Description: Headers",
        "",
        "",
    ]
    body = "\r\n".join(top).encode("utf-8") + headers + f"\r\n--{boundary}--\r\n".encode()
    return Notification(envelope.sender, body)
