"""The quart-trio application: routes, authentication, request limits and JSON errors.

Every route needs admin credentials (auth.py: a session from the login form, or a bearer
API token) except those marked @public: /health, /status, the login form and the two
join endpoints, which a joining server uses with its join token. Every error, including
a malformed or oversized body or an invalid name, is a JSON object {"error": "..."} with a
4xx status, never a 500.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any

import trio
from quart import Response, redirect, request
from quart_trio import QuartTrio
from werkzeug.exceptions import (
    BadRequest,
    Forbidden,
    HTTPException,
    NotFound,
    RequestEntityTooLarge,
    TooManyRequests,
    Unauthorized,
)

from ..config import format_address, parse_address
from ..gossip.keyring import KeyringError
from ..gossip.messages import State
from ..gossip.meta import SERVICES
from ..routing import Route, Router
from ..security import accounts, admission, ca, keyring_sync
from ..security.passwords import PasswordError, check_password, hash_password
from ..state.hlc import MAX_NODE
from ..state.names import InvalidName, normalize_domain
from ..state.records import AdminAccount
from . import auth
from .status import conflict_documents, domain_document, status_document

log = logging.getLogger("meshmail.http")

#: Largest request body accepted; admin calls are small JSON documents.
MAX_BODY = 64 * 1024
#: Failed join requests allowed per client address per window (a token secret is 256 bits;
#: this only keeps a flood of them from costing CPU).
JOIN_FAILURES_PER_ADDRESS = 20


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def create_app(node) -> QuartTrio:
    """The app serving `node` (a meshmail.node.Node)."""
    app = QuartTrio("meshmail.web")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    counters = node.replication.counters
    guard = auth.Auth(lambda: node.replication.state, counters)
    join_limit = auth.RateLimiter(JOIN_FAILURES_PER_ADDRESS, auth.LOGIN_WINDOW)
    app.extensions["meshmail.auth"] = guard

    @app.before_request
    async def authenticate():
        handler = app.view_functions.get(request.endpoint) if request.endpoint else None
        if handler is None or getattr(handler, "meshmail_public", False):
            return None
        try:
            principal = guard.principal()
        except auth.CsrfError:
            counters["auth.csrf_refused"] += 1
            raise Forbidden(f"missing or wrong CSRF token (send the {auth.CSRF_HEADER} header)") from None
        if principal is None:
            counters["auth.refused"] += 1
            raise Unauthorized("authentication required: a session (POST /login) or an API token (Bearer)")
        request.principal = principal
        return None

    # --- open to anyone -----------------------------------------------------------------

    @app.get("/health")
    @auth.public
    async def health():
        local = node.memberlist.local()
        return {"node": local.name, "role": local.node_meta.role, "ok": not node.leaving}

    @app.get("/status")
    @auth.public
    async def status():
        return status_document(node)

    @app.get("/login")
    @auth.public
    async def login_form():
        return Response(auth.login_page(node.config.node.name), content_type="text/html; charset=utf-8")

    @app.post("/login")
    @auth.public
    async def login():
        form = request.mimetype == "application/x-www-form-urlencoded"
        if form:
            fields = await request.form
            account, password = fields.get("account"), fields.get("password")
        else:
            body = await _json_object()
            account, password = body.get("account"), body.get("password")
        sid, wait = await guard.login(account, password)
        if sid is None:
            if wait:
                message = f"too many failed sign-ins; try again in {int(wait) + 1} s"
                status, headers = 429, {"Retry-After": str(int(wait) + 1)}
            else:
                message, status, headers = "wrong account or password", 401, {}
            if form:
                page = auth.login_page(node.config.node.name, message)
                return Response(page, status, headers, content_type="text/html; charset=utf-8")
            return {"error": message}, status, headers
        session = guard.sessions[sid]
        response = redirect("/status", 303) if form else Response(
            json.dumps({"account": session.account, "csrf_token": session.csrf}), content_type="application/json"
        )
        auth.session_cookie(response, sid, secure=node.config.tls is not None)
        return response

    @app.get("/cluster/ca")
    @auth.public
    async def cluster_ca():
        if node.authority is None:
            raise NotFound("this node has no cluster CA (no [tls] section)")
        return Response(ca.cert_pem(node.authority.cert), content_type="application/x-pem-file")

    @app.post("/cluster/join")
    @auth.public
    async def cluster_join():
        address = auth.client_address()
        wait = join_limit.retry_after(address, trio.current_time())
        if wait > 0:
            counters["join.limited"] += 1
            raise TooManyRequests(f"too many refused joins from {address}; try again in {int(wait) + 1} s")
        try:
            if node.authority is None or node.authority.key is None or node.config.node.role != "master":
                raise admission.JoinRefused("not_master", "this node cannot admit joins (not a master with the CA key)")
            try:
                document = await _json_object()
            except BadRequest as exc:
                raise admission.JoinRefused("bad_request", exc.description, 400) from None
            request_ = admission.read_request(document)
            cert = admission.admit(
                node.replication,
                request_,
                authority=node.authority,
                master=node.config.node.name,
                members=node.memberlist.members,
                now_ms=now_ms(),
            )
        except admission.JoinRefused as exc:
            counters[f"join.refused.{exc.reason}"] += 1
            join_limit.fail(address, trio.current_time())
            log.warning("join refused for %s: %s", address, exc)
            return {"error": str(exc), "reason": exc.reason}, exc.status
        counters["join.admitted"] += 1
        log.info("admitted node %s as %s (token %s) from %s", request_.name, request_.role, request_.token_id, address)
        return _join_grant(node, request_, cert)

    # --- sessions -------------------------------------------------------------------------

    @app.get("/session")
    async def session():
        principal = request.principal
        current = guard.session() if principal.via == "session" else None
        return {"account": principal.account, "via": principal.via, "csrf_token": current.csrf if current else None}

    @app.post("/logout")
    async def logout():
        guard.logout()
        response = Response(json.dumps({"logged_out": True}), content_type="application/json")
        response.delete_cookie(auth.SESSION_COOKIE, path="/")
        return response

    # --- the node -------------------------------------------------------------------------

    @app.post("/leave")
    async def leave():
        await _json_object(empty_ok=True)
        log.info("leave requested over HTTP by %s", request.principal.account)
        node.request_leave()
        return {"leaving": True}, 202

    @app.post("/join")
    async def join():
        body = await _json_object()
        seeds = body.get("seeds")
        if not isinstance(seeds, list) or not seeds or len(seeds) > 64:
            raise BadRequest('expected {"seeds": ["host:port", ...]} with 1 to 64 seeds')
        try:
            addresses = [parse_address(seed) for seed in seeds]
        except ValueError as exc:
            raise BadRequest(f"seeds: {exc}") from None
        return {"joined": await node.join(addresses)}

    # --- the domain map ---------------------------------------------------------------------
    # Static rules beat <name> in werkzeug's routing, so /domains/conflicts is never read as
    # a domain (nor could it be one: a mail domain has two labels).

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
    async def assign_domain(name: str):
        domain = _domain_name(name)
        slave = (await _json_object()).get("slave")
        if not isinstance(slave, str) or not 0 < len(slave) <= MAX_NODE:
            raise BadRequest(f'expected {{"slave": "NODE"}} with a node name of 1 to {MAX_NODE} characters')
        return domain_document(domain, node.replication.assign_domain(domain, slave).value)

    @app.delete("/domains/<name>")
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
            route = {"slave": found.slave, "endpoint": endpoint, "state": found.state.name.lower()}
            return {"route": {**route, "transport": found.transport, "client_address": found.client_address}}
        return {"no_route": {"reason": found.reason, "detail": found.detail}}

    @app.get("/slave")
    async def slave():
        if node.agent is None:
            raise NotFound("this node is not a slave")
        return node.agent.document()

    # --- join tokens and members ------------------------------------------------------------

    @app.post("/tokens")
    async def create_token():
        body = await _json_object()
        if node.authority is None or node.authority.key is None:
            raise Forbidden("this node cannot mint join tokens (not a master with the cluster CA key)")
        role, uses, note = body.get("role"), body.get("uses", 1), body.get("note", "")
        ttl = body.get("ttl", 24 * 3600)
        if not isinstance(uses, int) or isinstance(uses, bool) or not isinstance(note, str):
            raise BadRequest('expected {"role": "slave"|"master", "ttl": seconds, "uses": n, "note": text}')
        if not isinstance(ttl, int | float) or isinstance(ttl, bool):
            raise BadRequest("ttl must be a number of seconds")
        try:
            token = admission.create_token(
                node.replication,
                role=role,
                ttl_s=ttl,
                uses=uses,
                note=note,
                creator=request.principal.account,
                now_ms=now_ms(),
                ca_fingerprint=node.authority.fingerprint,
                masters=_master_addresses(node),
            )
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        info = admission.TokenInfo(token.token_id, node.replication.state.get("jointoken", token.token_id), 0)
        return {"token": token.encode(), **info.document(now_ms())}, 201

    @app.get("/tokens")
    async def list_tokens():
        moment = now_ms()
        return {"tokens": [info.document(moment) for info in admission.tokens(node.replication.state)]}

    @app.delete("/tokens/<token_id>")
    async def revoke_token(token_id: str):
        try:
            admission.revoke(node.replication, token_id)
        except LookupError as exc:
            raise NotFound(str(exc)) from None
        return {"id": token_id, "revoked": True}

    @app.post("/nodes/<name>/remove")
    async def remove_node(name: str):
        try:
            admission.check_node_name(name)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        if name == node.config.node.name:
            raise BadRequest("a node cannot remove itself; ask another node (or use meshmail leave)")
        removed = admission.remove_node(node.replication, name, by=request.principal.account, now_ms=now_ms())
        return {"node": name, "removed": True, "already": not removed}

    # --- keyring ------------------------------------------------------------------------------

    @app.get("/keyring")
    async def keyring():
        return keyring_sync.report(node.replication.state, node.keyring, node.memberlist.members())

    @app.post("/keyring")
    async def change_keyring():
        body = await _json_object()
        action = body.get("action")
        try:
            if action == "install":
                key = body.get("key")
                if not isinstance(key, str) or len(key) > 100:
                    raise BadRequest('expected {"action": "install", "key": BASE64}')
                kid = keyring_sync.install(node.replication, keyring_sync.decode_key(key), node.keyring)
            elif action in ("use", "remove"):
                kid = body.get("id")
                if not isinstance(kid, str) or len(kid) != 16:
                    raise BadRequest(f'expected {{"action": "{action}", "id": KEY_ID}} (16 hex digits)')
                change = keyring_sync.use if action == "use" else keyring_sync.remove
                change(node.replication, kid, node.keyring)
            else:
                raise BadRequest('action must be "install", "use" or "remove"')
        except KeyringError as exc:
            raise BadRequest(str(exc)) from None
        return {"action": action, "id": kid}

    # --- admin accounts and API tokens ---------------------------------------------------------

    @app.get("/admins")
    async def list_admins():
        return {"admins": accounts.accounts(node.replication.state)}

    @app.put("/admins/<account>")
    async def set_admin(account: str):
        password = (await _json_object()).get("password")
        try:
            accounts.check_account_name(account)
            check_password(password)
        except (accounts.AccountError, PasswordError) as exc:
            raise BadRequest(str(exc)) from None
        hashed = await trio.to_thread.run_sync(hash_password, password)
        node.replication.put("admin", account, AdminAccount(hashed))
        return {"account": account}

    @app.delete("/admins/<account>")
    async def remove_admin(account: str):
        try:
            removed = accounts.remove_account(node.replication, account)
        except accounts.AccountError as exc:
            raise BadRequest(str(exc)) from None
        accounts.revoke_api_tokens(node.replication, account)
        return {"account": account, "removed": removed}

    @app.post("/api-tokens")
    async def create_api_token():
        note = (await _json_object(empty_ok=True)).get("note", "")
        if not isinstance(note, str):
            raise BadRequest('expected {"note": TEXT}')
        token = accounts.create_api_token(node.replication, request.principal.account, note, now_ms())
        return {"token": token.encode(), "id": token.token_id, "account": request.principal.account}, 201

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException):
        headers = {"WWW-Authenticate": "Bearer"} if exc.code == 401 else {}
        return {"error": exc.description}, exc.code, headers

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception):
        log.exception("error answering %s %s", request.method, request.path)
        return {"error": "internal error (see the node's log)"}, 500

    return app


def _master_addresses(node) -> list[str]:
    """The API addresses of live masters for a join token: this node first."""
    own = format_address(node.api_address) if node.api_address else None
    others = [
        m.node_meta.api
        for m in node.memberlist.members()
        if m.name != node.config.node.name and m.state == State.ALIVE and m.node_meta.role == "master"
    ]
    return [address for address in [own, *sorted(filter(None, others))] if address][:8]


def _join_grant(node, request_: admission.JoinRequest, cert) -> dict[str, Any]:
    """What a joining node needs: the cluster's name, keys, CA, its certificate and seeds."""
    members = node.memberlist.members()
    seeds = [format_address((m.host, m.port)) for m in members if m.state == State.ALIVE]
    grant = {
        "cluster": node.config.gossip.cluster,
        "cluster_id": node.cluster_id,
        "name": request_.name,
        "role": request_.role,
        "ca": ca.cert_pem(node.authority.cert).decode(),
        "cert": ca.cert_pem(cert).decode(),
        "keys": [base64.b64encode(key).decode("ascii") for key in node.keyring.keys],
        "seeds": seeds[:16],
        "masters": _master_addresses(node),
        "profile": node.config.gossip.settings.profile,
    }
    if request_.role == "master":
        grant["ca_key"] = ca.key_pem(node.authority.key).decode()
    return grant


def _domain_name(text: str) -> str:
    """The normal form of a domain name from a URL; raises BadRequest with the reason."""
    try:
        return normalize_domain(text)
    except InvalidName as exc:
        raise BadRequest(str(exc)) from None


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
        # Strings with lone surrogates ("\ud800") are valid JSON but not Unicode text.
        json.dumps(document, ensure_ascii=False).encode()
    except (UnicodeError, ValueError, RecursionError):
        raise BadRequest("request body is not valid JSON (nor UTF-8 text)") from None
    if not isinstance(document, dict):
        raise BadRequest("request body must be a JSON object")
    return document
