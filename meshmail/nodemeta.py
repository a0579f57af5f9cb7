"""The metadata every member gossips about itself: role, service endpoints, tags, key ids
and where its HTTP API answers.

Encoded with msgpack into at most 1 KiB; the gossip layer carries it as opaque bytes.
Decoding is lenient: unknown keys are ignored, and metadata that cannot be read becomes
an empty NodeMeta rather than an error, so one odd member never breaks a view.
"""

from __future__ import annotations

import attrs
import msgpack
from attrs import validators as v

from .core.address import Address, AddressError
from .core.nodes import ROLES, SERVICES
from .gossip.messages import MAX_META

#: Most gossip keys a node holds at once (their ids travel in the metadata).
MAX_KEYS = 8


#: How a master reaches a backend service: plain TCP, STARTTLS, or TLS from the first byte.
TRANSPORTS = ("plain", "starttls", "tls")
#: How the backend learns the client's address: not at all, IMAP ID (RFC 2971, Dovecot's
#: x-originating-ip), Postfix XCLIENT, or a PROXY protocol v2 header.
CLIENT_ADDRESS = ("none", "id", "xclient", "proxy")


def _check_address(instance, attribute, value) -> None:
    try:
        Address.parse(value)
    except AddressError as exc:
        raise ValueError(f"endpoint: {exc}") from None


@attrs.frozen
class Endpoint:
    """One service a node offers: where, over which transport, how it takes the client's
    address, and whether the node's last health probe found it answering."""

    address: str = attrs.field(validator=_check_address)
    transport: str = attrs.field(default="plain", validator=v.in_(TRANSPORTS))
    client_address: str = attrs.field(default="none", validator=v.in_(CLIENT_ADDRESS))
    up: bool = attrs.field(default=True, validator=v.instance_of(bool))

    def wire(self) -> list:
        return [self.address, self.transport, self.client_address, self.up]

    @classmethod
    def from_wire(cls, obj: object) -> Endpoint:
        """From wire() or a bare "host:port" (older nodes); raises ValueError or TypeError."""
        if isinstance(obj, str):
            return cls(obj)
        if isinstance(obj, list | tuple) and 1 <= len(obj):
            return cls(*obj[:4])
        raise ValueError(f"not an endpoint: {obj!r}"[:100])


def _endpoints(value: object) -> dict[str, Endpoint]:
    """Endpoints from {service: Endpoint or "host:port"}; checks the service names."""
    endpoints = {}
    for service, endpoint in dict(value).items():
        if service not in SERVICES:
            raise ValueError(f"unknown service {service!r} (known: {', '.join(SERVICES)})")
        endpoints[service] = endpoint if isinstance(endpoint, Endpoint) else Endpoint.from_wire(endpoint)
    return endpoints


@attrs.frozen
class NodeMeta:
    role: str = attrs.field(default="master", validator=v.in_(ROLES))
    endpoints: dict[str, Endpoint] = attrs.field(factory=dict, converter=_endpoints)
    tags: dict[str, str] = attrs.field(factory=dict, validator=v.deep_mapping(v.instance_of(str), v.instance_of(str)))
    #: Ids of the gossip keys this node holds, primary first (for `meshmail keyring list`).
    keys: tuple[str, ...] = attrs.field(
        default=(),
        converter=tuple,
        validator=v.deep_iterable(v.and_(v.instance_of(str), v.max_len(16)), v.max_len(MAX_KEYS)),
    )
    #: Where this node's HTTP API answers (host:port; TLS when the cluster has a CA).
    api: str = attrs.field(default="", validator=[v.instance_of(str), v.max_len(300)])
    #: Where this master keeps shadow copies of other masters' queued mail (host:port).
    shadow: str = attrs.field(default="", validator=[v.instance_of(str), v.max_len(300)])
    #: Leaving: its client sessions are ending, new clients should go to another master.
    draining: bool = attrs.field(default=False, validator=v.instance_of(bool))

    def encode(self) -> bytes:
        """The wire form; raises ValueError when it is larger than 1 KiB."""
        endpoints = {service: endpoint.wire() for service, endpoint in self.endpoints.items()}
        fields = {"role": self.role, "endpoints": endpoints, "tags": self.tags}
        if self.keys:
            fields["keys"] = list(self.keys)
        if self.api:
            fields["api"] = self.api
        if self.shadow:
            fields["shadow"] = self.shadow
        if self.draining:
            fields["draining"] = True
        data = msgpack.packb(fields, use_bin_type=True)
        if len(data) > MAX_META:
            raise ValueError(f"node metadata is {len(data)} bytes; the limit is {MAX_META}")
        return data

    @classmethod
    def decode(cls, data: bytes) -> NodeMeta:
        """Read metadata gossiped by a member; anything unreadable gives NodeMeta()."""
        try:
            obj = msgpack.unpackb(data, raw=False) if data else {}
            return cls(
                role=obj.get("role", "master"),
                endpoints=dict(obj.get("endpoints", {})),
                tags=dict(obj.get("tags", {})),
                keys=obj.get("keys", ()),
                api=obj.get("api", ""),
                shadow=obj.get("shadow", ""),
                draining=obj.get("draining", False) is True,
            )
        except Exception:
            return cls()
