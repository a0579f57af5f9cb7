"""protocols.smtp: replies and commands parsed; the submission server before AUTH and the backend
login client, each exchange fed whole, byte by byte and with trailing data; client/server round
trips; XCLIENT; refusals; fuzz; no password in any event or error."""

from __future__ import annotations

import re
import time

import pytest
from helpers.codecs import fuzz_session as shared_fuzz_session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshmail.protocols import smtp
from meshmail.protocols.common import (
    Closed,
    Credentials,
    LoggedIn,
    LoginRefused,
    ProtocolError,
    StartTls,
    b64encode,
    sasl_plain_response,
)
from meshmail.protocols.smtp import (
    MAX_AUTH_LINE,
    MAX_COMMAND_LINE,
    BadCommand,
    Command,
    Reply,
    ReplyReader,
    SmtpClient,
    SubmissionServer,
    Xclient,
)

PASSWORD = "Sekr3t pässword"
PLAIN = sasl_plain_response("alice@a.test", PASSWORD)
GREETING = b"220 smtp.test ESMTP ready\r\n"
EHLO = b"250-smtp.test\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-PIPELINING\r\n"
EHLO_AUTH = EHLO + b"250 AUTH PLAIN LOGIN\r\n"


# --- replies and commands --------------------------------------------------------------------------


def read_replies(data: bytes) -> list[Reply]:
    reader, found = ReplyReader(), []
    for line in data.split(b"\r\n")[:-1]:
        if (reply := reader.line(line)) is not None:
            found.append(reply)
    return found


@pytest.mark.parametrize(
    ("wire", "reply"),
    [
        (b"250 OK\r\n", Reply(250, "", "OK")),
        (b"535 5.7.8 Bad\r\n", Reply(535, "5.7.8", "Bad")),
        (
            b"250-mx.test\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n",
            Reply(250, "", ("mx.test", "PIPELINING", "AUTH PLAIN")),
        ),
        (b"550-5.1.1 No such\r\n550 5.1.1 user\r\n", Reply(550, "5.1.1", ("No such", "user"))),
        (b"334 \r\n", Reply(334, "", "")),
        (b"250\r\n", Reply(250, "", "")),
        (b"421 4.7.0\r\n", Reply(421, "4.7.0", "")),
        (b"250 2.5.0.1 odd\r\n", Reply(250, "", "2.5.0.1 odd")),  # not an enhanced code
        (b"550 4.1.1 class mismatch\r\n", Reply(550, "", "4.1.1 class mismatch")),
        (b"220 caf\xc3\xa9 \x00\r\n", Reply(220, "", "caf? ?")),  # kept sendable
    ],
)
def test_replies_parse_and_format(wire, reply):
    assert read_replies(wire) == [reply]
    if all(0x20 <= byte < 0x7F for byte in wire.replace(b"\r\n", b"")) and not wire.startswith(b"250\r"):
        assert bytes(reply) == wire


@pytest.mark.parametrize(
    "lines", [[b"25 OK"], [b"600 x"], [b"250-a", b"251 b"], [b"OK"], [b"250x"], [b"250-"] * 65, [b"1234 x"]]
)
def test_bad_replies_are_refused(lines):
    reader = ReplyReader()
    with pytest.raises(ProtocolError):
        for line in lines:
            reader.line(line)


@pytest.mark.parametrize(
    "reply",
    [lambda: Reply(199), lambda: Reply(250, "5.0.0"), lambda: Reply(250, "", "a\r\nb"), lambda: Reply(250, "", ())],
)
def test_replies_cannot_be_malformed(reply):
    with pytest.raises(ValueError):
        reply()


def test_named_replies_are_well_formed():
    named = [value for value in vars(smtp).values() if isinstance(value, Reply)]
    assert len(named) > 20
    for reply in named:
        assert read_replies(bytes(reply)) == [reply]


