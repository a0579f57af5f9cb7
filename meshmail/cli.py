"""The `meshmail` command: run a node, show a running node's view, make it leave, make keys,
read and change the domain map, and ask where an address routes.

Expected failures (a bad config, an address in use, a node that does not answer) print
one line ``meshmail: ...`` on stderr and exit with status 2; tracebacks are for bugs.
The HTTP client is urllib, so the command needs nothing beyond the node's own packages.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import logging
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import DEFAULT_PATH, Config, ConfigError, format_address, load
from .gossip.meta import SERVICES

#: Exit status for failures the operator can fix (argparse uses 2 for usage errors too).
EXIT_FAILURE = 2
DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_DATA_DIR = "/var/lib/meshmail"
#: The config a node's data dir holds, for --data-dir.
CONFIG_NAME = "meshmail.toml"
HTTP_TIMEOUT = 10.0


class CommandError(Exception):
    """A failure to report as one line; str() is the line without the ``meshmail:`` prefix."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except BaseException as exc:
        problem = _expected_problem(exc)
        if problem is None:
            raise
        print(f"meshmail: {problem}", file=sys.stderr)
        return EXIT_FAILURE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshmail",
        description="One mail service on many mail servers: gossip-routed IMAP, POP3, SMTP and webmail.",
    )
    parser.add_argument("--version", action="version", version=f"meshmail {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler, summary: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=description)
        sub.set_defaults(handler=handler)
        return sub

    run = command(
        "run", _run, "run a node", "Run a node until SIGTERM or SIGINT, which make it leave the cluster gracefully."
    )
    run.add_argument("--config", "-c", required=True, metavar="FILE", help=f"TOML config (e.g. {DEFAULT_PATH})")
    run.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"), help="default: info")
    run.add_argument("--check", action="store_true", help="only check the config, then exit (0 if it is valid)")

    status = command(
        "status",
        _status,
        "show a running node's view of the cluster",
        "Print the members a running node knows, their state and its counters (GET /status).",
    )
    _add_target(status)
    status.add_argument("--json", action="store_true", help="print the status document as JSON")

    leave = command(
        "leave",
        _leave,
        "make a running node leave the cluster and stop",
        "Ask a running node to leave the cluster gracefully and stop (POST /leave; loopback only).",
    )
    _add_target(leave)

    command(
        "keygen",
        _keygen,
        "print a new gossip key",
        "Print a new random 32-byte gossip key, base64-encoded, for [gossip] keys.",
    )

    domains = command(
        "domains",
        None,
        "read and change the domain map",
        "Which slave hosts which mail domain, as the node's replicated map says.",
    )
    actions = domains.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, handler, summary: str, json_output: bool = True) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
        sub.set_defaults(handler=handler)
        _add_target(sub)
        if json_output:
            sub.add_argument("--json", action="store_true", help="print the answer as JSON")
        return sub

    listing = action("list", _domains_list, "list the routed domains and their slaves (GET /domains)")
    listing.add_argument("--slave", metavar="NODE", help="only the domains of this slave")
    action("show", _domains_show, "show the slave of one domain (GET /domains/DOMAIN)").add_argument("domain")
    assign = action("assign", _domains_assign, "route a domain to a slave (PUT /domains/DOMAIN; loopback only)")
    assign.add_argument("domain")
    assign.add_argument("node", help="the slave's node name")
    unassign = action("unassign", _domains_unassign, "remove a domain's route (DELETE /domains/DOMAIN; loopback only)")
    unassign.add_argument("domain")
    action("conflicts", _domains_conflicts, "list the domains claimed by more than one slave (GET /domains/conflicts)")

    route = command(
        "route",
        _route,
        "show where a mail address routes",
        "Print the slave and endpoint that serve ADDRESS over a protocol (GET /route); exit 1 when there is none.",
    )
    _add_target(route)
    route.add_argument("address", help="user@domain")
    route.add_argument("--protocol", "-p", default="imap", choices=SERVICES, help="default: imap")
    route.add_argument("--json", action="store_true", help="print the answer as JSON")
    return parser


