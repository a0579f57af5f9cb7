"""Routes of sign-in and accounts: the login form, sessions, admin accounts, API tokens."""

from __future__ import annotations

import json

import trio
from quart import Blueprint, Response, redirect, request
from werkzeug.exceptions import BadRequest, NotFound

from ..core.clock import wall_ms
from ..security import accounts
from ..security.passwords import PasswordError
from ..security.tokens import TokenError
from . import auth
from .bodies import json_object
from .current import ctx, guard

routes = Blueprint("accounts", __name__)


@routes.get("/login")
@auth.public
async def login_form():
    return Response(auth.login_page(ctx().name), content_type="text/html; charset=utf-8")


@routes.post("/login")
@auth.public
async def login():
    form = request.mimetype == "application/x-www-form-urlencoded"
    if form:
        fields = await request.form
        account, password = fields.get("account"), fields.get("password")
    else:
        body = await json_object()
        account, password = body.get("account"), body.get("password")
    sid, wait = await guard().login(account, password)
    if sid is None:
        if wait:
            message = f"too many failed sign-ins; try again in {int(wait) + 1} s"
            status, headers = 429, {"Retry-After": str(int(wait) + 1)}
        else:
            message, status, headers = "wrong account or password", 401, {}
        if form:
            page = auth.login_page(ctx().name, message)
            return Response(page, status, headers, content_type="text/html; charset=utf-8")
        return {"error": message}, status, headers
    session = guard().sessions[sid]
    response = (
        redirect("/status", 303)
        if form
        else Response(
            json.dumps({"account": session.account, "csrf_token": session.csrf}), content_type="application/json"
        )
    )
    auth.session_cookie(response, sid, secure=ctx().config.tls is not None)
    return response


@routes.get("/session")
async def session():
    principal = request.principal
    current = guard().session() if principal.via == "session" else None
    return {"account": principal.account, "via": principal.via, "csrf_token": current.csrf if current else None}


@routes.post("/logout")
async def logout():
    guard().logout()
    response = Response(json.dumps({"logged_out": True}), content_type="application/json")
    response.delete_cookie(auth.SESSION_COOKIE, path="/")
    return response


@routes.get("/admins")
async def list_admins():
    return {"admins": accounts.accounts(ctx().state)}


@routes.put("/admins/<account>")
async def set_admin(account: str):
    password = (await json_object()).get("password")
    try:
        record = await trio.to_thread.run_sync(accounts.admin_record, account, password)
    except (accounts.AccountError, PasswordError) as exc:
        raise BadRequest(str(exc)) from None
    ctx().replication.put("admin", account, record)
    return {"account": account}


@routes.delete("/admins/<account>")
async def remove_admin(account: str):
    try:
        removed = accounts.remove_account(ctx().replication, account)
    except accounts.AccountError as exc:
        raise BadRequest(str(exc)) from None
    accounts.revoke_api_tokens(ctx().replication, account)
    return {"account": account, "removed": removed}


@routes.post("/api-tokens")
async def create_api_token():
    note = (await json_object(empty_ok=True)).get("note", "")
    try:
        token = accounts.create_api_token(ctx().replication, request.principal.account, note, wall_ms())
    except TokenError as exc:
        raise BadRequest(str(exc)) from None
    return {"token": token.encode(), "id": token.token_id, "account": request.principal.account}, 201


@routes.get("/api-tokens")
async def list_api_tokens():
    return {"tokens": accounts.api_tokens(ctx().state)}


@routes.delete("/api-tokens/<token_id>")
async def revoke_api_token(token_id: str):
    if not accounts.revoke_api_token(ctx().replication, token_id):
        raise NotFound(f"no API token {token_id[:40]}")
    return {"id": token_id, "revoked": True}
