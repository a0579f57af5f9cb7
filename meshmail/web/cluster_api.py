"""Routes that make and shape the cluster: the pinned CA and joins (open: they check the
join token themselves), join tokens, removing nodes, the replicated keyring."""

from __future__ import annotations

import logging
from typing import Any

import trio
from quart import Blueprint, Response, request
from werkzeug.exceptions import (
    BadRequest,
    Forbidden,
    NotFound,
    RequestEntityTooLarge,
    TooManyRequests,
)

from ..core.address import format_address
from ..core.clock import wall_ms
from ..core.nodes import check_node_name
from ..gossip.keyring import KeyringError, encode_key
from ..gossip.messages import State
from ..nodemeta import NodeMeta
from ..security import admission, ca, keyring_sync
from . import auth
from .bodies import json_object
from .current import ctx, guard

log = logging.getLogger("meshmail.http")


routes = Blueprint("cluster", __name__)


@routes.get("/cluster/ca")
@auth.public
async def cluster_ca():
    if ctx().authority is None:
        raise NotFound("this node has no cluster CA (no [tls] section)")
    return Response(ca.cert_pem(ctx().authority.cert), content_type="application/x-pem-file")


@routes.post("/cluster/join")
@auth.public
async def cluster_join():
    address = auth.client_address()
    wait = guard().joins.retry_after(address, trio.current_time())
    if wait > 0:
        ctx().metrics.joins_limited.inc()
        raise TooManyRequests(f"too many refused joins from {address}; try again in {int(wait) + 1} s")
    try:
        if ctx().authority is None or ctx().authority.key is None or ctx().role != "master":
            raise admission.JoinRefused("not_master", "this node cannot admit joins (not a master with the CA key)")
        if ctx().removed:
            raise admission.JoinRefused("removed_master", "this master was removed from the cluster")
        try:
            document = await json_object()
        except (BadRequest, RequestEntityTooLarge) as exc:
            raise admission.JoinRefused("bad_request", exc.description, exc.code) from None
        request_ = admission.read_request(document)
        cert = admission.admit(
            ctx().replication,
            request_,
            authority=ctx().authority,
            master=ctx().name,
            members=ctx().members.members,
            now_ms=wall_ms(),
        )
    except admission.JoinRefused as exc:
        ctx().metrics.joins_refused.labels(reason=exc.reason).inc()
        guard().joins.fail(address, trio.current_time())
        log.warning("join refused for %s: %s", address, exc)
        return {"error": str(exc), "reason": exc.reason}, exc.status
    ctx().metrics.joins_admitted.inc()
    log.info("admitted node %s as %s (token %s) from %s", request_.name, request_.role, request_.token_id, address)
    return _join_grant(ctx(), request_, cert)


@routes.post("/tokens")
async def create_token():
    body = await json_object()
    if ctx().authority is None or ctx().authority.key is None:
        raise Forbidden("this node cannot mint join tokens (not a master with the cluster CA key)")
    if ctx().removed:
        raise Forbidden("this node was removed from the cluster")
    role, uses, note = body.get("role"), body.get("uses", 1), body.get("note", "")
    ttl = body.get("ttl", 24 * 3600)
    if not isinstance(uses, int) or isinstance(uses, bool) or not isinstance(note, str):
        raise BadRequest('expected {"role": "slave"|"master", "ttl": seconds, "uses": n, "note": text}')
    if not isinstance(ttl, int | float) or isinstance(ttl, bool):
        raise BadRequest("ttl must be a number of seconds")
    try:
        token = admission.create_token(
            ctx().replication,
            role=role,
            ttl_s=ttl,
            uses=uses,
            note=note,
            creator=request.principal.account,
            now_ms=wall_ms(),
            ca_fingerprint=ctx().authority.fingerprint,
            masters=_master_addresses(ctx()),
        )
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    info = admission.TokenInfo(token.token_id, ctx().state.get("jointoken", token.token_id), 0)
    return {"token": token.encode(), **info.document(wall_ms())}, 201


@routes.get("/tokens")
async def list_tokens():
    moment = wall_ms()
    return {"tokens": [info.document(moment) for info in admission.tokens(ctx().state)]}


@routes.delete("/tokens/<token_id>")
async def revoke_token(token_id: str):
    try:
        admission.revoke(ctx().replication, token_id)
    except LookupError as exc:
        raise NotFound(str(exc)) from None
    return {"id": token_id, "revoked": True}


@routes.post("/nodes/<name>/remove")
async def remove_node(name: str):
    try:
        check_node_name(name)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if name == ctx().name:
        raise BadRequest("a node cannot remove itself; ask another node (or use meshmail leave)")
    force = (await json_object(empty_ok=True)).get("force") is True
    if not force and not admission.known_node(ctx().state, name, ctx().members.members()):
        raise NotFound(f"no node named {name} is known here (a name removed is gone for good; --force)")
    removed = admission.remove_node(ctx().replication, name, by=request.principal.account, now_ms=wall_ms())
    return {"node": name, "removed": True, "already": not removed}


@routes.get("/keyring")
async def keyring():
    return keyring_sync.report(ctx().state, ctx().keyring, ctx().members.members())


@routes.post("/keyring")
async def change_keyring():
    body = await json_object()
    action = body.get("action")
    try:
        if action == "install":
            key = body.get("key")
            if not isinstance(key, str) or len(key) > 100:
                raise BadRequest('expected {"action": "install", "key": BASE64}')
            kid = keyring_sync.install(ctx().replication, keyring_sync.decode_key(key), ctx().keyring)
        elif action in ("use", "remove"):
            kid = body.get("id")
            if not isinstance(kid, str) or len(kid) != 16:
                raise BadRequest(f'expected {{"action": "{action}", "id": KEY_ID}} (16 hex digits)')
            change = keyring_sync.use if action == "use" else keyring_sync.remove
            change(ctx().replication, kid, ctx().keyring)
        else:
            raise BadRequest('action must be "install", "use" or "remove"')
    except KeyringError as exc:
        raise BadRequest(str(exc)) from None
    return {"action": action, "id": kid}


def _master_addresses(ctx) -> list[str]:
    """The API addresses of live masters for a join token: this node first."""
    own = format_address(ctx.api_address) if ctx.api_address else None
    others = [
        NodeMeta.decode(m.meta).api
        for m in ctx.members.members()
        if m.name != ctx.name and m.state == State.ALIVE and NodeMeta.decode(m.meta).role == "master"
    ]
    return [address for address in [own, *sorted(filter(None, others))] if address][:8]


def _join_grant(ctx, request_: admission.JoinRequest, cert) -> dict[str, Any]:
    """What a joining node needs: the cluster's name, keys, CA, its certificate and seeds."""
    members = ctx.members.members()
    seeds = [format_address((m.host, m.port)) for m in members if m.state == State.ALIVE]
    grant = {
        "cluster": ctx.config.gossip.cluster,
        "cluster_id": ctx.cluster_id,
        "name": request_.name,
        "role": request_.role,
        "ca": ca.cert_pem(ctx.authority.cert).decode(),
        "cert": ca.cert_pem(cert).decode(),
        "keys": [encode_key(key) for key in ctx.keyring.keys],
        "seeds": seeds[:16],
        "masters": _master_addresses(ctx),
        "profile": ctx.config.gossip.settings.profile,
    }
    if request_.role == "master":
        grant["ca_key"] = ca.key_pem(ctx.authority.key).decode()
    return grant
