"""protocols.mx: the inbound SMTP server fed whole, byte by byte and pipelined; every refusal;
envelope paths; DATA unstuffed and streamed; SMTP smuggling probes; size, line and recipient caps;
STARTTLS; the driver's answers; fuzz."""

from __future__ import annotations

import re

import pytest
from helpers.codecs import fuzz_session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshmail.protocols import mx, smtp
from meshmail.protocols.common import Closed, ProtocolError, StartTls
from meshmail.protocols.mx import (
    MAX_COMMAND_LINE,
    MAX_LINE,
    BodyReader,
    DataChunk,
    DataEnd,
    Hello,
    MailFrom,
    MxServer,
    RcptTo,
    Reset,
    is_postmaster,
    parse_path,
)
from meshmail.protocols.smtp import Reply, ReplyReader

GREETING = b"220 mx.test ESMTP ready\r\n"
EXTENSIONS = b"250-SIZE 1000\r\n250-8BITMIME\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n"
EHLO = b"250-mx.test\r\n" + EXTENSIONS.replace(b"-SMTPUTF8", b" SMTPUTF8")
EHLO_TLS = b"250-mx.test\r\n" + EXTENSIONS + b"250 STARTTLS\r\n"
SENDER_OK, RECIPIENT_OK, ACCEPTED = (
    b"250 2.1.0 Sender OK\r\n",
    b"250 2.1.5 Recipient OK\r\n",
    b"250 2.0.0 Message accepted\r\n",
)
GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
UNKNOWN_USER = Reply(550, "5.1.1", "User unknown")


def server(**options) -> MxServer:
    return MxServer(**({"hostname": "mx.test", "max_size": 1000} | options))


def accept_all(codec: MxServer, event) -> None:
    """Accepts every sender, message and recipient but those starting with "unknown"."""
    if isinstance(event, RcptTo) and event.address.startswith("unknown"):
        codec.refuse(UNKNOWN_USER)
    elif isinstance(event, MailFrom | RcptTo) or (isinstance(event, DataEnd) and event.refusal is None):
        codec.accept()


def drive(codec: MxServer, data: bytes, chunk: int | None = None, answer=accept_all):
    """Feeds `data` (in pieces of `chunk` bytes), answering events with `answer`; returns the
    events (DataChunks joined into one, bytes) and the output."""
    events, out = [], bytearray(codec.data_to_send())
    if chunk is None or chunk == 0:
        pieces = [data] if chunk is None else [data, b""]
    else:
        pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    for piece in pieces:
        codec.receive_data(piece)
        while (event := codec.next_event()) is not None:
            if isinstance(event, DataChunk):
                if events and isinstance(events[-1], bytes):
                    events[-1] += event.data
                else:
                    events.append(event.data)
            else:
                events.append(event)
            if answer:
                answer(codec, event)
            out += codec.data_to_send()
            if isinstance(event, Closed):
                return events, bytes(out)
        out += codec.data_to_send()
    return events, bytes(out)


HELLO = Hello("client.test", True)
TRANSACTION = b"EHLO client.test\r\nMAIL FROM:<alice@a.test>\r\nRCPT TO:<bob@b.test>\r\nDATA\r\n"
BODY = b"Subject: hi\r\n\r\n..leading dot\r\n.\r\n"

