"""The `meshmail` command: run a node, show a running node's view, make it leave, make keys.

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
import urllib.request
from collections.abc import Sequence
from typing import Any

from . import __version__
from .config import DEFAULT_PATH, Config, ConfigError, format_address, load

#: Exit status for failures the operator can fix (argparse uses 2 for usage errors too).
EXIT_FAILURE = 2
DEFAULT_URL = "http://127.0.0.1:8080"
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
    return parser


def _add_target(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", help=f"the node's HTTP address (default {DEFAULT_URL})")
    target.add_argument("--config", "-c", metavar="FILE", help="take the node's HTTP address from its config")


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


# --- talking to a running node ------------------------------------------------------------


def _node_url(args: argparse.Namespace) -> str:
    if args.url:
        return args.url.rstrip("/")
    if args.config:
        return node_url(load(args.config))
    return DEFAULT_URL


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
    return "\n".join(lines)


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
