"""Join and API token text: round trips, and every malformed form refused with a TokenError
whose one-line message never quotes the secret (neither its base64url nor its hex)."""

from __future__ import annotations

import base64
import hashlib
import os
import string

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshmail.security import tokens as t
from meshmail.security.tokens import (
    ApiTokenText,
    JoinTokenText,
    TokenError,
    parse_api_token,
    parse_join_token,
    secret_matches,
)

ID = "0123456789abcdef"
SECRET = bytes(range(100, 132))
FINGERPRINT = hashlib.sha256(b"ca").digest()
MASTERS = ("m1.example.org:7946", "10.0.0.1:7946", "[2001:db8::1]:7946")
B64URL = string.ascii_letters + string.digits + "-_"


def token() -> JoinTokenText:
    return JoinTokenText(ID, SECRET, FINGERPRINT, MASTERS)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def seal(payload: bytes) -> str:
    """A join token around any payload, with a correct checksum: only the content is wrong."""
    return t.JOIN_PREFIX + b64url(payload + hashlib.sha256(payload).digest()[: t.CHECKSUM_SIZE])


def secret_forms(secret: bytes) -> list[str]:
    """The ways a secret could leak into a message."""
    return [b64url(secret), base64.b64encode(secret).decode("ascii").rstrip("="), secret.hex()]


def refused(parse, text, secret: bytes = SECRET) -> TokenError:
    """Parse `text`, expect TokenError, and check its message is one line without the secret."""
    with pytest.raises(TokenError) as info:
        parse(text)
    message = str(info.value)
    assert message and "\n" not in message and "\r" not in message
    for form in secret_forms(secret):
        assert form not in message
    return info.value


# --- join tokens: round trips ----------------------------------------------------------------

hex_ids = st.binary(min_size=t.ID_SIZE, max_size=t.ID_SIZE).map(bytes.hex)
hostnames = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True)
ports = st.integers(1, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(lambda a: f"[{a}]")
addresses = st.builds(lambda host, port: f"{host}:{port}", st.one_of(hostnames, ipv4, ipv6), ports)


@given(
    token_id=hex_ids,
    secret=st.binary(min_size=32, max_size=32),
    fingerprint=st.binary(min_size=32, max_size=32),
    masters=st.lists(addresses, min_size=1, max_size=t.MAX_MASTERS),
)
def test_join_token_round_trip(token_id, secret, fingerprint, masters):
    original = JoinTokenText(token_id, secret, fingerprint, tuple(masters))
    text = original.encode()
    assert text.startswith(t.JOIN_PREFIX)
    assert parse_join_token(text) == original
    # Pasted with surrounding whitespace (a trailing newline from a file or a terminal).
    assert parse_join_token(f"  {text}\n") == original


def test_join_token_with_longest_masters_parses_back():
    """parse accepts 8 masters of 253-character DNS names, so the token encode() makes of them
    must be short enough for parse (MAX_TOKEN)."""
    label = "a" * 63
    host = f"{label}.{label}.{label}.{'b' * 61}"
    assert len(host) == 253
    masters = tuple(f"{host}:{65000 + i}" for i in range(t.MAX_MASTERS))
    assert all(t.check_master_address(m) == m for m in masters)
    text = JoinTokenText(ID, SECRET, FINGERPRINT, masters).encode()
    assert parse_join_token(text).masters == masters


def test_join_token_repr_hides_secret():
    shown = repr(token())
    for form in secret_forms(SECRET):
        assert form not in shown
    assert repr(SECRET) not in shown


# --- join tokens: malformed text ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        None,
        42,
        b"mmjoin1.AAAA",
        "mmjoin2." + token().encode()[len(t.JOIN_PREFIX) :],
        "MMJOIN1." + token().encode()[len(t.JOIN_PREFIX) :],
        token().encode()[len(t.JOIN_PREFIX) :],
        "mmapi1_0123456789abcdef_" + b64url(SECRET),
        "mmjoin1.",
        "mmjoin1.A",
        "mmjoin1.!!!!",
        "mmjoin1.AAAA",
        "mmjoin1.AAAAAAAA",
        "mmjoin1." + "é" * 20,
        t.JOIN_PREFIX + "A" * (t.MAX_TOKEN + 1),
    ],
    ids=repr,
)
def test_join_token_malformed_text(text):
    refused(parse_join_token, text)


def test_join_token_truncated_at_every_length():
    text = token().encode()
    for length in range(len(text)):
        refused(parse_join_token, text[:length])


def test_join_token_one_character_dropped_anywhere():
    text = token().encode()
    for position in range(len(t.JOIN_PREFIX), len(text)):
        refused(parse_join_token, text[:position] + text[position + 1 :])


