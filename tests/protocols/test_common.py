"""protocols.common: the bounded line reader and SASL PLAIN, whole, byte by byte, and fuzzed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshmail.protocols.common import (
    LOGIN_PASSWORD_CHALLENGE,
    LOGIN_USER_CHALLENGE,
    MAX_CREDENTIAL,
    Credentials,
    LineReader,
    LineTooLong,
    SaslCancelled,
    SaslError,
    SaslExchange,
    b64decode,
    b64encode,
    sasl_plain,
    sasl_plain_response,
)


def lines_of(reader: LineReader) -> list[bytes]:
    found = []
    while (line := reader.next_line()) is not None:
        found.append(line)
    return found


@pytest.mark.parametrize("chunk", [None, 1, 2, 7])
def test_lines_whole_and_in_pieces(chunk):
    data = b"a1 NOOP\r\nbare lf\n\r\n" + b"x" * 10 + b"\r\npartial"
    reader, found = LineReader(limit=10), []
    pieces = [data] if chunk is None else [data[i : i + chunk] for i in range(0, len(data), chunk)]
    for piece in pieces:
        reader.feed(piece)
        found += lines_of(reader)
    assert found == [b"a1 NOOP", b"bare lf", b"", b"x" * 10]
    assert reader.rest() == b"partial" and reader.pending == 0


def test_a_line_past_the_limit_is_refused_before_it_ends():
    reader = LineReader(limit=10)
    reader.feed(b"x" * 10 + b"\r")
    assert reader.next_line() is None  # a CR at the limit may be followed by its LF
    reader.feed(b"y")
    with pytest.raises(LineTooLong) as info:
        reader.next_line()
    assert info.value.close


def test_take_reads_exact_raw_bytes():
    reader = LineReader(limit=100)
    reader.feed(b"abc")
    assert reader.take(4) is None
    reader.feed(b"d\r\nnext\r\n")
    assert reader.take(4) == b"abcd"
    assert lines_of(reader) == [b"", b"next"]


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=64))
def test_never_holds_more_than_its_limit(data, limit):
    reader = LineReader(limit=limit)
    try:
        for byte in data:
            reader.feed(bytes([byte]))
            for line in lines_of(reader):
                assert len(line) <= limit
            assert reader.pending <= limit + 1
    except LineTooLong:
        pass


class CountingBuffer(bytearray):
    """A reader's buffer that counts the bytes its line-end searches look at."""

    searched = 0

    def find(self, sub, start=0, end=None):
        stop = len(self) if end is None else min(end, len(self))
        self.searched += max(0, stop - start)
        return super().find(sub, start, end)


def test_a_line_sent_byte_by_byte_is_searched_once():
    limit = 10_000
    buffer = CountingBuffer()
    reader = LineReader(limit, buffer)
    for byte in b"x" * limit + b"\r":
        reader.feed(bytes([byte]))
        assert reader.next_line() is None
    reader.feed(b"\nnext\r\n")
    assert lines_of(reader) == [b"x" * limit, b"next"]
    # every byte is looked at about once, not once per byte received after it (~limit**2 / 2)
    assert limit < buffer.searched <= 2 * limit


def test_take_keeps_what_was_searched_in_step():
    reader = LineReader(limit=100)
    reader.feed(b"abcdef")
    assert reader.next_line() is None
    assert reader.take(4) == b"abcd"
    reader.feed(b"\r\n")
    assert reader.next_line() == b"ef"


@pytest.mark.parametrize("chunk", [1, 5, 10_000])
def test_the_cap_holds_on_the_buffer_however_the_bytes_arrive(chunk):
    reader = LineReader(limit=10)
    data = b"a1\r\n" * 100 + b"x" * 5000
    for i in range(0, len(data), chunk):
        reader.feed(data[i : i + chunk])
        assert reader.pending <= 4 * 100 + 11  # whole lines, then at most limit + 1 bytes
    assert lines_of_until_refused(reader) == [b"a1"] * 100
    reader.feed(b"\r\n")  # a line end after the cut does not make the line whole
    with pytest.raises(LineTooLong):
        reader.next_line()


def lines_of_until_refused(reader: LineReader) -> list[bytes]:
    found = []
    with pytest.raises(LineTooLong) as info:
        while (line := reader.next_line()) is not None:
            found.append(line)
    assert info.value.close
    return found


