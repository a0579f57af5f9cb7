"""The shape of a role service and what it is given: a Context, a supervisor, listeners.

A service is ``async def serve(ctx: Context, *, task_status)``: it binds what it listens
on (through `Context.listen`, so a restart gets the same sockets), reports the addresses
bound as ``{name: Address}``, and runs until `ctx.stopping` is set, then finishes its
work and returns (or is cancelled at the node's deadline). node.py lists the services of
each role; `supervise` starts one, and restarts it after a bug.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from .core.address import Address
from .core.errors import MeshmailError
from .core.stall import StallWatch

if TYPE_CHECKING:
    from .config import Config
    from .gossip.keyring import Keyring
    from .gossip.memberlist import Memberlist
    from .metrics import Metrics
    from .mta.runner import Runner
    from .replication import Replication
    from .routing import Router
    from .security.ca import Authority
    from .state.replica import ClusterState

log = logging.getLogger("meshmail.services")

#: Pause before a service that failed after its start is started again.
RESTART_DELAY = 0.5
#: Listen backlog of service sockets.
BACKLOG = 1024

Bound = Mapping[str, Address]


class ListenError(MeshmailError):
    """A service address that cannot be bound; str() names the service and the address."""


class Serve(Protocol):
    def __call__(self, ctx: Context, *, task_status: trio.TaskStatus[Bound]) -> Awaitable[None]: ...


class Report(Protocol):
    def summary(self) -> dict[str, Any]:
        """A short JSON-ready block for /status."""

    def document(self) -> dict[str, Any]:
        """Everything, JSON-ready, for the service's own API route."""


@attrs.frozen
class Service:
    """A role service: its name (in logs and metrics) and its serve function."""

    name: str
    serve: Serve


@attrs.define(eq=False)
class Context:
    """What a service sees of its node: the config, the replicated state, the members, the
    router, the cluster CA, and the node's own controls (leave, join, metadata)."""

    config: Config
    replication: Replication
    members: Memberlist
    router: Router
    authority: Authority | None
    metrics: Metrics
    #: Set when the node leaves: services stop accepting, finish and return.
    stopping: trio.Event = attrs.field(factory=trio.Event)
    #: Where other nodes reach this node's HTTP API, once the http service listens.
    api_address: Address | None = None
    #: Where other masters reach this master's shadow store, once the MX listens for it.
    shadow_address: Address | None = None
    #: Up/down of this node's endpoints, as its health probes last found them (slaves).
    endpoint_health: dict[str, bool] = attrs.field(factory=dict)
    #: What services report by name: a short block for /status and a full document (the
    #: slave agent's "slave": its sources and service health).
    reports: dict[str, Report] = attrs.field(factory=dict)
    #: Set by each service that ends client sessions gracefully (the proxy) once it has: a
    #: leaving node stays in the cluster, marked draining, until all are set.
    drains: list[trio.Event] = attrs.field(factory=list)
    #: How late the event loop runs (node.py runs its task; /status shows the longest stall).
    stall: StallWatch = attrs.field(factory=StallWatch)
    #: The MX's queue and what delivers from it, while the MX serves (the admin API's queue
    #: routes reach it here); None on a node without one.
    mta: Runner | None = None
    #: Called after anything that changes this node's gossiped metadata.
    meta_changed: Callable[[], None] = lambda: None
    _sockets: dict[str, trio.socket.SocketType] = attrs.field(factory=dict)

    @property
    def name(self) -> str:
        return self.config.node.name

    @property
    def role(self) -> str:
        return self.config.node.role

    @property
    def state(self) -> ClusterState:
        return self.replication.state

    @property
    def keyring(self) -> Keyring:
        return self.members.keyring

    @property
    def removed(self) -> bool:
        """Whether this node was removed from the cluster (a member told it, or it read so)."""
        return self.members.removed or self.state.get("removed", self.name) is not None

    @property
    def cluster_id(self) -> str | None:
        """The first 16 hex digits of the CA's fingerprint: unique to a cluster made by init."""
        return None if self.authority is None else self.authority.fingerprint.hex()[:16]

    @property
    def leaving(self) -> bool:
        return self.stopping.is_set()

    def request_leave(self) -> None:
        """Ask the node to leave the cluster gracefully and stop; returns at once."""
        self.stopping.set()

    async def join(self, seeds: list[Address]) -> int:
        """Push-pull with each seed; the number that answered."""
        return await self.members.join(seeds)

    async def listen(self, name: str, address: Address) -> trio.socket.SocketType:
        """A listening TCP socket for `name` on `address`, bound once per node: a restarted
        service gets the same socket (and port, when `address` asked for port 0)."""
        sock = self._sockets.get(name)
        if sock is None:
            sock = trio.socket.socket(socket.AF_INET6 if ":" in address.host else socket.AF_INET)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                await sock.bind(tuple(address))
                sock.listen(BACKLOG)
            except OSError as exc:
                sock.close()
                raise ListenError(f"cannot listen for {name} on {address}: {exc.strerror or exc}") from None
            self._sockets[name] = sock
        return sock

    def close(self) -> None:
        """Close the sockets services listened on."""
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()


async def supervise(
    service: Service, ctx: Context, on_restart: Callable[[str], None], *, task_status: trio.TaskStatus[Bound]
) -> None:
    """Run `service` until it returns. A failure before it reports started propagates (the
    node does not start); a failure after it is logged, reported to `on_restart` and the
    service started again after RESTART_DELAY, so one service's bug never stops the node."""
    started = False
    while True:
        try:
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(service.serve, ctx)
                if not started:
                    started = True
                    task_status.started(bound)
            return
        except Exception:
            if not started or ctx.stopping.is_set():
                raise
            on_restart(service.name)
            log.exception("service %s failed; starting it again", service.name)
            await trio.sleep(RESTART_DELAY)