#: (client bytes, replies after the greeting, events); answered by accept_all.
EXCHANGES = {
    "one message": (
        TRANSACTION + BODY + b"QUIT\r\n",
        EHLO + SENDER_OK + RECIPIENT_OK + GO_AHEAD + ACCEPTED + b"221 2.0.0 Bye\r\n",
        [
            HELLO,
            MailFrom("alice@a.test"),
            RcptTo("bob@b.test"),
            b"Subject: hi\r\n\r\n.leading dot\r\n",
            DataEnd(),
            Closed(),
        ],
    ),
    "two messages, one unknown recipient, parameters": (
        b"EHLO client.test\r\nMAIL FROM:<> SIZE=12 BODY=8BITMIME\r\nRCPT TO:<unknown@b.test>\r\n"
        b"RCPT TO:<Postmaster>\r\nDATA\r\n.\r\nMAIL FROM: <j\xc3\xb6rg@a.test> SMTPUTF8 body=7bit\r\n"
        b"RCPT TO:<@relay.test,@other.test:u%v!w@b.test>\r\nDATA\r\nx\r\n.\r\n",
        EHLO
        + SENDER_OK
        + b"550 5.1.1 User unknown\r\n"
        + RECIPIENT_OK
        + GO_AHEAD
        + ACCEPTED
        + SENDER_OK
        + RECIPIENT_OK
        + GO_AHEAD
        + ACCEPTED,
        [
            HELLO,
            MailFrom("", 12, "8BITMIME"),
            RcptTo("unknown@b.test"),
            RcptTo("postmaster", postmaster=True),
            DataEnd(),
            MailFrom("jörg@a.test", None, "7BIT", True),
            RcptTo("u%v!w@b.test"),
            b"x\r\n",
            DataEnd(),
        ],
    ),
    "rset, noop, help, helo, eof": (
        b"HELO client.test\r\nMAIL FROM:<a@a.test>\r\nRSET\r\nNOOP x\r\nHELP\r\nRCPT TO:<b@b.test>\r\n",
        b"250 mx.test\r\n" + SENDER_OK + b"250 2.0.0 OK\r\n250 2.0.0 OK\r\n214 2.0.0 See RFC 5321 and RFC 4954\r\n"
        b"503 5.5.1 Need MAIL command\r\n",
        [Hello("client.test", False), MailFrom("a@a.test"), Reset()],
    ),
    "refusals": (
        b"MAIL FROM:<a@a.test>\r\nEHLO\r\nEHLO client.test\r\nRCPT TO:<b@b.test>\r\nDATA\r\nMAIL FROM:a@a.test\r\n"
        b"MAIL TO:<a@a.test>\r\nMAIL FROM:<a@a.test> SIZE=1001\r\nMAIL FROM:<a@a.test> SIZE=x\r\n"
        b"MAIL FROM:<a@a.test> BODY=BINARYMIME\r\nMAIL FROM:<a@a.test> RET=FULL\r\n"
        b"MAIL FROM:<a@a.test> SIZE=1 SIZE=1\r\n"
        b"MAIL FROM:<j\xc3\xb6rg@a.test>\r\nMAIL FROM:<a@@a.test>\r\nMAIL FROM:<a@a.test>x\r\nMAIL FROM:<a@a.test>\r\n"
        b"MAIL FROM:<b@a.test>\r\nRCPT TO:<>\r\nRCPT TO:<b@b.test> NOTIFY=NEVER\r\nRCPT TO:<j\xc3\xb6rg@b.test>\r\n"
        b"RCPT TO:b@b.test\r\nRCPT TO:<b@-b.test>\r\nDATA\r\nRCPT TO:<unknown@b.test>\r\nDATA x\r\nDATA\r\n"
        b"STARTTLS\r\nVRFY root\r\nEXPN staff\r\nAUTH PLAIN AGFsaWNlAHNla3JldA==\r\nETRN a.test\r\nBDAT 10 LAST\r\n"
        b"\xff\r\nQUIT\r\n",
        b"503 5.5.1 Send EHLO first\r\n501 5.5.4 Syntax: EHLO hostname\r\n" + EHLO + b"503 5.5.1 Need MAIL command\r\n"
        b"503 5.5.1 Need MAIL command\r\n"
        + b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n" * 2
        + b"552 5.3.4 Message size exceeds fixed maximum message size\r\n501 5.5.4 Syntax error in parameters\r\n"
        + b"555 5.5.4 Unsupported parameter\r\n" * 2
        + b"501 5.5.4 Syntax error in parameters\r\n553 5.6.7 Non-ASCII address needs SMTPUTF8\r\n"
        b"501 5.1.7 Bad sender address syntax\r\n501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
        + SENDER_OK
        + b"503 5.5.1 Nested MAIL command\r\n501 5.1.3 Bad recipient address syntax\r\n"
        b"555 5.5.4 Unsupported parameter\r\n"
        b"553 5.6.7 Non-ASCII address needs SMTPUTF8\r\n501 5.5.4 Syntax: RCPT TO:<address>\r\n"
        b"501 5.1.3 Bad recipient address syntax\r\n503 5.5.1 Need RCPT command\r\n550 5.1.1 User unknown\r\n"
        b"501 5.5.4 Syntax error in parameters\r\n554 5.5.1 No valid recipients\r\n502 5.5.1 STARTTLS not available\r\n"
        b"502 5.5.1 VRFY command is disabled\r\n502 5.5.1 EXPN command is disabled\r\n502 5.5.1 AUTH not available\r\n"
        + b"500 5.5.2 Command not recognized\r\n" * 3
        + b"221 2.0.0 Bye\r\n",
        [HELLO, MailFrom("a@a.test"), RcptTo("unknown@b.test"), Closed()],
    ),
}


