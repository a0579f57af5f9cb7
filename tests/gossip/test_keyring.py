"""The keyring, the AES-256-GCM envelope and the replay guard (meshmail.gossip.keyring).

Covers the envelope round trip and its rejections, the cluster name as associated data,
key rotation without downtime, secrecy of key material in reprs and errors, and the
replay guard's window and memory cap.
"""

from __future__ import annotations

import base64
import random

import pytest

from meshmail.gossip.keyring import (
    KEY_SIZE,
    OVERHEAD,
    EnvelopeError,
    Keyring,
    KeyringError,
    ReplayGuard,
    new_key,
)
from meshmail.gossip.memberlist import FrameError, Memberlist
from meshmail.gossip.memory import MemoryNetwork

OLD = bytes(range(32))
NEW = bytes(range(100, 132))
OTHER = bytes(range(200, 232))
AAD = b"meshmail-gossip/1/prod"


def test_seal_open_round_trip() -> None:
    """open(seal(p)) gives back p, for empty and large plaintexts; nonces differ every time."""
    ring = Keyring([OLD])
    for plaintext in (b"", b"x", bytes(range(256)) * 256):
        envelope = ring.seal(plaintext, AAD)
        assert len(envelope) == len(plaintext) + OVERHEAD
        nonce, opened = ring.open(envelope, AAD)
        assert opened == plaintext
        assert nonce == envelope[1:13]
    nonces = {ring.seal(b"same", AAD)[1:13] for _ in range(100)}
    assert len(nonces) == 100


@pytest.mark.parametrize(
    ("envelope", "reason"),
    [
        (b"", "truncated"),
        (b"\x01", "truncated"),
        (b"\x01" * (OVERHEAD - 1), "truncated"),
        (b"\x01" * OVERHEAD, "auth_failed"),
        (b"\x00" + b"\x01" * OVERHEAD, "bad_version"),
        (b"\x02" + b"\x01" * 100, "bad_version"),
        (b"\xff" * 1000, "bad_version"),
        (b"\x01" + b"\x00" * 1000, "auth_failed"),
    ],
)
def test_open_rejects(envelope: bytes, reason: str) -> None:
    """Short, unversioned and forged envelopes fail with the counter name as reason."""
    with pytest.raises(EnvelopeError) as info:
        Keyring([OLD]).open(envelope, AAD)
    assert info.value.reason == reason


def test_every_bit_flip_and_every_truncation_rejected() -> None:
    """Flipping any one bit or cutting at any offset makes a valid envelope fail to open."""
    ring = Keyring([OLD])
    envelope = ring.seal(b"hello gossip", AAD)
    for bit in range(len(envelope) * 8):
        damaged = bytearray(envelope)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(EnvelopeError) as info:
            ring.open(bytes(damaged), AAD)
        assert info.value.reason == ("bad_version" if bit < 8 else "auth_failed")
    for cut in range(len(envelope)):
        with pytest.raises(EnvelopeError) as info:
            ring.open(envelope[:cut], AAD)
        assert info.value.reason == ("truncated" if cut < OVERHEAD else "auth_failed")
    with pytest.raises(EnvelopeError):
        ring.open(envelope + b"\x00", AAD)


def test_cluster_name_is_bound_as_associated_data() -> None:
    """The same key under another cluster name does not open: two clusters never mix."""
    ring = Keyring([OLD])
    envelope = ring.seal(b"state", AAD)
    for other in (b"meshmail-gossip/1/staging", b"meshmail-gossip/1/prod2", b"", AAD + b"\x00"):
        with pytest.raises(EnvelopeError) as info:
            ring.open(envelope, other)
        assert info.value.reason == "auth_failed"


def _node(cluster: str, keyring: Keyring) -> Memberlist:
    network = MemoryNetwork(random.Random(0))
    return Memberlist(
        name="n1", transport=network.transport(("10.0.0.1", 1)), keyring=keyring, cluster=cluster,
        wall_clock=lambda: 1_700_000_000.0,
    )


def test_memberlist_binds_its_cluster_name() -> None:
    """A node with the right key but another cluster name drops our packets as auth_failed."""
    prod, staging = _node("prod", Keyring([OLD])), _node("staging", Keyring([OLD]))
    packet = prod._sealer.seal([])
    assert prod._sealer.open(packet)[1] == []
    with pytest.raises(FrameError) as info:
        staging._sealer.open(packet)
    assert info.value.reason == "auth_failed"


