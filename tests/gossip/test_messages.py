"""The gossip message codec (meshmail.gossip.messages) and node metadata (meta.NodeMeta).

h11-style: every message type round-trips whole; a body cut at every byte offset and a
body with trailing bytes are rejected; a table of bad inputs is rejected early with
MalformedMessage; unknown fields and unknown types are tolerated (rolling upgrades).
"""

from __future__ import annotations

import msgpack
import pytest

from meshmail.gossip import messages as m
from meshmail.gossip.messages import MalformedMessage, State
from meshmail.nodemeta import NodeMeta

#: The longest textual IP address: hosts on the wire are IP literals.
LONGEST_IP = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"

HEADER = m.Header(m.PROTOCOL_VERSION, 1_700_000_000_000, "node-a")

MEMBER = m.MemberState("node-b", "10.0.0.2", 7946, 3, int(State.SUSPECT), b"\x81\xa4role\xa5slave")

#: One instance of every message type, with non-default values where there is a choice.
EVERY_MESSAGE = [
    m.Ping(1, "node-b", "node-a", "10.0.0.1", 7946),
    m.IndirectPing(2, "node-c", "10.0.0.3", 7946, "node-a", "10.0.0.1", 7946, nack=False),
    m.Ack(3),
    m.Nack((1 << 63) - 1),
    m.Suspect(4, "node-b", "node-a"),
    m.Alive(5, "node-a", "::1", 65535, b"x" * m.MAX_META),
    m.Dead(6, "node-b", "node-a"),
    m.Dead(7, "node-b", "node-b"),
    MEMBER,
    m.PushPull(True, [MEMBER, m.MemberState("n" * m.MAX_NAME, LONGEST_IP, 65535, 0, int(State.LEFT))], b"ext"),
    m.PushPull(False, []),
    m.Broadcast("app/key", b"\x00\xff" * 100),
    m.StateSync(b"\x00" * 1000),
    m.Refused("node-b"),
]


@pytest.mark.parametrize("message", EVERY_MESSAGE, ids=lambda x: type(x).__name__)
def test_round_trip_each_message(message) -> None:
    """pack then unpack gives back the header and the equal message."""
    header, decoded, _ = m.unpack(m.pack(HEADER, [message]))
    assert header == HEADER
    assert decoded == [message]
    assert type(decoded[0]) is type(message)


def test_round_trip_all_messages_in_one_body() -> None:
    """A compound body keeps every message and their order; pack_wire is the same encoding."""
    body = m.pack(HEADER, EVERY_MESSAGE)
    assert body == m.pack_wire(HEADER, [m.to_wire(x) for x in EVERY_MESSAGE])
    assert m.unpack(body) == (HEADER, EVERY_MESSAGE, 0)


def test_wire_form_and_wire_size() -> None:
    """The wire form is [type, {field: value}] and wire_size is its msgpack length."""
    wired = m.to_wire(m.Suspect(4, "b", "a"))
    assert wired == [5, {"incarnation": 4, "node": "b", "source": "a"}]
    assert m.wire_size(wired) == len(msgpack.packb(wired, use_bin_type=True))
    assert m.to_wire(m.PushPull(True, [MEMBER]))[1]["members"] == [m.to_wire(MEMBER)]


def test_type_numbers_are_append_only() -> None:
    """Type numbers are protocol: the ones already shipped never change."""
    shipped = {
        m.Ping: 1, m.IndirectPing: 2, m.Ack: 3, m.Nack: 4, m.Suspect: 5,
        m.Alive: 6, m.Dead: 7, m.MemberState: 8, m.PushPull: 9, m.Broadcast: 10,
    }
    assert {cls: cls.TYPE for cls in shipped} == shipped
    assert [int(s) for s in State] == [0, 1, 2, 3]


def test_unknown_fields_are_ignored() -> None:
    """A newer node's extra fields do not stop an older node from reading the message."""
    wired = m.to_wire(m.Ping(1, "b", "a", "10.0.0.1", 1))
    wired[1]["zone"] = "eu-west"
    wired[1]["weight"] = [1, 2, {"x": b"y"}]
    assert m.from_wire(wired) == m.Ping(1, "b", "a", "10.0.0.1", 1)
    member = m.to_wire(MEMBER)
    member[1]["future"] = 1
    push_pull = [m.PushPull.TYPE, {"join": True, "members": [member], "extension": b"", "compressed": False}]
    assert m.from_wire(push_pull) == m.PushPull(True, [MEMBER])


