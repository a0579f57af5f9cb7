"""protocols.imap: the pre-login server and the backend login client, fed whole, byte by byte
and with trailing data, against each other, against inputs that must be refused, and fuzzed."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable

import pytest
from helpers import mailkit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
from meshmail.protocols.imap import (
    MAX_LINE,
    MAX_LITERAL,
    ImapClient,
    ImapServer,
    forwarding_id,
)

GREETING_CAPS = b"IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN"
BACKEND_CAPS = ["IMAP4rev1", "IDLE", "UIDPLUS"]
LOGGED_IN = b"OK [CAPABILITY IMAP4rev1 IDLE UIDPLUS] Logged in\r\n"
TRAILING = b"x1 SELECT INBOX\r\nx2 FETCH 1:* (FLAGS)\r\n"
#: A reply line: tagged, untagged or a continuation; printable ASCII; CRLF-terminated.
REPLY_LINE = re.compile(rb'(?:\*|\+|[^\x00-\x20\x7f-\xff(){%*"\\+]+) [\x20-\x7e]*\r\n')


def pieces(data: bytes, chunk: int | None) -> list[bytes]:
    return [data] if chunk is None else [data[i : i + chunk] for i in range(0, len(data), chunk)]


def well_formed(output: bytes) -> bool:
    return all(REPLY_LINE.fullmatch(line) for line in output.splitlines(keepends=True))


def accept(server: ImapServer) -> None:
    server.accept(BACKEND_CAPS)


def serve(
    data: bytes, chunk: int | None = None, answer: Callable[[ImapServer], None] | None = accept, **options
) -> tuple[ImapServer, list[object], bytes]:
    """Feeds `data` to a new server in pieces; returns it, its events and what it sent after
    the greeting. A Credentials event is answered with `answer`."""
    server = ImapServer(**{"require_tls": False, **options})
    assert server.data_to_send().startswith(b"* OK [CAPABILITY ")
    events: list[object] = []
    out = bytearray()
    for piece in pieces(data, chunk):
        server.receive_data(piece)
        while (event := server.next_event()) is not None:
            events.append(event)
            out += server.data_to_send()
            if isinstance(event, Credentials) and answer is not None:
                answer(server)
            if isinstance(event, Closed):
                return server, events, bytes(out + server.data_to_send())
            if isinstance(event, StartTls):
                break
        out += server.data_to_send()
    return server, events, bytes(out)


# --- the server: exchanges fed whole, byte by byte, with trailing data ------------------------

ALICE = Credentials("alice", "secret", "LOGIN")
ALICE_PLAIN = Credentials("alice", "secret", "PLAIN")
ALICE_SASL_LOGIN = Credentials("alice", "secret", "LOGIN")
B64_PLAIN = sasl_plain_response("alice", "secret")
B64_USER, B64_PASSWORD = b64encode(b"alice"), b64encode(b"secret")

LOGINS = [
    pytest.param(b"a1 LOGIN alice secret\r\n", ALICE, b"", id="atoms"),
    pytest.param(b"a1 login alice secret\r\n", ALICE, b"", id="lower-case"),
    pytest.param(
        b'a1 LOGIN "al ice" "se\\"cr\\\\et"\r\n', Credentials("al ice", 'se"cr\\et', "LOGIN"), b"", id="quoted"
    ),
    pytest.param(b"a1 LOGIN {5}\r\nalice {6}\r\nsecret\r\n", ALICE, b"+ OK\r\n+ OK\r\n", id="literals"),
    pytest.param(b'a1 LOGIN {5+}\r\nalice "secret"\r\n', ALICE, b"", id="literal-plus"),
    pytest.param(
        b"a1 LOGIN {5+}\r\nj\xc3\xbcrg {4}\r\n\xc3\xa4\xc3\xb6\r\n",
        Credentials("jürg", "äö", "LOGIN"),
        b"+ OK\r\n",
        id="utf8-literals",
    ),
    pytest.param(b"a1 AUTHENTICATE PLAIN " + B64_PLAIN + b"\r\n", ALICE_PLAIN, b"", id="plain-sasl-ir"),
    pytest.param(b"a1 AUTHENTICATE plain\r\n" + B64_PLAIN + b"\r\n", ALICE_PLAIN, b"+ \r\n", id="plain"),
    pytest.param(
        b"a1 AUTHENTICATE LOGIN\r\n" + B64_USER + b"\r\n" + B64_PASSWORD + b"\r\n",
        ALICE_SASL_LOGIN,
        b"+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n",
        id="sasl-login",
    ),
    pytest.param(
        b"a1 AUTHENTICATE LOGIN " + B64_USER + b"\r\n" + B64_PASSWORD + b"\r\n",
        ALICE_SASL_LOGIN,
        b"+ UGFzc3dvcmQ6\r\n",
        id="sasl-login-ir",
    ),
    pytest.param(
        b'a0 CAPABILITY\r\na1 NOOP\r\na2 ID ("name" "Thunderbird" "version" NIL)\r\na3 ID NIL\r\n'
        b"a4 AUTHENTICATE PLAIN\r\n*\r\n"
        b"a1 LOGIN alice secret\r\n",
        ALICE,
        b"* CAPABILITY " + GREETING_CAPS + b"\r\na0 OK Capability completed.\r\na1 OK NOOP completed.\r\n"
        b"* ID NIL\r\na2 OK ID completed.\r\n* ID NIL\r\na3 OK ID completed.\r\n"
        b"+ \r\na4 BAD Authentication cancelled.\r\n",
        id="pipelined",
    ),
]


@pytest.mark.parametrize("trailing", [b"", TRAILING])
@pytest.mark.parametrize("chunk", [None, 1, 3])
@pytest.mark.parametrize(("data", "credentials", "before"), LOGINS)
def test_server_logins(data, credentials, before, chunk, trailing):
    server, events, out = serve(data + trailing, chunk)
    assert events == [credentials]
    assert out == before + b"a1 " + LOGGED_IN
    assert server.trailing_data() == trailing
    assert server.buffered == 0


@pytest.mark.parametrize("chunk", [None, 1])
def test_failed_login_is_retried_and_answers_keep_the_tag(chunk):
    answers = iter([ImapServer.reject, ImapServer.unavailable, lambda server: server.accept(["IMAP4rev1"], "Welcome")])
    data = b"t1 LOGIN alice wrong\r\nt2 LOGIN alice later\r\nt3 LOGIN alice secret\r\n"
    server, events, out = serve(data, chunk, answer=lambda server: next(answers)(server))
    assert [event.password for event in events] == ["wrong", "later", "secret"]
    assert out == (
        b"t1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
        b"t2 NO [UNAVAILABLE] Temporary server failure, try again later.\r\n"
        b"t3 OK [CAPABILITY IMAP4rev1] Welcome\r\n"
    )


def test_backend_refusal_text_is_passed_on_and_failures_are_bounded():
    server, events, out = serve(b"a LOGIN u p\r\n", answer=lambda s: s.reject("[EXPIRED] Password expired."))
    assert out == b"a NO [EXPIRED] Password expired.\r\n"
    server, events, out = serve(b"a LOGIN u p\r\n", answer=lambda s: s.reject("Wrong\r\n* BYE no"))
    assert out == b"a NO [AUTHENTICATIONFAILED] Wrong??* BYE no\r\n"
    server, events, out = serve(b"a LOGIN u p\r\nb LOGIN u p\r\nc LOGIN u p\r\nd NOOP\r\n", answer=ImapServer.reject)
    assert out.endswith(b"c NO [AUTHENTICATIONFAILED] Authentication failed.\r\n* BYE Too many failed logins.\r\n")
    assert events[-1] == Closed() and len(events) == 4


@pytest.mark.parametrize("chunk", [None, 1])
def test_logout(chunk):
    server, events, out = serve(b"a1 NOOP\r\na2 LOGOUT\r\na3 NOOP\r\n", chunk)
    assert events == [Closed()]
    assert out == b"a1 OK NOOP completed.\r\n* BYE Logging out.\r\na2 OK Logout completed.\r\n"
    assert server.next_event() == Closed()


def test_end_of_stream_closes():
    server, events, out = serve(b"a1 NOOP\r\na2 LOG")
    server.receive_data(b"")
    assert server.next_event() == Closed()


@pytest.mark.parametrize("chunk", [None, 1])
def test_starttls_then_login(chunk):
    server, events, out = serve(b"a1 STARTTLS\r\n", chunk, tls_available=True, require_tls=True)
    assert events == [StartTls()]
    assert out == b"a1 OK Begin TLS negotiation now.\r\n"
    server.tls_started()
    assert "STARTTLS" not in server.capabilities and "AUTH=PLAIN" in server.capabilities
    server.receive_data(b"a2 CAPABILITY\r\na3 LOGIN alice secret\r\n")
    assert server.next_event() == ALICE
    assert server.data_to_send() == (
        b"* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN\r\na2 OK Capability completed.\r\n"
    )


def test_greeting_shows_what_is_offered():
    plain = ImapServer(hostname="mx.example", require_tls=False).data_to_send()
    assert plain == b"* OK [CAPABILITY " + GREETING_CAPS + b"] mx.example IMAP ready.\r\n"
    required = ImapServer(tls_available=True).data_to_send()
    assert required.startswith(b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID STARTTLS LOGINDISABLED] ")
    with pytest.raises(ValueError):
        ImapServer(require_tls=True)


def test_client_id_is_kept_for_logs():
    server, events, out = serve(b'a ID ("name" "Mutt" "x-originating-ip" "6.6.6.6" "os" NIL)\r\n')
    assert server.client_id == {"name": "Mutt", "x-originating-ip": "6.6.6.6", "os": None}
    assert out == b"* ID NIL\r\na OK ID completed.\r\n"


# --- the server: inputs refused early ----------------------------------------------------------

BYE_LONG = b"* BYE Line too long.\r\n"
REFUSALS = [
    # (id, options, input, replies sent normally, the fatal reply or None)
    ("oversize-line", {}, b"a1 NOOP " + b"x" * MAX_LINE, b"", BYE_LONG),
    ("oversize-sasl-line", {}, b"a1 AUTHENTICATE PLAIN\r\n" + b"A" * (MAX_LINE + 2), b"+ \r\n", BYE_LONG),
    ("huge-literal", {}, b"a1 LOGIN {4294967296}\r\n", b"a1 BAD [TOOBIG] Literal too big.\r\n", None),
    ("literal-past-cap", {}, b"a1 LOGIN {%d}\r\n" % (MAX_LITERAL + 1), b"a1 BAD [TOOBIG] Literal too big.\r\n", None),
    (
        "huge-nonsync-literal",
        {},
        b"a1 LOGIN {1000000000+}\r\n",
        b"",
        b"a1 BAD [TOOBIG] Literal too big.\r\n* BYE Literal refused.\r\n",
    ),
    (
        "unknown-command-nonsync-literal",
        {},
        b"a1 APPEND INBOX {5+}\r\nhello\r\n",
        b"",
        b"a1 BAD Unknown command or not valid before login.\r\n* BYE Literal refused.\r\n",
    ),
    (
        "too-many-literals",
        {},
        b"a1 LOGIN {1}\r\na {1}\r\nb {1}\r\n",
        b"+ OK\r\n+ OK\r\na1 BAD Too many literals.\r\n",
        None,
    ),
    ("nul-in-quoted", {}, b'a1 LOGIN "al\0ice" secret\r\n', b"a1 BAD Invalid arguments.\r\n", None),
    ("cr-in-quoted", {}, b'a1 LOGIN "al\rice" secret\r\n', b"a1 BAD Invalid arguments.\r\n", None),
    ("bad-escape", {}, b'a1 LOGIN "al\\ice" secret\r\n', b"a1 BAD Invalid arguments.\r\n", None),
    (
        "nul-in-literal",
        {},
        b"a1 LOGIN {3+}\r\na\0b secret\r\n",
        b"a1 BAD LOGIN needs a valid user name and password.\r\n",
        None,
    ),
    ("login-one-arg", {}, b"a1 LOGIN alice\r\n", b"a1 BAD LOGIN takes a user name and a password.\r\n", None),
    ("login-list", {}, b"a1 LOGIN (alice) x\r\n", b"a1 BAD LOGIN takes a user name and a password.\r\n", None),
    ("bad-base64", {}, b"a1 AUTHENTICATE PLAIN !!!!\r\n", b"a1 BAD Invalid authentication response.\r\n", None),
    (
        "bad-base64-response",
        {},
        b"a1 AUTHENTICATE PLAIN\r\ndXNlcg\r\n",
        b"+ \r\na1 BAD Invalid authentication response.\r\n",
        None,
    ),
    (
        "plain-empty-password",
        {},
        b"a1 AUTHENTICATE PLAIN " + b64encode(b"\0alice\0") + b"\r\n",
        b"a1 BAD Invalid authentication response.\r\n",
        None,
    ),
    (
        "unknown-mechanism",
        {},
        b"a1 AUTHENTICATE CRAM-MD5\r\n",
        b"a1 NO Unsupported authentication mechanism.\r\n",
        None,
    ),
    (
        "unknown-command",
        {},
        b"a1 SELECT INBOX\r\n",
        b"a1 BAD Unknown command or not valid before login.\r\n",
        None,
    ),
    ("invalid-tag", {}, b"+a NOOP\r\n", b"* BAD Invalid tag.\r\n", None),
    ("tag-only", {}, b"a1\r\n", b"a1 BAD Invalid command.\r\n", None),
    ("empty-line", {}, b"\r\n", b"* BAD Invalid tag.\r\n", None),
    ("noop-argument", {}, b"a1 NOOP now\r\n", b"a1 BAD This command takes no arguments.\r\n", None),
    ("double-space", {}, b"a1 LOGIN alice  secret\r\n", b"a1 BAD Invalid arguments.\r\n", None),
    ("trailing-space", {}, b"a1 NOOP \r\n", b"a1 BAD Invalid command.\r\n", None),
    (
        "id-too-long-field",
        {},
        b'a1 ID ("' + b"f" * 31 + b'" "v")\r\n',
        b"a1 BAD ID takes NIL or a list of up to 30 field and value pairs.\r\n",
        None,
    ),
    (
        "id-too-many-pairs",
        {},
        b"a1 ID (" + b" ".join(b'"f%d" "v"' % i for i in range(31)) + b")\r\n",
        b"a1 BAD ID takes NIL or a list of up to 30 field and value pairs.\r\n",
        None,
    ),
    (
        "id-odd",
        {},
        b'a1 ID ("name")\r\n',
        b"a1 BAD ID takes NIL or a list of up to 30 field and value pairs.\r\n",
        None,
    ),
    (
        "starttls-pipelined",
        {"tls_available": True},
        b"a1 STARTTLS\r\na2 LOGIN alice secret\r\n",
        b"",
        b"a1 BAD Commands pipelined after STARTTLS.\r\n* BYE Closing.\r\n",
    ),
    ("starttls-not-offered", {}, b"a1 STARTTLS\r\n", b"a1 BAD STARTTLS is not available.\r\n", None),
    ("starttls-twice", {"tls_active": True}, b"a1 STARTTLS\r\n", b"a1 BAD TLS is already active.\r\n", None),
    (
        "login-disabled",
        {"tls_available": True, "require_tls": True},
        b"a1 LOGIN alice secret\r\n",
        b"a1 NO [PRIVACYREQUIRED] Plaintext authentication disallowed, use STARTTLS first.\r\n",
        None,
    ),
    (
        "login-disabled-literal",
        {"tls_available": True, "require_tls": True},
        b"a1 LOGIN {5}\r\n",
        b"a1 NO [PRIVACYREQUIRED] Plaintext authentication disallowed, use STARTTLS first.\r\n",
        None,
    ),
    (
        "authenticate-disabled",
        {"tls_available": True, "require_tls": True},
        b"a1 AUTHENTICATE PLAIN " + B64_PLAIN + b"\r\n",
        b"a1 NO [PRIVACYREQUIRED] Plaintext authentication disallowed, use STARTTLS first.\r\n",
        None,
    ),
    (
        "bad-budget",
        {"max_errors": 3},
        b"a1 FOO\r\na2 BAR\r\na3 BAZ\r\na4 NOOP\r\n",
        b"a1 BAD Unknown command or not valid before login.\r\na2 BAD Unknown command or not valid before login.\r\n",
        b"a3 BAD Unknown command or not valid before login.\r\n* BYE Too many invalid commands.\r\n",
    ),
]


@pytest.mark.parametrize(
    ("options", "data", "replies", "fatal"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_refused_early(options, data, replies, fatal):
    server = ImapServer(**{"require_tls": False, **options})
    server.data_to_send()
    server.receive_data(data)
    events = []
    try:
        while (event := server.next_event()) is not None:
            events.append(event)
    except ProtocolError as error:
        assert fatal == error.reply and error.close
        assert server.next_event() == Closed()
    else:
        assert fatal is None
        assert server.buffered <= MAX_LINE + 1
    assert events == [] and server.data_to_send() == replies
    assert well_formed(replies + (fatal or b""))


def test_ten_bad_commands_then_bye():
    server = ImapServer(require_tls=False)
    server.receive_data(b"".join(b"a%d FOO\r\n" % i for i in range(10)))
    with pytest.raises(ProtocolError) as info:
        server.next_event()
    replies = server.data_to_send() + info.value.reply
    assert replies.count(b" BAD ") == 10 and replies.endswith(b"* BYE Too many invalid commands.\r\n")


def test_plaintext_injected_after_starttls_in_another_packet_is_refused():
    server, events, out = serve(b"a1 STARTTLS\r\n", tls_available=True)
    assert events == [StartTls()]
    server.receive_data(b"a2 LOGIN alice secret\r\n")
    with pytest.raises(ProtocolError, match="before TLS"):
        server.tls_started()
    server, events, out = serve(b"a1 STARTTLS\r\n", tls_available=True)
    server.receive_data(b"a2 NOOP\r\n")
    with pytest.raises(ProtocolError, match="before TLS"):
        server.next_event()


def test_answers_out_of_turn_are_driver_bugs():
    server = ImapServer(require_tls=False)
    for call in (server.reject, server.unavailable, server.trailing_data, server.tls_started):
        with pytest.raises(RuntimeError):
            call()
    server, events, out = serve(b"a LOGIN u p\r\n", answer=None)
    with pytest.raises(ValueError):
        server.accept(["IMAP4rev1", "BAD]CAP"])


# --- the client: scripted backends -------------------------------------------------------------

DOVECOT_GREETING = (
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS AUTH=PLAIN] "
    b"Dovecot ready.\r\n"
)
DOVECOT_OK = b"OK [CAPABILITY IMAP4rev1 SASL-IR ID ENABLE IDLE SORT LITERAL+] Logged in\r\n"
POST_LOGIN = ("IMAP4rev1", "SASL-IR", "ID", "ENABLE", "IDLE", "SORT", "LITERAL+")
FORWARD = forwarding_id(("203.0.113.9", 50123), ("192.0.2.1", 143), "s-1")
ID_LINE = (
    b'ID ("x-originating-ip" "203.0.113.9" "x-originating-port" "50123" "x-connected-ip" "192.0.2.1" '
    b'"x-connected-port" "143" "x-session-id" "s-1")\r\n'
)
PLAIN_IR = b"AUTHENTICATE PLAIN " + B64_PLAIN + b"\r\n"


def converse(client: ImapClient, script: list[tuple[bytes, bytes]], chunk: int | None = None) -> list[object]:
    """Plays a backend: each step's bytes go to the client in pieces, and what the client sends
    meanwhile must be the step's expected bytes. Returns the events."""
    events: list[object] = []
    for incoming, expected in script:
        sent = bytearray()
        for piece in pieces(incoming, chunk):
            client.receive_data(piece)
            while (event := client.next_event()) is not None:
                events.append(event)
                if isinstance(event, StartTls):
                    sent += client.data_to_send()
                    client.tls_started()
            sent += client.data_to_send()
        assert bytes(sent) == expected
    return events


