"""core.address: the one host:port parser, its formatting, and its refusals."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshmail.core.address import Address, AddressError, format_address, is_host


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:7946", ("127.0.0.1", 7946)),
        ("[::1]:7946", ("::1", 7946)),
        ("[2001:db8::7]:65535", ("2001:db8::7", 65535)),
        ("mx.example.com:25", ("mx.example.com", 25)),
        ("imap.example:143", ("imap.example", 143)),
        ("10.0.0.1:1", ("10.0.0.1", 1)),
        ("localhost:8443", ("localhost", 8443)),
    ],
)
def test_parse_and_format_round_trip(text, address):
    parsed = Address.parse(text)
    assert parsed == address and (parsed.host, parsed.port) == address
    assert str(parsed) == format_address(address) == text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("::1:143", "brackets"),
        ("[10.0.0.1]:143", "brackets"),
        ("[]:143", "brackets"),
        ("[mx.example]:25", "brackets"),
        ("host:0", "port must be 1..65535"),
        ("host:65536", "port must be 1..65535"),
        ("host:-1", "not host:port"),
        ("host:", "not host:port"),
        (":143", "not host:port"),
        ("host", "not host:port"),
        ("127.0.0.1", "not host:port"),
        ("[::1]7946", "brackets"),
        ("h: 1", "not host:port"),
        ("host:１４３", "not host:port"),
        ("h:٣", "not host:port"),
        ("mail node:25", "not an IP address or a DNS name"),
        ("-bad.example:25", "not an IP address or a DNS name"),
        ("a" * 301 + ":1", "longer than 300"),
    ],
)
def test_refusals_say_why(text, why):
    with pytest.raises(AddressError, match=why):
        Address.parse(text)


def test_port_zero_only_for_binding():
    assert Address.parse("127.0.0.1:0", port_zero=True) == ("127.0.0.1", 0)
    with pytest.raises(AddressError, match="1..65535"):
        Address.parse("127.0.0.1:0")


def test_ip_only():
    assert Address.parse("[::]:1", ip=True).unspecified
    assert not Address.parse("127.0.0.1:1", ip=True).unspecified
    with pytest.raises(AddressError, match="not an IP address"):
        Address.parse("mx.example:25", ip=True)


@pytest.mark.parametrize("value", [None, 25, b"h:25", ["h:25"]])
def test_non_strings_are_refused(value):
    with pytest.raises(AddressError, match="expected a string"):
        Address.parse(value)


def test_is_host():
    assert is_host("mx.example.com") and is_host("::1") and is_host("10.0.0.1")
    assert not is_host("[::1]") and not is_host("a b") and not is_host("") and not is_host(None)


@given(st.text(max_size=400))
def test_any_text_parses_or_is_refused_with_one_line(text):
    try:
        address = Address.parse(text, port_zero=True)
    except AddressError as exc:
        assert "\n" not in str(exc)
    else:
        assert Address.parse(str(address), port_zero=True) == address
