"""What the commands print: the tables and lines made from the node's JSON answers."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from ..core.clock import human_ms


def show(args: argparse.Namespace, document: Any, render: Callable[[], str]) -> None:
    """Print `document` as JSON with --json, else what `render` makes of it."""
    print(json.dumps(document, indent=2, ensure_ascii=False) if args.json else render())


def format_status(document: dict[str, Any]) -> str:
    """The status document as the table `meshmail status` prints."""
    header = (
        f"node {document['node']} ({document['role']}) in cluster {document['cluster']}"
        f" at {document['address']}, incarnation {document['incarnation']}, health {document['health_score']}"
    )
    rows = [("NAME", "STATE", "INC", "ADDRESS", "ROLE", "ENDPOINTS", "CHANGED")]
    for member in document["members"]:
        endpoints = ",".join(
            f"{service}={endpoint['address']}{'' if endpoint['up'] else '(down)'}"
            for service, endpoint in member["endpoints"].items()
        )
        rows.append(
            (
                member["name"],
                member["state"],
                str(member["incarnation"]),
                member["address"],
                member["role"],
                endpoints or "-",
                member["changed"],
            )
        )
    lines = [header]
    if document.get("removed"):
        lines.append("this node was removed from the cluster (meshmail remove): it refuses writes and cannot run again")
    process = document.get("process") or {}
    if process.get("open_fds") is not None:
        lines.append(f"file descriptors: {process['open_fds']} open of {process['fd_limit']}")
    skewed = {name: offset for name, offset in (document.get("clock_offsets") or {}).items() if abs(offset) >= 1}
    lines += [f"clock of {name}: {offset:+.1f} s from this node's (fix NTP)" for name, offset in skewed.items()]
    lines += ["", *_columns(rows), "", "counters:"]
    counters = document["counters"]
    width = max((len(name) for name in counters), default=0)
    lines += [f"  {name:<{width}}  {value}" for name, value in counters.items()] or ["  (none)"]
    state = document.get("state")
    if state is not None:
        stale = ", stale until a peer resyncs it" if state["stale"] else ""
        lines += [
            "",
            f"state: {state['domains']} entries, {state['tombstones']} tombstones, {len(state['conflicts'])} conflicts,"
            f" digest {state['digest']}{stale}",
        ]
        lines += [f"  last sync with {peer}: {at}" for peer, at in state["last_sync"].items()]
    return "\n".join(lines)


def format_domains(domains: list[dict[str, str]]) -> str:
    """The domain records of GET /domains as a table; a Unicode name follows its ASCII form."""
    if not domains:
        return "(no domains)"
    rows = [("DOMAIN", "SLAVE", "SOURCE")]
    rows += [(_domain_name(d), d["slave"], d["source"]) for d in domains]
    return "\n".join(_columns(rows))


def format_domain(document: dict[str, str]) -> str:
    """One domain record as a line: ``example.com -> s1 (admin)``."""
    return f"{_domain_name(document)} -> {document['slave']} ({document['source']})"


def format_conflicts(conflicts: list[dict[str, Any]]) -> str:
    if not conflicts:
        return "(no conflicts)"
    rows = [("DOMAIN", "ROUTES TO", "ALSO CLAIMED BY")]
    rows += [(c["domain"], c["routes_to"], ",".join(c["also_claimed_by"])) for c in conflicts]
    return "\n".join(_columns(rows))


def format_route(address: str, protocol: str, document: dict[str, Any]) -> str:
    if "route" in document:
        route = document["route"]
        return f"{address} ({protocol}) -> {route['slave']} at {route['endpoint']} ({route['state']})"
    no_route = document["no_route"]
    return f"{address} ({protocol}): no route ({no_route['reason']}): {no_route['detail']}"


def format_api_tokens(tokens: list[dict[str, Any]]) -> str:
    if not tokens:
        return "(no API tokens)"
    rows = [("ID", "ACCOUNT", "CREATED", "NOTE")]
    rows += [(t["id"], t["account"], human_ms(t["created_ms"]), t["note"]) for t in tokens]
    return "\n".join(_columns(rows))


def format_tokens(tokens: list[dict[str, Any]]) -> str:
    if not tokens:
        return "(no join tokens)"
    rows = [("ID", "ROLE", "STATUS", "USED", "EXPIRES", "CREATOR", "NOTE")]
    rows += [
        (
            t["id"],
            t["role"],
            t["status"],
            f"{t['used']}/{t['uses']}",
            human_ms(t["expires_ms"]),
            t["creator"],
            t["note"],
        )
        for t in tokens
    ]
    return "\n".join(_columns(rows))


def format_slave(document: dict[str, Any]) -> str:
    """`meshmail slave domains`: the domains and their sources, then each source's state."""
    rows = [("DOMAIN", "SOURCES", "STATUS")]
    rows += [(d["domain"], ",".join(d["sources"]), d["status"]) for d in document["domains"]]
    lines = _columns(rows) if document["domains"] else ["(no domains)"]
    lines += ["", "sources:"]
    for source in document["sources"]:
        where = " ".join(source["command"]) or ", ".join(source["paths"].values()) or "config"
        state = source["status"] + (f": {source['detail']}" if source["detail"] else "")
        lines.append(f"  {source['name']} ({source['type']}, {where}): {source['domains']} domains, {state}")
        lines += [f"    skipped {problem}" for problem in source["problems"]]
    if document["health"]:
        lines += ["", "services:"]
        for service, health in document["health"].items():
            lines.append(f"  {service}: {'up' if health['up'] else 'DOWN'} ({health['detail']})")
    return "\n".join(lines)


