"""Routes of the domain map and routing: domains, conflicts, where an address routes, and
what a slave publishes."""

from __future__ import annotations

from quart import Blueprint, request
from werkzeug.exceptions import BadRequest, NotFound

from ..core.address import format_address
from ..nodemeta import SERVICES, NodeMeta
from ..routing import Route
from ..security import admission
from ..state.hlc import MAX_NODE
from .bodies import domain_name, json_object
from .current import ctx
from .status import conflict_documents, domain_document

routes = Blueprint("domains", __name__)
# Static rules beat <name> in werkzeug's routing, so /domains/conflicts is never read as
# a domain (nor could it be one: a mail domain has two labels).


@routes.get("/domains")
async def domains():
    slave = request.args.get("slave")
    routes = sorted(ctx().state.domains(slave))
    return {"domains": [domain_document(name, route) for name, route in routes]}


@routes.get("/domains/conflicts")
async def conflicts():
    return {"conflicts": conflict_documents(ctx().state)}


@routes.get("/domains/<name>")
async def show_domain(name: str):
    domain = domain_name(name)
    route = ctx().state.domain(domain)
    if route is None:
        raise NotFound(f"{domain} is not assigned")
    return domain_document(domain, route)


@routes.put("/domains/<name>")
async def assign_domain(name: str):
    domain = domain_name(name)
    document = await json_object()
    slave, force = document.get("slave"), document.get("force", False)
    if not isinstance(slave, str) or not 0 < len(slave) <= MAX_NODE:
        raise BadRequest(f'expected {{"slave": "NODE"}} with a node name of 1 to {MAX_NODE} characters')
    if not isinstance(force, bool):
        raise BadRequest('"force" must be true or false')
    if not force:
        role = node_role(slave)
        anyway = '; assign with --force ("force": true) to route it there anyway'
        if role is None:
            raise NotFound(f"no slave named {slave} is known (not a member, never admitted){anyway}")
        if role != "slave":
            raise BadRequest(f"{slave} is a {role}, not a slave{anyway}")
        if ctx().state.get("removed", slave) is not None:
            raise BadRequest(f"slave {slave} was removed from the cluster{anyway}")
    return domain_document(domain, ctx().replication.assign_domain(domain, slave).value)


def node_role(name: str) -> str | None:
    """The role of node `name`: what its gossiped metadata says while it is a member, else the
    role a master admitted it with; None for a node this node has never heard of."""
    member = ctx().members.member(name)
    if member is not None:
        return NodeMeta.decode(member.meta).role
    return admission.admitted_role(ctx().state, name)


@routes.delete("/domains/<name>")
async def unassign_domain(name: str):
    domain = domain_name(name)
    return {"domain": domain, "removed": ctx().replication.unassign_domain(domain) is not None}


@routes.get("/route")
async def route():
    address = request.args.get("address")
    protocol = request.args.get("protocol", "imap")
    if not address:
        raise BadRequest("expected ?address=user@domain[&protocol=imap]")
    if protocol not in SERVICES:
        raise BadRequest(f"unknown protocol {protocol!r} (known: {', '.join(SERVICES)})")
    found = ctx().router.resolve(address, protocol)
    if isinstance(found, Route):
        endpoint = format_address(found.endpoint)
        route = {"slave": found.slave, "endpoint": endpoint, "state": found.state.name.lower()}
        return {"route": {**route, "transport": found.transport, "client_address": found.client_address}}
    return {"no_route": {"reason": found.reason, "detail": found.detail}}


@routes.get("/slave")
async def slave():
    report = ctx().reports.get("slave")
    if report is None:
        raise NotFound("this node is not a slave")
    return report.document()
