"""Routing: which slave, at which endpoint, serves a mail address for a protocol.

A pure lookup over the replicated cluster state and this node's view of the members:
address override, then domain, then the slave's member record and its published endpoint.
No I/O and no network; what to do with a NoRoute (bounce, spool, retry) is the caller's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Protocol

import attrs

from meshmail.core.address import Address, AddressError
from meshmail.gossip.member import MemberInfo
from meshmail.gossip.messages import State
from meshmail.nodemeta import SERVICES, Endpoint, NodeMeta
from meshmail.state.names import MAX_INPUT, InvalidName, normalize_address
from meshmail.state.records import AddressOverride, DomainRoute

#: NoRoute reasons: part of the API (the proxies map them to replies, /status counts them).
INVALID_ADDRESS = "invalid_address"
UNKNOWN_DOMAIN = "unknown_domain"
SLAVE_UNKNOWN = "slave_unknown"  # the state names a slave that is not in the member list
SLAVE_DOWN = "slave_down"  # the slave is dead or has left
NO_ENDPOINT = "no_endpoint"  # the slave publishes no usable endpoint for the protocol
SERVICE_DOWN = "service_down"  # the slave's own health probe finds that service not answering
REASONS = (INVALID_ADDRESS, UNKNOWN_DOMAIN, SLAVE_UNKNOWN, SLAVE_DOWN, NO_ENDPOINT, SERVICE_DOWN)

#: Normalized addresses kept, by the text as given. An entry holds at most MAX_INPUT
#: characters of input plus its result, so the cache stays within a few tens of MB even
#: when filled with the longest names; typical addresses use a few hundred bytes each.
NORMALIZED_CACHE = 1 << 14
#: Members whose parsed endpoints are kept; far above any real cluster. Beyond it the
#: cache starts afresh rather than grow with names that come and go.
ENDPOINT_CACHE = 1 << 12

# Suspect still routes: a suspect member is usually alive (a lost probe, a busy host), and
# refusing it would bounce or spool mail during every blip. Dead and left members do not.
_DOWN = frozenset((State.DEAD, State.LEFT))
_SERVICES = frozenset(SERVICES)


class StateView(Protocol):
    """What routing reads from the cluster state: O(1) lookups by already-normalized name."""

    def domain(self, name: str) -> DomainRoute | None: ...

    def override(self, address: str) -> AddressOverride | None: ...


@attrs.frozen
class Route:
    """Where to send a connection: the slave's node name, its (host, port), its state, and
    how to talk to that endpoint (meta.TRANSPORTS, meta.CLIENT_ADDRESS)."""

    slave: str
    endpoint: tuple[str, int]
    state: State
    transport: str = "plain"
    client_address: str = "none"


@attrs.frozen
class NoRoute:
    """Why an address cannot be routed: `reason` is one of REASONS, `detail` is for people,
    `slave` the slave the address belongs to when the state names one (mail for it can wait)."""

    reason: str
    detail: str
    slave: str = ""


class Router:
    """Resolves mail addresses to routes over a StateView and a view of the members.

    `members` is a mapping or a function from node name to MemberInfo (None when unknown).
    Endpoints are parsed once per member incarnation and metadata; normalized addresses are
    kept in a bounded cache, so resolve does no parsing for addresses seen recently.
    """

    def __init__(self, state: StateView, members: Callable[[str], MemberInfo | None] | Mapping[str, MemberInfo]):
        self._state = state
        self._member: Callable[[str], MemberInfo | None] = members.get if isinstance(members, Mapping) else members
        # name -> (incarnation, meta, {service: (Endpoint, (host, port)) or why it is unusable})
        self._endpoints: dict[str, tuple[int, bytes, dict[str, tuple[Endpoint, tuple[str, int]] | str]]] = {}

    def resolve(self, address: str, protocol: str) -> Route | NoRoute:
        """Return the Route for `address` over `protocol` (one of meta.SERVICES), or a NoRoute.

        An address override beats the domain entry. A slave that is alive or suspect routes;
        dead or left gives NoRoute(SLAVE_DOWN). Never raises for any address text; raises
        ValueError for an unknown protocol, which is a programming error.
        """
        if protocol not in _SERVICES:
            raise ValueError(f"unknown protocol {protocol!r} (known: {', '.join(SERVICES)})")
        normal = _normalize(address) if len(address) <= MAX_INPUT else _normalize_uncached(address)
        if type(normal) is str:
            return NoRoute(INVALID_ADDRESS, normal)
        key, domain = normal
        override = self._state.override(key)
        if override is not None:
            slave = override.slave
        else:
            entry = self._state.domain(domain)
            if entry is None:
                return NoRoute(UNKNOWN_DOMAIN, f"no slave hosts {domain}")
            slave = entry.slave
        return self._to(slave, protocol, f"slave {slave} of {key}")

    def route_to(self, slave: str, protocol: str, *, unprobed: bool = False) -> Route | NoRoute:
        """The Route to `slave` over `protocol` (for mail kept for it), or why there is none.
        With `unprobed` an endpoint the slave's health probe publishes as down routes too (for
        a caller that checks it itself)."""
        if protocol not in _SERVICES:
            raise ValueError(f"unknown protocol {protocol!r} (known: {', '.join(SERVICES)})")
        return self._to(slave, protocol, f"slave {slave}", unprobed)

    def _to(self, slave: str, protocol: str, who: str, unprobed: bool = False) -> Route | NoRoute:
        member = self._member(slave)
        if member is None:
            self._endpoints.pop(slave, None)
            return NoRoute(SLAVE_UNKNOWN, f"{who} is not a member of the cluster", slave)
        state = member.state
        if state in _DOWN:
            return NoRoute(SLAVE_DOWN, f"{who} is {state.name.lower()}", slave)
        cached = self._endpoints.get(slave)
        if cached is None or cached[0] != member.incarnation or cached[1] != member.meta:
            cached = self._parse(member)
        found = cached[2].get(protocol)
        if type(found) is not tuple:
            why = found or "publishes none"
            return NoRoute(NO_ENDPOINT, f"slave {slave} has no {protocol} endpoint: {why}", slave)
        endpoint, address = found
        if not endpoint.up and not unprobed:
            return NoRoute(
                SERVICE_DOWN, f"the {protocol} service of slave {slave} does not answer its health probe", slave
            )
        return Route(slave, address, state, endpoint.transport, endpoint.client_address)

    def _parse(self, member: MemberInfo) -> tuple[int, bytes, dict[str, tuple[Endpoint, tuple[str, int]] | str]]:
        """Parse and cache a member's endpoints; the metadata is decoded leniently."""
        endpoints: dict[str, tuple[Endpoint, tuple[str, int]] | str] = {}
        for service, endpoint in NodeMeta.decode(member.meta).endpoints.items():
            try:
                endpoints[service] = (endpoint, Address.parse(endpoint.address))
            except AddressError as exc:
                endpoints[service] = str(exc)
        if len(self._endpoints) >= ENDPOINT_CACHE:
            self._endpoints.clear()
        cached = self._endpoints[member.name] = (member.incarnation, member.meta, endpoints)
        return cached


def _normalize_uncached(address: str) -> tuple[str, str] | str:
    """(normalized address, its domain), or the InvalidName reason as a str."""
    try:
        normal = normalize_address(address)
    except InvalidName as e:
        return str(e)
    return (str(normal), normal.domain)


_normalize = functools.lru_cache(maxsize=NORMALIZED_CACHE)(_normalize_uncached)