def test_rotation_without_downtime() -> None:
    """install new everywhere, use new, remove old: at every step the cluster can talk.

    A peer that never got the new key can no longer read what the rotated node sends.
    """
    node = Keyring([OLD])
    peer = Keyring([OLD])
    laggard = Keyring([OLD])

    node.install(NEW)
    peer.install(NEW)
    assert node.primary == OLD and node.keys == (OLD, NEW)
    sealed_old = node.seal(b"1", AAD)
    assert laggard.open(sealed_old, AAD)[1] == b"1"  # still sealed with the old primary

    node.use(NEW)
    assert node.primary == NEW and set(node.keys) == {OLD, NEW}
    sealed_new = node.seal(b"2", AAD)
    assert peer.open(sealed_new, AAD)[1] == b"2"
    assert node.open(laggard.seal(b"3", AAD), AAD)[1] == b"3"  # old key still decrypts
    assert node.open(sealed_old, AAD)[1] == b"1"
    with pytest.raises(EnvelopeError) as info:
        laggard.open(sealed_new, AAD)
    assert info.value.reason == "auth_failed"

    node.remove(OLD)
    assert node.keys == (NEW,)
    with pytest.raises(EnvelopeError):
        node.open(sealed_old, AAD)
    with pytest.raises(EnvelopeError):
        node.open(laggard.seal(b"4", AAD), AAD)
    assert node.open(sealed_new, AAD)[1] == b"2"


def test_install_is_idempotent_and_duplicates_collapse() -> None:
    """Installing an installed key does nothing; a keyring built with duplicates keeps one."""
    ring = Keyring([OLD, NEW, OLD])
    assert ring.keys == (OLD, NEW)
    ring.install(NEW)
    ring.install(OLD)
    assert ring.keys == (OLD, NEW)


def test_cannot_remove_primary_or_unknown_key() -> None:
    """The primary cannot be removed (there must be a key to seal with); nor can an unknown key."""
    ring = Keyring([OLD, NEW])
    with pytest.raises(KeyringError, match="primary"):
        ring.remove(OLD)
    with pytest.raises(KeyringError):
        ring.remove(OTHER)
    with pytest.raises(KeyringError):
        ring.use(OTHER)
    assert ring.keys == (OLD, NEW)


@pytest.mark.parametrize(
    "key",
    [b"", b"k" * 16, b"k" * 24, b"k" * 31, b"k" * 33, "k" * 32, bytearray(32), None, 32],
    ids=["empty", "aes128", "aes192", "31", "33", "str", "bytearray", "None", "int"],
)
def test_wrong_key_size_or_type(key) -> None:
    """Only 32-byte keys (AES-256) are accepted, at construction and at install."""
    # An unhashable key (bytearray) fails with TypeError in the constructor's dedup, before the check.
    with pytest.raises((KeyringError, TypeError) if isinstance(key, bytearray) else KeyringError):
        Keyring([key])
    with pytest.raises(KeyringError):
        Keyring([OLD]).install(key)


def test_empty_keyring_refused() -> None:
    """A keyring needs at least one key."""
    with pytest.raises(KeyringError):
        Keyring([])


def test_new_key() -> None:
    """new_key gives fresh 32-byte keys."""
    keys = {new_key() for _ in range(10)}
    assert len(keys) == 10 and all(len(k) == KEY_SIZE for k in keys)


def _renderings(key: bytes) -> list[str]:
    return [repr(key), key.hex(), base64.b64encode(key).decode(), key.decode("latin-1"), str(list(key))[1:-1]]


def test_key_material_never_in_repr_or_errors() -> None:
    """repr and str of the keyring, its errors and the node show no key in any common encoding."""
    ring = Keyring([OLD, NEW])
    shown = [repr(ring), str(ring), repr(_node("prod", ring).keyring)]
    for call in (lambda: ring.remove(OLD), lambda: ring.use(OTHER), lambda: ring.install(OLD[:31])):
        with pytest.raises(KeyringError) as info:
            call()
        shown += [str(info.value), repr(info.value)]
    with pytest.raises(EnvelopeError) as info:
        ring.open(Keyring([OTHER]).seal(b"x", AAD), AAD)
    shown += [str(info.value), repr(info.value)]
    assert repr(ring) == "<Keyring 2 key(s)>"
    for text in shown:
        for key in (OLD, NEW, OTHER):
            for rendering in _renderings(key):
                assert rendering not in text


