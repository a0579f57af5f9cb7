"""Routes about this node itself: health, status and metrics (open to anyone), leave and join."""

from __future__ import annotations

import logging

from quart import Blueprint, Response, request
from werkzeug.exceptions import BadRequest

from ..core.address import Address
from ..metrics import exposition
from ..nodemeta import NodeMeta
from . import auth
from .bodies import json_object
from .current import ctx
from .status import status_document

log = logging.getLogger("meshmail.http")


routes = Blueprint("node", __name__)


@routes.get("/health")
@auth.public
async def health():
    local = ctx().members.local()
    return {"node": local.name, "role": NodeMeta.decode(local.meta).role, "ok": not ctx().leaving}


@routes.get("/status")
@auth.public
async def status():
    return status_document(ctx())


@routes.get("/metrics")
@auth.public
async def metrics():
    # Public like /status: counts only, no names of accounts or domains, and a
    # Prometheus scraper should need no admin credentials.
    body, content_type = exposition(ctx().metrics, request.headers.get("Accept", ""))
    return Response(body, content_type=content_type)


@routes.post("/leave")
async def leave():
    await json_object(empty_ok=True)
    log.info("leave requested over HTTP by %s", request.principal.account)
    ctx().request_leave()
    return {"leaving": True}, 202


@routes.post("/join")
async def join():
    body = await json_object()
    seeds = body.get("seeds")
    if not isinstance(seeds, list) or not seeds or len(seeds) > 64:
        raise BadRequest('expected {"seeds": ["host:port", ...]} with 1 to 64 seeds')
    try:
        addresses = [Address.parse(seed) for seed in seeds]
    except ValueError as exc:
        raise BadRequest(f"seeds: {exc}") from None
    return {"joined": await ctx().join(addresses)}
