"""Join tokens and API tokens: their text forms and the hashes the replicated state keeps.

A join token is ``mmjoin1.`` and the base64url of a msgpack array
``[token id, secret, CA fingerprint, [master "host:port", ...]]`` followed by the first four
bytes of its SHA-256, so a mistyped or truncated token is caught before anything is sent.
An API token is ``mmapi1_<16 hex id>_<43 base64url secret>``. Only the SHA-256 of a secret is
stored (the secrets are 32 random bytes, so a slow hash would add nothing). parse_* raise
TokenError with a one-line reason that never quotes the secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re

import attrs
import msgpack

from ..core.address import Address, AddressError
from ..core.errors import MeshmailError

JOIN_PREFIX = "mmjoin1."
API_PREFIX = "mmapi1_"
ID_SIZE = 8
SECRET_SIZE = 32
FINGERPRINT_SIZE = 32
CHECKSUM_SIZE = 4
MAX_MASTERS = 8
#: Longest join token accepted, in characters.
MAX_TOKEN = 4096

_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
_API = re.compile(re.escape(API_PREFIX) + r"([0-9a-f]{16})_([A-Za-z0-9_-]{43})")


class TokenError(MeshmailError, ValueError):
    """A token string that cannot be used; str() is one line without the secret."""


def new_id() -> str:
    return os.urandom(ID_SIZE).hex()


def new_secret() -> bytes:
    return os.urandom(SECRET_SIZE)


def hash_secret(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()


def secret_matches(stored_hash: str, secret: bytes) -> bool:
    """Whether `secret` hashes to `stored_hash`, in constant time."""
    return (
        isinstance(stored_hash, str) and stored_hash.isascii() and hmac.compare_digest(hash_secret(secret), stored_hash)
    )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64url(text: str) -> bytes:
    if not _BASE64URL.fullmatch(text):
        raise TokenError("the token holds characters that are not base64url (was it mistyped?)")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("the token is not valid base64url (was it cut or mistyped?)") from None


#: Longest note on a join or API token, in characters.
MAX_NOTE = 200


def check_note(note: object) -> str:
    """`note` if it is text of at most MAX_NOTE printable characters; raises TokenError."""
    if not isinstance(note, str) or len(note) > MAX_NOTE or not note.isprintable():
        raise TokenError(f"a note is at most {MAX_NOTE} printable characters (no line breaks)")
    return note


def check_master_address(text: object) -> str:
    """A master address of a token: ``host:port`` with an IP literal (IPv6 in brackets) or a DNS name."""
    try:
        Address.parse(text)
    except AddressError:
        shown = repr(text[:80]) if isinstance(text, str) else "a master address"
        raise TokenError(f"{shown} in the token is not host:port") from None
    return text


@attrs.frozen
class JoinTokenText:
    """What a join token carries."""

    token_id: str
    secret: bytes = attrs.field(repr=False)
    ca_fingerprint: bytes
    masters: tuple[str, ...]

    def encode(self) -> str:
        payload = msgpack.packb(
            [bytes.fromhex(self.token_id), self.secret, self.ca_fingerprint, list(self.masters)], use_bin_type=True
        )
        return JOIN_PREFIX + _b64url(payload + hashlib.sha256(payload).digest()[:CHECKSUM_SIZE])


def parse_join_token(text: object) -> JoinTokenText:
    """Read a join token; raises TokenError saying what is wrong with it."""
    if not isinstance(text, str):
        raise TokenError("a join token is text")
    text = text.strip()
    if len(text) > MAX_TOKEN:
        raise TokenError(f"the join token is longer than {MAX_TOKEN} characters")
    if not text.startswith(JOIN_PREFIX):
        raise TokenError(f"not a meshmail join token (it starts with {JOIN_PREFIX!r})")
    raw = _unb64url(text[len(JOIN_PREFIX) :])
    payload, checksum = raw[:-CHECKSUM_SIZE], raw[-CHECKSUM_SIZE:]
    if len(raw) <= CHECKSUM_SIZE or not hmac.compare_digest(hashlib.sha256(payload).digest()[:CHECKSUM_SIZE], checksum):
        raise TokenError("the join token is damaged (checksum mismatch: was it cut or mistyped?)")
    try:
        fields = msgpack.unpackb(payload, raw=False, max_bin_len=64, max_str_len=300, max_array_len=MAX_MASTERS + 4)
    except Exception:  # msgpack raises a handful of unrelated types
        raise TokenError("the join token's content is malformed") from None
    if not isinstance(fields, list) or len(fields) != 4:
        raise TokenError("the join token's content is malformed")
    token_id, secret, ca_fingerprint, masters = fields
    sizes = ((token_id, ID_SIZE), (secret, SECRET_SIZE), (ca_fingerprint, FINGERPRINT_SIZE))
    if not all(isinstance(value, bytes) and len(value) == size for value, size in sizes):
        raise TokenError("the join token's content is malformed")
    if not isinstance(masters, list) or not 1 <= len(masters) <= MAX_MASTERS:
        raise TokenError(f"the join token must name 1 to {MAX_MASTERS} masters")
    return JoinTokenText(token_id.hex(), secret, ca_fingerprint, tuple(check_master_address(m) for m in masters))


@attrs.frozen
class ApiTokenText:
    token_id: str
    secret: bytes = attrs.field(repr=False)

    def encode(self) -> str:
        return f"{API_PREFIX}{self.token_id}_{_b64url(self.secret)}"


def parse_api_token(text: object) -> ApiTokenText:
    """Read an API token; raises TokenError."""
    match = _API.fullmatch(text.strip()) if isinstance(text, str) and len(text) < 200 else None
    if match is None:
        raise TokenError(f"not a meshmail API token ({API_PREFIX}<id>_<secret>)")
    secret = _unb64url(match[2])
    if len(secret) != SECRET_SIZE:
        raise TokenError(f"not a meshmail API token ({API_PREFIX}<id>_<secret>)")
    return ApiTokenText(match[1], secret)


def new_api_token() -> ApiTokenText:
    return ApiTokenText(new_id(), new_secret())