@pytest.mark.parametrize(
    ("line", "command"),
    [
        (b"EHLO client.test", Command("EHLO", "client.test")),
        (b"mail FROM:<a@b>  SIZE=10 ", Command("MAIL", "FROM:<a@b>  SIZE=10")),
        (b"QUIT", Command("QUIT")),
        (b"RCPT TO:<j\xc3\xb6rg@b>", Command("RCPT", "TO:<jörg@b>")),
    ],
)
def test_commands_parse(line, command):
    assert Command.parse(line) == command


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"", smtp.UNKNOWN_COMMAND),
        (b" EHLO x", smtp.UNKNOWN_COMMAND),
        (b"EH\0LO", smtp.UNKNOWN_COMMAND),
        (b"X" * 17, smtp.UNKNOWN_COMMAND),
        (b"EHLO a\0b", smtp.SYNTAX_ERROR),
        (b"EHLO \xff", smtp.SYNTAX_ERROR),
        (b"EHLO a\tb", smtp.SYNTAX_ERROR),
    ],
)
def test_bad_commands(line, reply):
    with pytest.raises(BadCommand) as info:
        Command.parse(line)
    assert info.value.reply == reply


# --- the server ---------------------------------------------------------------------------------


def server(**options) -> SubmissionServer:
    options = {"hostname": "smtp.test", "require_tls": False} | options
    return SubmissionServer(**options)


def drive(codec, data: bytes, chunk: int | None = None, decide=None):
    """Feeds `data` (in pieces of `chunk` bytes) and collects (events, output). Credentials are
    answered by `decide(codec, event)`."""
    events, out = [], bytearray(codec.data_to_send())
    pieces = [data] if chunk is None else [data[i : i + chunk] for i in range(0, len(data), chunk)]
    for piece in pieces:
        codec.receive_data(piece)
        while (event := codec.next_event()) is not None:
            events.append(event)
            out += codec.data_to_send()
            if isinstance(event, Credentials) and decide:
                decide(codec, event)
            if isinstance(event, Closed):
                return events, bytes(out + codec.data_to_send())
        out += codec.data_to_send()
    return events, bytes(out)


def accept(codec, _event):
    codec.accept()


AUTH_OK = b"235 2.7.0 Authentication successful\r\n"
ALICE = Credentials("alice@a.test", PASSWORD, "PLAIN")
LOGIN_STEPS = b64encode(b"alice@a.test") + b"\r\n" + b64encode(PASSWORD.encode()) + b"\r\n"

#: (client bytes, replies after the greeting, events); Credentials are accepted.
EXCHANGES = {
    "auth plain initial": (b"EHLO client.test\r\nAUTH PLAIN " + PLAIN + b"\r\n", EHLO_AUTH + AUTH_OK, [ALICE]),
    "auth plain": (b"EHLO client.test\r\nAUTH PLAIN\r\n" + PLAIN + b"\r\n", EHLO_AUTH + b"334 \r\n" + AUTH_OK, [ALICE]),
    "auth plain, empty initial response": (
        b"EHLO c\r\nAUTH PLAIN =\r\n",
        EHLO_AUTH + b"501 5.5.2 Cannot decode response\r\n",
        [],
    ),
    "auth login": (
        b"ehlo client.test\nauth login\n" + LOGIN_STEPS,
        EHLO_AUTH + b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n" + AUTH_OK,
        [Credentials("alice@a.test", PASSWORD, "LOGIN")],
    ),
    "auth login initial": (
        b"EHLO client.test\r\nAUTH LOGIN " + LOGIN_STEPS,
        EHLO_AUTH + b"334 UGFzc3dvcmQ6\r\n" + AUTH_OK,
        [Credentials("alice@a.test", PASSWORD, "LOGIN")],
    ),
    "cancel, noop, rset, help, quit": (
        b"EHLO c\r\nAUTH LOGIN\r\n*\r\nNOOP x\r\nRSET\r\nHELP\r\nQUIT\r\n",
        EHLO_AUTH
        + b"334 VXNlcm5hbWU6\r\n501 5.0.0 Authentication cancelled\r\n250 2.0.0 OK\r\n250 2.0.0 OK\r\n"
        + b"214 2.0.0 See RFC 5321 and RFC 4954\r\n221 2.0.0 Bye\r\n",
        [Closed()],
    ),
    "refusals": (
        b"AUTH PLAIN\r\nHELO c\r\nAUTH PLAIN " + PLAIN + b"\r\nEHLO\r\nEHLO a b\r\nMAIL FROM:<a@b>\r\n"
        b"rcpt TO:<x@y>\r\nDATA\r\nVRFY x\r\nXYZZY\r\nRSET x\r\nSTARTTLS\r\nEHLO c\r\nAUTH CRAM-MD5\r\nAUTH\r\n"
        b"AUTH PLAIN a b\r\nAUTH PLAIN !!\r\nQUIT\r\n",
        b"503 5.5.1 Send EHLO first\r\n250 smtp.test\r\n503 5.5.1 Send EHLO first\r\n"
        b"501 5.5.4 Syntax: EHLO hostname\r\n501 5.5.4 Syntax: EHLO hostname\r\n"
        + b"530 5.7.0 Authentication required\r\n"
        * 4
        + b"500 5.5.2 Command not recognized\r\n501 5.5.4 Syntax error in parameters\r\n"
        b"502 5.5.1 STARTTLS not available\r\n" + EHLO_AUTH + b"504 5.5.4 Unrecognized authentication type\r\n"
        b"504 5.5.4 Unrecognized authentication type\r\n501 5.5.4 Syntax error in parameters\r\n"
        b"501 5.5.2 Cannot decode response\r\n221 2.0.0 Bye\r\n",
        [Closed()],
    ),
}


