"""One address type: ``host:port`` parsed, checked and formatted the same way everywhere.

A host is an IP literal or a DNS name; an IPv6 address is written in brackets
(``[::1]:143``), since ``::1:143`` could be port 143 of ::1 or an address with no port.
Address is a named tuple, so it goes wherever (host, port) does: sockets, msgpack, trio.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import NamedTuple

from .errors import MeshmailError

#: The longest ``host:port`` text read (a DNS name is at most 253 characters).
MAX_TEXT = 300
#: A DNS name: labels of letters, digits and hyphens, not starting or ending with a hyphen.
HOSTNAME = re.compile(r"(?=.{1,253}\Z)(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*", re.ASCII)


class AddressError(MeshmailError, ValueError):
    """Text that is not a usable address; str() says why, for people."""


def is_ip(host: str) -> bool:
    """Whether `host` is an IPv4 or IPv6 literal (without brackets)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_host(host: object) -> bool:
    """Whether `host` is an IP literal (IPv6 without brackets) or a DNS name."""
    return isinstance(host, str) and (is_ip(host) or HOSTNAME.fullmatch(host) is not None)


class Address(NamedTuple):
    """A (host, port) pair; host is an IP literal or a DNS name, never bracketed."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: object, *, port_zero: bool = False, ip: bool = False) -> Address:
        """Read ``host:port`` (``[v6]:port``). Port 0 ("any free port", for binding) only
        with `port_zero`; `ip` requires an IP literal. Raises AddressError."""
        if not isinstance(text, str):
            raise AddressError(f'expected a string "host:port", got {type(text).__name__}')
        shown = repr(text[:80])
        if len(text) > MAX_TEXT:
            raise AddressError(f"{shown}... is longer than {MAX_TEXT} characters")
        host, sep, port_text = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            if ":" not in host or not is_ip(host):
                raise AddressError(f"{shown}: {host[:80]!r} is not an IP address (brackets hold an IPv6 address)")
        elif ":" in host:
            raise AddressError(f"{shown}: write an IPv6 address in brackets, like [::1]:7946")
        if not sep or not host or not port_text.isascii() or not port_text.isdigit():
            raise AddressError(f"{shown} is not host:port")
        if not is_host(host):
            raise AddressError(f"{shown}: {host[:80]!r} is not an IP address or a DNS name")
        if ip and not is_ip(host):
            raise AddressError(f"{shown}: {host[:80]!r} is not an IP address")
        return cls(host, check_port(int(port_text), port_zero=port_zero, shown=shown))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def unspecified(self) -> bool:
        """Whether the host is 0.0.0.0 or :: (every interface)."""
        return is_ip(self.host) and ipaddress.ip_address(self.host).is_unspecified


def check_port(port: int, *, port_zero: bool = False, shown: str = "port") -> int:
    """`port` if it is 1..65535 (0..65535 with `port_zero`); raises AddressError."""
    lowest = 0 if port_zero else 1
    if not lowest <= port <= 65535:
        raise AddressError(f"{shown}: port must be {lowest}..65535")
    return port


def format_address(address: tuple[str, int]) -> str:
    """The ``host:port`` text of any (host, port) pair, IPv6 hosts in brackets."""
    return str(Address(*address))


def socket_address(sockaddr: tuple) -> tuple[str, int]:
    """(host, port) of a socket address, an IPv4-mapped IPv6 host shown as plain IPv4."""
    host = sockaddr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, sockaddr[1]


@functools.lru_cache(maxsize=4096)  # asked for every proxied session's client
def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback IP address (a name never is)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
