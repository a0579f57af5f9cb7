"""Admin passwords, stored as scrypt hashes in the replicated state.

The format is ``$scrypt$ln=15,r=8,p=1$<salt>$<hash>`` (base64 without padding), so the cost
can rise later without breaking old hashes. verify() bounds the cost it accepts: a hash
comes from the replicated state, and a forged one must not make a login take minutes.
Hashing takes about 100 ms and 32 MiB on purpose; callers run it in a worker thread.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os

from ..core.errors import MeshmailError

#: scrypt cost for new hashes: N = 2**LOG_N, r, p (RFC 7914; 32 MiB of memory).
LOG_N, R, P = 15, 8, 1
SALT_SIZE = 16
HASH_SIZE = 32
#: Longest password accepted (longer ones are refused, not truncated).
MAX_PASSWORD = 1024
#: Bounds on the parameters of a stored hash, and on the memory one check may take.
MAX_LOG_N, MAX_R, MAX_P = 20, 32, 4
MAX_MEMORY = 64 * 1024 * 1024


class PasswordError(MeshmailError, ValueError):
    """A password that cannot be set (empty, too long); str() says why."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(password: str, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    n = 1 << log_n
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + (1 << 20), dklen=HASH_SIZE)


def check_password(password: str) -> None:
    """Raise PasswordError unless `password` can be an admin password."""
    if not isinstance(password, str) or not password:
        raise PasswordError("the password is empty")
    try:
        password.encode()
    except UnicodeEncodeError:
        raise PasswordError("the password is not valid Unicode text") from None
    if len(password) > MAX_PASSWORD:
        raise PasswordError(f"the password is longer than {MAX_PASSWORD} characters")
    if len(password) < 8:
        raise PasswordError("the password is shorter than 8 characters")


def hash_password(password: str, *, log_n: int = LOG_N) -> str:
    """The stored form of a new password; raises PasswordError for one that cannot be used."""
    check_password(password)
    salt = os.urandom(SALT_SIZE)
    return f"$scrypt$ln={log_n},r={R},p={P}${_b64(salt)}${_b64(_scrypt(password, salt, log_n, R, P))}"


def verify_password(stored: str, password: str) -> bool:
    """Whether `password` matches the stored hash. False (never an exception) for a hash that
    is malformed or too costly, and for a password that is not a str or is too long."""
    if not isinstance(password, str) or len(password) > MAX_PASSWORD or not isinstance(stored, str):
        return False
    try:
        _, scheme, params, salt, digest = stored.split("$")
        fields = dict(item.split("=", 1) for item in params.split(","))
        log_n, r, p = int(fields["ln"]), int(fields["r"]), int(fields["p"])
        if scheme != "scrypt" or not (1 <= log_n <= MAX_LOG_N and 1 <= r <= MAX_R and 1 <= p <= MAX_P):
            return False
        if 128 * r * (1 << log_n) > MAX_MEMORY:
            return False
        expected = _unb64(digest)
        salt_bytes = _unb64(salt)
    except (ValueError, KeyError):
        return False
    if len(expected) != HASH_SIZE or not salt_bytes:
        return False
    try:
        computed = _scrypt(password, salt_bytes, log_n, r, p)
    except (ValueError, UnicodeEncodeError):  # parameters OpenSSL refuses; a lone surrogate
        return False
    return hmac.compare_digest(computed, expected)


@functools.cache
def dummy_hash() -> str:
    """Checked instead when an account does not exist, so the answer takes as long either way."""
    return hash_password("not-a-password-of-anyone")