@pytest.mark.parametrize("name", EXCHANGES)
@pytest.mark.parametrize("chunk", [None, 1, 0])  # 0: whole, then end of stream
def test_exchange_whole_and_byte_by_byte(name, chunk):
    data, replies, expected = EXCHANGES[name]
    events, out = drive(server(max_errors=50), data, chunk)
    assert out == GREETING + replies
    assert events == (expected + [Closed()] if chunk == 0 and expected[-1] != Closed() else expected)


def test_the_greeting_waits_and_ehlo_lists_starttls_until_tls_is_up():
    codec = server(tls_available=True)
    assert codec.data_to_send() == GREETING
    events, out = drive(codec, b"STARTTLS\r\nEHLO client.test\r\nSTARTTLS\r\n")
    assert out == b"503 5.5.1 Send EHLO first\r\n" + EHLO_TLS + b"220 2.0.0 Ready to start TLS\r\n"
    assert events == [HELLO, StartTls()] and codec.next_event() is None
    codec.tls_started()
    assert codec.helo is None and codec.tls_active
    _, out = drive(codec, b"MAIL FROM:<a@a.test>\r\nEHLO c2\r\nSTARTTLS\r\n")
    assert out == b"503 5.5.1 Send EHLO first\r\n" + EHLO + b"503 5.5.1 TLS already active\r\n"


def test_no_starttls_inside_a_transaction():
    _, out = drive(server(tls_available=True), b"EHLO c\r\nMAIL FROM:<a@a.test>\r\nSTARTTLS\r\n")
    assert out.endswith(SENDER_OK + b"503 5.5.1 Mail transaction in progress\r\n")


