"""The gossip keyring kept in the replicated state: install, use and remove records, a real
gossip Keyring brought in line with them (reconcile), and the report of who holds which key."""

from __future__ import annotations

import base64
import hashlib

import attrs
import pytest
from helpers.security import member, snapshot

from meshmail.gossip.keyring import Keyring, KeyringError
from meshmail.gossip.messages import State
from meshmail.security import keyring_sync as ks
from meshmail.state.records import GossipKey

K0, K1, K2 = (bytes([i]) * 32 for i in range(3))
ID0, ID1, ID2 = (ks.key_id(k) for k in (K0, K1, K2))


@pytest.fixture
def local() -> Keyring:
    return Keyring([K0])


def test_key_id_and_codec():
    assert ID0 == hashlib.sha256(K0).digest()[:8].hex() and len(ID0) == 16
    assert ks.decode_key(ks.encode_key(K1)) == K1
    assert ks.decode_key(f"  {ks.encode_key(K1)}\n") == K1


@pytest.mark.parametrize(
    "text",
    ["", "!!!!", "not base64", base64.b64encode(bytes(16)).decode(), base64.b64encode(bytes(33)).decode(),
     base64.urlsafe_b64encode(b"\xff" * 32).decode(), "é" * 44],
    ids=repr,
)
def test_decode_key_refusals(text):
    with pytest.raises(KeyringError):
        ks.decode_key(text)


def test_install_use_remove_reconcile(replication, local):
    state = replication.state
    assert ks.install(replication, K1) == ID1
    assert state.get(ks.NS, ID1) == GossipKey("installed", ks.encode_key(K1))
    before = snapshot(state)
    assert ks.install(replication, K1) == ID1  # installed already: nothing written
    assert snapshot(state) == before

    assert ks.reconcile(local, state) is True
    assert local.keys == (K0, K1) and local.primary == K0
    assert ks.reconcile(local, state) is False

    ks.use(replication, ID1, local)
    assert ks.reconcile(local, state) is True
    assert local.primary == K1 and set(local.keys) == {K0, K1}
    assert ks.ids(local) == (ID1, ID0)

    ks.remove(replication, ID0, local)  # K0 was never in the records: known from the local keyring
    assert state.get(ks.NS, ID0) == GossipKey("removed", "")
    assert ks.reconcile(local, state) is True
    assert local.keys == (K1,)
    assert ks.desired(state) == ks.Desired((K1,), K1, frozenset({ID0}))


def test_use_a_local_key_not_in_the_records(replication, local):
    ks.use(replication, ID0, local)
    assert replication.state.get(ks.NS, ID0) == GossipKey("primary", ks.encode_key(K0))


def test_use_refusals(replication, local):
    before = snapshot(replication.state)
    with pytest.raises(KeyringError, match="no key"):
        ks.use(replication, ID2, local)
    assert snapshot(replication.state) == before
    ks.install(replication, K1)
    ks.remove(replication, ID1, local)
    before = snapshot(replication.state)
    with pytest.raises(KeyringError):
        ks.use(replication, ID1, local)
    assert snapshot(replication.state) == before


def test_use_of_a_removed_key_says_it_was_removed(replication, local):
    """The refusal must say the key was removed, not advise `keyring install first` (which
    install then refuses): use() looks the key up before it checks the removal."""
    ks.install(replication, K1)
    ks.remove(replication, ID1, local)
    with pytest.raises(KeyringError, match="removed"):
        ks.use(replication, ID1, local)


def test_removing_the_primary_is_refused(replication, local):
    ks.install(replication, K1)
    ks.use(replication, ID1, local)
    before = snapshot(replication.state)
    with pytest.raises(KeyringError, match="primary"):
        ks.remove(replication, ID1, local)
    assert snapshot(replication.state) == before


def test_removing_the_local_primary_is_refused_when_records_name_none(replication, local):
    ks.install(replication, K1)
    before = snapshot(replication.state)
    with pytest.raises(KeyringError, match="primary"):
        ks.remove(replication, ID0, local)
    assert snapshot(replication.state) == before


def test_remove_unknown_and_twice(replication, local):
    with pytest.raises(KeyringError, match="no key"):
        ks.remove(replication, ID2, local)
    ks.install(replication, K1)
    ks.remove(replication, ID1, local)
    before = snapshot(replication.state)
    ks.remove(replication, ID1, local)
    assert snapshot(replication.state) == before


def test_removed_key_cannot_come_back(replication, local):
    ks.install(replication, K1)
    ks.remove(replication, ID1, local)
    with pytest.raises(KeyringError, match="removed"):
        ks.install(replication, K1)


def test_newest_primary_record_wins(replication, local):
    for key in (K1, K2):
        ks.install(replication, key)
    ks.use(replication, ID2, local)
    ks.use(replication, ID1, local)
    assert ks.desired(replication.state).primary == K1
    ks.reconcile(local, replication.state)
    assert local.primary == K1 and set(local.keys) == {K0, K1, K2}