@pytest.mark.parametrize("name", EXCHANGES)
@pytest.mark.parametrize("chunk", [None, 1])
def test_exchange_whole_and_byte_by_byte(name, chunk):
    data, replies, expected = EXCHANGES[name]
    events, out = drive(server(max_errors=20), data, chunk, accept)
    assert out == GREETING + replies
    assert events == expected


@pytest.mark.parametrize("name", [n for n, (_, _, events) in EXCHANGES.items() if events and events != [Closed()]])
def test_exchange_with_trailing_data(name):
    data, replies, _ = EXCHANGES[name]
    codec = server()
    trailing = b"MAIL FROM:<alice@a.test>\r\nRCPT TO:<bob@b.test>\r\nDATA\r\n"
    _, out = drive(codec, data + trailing, None, accept)
    assert out == GREETING + replies
    assert codec.trailing_data() == trailing and codec.ehlo_name == "client.test"


def test_starttls_then_auth_after_it():
    codec = server(tls_available=True, require_tls=True)
    events, out = drive(codec, b"STARTTLS\r\nEHLO c\r\nAUTH PLAIN " + PLAIN + b"\r\nSTARTTLS\r\n")
    assert events == [StartTls()]
    assert out == GREETING + b"503 5.5.1 Send EHLO first\r\n" + EHLO + b"250 STARTTLS\r\n" + (
        b"530 5.7.0 Must issue a STARTTLS command first\r\n220 2.0.0 Ready to start TLS\r\n"
    )
    codec.tls_started()
    assert codec.ehlo_name is None  # the client starts over
    events, out = drive(codec, b"AUTH PLAIN " + PLAIN + b"\r\nSTARTTLS\r\nEHLO c2\r\nAUTH PLAIN " + PLAIN + b"\r\n")
    assert out == b"503 5.5.1 Send EHLO first\r\n503 5.5.1 TLS already active\r\n" + EHLO_AUTH
    assert events == [ALICE] and codec.ehlo_name == "c2"