@pytest.mark.parametrize("chunk", [None, 1])
def test_commands_pipelined_after_starttls_end_the_session(chunk):
    codec = server(tls_available=True)
    with pytest.raises(ProtocolError) as info:
        events, _ = drive(codec, b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<mallory@evil.test>\r\n", chunk)
        assert events[-1] == StartTls()
        codec.tls_started()
    reason = b"Data received before TLS" if chunk else b"Commands pipelined after STARTTLS"
    assert info.value.reply == b"421 4.7.0 " + reason + b", closing connection\r\n"
    assert info.value.close and codec.next_event() == Closed()


def test_pipelined_commands_wait_for_the_driver_and_answers_stay_in_order():
    codec = server()
    events, out = drive(codec, TRANSACTION + BODY + b"NOOP\r\n", answer=None)
    assert events == [HELLO, MailFrom("alice@a.test")] and out == GREETING + EHLO
    codec.accept(Reply(250, "2.1.0", "Sender fine"))
    assert codec.next_event() == RcptTo("bob@b.test")
    assert codec.next_event() is None  # the recipient is being verified at the slave
    codec.refuse(Reply(450, "4.2.0", "Try later"))  # e.g. the slave's own reply, passed on
    assert codec.next_event() is None  # DATA was refused: the body's lines are bad commands now
    assert (
        codec.data_to_send()
        == b"250 2.1.0 Sender fine\r\n450 4.2.0 Try later\r\n554 5.5.1 No valid recipients\r\n"
        + (b"500 5.5.2 Command not recognized\r\n" * 4 + b"250 2.0.0 OK\r\n")
    )


def test_the_driver_answers_exactly_what_waits():
    codec = server()
    with pytest.raises(RuntimeError):
        codec.accept()
    drive(codec, b"EHLO c\r\nMAIL FROM:<a@a.test>\r\n", answer=None)
    with pytest.raises(ValueError):
        codec.accept(Reply(550, "5.0.0", "no"))
    with pytest.raises(ValueError):
        codec.refuse(Reply(250, "2.0.0", "yes"))
    codec.refuse(Reply(451, "4.3.0", "Queue full"))
    assert codec.data_to_send() == b"451 4.3.0 Queue full\r\n"
    _, out = drive(codec, b"RCPT TO:<b@b.test>\r\n")
    assert out == b"503 5.5.1 Need MAIL command\r\n"  # a refused sender opens no transaction


def test_a_message_refused_by_the_driver_ends_the_transaction():
    codec = server()
    events, _ = drive(
        codec, TRANSACTION + BODY, answer=lambda c, e: accept_all(c, e) if not isinstance(e, DataEnd) else None
    )
    assert events[-1] == DataEnd()
    codec.refuse(Reply(451, "4.4.0", "Slave unavailable and queue full"))
    _, out = drive(codec, b"RCPT TO:<b@b.test>\r\n")
    assert out == b"451 4.4.0 Slave unavailable and queue full\r\n503 5.5.1 Need MAIL command\r\n"


def test_pipelined_answers_come_in_order():
    codec = server()
    data = TRANSACTION.replace(b"DATA\r\n", b"RCPT TO:<unknown@b.test>\r\nRCPT TO:<c@b.test>\r\nDATA\r\n")
    events, out = drive(codec, data + BODY + b"QUIT\r\n", 1)
    assert [type(e) for e in events] == [Hello, MailFrom, RcptTo, RcptTo, RcptTo, bytes, DataEnd, Closed]
    assert out == GREETING + EHLO + SENDER_OK + RECIPIENT_OK + b"550 5.1.1 User unknown\r\n" + RECIPIENT_OK + (
        GO_AHEAD + ACCEPTED + b"221 2.0.0 Bye\r\n"
    )


# --- DATA: unstuffing, smuggling, sizes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "data"),
    [
        (b".\r\n", b""),
        (b"\r\n.\r\n", b"\r\n"),
        (b"a\r\n.\r\n", b"a\r\n"),
        (b"..\r\n.\r\n", b".\r\n"),
        (b"...\r\n.\r\n", b"..\r\n"),
        (b".a\r\n.\r\n", b"a\r\n"),  # an unstuffed leading dot is dropped, as RFC 5321 says
        (b"a.\r\n.b\r\n.\r\n", b"a.\r\nb\r\n"),
        (b". \r\n.\r\n", b" \r\n"),
        (b"caf\xc3\xa9 \x00\x7f\xff\r\n.\r\n", b"caf\xc3\xa9 \x00\x7f\xff\r\n"),  # 8-bit and NUL kept
    ],
)
@pytest.mark.parametrize("chunk", [None, 1, 2, 3])
def test_dot_unstuffing(body, data, chunk):
    events, out = drive(server(), TRANSACTION + body + b"NOOP\r\n", chunk)
    expected = [data, DataEnd()] if data else [DataEnd()]
    assert events[3:] == expected and out.endswith(ACCEPTED + b"250 2.0.0 OK\r\n")


SMUGGLED = b"MAIL FROM:<admin@bank.test>\r\nRCPT TO:<victim@b.test>\r\nDATA\r\nSubject: spoofed\r\n"


@pytest.mark.parametrize(
    "fake_end",
    [
        b"\n.\n",
        b"\n.\r\n",
        b"\r\n.\n",
        b"\r.\r",
        b"\r.\r\n",
        b"\r\n.\r",
        b"\n..\n",
        b"\r\n\n.\r\n",
        b"\r\n.\r\r\n",
        b"x\ry\r\n",
        b"x\ny\r\n",
    ],
)
@pytest.mark.parametrize("chunk", [None, 1])
def test_smuggling_probes_refuse_the_message_and_run_nothing(fake_end, chunk):
    data = TRANSACTION + b"Subject: real" + fake_end + SMUGGLED + b"\r\n.\r\nNOOP\r\n"
    events, out = drive(server(), data, chunk)
    kept = b"".join(e for e in events if isinstance(e, bytes))  # handed out before the refusal: dropped at DataEnd
    assert kept.startswith(b"Subject: real") and b"spoofed" not in kept and b"MAIL" not in kept
    assert [e for e in events if not isinstance(e, bytes)][3:] == [DataEnd(mx.BARE_LINE_END)]
    assert out == GREETING + EHLO + SENDER_OK + RECIPIENT_OK + GO_AHEAD + bytes(mx.BARE_LINE_END) + (
        b"250 2.0.0 OK\r\n"
    )


