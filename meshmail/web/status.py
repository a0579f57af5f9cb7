"""The /status document: this node and every member as it sees them, the replicated
state's summary, plus the node's counters (read from its metrics registry); and the JSON form of domain map records.

Pure functions of the node, shared by the HTTP handlers and the tests; the `meshmail
status` and `meshmail domains` commands render the same documents as tables.
"""

from __future__ import annotations

import os
import resource
from typing import Any

import attrs

from ..core.address import format_address
from ..core.clock import iso_ms
from ..gossip.member import MemberInfo
from ..metrics import STATUS_GOSSIP, STATUS_STATE
from ..nodemeta import NodeMeta
from ..security.keyring_sync import ids as keyring_ids
from ..state.names import InvalidName, display_domain
from ..state.records import DomainRoute
from ..state.replica import ClusterState


def member_document(member: MemberInfo) -> dict[str, Any]:
    meta = NodeMeta.decode(member.meta)
    return {
        "name": member.name,
        "state": member.state.name.lower(),
        "incarnation": member.incarnation,
        "address": format_address((member.host, member.port)),
        "role": meta.role,
        "endpoints": {service: attrs.asdict(endpoint) for service, endpoint in sorted(meta.endpoints.items())},
        "tags": dict(sorted(meta.tags.items())),
        "api": meta.api,
        "keys": list(meta.keys),
        "draining": meta.draining,
        "changed": iso_ms(round(member.changed_wall * 1000)),
        "changed_unix": member.changed_wall,
    }


def status_document(ctx) -> dict[str, Any]:
    """The status of the node of `ctx` (a meshmail.services.Context) as a JSON-ready dict."""
    memberlist = ctx.members
    local = memberlist.local()
    return {
        "node": local.name,
        "role": NodeMeta.decode(local.meta).role,
        "incarnation": memberlist.incarnation,
        "address": format_address(memberlist.address),
        "health_score": memberlist.health_score,
        "cluster": ctx.config.gossip.cluster,
        "cluster_id": ctx.cluster_id,
        "removed": ctx.removed,
        "draining": bool(ctx.drains) and ctx.leaving,
        "keys": list(keyring_ids(ctx.keyring)),
        "members": [member_document(m) for m in sorted(memberlist.members(), key=lambda m: m.name)],
        "clock_offsets": {name: round(offset, 3) for name, offset in sorted(memberlist.clock_offsets.items())},
        "process": process_document(),
        "counters": ctx.metrics.status_counters(STATUS_GOSSIP),
        "state": state_document(ctx.replication, ctx.metrics),
        **{name: report.summary() for name, report in sorted(ctx.reports.items())},
    }


def process_document() -> dict[str, Any]:
    """File descriptors in use and the soft limit: a node that runs out refuses connections."""
    try:
        open_fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_fds = None
    return {"open_fds": open_fds, "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}


def state_document(replication, metrics) -> dict[str, Any]:
    """The summary of a node's replicated state (a meshmail.replication.Replication), with
    the counters of the state and of the services (from `metrics`, a meshmail.metrics.Metrics)."""
    state = replication.state
    return {
        "domains": state.routes,
        "tombstones": state.tombstones,
        "digest": state.digest_summary(),
        "stale": state.stale,
        "last_sync": {peer: iso_ms(ms) for peer, ms in sorted(state.last_sync.items())},
        "conflicts": conflict_documents(state),
        "counters": metrics.status_counters(STATUS_STATE),
    }


def domain_document(domain: str, route: DomainRoute) -> dict[str, str]:
    """One entry of the domain map; `display` is the Unicode form of the normalized `domain`."""
    try:
        display = display_domain(domain)
    except InvalidName:
        display = domain  # only a name from outside normalize_domain could fail here
    return {"domain": domain, "display": display, "slave": route.slave, "source": route.source}


def conflict_documents(state: ClusterState) -> list[dict[str, Any]]:
    """The domains claimed by more than one slave: who routes them, who else claims them."""
    return [
        {"domain": domain, "routes_to": winner, "also_claimed_by": others}
        for domain, winner, others in state.conflicts()
    ]
