"""protocols.pop3: the pre-login server and the backend login client, each exchange fed whole,
byte by byte and with trailing data; client/server round trips; refusals; fuzz; no password in
any event or error."""

from __future__ import annotations

import re

import pytest
from helpers.codecs import fuzz_session as shared_fuzz_session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshmail.protocols.common import (
    MAX_SASL,
    Closed,
    Credentials,
    LoggedIn,
    LoginRefused,
    ProtocolError,
    StartTls,
    b64encode,
    sasl_plain_response,
)
from meshmail.protocols.pop3 import MAX_LINE, Pop3Client, Pop3Server

PASSWORD = "Sekr3t pässword"
PLAIN = sasl_plain_response("alice@a.test", PASSWORD)
GREETING = b"+OK pop.test POP3 ready.\r\n"


def server(**options) -> Pop3Server:
    options = {"hostname": "pop.test", "require_tls": False} | options
    return Pop3Server(**options)


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


CAPA_PLAIN = b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n"
LOGIN = Credentials("alice@a.test", PASSWORD, "USER")

#: (client bytes, replies after the greeting, events); Credentials are accepted.
EXCHANGES = {
    "capa": (b"CAPA\r\n", CAPA_PLAIN + b"USER\r\nSASL PLAIN LOGIN\r\n.\r\n", []),
    "user pass": (
        b"USER alice@a.test\r\nPASS " + PASSWORD.encode() + b"\r\n",
        b"+OK\r\n+OK Logged in.\r\n",
        [LOGIN],
    ),
    "lower case, bare LF": (
        b"user alice@a.test\npass " + PASSWORD.encode() + b"\n",
        b"+OK\r\n+OK Logged in.\r\n",
        [LOGIN],
    ),
    "auth plain initial": (
        b"AUTH PLAIN " + PLAIN + b"\r\n",
        b"+OK Logged in.\r\n",
        [Credentials("alice@a.test", PASSWORD, "PLAIN")],
    ),
    "auth plain": (
        b"AUTH PLAIN\r\n" + PLAIN + b"\r\n",
        b"+ \r\n+OK Logged in.\r\n",
        [Credentials("alice@a.test", PASSWORD, "PLAIN")],
    ),
    "auth login": (
        b"AUTH LOGIN\r\n" + b64encode(b"alice@a.test") + b"\r\n" + b64encode(PASSWORD.encode()) + b"\r\n",
        b"+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n+OK Logged in.\r\n",
        [Credentials("alice@a.test", PASSWORD, "LOGIN")],
    ),
    "auth login initial": (
        b"AUTH login " + b64encode(b"alice@a.test") + b"\r\n" + b64encode(PASSWORD.encode()) + b"\r\n",
        b"+ UGFzc3dvcmQ6\r\n+OK Logged in.\r\n",
        [Credentials("alice@a.test", PASSWORD, "LOGIN")],
    ),
    "auth cancelled": (
        b"AUTH PLAIN\r\n*\r\nQUIT\r\n",
        b"+ \r\n-ERR Authentication cancelled.\r\n+OK Bye.\r\n",
        [Closed()],
    ),
    "mechanism list": (b"AUTH\r\n", b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n", []),
    "refusals": (
        b"STAT\r\nXYZZY\r\n\r\nPASS x\r\nUSER\r\nCAPA x\r\nSTLS\r\nAUTH CRAM-MD5\r\nAUTH PLAIN !!\r\nQUIT\r\n",
        b"-ERR Log in first.\r\n-ERR Unknown command.\r\n-ERR Unknown command.\r\n-ERR USER first.\r\n"
        b"-ERR USER needs a valid user name.\r\n-ERR CAPA takes no argument.\r\n-ERR STLS is not available.\r\n"
        b"-ERR Unrecognized authentication type.\r\n-ERR Malformed authentication response.\r\n+OK Bye.\r\n",
        [Closed()],
    ),
}


@pytest.mark.parametrize("name", EXCHANGES)
@pytest.mark.parametrize("chunk", [None, 1])
def test_exchange_whole_and_byte_by_byte(name, chunk):
    data, replies, expected = EXCHANGES[name]
    events, out = drive(server(), data, chunk, accept)
    assert out == GREETING + replies
    assert events == expected


@pytest.mark.parametrize("name", [n for n, (_, _, events) in EXCHANGES.items() if events and events != [Closed()]])
def test_exchange_with_trailing_data(name):
    data, replies, _ = EXCHANGES[name]
    codec = server()
    _, out = drive(codec, data + b"STAT\r\nRETR 1\r\n", None, accept)
    assert out == GREETING + replies
    assert codec.trailing_data() == b"STAT\r\nRETR 1\r\n"
    assert codec.next_event() is None


def test_stls_then_login_after_it():
    codec = server(tls_available=True, require_tls=True)
    events, out = drive(codec, b"CAPA\r\nUSER a\r\nSTLS\r\n")
    assert events == [StartTls()]
    assert out == GREETING + CAPA_PLAIN + b"STLS\r\n.\r\n" + (
        b"-ERR [AUTH] Plaintext authentication disallowed, use STLS first.\r\n+OK Begin TLS negotiation.\r\n"
    )
    codec.tls_started()
    events, out = drive(codec, b"CAPA\r\nSTLS\r\nAUTH PLAIN " + PLAIN + b"\r\n", None, accept)
    assert out == CAPA_PLAIN + b"USER\r\nSASL PLAIN LOGIN\r\n.\r\n-ERR TLS is already active.\r\n+OK Logged in.\r\n"
    assert events == [Credentials("alice@a.test", PASSWORD, "PLAIN")]


@pytest.mark.parametrize("chunk", [None, 1])
def test_commands_pipelined_after_stls_end_the_session(chunk):
    codec = server(tls_available=True)
    with pytest.raises(ProtocolError) as info:
        events, _ = drive(codec, b"STLS\r\nUSER mallory\r\n", chunk)
        assert events == [StartTls()]
        codec.tls_started()
    if chunk:  # arriving after +OK, they are plaintext where TLS is due
        assert isinstance(info.value, ProtocolError) and info.value.reply == b"-ERR Data received before TLS\r\n"
    else:
        assert info.value.reply == b"-ERR Commands pipelined after STLS.\r\n"
    assert info.value.close and codec.next_event() == Closed()


def test_tls_active_from_the_start_offers_no_stls():
    events, out = drive(server(tls_active=True), b"CAPA\r\n")
    assert out == GREETING + CAPA_PLAIN + b"USER\r\nSASL PLAIN LOGIN\r\n.\r\n"


def test_require_tls_needs_a_way_to_tls():
    with pytest.raises(ValueError, match="require_tls"):
        Pop3Server()


def test_reject_and_unavailable_then_the_failure_budget():
    codec = server(max_login_failures=2)
    events, out = drive(codec, b"AUTH PLAIN " + PLAIN + b"\r\n", None, lambda c, e: c.unavailable())
    assert out.endswith(b"-ERR [SYS/TEMP] Temporary server failure, try again later.\r\n")
    events, out = drive(codec, b"AUTH PLAIN " + PLAIN + b"\r\n", None, lambda c, e: c.reject())
    assert out == b"-ERR [AUTH] Authentication failed.\r\n"
    events, out = drive(codec, b"AUTH PLAIN " + PLAIN + b"\r\nQUIT\r\n", None, lambda c, e: c.reject("No."))
    assert out == b"-ERR [AUTH] No.\r\n"
    assert events[-1] == Closed()
    with pytest.raises(RuntimeError):
        codec.accept()


def test_lines_wait_while_a_login_is_decided():
    codec = server()
    events, out = drive(codec, b"AUTH PLAIN " + PLAIN + b"\r\nCAPA\r\nQUIT\r\n")
    assert len(events) == 1 and out == GREETING
    assert codec.next_event() is None  # nothing more until the driver answers
    codec.reject()
    assert codec.next_event() == Closed()
    assert codec.data_to_send().startswith(b"-ERR [AUTH] Authentication failed.\r\n+OK Capability")


def test_bad_command_budget_ends_the_session():
    codec = server(max_errors=3)
    with pytest.raises(ProtocolError) as info:
        drive(codec, b"X\r\n" * 4)
    assert info.value.reply == b"-ERR Too many bad commands, closing.\r\n" and info.value.close
    assert codec.next_event() == Closed()


@pytest.mark.parametrize("data", [b"x" * (MAX_LINE + 2), b"AUTH PLAIN " + b"A" * MAX_SASL + b"AAAA\r\n"])
def test_a_line_too_long_is_refused_before_it_ends(data):
    codec = server()
    with pytest.raises(ProtocolError) as info:
        drive(codec, data)
    assert info.value.reply == b"-ERR Line too long\r\n" and codec.next_event() == Closed()


def test_end_of_stream_closes():
    assert drive(server(), b"USER a\r\nPA")[0] == []
    codec = server()
    codec.receive_data(b"")
    assert codec.next_event() == Closed()


@pytest.mark.parametrize("text", ["two\r\nlines", "é", "x" * 600])
def test_driver_text_must_be_one_printable_line(text):
    codec = server()
    drive(codec, b"AUTH PLAIN " + PLAIN + b"\r\n")
    with pytest.raises(ValueError):
        codec.reject(text)


# --- the client, against scripted servers and against Pop3Server ---------------------------------


def client(**options) -> Pop3Client:
    return Pop3Client("alice@a.test", PASSWORD, **options)


def converse(codec: Pop3Client, script: list[bytes], chunk: int | None = None):
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


CAPA_REPLY = b"+OK\r\nTOP\r\nUSER\r\nSASL PLAIN LOGIN\r\nSTLS\r\n.\r\n"


@pytest.mark.parametrize("chunk", [None, 1])
def test_client_stls_then_auth_plain(chunk):
    sent, events = converse(client(), [b"+OK hi\r\n", CAPA_REPLY, b"+OK go\r\n", CAPA_REPLY, b"+OK in\r\n"], chunk)
    assert sent == [b"CAPA\r\n", b"STLS\r\n", b"CAPA\r\n", b"AUTH PLAIN " + PLAIN + b"\r\n", b""]
    assert events == [StartTls(), LoggedIn()]


def test_client_user_pass_when_capa_is_unknown_and_trailing_data():
    codec = client(starttls=False)
    sent, events = converse(codec, [b"+OK hi\r\n", b"-ERR what\r\n", b"+OK\r\n", b"+OK in\r\n+OK 2 10\r\n"])
    assert sent == [b"CAPA\r\n", b"USER alice@a.test\r\n", b"PASS " + PASSWORD.encode() + b"\r\n", b""]
    assert events == [LoggedIn()] and codec.trailing_data() == b"+OK 2 10\r\n"


def test_client_long_plain_waits_for_the_continuation():
    codec = Pop3Client("a" * 200, "p" * 200)
    sent, events = converse(codec, [b"+OK\r\n", b"+OK\r\nSASL PLAIN\r\n.\r\n", b"+ \r\n", b"+OK\r\n"])
    assert sent[1] == b"AUTH PLAIN\r\n" and sent[2] == sasl_plain_response("a" * 200, "p" * 200) + b"\r\n"
    assert events == [LoggedIn()]


@pytest.mark.parametrize(
    ("script", "refusal"),
    [
        ([b"-ERR busy\r\n"], LoginRefused("greeting: busy", True)),
        (
            [b"+OK\r\n", CAPA_REPLY, b"-ERR [AUTH] Authentication failed.\r\n"],
            LoginRefused("Authentication failed.", False),
        ),
        ([b"+OK\r\n", CAPA_REPLY, b"-ERR Bad login\r\n"], LoginRefused("Bad login", False)),
        ([b"+OK\r\n", CAPA_REPLY, b"-ERR [SYS/TEMP] Try later\r\n"], LoginRefused("Try later", True)),
        ([b"+OK\r\n", CAPA_REPLY, b"-ERR [IN-USE] Locked\r\n"], LoginRefused("Locked", True)),
        (
            [b"+OK\r\n", b"+OK\r\nSASL CRAM-MD5\r\n.\r\n"],
            LoginRefused("backend offers neither SASL PLAIN nor USER", True),
        ),
    ],
)
def test_client_refusals(script, refusal):
    codec = client(starttls=False)
    sent, events = converse(codec, script)
    assert events == [refusal] and sent[-1].endswith(b"QUIT\r\n")


def test_client_require_tls_without_stls_and_stls_refused():
    assert converse(client(require_tls=True), [b"+OK\r\n", b"+OK\r\nUSER\r\n.\r\n"])[1] == [
        LoginRefused("backend offers no STLS", True)
    ]
    assert converse(client(), [b"+OK\r\n", CAPA_REPLY, b"-ERR no\r\n"])[1] == [LoginRefused("STLS: no", True)]


@pytest.mark.parametrize(
    "script",
    [[b"* OK IMAP\r\n"], [b"+OK\r\n", b"+OK\r\n" + b"X\r\n" * 65], [b"+OK " + b"x" * 600 + b"\r\n"], [b"+OK\r\n", b""]],
)
def test_client_protocol_errors(script):
    with pytest.raises(ProtocolError) as info:
        converse(client(), script)
    assert info.value.close


def pair(front: Pop3Server, back: Pop3Client, decide) -> list:
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
        (Pop3Server.accept, LoggedIn()),
        (lambda s: s.reject(), LoginRefused("Authentication failed.", False)),
        (lambda s: s.unavailable(), LoginRefused("Temporary server failure, try again later.", True)),
    ],
)
@pytest.mark.parametrize("tls", [False, True])
def test_client_server_round_trip(decide, result, tls):
    front = server(tls_available=tls, require_tls=tls)
    events = pair(front, client(require_tls=tls), lambda s, e: decide(s))
    starts = [StartTls(), StartTls()] if tls else []
    assert events[: len(starts) + 2] == [*starts, Credentials("alice@a.test", PASSWORD, "PLAIN"), result]
    assert front.tls_active is tls