def test_a_refused_message_ends_the_transaction():
    data = TRANSACTION + b"a\nb\r\n.\r\nRCPT TO:<b@b.test>\r\nMAIL FROM:<a@a.test>\r\n"
    events, out = drive(server(), data)
    assert events[3:] == [b"a", DataEnd(mx.BARE_LINE_END), MailFrom("a@a.test")]
    assert out.endswith(bytes(mx.BARE_LINE_END) + b"503 5.5.1 Need MAIL command\r\n" + SENDER_OK)


@pytest.mark.parametrize("chunk", [None, 1, 100])
def test_body_past_the_size_limit_is_refused_after_the_terminator(chunk):
    codec = server(max_size=1000)
    line = b"x" * 98 + b"\r\n"
    events, out = drive(codec, TRANSACTION + line * 10 + b".\r\n" + TRANSACTION[16:] + line * 11 + b".\r\n", chunk)
    kept = [e for e in events if isinstance(e, bytes)]
    assert kept[0] == line * 10 and sum(map(len, kept)) <= 2000
    assert events[-1] == DataEnd(mx.TOO_BIG)
    assert out.endswith(GO_AHEAD + b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")
    assert codec.buffered <= 2


def test_the_reader_never_holds_more_than_two_bytes_of_a_huge_body():
    reader, total = BodyReader(max_size=10**9), 0
    for i in range(100):
        reader.feed((b"\n" if i else b"") + b"..." + b"y" * 60000 + b"\r")  # a CR whose LF comes next
        total += len(reader.read())
        assert reader.pending == 1 and not reader.done
    reader.feed(b"\n.\r\nQUIT\r\n")
    total += len(reader.read())
    assert reader.done and reader.refusal is None and reader.rest() == b"QUIT\r\n"
    assert total == reader.size == 100 * (60002 + 2)  # one stuffed dot per line dropped


class LineByLine(BodyReader):
    """The reader without its whole-lines shortcut: every byte through the careful loop."""

    def _whole_lines(self, out: bytearray) -> int:
        return 0


def read_body(reader: BodyReader, pieces: list[bytes]) -> tuple:
    body = b""
    for piece in pieces:
        reader.feed(piece)
        body += reader.read()
    return body, reader.refusal, reader.size, reader.done, reader.rest()


@settings(max_examples=3000, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"a", b"bc", b".", b"\r\n", b"\r", b"\n", b"\r\n.", b"\r\n.\r\n", b"x" * 9]), max_size=60
    ),
    st.lists(st.integers(1, 40), min_size=1, max_size=8),
    st.sampled_from([12, 1000]),
)
def test_the_whole_lines_shortcut_reads_as_the_careful_loop(parts, cuts, max_line):
    data = b"".join(parts) + b"\r\n.\r\nQUIT\r\n"
    pieces, start = [], 0
    for i in range(len(data)):
        if start < len(data):
            size = cuts[i % len(cuts)]
            pieces.append(data[start : start + size])
            start += size
    fast = read_body(BodyReader(max_size=60, max_line=max_line), pieces)
    assert fast == read_body(LineByLine(max_size=60, max_line=max_line), pieces)


def test_body_lines_past_the_cap_refuse_the_message():
    events, out = drive(server(max_size=10**6), TRANSACTION + b"y" * (mx.MAX_BODY_LINE + 1) + b"\r\n.\r\n")
    assert events[-1] == DataEnd(mx.BODY_LINE_TOO_LONG)
    _, out = drive(server(max_size=10**6), TRANSACTION + b"y" * mx.MAX_BODY_LINE + b"\r\n.\r\n")
    assert out.endswith(ACCEPTED)


