"""The metadata every member gossips about itself: role, service endpoints, tags.

Encoded with msgpack into at most 1 KiB (the gossip layer carries it as opaque bytes).
Decoding is lenient: unknown keys are ignored, and metadata that cannot be read becomes
an empty NodeMeta rather than an error, so one odd member never breaks a view.
"""

from __future__ import annotations

import attrs
import msgpack
from attrs import validators as v

from .messages import MAX_META

ROLES = ("master", "slave")
SERVICES = ("imap", "pop3", "smtp", "submission", "lmtp", "http")


def _check_endpoints(instance, attribute, value) -> None:
    for service, endpoint in value.items():
        if service not in SERVICES:
            raise ValueError(f"unknown service {service!r} (known: {', '.join(SERVICES)})")
        host, sep, port = endpoint.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"endpoint {endpoint!r} of {service} is not host:port")


@attrs.frozen
class NodeMeta:
    role: str = attrs.field(default="master", validator=v.in_(ROLES))
    endpoints: dict[str, str] = attrs.field(
        factory=dict,
        validator=[v.deep_mapping(v.instance_of(str), v.instance_of(str)), _check_endpoints],
    )
    tags: dict[str, str] = attrs.field(factory=dict, validator=v.deep_mapping(v.instance_of(str), v.instance_of(str)))
    #: Ids of the gossip keys this node holds, primary first (for `meshmail keyring list`).
    keys: tuple[str, ...] = attrs.field(
        default=(), converter=tuple, validator=v.deep_iterable(v.instance_of(str), v.max_len(16))
    )

    #: Where this node's HTTP API answers (host:port; TLS when the cluster has a CA).
    api: str = attrs.field(default="", validator=[v.instance_of(str), v.max_len(300)])

    def encode(self) -> bytes:
        """The wire form; raises ValueError when it is larger than 1 KiB."""
        fields = {"role": self.role, "endpoints": self.endpoints, "tags": self.tags}
        if self.keys:
            fields["keys"] = list(self.keys)
        if self.api:
            fields["api"] = self.api
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
            )
        except Exception:
            return cls()
