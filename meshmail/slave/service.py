"""The slave service: the agent that publishes this slave's domains and probes its endpoints."""

from __future__ import annotations

import trio

from ..gossip.member import EventKind, MemberEvent
from ..services import Context
from .agent import SlaveAgent


async def serve(ctx: Context, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    """Read every source (a source that cannot be read stops the start: SourceError), then
    publish (once synced with a peer), follow the sources, the map and the members, and probe
    the endpoints until the node stops. Listens on nothing."""

    def health_changed() -> None:
        ctx.endpoint_health.update({service: agent.up(service) for service in ctx.config.endpoints})
        ctx.meta_changed()

    agent = SlaveAgent(
        ctx.name, ctx.config.slave, ctx.config.endpoints, ctx.replication, ctx.members.member, ctx.metrics,
        health_changed,
    )  # fmt: skip
    await agent.load()
    ctx.reports["slave"] = agent
    unwatch = ctx.replication.watch(["domain", "removed"], agent.poke)
    events = ctx.members.subscribe()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_poke_when_members_leave, events, agent)
            for loop in agent.loops:
                nursery.start_soon(loop)
            task_status.started({})
            await ctx.stopping.wait()
            nursery.cancel_scope.cancel()
    finally:
        unwatch()
        events.close()
        ctx.reports.pop("slave", None)


async def _poke_when_members_leave(events: trio.MemoryReceiveChannel[MemberEvent], agent: SlaveAgent) -> None:
    """A slave that leaves (or is refused, once removed) gives up its domains: publish soon."""
    async for event in events:
        if event.kind == EventKind.LEFT:
            agent.poke()