# --- fuzz, bounds, well-formed replies, and secrets --------------------------------------------

REPLY_LINE = re.compile(rb"(\+OK|-ERR|\+)( [\x20-\x7e]*)?|[A-Z0-9-]+( [A-Z0-9-]+)*|\.")
VERBS = [b"USER", b"PASS", b"AUTH", b"AUTH PLAIN", b"AUTH LOGIN", b"CAPA", b"STLS", b"QUIT", b"STAT", b"*", b""]
lines = st.one_of(
    st.builds(lambda v, a: v + b" " + a, st.sampled_from(VERBS), st.binary(max_size=40)),
    st.binary(max_size=60),
    st.builds(lambda v, n: v + b" " + b"\0A=" * n, st.sampled_from(VERBS), st.integers(0, 2000)),
    st.sampled_from([b"AUTH PLAIN " + PLAIN, b64encode(b"user"), b"\0" * 10, b"A" * (MAX_LINE + 5)]),
)
sessions = st.lists(lines, max_size=30).map(lambda ls: b"\r\n".join(ls))


def check_output(out: bytes) -> None:
    assert out == b"" or out.endswith(b"\r\n")
    for line in out.split(b"\r\n")[:-1]:
        assert REPLY_LINE.fullmatch(line), line
        assert len(line) + 2 <= 512