def format_keyring(document: dict[str, Any]) -> str:
    rows = [("KEY", "STATE", "INSTALLED", "PRIMARY")]
    members = document["members"]
    rows += [
        (k["id"], k["state"], f"{k['installed_on']}/{members}", f"{k['primary_on']}/{members}")
        for k in document["keys"]
    ]
    return "\n".join(_columns(rows))


def format_queue(document: dict[str, Any]) -> str:
    """GET /queue as a table, oldest first, and a line for what it left out."""
    messages, more = document["messages"], document["more"]
    if not messages:
        return "(no queued messages)"
    rows = [("ID", "RECEIVED", "SIZE", "FROM", "TO", "TRIES", "NEXT TRY", "LAST REPLY")]
    for m in messages:
        to = [f"{r['address']} ({r['slave']})" for r in m["recipients"]]
        rows.append(
            (
                m["id"],
                human_ms(m["received_ms"]),
                str(m["size"]),
                f"<{m['sender']}>",
                to[0] + (f" +{len(to) - 1}" if len(to) > 1 else "") if to else "-",
                str(m["attempts"]),
                "in flight" if m["in_flight"] else human_ms(m["next_attempt_ms"]),
                m["last_reply"] or "-",
            )
        )
    lines = _columns(rows)
    if more:
        lines.append(f"... and {more} more (the oldest are shown)")
    return "\n".join(lines)


def format_message(document: dict[str, Any]) -> str:
    """GET /queue/ID: the envelope, then each recipient's state."""
    client = document["client_address"] or "this cluster"
    helo = f" (HELO {document['helo']})" if document["helo"] else ""
    lines = [
        f"message {document['id']} from <{document['sender']}>, {document['size']} bytes",
        f"received {human_ms(document['received_ms'])} from {client}{helo} by {document['origin'] or '?'}",
    ]
    if document["shadow"]:
        lines.append(f"a shadow copy held for {document['origin']}, which delivers it")
    if document["delay_warning_sent"]:
        lines.append("the sender was told it is delayed")
    lines.append("recipients:")
    for r in document["recipients"]:
        state = r["state"]
        if r["next_attempt_ms"] is not None:
            state += f", next try {human_ms(r['next_attempt_ms'])}"
        tried = f", {r['attempts']} tries" if r["attempts"] else ""
        reply = f": {r['reply']}" if r["reply"] else ""
        lines.append(f"  {r['address']} at {r['slave']}: {state}{tried}{reply}")
    lines += [f"being delivered to {name} now" for name, at in document["slaves"].items() if at["in_flight"]]
    return "\n".join(lines)


def _domain_name(document: dict[str, str]) -> str:
    name, display = document["domain"], document["display"]
    return name if display == name else f"{name} ({display})"


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