@pytest.mark.parametrize("chunk", [None, 1])
def test_commands_pipelined_after_starttls_end_the_session(chunk):
    codec = server(tls_available=True)
    with pytest.raises(ProtocolError) as info:
        events, _ = drive(codec, b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<mallory@evil>\r\n", chunk)
        assert events == [StartTls()]
        codec.tls_started()
    reason = b"Data received before TLS" if chunk else b"Commands pipelined after STARTTLS"
    assert info.value.reply == b"421 4.7.0 " + reason + b", closing connection\r\n"
    assert info.value.close and codec.next_event() == Closed()


def test_require_tls_needs_a_way_to_tls():
    with pytest.raises(ValueError, match="require_tls"):
        SubmissionServer()


def test_reject_unavailable_and_the_failure_budget():
    codec = server(max_login_failures=2)
    login = b"EHLO c\r\nAUTH PLAIN " + PLAIN + b"\r\n"
    _, out = drive(codec, login, None, lambda c, e: c.unavailable())
    assert out.endswith(b"454 4.7.0 Temporary authentication failure\r\n")
    _, out = drive(codec, login, None, lambda c, e: c.reject())
    assert out == EHLO_AUTH + b"535 5.7.8 Authentication credentials invalid\r\n"
    events, out = drive(codec, login + b"NOOP\r\n", None, lambda c, e: c.reject())
    assert out == EHLO_AUTH + b"535 5.7.8 Authentication credentials invalid\r\n" + (
        b"421 4.7.0 Too many failed logins, closing connection\r\n"
    )
    assert events[-1] == Closed()


def test_bad_command_budget_ends_the_session_with_421():
    codec = server(max_errors=3)
    with pytest.raises(ProtocolError) as info:
        drive(codec, b"MAIL FROM:<a@b>\r\n" * 4)
    assert info.value.reply == bytes(smtp.TOO_MANY_ERRORS) and info.value.close
    assert codec.next_event() == Closed()


def test_line_caps():
    long_noop = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 4) + b"\r\n"
    _, out = drive(server(), long_noop + b"NOOP " + b"x" * (MAX_COMMAND_LINE - 5) + b"\r\n")
    assert out == GREETING + b"500 5.5.2 Line too long\r\n250 2.0.0 OK\r\n"
    # AUTH lines may be longer (RFC 4954), up to the longest SASL response
    user, password = "u" * 1024, "p" * 1024
    long_auth = b"EHLO c\r\nAUTH PLAIN " + sasl_plain_response(user, password, "z" * 1024) + b"\r\n"
    assert len(long_auth) > MAX_COMMAND_LINE
    assert drive(server(), long_auth)[0] == [Credentials(user, password, "PLAIN", "z" * 1024)]
    codec = server()
    with pytest.raises(ProtocolError) as info:
        drive(codec, b"AUTH PLAIN " + b"A" * MAX_AUTH_LINE, 1000)
    assert info.value.reply == b"421 4.7.0 Line too long, closing connection\r\n"
    assert codec.buffered <= MAX_AUTH_LINE + 1000


def test_lines_wait_while_a_login_is_decided_and_eof_closes():
    codec = server()
    events, out = drive(codec, b"EHLO c\r\nAUTH PLAIN " + PLAIN + b"\r\nNOOP\r\n")
    assert events == [ALICE] and codec.next_event() is None
    codec.unavailable()
    assert codec.next_event() is None
    codec.receive_data(b"")
    assert codec.next_event() == Closed()
    assert codec.data_to_send() == b"454 4.7.0 Temporary authentication failure\r\n250 2.0.0 OK\r\n"
    with pytest.raises(RuntimeError):
        codec.trailing_data()


# --- the client ---------------------------------------------------------------------------------


def client(**options) -> SmtpClient:
    return SmtpClient("alice@a.test", PASSWORD, **({"ehlo_name": "client.test"} | options))


def converse(codec: SmtpClient, script: list[bytes], chunk: int | None = None):
    """Plays a server: each scripted reply is fed after the client's last command; returns the
    client's commands and events."""
    sent, events = [], []
    for reply in script:
        for piece in [reply] if chunk is None else [reply[i : i + chunk] for i in range(0, len(reply), chunk)]:
            codec.receive_data(piece)
            while (event := codec.next_event()) is not None:
                events.append(event)
                if isinstance(event, StartTls):
                    codec.tls_started()
        sent.append(codec.data_to_send())
    return sent, events


POSTFIX_EHLO = (
    b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n"
    b"250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n250 8BITMIME\r\n"
)


@pytest.mark.parametrize("chunk", [None, 1])
def test_client_starttls_xclient_auth_plain(chunk):
    codec = client(xclient=Xclient("2001:db8::7", 40000, helo="client.test"))
    script = [
        b"220 mx\r\n",
        POSTFIX_EHLO,
        b"220 2.0.0 go\r\n",
        POSTFIX_EHLO,
        b"220 mx again\r\n",
        POSTFIX_EHLO,
        AUTH_OK,
    ]
    sent, events = converse(codec, script, chunk)
    assert sent == [
        b"EHLO client.test\r\n",
        b"STARTTLS\r\n",
        b"EHLO client.test\r\n",
        b"XCLIENT ADDR=IPV6:2001:db8::7 PORT=40000 HELO=client.test\r\n",
        b"EHLO client.test\r\n",
        b"AUTH PLAIN " + PLAIN + b"\r\n",
        b"",
    ]
    assert events == [StartTls(), LoggedIn()] and codec.tls_active
    assert codec.extensions["SIZE"] == ["10240000"]


