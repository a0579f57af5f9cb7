"""Gossip wire messages and their one msgpack codec.

Each message is a frozen attrs record with a type number. Type numbers are part of the
protocol and append-only. On the wire a message is ``[type, {field: value}]``; unknown
fields are ignored and unknown types decode to None, so newer nodes can add both without
breaking older ones. Anything else that is wrong raises MalformedMessage.
"""

from __future__ import annotations

import enum
import ipaddress
from typing import Any, ClassVar

import attrs
import msgpack
from attrs import validators as v

#: Version of the message set; carried in every packet and stream frame header.
PROTOCOL_VERSION = 1

MAX_NAME = 128
MAX_HOST = 255
MAX_META = 1024
MAX_EXTENSION = 4 << 20


class MalformedMessage(ValueError):
    """Bytes or a decoded object that is not a valid message."""


class State(enum.IntEnum):
    """A member's state as this node sees it. Values are on the wire (push-pull)."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


_name = attrs.field(validator=[v.instance_of(str), v.max_len(MAX_NAME), v.min_len(1)])
_seq = attrs.field(validator=[v.instance_of(int), v.ge(0), v.lt(1 << 63)])
_incarnation = attrs.field(validator=[v.instance_of(int), v.ge(0), v.lt(1 << 63)])


def _ip_literal(instance, attribute, value: str) -> None:
    # Hosts on the wire are IP literals: a name would make every send a DNS lookup.
    ipaddress.ip_address(value)


_host = attrs.field(validator=[v.instance_of(str), v.max_len(MAX_HOST), _ip_literal])
_port = attrs.field(validator=[v.instance_of(int), v.ge(1), v.le(65535)])
_meta = attrs.field(default=b"", validator=[v.instance_of(bytes), v.max_len(MAX_META)])


@attrs.frozen
class Ping:
    """Direct probe. `node` is the target's name so a reused address is not confused."""

    TYPE: ClassVar[int] = 1
    seq: int = _seq
    node: str = _name
    source: str = _name
    source_host: str = _host
    source_port: int = _port


@attrs.frozen
class IndirectPing:
    """Ask the receiver to probe `node` at host:port for us; nack if it gets no ack."""

    TYPE: ClassVar[int] = 2
    seq: int = _seq
    node: str = _name
    host: str = _host
    port: int = _port
    source: str = _name
    source_host: str = _host
    source_port: int = _port
    nack: bool = attrs.field(default=True, validator=v.instance_of(bool))


@attrs.frozen
class Ack:
    TYPE: ClassVar[int] = 3
    seq: int = _seq


@attrs.frozen
class Nack:
    TYPE: ClassVar[int] = 4
    seq: int = _seq


@attrs.frozen
class Suspect:
    TYPE: ClassVar[int] = 5
    incarnation: int = _incarnation
    node: str = _name
    source: str = _name


@attrs.frozen
class Alive:
    TYPE: ClassVar[int] = 6
    incarnation: int = _incarnation
    node: str = _name
    host: str = _host
    port: int = _port
    meta: bytes = _meta


@attrs.frozen
class Dead:
    """`node` failed, or left when `source == node`."""

    TYPE: ClassVar[int] = 7
    incarnation: int = _incarnation
    node: str = _name
    source: str = _name

    @property
    def is_leave(self) -> bool:
        return self.source == self.node


@attrs.frozen
class MemberState:
    """One member as carried in a push-pull exchange."""

    TYPE: ClassVar[int] = 8
    node: str = _name
    host: str = _host
    port: int = _port
    incarnation: int = _incarnation
    state: int = attrs.field(validator=[v.instance_of(int), v.in_(tuple(State))])
    meta: bytes = _meta


@attrs.frozen
class PushPull:
    """Full state exchange over TCP; `extension` is the slot for replicated cluster state."""

    TYPE: ClassVar[int] = 9
    join: bool = attrs.field(validator=v.instance_of(bool))
    members: tuple = attrs.field(converter=tuple, validator=v.deep_iterable(v.instance_of(MemberState)))
    extension: bytes = attrs.field(default=b"", validator=[v.instance_of(bytes), v.max_len(MAX_EXTENSION)])


@attrs.frozen
class Broadcast:
    """An application broadcast riding the gossip queue (replication puts state deltas here).

    `key` names what the payload is about, so a newer broadcast with the same key replaces
    an older one still queued.
    """

    TYPE: ClassVar[int] = 10
    key: str = attrs.field(validator=[v.instance_of(str), v.max_len(256)])
    payload: bytes = attrs.field(validator=[v.instance_of(bytes), v.max_len(1 << 16)])


