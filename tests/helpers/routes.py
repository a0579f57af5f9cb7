"""Routing inputs for tests that run a proxy or an MX in one process: a fixed domain map and
slave member records (the replicated state and gossip are tested elsewhere)."""

from __future__ import annotations

from meshmail.gossip.member import MemberInfo
from meshmail.gossip.messages import State
from meshmail.nodemeta import Endpoint, NodeMeta
from meshmail.state.records import DomainRoute


class DomainMap:
    """A StateView of fixed domains (the state itself is tested elsewhere)."""

    def __init__(self, domains: dict[str, str]) -> None:
        self.domains = {domain: DomainRoute(slave=slave, source="slave") for domain, slave in domains.items()}

    def domain(self, name: str) -> DomainRoute | None:
        return self.domains.get(name)

    def override(self, address: str) -> None:
        return None


def slave(name: str, endpoints: dict[str, Endpoint]) -> MemberInfo:
    """An alive slave member `name` publishing `endpoints` (service -> Endpoint)."""
    return MemberInfo(
        name,
        "127.0.0.1",
        7946,
        NodeMeta(role="slave", endpoints=endpoints).encode(),
        1,
        State.ALIVE,
        0,
    )
