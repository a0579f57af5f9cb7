"""`meshmail domains ...` and `meshmail route`: the domain map and where an address routes.

Domain names are only quoted here; the node normalizes them and says why one is invalid.
"""

from __future__ import annotations

import argparse
import urllib.parse

from .client import call
from .render import format_conflicts, format_domain, format_domains, format_route, show


def list_domains(args: argparse.Namespace) -> int:
    query = "?" + urllib.parse.urlencode({"slave": args.slave}) if args.slave else ""
    document = call(args, "GET", "/domains" + query)
    show(args, document, lambda: format_domains(document["domains"]))
    return 0


def show_domain(args: argparse.Namespace) -> int:
    document = call(args, "GET", _domain_path(args))
    show(args, document, lambda: format_domain(document))
    return 0


def assign(args: argparse.Namespace) -> int:
    document = call(args, "PUT", _domain_path(args), {"slave": args.node, "force": args.force})
    show(args, document, lambda: format_domain(document))
    return 0


def unassign(args: argparse.Namespace) -> int:
    document = call(args, "DELETE", _domain_path(args))
    name = document["domain"]
    show(args, document, lambda: f"{name} unassigned" if document["removed"] else f"{name} was not assigned")
    return 0


def conflicts(args: argparse.Namespace) -> int:
    document = call(args, "GET", "/domains/conflicts")
    show(args, document, lambda: format_conflicts(document["conflicts"]))
    return 0


def route(args: argparse.Namespace) -> int:
    query = urllib.parse.urlencode({"address": args.address, "protocol": args.protocol})
    document = call(args, "GET", f"/route?{query}")
    show(args, document, lambda: format_route(args.address, args.protocol, document))
    return 0 if "route" in document else 1


def _domain_path(args: argparse.Namespace) -> str:
    return f"/domains/{urllib.parse.quote(args.domain, safe='')}"
