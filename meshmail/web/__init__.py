"""meshmail's HTTP side: a quart-trio app served by hypercorn inside the node (server.py):
/health and /status (open), the admin API behind a login or an API token, and the join
endpoints a new server uses with its join token."""

from .app import create_app
from .status import status_document

__all__ = ["create_app", "status_document"]