def test_join_token_flipped_character_at_every_position():
    """Every one-character change is refused, except one that only touches the unused low
    bits of the last base64 character: that text still decodes to the very same token."""
    original = token()
    text = original.encode()
    for position in range(len(text)):
        for replacement in (chr(ord(text[position]) ^ 1), "A" if text[position] != "A" else "B", "!", " ", "é"):
            damaged = text[:position] + replacement + text[position + 1 :]
            if damaged.strip() == text:
                continue  # a space replacing the first or last character is stripped away
            try:
                parsed = parse_join_token(damaged)
            except TokenError as exc:
                assert "\n" not in str(exc)
                assert all(form not in str(exc) for form in secret_forms(SECRET))
                continue
            assert position == len(text) - 1 and replacement in B64URL, (position, replacement)
            assert parsed == original


def test_join_token_too_long_even_when_otherwise_valid():
    text = token().encode()
    padded = text + "A" * (t.MAX_TOKEN - len(text) + 1)
    error = refused(parse_join_token, padded)
    assert str(t.MAX_TOKEN) in str(error)


def test_join_token_checksum_damage_says_so():
    text = token().encode()
    raw = bytearray(base64.urlsafe_b64decode(text[len(t.JOIN_PREFIX) :] + "=" * (-len(text) % 4)))
    raw[-1] ^= 0xFF
    error = refused(parse_join_token, t.JOIN_PREFIX + b64url(bytes(raw)))
    assert "checksum" in str(error)


def _payload(*fields) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


ID_BYTES = bytes.fromhex(ID)
GOOD = (ID_BYTES, SECRET, FINGERPRINT, list(MASTERS))

WRONG_SHAPES = {
    "not an array": msgpack.packb({"id": ID_BYTES, "secret": SECRET}, use_bin_type=True),
    "a string": msgpack.packb("mmjoin", use_bin_type=True),
    "an int": msgpack.packb(7),
    "nil": msgpack.packb(None),
    "empty array": _payload(),
    "three fields": _payload(*GOOD[:3]),
    "five fields": _payload(*GOOD, "extra"),
    "id as str": _payload(ID, SECRET, FINGERPRINT, list(MASTERS)),
    "id too short": _payload(ID_BYTES[:7], SECRET, FINGERPRINT, list(MASTERS)),
    "secret too short": _payload(ID_BYTES, SECRET[:31], FINGERPRINT, list(MASTERS)),
    "secret too long": _payload(ID_BYTES, SECRET + b"x", FINGERPRINT, list(MASTERS)),
    "secret as str": _payload(ID_BYTES, b64url(SECRET), FINGERPRINT, list(MASTERS)),
    "secret as int": _payload(ID_BYTES, 12345, FINGERPRINT, list(MASTERS)),
    "fingerprint too short": _payload(ID_BYTES, SECRET, FINGERPRINT[:16], list(MASTERS)),
    "fingerprint nil": _payload(ID_BYTES, SECRET, None, list(MASTERS)),
    "masters a str": _payload(ID_BYTES, SECRET, FINGERPRINT, "m1:7946"),
    "masters a map": _payload(ID_BYTES, SECRET, FINGERPRINT, {"m1": 7946}),
    "no masters": _payload(ID_BYTES, SECRET, FINGERPRINT, []),
    "nine masters": _payload(ID_BYTES, SECRET, FINGERPRINT, [f"m{i}:7946" for i in range(9)]),
    "master an int": _payload(ID_BYTES, SECRET, FINGERPRINT, [7946]),
    "master bytes": _payload(ID_BYTES, SECRET, FINGERPRINT, [b"m1:7946"]),
    "master nil": _payload(ID_BYTES, SECRET, FINGERPRINT, [None]),
    "master a list": _payload(ID_BYTES, SECRET, FINGERPRINT, [["m1", 7946]]),
    "trailing bytes": _payload(*GOOD) + b"\x00",
    "truncated msgpack": _payload(*GOOD)[:-3],
    "binary too long for limits": _payload(ID_BYTES, SECRET * 3, FINGERPRINT, list(MASTERS)),
    "ext type": _payload(ID_BYTES, msgpack.ExtType(1, SECRET), FINGERPRINT, list(MASTERS)),
    "nested deep": b"\x91" * 3000 + b"\xc0",
}


@pytest.mark.parametrize("payload", WRONG_SHAPES.values(), ids=WRONG_SHAPES.keys())
def test_join_token_valid_checksum_wrong_content(payload):
    refused(parse_join_token, seal(payload))


BAD_MASTERS = [
    "a b:1",
    "host:0",
    "host:70000",
    "host:-1",
    "host:",
    "host",
    ":7946",
    "[zz]:1",
    "[::1]",
    "[1.2.3.4]:1",
    "1.2.3.4",
    "host:7946x",
    "host:٣٣",  # Arabic-Indic digits are digits to str.isdigit, not a port
    "host:²",
    "-host:1",
    "host-:1",
    "ho_st:1",
    "hóst:1",
    "host..example:1",
    "a" * 64 + ":1",
    "x" * 301,
    "host:1\n",
    "",
]


@pytest.mark.parametrize("master", BAD_MASTERS, ids=repr)
def test_join_token_bad_master_address(master):
    refused(parse_join_token, seal(_payload(ID_BYTES, SECRET, FINGERPRINT, ["m1:7946", master])))


