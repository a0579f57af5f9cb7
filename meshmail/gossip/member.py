"""Members as one node sees them, and the events their changes produce."""

from __future__ import annotations

import enum

import attrs

from .messages import State


@attrs.define(eq=False)
class Member:
    """A member's record in this node's view; owned and mutated by the state machine (Membership) only."""

    name: str
    host: str
    port: int
    meta: bytes
    incarnation: int
    state: State
    #: trio clock and wall clock (Unix seconds) of the last state change.
    changed: float
    changed_wall: float

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def snapshot(self) -> MemberInfo:
        return MemberInfo(
            name=self.name,
            host=self.host,
            port=self.port,
            meta=self.meta,
            incarnation=self.incarnation,
            state=self.state,
            changed_wall=self.changed_wall,
        )


@attrs.frozen
class MemberInfo:
    """An immutable copy of a Member, safe to hand to the rest of the program."""

    name: str
    host: str
    port: int
    meta: bytes
    incarnation: int
    state: State
    changed_wall: float


class EventKind(enum.Enum):
    JOINED = "joined"
    UPDATED = "updated"
    SUSPECT = "suspect"
    FAILED = "failed"
    LEFT = "left"


@attrs.frozen
class MemberEvent:
    kind: EventKind
    member: MemberInfo
