"""protocols.common: the bounded line reader and SASL PLAIN, whole, byte by byte, and fuzzed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshmail.protocols.common import (
    MAX_CREDENTIAL,
    LineReader,
    LineTooLong,
    SaslError,
    b64decode,
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