def test_end_of_stream_inside_data_closes():
    events, _ = drive(server(), TRANSACTION + b"Subject: x\r\n", 0)
    assert events[-2:] == [b"Subject: x\r\n", Closed()]


# --- caps --------------------------------------------------------------------------------------------


def test_recipient_cap():
    codec = server(max_recipients=2)
    rcpts = b"".join(b"RCPT TO:<r%d@b.test>\r\n" % i for i in range(3))
    events, out = drive(codec, b"EHLO c\r\nMAIL FROM:<a@a.test>\r\n" + rcpts + b"RCPT TO:<unknown@b.test>\r\n")
    assert [e for e in events if isinstance(e, RcptTo)] == [RcptTo("r0@b.test"), RcptTo("r1@b.test")]
    assert out.endswith(RECIPIENT_OK * 2 + b"452 4.5.3 Too many recipients\r\n" * 2)


def test_command_line_caps():
    long_noop = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 4) + b"\r\n"
    _, out = drive(server(), long_noop + long_noop[:-3] + b"\r\n")
    assert out == GREETING + b"500 5.5.2 Line too long\r\n250 2.0.0 OK\r\n"
    codec = server()
    with pytest.raises(ProtocolError) as info:
        drive(codec, b"NOOP " + b"x" * (3 * MAX_LINE), 1000)
    assert info.value.reply == b"421 4.7.0 Line too long, closing connection\r\n" and info.value.close
    assert codec.buffered <= MAX_LINE + 1000 and codec.next_event() == Closed()


def test_bad_command_budget_ends_the_session_with_421():
    codec = server(max_errors=3)
    with pytest.raises(ProtocolError) as info:
        drive(codec, b"VRFY root\r\n" * 4)
    assert info.value.reply == bytes(smtp.TOO_MANY_ERRORS) and info.value.close
    assert codec.next_event() == Closed()


# --- paths ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "mailbox"),
    [
        ("<a@b.test>", "a@b.test"),
        ("<@r1.test,@r2.test:a@b.test>", "a@b.test"),
        ("<a%c.test@b.test>", "a%c.test@b.test"),
        ("<c.test!a@b.test>", "c.test!a@b.test"),
        ('<"a b\\"c"@b.test>', '"a b\\"c"@b.test'),
        ("<a@[192.0.2.1]>", "a@[192.0.2.1]"),
        ("<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]"),
        ("<jörg@bücher.test>", "jörg@bücher.test"),
        ("<a+tag=x@b-c.d.test>", "a+tag=x@b-c.d.test"),
    ],
)
def test_paths(path, mailbox):
    assert parse_path(path) == mailbox


@pytest.mark.parametrize(
    "path",
    ["a@b.test", "<a@b.test", "<>", "<postmaster>", "<a>", "<@b.test>", "<a@>", "<a..b@c>", "<.a@c>", "<a@-c>",
     "<a@c->", "<a@c..d>", "<a b@c>", "<a@b@c>", "<a@c>x", "<@r:>", "<r:a@b>", "<a@[x]y>", "<a\r@b>"],
)  # fmt: skip
def test_bad_paths(path):
    with pytest.raises(ValueError):
        parse_path(path)


def test_rcpt_to_the_postmaster_of_this_server_is_marked_whatever_its_case():
    events, out = drive(
        server(),
        b"EHLO client.test\r\nMAIL FROM:<a@a.test>\r\nRCPT TO:<PostMaster>\r\nRCPT TO:<postmaster@MX.Test>\r\n"
        b"RCPT TO:<@r.test:postmaster@mx.test>\r\nRCPT TO:<postmaster@b.test>\r\nRCPT TO:<postmaster@mx.test.x>\r\n"
        b"RCPT TO:<post.master@mx.test>\r\n",
    )
    assert [e for e in events if isinstance(e, RcptTo)] == [
        RcptTo("postmaster", postmaster=True),
        RcptTo("postmaster@MX.Test", postmaster=True),
        RcptTo("postmaster@mx.test", postmaster=True),  # a source route is dropped first
        RcptTo("postmaster@b.test"),  # another domain's postmaster: routed as any address
        RcptTo("postmaster@mx.test.x"),
        RcptTo("post.master@mx.test"),
    ]
    assert out.count(RECIPIENT_OK) == 6