def test_optional_fields_take_their_defaults() -> None:
    """Fields added later with defaults (meta, nack, extension) may be absent on the wire."""
    assert m.from_wire([6, {"incarnation": 1, "node": "a", "host": "10.0.0.1", "port": 1}]).meta == b""
    assert m.from_wire(
        [2, {"seq": 1, "node": "b", "host": "10.0.0.2", "port": 1,
             "source": "a", "source_host": "10.0.0.1", "source_port": 2}]
    ).nack is True
    assert m.from_wire([9, {"join": False, "members": []}]).extension == b""


@pytest.mark.parametrize("type_id", [0, 13, 99, 255, -1, (1 << 64) - 1])
def test_unknown_types_are_skipped(type_id: int) -> None:
    """An unknown type decodes to None and is left out of unpack's list, its neighbours kept."""
    assert m.from_wire([type_id, {"anything": 1}]) is None
    body = m.pack_wire(HEADER, [m.to_wire(m.Ack(1)), [type_id, {"x": 1}], m.to_wire(m.Nack(2))])
    assert m.unpack(body) == (HEADER, [m.Ack(1), m.Nack(2)], 1)
    assert m.unpack(m.pack_wire(HEADER, [[type_id, {}]])) == (HEADER, [], 1)


def _ping(**changes) -> list:
    body = {"seq": 1, "node": "b", "source": "a", "source_host": "10.0.0.1", "source_port": 7946}
    body.update(changes)
    return [m.Ping.TYPE, body]


def _alive(**changes) -> list:
    body = {"incarnation": 1, "node": "b", "host": "10.0.0.2", "port": 7946, "meta": b""}
    body.update(changes)
    return [m.Alive.TYPE, body]


def _member(**changes) -> list:
    wired = m.to_wire(MEMBER)
    wired[1].update(changes)
    return wired


BAD_WIRE = {
    "not a list": {"type": 1},
    "empty list": [],
    "three items": [1, {}, {}],
    "type is a string": ["1", {}],
    "type is a float": [1.0, {}],
    "type is None": [None, {}],
    "body is a list": [1, [1, "b", "a", "h", 1]],
    "body is bytes": [3, b"\x81"],
    "missing field": [m.Ack.TYPE, {}],
    "missing node": [1, {k: v for k, v in _ping()[1].items() if k != "node"}],
    "missing port": [6, {k: v for k, v in _alive()[1].items() if k != "port"}],
    "seq is a string": _ping(seq="1"),
    "seq is a float": _ping(seq=1.0),
    "seq is negative": _ping(seq=-1),
    "seq is 2**63": _ping(seq=1 << 63),
    "node is bytes": _ping(node=b"b"),
    "node is empty": _ping(node=""),
    "node too long": _ping(node="n" * (m.MAX_NAME + 1)),
    "host too long": _ping(source_host="h" * (m.MAX_HOST + 1)),
    "host is None": _ping(source_host=None),
    "host is a name, not an IP": _ping(source_host="mail.example.com"),
    "port 0": _ping(source_port=0),
    "port negative": _ping(source_port=-1),
    "port 65536": _ping(source_port=65536),
    "port is a string": _ping(source_port="7946"),
    "negative incarnation": _alive(incarnation=-1),
    "incarnation 2**63": _alive(incarnation=1 << 63),
    "meta over 1 KiB": _alive(meta=b"x" * (m.MAX_META + 1)),
    "meta is a string": _alive(meta="role=master"),
    "nack is an int": [2, {**m.to_wire(EVERY_MESSAGE[1])[1], "nack": 1}],
    "suspect source empty": [5, {"incarnation": 1, "node": "b", "source": ""}],
    "member state 4": _member(state=4),
    "member state -1": _member(state=-1),
    "member state a string": _member(state="alive"),
    "push-pull members a map": [9, {"join": True, "members": {}}],
    "push-pull members a string": [9, {"join": True, "members": "abc"}],
    "push-pull member not a pair": [9, {"join": True, "members": [[8]]}],
    "push-pull member an Ack": [9, {"join": True, "members": [m.to_wire(m.Ack(1))]}],
    "push-pull member unknown type": [9, {"join": True, "members": [[99, {}]]}],
    "push-pull member malformed": [9, {"join": True, "members": [_member(port=-5)]}],
    "push-pull join an int": [9, {"join": 1, "members": []}],
    "push-pull missing join": [9, {"members": []}],
    "push-pull extension over 4 MiB": [9, {"join": True, "members": [], "extension": b"x" * (m.MAX_EXTENSION + 1)}],
    "broadcast key too long": [10, {"key": "k" * 257, "payload": b""}],
    "broadcast payload over 64 KiB": [10, {"key": "k", "payload": b"x" * ((1 << 16) + 1)}],
    "broadcast payload a string": [10, {"key": "k", "payload": "text"}],
}