def _add_target(parser: argparse.ArgumentParser) -> None:
    """--url, --config or --data-dir: how a command finds the running node it talks to.

    With none, the config in the default data dir if there is one, else DEFAULT_URL.
    """
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", help="the node's HTTP address, e.g. http://127.0.0.1:8080")
    target.add_argument("--config", "-c", metavar="FILE", help="take the node's HTTP address from its config")
    target.add_argument(
        "--data-dir",
        metavar="DIR",
        help=f"take it from the config DIR/{CONFIG_NAME} (default: {DEFAULT_DATA_DIR}, or {DEFAULT_URL} without one)",
    )


# --- commands -----------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    import trio

    from .node import serve

    config = load(args.config)
    if args.check:
        print(f"meshmail: {args.config}: config ok (node {config.node.name}, cluster {config.gossip.cluster})")
        return 0
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        trio.run(lambda: serve(config, leave_on_signals=True))
    except KeyboardInterrupt:
        # Only before the signal handler is installed; after it, SIGINT means leave.
        return 130
    return 0


def _status(args: argparse.Namespace) -> int:
    document = _request("GET", _node_url(args) + "/status")
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(format_status(document))
    return 0


def _leave(args: argparse.Namespace) -> int:
    url = _node_url(args)
    _request("POST", url + "/leave", {})
    print(f"meshmail: node at {url} is leaving the cluster")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from .gossip.keyring import new_key

    print(base64.b64encode(new_key()).decode("ascii"))
    return 0


def _domains_list(args: argparse.Namespace) -> int:
    query = "?" + urllib.parse.urlencode({"slave": args.slave}) if args.slave else ""
    document = _request("GET", _node_url(args) + "/domains" + query)
    _print(args, document, lambda: format_domains(document["domains"]))
    return 0


def _domains_show(args: argparse.Namespace) -> int:
    document = _request("GET", _domain_url(args))
    _print(args, document, lambda: format_domain(document))
    return 0


def _domains_assign(args: argparse.Namespace) -> int:
    document = _request("PUT", _domain_url(args), {"slave": args.node})
    _print(args, document, lambda: format_domain(document))
    return 0


def _domains_unassign(args: argparse.Namespace) -> int:
    document = _request("DELETE", _domain_url(args))
    name = document["domain"]
    _print(args, document, lambda: f"{name} unassigned" if document["removed"] else f"{name} was not assigned")
    return 0


def _domains_conflicts(args: argparse.Namespace) -> int:
    document = _request("GET", _node_url(args) + "/domains/conflicts")
    _print(args, document, lambda: format_conflicts(document["conflicts"]))
    return 0


def _route(args: argparse.Namespace) -> int:
    query = urllib.parse.urlencode({"address": args.address, "protocol": args.protocol})
    document = _request("GET", f"{_node_url(args)}/route?{query}")
    _print(args, document, lambda: format_route(args.address, args.protocol, document))
    return 0 if "route" in document else 1


def _print(args: argparse.Namespace, document: Any, render) -> None:
    print(json.dumps(document, indent=2, ensure_ascii=False) if args.json else render())


# --- talking to a running node ------------------------------------------------------------


def _node_url(args: argparse.Namespace) -> str:
    if args.url:
        return args.url.rstrip("/")
    if args.config:
        return node_url(load(args.config))
    if args.data_dir:
        return node_url(load(Path(args.data_dir) / CONFIG_NAME))
    default = Path(DEFAULT_DATA_DIR) / CONFIG_NAME
    return node_url(load(default)) if default.is_file() else DEFAULT_URL


def _domain_url(args: argparse.Namespace) -> str:
    # The node normalizes the name and says why one is invalid; here it is only quoted.
    return f"{_node_url(args)}/domains/{urllib.parse.quote(args.domain, safe='')}"


def node_url(config: Config) -> str:
    """The base URL at which a client on this host reaches the node of `config`."""
    host, port = config.http.bind
    if port == 0:
        raise CommandError(f"{config.path}: http.bind has port 0, so the port is not known; use --url")
    try:
        if ipaddress.ip_address(host).is_unspecified:
            host = "::1" if ":" in host else "127.0.0.1"
    except ValueError:
        pass  # a host name: use it as it is
    return f"http://{format_address((host, port))}"


