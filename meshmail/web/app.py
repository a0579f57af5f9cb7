"""The quart-trio application: authentication, request limits and JSON errors, around the
routes of each area (node_api, accounts_api, cluster_api, domains_api).

Every route needs admin credentials (auth.py: a session from the login form, or a bearer
API token) except those marked @public: /health, /status, /metrics, the login form and the
two join endpoints, which a joining server uses with its join token. Every error, including
a malformed or oversized body or an invalid name, is a JSON object {"error": "..."} with a
4xx status, never a 500.
"""

from __future__ import annotations

import logging

from quart import request
from quart_trio import QuartTrio
from werkzeug.exceptions import Forbidden, HTTPException, Unauthorized

from . import accounts_api, auth, cluster_api, domains_api, node_api
from .bodies import MAX_BODY

log = logging.getLogger("meshmail.http")

__all__ = ["MAX_BODY", "create_app"]


def create_app(node) -> QuartTrio:
    """The app serving `node` (a meshmail.services.Context)."""
    app = QuartTrio("meshmail.web")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    metrics = node.metrics
    guard = auth.Auth(lambda: node.replication.state, metrics)
    app.extensions["meshmail.auth"] = guard

    @app.before_request
    async def authenticate():
        handler = app.view_functions.get(request.endpoint) if request.endpoint else None
        if handler is None or getattr(handler, "meshmail_public", False):
            return None
        try:
            principal = guard.principal()
        except auth.CsrfError:
            metrics.csrf_refused.inc()
            raise Forbidden(f"missing or wrong CSRF token (send the {auth.CSRF_HEADER} header)") from None
        if principal is None:
            metrics.unauthenticated.inc()
            raise Unauthorized("authentication required: a session (POST /login) or an API token (Bearer)")
        request.principal = principal
        return None

    for area in (node_api, accounts_api, cluster_api, domains_api):
        app.register_blueprint(area.blueprint(node, guard))

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException):
        headers = {"WWW-Authenticate": "Bearer"} if exc.code == 401 else {}
        return {"error": exc.description}, exc.code, headers

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception):
        log.exception("error answering %s %s", request.method, request.path)
        return {"error": "internal error (see the node's log)"}, 500

    return app