CLIENT_EXCHANGES = [
    pytest.param(
        {"forward": FORWARD, "starttls": False},
        [(DOVECOT_GREETING, b"M1 " + ID_LINE + b"M2 " + PLAIN_IR), (b"* ID NIL\r\nM1 OK ID\r\nM2 " + DOVECOT_OK, b"")],
        id="dovecot-id-sasl-ir",
    ),
    pytest.param(
        {"starttls": True},
        [
            (b"* OK Ready.\r\n", b"M1 CAPABILITY\r\n"),
            (b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\nM1 OK Done\r\n", b"M2 STARTTLS\r\n"),
            (b"M2 OK Begin TLS\r\n", b"M3 CAPABILITY\r\n"),
            (b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nM3 OK Done\r\n", b"M4 AUTHENTICATE PLAIN\r\n"),
            (b"+ \r\n", B64_PLAIN + b"\r\n"),
            (b"M4 OK Logged in\r\n", b"M5 CAPABILITY\r\n"),
            (b"* CAPABILITY " + " ".join(POST_LOGIN).encode() + b"\r\nM5 OK Done\r\n", b""),
        ],
        id="starttls-no-sasl-ir-caps-after-login",
    ),
    pytest.param(
        {"starttls": False},
        [
            (b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n", b'M1 LOGIN "alice" "secret"\r\n'),
            (b"M1 " + DOVECOT_OK, b""),
        ],
        id="login-quoted",
    ),
    pytest.param(
        {"user": 'al"i\\ce', "password": "s\u00e9cret"},
        [
            (b"* OK [CAPABILITY IMAP4rev1] hi\r\n", b'M1 LOGIN "al\\"i\\\\ce" {7}\r\n'),
            (b"+ OK\r\n", "s\u00e9cret\r\n".encode()),
            (b"* CAPABILITY " + " ".join(POST_LOGIN).encode() + b"\r\nM1 OK Logged in\r\n", b""),
        ],
        id="login-synchronizing-literal",
    ),
    pytest.param(
        {"user": "\u00fcser", "password": "s\u00e9cret"},
        [
            (
                b"* OK [CAPABILITY IMAP4rev1 LITERAL+] hi\r\n",
                "M1 LOGIN {5+}\r\n\u00fcser {7+}\r\ns\u00e9cret\r\n".encode(),
            ),
            (b"M1 " + DOVECOT_OK, b""),
        ],
        id="login-literal-plus",
    ),
    pytest.param(
        {"forward": FORWARD},
        [
            (b"* OK [CAPABILITY IMAP4rev1 ID SASL-IR AUTH=PLAIN] hi\r\n", b"M1 " + ID_LINE + b"M2 " + PLAIN_IR),
            (b'* ID ("name" {7}\r\nDovecot "x" {3}\r\n)\r\n)\r\nM1 OK ID\r\nM2 ' + DOVECOT_OK, b""),
        ],
        id="id-answer-with-literals",
    ),
]


@pytest.mark.parametrize("trailing", [b"", b"* 3 EXISTS\r\n"])
@pytest.mark.parametrize("chunk", [None, 1, 5])
@pytest.mark.parametrize(("options", "script"), CLIENT_EXCHANGES)
def test_client_logins(options, script, chunk, trailing):
    client = ImapClient(**{"user": "alice", "password": "secret", **options})
    *steps, (last, expected) = script
    events = converse(client, [*steps, (last + trailing, expected)], chunk)
    assert events[-1] == LoggedIn() and LoggedIn() in events
    assert client.capabilities == POST_LOGIN
    assert client.trailing_data() == trailing


@pytest.mark.parametrize(
    ("answer", "reply", "temporary"),
    [
        (
            b"M1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
            "[AUTHENTICATIONFAILED] Authentication failed.",
            False,
        ),
        (b"M1 NO Wrong password\r\n", "Wrong password", False),
        (b"M1 NO [UNAVAILABLE] Try later\r\n", "[UNAVAILABLE] Try later", True),
        (b"M1 BAD Syntax\r\n", "Syntax", True),
        (b"* BYE Shutting down\r\n", "Shutting down", True),
    ],
)
def test_client_refusals_keep_the_backend_text(answer, reply, temporary):
    client = ImapClient("alice", "secret")
    events = converse(client, [(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] hi\r\n", b"M1 " + PLAIN_IR)])
    assert events == []
    assert converse(client, [(answer, b"")]) == [LoginRefused(reply, temporary)]


@pytest.mark.parametrize(
    ("options", "greeting", "reply"),
    [
        ({}, b"* BYE Too many connections\r\n", "Too many connections"),
        ({"require_tls": True}, b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n", "backend offers no STARTTLS"),
        ({}, b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED] hi\r\n", "backend offers neither AUTH=PLAIN nor LOGIN"),
        ({"authzid": "admin"}, b"* OK [CAPABILITY IMAP4rev1] hi\r\n", "backend offers neither AUTH=PLAIN nor LOGIN"),
    ],
)
def test_client_gives_up_before_sending_credentials(options, greeting, reply):
    client = ImapClient("alice", "secret", **options)
    assert converse(client, [(greeting, b"")]) == [LoginRefused(reply, True)]


CLIENT_ERRORS = [
    ("preauth", b"* PREAUTH [CAPABILITY IMAP4rev1] hi\r\n"),
    ("line-too-long", b"* OK " + b"x" * (MAX_LINE + 1)),
    ("unknown-tag", b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] hi\r\nZ9 OK what\r\n"),
    ("continuation-unasked", b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] hi\r\n+ more\r\n"),
    ("capability-not-atoms", b'* OK [CAPABILITY IMAP4rev1 "x"] hi\r\n'),
    ("huge-literal", b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] hi\r\n* ID ({99999999}\r\n"),
    ("nul-capability", b"* OK [CAPABILITY IMAP4rev1 A\0B] hi\r\n"),
]


@pytest.mark.parametrize("data", [d for _, d in CLIENT_ERRORS], ids=[i for i, _ in CLIENT_ERRORS])
def test_client_refuses_broken_backends(data):
    client = ImapClient("alice", "secret")
    client.receive_data(data)
    with pytest.raises(ProtocolError) as info:
        while client.next_event() is not None:
            pass
    assert info.value.close


def test_client_end_of_stream_and_plaintext_after_starttls():
    client = ImapClient("alice", "secret")
    client.receive_data(b"* OK hi\r\n")
    assert client.next_event() is None
    client.receive_data(b"")
    with pytest.raises(ProtocolError, match="closed"):
        client.next_event()
    client = ImapClient("alice", "secret")
    client.receive_data(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\nM1 OK go\r\n* injected\r\n")
    assert client.next_event() == StartTls()
    with pytest.raises(ProtocolError, match="plaintext"):
        client.tls_started()


def test_client_refuses_unfit_arguments():
    for options in ({"user": "a\r\nb"}, {"password": ""}, {"forward": {"x-originating-ip": "1\r\n"}}):
        with pytest.raises(ValueError):
            ImapClient(**{"user": "alice", "password": "secret", **options})


# --- the pair -----------------------------------------------------------------------------------


def pair_login(client: ImapClient, server: ImapServer) -> tuple[list[object], list[object]]:
    """Runs a client against a server until the client's login ends; the server accepts."""
    client_events: list[object] = []
    server_events: list[object] = []
    for _ in range(50):
        if data := client.data_to_send():  # b"" would mean the end of the stream
            server.receive_data(data)
        while (event := server.next_event()) is not None:
            server_events.append(event)
            if isinstance(event, Credentials):
                server.accept(BACKEND_CAPS)
            elif isinstance(event, StartTls):
                break  # the handshake happens when the client reaches it, below
        if data := server.data_to_send():
            client.receive_data(data)
        while (event := client.next_event()) is not None:
            client_events.append(event)
            if isinstance(event, StartTls):
                server.tls_started()
                client.tls_started()
        if any(isinstance(event, LoggedIn | LoginRefused) for event in client_events):
            return client_events, server_events
    raise AssertionError("the pair never finished")


@pytest.mark.parametrize(
    ("user", "password", "authzid"),
    [("alice@example.com", "secret", ""), ('a"b\\c', "p w {3}", ""), ("j\u00fcrg", "\u00e4\u00f6\u00fc", "admin")],
)
@pytest.mark.parametrize("starttls", [False, True])
def test_client_logs_in_at_server(user, password, authzid, starttls):
    client = ImapClient(user, password, authzid, starttls=starttls, forward=FORWARD)
    server = ImapServer(tls_available=True, require_tls=starttls)
    client_events, server_events = pair_login(client, server)
    assert client_events == ([StartTls(), LoggedIn()] if starttls else [LoggedIn()])
    credentials = [event for event in server_events if isinstance(event, Credentials)]
    assert credentials == [Credentials(user, password, "PLAIN", authzid)]
    assert client.capabilities == tuple(BACKEND_CAPS)
    assert server.client_id == FORWARD


credential_text = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\0\r\n"), min_size=1, max_size=40
)


@given(user=credential_text, password=credential_text)
@settings(max_examples=300, derandomize=True, deadline=None)
def test_any_credentials_survive_the_pair(user, password):
    client = ImapClient(user, password, starttls=False)
    server = ImapServer(require_tls=False)
    client_events, server_events = pair_login(client, server)
    assert client_events == [LoggedIn()]
    assert server_events == [Credentials(user, password, "PLAIN")]


# --- secrets ------------------------------------------------------------------------------------

SECRET = "hunter2-SECRET"
SECRET_B64 = b64encode(b"\0alice\0" + SECRET.encode())
SECRET_INPUTS = [
    b"a LOGIN alice " + SECRET.encode() + b"\r\n",
    b'a LOGIN alice "' + SECRET.encode() + b'"\r\n',
    b"a LOGIN alice {14}\r\n" + SECRET.encode() + b"\r\n",
    b"a LOGIN alice " + SECRET.encode() + b" extra\r\n",
    b'a LOGIN alice "' + SECRET.encode() + b'\0"\r\n',
    b"a LOGIN alice " + SECRET.encode() + b" {99999999+}\r\n",
    b"a AUTHENTICATE PLAIN " + SECRET_B64 + b"\r\n",
    b"a AUTHENTICATE PLAIN " + SECRET_B64[:-1] + b"!\r\n",
    b"a AUTHENTICATE PLAIN\r\n" + SECRET_B64 + b"\r\n",
    b"a AUTHENTICATE LOGIN YWxpY2U=\r\n" + b64encode(SECRET.encode()) + b"\r\n",
    b"a AUTHENTICATE PLAIN " + b64encode(b"\0alice\0" + SECRET.encode() + b"\0x") + b"\r\n",
    b"a LOGIN alice " + SECRET.encode() + b"x" * MAX_LINE,
]


@pytest.mark.parametrize("data", SECRET_INPUTS)
def test_password_never_in_events_or_errors(data):
    texts = []
    for chunk in (None, 1):
        server = ImapServer(require_tls=False)
        try:
            for piece in pieces(data, chunk):
                server.receive_data(piece)
                while (event := server.next_event()) is not None:
                    texts.append(repr(event))
                    texts.append(repr(server))
                    if isinstance(event, Credentials):
                        server.reject()
        except ProtocolError as error:
            texts += [str(error), repr(error)]
        texts.append(repr(server))
    assert texts and not any(SECRET in text or SECRET_B64.decode() in text for text in texts)


def test_password_never_in_client_repr_or_refusals():
    client = ImapClient("alice", SECRET, forward=FORWARD)
    client.receive_data(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n")
    assert client.next_event() is None
    texts = [repr(client)]
    client.receive_data(b"+ \r\nM1 NO [AUTHENTICATIONFAILED] no\r\n")
    texts += [repr(client.next_event()), repr(client)]
    assert not any(SECRET in text or SECRET_B64.decode()[8:] in text for text in texts)


# --- fuzz ---------------------------------------------------------------------------------------

#: Fragments that steer random input towards the parser's corners.
FRAGMENTS = [
    b"a1 ",
    b"LOGIN ",
    b"AUTHENTICATE PLAIN",
    b"AUTHENTICATE LOGIN ",
    b"ID (",
    b"STARTTLS",
    b"NOOP",
    b"CAPABILITY",
    b"LOGOUT",
    b"NIL",
    b")",
    b'"',
    b"\\",
    b"\0",
    b"\r\n",
    b"\n",
    b" ",
    b"*\r\n",
    b"{5}\r\n",
    b"{3+}\r\n",
    b"{4294967295}\r\n",
    b"{99999999999+}\r\n",
    B64_PLAIN,
    b"=",
    b"\xff\xfe",
    b"x" * 700,
]
fragments = st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=40), max_size=30).map(b"".join)
chunked = st.tuples(fragments, st.sampled_from([None, 1, 2, 7, 64]))


def fuzz_server(data: bytes, chunk: int | None, options: dict, answer: int) -> None:
    server = ImapServer(**options)
    out = bytearray(server.data_to_send())
    done = False  # logged in: what follows is trailing data, the driver's to bound
    try:
        for piece in pieces(data, chunk):
            server.receive_data(piece)
            while (event := server.next_event()) is not None:
                out += server.data_to_send()
                if isinstance(event, Closed):
                    return
                if isinstance(event, StartTls):
                    server.tls_started()
                if isinstance(event, Credentials):
                    [server.reject, server.unavailable, lambda: server.accept(["IMAP4rev1"])][answer]()
                    done = answer == 2
            out += server.data_to_send()
            assert done or server.buffered <= max(MAX_LINE + 1, MAX_LITERAL)
    except ProtocolError as error:
        assert error.close and error.reply and well_formed(error.reply)
        assert "\n" not in str(error)
    finally:
        out += server.data_to_send()
        assert well_formed(bytes(out)), bytes(out)


OPTIONS = st.sampled_from(
    [
        {"require_tls": False},
        {"tls_available": True},
        {"tls_active": True},
        {"tls_available": True, "require_tls": False},
    ]
)


@given(chunked, OPTIONS, st.integers(0, 2))
@settings(max_examples=4000, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_server_steered(case, options, answer):
    fuzz_server(*case, options, answer)


@given(st.binary(max_size=400), st.sampled_from([None, 1, 13]), OPTIONS)
@settings(max_examples=3000, derandomize=True, deadline=None)
def test_fuzz_server_random_bytes(data, chunk, options):
    fuzz_server(data, chunk, options, 0)


BACKEND_FRAGMENTS = [
    b"* OK ",
    b"[CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR ID STARTTLS LITERAL+] ",
    b"* CAPABILITY IMAP4rev1 ",
    b"* BYE ",
    b"* PREAUTH ",
    b"* ID (",
    b"{3}\r\nabc",
    b"{99999}\r\n",
    b"+ \r\n",
    b"M1 OK ",
    b"M2 NO ",
    b"M3 BAD ",
    b"M2 OK [CAPABILITY IMAP4rev1] ",
    b"\r\n",
    b"\0",
    b"]",
    b"x" * 900,
]
backend_bytes = st.lists(st.sampled_from(BACKEND_FRAGMENTS) | st.binary(max_size=30), max_size=25).map(b"".join)


@given(backend_bytes, st.sampled_from([None, 1, 7]), st.booleans())
@settings(max_examples=3000, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_client(data, chunk, starttls):
    client = ImapClient("alice", SECRET, starttls=starttls, forward=FORWARD)
    done = False
    try:
        for piece in pieces(data, chunk):
            client.receive_data(piece)
            while (event := client.next_event()) is not None:
                assert isinstance(event, StartTls | LoggedIn | LoginRefused)
                assert SECRET not in repr(event)
                if isinstance(event, StartTls):
                    client.tls_started()
                done = isinstance(event, LoggedIn | LoginRefused)
            assert done or client.buffered <= max(MAX_LINE + 1, MAX_LITERAL)
    except ProtocolError as error:
        assert error.close and SECRET not in str(error)


# --- the client against a real Dovecot ----------------------------------------------------------


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory):
    root = tmp_path_factory.mktemp("imap-dovecot")
    with mailkit.dovecot(root / "d", {"alice@d.test": "alice-pw"}, trusted_networks=["127.0.0.0/8"]) as instance:
        yield instance


def login_at(dovecot, client: ImapClient) -> tuple[object, socket.socket]:
    """Drives `client` over a real socket (TLS after StartTls) until its login ends."""
    host, port = dovecot.endpoints()["imap"].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    while True:
        event = client.next_event()
        if data := client.data_to_send():
            sock.sendall(data)
        if event is None:
            client.receive_data(sock.recv(4096))
        elif isinstance(event, StartTls):
            sock = dovecot.client_context().wrap_socket(sock, server_hostname=host)
            client.tls_started()
        else:
            return event, sock


def test_dovecot_login_with_starttls_and_the_client_address(dovecot):
    forward = forwarding_id(("203.0.113.9", 50123), ("192.0.2.1", 143), "meshmail-1")
    client = ImapClient("alice@d.test", "alice-pw", starttls=True, forward=forward)
    event, sock = login_at(dovecot, client)
    with sock:
        assert event == LoggedIn() and client.tls_active
        assert {"IMAP4rev1", "IDLE"} <= set(client.capabilities) and "AUTH=PLAIN" not in client.capabilities
        sock.sendall(client.trailing_data() + b"x1 LOGOUT\r\n")  # the splice starts here
        assert sock.recv(4096).startswith(b"* BYE")
    deadline = time.monotonic() + 10
    while "rip=203.0.113.9" not in dovecot.log_tail():
        assert time.monotonic() < deadline, dovecot.log_tail()
        time.sleep(0.05)


@pytest.mark.parametrize("starttls", [False, True])
def test_dovecot_refusal_is_passed_on(dovecot, starttls):
    event, sock = login_at(dovecot, ImapClient("alice@d.test", "wrong", starttls=starttls))
    sock.close()
    assert event == LoginRefused("[AUTHENTICATIONFAILED] Authentication failed.", False)