def fuzz_session(codec, data: bytes, chunk: int) -> None:
    shared_fuzz_session(codec, data, chunk, check_output=check_output, cap=MAX_LINE, password=PASSWORD)


@settings(max_examples=4000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sessions, st.sampled_from([1, 7, 4096]), st.booleans())
def test_fuzz_server_sessions(data, chunk, tls):
    fuzz_session(server(tls_available=tls, require_tls=tls), data, chunk)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=6000))
def test_fuzz_server_raw_bytes(data):
    fuzz_session(server(), data, 512)


server_lines = st.one_of(
    st.sampled_from(
        [b"+OK", b"-ERR", b"+OK hi", b"-ERR [AUTH] no", b"-ERR [SYS/TEMP", b".", b"SASL PLAIN", b"+ ", b"STLS"]
    ),
    st.binary(max_size=40),
    st.integers(0, 1000).map(lambda n: b"+OK " + b"\0x" * n),
)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(server_lines, max_size=80).map(lambda ls: b"\r\n".join(ls)), st.sampled_from([1, 64, 4096]))
def test_fuzz_client(data, chunk):
    codec = client()
    try:
        for i in range(0, len(data) + 1, chunk):
            codec.receive_data(data[i : i + chunk])
            while (event := codec.next_event()) is not None:
                assert PASSWORD not in repr(event)
                if isinstance(event, StartTls):
                    codec.tls_started()
                if isinstance(event, LoggedIn | LoginRefused):
                    return  # the rest is the backend's session
            assert codec.buffered <= 512
            assert len(codec.capabilities) <= 64
    except ProtocolError as exc:
        assert exc.close and PASSWORD not in str(exc)