# ------------------------------------------------------------------ ReplayGuard

WINDOW = 60.0


@pytest.mark.parametrize(
    ("sent", "now", "verdict"),
    [
        (1000.0, 1000.0, None),
        (940.0, 1000.0, None),  # exactly one window old: still fresh
        (1060.0, 1000.0, None),  # one window ahead (clock skew): still fresh
        (939.999, 1000.0, "stale"),
        (1060.001, 1000.0, "stale"),
        (0.0, 1000.0, "stale"),
        (-1e18, 1000.0, "stale"),
        (1e18, 1000.0, "stale"),
    ],
)
def test_replay_guard_window(sent: float, now: float, verdict: str | None) -> None:
    """Envelopes sent more than one window from now (either side) are stale."""
    assert ReplayGuard(WINDOW).check(b"n", sent, now) == verdict


def test_replay_guard_drops_replays() -> None:
    """The same nonce twice within the window is a replay; a stale one is not remembered."""
    guard = ReplayGuard(WINDOW)
    assert guard.check(b"a", 1000.0, 1000.0) is None
    assert guard.check(b"a", 1000.0, 1000.0) == "replay"
    assert guard.check(b"a", 1000.0, 1059.0) == "replay"
    assert guard.check(b"a", 1010.0, 1030.0) == "replay"  # another send time does not launder it
    assert guard.check(b"b", 1000.0, 1000.5) is None
    assert guard.check(b"s", 0.0, 1000.0) == "stale"
    assert guard.check(b"s", 1000.0, 1000.0) is None


def test_replay_guard_window_expiry() -> None:
    """Once a nonce's send time leaves the window it is forgotten, and its replay is stale."""
    guard = ReplayGuard(WINDOW)
    for i in range(100):
        assert guard.check(b"n%d" % i, 1000.0 + i, 1050.0) is None
    assert len(guard._seen) == 100
    # At 1100 everything sent before 1040 has left the window.
    assert guard.check(b"late", 1100.0, 1100.0) is None
    assert len(guard._seen) == 100 - 40 + 1
    assert guard.check(b"n0", 1000.0, 1100.0) == "stale"
    assert guard.check(b"n50", 1050.0, 1100.0) == "replay"
    assert guard.check(b"fresh", 1200.0, 1200.0) is None
    assert len(guard._seen) == 1  # the window slid past everything else


def test_replay_guard_max_entries_floor() -> None:
    """With the memory cap reached the oldest nonce is forgotten and a floor rises to its send time.

    Envelopes sent at or before the floor are then stale, so a forgotten nonce can never be
    replayed; later fresh envelopes still pass.
    """
    guard = ReplayGuard(WINDOW, max_entries=2)
    assert guard.check(b"a", 10.0, 12.0) is None
    assert guard.check(b"b", 11.0, 12.0) is None
    assert guard.check(b"c", 12.0, 12.0) is None  # forgets a, floor = 10
    assert len(guard._seen) == 2
    assert guard.check(b"a", 10.0, 12.0) == "stale"  # the forgotten nonce cannot come back
    assert guard.check(b"x", 9.0, 12.0) == "stale"  # below the floor: stale though fresh
    assert guard.check(b"y", 10.0, 12.0) == "stale"  # at the floor
    assert guard.check(b"z", 10.5, 12.0) is None  # above the floor; forgets b, floor = 11
    assert guard.check(b"b", 11.0, 12.0) == "stale"
    assert guard.check(b"c", 12.0, 12.0) == "replay"
    assert guard.check(b"z", 10.5, 12.0) == "stale"  # now below the floor of 11


def test_replay_guard_floor_never_lowers() -> None:
    """Evicting a nonce sent earlier than the current floor keeps the higher floor."""
    guard = ReplayGuard(WINDOW, max_entries=1)
    assert guard.check(b"late", 20.0, 20.0) is None
    assert guard.check(b"early", 15.0, 20.0) is None  # evicts late (sent 20): floor = 20
    assert guard.check(b"next", 21.0, 21.0) is None  # evicts early (sent 15): floor stays 20
    assert guard.check(b"late", 20.0, 21.0) == "stale"
    assert guard.check(b"early", 15.0, 21.0) == "stale"
