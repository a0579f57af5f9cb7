"""The node a request is for: its Context and the auth state of its API, from the app
serving it (several nodes may run in one process: tests do)."""

from __future__ import annotations

from quart import current_app

from ..services import Context
from .auth import Auth


def ctx() -> Context:
    """The Context of the node whose app answers the current request."""
    return current_app.extensions["meshmail.ctx"]


def guard() -> Auth:
    """The authentication state of that node's API."""
    return current_app.extensions["meshmail.auth"]
