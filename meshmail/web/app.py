"""The quart-trio application: routes, request limits and JSON errors.

Admin endpoints (POST /leave, POST /join) answer only loopback clients until the
authentication of a later step arrives. Every error, including a malformed or oversized
body, is a JSON object {"error": "..."} with a 4xx status, never a 500 with a traceback.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
from typing import Any

from quart import request
from quart_trio import QuartTrio
from werkzeug.exceptions import BadRequest, Forbidden, HTTPException, RequestEntityTooLarge

from ..config import parse_address
from .status import status_document

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

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException):
        return {"error": exc.description}, exc.code

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception):
        log.exception("error answering %s %s", request.method, request.path)
        return {"error": "internal error (see the node's log)"}, 500

    return app


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
