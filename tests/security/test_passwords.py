"""Admin password hashes: round trips at a small cost, malformed and over-costly stored hashes
answered False without an exception, and the rules of check_password."""

from __future__ import annotations

import base64
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshmail.security import passwords as p
from meshmail.security.passwords import (
    PasswordError,
    check_password,
    hash_password,
    verify_password,
)

#: Cost for the tests: N = 16, about 50 µs a hash.
FAST = 4
PASSWORD = "correct horse battery"
STORED = hash_password(PASSWORD, log_n=FAST)


def with_params(params: str, stored: str = STORED) -> str:
    """The stored hash with its parameter field replaced."""
    _, scheme, _, salt, digest = stored.split("$")
    return f"${scheme}${params}${salt}${digest}"


@settings(max_examples=30, deadline=None)
@given(st.text(min_size=8, max_size=60))
def test_round_trip(password):
    stored = hash_password(password, log_n=FAST)
    assert verify_password(stored, password) is True
    assert verify_password(stored, password + "x") is False


def test_stored_form():
    _, scheme, params, salt, digest = STORED.split("$")
    assert scheme == "scrypt"
    assert params == f"ln={FAST},r={p.R},p={p.P}"
    assert len(base64.b64decode(salt + "==")) == p.SALT_SIZE
    assert len(base64.b64decode(digest + "==")) == p.HASH_SIZE
    assert "=" not in salt + digest
    assert PASSWORD not in STORED


def test_salted_so_equal_passwords_hash_differently():
    assert hash_password(PASSWORD, log_n=FAST) != hash_password(PASSWORD, log_n=FAST)


def test_default_cost_is_the_documented_one():
    assert f"ln={p.LOG_N}," in p.dummy_hash()
    assert verify_password(p.dummy_hash(), "not-a-password-of-anyone")


@pytest.mark.parametrize(
    "password", ["", "correct horse batter", "Correct horse battery", "correct horse battery ", PASSWORD * 2, None, 7]
)
def test_wrong_password(password):
    assert verify_password(STORED, password) is False


def test_unicode_password_round_trip():
    stored = hash_password("pässwörd-密码-🔑", log_n=FAST)
    assert verify_password(stored, "pässwörd-密码-🔑")
    # Normalization is not applied: a decomposed "ä" is another password.
    assert not verify_password(stored, "pa\u0308sswörd-密码-🔑")


def test_password_with_lone_surrogate_is_false_not_an_exception():
    """A JSON login body may hold "\\ud800", which json.loads turns into a lone surrogate."""
    assert verify_password(STORED, "\ud800" * 8) is False


def test_lone_surrogate_password_refused_by_check():
    with pytest.raises(PasswordError):
        hash_password("\ud800" * 8, log_n=FAST)


MALFORMED = [
    "",
    "$",
    "$$$$",
    "$$$$$",
    "plain text",
    STORED[1:],
    STORED + "$",
    STORED.replace("$scrypt$", "$bcrypt$"),
    STORED.replace("$scrypt$", "$SCRYPT$"),
    with_params("ln=4,r=8"),
    with_params("ln=4,r=8,p=1,x"),
    with_params("ln=4;r=8;p=1"),
    with_params("ln=,r=8,p=1"),
    with_params("ln=four,r=8,p=1"),
    with_params("ln=4.0,r=8,p=1"),
    with_params("ln=0,r=8,p=1"),
    with_params("ln=-4,r=8,p=1"),
    with_params("ln=4,r=0,p=1"),
    with_params("ln=4,r=8,p=0"),
    with_params("ln=4,r=33,p=1"),
    with_params("ln=4,r=8,p=5"),
    with_params("ln=21,r=8,p=1"),
    with_params("ln=" + "9" * 5000 + ",r=8,p=1"),
    with_params(""),
    "$scrypt$ln=4,r=8,p=1$$" + STORED.split("$")[4],
    "$scrypt$ln=4,r=8,p=1$" + STORED.split("$")[3] + "$",
    "$scrypt$ln=4,r=8,p=1$" + STORED.split("$")[3] + "$" + STORED.split("$")[4][:-4],
    "$scrypt$ln=4,r=8,p=1$" + STORED.split("$")[3] + "$" + STORED.split("$")[4] + "AAAA",
    "$scrypt$ln=4,r=8,p=1$!!!!$" + STORED.split("$")[4],
    "$scrypt$ln=4,r=8,p=1$" + STORED.split("$")[3] + "$é" + STORED.split("$")[4][1:],
    "$scrypt$ln=4,r=8,p=1$" + STORED.split("$")[3] + "$" + "-" + STORED.split("$")[4][1:],
    None,
    b"$scrypt$",
    42,
]


