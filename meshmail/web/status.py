"""The /status document: this node and every member as it sees them, plus counters.

A pure function of the node's memberlist, shared by the HTTP handler and the tests; the
`meshmail status` command renders the same document as a table.
"""

from __future__ import annotations

import datetime
from typing import Any

from ..config import format_address
from ..gossip.member import MemberInfo


def iso_utc(unix: float) -> str:
    """Unix seconds as ISO-8601 UTC with milliseconds, e.g. 2026-01-01T10:00:00.000Z."""
    moment = datetime.datetime.fromtimestamp(unix, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def member_document(member: MemberInfo) -> dict[str, Any]:
    meta = member.node_meta
    return {
        "name": member.name,
        "state": member.state.name.lower(),
        "incarnation": member.incarnation,
        "address": format_address((member.host, member.port)),
        "role": meta.role,
        "endpoints": dict(sorted(meta.endpoints.items())),
        "tags": dict(sorted(meta.tags.items())),
        "changed": iso_utc(member.changed_wall),
        "changed_unix": member.changed_wall,
    }


def status_document(node) -> dict[str, Any]:
    """The status of `node` (a meshmail.node.Node) as a JSON-ready dict."""
    memberlist = node.memberlist
    local = memberlist.local()
    return {
        "node": local.name,
        "role": local.node_meta.role,
        "incarnation": memberlist.incarnation,
        "address": format_address(memberlist.address),
        "health_score": memberlist.health_score,
        "cluster": node.config.gossip.cluster,
        "members": [member_document(m) for m in sorted(memberlist.members(), key=lambda m: m.name)],
        "counters": dict(sorted(memberlist.counters.items())),
    }