def test_a_literal_may_follow_a_line_and_is_cut_past_its_cap():
    reader = LineReader(limit=10, literal=20)
    reader.feed(b"a {20}\r\n" + b"L" * 20 + b" rest")  # 25 bytes after the line end
    assert reader.next_line() == b"a {20}"
    assert reader.take(20) == b"L" * 20
    reader.feed(b"\r\n")
    assert reader.next_line() == b" rest"
    reader.feed(b"b {20}\r\n" + b"L" * 20 + b"y" * 12)  # 32 bytes: past 10 + 1 + 20
    assert reader.next_line() == b"b {20}"
    assert reader.take(20) == b"L" * 20
    with pytest.raises(LineTooLong):
        reader.next_line()
    reader = LineReader(limit=10, literal=20)
    reader.feed(b"L" * 40)
    with pytest.raises(LineTooLong):
        reader.take(40)
    with pytest.raises(LineTooLong):
        reader.rest()  # what follows a cut is no stream to hand on


def test_sasl_plain_round_trip():
    response = b64decode(sasl_plain_response("user@example.com", "pässword", "admin"))
    creds = sasl_plain(response)
    assert (creds.user, creds.password, creds.authzid) == ("user@example.com", "pässword", "admin")
    assert creds.mechanism == "PLAIN"
    assert "pässword" not in repr(creds)


@pytest.mark.parametrize(
    ("response", "why"),
    [
        (b"user\0password", "authzid NUL user NUL password"),
        (b"\0\0password", "empty user"),
        (b"\0user\0", "empty user or password"),
        (b"\0us\ner\0pw", "user holds NUL, CR or LF"),
        (b"\0user\0\xff\xfe", "password is not UTF-8"),
        (b"\0" + b"u" * (MAX_CREDENTIAL + 1) + b"\0pw", "user longer than"),
        (b"a\0b\0c\0d", "authzid NUL user NUL password"),
    ],
)
def test_sasl_plain_refusals(response, why):
    with pytest.raises(SaslError, match=why):
        sasl_plain(response)


@pytest.mark.parametrize("text", [b"!!!!", b"dXNlcg", b"dXNl cg==", b"A" * 10_000])
def test_b64decode_is_strict_and_bounded(text):
    with pytest.raises(SaslError):
        b64decode(text)


@given(st.binary(max_size=200))
def test_sasl_plain_raises_only_sasl_error(data):
    try:
        creds = sasl_plain(data)
    except SaslError as exc:
        assert "\n" not in str(exc)
    else:
        assert creds.user and creds.password


def test_sasl_exchange_plain_with_and_without_initial_response():
    response = sasl_plain_response("user", "pw")
    assert SaslExchange("PLAIN").start(response) == Credentials("user", "pw", "PLAIN")
    exchange = SaslExchange("PLAIN")
    assert exchange.start(None) == b""
    assert exchange.respond(response) == Credentials("user", "pw", "PLAIN")


def test_sasl_exchange_login_two_steps_with_and_without_initial_response():
    exchange = SaslExchange("LOGIN")
    assert exchange.start(None) == LOGIN_USER_CHALLENGE
    assert exchange.respond(b64encode(b"user")) == LOGIN_PASSWORD_CHALLENGE
    assert exchange.respond(b64encode(b"pw")) == Credentials("user", "pw", "LOGIN")
    exchange = SaslExchange("LOGIN")
    assert exchange.start(b64encode(b"user")) == LOGIN_PASSWORD_CHALLENGE
    assert exchange.respond(b64encode(b"pw")) == Credentials("user", "pw", "LOGIN")
    assert "pw" not in repr(exchange) and "user" not in repr(exchange)


@pytest.mark.parametrize(
    ("mechanism", "initial", "lines", "error"),
    [
        ("PLAIN", None, [b"*"], SaslCancelled),
        ("LOGIN", None, [b64encode(b"user"), b"*"], SaslCancelled),
        ("PLAIN", b"=", [], SaslError),  # an empty PLAIN response holds no user
        ("LOGIN", b"=", [], SaslError),
        ("LOGIN", None, [b""], SaslError),
        ("LOGIN", None, [b64encode(b"user"), b64encode(b"p\0w")], SaslError),
        ("PLAIN", b"not base64!", [], SaslError),
    ],
)
def test_sasl_exchange_refusals(mechanism, initial, lines, error):
    exchange = SaslExchange(mechanism)
    with pytest.raises(error):
        exchange.start(initial)
        for line in lines:
            exchange.respond(line)


def test_sasl_exchange_knows_only_plain_and_login():
    with pytest.raises(ValueError):
        SaslExchange("CRAM-MD5")