@pytest.mark.parametrize(
    "master", ["m1:1", "m1:65535", "M1.Example.ORG:25", "127.0.0.1:7946", "[::1]:7946", "[fe80::1]:1", "a:1"]
)
def test_join_token_good_master_address(master):
    assert parse_join_token(seal(_payload(*GOOD[:3], [master]))).masters == (master,)


def test_join_token_eight_masters_is_the_limit():
    masters = [f"m{i}:7946" for i in range(t.MAX_MASTERS)]
    assert len(parse_join_token(seal(_payload(*GOOD[:3], masters))).masters) == t.MAX_MASTERS


@settings(max_examples=300)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: t.JOIN_PREFIX + b64url(b))))
def test_join_token_fuzz_text(text):
    try:
        parse_join_token(text)
    except TokenError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_join_token_fuzz_payload_with_valid_checksum(payload):
    try:
        parse_join_token(seal(payload))
    except TokenError as exc:
        assert "\n" not in str(exc)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=40) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=10) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150)
@given(st.lists(msgpack_values, min_size=0, max_size=6))
def test_join_token_fuzz_msgpack_fields(fields):
    try:
        parsed = parse_join_token(seal(msgpack.packb(fields, use_bin_type=True)))
    except TokenError as exc:
        assert "\n" not in str(exc)
    else:
        assert len(parsed.secret) == t.SECRET_SIZE and 1 <= len(parsed.masters) <= t.MAX_MASTERS


# --- API tokens --------------------------------------------------------------------------------


@given(st.binary(min_size=8, max_size=8).map(bytes.hex), st.binary(min_size=32, max_size=32))
def test_api_token_round_trip(token_id, secret):
    original = ApiTokenText(token_id, secret)
    text = original.encode()
    assert text.startswith(t.API_PREFIX)
    assert parse_api_token(text) == original
    assert parse_api_token(f"\t{text} \r\n") == original


def test_new_api_token_parses_and_hides_secret():
    token = t.new_api_token()
    assert parse_api_token(token.encode()) == token
    for form in secret_forms(token.secret):
        assert form not in repr(token)


API = ApiTokenText(ID, SECRET).encode()


@pytest.mark.parametrize(
    "text",
    [
        "",
        None,
        7,
        API.encode(),
        API[:-1],
        API + "A",
        API.replace("mmapi1_", "mmapi2_"),
        API.replace("mmapi1_", ""),
        API.replace(ID, ID.upper()),
        API.replace(ID, ID[:-1]),
        API.replace(ID, ID[:-1] + "g"),
        API.replace("_", "-", 2),
        API[:-1] + "=",
        API[:-1] + "+",
        API[:-1] + "é",
        API + "\n" + API,
        " " * 200 + API,
        "mmapi1_" + ID + "_" + b64url(SECRET[:31]),
        "mmjoin1." + b64url(SECRET),
    ],
    ids=repr,
)
def test_api_token_malformed(text):
    refused(parse_api_token, text)


def test_api_token_truncated_at_every_length():
    for length in range(len(API)):
        refused(parse_api_token, API[:length])


def test_api_token_flipped_character():
    """A change anywhere in the id or the prefix is refused or names another token: either way
    the secret never appears in an error."""
    for position in range(len(API)):
        damaged = API[:position] + "!" + API[position + 1 :]
        refused(parse_api_token, damaged)


@settings(max_examples=300)
@given(st.one_of(st.text(max_size=120), st.text(B64URL, max_size=60).map(lambda s: f"{t.API_PREFIX}{ID}_{s}")))
def test_api_token_fuzz(text):
    try:
        parsed = parse_api_token(text)
    except TokenError as exc:
        assert "\n" not in str(exc)
    else:
        assert len(parsed.secret) == t.SECRET_SIZE


# --- hashes ------------------------------------------------------------------------------------


def test_secret_matches():
    stored = t.hash_secret(SECRET)
    assert len(stored) == 64 and stored == hashlib.sha256(SECRET).hexdigest()
    assert secret_matches(stored, SECRET)
    assert not secret_matches(stored, SECRET[:-1] + b"\x00")
    assert not secret_matches(stored.upper(), SECRET)
    assert not secret_matches("", SECRET)
    assert not secret_matches(None, SECRET)
    assert not secret_matches(b"\x00" * 32, SECRET)


@pytest.mark.parametrize("stored", ["é" * 64, "ﬀ" + "0" * 63, "\x00" * 64, "\ud800", "0" * 63 + "\udfff"], ids=repr)
def test_secret_matches_non_ascii_stored_hash_is_false(stored):
    assert secret_matches(stored, SECRET) is False


@given(st.text(max_size=100, alphabet=st.characters(codec=None)))
def test_secret_matches_fuzz_never_raises(stored):
    assert secret_matches(stored, SECRET) is False


def test_new_ids_and_secrets_are_fresh():
    assert len({t.new_id() for _ in range(100)}) == 100
    assert all(len(t.new_id()) == 16 for _ in range(10))
    assert len(t.new_secret()) == t.SECRET_SIZE
    assert t.new_secret() != t.new_secret()
    assert os.urandom  # the module draws from the OS generator
