"""Members, a settable clock and state snapshots for the security tests (tests/security/)."""

from __future__ import annotations

from meshmail.gossip.member import MemberInfo
from meshmail.gossip.messages import State
from meshmail.nodemeta import NodeMeta
from meshmail.state.replica import ClusterState

START_MS = 1_700_000_000_000


class Clock:
    """Unix milliseconds the test sets."""

    def __init__(self, ms: int = START_MS) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def member(name: str, state: State = State.ALIVE, keys: tuple[str, ...] = (), role: str = "master") -> MemberInfo:
    return MemberInfo(
        name=name,
        host="127.0.0.1",
        port=7946,
        meta=NodeMeta(role=role, keys=keys).encode(),
        incarnation=1,
        state=state,
        changed_wall=0.0,
    )


def snapshot(state: ClusterState) -> tuple[str, list]:
    """Everything a write would change: the digest and every entry with its timestamp."""
    return state.digest_summary(), sorted((e.key, e.wall_ms, e.logical) for e in state.map.entries_in())