def test_client_auth_login_and_trailing_data():
    codec = client(starttls=False)
    ehlo = b"250-mx\r\n250 AUTH LOGIN\r\n"
    sent, events = converse(
        codec, [b"220 mx\r\n", ehlo, b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n", AUTH_OK + b"x"]
    )
    assert sent[1:4] == [
        b"AUTH LOGIN\r\n",
        b64encode(b"alice@a.test") + b"\r\n",
        b64encode(PASSWORD.encode()) + b"\r\n",
    ]
    assert events == [LoggedIn()] and codec.trailing_data() == b"x"


def test_client_answers_a_needless_challenge_once_then_cancels():
    sent, events = converse(
        client(), [b"220 mx\r\n", b"250-mx\r\n250 AUTH PLAIN\r\n", b"334 \r\n", b"334 \r\n", AUTH_OK]
    )
    assert sent[2:4] == [PLAIN + b"\r\n", b"*\r\n"] and events == [LoggedIn()]


@pytest.mark.parametrize(
    ("options", "script", "refusal"),
    [
        ({}, [b"554 5.3.2 go away\r\n"], LoginRefused("greeting: 554 5.3.2 go away", True)),
        ({}, [b"220 mx\r\n", b"502 5.5.1 no EHLO\r\n"], LoginRefused("EHLO: 502 5.5.1 no EHLO", True)),
        (
            {},
            [b"220 mx\r\n", POSTFIX_EHLO, b"454 4.7.0 TLS not available\r\n"],
            LoginRefused("STARTTLS: 454 4.7.0 TLS not available", True),
        ),
        (
            {"require_tls": True},
            [b"220 mx\r\n", b"250-mx\r\n250 AUTH PLAIN\r\n"],
            LoginRefused("backend offers no STARTTLS", True),
        ),
        (
            {"xclient": Xclient("192.0.2.7")},
            [b"220 mx\r\n", b"250-mx\r\n250 AUTH PLAIN\r\n"],
            LoginRefused("backend offers no XCLIENT", True),
        ),
        (
            {"xclient": Xclient("192.0.2.7"), "starttls": False},
            [b"220 mx\r\n", POSTFIX_EHLO, b"550 5.7.0 insufficient authorization\r\n"],
            LoginRefused("XCLIENT: 550 5.7.0 insufficient authorization", True),
        ),
        (
            {},
            [b"220 mx\r\n", b"250-mx\r\n250 AUTH CRAM-MD5\r\n"],
            LoginRefused("backend offers neither AUTH PLAIN nor LOGIN", True),
        ),
        (
            {},
            [b"220 mx\r\n", b"250-mx\r\n250 AUTH PLAIN\r\n", b"535 5.7.8 Error: authentication failed\r\n"],
            LoginRefused("AUTH: 535 5.7.8 Error: authentication failed", False),
        ),
        (
            {},
            [b"220 mx\r\n", b"250-mx\r\n250 AUTH PLAIN\r\n", b"454 4.7.0 Temporary failure\r\n"],
            LoginRefused("AUTH: 454 4.7.0 Temporary failure", True),
        ),
        (
            {},
            [b"220 mx\r\n", b"250-mx\r\n250 AUTH PLAIN\r\n", b"534 5.7.9 too weak\r\n"],
            LoginRefused("AUTH: 534 5.7.9 too weak", True),
        ),
    ],
)
def test_client_refusals(options, script, refusal):
    sent, events = converse(client(**options), script)
    assert events == [refusal] and sent[-1].endswith(b"QUIT\r\n")


@pytest.mark.parametrize(
    "script",
    [[b"+OK POP3\r\n"], [b"220 mx\r\n", b"250-a\r\n" * 65], [b"220 " + b"x" * 1000 + b"\r\n"], [b"220-mx\r\n", b""]],
)
def test_client_protocol_errors(script):
    with pytest.raises(ProtocolError) as info:
        converse(client(), script)
    assert info.value.close


def test_xclient_values_are_xtext():
    command = Xclient("192.0.2.7", 25, helo="a+b=c", login="jörg").command(["ADDR", "PORT", "HELO", "LOGIN"])
    assert command == b"XCLIENT ADDR=192.0.2.7 PORT=25 HELO=a+2Bb+3Dc LOGIN=j+C3+B6rg"
    assert Xclient("192.0.2.7", 25).command(["ADDR"]) == b"XCLIENT ADDR=192.0.2.7"
    with pytest.raises(ValueError):
        Xclient("not an address")


def pair(front: SubmissionServer, back: SmtpClient, decide) -> list:
    """Runs the client against the server until neither has more to say; returns all events."""
    events = []
    for _ in range(50):
        moved = False
        for source, sink in ((front, back), (back, front)):
            data = source.data_to_send()
            if data:
                sink.receive_data(data)
                moved = True
            while (event := sink.next_event()) is not None:
                events.append(event)
                moved = True
                if isinstance(event, Closed):
                    return events
                if isinstance(event, StartTls):
                    sink.tls_started()
                elif isinstance(event, Credentials):
                    decide(sink, event)
        if not moved:
            return events
    raise AssertionError("the pair did not settle")


@pytest.mark.parametrize(
    ("decide", "result"),
    [
        (SubmissionServer.accept, LoggedIn()),
        (SubmissionServer.reject, LoginRefused("AUTH: 535 5.7.8 Authentication credentials invalid", False)),
        (SubmissionServer.unavailable, LoginRefused("AUTH: 454 4.7.0 Temporary authentication failure", True)),
    ],
)
@pytest.mark.parametrize("tls", [False, True])
def test_client_server_round_trip(decide, result, tls):
    front = server(tls_available=tls, require_tls=tls)
    events = pair(front, client(require_tls=tls), lambda s, e: decide(s))
    starts = [StartTls(), StartTls()] if tls else []
    assert events[: len(starts) + 2] == [*starts, ALICE, result]
    assert front.ehlo_name == "client.test" and front.tls_active is tls


# --- fuzz, bounds, well-formed replies, and secrets --------------------------------------------

REPLY_LINE = re.compile(rb"[2-5][0-9][0-9][ -][\x20-\x7e]*")
VERBS = [b"EHLO", b"HELO", b"AUTH", b"AUTH PLAIN", b"AUTH LOGIN", b"STARTTLS", b"MAIL", b"NOOP", b"RSET", b"*", b""]
lines = st.one_of(
    st.builds(lambda v, a: v + b" " + a, st.sampled_from(VERBS), st.binary(max_size=40)),
    st.binary(max_size=60),
    st.builds(lambda v, n: v + b" " + b"\0A=" * n, st.sampled_from(VERBS), st.integers(0, 2000)),
    st.sampled_from([b"EHLO c", b"AUTH PLAIN " + PLAIN, b64encode(b"user"), b"\0" * 10, b"A" * (MAX_AUTH_LINE + 5)]),
)
sessions = st.lists(lines, max_size=30).map(lambda ls: b"\r\n".join(ls))


def check_output(out: bytes) -> None:
    assert out == b"" or out.endswith(b"\r\n")
    for line in out.split(b"\r\n")[:-1]:
        assert REPLY_LINE.fullmatch(line), line
        assert len(line) + 2 <= 512
    read_replies(out)  # multi-line replies hold together


def fuzz_session(codec, data: bytes, chunk: int) -> None:
    shared_fuzz_session(codec, data, chunk, check_output=check_output, cap=MAX_AUTH_LINE, password=PASSWORD)


@settings(max_examples=4000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sessions, st.sampled_from([1, 7, 4096]), st.booleans())
def test_fuzz_server_sessions(data, chunk, tls):
    fuzz_session(server(tls_available=tls, require_tls=tls), data, chunk)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=6000))
