"""meshmail's HTTP side: a quart-trio app served by hypercorn inside the node.

Step 1 serves the status document and the loopback-only admin calls /leave and /join;
metrics, the admin UI, the webmail front and the HTTP proxy to slaves come later.
"""

from .app import create_app
from .status import status_document

__all__ = ["create_app", "status_document"]
