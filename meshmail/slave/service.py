"""The slave service: the agent that publishes this slave's domains and probes its endpoints."""

from __future__ import annotations

import trio

from ..services import Context
from .agent import SlaveAgent


async def serve(ctx: Context, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    """Read every source (a source that cannot be read stops the start: SourceError), publish,
    then follow the sources and probe the endpoints until the node stops. Listens on nothing."""

    def health_changed() -> None:
        ctx.endpoint_health.update({service: agent.up(service) for service in ctx.config.endpoints})
        ctx.meta_changed()

    agent = SlaveAgent(
        ctx.name, ctx.config.slave, ctx.config.endpoints, ctx.replication, ctx.metrics, health_changed
    )
    await agent.load()
    ctx.reports["slave"] = agent
    unwatch = ctx.replication.watch(["domain", "removed"], agent.poke)
    try:
        agent.publish()
        async with trio.open_nursery() as nursery:
            for loop in agent.loops:
                nursery.start_soon(loop)
            task_status.started({})
            await ctx.stopping.wait()
            nursery.cancel_scope.cancel()
    finally:
        unwatch()
        ctx.reports.pop("slave", None)