def test_no_password_in_any_repr_or_error():
    b64 = b64encode(PASSWORD.encode()).decode()
    codec = server()
    events, _ = drive(codec, b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\n")
    texts = [repr(codec), *map(repr, events), repr(client())]
    codec.reject()
    events, _ = drive(codec, b"AUTH LOGIN\r\n" + b64encode(b"alice") + b"\r\n")
    texts.append(repr(codec))  # mid-exchange, holding the user
    for bad in [b"PASS \0" + PASSWORD.encode(), b"x" * (MAX_LINE + 2) + PASSWORD.encode()]:
        try:
            drive(server(), b"USER a\r\n" + bad + b"\r\n")
        except ProtocolError as exc:
            texts += [str(exc), exc.reply.decode()]
    assert all(PASSWORD not in text and b64 not in text for text in texts)


# --- against a real Dovecot ---------------------------------------------------------------------


def login_over_socket(codec, address: tuple[str, int], context, preamble: bytes = b""):
    """Drives `codec` over a blocking socket until it logs in or is refused; returns the event."""
    import socket

    with socket.create_connection(address, timeout=10) as sock:
        stream = sock
        sock.sendall(preamble)
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
                return event, codec.tls_active


@pytest.mark.slow
def test_client_logs_in_at_dovecot(tmp_path):
    from helpers import mailkit

    from meshmail.protocols import proxyv2

    users = {"alice@a.test": PASSWORD}
    with mailkit.dovecot(tmp_path / "a", users, haproxy=True) as dovecot:
        address = (dovecot.host, dovecot.ports["pop3"])
        header = proxyv2.build(("192.0.2.7", 40000), address)
        context = dovecot.client_context()
        assert login_over_socket(client(require_tls=True), address, context, header) == (LoggedIn(), True)
        refused, _ = login_over_socket(Pop3Client("alice@a.test", "wrong"), address, context, header)
        assert isinstance(refused, LoginRefused) and not refused.temporary
        assert "rip=192.0.2.7" in (tmp_path / "a" / "dovecot.log").read_text()
