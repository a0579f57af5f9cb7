"""What every layer says about nodes: the roles, the services they offer, the rule for node
names, the default ports."""

from __future__ import annotations

import re

from .errors import MeshmailError

ROLES = ("master", "slave")
#: The services a node publishes endpoints for (and routes answer for).
SERVICES = ("imap", "pop3", "smtp", "submission", "lmtp", "http")
#: 1 to 63 letters, digits and . _ - starting with a letter or digit: fits a DNS label, a
#: certificate CN, a file name and a log line without quoting.
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", re.ASCII)
NODE_NAME_RULE = "a node name is 1 to 63 letters, digits and . _ - (starting with a letter or digit)"

DEFAULT_GOSSIP_PORT = 7946
#: One HTTP port default for config, init, join and the CLI. With a [tls] section (init and
#: join write one) it speaks HTTPS.
DEFAULT_HTTP_PORT = 8443
#: Where a master's MX listens, and where it keeps other masters' shadow copies of queued mail.
MX_PORT = 25
SHADOW_PORT = 7947
DEFAULT_DATA_DIR = "/var/lib/meshmail"


#: A cluster name follows the same rule: it is bound into every gossip packet and names the CA.
CLUSTER_NAME_RULE = "a cluster name is 1 to 63 letters, digits and . _ - (starting with a letter or digit)"


class NodeNameError(MeshmailError, ValueError):
    """A node name that breaks the rule; str() states the rule."""


def check_node_name(name: object) -> str:
    """`name` if it follows NODE_NAME; raises NodeNameError."""
    if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
        shown = f"{name[:80]!r}: " if isinstance(name, str) else ""
        raise NodeNameError(shown + NODE_NAME_RULE)
    return name


def check_cluster_name(name: object) -> str:
    """`name` if it follows the rule of node names; raises NodeNameError."""
    if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
        shown = f"{name[:80]!r}: " if isinstance(name, str) else ""
        raise NodeNameError(shown + CLUSTER_NAME_RULE)
    return name


def check_role(role: object) -> str:
    """`role` if it is one of ROLES; raises ValueError."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    return role
