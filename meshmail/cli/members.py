"""`meshmail status`, `leave` and `remove`: a node's view of the members, and members going."""

from __future__ import annotations

import argparse
import json
import urllib.parse

from .client import call, request, target
from .render import format_status


def status(args: argparse.Namespace) -> int:
    document = call(args, "GET", "/status")
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(format_status(document))
    return 0


def leave(args: argparse.Namespace) -> int:
    node = target(args)
    request(node, "POST", "/leave", {})
    print(f"meshmail: node at {node.url} is leaving the cluster")
    return 0


def remove(args: argparse.Namespace) -> int:
    body = {"force": True} if args.force else {}
    document = call(args, "POST", f"/nodes/{urllib.parse.quote(args.node, safe='')}/remove", body)
    already = " (it already was)" if document.get("already") else ""
    print(
        f"meshmail: node {args.node} removed from the cluster{already}; rotate the gossip key if it was compromised:"
        " meshmail keyring rotate"
    )
    return 0
