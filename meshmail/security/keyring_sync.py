"""The gossip keyring kept in the replicated state, so keys rotate cluster-wide.

`meshmail keyring install|use|remove` write ``gossipkey/<id>`` records; every node brings its
own Keyring in line with them (reconcile) whenever they change, saves it to its data dir and
tells the others which keys it holds in its metadata, which is what `keyring list` counts,
as Serf does. A key id is the first 8 bytes of the key's SHA-256, in hex: safe to show.

New keys travel inside gossip encrypted with the current primary key, so a member that
still holds an old key could read them: remove a compromised node first (it is then refused
and sent nothing), then rotate.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

import attrs

from ..gossip.keyring import Keyring, KeyringError, decode_key, encode_key
from ..gossip.member import MemberInfo
from ..gossip.messages import State
from ..nodemeta import MAX_KEYS, NodeMeta
from ..state.records import GossipKey
from ..state.replica import ClusterState

log = logging.getLogger("meshmail.keyring")

NS = "gossipkey"


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).digest()[:8].hex()


@attrs.frozen
class Desired:
    """What the records ask of every keyring."""

    keys: tuple[bytes, ...]
    primary: bytes | None
    removed: frozenset[str]


def desired(state: ClusterState) -> Desired:
    keys: list[bytes] = []
    removed: set[str] = set()
    primary, newest = None, None
    for kid, record in state.records(NS):
        if record.state == "removed" or not record.key:
            removed.add(kid)
            continue
        try:
            key = decode_key(record.key)
        except KeyringError:
            continue  # a record no node of ours would write: ignore it
        keys.append(key)
        if record.state == "primary":
            entry = state.entry(NS, kid)
            stamp = (entry.wall_ms, entry.logical, entry.node)
            if newest is None or stamp > newest:
                primary, newest = key, stamp
    return Desired(tuple(keys), primary, frozenset(removed))


def reconcile(keyring: Keyring, state: ClusterState) -> bool:
    """Install, switch to and remove keys as the records say; True when the keyring changed.
    The primary key is never removed here: a node keeps it until a newer primary arrives."""
    want = desired(state)
    before = keyring.keys
    for key in want.keys:
        if key_id(key) not in want.removed:
            keyring.install(key)
    if want.primary is not None and key_id(want.primary) not in want.removed:
        keyring.use(want.primary)
    for key in keyring.keys:
        if key_id(key) in want.removed:
            if key == keyring.primary:
                log.warning("key %s is removed but still this node's primary; waiting for a new primary", key_id(key))
            else:
                keyring.remove(key)
    return keyring.keys != before


def ids(keyring: Keyring) -> tuple[str, ...]:
    return tuple(key_id(key) for key in keyring.keys)


# --- operations (through Replication; checks first, so a refused one writes nothing) ---------


def install(replication, key: bytes, local: Keyring | None = None) -> str:
    """Install `key` everywhere (not used yet); refused past MAX_KEYS keys, counting this
    node's own (`local`) too: key ids travel in the 1 KiB metadata."""
    kid = key_id(key)
    record = replication.state.get(NS, kid)
    if record is not None and record.state != "removed":
        return kid
    if record is not None:
        raise KeyringError(f"key {kid} was removed from this cluster; make a new one (meshmail keygen)")
    held = set(desired(replication.state).keys) | set(local.keys if local is not None else ())
    if len(held) >= MAX_KEYS:
        raise KeyringError(f"{MAX_KEYS} keys are installed already; remove one first (keyring remove)")
    replication.put(NS, kid, GossipKey("installed", encode_key(key)))
    return kid


def use(replication, kid: str, local: Keyring) -> None:
    """Make key `kid` primary everywhere; it must be installed (in the records or this node's keyring)."""
    record = replication.state.get(NS, kid)
    if record is not None and record.state == "removed":
        raise KeyringError(f"key {kid} was removed from this cluster; install a new one (meshmail keygen)")
    key = decode_key(record.key) if record is not None and record.key else _local_key(local, kid)
    # One primary record at a time: the others step back to "installed", so that switching
    # back to an earlier primary is a new write (an equal record would write nothing).
    for other, held in list(replication.state.records(NS)):
        if other != kid and held.state == "primary":
            replication.put(NS, other, GossipKey("installed", held.key))
    replication.put(NS, kid, GossipKey("primary", encode_key(key)))


def remove(replication, kid: str, local: Keyring) -> None:
    """Remove key `kid` everywhere; refused while it is the cluster's primary."""
    want = desired(replication.state)
    primary = want.primary if want.primary is not None else local.primary
    if key_id(primary) == kid:
        raise KeyringError(f"key {kid} is the primary key; make another key primary first (keyring use)")
    record = replication.state.get(NS, kid)
    if record is None and kid not in ids(local):
        raise KeyringError(f"no key {kid} is installed")
    if record is not None and record.state == "removed":
        return
    replication.put(NS, kid, GossipKey("removed", ""))


def _local_key(local: Keyring, kid: str) -> bytes:
    for key in local.keys:
        if key_id(key) == kid:
            return key
    raise KeyringError(f"no key {kid} is installed (keyring install first)")


def report(state: ClusterState, local: Keyring, members: Iterable[MemberInfo]) -> dict:
    """The keys the cluster knows and how many live members hold each, like `serf keys -list`."""
    held = {m.name: NodeMeta.decode(m.meta).keys for m in members if m.state in (State.ALIVE, State.SUSPECT)}
    records = dict(state.records(NS))
    seen = {kid for keys in held.values() for kid in keys} | set(records) | set(ids(local))
    keys = []
    for kid in sorted(seen):
        holders = [name for name, keys in held.items() if kid in keys]
        primaries = [name for name, keys in held.items() if keys[:1] == (kid,)]
        record = records.get(kid)
        if record is not None and record.state == "removed" and not holders:
            continue  # gone everywhere: nothing left to report
        keys.append(
            {
                "id": kid,
                "state": record.state if record is not None else ("local" if kid in ids(local) else "unknown"),
                "installed_on": len(holders),
                "primary_on": len(primaries),
                "missing_on": sorted(name for name, keys in held.items() if kid not in keys),
            }
        )
    return {"members": len(held), "keys": keys}