def test_switching_back_to_an_earlier_primary(replication, local):
    """`keyring use K2; use K1; use K2` must leave K2 primary. The third put writes a record
    equal to the one held, which ClusterState skips (same value: no new timestamp), so K1's
    newer "primary" record keeps winning in desired()."""
    for key in (K1, K2):
        ks.install(replication, key)
    ks.use(replication, ID2, local)
    ks.use(replication, ID1, local)
    ks.use(replication, ID2, local)
    assert ks.desired(replication.state).primary == K2
    ks.reconcile(local, replication.state)
    assert local.primary == K2


def test_reconcile_never_removes_own_primary(replication, local):
    """A removal written elsewhere for the key this node still encrypts with: it is kept (and
    reconcile does not raise) until a newer primary arrives."""
    replication.put(ks.NS, ID0, GossipKey("removed", ""))
    ks.install(replication, K1)
    assert ks.reconcile(local, replication.state) is True
    assert local.primary == K0 and local.keys == (K0, K1)
    ks.use(replication, ID1, local)
    ks.reconcile(local, replication.state)
    assert local.keys == (K1,)


def test_reconcile_keeps_a_primary_removed_after_use(replication, local):
    ks.install(replication, K1)
    ks.use(replication, ID1, local)
    ks.reconcile(local, replication.state)
    replication.put(ks.NS, ID1, GossipKey("removed", ""))  # as a peer with an older view might
    ks.reconcile(local, replication.state)
    assert local.primary == K1
    assert K1 in local.keys


def test_reconcile_ignores_a_record_with_bad_key_text(replication, local):
    replication.put(ks.NS, "00" * 8, GossipKey("installed", "!!!not base64!!!"))
    replication.put(ks.NS, "11" * 8, GossipKey("primary", base64.b64encode(bytes(16)).decode()))
    assert ks.reconcile(local, replication.state) is False
    assert local.keys == (K0,)


def test_report(replication, local):
    ks.install(replication, K1)
    ks.install(replication, K2)
    ks.remove(replication, ID2, local)
    members = [
        member("m1", keys=(ID0, ID1)),
        member("m2", State.SUSPECT, keys=(ID1,)),
        member("m3", State.DEAD, keys=(ID0, ID1, ID2)),
        member("m4", State.LEFT, keys=("ffffffffffffffff",)),
        member("m5", keys=("eeeeeeeeeeeeeeee",)),
    ]
    report = ks.report(replication.state, local, members)
    assert report["members"] == 3
    by_id = {entry["id"]: entry for entry in report["keys"]}
    # ID2 is removed and no live member holds it any more: nothing to report.
    assert set(by_id) == {ID0, ID1, "eeeeeeeeeeeeeeee"}
    assert [entry["id"] for entry in report["keys"]] == sorted(by_id)
    assert by_id[ID0] == {"id": ID0, "state": "local", "installed_on": 1, "primary_on": 1, "missing_on": ["m2", "m5"]}
    assert by_id[ID1] == {"id": ID1, "state": "installed", "installed_on": 2, "primary_on": 1, "missing_on": ["m5"]}
    assert by_id["eeeeeeeeeeeeeeee"]["state"] == "unknown"
    assert by_id["eeeeeeeeeeeeeeee"]["installed_on"] == 1 and by_id["eeeeeeeeeeeeeeee"]["primary_on"] == 1


def test_report_counts_members_with_unreadable_meta_as_holding_nothing(replication, local):
    broken = attrs.evolve(member("m1"), meta=b"\xc1garbage")
    report = ks.report(replication.state, local, [broken])
    assert report == {
        "members": 1,
        "keys": [{"id": ID0, "state": "local", "installed_on": 0, "primary_on": 0, "missing_on": ["m1"]}],
    }


def test_key_material_not_in_report(replication, local):
    ks.install(replication, K1)
    text = repr(ks.report(replication.state, local, [member("m1", keys=(ID1,))]))
    assert ks.encode_key(K1) not in text and K1.hex() not in text


def test_at_most_max_keys_are_installed(replication, local):
    """Key ids travel in the 1 KiB metadata: a ninth key is refused and nothing is written."""
    from meshmail.gossip.keyring import new_key
    from meshmail.nodemeta import MAX_KEYS, NodeMeta

    for _ in range(MAX_KEYS - 1):  # the local keyring holds one more
        ks.install(replication, new_key(), local)
    before = snapshot(replication.state)
    with pytest.raises(KeyringError, match=f"{MAX_KEYS} keys are installed already"):
        ks.install(replication, new_key(), local)
    assert snapshot(replication.state) == before
    ks.reconcile(local, replication.state)
    # The meta of a node holding the most keys is valid and small enough.
    assert len(ks.ids(local)) == MAX_KEYS
    assert len(NodeMeta(keys=ks.ids(local)).encode()) < 1024
    with pytest.raises(ValueError):
        NodeMeta(keys=["0" * 16] * (MAX_KEYS + 1))
    with pytest.raises(ValueError):
        NodeMeta(keys=["0" * 17])