@attrs.frozen
class StateSync:
    """One message of the replicated-state exchange that follows a push-pull on its stream."""

    TYPE: ClassVar[int] = 11
    payload: bytes = attrs.field(validator=[v.instance_of(bytes), v.max_len(MAX_EXTENSION)])


@attrs.frozen
class Refused:
    """Sent to a member whose gossip is refused (it was removed from the cluster), so that
    it knows: `node` is the receiver's own name."""

    TYPE: ClassVar[int] = 12
    node: str = _name


Message = Ping | IndirectPing | Ack | Nack | Suspect | Alive | Dead | PushPull | Broadcast | StateSync | Refused

_BY_TYPE: dict[int, type] = {
    cls.TYPE: cls
    for cls in (
        Ping,
        IndirectPing,
        Ack,
        Nack,
        Suspect,
        Alive,
        Dead,
        MemberState,
        PushPull,
        Broadcast,
        StateSync,
        Refused,
    )
}
_FIELDS: dict[type, tuple[str, ...]] = {cls: tuple(f.name for f in attrs.fields(cls)) for cls in _BY_TYPE.values()}


def to_wire(msg: Any) -> list:
    """The msgpack-ready form ``[type, {field: value}]`` of a message."""
    body = {}
    for name in _FIELDS[type(msg)]:
        value = getattr(msg, name)
        if isinstance(value, tuple):
            value = [to_wire(item) for item in value]
        elif isinstance(value, enum.IntEnum):
            value = int(value)
        body[name] = value
    return [msg.TYPE, body]


def from_wire(obj: Any) -> Any | None:
    """Build a message from its wire form; None for an unknown type (ignored by design).

    Raises MalformedMessage for anything that is not ``[int, map]`` with valid fields.
    """
    if not isinstance(obj, (list, tuple)) or len(obj) != 2:
        raise MalformedMessage("message is not a [type, body] pair")
    type_id, body = obj
    if not isinstance(type_id, int) or not isinstance(body, dict):
        raise MalformedMessage("message type or body has the wrong type")
    cls = _BY_TYPE.get(type_id)
    if cls is None:
        return None
    kwargs = {name: body[name] for name in _FIELDS[cls] if name in body}
    if cls is PushPull and "members" in kwargs:
        members = kwargs["members"]
        if not isinstance(members, (list, tuple)):
            raise MalformedMessage("push-pull members is not a list")
        kwargs["members"] = [_expect(from_wire(item), MemberState) for item in members]
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise MalformedMessage(f"bad {cls.__name__}: {exc}") from None


def _expect(msg: Any, cls: type) -> Any:
    if not isinstance(msg, cls):
        raise MalformedMessage(f"expected {cls.__name__}")
    return msg


@attrs.frozen
class Header:
    """What precedes the messages of every packet and stream frame (inside the envelope)."""

    version: int
    sent_ms: int
    sender: str


def pack(header: Header, messages: list[Any]) -> bytes:
    """Encode a header and messages into one plaintext body."""
    return msgpack.packb(
        [header.version, header.sent_ms, header.sender, [to_wire(m) for m in messages]],
        use_bin_type=True,
    )


def pack_wire(header: Header, wired: list[list]) -> bytes:
    """Like pack, for messages already in wire form (the broadcast queue keeps them so)."""
    return msgpack.packb([header.version, header.sent_ms, header.sender, wired], use_bin_type=True)


def unpack(data: bytes, max_messages: int = 256) -> tuple[Header, list[Any], int]:
    """Decode a plaintext body into its header, the messages of known types, and how
    many messages of unknown types were skipped.

    Raises MalformedMessage for bad msgpack, a bad header, or too many messages.
    """
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_array_len=max(max_messages, 1 << 20),
            max_map_len=64,
        )
    except Exception as exc:  # msgpack raises a handful of unrelated types
        raise MalformedMessage(f"bad msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, list) or len(obj) != 4:
        raise MalformedMessage("body is not [version, sent_ms, sender, messages]")
    version, sent_ms, sender, wired = obj
    if not isinstance(version, int) or not isinstance(sent_ms, int) or not isinstance(sender, str):
        raise MalformedMessage("bad header")
    if version < 1:
        raise MalformedMessage("bad protocol version")
    if not isinstance(wired, list) or len(wired) > max_messages:
        raise MalformedMessage("bad message list")
    decoded = [from_wire(w) for w in wired]
    messages = [m for m in decoded if m is not None]
    return Header(version, sent_ms, sender), messages, len(decoded) - len(messages)


def wire_size(wired: list) -> int:
    """Bytes the wire form of one message takes inside a packet."""
    return len(msgpack.packb(wired, use_bin_type=True))