@pytest.mark.parametrize("stored", MALFORMED, ids=lambda s: repr(s)[:60])
def test_malformed_stored_hash_is_false(stored):
    assert verify_password(stored, PASSWORD) is False


def test_costly_hash_refused_fast():
    """A forged hash with ln=30 (16 GiB, hours) is refused without being computed."""
    started = time.monotonic()
    assert verify_password(with_params("ln=30,r=8,p=1"), PASSWORD) is False
    assert verify_password(with_params("ln=4,r=1000,p=1"), PASSWORD) is False
    assert verify_password(with_params("ln=4,r=8,p=1000"), PASSWORD) is False
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("params", ["ln=20,r=8,p=1", "ln=19,r=32,p=4", "ln=20,r=1,p=1", "ln=17,r=1,p=1"])
def test_in_bounds_params_scrypt_cannot_run_are_false(params):
    """Parameters inside MAX_LOG_N/MAX_R/MAX_P that hashlib.scrypt refuses (maxmem above
    INT_MAX, or N >= 2**(16 r)) must give False like any other unusable hash, not raise."""
    assert verify_password(with_params(params), PASSWORD) is False


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_fuzz_stored_text_never_raises(stored):
    assert verify_password(stored, PASSWORD) is False


@settings(max_examples=300)
@given(
    st.builds(
        lambda scheme, params, salt, digest: f"${scheme}${params}${salt}${digest}",
        st.sampled_from(["scrypt", "x", ""]),
        st.lists(
            st.builds(
                "{}={}".format, st.sampled_from(["ln", "r", "p", "x"]), st.sampled_from(["1", "2", "4", "0", "-1", "a"])
            ),
            max_size=4,
        ).map(",".join),
        st.binary(max_size=20).map(lambda b: base64.b64encode(b).decode().rstrip("=")),
        st.one_of(st.text(max_size=50), st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode())),
    )
)
def test_fuzz_structured_stored_hash_never_raises(stored):
    assert verify_password(stored, PASSWORD) is False


def test_long_password_refused():
    longest = "x" * p.MAX_PASSWORD
    stored = hash_password(longest, log_n=FAST)
    assert verify_password(stored, longest)
    with pytest.raises(PasswordError, match=str(p.MAX_PASSWORD)):
        hash_password(longest + "x", log_n=FAST)
    started = time.monotonic()
    assert verify_password(stored, longest + "x") is False
    assert verify_password(STORED, "x" * 10_000_000) is False
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize(
    "password, words",
    [
        ("", "empty"),
        (None, "empty"),
        (b"bytes-password", "empty"),
        ("a", "shorter than 8"),
        ("1234567", "shorter than 8"),
        ("x" * (p.MAX_PASSWORD + 1), "longer than"),
    ],
    ids=repr,
)
def test_check_password_errors(password, words):
    with pytest.raises(PasswordError, match=words) as info:
        check_password(password)
    assert "\n" not in str(info.value)
    if isinstance(password, str) and len(password) >= 7:
        assert password not in str(info.value)


@pytest.mark.parametrize("password", ["12345678", "x" * p.MAX_PASSWORD, "        ", "密码密码密码密码"])
def test_check_password_accepts(password):
    check_password(password)