def test_fuzz_server_raw_bytes(data):
    fuzz_session(server(), data, 512)


server_lines = st.one_of(
    st.sampled_from([b"220 mx", b"250-mx", b"250 AUTH PLAIN", b"250-STARTTLS", b"334 ", b"235 ok", b"535 5.7.8 no"]),
    st.binary(max_size=40),
    st.builds(lambda c, n: c + b"\0x" * n, st.sampled_from([b"220 ", b"250-", b"250 "]), st.integers(0, 1000)),
)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(server_lines, max_size=80).map(lambda ls: b"\r\n".join(ls)), st.sampled_from([1, 64, 4096]))
def test_fuzz_client(data, chunk):
    codec = client(xclient=Xclient("192.0.2.7", 1))
    try:
        for i in range(0, len(data) + 1, chunk):
            codec.receive_data(data[i : i + chunk])
            while (event := codec.next_event()) is not None:
                assert PASSWORD not in repr(event)
                if isinstance(event, StartTls):
                    codec.tls_started()
                if isinstance(event, LoggedIn | LoginRefused):
                    return  # the rest is the backend's session
            assert codec.buffered <= smtp.MAX_REPLY_LINE + 1
            assert len(codec.extensions) <= smtp.MAX_REPLY_LINES
    except ProtocolError as exc:
        assert exc.close and PASSWORD not in str(exc)


