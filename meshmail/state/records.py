"""The values the replicated map stores, one attrs record type per key namespace, and their codec.

A key is ``<namespace>/<name>``; the namespace decides the record type of its value. Adding a
namespace is one decorated class here. Names are only checked for length: their syntax
(domain normalization, addresses) belongs to the names module.
"""

from __future__ import annotations

from typing import Any

import attrs
from attrs import validators as v

from meshmail.core.nodes import ROLES
from meshmail.state.hlc import node_field

#: Longest key, in UTF-8 bytes, including the namespace prefix.
MAX_KEY_BYTES = 512


class BadEntry(ValueError):
    """A key, value or encoded entry that cannot be accepted; the message says why."""


#: Distinct decoded values kept for sharing. Most maps hold a few values (one per slave) over
#: many keys: one record per value saves its size on every entry and its validation on every
#: decode. Keyed by namespace and the (type, value) of each field, so 1 and True stay apart.
MAX_SHARED_VALUES = 1 << 16
_shared: dict[tuple, Any] = {}

#: namespace -> record type of its values. Filled by @namespace; part of the wire protocol.
NAMESPACES: dict[str, type] = {}


def namespace(name: str):
    """Class decorator: values of keys ``<name>/...`` are records of this class."""

    def register(cls: type) -> type:
        if name in NAMESPACES or "/" in name:
            raise ValueError(f"namespace {name!r} already registered or invalid")
        NAMESPACES[name] = cls
        cls.NAMESPACE = name
        cls.FIELDS = tuple(f.name for f in attrs.fields(cls))
        return cls

    return register


@namespace("domain")
@attrs.frozen
class DomainRoute:
    """The slave that hosts a domain; `source` says who set it: the slave itself or an admin."""

    slave: str = node_field()
    source: str = attrs.field(validator=[v.instance_of(str), v.in_(("slave", "admin"))])


@namespace("claim")
@attrs.frozen
class DomainClaim:
    """A slave lists a domain that another slave routes, keyed ``<domain>/<slave>``: the key says
    it all. Only that slave's agent writes and deletes it, so claims never race each other; a
    domain's conflicts are its route and the claims of the other slaves."""


@namespace("address")
@attrs.frozen
class AddressOverride:
    """A per-mailbox route that beats the domain's, for moving one mailbox to another slave."""

    slave: str = node_field()


# The cluster's own bookkeeping: accounts, tokens, removed nodes, gossip keys. These
# namespaces are small and indexed (LWWMap.items without a scan); their secrets are stored
# only as hashes, except gossip keys, which every member needs in clear.

#: Longest free text (a token's note) and longest encoded secret hash kept in a record.
MAX_NOTE = 200
MAX_HASH = 256


def _text(limit: int, *, empty: bool = True):
    return attrs.field(validator=[v.instance_of(str), v.max_len(limit), *(() if empty else (v.min_len(1),))])


def _int(low: int = 0, high: int = (1 << 63) - 1):
    def check(instance, attribute, value) -> None:
        if type(value) is not int or not low <= value <= high:
            raise ValueError(f"{attribute.name} must be an int in [{low}, {high}]")

    return attrs.field(validator=check)


@namespace("admin")
@attrs.frozen
class AdminAccount:
    """An account that may use the admin API and UI; `password` is an scrypt hash (security.passwords)."""

    password: str = _text(MAX_HASH, empty=False)


@namespace("apitoken")
@attrs.frozen
class ApiToken:
    """A bearer token of the admin API, keyed by its public id; only the SHA-256 of its secret is kept."""

    secret_hash: str = _text(MAX_HASH, empty=False)
    account: str = _text(MAX_NOTE, empty=False)
    created_ms: int = _int()
    note: str = _text(MAX_NOTE)


@namespace("jointoken")
@attrs.frozen
class JoinToken:
    """A join token, keyed by its id. `uses` is how many joins it admits; the joins made are the
    Redemption records under ``redeemed/<token id>/``."""

    secret_hash: str = _text(MAX_HASH, empty=False)
    role: str = attrs.field(validator=v.in_(ROLES))
    expires_ms: int = _int()
    uses: int = _int(1, 1_000_000)
    creator: str = _text(MAX_NOTE)
    created_ms: int = _int()
    note: str = _text(MAX_NOTE)
    revoked: bool = attrs.field(default=False, validator=v.instance_of(bool))


