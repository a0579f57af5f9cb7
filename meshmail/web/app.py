"""The quart-trio application: authentication, request limits and JSON errors, around the
routes of each area (node_api, accounts_api, cluster_api, domains_api, queue_api).

Every route needs admin credentials (auth.py: a session from the login form, or a bearer
API token) except those marked @public: /health, /status, /metrics, the login form and the
two join endpoints, which a joining server uses with its join token. Every error, including
a malformed or oversized body or an invalid name, is a JSON object {"error": "..."} with a
4xx status, never a 500.
"""

from __future__ import annotations

import logging

from quart import current_app, request
from quart_trio import QuartTrio
from werkzeug.exceptions import Forbidden, HTTPException, Unauthorized

from ..services import Context
from . import accounts_api, auth, cluster_api, domains_api, node_api, queue_api
from .bodies import MAX_BODY
from .current import ctx, guard

log = logging.getLogger("meshmail.http")

__all__ = ["MAX_BODY", "create_app"]


def create_app(ctx: Context) -> QuartTrio:
    """The app serving the node of `ctx`."""
    app = QuartTrio("meshmail.web")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.extensions["meshmail.ctx"] = ctx
    app.extensions["meshmail.auth"] = auth.Auth(lambda: ctx.state, ctx.metrics)
    app.before_request(authenticate)
    for area in (node_api, accounts_api, cluster_api, domains_api, queue_api):
        app.register_blueprint(area.routes)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected)
    return app


async def authenticate():
    """Let public routes through; find who sent any other request, or refuse it."""
    handler = current_app.view_functions.get(request.endpoint) if request.endpoint else None
    if handler is None or getattr(handler, "meshmail_public", False):
        return None
    try:
        principal = guard().principal()
    except auth.CsrfError:
        ctx().metrics.csrf_refused.inc()
        raise Forbidden(f"missing or wrong CSRF token (send the {auth.CSRF_HEADER} header)") from None
    if principal is None:
        ctx().metrics.unauthenticated.inc()
        raise Unauthorized("authentication required: a session (POST /login) or an API token (Bearer)")
    request.principal = principal
    if ctx().removed and request.method not in auth.SAFE_METHODS and request.endpoint != "node.leave":
        # Its writes would reach nobody: every member refuses a removed node's records.
        raise Forbidden("this node was removed from the cluster (meshmail remove): it refuses writes")
    return None


async def http_error(exc: HTTPException):
    headers = {"WWW-Authenticate": "Bearer"} if exc.code == 401 else {}
    return {"error": exc.description}, exc.code, headers


async def unexpected(exc: Exception):
    log.exception("error answering %s %s", request.method, request.path)
    return {"error": "internal error (see the node's log)"}, 500