def test_no_password_in_any_repr_or_error():
    b64 = b64encode(PASSWORD.encode()).decode()
    codec = server()
    events, _ = drive(codec, b"EHLO c\r\nAUTH PLAIN " + PLAIN + b"\r\n")
    texts = [repr(codec), *map(repr, events), repr(client()), repr(client(starttls=False))]
    codec.reject()
    drive(codec, b"AUTH LOGIN\r\n" + b64encode(b"alice") + b"\r\n")
    texts.append(repr(codec))
    back = client(starttls=False)
    converse(back, [b"220 mx\r\n", b"250 AUTH LOGIN\r\n", b"334 x\r\n"])
    texts.append(repr(back))  # holding the LOGIN responses
    for bad in [b"AUTH PLAIN " + PLAIN + b"\0", b"x" * (MAX_AUTH_LINE + 2) + PASSWORD.encode()]:
        try:
            drive(server(max_errors=0), b"EHLO c\r\n" + bad + b"\r\n")
        except ProtocolError as exc:
            texts += [str(exc), exc.reply.decode()]
    assert all(PASSWORD not in text and b64 not in text for text in texts)


# --- against a real Dovecot submission service and a real Postfix -------------------------------


def login_over_socket(codec, address: tuple[str, int], context=None):
    """Drives `codec` over a blocking socket until it logs in or is refused; returns the event."""
    import socket

    with socket.create_connection(address, timeout=10) as sock:
        stream = sock
        while True:
            event = codec.next_event()
            if data := codec.data_to_send():
                stream.sendall(data)
            if event is None:
                codec.receive_data(stream.recv(4096))
            elif isinstance(event, StartTls):
                stream = context.wrap_socket(sock, server_hostname=address[0])
                codec.tls_started()
            else:
                stream.sendall(codec.data_to_send())
                return event


@pytest.mark.slow
def test_client_logs_in_at_dovecot_and_passes_xclient_to_postfix(tmp_path):
    from helpers import mailkit

    with (
        mailkit.dovecot(tmp_path / "a", {"alice@a.test": PASSWORD}) as dovecot,
        mailkit.postfix(tmp_path / "mx", dovecot, ["a.test"], xclient=True) as postfix,
    ):
        dovecot.relay_to(postfix.endpoint)
        submission = (dovecot.host, dovecot.ports["submission"])
        context = dovecot.client_context()
        assert login_over_socket(client(require_tls=True), submission, context) == LoggedIn()
        refused = login_over_socket(
            SmtpClient("alice@a.test", "wrong", "c.test", require_tls=True), submission, context
        )
        assert isinstance(refused, LoginRefused) and not refused.temporary
        # the kit's Postfix takes XCLIENT (and greets anew) but offers no AUTH
        mx = (postfix.host, postfix.port)
        refused = login_over_socket(client(xclient=Xclient("192.0.2.7", 40000, helo="client.test")), mx)
        assert refused == LoginRefused("backend offers neither AUTH PLAIN nor LOGIN", True)
        log, deadline = tmp_path / "mx" / "postfix.log", time.monotonic() + 20  # postlogd writes late
        while "192.0.2.7" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "connect from unknown[192.0.2.7]" in log.read_text()