@pytest.mark.parametrize(
    ("address", "hostname", "expected"),
    [("postmaster", "mx.test", True), ("POSTMASTER", "mx.test", True), ("Postmaster@mx.TEST", "Mx.Test", True),
     ("postmaster@mx.test", "other.test", False), ("postmaster2", "mx.test", False), ("a@mx.test", "mx.test", False),
     ('"postmaster"@mx.test', "mx.test", False)],
)  # fmt: skip
def test_is_postmaster(address, hostname, expected):
    assert is_postmaster(address, hostname) is expected


# --- fuzz ----------------------------------------------------------------------------------------------

REPLY_LINE = re.compile(rb"[2-5][0-9][0-9][ -][\x20-\x7e]*")
VERBS = [b"EHLO", b"HELO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"STARTTLS", b"NOOP", b"VRFY", b"QUIT", b""]
ENVELOPE = [b"<a@b.test>", b"<>", b"<@r:u@d>", b" SIZE=10", b" BODY=8BITMIME", b" SMTPUTF8", b"<unknown@x>", b"."]
lines = st.one_of(
    st.builds(
        lambda v, a: v + a, st.sampled_from(VERBS), st.lists(st.sampled_from(ENVELOPE), max_size=3).map(b"".join)
    ),
    st.builds(lambda v, a: v + b" " + a, st.sampled_from(VERBS), st.binary(max_size=30)),
    st.binary(max_size=40),
    st.builds(lambda n: b"x" * n, st.integers(0, MAX_LINE + 10)),
    st.sampled_from([b"EHLO c", b"MAIL FROM:<a@b.test>", b"RCPT TO:<c@d.test>", b"DATA", b".", b"..", b"\n.\n"]),
)
separators = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"\n.\r\n"])
sessions = st.lists(st.tuples(lines, separators), max_size=40).map(lambda ls: b"".join(a + b for a, b in ls))


def check_output(out: bytes) -> None:
    assert out == b"" or out.endswith(b"\r\n")
    reader = ReplyReader()
    for line in out.split(b"\r\n")[:-1]:
        assert REPLY_LINE.fullmatch(line), line
        assert len(line) + 2 <= 512
        reader.line(line)  # multi-line replies hold together


def fuzz(codec: MxServer, data: bytes, chunk: int) -> None:
    """The shared fuzz driver, answering in turn; DATA chunks stay within the size limit and
    the output is bounded by the input."""
    state = {"body": 0, "turn": 0, "out": 0}

    def answer(codec: MxServer, event) -> None:
        if isinstance(event, DataChunk):
            state["body"] += len(event.data)
            assert state["body"] <= codec.max_size
            return
        if isinstance(event, DataEnd):
            state["body"] = 0
        if isinstance(event, MailFrom | RcptTo) or (isinstance(event, DataEnd) and event.refusal is None):
            state["turn"] += 1
            codec.accept() if state["turn"] % 3 else codec.refuse(UNKNOWN_USER)

    def check(out: bytes) -> None:
        check_output(out)
        state["out"] += len(out)
        assert state["out"] <= 32 * (len(data) + 16)

    fuzz_session(codec, data, chunk, check_output=check, cap=MAX_LINE + 2, password="not-sent", answer=answer)


@settings(max_examples=6000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sessions, st.sampled_from([1, 7, 4096]), st.booleans())
def test_fuzz_sessions(data, chunk, tls):
    chunk = chunk if len(data) < 1000 else max(chunk, 64)  # long lines byte by byte cost time, find nothing new
    fuzz(server(tls_available=tls, max_size=200, max_errors=20), data, chunk)


@settings(max_examples=4000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=6000), st.sampled_from([1, 512]))
def test_fuzz_raw_bytes_in_data(data, chunk):
    fuzz(server(max_size=300), TRANSACTION + data, chunk)
