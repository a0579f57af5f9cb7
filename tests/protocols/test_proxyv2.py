"""protocols.proxyv2: headers built and parsed whole, byte by byte and with trailing data; bad
headers refused as soon as their first wrong byte arrives; fuzzed."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshmail.protocols.common import ProtocolError
from meshmail.protocols.proxyv2 import (
    HEADER_SIZE,
    MAX_BODY,
    SIGNATURE,
    ProxyHeader,
    build,
    build_local,
    parse,
)

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address

#: The header of HAProxy's specification for 192.0.2.7:40000 -> 127.0.0.1:143, as Dovecot reads it.
KNOWN_V4 = SIGNATURE + b"\x21\x11\x00\x0c" + bytes([192, 0, 2, 7, 127, 0, 0, 1]) + b"\x9c\x40\x00\x8f"


def test_build_matches_the_specification():
    assert build(("192.0.2.7", 40000), ("127.0.0.1", 143)) == KNOWN_V4
    assert build_local() == SIGNATURE + b"\x20\x00\x00\x00"


@pytest.mark.parametrize(
    ("source", "destination", "expected"),
    [
        (("192.0.2.7", 40000), ("127.0.0.1", 143), ((V4("192.0.2.7"), 40000), (V4("127.0.0.1"), 143))),
        (("2001:db8::7", 1), ("::1", 65535), ((V6("2001:db8::7"), 1), (V6("::1"), 65535))),
        # mixed families: the IPv4 side goes IPv4-mapped, as HAProxy sends it
        (("2001:db8::7", 5), ("127.0.0.1", 110), ((V6("2001:db8::7"), 5), (V6("::ffff:127.0.0.1"), 110))),
    ],
)
@pytest.mark.parametrize("chunk", [None, 1])
def test_round_trip_whole_byte_by_byte_and_with_trailing_data(source, destination, expected, chunk):
    header = build(source, destination)
    if chunk:
        for end in range(len(header)):
            assert parse(header[:end]) is None
    parsed, size = parse(header + b"+OK trailing\r\n")
    assert size == len(header)
    assert (parsed.source, parsed.destination, parsed.local, parsed.tlvs) == (*expected, False, ())


def test_local_and_tlvs():
    assert parse(build_local()) == (ProxyHeader(None, None), HEADER_SIZE)
    # LOCAL ignores whatever address block it carries
    local_v4 = SIGNATURE + b"\x20\x11\x00\x0c" + bytes(12)
    assert parse(local_v4)[0].local
    tlvs = b"\x04\x00\x03abc" + b"\x01\x00\x00"
    with_tlvs = SIGNATURE + b"\x21\x11" + (12 + len(tlvs)).to_bytes(2, "big") + KNOWN_V4[HEADER_SIZE:] + tlvs
    assert parse(with_tlvs)[0].tlvs == ((4, b"abc"), (1, b""))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"PROXY TCP4 1.2.3.4", "bad signature"),  # the text v1 header
        (b"\r\n\r\n\x00\r\nQUIX", "bad signature"),
        (SIGNATURE + b"\x11", "version 1"),
        (SIGNATURE + b"\x22", "unknown command 2"),
        (SIGNATURE + b"\x21\x12", "unsupported family/protocol 0x12"),  # UDP
        (SIGNATURE + b"\x21\x31", "unsupported family/protocol 0x31"),  # unix socket
        (SIGNATURE + b"\x21\x00", "unsupported family/protocol 0x00"),
        (SIGNATURE + b"\x20\x41", "unknown family/protocol 0x41"),
        (SIGNATURE + b"\x21\x11" + (MAX_BODY + 1).to_bytes(2, "big"), "exceeds"),
        (SIGNATURE + b"\x21\x11\x00\x0b", "too short"),
        (SIGNATURE + b"\x21\x21\x00\x0c", "too short"),
        (SIGNATURE + b"\x21\x11\x00\x0e" + bytes(12) + b"\x01\x00", "truncated TLV"),
        (SIGNATURE + b"\x21\x11\x00\x0f" + bytes(12) + b"\x01\x00\x01", "TLV longer"),
    ],
)
def test_bad_headers_are_refused_early(data, why):
    with pytest.raises(ProtocolError, match=why) as info:
        parse(data)
    assert info.value.close and info.value.reply == b""
    # refused with only the bytes up to the first wrong one
    if why == "bad signature":
        first_bad = next(i for i, byte in enumerate(data) if i >= len(SIGNATURE) or byte != SIGNATURE[i])
        with pytest.raises(ProtocolError):
            parse(data[: first_bad + 1])


@pytest.mark.parametrize(
    ("source", "destination"),
    [(("192.0.2.1", 70000), ("127.0.0.1", 1)), (("192.0.2.1", -1), ("127.0.0.1", 1)), (("nohost", 1), ("::1", 1))],
)
def test_build_refuses_bad_endpoints(source, destination):
    with pytest.raises(ValueError):
        build(source, destination)


valid_headers = st.one_of(
    st.builds(
        lambda a, p, b, q: build((V4(a), p), (V4(b), q)), *[st.integers(0, 2**32 - 1), st.integers(0, 65535)] * 2
    ),
    st.builds(
        lambda a, p, b, q: build((V6(a), p), (V6(b), q)), *[st.integers(0, 2**128 - 1), st.integers(0, 65535)] * 2
    ),
    st.just(build_local()),
)


@st.composite
def mangled(draw):
    """A valid header with bytes changed, cut or added, or plain noise after a signature."""
    header = bytearray(draw(valid_headers))
    for _ in range(draw(st.integers(0, 3))):
        header[draw(st.integers(0, len(header) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(header)))
    return draw(st.sampled_from([bytes(header), bytes(header[:cut]), SIGNATURE])) + draw(st.binary(max_size=64))


@settings(max_examples=6000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mangled(), st.binary(max_size=64), st.binary(max_size=2000).map(lambda b: SIGNATURE + b)))
def test_fuzz_parse_raises_only_protocol_error(data):
    try:
        result = parse(data)
    except ProtocolError as exc:
        assert exc.close and "\n" not in str(exc)
        return
    if result is not None:
        header, size = result
        assert HEADER_SIZE <= size <= min(len(data), HEADER_SIZE + MAX_BODY)
        if not header.local:
            assert build((header.source[0], header.source[1]), header.destination) == data[:size] or header.tlvs


@settings(max_examples=4000, deadline=None)
@given(valid_headers, st.binary(max_size=32))
def test_fuzz_every_prefix_of_a_valid_header_needs_more_data(header, trailing):
    assert all(parse(header[:end]) is None for end in range(0, len(header), 3))
    assert parse(header + trailing)[1] == len(header)