@pytest.mark.parametrize("wired", BAD_WIRE.values(), ids=BAD_WIRE.keys())
def test_malformed_wire_rejected(wired) -> None:
    """from_wire rejects every bad wire form with MalformedMessage, and so does unpack."""
    with pytest.raises(MalformedMessage):
        m.from_wire(wired)
    with pytest.raises(MalformedMessage):
        m.unpack(m.pack_wire(HEADER, [m.to_wire(m.Ack(1)), wired]))


def _raw(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


BAD_BODIES = {
    "empty": b"",
    "never-used byte 0xc1": b"\xc1",
    "not msgpack": b"GET / HTTP/1.1\r\n\r\n",
    "a map": _raw({"version": 1}),
    "an int": _raw(1),
    "three items": _raw([1, 2, "a"]),
    "five items": _raw([1, 2, "a", [], None]),
    "version a string": _raw(["1", 2, "a", []]),
    "sent_ms a float": _raw([1, 2.0, "a", []]),
    "sent_ms None": _raw([1, None, "a", []]),
    "sender bytes": _raw([1, 2, b"a", []]),
    "messages a map": _raw([1, 2, "a", {}]),
    "messages a string": _raw([1, 2, "a", "[]"]),
    "messages one message not in a list": _raw([1, 2, "a", m.to_wire(m.Ack(1))]),
    "257 messages": _raw([1, 2, "a", [m.to_wire(m.Ack(i)) for i in range(257)]]),
    "array claims 2**32-1 items": b"\x94\x01\x02\xa1a\xdd\xff\xff\xff\xff",
    "top array claims 2**32-1 items": b"\xdd\xff\xff\xff\xff",
    "map claims 2**32-1 entries": _raw([1, 2, "a", []])[:-1] + b"\x91\x92\x03\xdf\xff\xff\xff\xff",
    "map of 65 entries": _raw([1, 2, "a", [[3, {str(i): i for i in range(65)}]]]),
    "string claims 4 GiB": b"\x94\x01\x02\xdb\xff\xff\xff\xff",
    "integer map key": _raw([1, 2, "a", [[3, {1: 1}]]]),
    "message a bare int": _raw([1, 2, "a", [3]]),
    "message not a pair": _raw([1, 2, "a", [[3, {"seq": 1}, 0]]]),
    "trailing bytes": m.pack(HEADER, [m.Ack(1)]) + b"\x00",
    "two bodies back to back": m.pack(HEADER, [m.Ack(1)]) * 2,
    "ext type": _raw([1, 2, "a", [[3, {"seq": msgpack.ExtType(5, b"xx")}]]]),
    "bad timestamp ext": b"\x94\x01\x02\xa1a\x91\x92\x03\x81\xa3seq\xd6\xff\x00",
}


@pytest.mark.parametrize("data", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_malformed_body_rejected(data: bytes) -> None:
    """unpack rejects bad msgpack, a bad header and absurd counts with MalformedMessage only."""
    with pytest.raises(MalformedMessage):
        m.unpack(data)


def test_max_messages_is_respected() -> None:
    """unpack takes at most max_messages messages; exactly that many is fine."""
    body = m.pack(HEADER, [m.Ack(i) for i in range(10)])
    assert len(m.unpack(body, max_messages=10)[1]) == 10
    with pytest.raises(MalformedMessage):
        m.unpack(body, max_messages=9)


def test_body_truncated_at_every_offset_rejected() -> None:
    """A valid compound body cut at any byte offset is malformed, never a shorter message list."""
    body = m.pack(HEADER, EVERY_MESSAGE)
    for cut in range(len(body)):
        with pytest.raises(MalformedMessage):
            m.unpack(body[:cut])
    assert m.unpack(body)[1] == EVERY_MESSAGE


def test_body_with_trailing_data_rejected_at_every_length() -> None:
    """Any bytes after a complete body make it malformed (a body is exactly one msgpack object)."""
    body = m.pack(HEADER, [m.Ping(1, "b", "a", "10.0.0.1", 1)])
    for extra in (b"\x00", b"\xc0", b"\x90", body, b"\xff" * 100):
        with pytest.raises(MalformedMessage):
            m.unpack(body + extra)


def test_malformed_message_is_a_value_error() -> None:
    """Callers that catch ValueError also catch MalformedMessage."""
    assert issubclass(MalformedMessage, ValueError)


def test_dead_is_leave() -> None:
    """A Dead message is a leave when the member reports itself."""
    assert m.Dead(1, "a", "a").is_leave
    assert not m.Dead(1, "a", "b").is_leave


# ------------------------------------------------------------------ NodeMeta


def test_node_meta_round_trip() -> None:
    """encode then decode gives back role, endpoints and tags."""
    meta = NodeMeta(
        role="slave",
        endpoints={"imap": "10.0.0.5:143", "smtp": "[::1]:25", "http": "mail.example:8080"},
        tags={"dc": "par1", "rack": ""},
    )
    assert NodeMeta.decode(meta.encode()) == meta
    assert NodeMeta.decode(NodeMeta().encode()) == NodeMeta()


def test_node_meta_limit_is_one_kib() -> None:
    """Metadata up to 1024 encoded bytes is fine; one byte more raises ValueError naming the limit."""

    def size(length: int) -> int:
        return len(msgpack.packb({"role": "master", "endpoints": {}, "tags": {"t": "v" * length}}))

    length = next(n for n in range(1024) if size(n) == m.MAX_META)
    assert len(NodeMeta(tags={"t": "v" * length}).encode()) == m.MAX_META
    with pytest.raises(ValueError, match="1024"):
        NodeMeta(tags={"t": "v" * (length + 1)}).encode()


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",
        b"\xff\xff",
        msgpack.packb([1, 2, 3]),
        msgpack.packb("master"),
        msgpack.packb({"role": "admin"}),
        msgpack.packb({"role": "slave", "endpoints": {"ftp": "h:21"}}),
        msgpack.packb({"role": "slave", "endpoints": {"imap": "no-port"}}),
        msgpack.packb({"role": "slave", "endpoints": {"imap": "h:99999"}}),
        msgpack.packb({"role": "slave", "tags": {"a": 1}}),
        msgpack.packb({"role": "slave", "tags": [1, 2]}),
        msgpack.packb({"role": "slave"})[:-1],
    ],
)
def test_node_meta_decode_is_lenient(data: bytes) -> None:
    """Metadata that cannot be read as a whole becomes NodeMeta(), never an error."""
    assert NodeMeta.decode(data) == NodeMeta()


def test_node_meta_decode_ignores_unknown_keys_and_empty() -> None:
    """Unknown keys from newer members are ignored; empty metadata is the default."""
    data = msgpack.packb({"role": "slave", "tags": {"a": "b"}, "weight": 3, "zones": ["x"]})
    assert NodeMeta.decode(data) == NodeMeta(role="slave", tags={"a": "b"})
    assert NodeMeta.decode(b"") == NodeMeta()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"role": "admin"},
        {"endpoints": {"ftp": "h:21"}},
        {"endpoints": {"imap": "h"}},
        {"endpoints": {"imap": ":143"}},
        {"endpoints": {"imap": "h:0"}},
        {"endpoints": {"imap": "h:65536"}},
        {"endpoints": {"imap": "h:-1"}},
        {"endpoints": {"imap": 143}},
        {"tags": {"a": 1}},
        {"tags": {1: "a"}},
    ],
)
def test_node_meta_rejects_bad_values(kwargs) -> None:
    """Building metadata with an unknown role or service, or a bad endpoint, is refused at once."""
    with pytest.raises((TypeError, ValueError)):
        NodeMeta(**kwargs)
