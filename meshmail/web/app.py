"""The quart-trio application: routes, request limits and JSON errors.

Endpoints that change something (POST /leave, POST /join, PUT and DELETE /domains/<name>)
answer only loopback clients until the authentication of a later step arrives; reads are
open like /status. Every error, including a malformed or oversized body or an invalid
domain name, is a JSON object {"error": "..."} with a 4xx status, never a 500.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
from typing import Any

from quart import request
from quart_trio import QuartTrio
from werkzeug.exceptions import BadRequest, Forbidden, HTTPException, NotFound, RequestEntityTooLarge

from ..config import format_address, parse_address
from ..gossip.meta import SERVICES
from ..routing import Route, Router
from ..state.hlc import MAX_NODE
from ..state.names import InvalidName, normalize_domain
from .status import conflict_documents, domain_document, status_document

log = logging.getLogger("meshmail.http")

#: Largest request body accepted; admin calls are small JSON documents.
MAX_BODY = 64 * 1024


def create_app(node) -> QuartTrio:
    """The app serving `node` (a meshmail.node.Node: memberlist, config, request_leave, join)."""
    app = QuartTrio("meshmail.web")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY

    @app.get("/status")
    async def status():
        return status_document(node)

    @app.post("/leave")
    @_loopback_only
    async def leave():
        await _json_object(empty_ok=True)
        log.info("leave requested over HTTP")
        node.request_leave()
        return {"leaving": True}, 202

    @app.post("/join")
    @_loopback_only
    async def join():
        body = await _json_object()
        seeds = body.get("seeds")
        if not isinstance(seeds, list) or not seeds:
            raise BadRequest('expected {"seeds": ["host:port", ...]} with at least one seed')
        try:
            addresses = [parse_address(seed) for seed in seeds]
        except ValueError as exc:
            raise BadRequest(f"seeds: {exc}") from None
        return {"joined": await node.join(addresses)}

    # The domain map. Static rules beat <name> in werkzeug's routing, so /domains/conflicts
    # is never read as a domain (nor could it be one: a mail domain has two labels).

    @app.get("/domains")
    async def domains():
        slave = request.args.get("slave")
        routes = sorted(node.replication.state.domains(slave))
        return {"domains": [domain_document(name, route) for name, route in routes]}

    @app.get("/domains/conflicts")
    async def conflicts():
        return {"conflicts": conflict_documents(node.replication.state)}

    @app.get("/domains/<name>")
    async def show_domain(name: str):
        domain = _domain_name(name)
        route = node.replication.state.domain(domain)
        if route is None:
            raise NotFound(f"{domain} is not assigned")
        return domain_document(domain, route)

    @app.put("/domains/<name>")
    @_loopback_only
    async def assign_domain(name: str):
        domain = _domain_name(name)
        slave = (await _json_object()).get("slave")
        if not isinstance(slave, str) or not 0 < len(slave) <= MAX_NODE:
            raise BadRequest(f'expected {{"slave": "NODE"}} with a node name of 1 to {MAX_NODE} characters')
        return domain_document(domain, node.replication.assign_domain(domain, slave).value)

    @app.delete("/domains/<name>")
    @_loopback_only
    async def unassign_domain(name: str):
        domain = _domain_name(name)
        return {"domain": domain, "removed": node.replication.unassign_domain(domain) is not None}

    @app.get("/route")
    async def route():
        address = request.args.get("address")
        protocol = request.args.get("protocol", "imap")
        if not address:
            raise BadRequest("expected ?address=user@domain[&protocol=imap]")
        if protocol not in SERVICES:
            raise BadRequest(f"unknown protocol {protocol!r} (known: {', '.join(SERVICES)})")
        # A Router per request: its caches pay off in the proxies, not in an admin lookup.
        found = Router(node.replication.state, node.memberlist.member).resolve(address, protocol)
        if isinstance(found, Route):
            endpoint = format_address(found.endpoint)
            return {"route": {"slave": found.slave, "endpoint": endpoint, "state": found.state.name.lower()}}
        return {"no_route": {"reason": found.reason, "detail": found.detail}}

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException):
        return {"error": exc.description}, exc.code

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception):
        log.exception("error answering %s %s", request.method, request.path)
        return {"error": "internal error (see the node's log)"}, 500

    return app


def _domain_name(text: str) -> str:
    """The normal form of a domain name from a URL; raises BadRequest with the reason."""
    try:
        return normalize_domain(text)
    except InvalidName as exc:
        raise BadRequest(str(exc)) from None


def _loopback_only(handler):
    @functools.wraps(handler)
    async def guarded(*args, **kwargs):
        # The ASGI scope, not request.remote_addr: that one shares a dict with the
        # client's own headers, and a forged Remote-Addr header must never count.
        client = (request.scope.get("client") or ("",))[0]
        try:
            loopback = ipaddress.ip_address(client).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise Forbidden("admin endpoints answer only loopback clients")
        return await handler(*args, **kwargs)

    return guarded


async def _json_object(*, empty_ok: bool = False) -> dict[str, Any]:
    """The request body as a JSON object; raises BadRequest (400) for anything else."""
    try:
        body = await request.get_data(as_text=False)
    except RequestEntityTooLarge:
        raise BadRequest(f"request body larger than {MAX_BODY} bytes") from None
    if not body.strip() and empty_ok:
        return {}
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(document, dict):
        raise BadRequest("request body must be a JSON object")
    return document