@namespace("redeemed")
@attrs.frozen
class Redemption:
    """One join made with a token, keyed ``<token id>/<request nonce>``: a grow-only set, so
    concurrent joins on two masters are both counted once the records meet (a counter in one
    LWW record would lose one of them)."""

    node: str = node_field()
    role: str = attrs.field(validator=v.in_(ROLES))
    master: str = node_field()
    at_ms: int = _int()


@namespace("removed")
@attrs.frozen
class RemovedNode:
    """A node taken out of the cluster by `meshmail remove`: its gossip is refused everywhere."""

    by: str = _text(MAX_NOTE)
    at_ms: int = _int()


@namespace("gossipkey")
@attrs.frozen
class GossipKey:
    """A gossip key, keyed by its id (security.keyring_sync.key_id). The newest "primary" record names
    the key that encrypts; "removed" records keep no key material."""

    state: str = attrs.field(validator=v.in_(("installed", "primary", "removed")))
    key: str = attrs.field(validator=[v.instance_of(str), v.max_len(64)])


#: The namespaces above: small, indexed, and watched by the node (node.follow_state).
CONTROL_NAMESPACES = ("admin", "apitoken", "jointoken", "redeemed", "removed", "gossipkey")


def make_key(ns: str, name: str) -> str:
    """The key ``<ns>/<name>``; raises BadEntry when it would not pass split_key."""
    key = f"{ns}/{name}"
    split_key(key)
    return key


def split_key(key: Any) -> tuple[str, str]:
    """Split a key into (namespace, name).

    Raises BadEntry when the key is not a str, is too long, has an empty name, or its namespace
    is unknown (check `namespace_of(key) in NAMESPACES` first to skip unknown ones quietly).
    """
    if type(key) is not str:
        raise BadEntry(f"key must be a str, not {type(key).__name__}")
    try:
        if len(key) > MAX_KEY_BYTES or len(key.encode()) > MAX_KEY_BYTES:
            raise BadEntry(f"key longer than {MAX_KEY_BYTES} bytes")
    except UnicodeEncodeError:
        raise BadEntry("key is not valid Unicode") from None
    ns, sep, name = key.partition("/")
    if not sep or not name:
        raise BadEntry(f"key {key[:80]!r} is not <namespace>/<name>")
    if ns not in NAMESPACES:
        raise BadEntry(f"unknown namespace {ns[:40]!r}")
    return ns, name


def namespace_of(key: str) -> str:
    """The namespace part of a key (not validated)."""
    return key.partition("/")[0]


def check_value(ns: str, record: Any) -> None:
    """Raise BadEntry unless `record` is a value of namespace `ns`."""
    cls = NAMESPACES.get(ns)
    if cls is None:
        raise BadEntry(f"unknown namespace {ns[:40]!r}")
    if type(record) is not cls:
        raise BadEntry(f"a {ns} value must be a {cls.__name__}, not {type(record).__name__}")


def encode_value(ns: str, record: Any) -> dict[str, Any]:
    """The msgpack-ready form of a value: ``{field: value}``. Raises BadEntry on a type mismatch."""
    check_value(ns, record)
    return {name: getattr(record, name) for name in record.FIELDS}


def decode_value(ns: str, obj: Any) -> Any:
    """The record encoded by encode_value; unknown fields are ignored, wrong types raise BadEntry.

    Equal records decoded in this process are one shared object (up to MAX_SHARED_VALUES).
    """
    cls = NAMESPACES.get(ns)
    if cls is None:
        raise BadEntry(f"unknown namespace {ns[:40]!r}")
    if not isinstance(obj, dict):
        raise BadEntry(f"{ns} value must be a map, not {type(obj).__name__}")
    fields = {name: obj[name] for name in cls.FIELDS if name in obj}
    try:
        # An unhashable field (a list, from a malformed or a future record) is never shared.
        signature: tuple | None = (ns, *((name, type(value), value) for name, value in fields.items()))
        shared = _shared.get(signature)
    except TypeError:
        signature = shared = None
    if shared is not None:
        return shared
    try:
        record = cls(**fields)
    except (TypeError, ValueError) as exc:
        raise BadEntry(f"bad {ns} value: {exc}") from None
    if signature is not None and len(_shared) < MAX_SHARED_VALUES:
        _shared[signature] = record
    return record
