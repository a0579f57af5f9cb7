"""Keyring and the encrypted envelope around every gossip packet and stream frame.

The envelope is ``version(1) | nonce(12) | AES-256-GCM(ciphertext + tag)`` with the
cluster name bound as associated data. The primary key encrypts; every installed key is
tried to decrypt, so keys rotate without downtime (install everywhere, switch primary,
remove the old one). Key material never appears in reprs, errors or logs.
"""

from __future__ import annotations

import base64
import collections
import os
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ENVELOPE_VERSION = 1
NONCE_SIZE = 12
TAG_SIZE = 16
KEY_SIZE = 32
OVERHEAD = 1 + NONCE_SIZE + TAG_SIZE


class EnvelopeError(ValueError):
    """A packet that is not a valid envelope under any installed key. `reason` is a counter name."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeyringError(ValueError):
    """A keyring operation that cannot be done (bad key size, removing the primary...)."""


def new_key() -> bytes:
    """A fresh random 32-byte key."""
    return os.urandom(KEY_SIZE)


def encode_key(key: bytes) -> str:
    """The base64 text of a key, as configs, keyring.json and the API carry it."""
    return base64.b64encode(key).decode("ascii")


def decode_key(text: object) -> bytes:
    """A key from its base64 text; raises KeyringError (never showing the text: keys get logged)."""
    if not isinstance(text, str):
        raise KeyringError("a gossip key is a base64 string (make one with: meshmail keygen)")
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raise KeyringError("not valid base64 (make one with: meshmail keygen)") from None
    if len(key) != KEY_SIZE:
        raise KeyringError(f"decodes to {len(key)} bytes; a gossip key is {KEY_SIZE} bytes (meshmail keygen)")
    return key


def _cipher(key: bytes) -> AESGCM:
    # cryptography is imported on first use: the CLI reads and writes keys without it, and
    # loading it is most of a short command's start-up time.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_SIZE:
        raise KeyringError(f"a gossip key is {KEY_SIZE} bytes (AES-256)")
    return key


@attrs.define(eq=False, repr=False)
class Keyring:
    """Installed keys, primary first. Mutations keep exactly one primary."""

    _keys: list[bytes]
    _ciphers: dict[bytes, AESGCM] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if not self._keys:
            raise KeyringError("a keyring needs at least one key")
        self._keys = list(dict.fromkeys(_check_key(k) for k in self._keys))
        self._ciphers = {k: _cipher(k) for k in self._keys}

    def __repr__(self) -> str:
        return f"<Keyring {len(self._keys)} key(s)>"

    @property
    def keys(self) -> tuple[bytes, ...]:
        return tuple(self._keys)

    @property
    def primary(self) -> bytes:
        return self._keys[0]

    def install(self, key: bytes) -> None:
        """Add a key for decryption; installing an installed key does nothing."""
        key = _check_key(key)
        if key not in self._ciphers:
            self._keys.append(key)
            self._ciphers[key] = _cipher(key)

    def use(self, key: bytes) -> None:
        """Make an installed key the primary (encrypting) key."""
        if key not in self._ciphers:
            raise KeyringError("that key is not installed")
        self._keys.remove(key)
        self._keys.insert(0, key)

    def remove(self, key: bytes) -> None:
        """Remove a key that is not the primary."""
        if key == self.primary:
            raise KeyringError("the primary key cannot be removed; make another key primary first")
        if key not in self._ciphers:
            raise KeyringError("that key is not installed")
        self._keys.remove(key)
        del self._ciphers[key]

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt with the primary key into an envelope."""
        nonce = os.urandom(NONCE_SIZE)
        sealed = self._ciphers[self.primary].encrypt(nonce, plaintext, aad)
        return bytes((ENVELOPE_VERSION,)) + nonce + sealed

    def open(self, envelope: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """Return (nonce, plaintext) of an envelope; raise EnvelopeError with a reason."""
        if len(envelope) < OVERHEAD:
            raise EnvelopeError("truncated")
        if envelope[0] != ENVELOPE_VERSION:
            raise EnvelopeError("bad_version")
        from cryptography.exceptions import (
            InvalidTag,  # loaded already: the keyring made ciphers
        )

        nonce = envelope[1 : 1 + NONCE_SIZE]
        body = envelope[1 + NONCE_SIZE :]
        for key in self._keys:
            try:
                return nonce, self._ciphers[key].decrypt(nonce, body, aad)
            except InvalidTag:
                continue
        raise EnvelopeError("auth_failed")


@attrs.define(eq=False)
class ReplayGuard:
    """Drops envelopes sent too far from now or seen before within the window.

    Nonces are remembered until their send time leaves the window, so memory is bounded
    by the packet rate times the window; `max_entries` caps it further: a nonce forgotten
    early raises a floor, and envelopes sent at or before it are dropped as stale, so a
    forgotten nonce can never be replayed.
    """

    window: float
    max_entries: int = 1 << 20
    _seen: set[bytes] = attrs.field(factory=set)
    _order: collections.deque = attrs.field(factory=collections.deque)
    #: Send time of the newest nonce forgotten early because of max_entries.
    _floor: float = float("-inf")

    def check(self, nonce: bytes, sent: float, now: float) -> str | None:
        """Record the nonce; return a drop reason or None when the envelope is fresh."""
        horizon = now - self.window
        while self._order and self._order[0][0] < horizon:
            self._seen.discard(self._order.popleft()[1])
        if abs(now - sent) > self.window or sent <= self._floor:
            return "stale"
        if nonce in self._seen:
            return "replay"
        if len(self._order) >= self.max_entries:
            old_sent, old = self._order.popleft()
            self._seen.discard(old)
            self._floor = max(self._floor, old_sent)
        self._seen.add(nonce)
        self._order.append((sent, nonce))
        return None
