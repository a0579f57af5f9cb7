"""The PROXY protocol v2 header (HAProxy's proxy-protocol.txt, section 2.2): the binary preamble
that tells a backend which client address a proxied TCP connection comes from.

`build` writes one for TCP over IPv4 or IPv6 (or the LOCAL command); `parse` reads one strictly,
refusing a bad prefix as soon as it arrives. No sockets here.
"""

from __future__ import annotations

import ipaddress

import attrs

from .common import ProtocolError

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Signature, version/command, family/protocol, length.
HEADER_SIZE = len(SIGNATURE) + 4
#: Longest address block accepted by `parse` (addresses and TLVs); the format allows 65535.
MAX_BODY = 1024

_VERSION = 0x20
_LOCAL, _PROXY = 0x0, 0x1
#: family/protocol byte -> (address size in bytes, address class).
_FAMILIES: dict[int, tuple[int, type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]]] = {
    0x11: (4, ipaddress.IPv4Address),  # TCP over IPv4
    0x21: (16, ipaddress.IPv6Address),  # TCP over IPv6
}
_UNSPEC = 0x00

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@attrs.frozen
class ProxyHeader:
    """A parsed header. `source` and `destination` are (address, port), both None for the
    LOCAL command (a health check or the proxy's own connection). `tlvs` are the
    (type, value) extensions that followed the addresses, in order."""

    source: tuple[IPAddress, int] | None
    destination: tuple[IPAddress, int] | None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    @property
    def local(self) -> bool:
        return self.source is None


def _error(message: str) -> ProtocolError:
    # A receiver of a bad header has nobody to answer: it closes.
    return ProtocolError(f"PROXY v2 header: {message}", close=True)


def build(source: tuple[str | IPAddress, int], destination: tuple[str | IPAddress, int]) -> bytes:
    """The header announcing a TCP connection from `source` to `destination`, each (address,
    port). When one address is IPv6 and the other IPv4, the IPv4 one is sent IPv4-mapped, as
    HAProxy does. Raises ValueError for a bad address or port."""
    (src, src_port), (dst, dst_port) = (_endpoint(*source), _endpoint(*destination))
    if src.version != dst.version:
        src, dst = (ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a for a in (src, dst))
    family = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + src_port.to_bytes(2, "big") + dst_port.to_bytes(2, "big")
    return SIGNATURE + bytes([_VERSION | _PROXY, family]) + len(body).to_bytes(2, "big") + body


def build_local() -> bytes:
    """The LOCAL header: "no client address, use the connection's own"."""
    return SIGNATURE + bytes([_VERSION | _LOCAL, _UNSPEC]) + b"\0\0"


def _endpoint(address: str | IPAddress, port: int) -> tuple[IPAddress, int]:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    return ipaddress.ip_address(address), port


def parse(data: bytes, max_body: int = MAX_BODY) -> tuple[ProxyHeader, int] | None:
    """The header at the start of `data` and its size in bytes, or None while it is incomplete.
    Raises ProtocolError (close=True, no reply) as soon as the bytes received cannot start a
    valid header: wrong signature, version, command, family or protocol, or a body longer
    than `max_body`, shorter than its addresses, or with malformed TLVs."""
    prefix = data[: len(SIGNATURE)]
    if not SIGNATURE.startswith(prefix):
        raise _error("bad signature")
    if len(data) < HEADER_SIZE:
        _check_fixed(data[len(SIGNATURE) :])
        return None
    command, family = _check_fixed(data[len(SIGNATURE) : HEADER_SIZE])
    length = int.from_bytes(data[HEADER_SIZE - 2 : HEADER_SIZE], "big")
    if length > max_body:
        raise _error(f"address block of {length} bytes exceeds {max_body}")
    if family != _UNSPEC and length < 2 * _FAMILIES[family][0] + 4:
        raise _error(f"address block of {length} bytes too short for its family")
    if len(data) < HEADER_SIZE + length:
        return None
    body = data[HEADER_SIZE : HEADER_SIZE + length]
    if command == _LOCAL:
        return ProxyHeader(None, None), HEADER_SIZE + length  # the body is ignored, as the spec says
    size, address = _FAMILIES[family]
    source = address(body[:size]), int.from_bytes(body[2 * size : 2 * size + 2], "big")
    destination = address(body[size : 2 * size]), int.from_bytes(body[2 * size + 2 : 2 * size + 4], "big")
    return ProxyHeader(source, destination, _tlvs(body[2 * size + 4 :])), HEADER_SIZE + length


def _check_fixed(fixed: bytes) -> tuple[int, int]:
    """Checks the version/command and family/protocol bytes received so far."""
    command = family = _UNSPEC
    if fixed:
        if fixed[0] >> 4 != _VERSION >> 4:
            raise _error(f"version {fixed[0] >> 4}, not 2")
        command = fixed[0] & 0x0F
        if command not in (_LOCAL, _PROXY):
            raise _error(f"unknown command {command}")
    if len(fixed) > 1:
        family = fixed[1]
        # LOCAL may carry any family (it is ignored); PROXY must be TCP over IPv4 or IPv6.
        if command == _PROXY and family not in _FAMILIES:
            raise _error(f"unsupported family/protocol 0x{family:02x} (only TCP over IPv4 or IPv6)")
        if command == _LOCAL and family not in (_UNSPEC, *_FAMILIES):
            raise _error(f"unknown family/protocol 0x{family:02x}")
        if command == _LOCAL:
            family = _UNSPEC
    return command, family


def _tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    found, offset = [], 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise _error("truncated TLV")
        kind, size = data[offset], int.from_bytes(data[offset + 1 : offset + 3], "big")
        if offset + 3 + size > len(data):
            raise _error("TLV longer than the address block")
        found.append((kind, data[offset + 3 : offset + 3 + size]))
        offset += 3 + size
    return tuple(found)