def _request(method: str, url: str, body: dict | None = None) -> Any:
    """Send one request to the node and return its decoded JSON answer; raises CommandError."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise CommandError(f"node at {url} answered {exc.code}: {_error_text(exc)}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CommandError(f"cannot reach the node at {url}: {getattr(reason, 'strerror', None) or reason}") from None
    except ValueError as exc:
        raise CommandError(f"bad URL {url!r}: {exc}") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise CommandError(f"{url} did not answer JSON (is it a meshmail node?)") from None


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read())["error"])
    except (ValueError, KeyError, TypeError, OSError):
        return exc.reason or "error"


def _expected_problem(exc: BaseException) -> str | None:
    """The one-line text of an expected failure (possibly inside exception groups), else None."""
    from .node import NodeError

    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, (ConfigError, CommandError, NodeError)):
        return str(exc)
    return None


# --- rendering ----------------------------------------------------------------------------


def format_status(document: dict[str, Any]) -> str:
    """The status document as the table `meshmail status` prints."""
    header = (
        f"node {document['node']} ({document['role']}) in cluster {document['cluster']}"
        f" at {document['address']}, incarnation {document['incarnation']}, health {document['health_score']}"
    )
    rows = [("NAME", "STATE", "INC", "ADDRESS", "ROLE", "ENDPOINTS", "CHANGED")]
    for member in document["members"]:
        endpoints = ",".join(f"{service}={address}" for service, address in member["endpoints"].items())
        rows.append(
            (
                member["name"],
                member["state"],
                str(member["incarnation"]),
                member["address"],
                member["role"],
                endpoints or "-",
                member["changed"],
            )
        )
    lines = [header, "", *_columns(rows), "", "counters:"]
    counters = document["counters"]
    width = max((len(name) for name in counters), default=0)
    lines += [f"  {name:<{width}}  {value}" for name, value in counters.items()] or ["  (none)"]
    state = document.get("state")
    if state is not None:
        stale = ", stale until a peer resyncs it" if state["stale"] else ""
        lines += [
            "",
            f"state: {state['domains']} entries, {state['tombstones']} tombstones, {len(state['conflicts'])} conflicts,"
            f" digest {state['digest']}{stale}",
        ]
        lines += [f"  last sync with {peer}: {at}" for peer, at in state["last_sync"].items()]
    return "\n".join(lines)


def format_domains(domains: list[dict[str, str]]) -> str:
    """The domain records of GET /domains as a table; a Unicode name follows its ASCII form."""
    if not domains:
        return "(no domains)"
    rows = [("DOMAIN", "SLAVE", "SOURCE")]
    rows += [(_domain_name(d), d["slave"], d["source"]) for d in domains]
    return "\n".join(_columns(rows))


def format_domain(document: dict[str, str]) -> str:
    """One domain record as a line: ``example.com -> s1 (admin)``."""
    return f"{_domain_name(document)} -> {document['slave']} ({document['source']})"


def format_conflicts(conflicts: list[dict[str, Any]]) -> str:
    if not conflicts:
        return "(no conflicts)"
    rows = [("DOMAIN", "ROUTES TO", "ALSO CLAIMED BY")]
    rows += [(c["domain"], c["routes_to"], ",".join(c["also_claimed_by"])) for c in conflicts]
    return "\n".join(_columns(rows))


def format_route(address: str, protocol: str, document: dict[str, Any]) -> str:
    if "route" in document:
        route = document["route"]
        return f"{address} ({protocol}) -> {route['slave']} at {route['endpoint']} ({route['state']})"
    no_route = document["no_route"]
    return f"{address} ({protocol}): no route ({no_route['reason']}): {no_route['detail']}"


def _domain_name(document: dict[str, str]) -> str:
    name, display = document["domain"], document["display"]
    return name if display == name else f"{name} ({display})"


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
