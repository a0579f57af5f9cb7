"""The `meshmail` command: run a node, show a running node's view, make it leave, make keys,
read and change the domain map, and ask where an address routes.

Expected failures (a bad config, an address in use, a node that does not answer) print
one line ``meshmail: ...`` on stderr and exit with status 2; tracebacks are for bugs.
The HTTP client is urllib, so the command needs nothing beyond the node's own packages.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import logging
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs

from . import __version__
from .config import DEFAULT_PATH, Config, load
from .core.address import Address, format_address
from .core.clock import human_ms, wall_ms
from .core.errors import MeshmailError
from .core.nodes import DEFAULT_DATA_DIR, DEFAULT_HTTP_PORT
from .nodemeta import SERVICES

#: Exit status for failures the operator can fix (argparse uses 2 for usage errors too).
EXIT_FAILURE = 2
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_HTTP_PORT}"
#: The config a node's data dir holds, for --data-dir.
CONFIG_NAME = "meshmail.toml"
HTTP_TIMEOUT = 10.0


class CommandError(MeshmailError):
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
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", "-c", metavar="FILE", help=f"TOML config (e.g. {DEFAULT_PATH})")
    source.add_argument("--data-dir", metavar="DIR", help=f"a data dir made by init or join (its {CONFIG_NAME})")
    run.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"), help="default: info")
    run.add_argument("--check", action="store_true", help="only check the config, then exit (0 if it is valid)")
    run.add_argument(
        "--ready-file",
        metavar="FILE",
        help='once listening, write {"gossip": "host:port", "http": "host:port", ...} to FILE as JSON'
        " (the ports bound, also when the config asks for port 0); removed when the node stops",
    )

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

    init = command(
        "init",
        _init,
        "create a cluster with this server as its first master",
        "Create a cluster: its CA, this master's certificate, the gossip key, the first admin account and a"
        " config, all in --data-dir. Then start the node with: meshmail run --data-dir DIR",
    )
    init.add_argument("--name", required=True, metavar="CLUSTER", help="the cluster's name")
    init.add_argument("--node-name", metavar="NAME", help="this node's name (default: the host name)")
    _add_placement(init)
    init.add_argument("--admin", default="admin", metavar="ACCOUNT", help="the first admin account (default: admin)")
    init.add_argument("--admin-password-file", metavar="FILE", help="read its password from FILE (default: prompt)")

    join = command(
        "join",
        _join,
        "attach this server to a cluster with a join token",
        "Redeem a join token at a master of the cluster (over TLS, checked against the CA the token pins) and"
        " write this node's config, keys and certificate to --data-dir. Then: meshmail run --data-dir DIR",
    )
    join.add_argument("token", help="the token printed by `meshmail token create`")
    join.add_argument("--role", required=True, choices=("slave", "master"))
    join.add_argument("--name", metavar="NAME", help="this node's name (default: the host name)")
    _add_placement(join)

    token = command("token", None, "create, list and revoke join tokens", "Join tokens attach new servers.")
    token_actions = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = token_actions.add_parser(
        "create",
        help="create a join token (POST /tokens)",
        description="Create a join token and print it with the command to run.",
    )
    create.set_defaults(handler=_token_create)
    create.add_argument("--role", required=True, choices=("slave", "master"))
    create.add_argument("--ttl", default="24h", help="how long it is valid: 30m, 24h, 7d (default: 24h)")
    create.add_argument("--uses", type=int, default=1, help="how many servers may join with it (default: 1)")
    create.add_argument("--note", default="", help="a note shown by token list")
    create.add_argument("--quiet", "-q", action="store_true", help="print only the token")
    _add_target(create)
    listing_tokens = token_actions.add_parser("list", help="list join tokens (GET /tokens)")
    listing_tokens.set_defaults(handler=_token_list)
    listing_tokens.add_argument("--json", action="store_true", help="print the answer as JSON")
    _add_target(listing_tokens)
    revoke = token_actions.add_parser("revoke", help="revoke a join token (DELETE /tokens/ID)")
    revoke.set_defaults(handler=_token_revoke)
    revoke.add_argument("id", help="the token id (token list)")
    _add_target(revoke)

    remove = command(
        "remove",
        _remove,
        "take a node out of the cluster for good",
        "Mark NODE removed in the replicated state: every node refuses its gossip and its API tokens stop"
        " working. After removing a compromised node, rotate the gossip key: meshmail keyring rotate.",
    )
    remove.add_argument("node")
    remove.add_argument("--force", action="store_true", help="remove a name no node here knows (it can never join)")
    _add_target(remove)

    keyring = command("keyring", None, "list and rotate the gossip keys", "The gossip keys of the whole cluster.")
    key_actions = keyring.add_subparsers(dest="action", required=True, metavar="ACTION")

    def key_action(name: str, handler, summary: str) -> argparse.ArgumentParser:
        sub = key_actions.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
        sub.set_defaults(handler=handler)
        _add_target(sub)
        return sub

    key_action("list", _keyring_list, "list the keys and how many live members hold each").add_argument(
        "--json", action="store_true", help="print the answer as JSON"
    )
    key_action("install", _keyring_install, "install a key on every member (it is not used yet)").add_argument(
        "key", help="a base64 key from meshmail keygen"
    )
    key_action("use", _keyring_use, "make an installed key the primary key everywhere").add_argument("id")
    key_action("remove", _keyring_remove, "remove a key that is not primary from every member").add_argument("id")
    rotate = key_action("rotate", _keyring_rotate, "install a new key, make it primary, remove the old ones")
    rotate.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each step (default: 60)")

    slave = command("slave", None, "what a slave publishes", "The domain sources and services of a slave node.")
    slave_actions = slave.add_subparsers(dest="action", required=True, metavar="ACTION")
    slave_domains = slave_actions.add_parser(
        "domains",
        help="the domains this slave publishes and from which source (GET /slave)",
        description="The domains this slave publishes, from which source, and each source's state.",
    )
    slave_domains.set_defaults(handler=_slave_domains)
    slave_domains.add_argument("--json", action="store_true", help="print the answer as JSON")
    _add_target(slave_domains)

    admin = command("admin", None, "manage admin accounts and API tokens", "Admin accounts of the cluster.")
    admin_actions = admin.add_subparsers(dest="action", required=True, metavar="ACTION")
    passwd = admin_actions.add_parser("passwd", help="create an account or set its password (PUT /admins/ACCOUNT)")
    passwd.set_defaults(handler=_admin_passwd)
    passwd.add_argument("account")
    passwd.add_argument("--password-file", metavar="FILE", help="read the password from FILE (default: prompt)")
    _add_target(passwd)
    admins = admin_actions.add_parser("list", help="list admin accounts (GET /admins)")
    admins.set_defaults(handler=_admin_list)
    _add_target(admins)
    api_token = admin_actions.add_parser("api-token", help="create an API token for your account (POST /api-tokens)")
    api_token.set_defaults(handler=_admin_api_token)
    api_token.add_argument("--note", default="")
    _add_target(api_token)
    return parser


def _add_placement(parser: argparse.ArgumentParser) -> None:
    from .core.nodes import DEFAULT_GOSSIP_PORT

    parser.add_argument("--data-dir", required=True, metavar="DIR", help="where the node keeps its files")
    parser.add_argument("--bind", default="0.0.0.0", metavar="ADDR", help="IP address to listen on (default: all)")
    parser.add_argument("--advertise", metavar="ADDR", help="IP address others reach this node at")
    parser.add_argument("--gossip-port", type=int, default=DEFAULT_GOSSIP_PORT, metavar="P")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT, metavar="P")
    parser.add_argument("--force", action="store_true", help="replace a node already in --data-dir")


def _add_target(parser: argparse.ArgumentParser) -> None:
    """--data-dir, --config or --url (+ --token, --ca): how a command finds the running node
    it talks to and its credentials.

    With none, the node of the default data dir if there is one, else DEFAULT_URL.
    """
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--data-dir",
        metavar="DIR",
        help=f"the local node of DIR: its config {CONFIG_NAME}, API token and CA (default: {DEFAULT_DATA_DIR})",
    )
    target.add_argument("--config", "-c", metavar="FILE", help="the local node of this config (and its data dir)")
    target.add_argument("--url", help="a node's HTTP address, e.g. https://10.0.0.5:8443 (with --token)")
    parser.add_argument("--token", metavar="TOKEN", help="API token for --url (default: $MESHMAIL_TOKEN)")
    parser.add_argument("--ca", metavar="FILE", help="CA certificate to verify an https --url with")


# --- commands -----------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    import trio

    from .core.files import atomic_write
    from .node import serve

    path = args.config or str(Path(args.data_dir) / CONFIG_NAME)
    config = load(path)
    if args.check:
        print(f"meshmail: {path}: config ok (node {config.node.name}, cluster {config.gossip.cluster})")
        return 0
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )

    async def run_node() -> None:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(partial(serve, config, leave_on_signals=True))
            if args.ready_file:
                document = {name: format_address(address) for name, address in bound.items()}
                atomic_write(args.ready_file, [json.dumps(document).encode() + b"\n"], mode=0o644)

    try:
        trio.run(run_node)
    except KeyboardInterrupt:
        # Only before the signal handler is installed; after it, SIGINT means leave.
        return 130
    finally:
        if args.ready_file:
            Path(args.ready_file).unlink(missing_ok=True)
    return 0


def _status(args: argparse.Namespace) -> int:
    document = _call(args, "GET", "/status")
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(format_status(document))
    return 0


def _leave(args: argparse.Namespace) -> int:
    _call(args, "POST", "/leave", {})
    print(f"meshmail: node at {_target(args).url} is leaving the cluster")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from .gossip.keyring import encode_key, new_key

    print(encode_key(new_key()))
    return 0


def _domains_list(args: argparse.Namespace) -> int:
    query = "?" + urllib.parse.urlencode({"slave": args.slave}) if args.slave else ""
    document = _call(args, "GET", "/domains" + query)
    _print(args, document, lambda: format_domains(document["domains"]))
    return 0


def _domains_show(args: argparse.Namespace) -> int:
    document = _call(args, "GET", _domain_path(args))
    _print(args, document, lambda: format_domain(document))
    return 0


def _domains_assign(args: argparse.Namespace) -> int:
    document = _call(args, "PUT", _domain_path(args), {"slave": args.node})
    _print(args, document, lambda: format_domain(document))
    return 0


def _domains_unassign(args: argparse.Namespace) -> int:
    document = _call(args, "DELETE", _domain_path(args))
    name = document["domain"]
    _print(args, document, lambda: f"{name} unassigned" if document["removed"] else f"{name} was not assigned")
    return 0


def _domains_conflicts(args: argparse.Namespace) -> int:
    document = _call(args, "GET", "/domains/conflicts")
    _print(args, document, lambda: format_conflicts(document["conflicts"]))
    return 0


def _route(args: argparse.Namespace) -> int:
    query = urllib.parse.urlencode({"address": args.address, "protocol": args.protocol})
    document = _call(args, "GET", f"/route?{query}")
    _print(args, document, lambda: format_route(args.address, args.protocol, document))
    return 0 if "route" in document else 1


# --- cluster bootstrap and security -------------------------------------------------------


def _read_password(path: str | None, prompt: str) -> str:
    if path:
        try:
            with open(path, encoding="utf-8") as file:
                return file.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise CommandError(f"cannot read the password from {path}: {reason}") from None
    import getpass

    if not sys.stdin.isatty():
        raise CommandError("no terminal to ask the password on; pass a password file")
    first = getpass.getpass(prompt)
    if first != getpass.getpass("Again: "):
        raise CommandError("the passwords differ")
    return first


def _placement(args: argparse.Namespace, name: str | None, role: str, toward: str | None = None):
    from .security.bootstrap import placement

    return placement(
        name=name,
        role=role,
        data_dir=args.data_dir,
        bind=args.bind,
        advertise=args.advertise,
        gossip_port=args.gossip_port,
        http_port=args.http_port,
        toward=toward,
    )


def _init(args: argparse.Namespace) -> int:
    from .security import ca
    from .security.bootstrap import check_free, init_cluster

    where = _placement(args, args.node_name, "master")
    check_free(where.data_dir, args.force)
    password = _read_password(args.admin_password_file, f"Password for admin account {args.admin}: ")
    authority = init_cluster(where, args.name, args.admin, password, force=args.force, wall_ms=wall_ms)
    pin = ca.show_fingerprint(authority.fingerprint)
    print(f"meshmail: cluster {args.name} created in {where.data_dir} (CA {pin})")
    print(f"meshmail: start this master with: meshmail run --data-dir {where.data_dir}")
    return 0


def _join(args: argparse.Namespace) -> int:
    from .security.bootstrap import join_cluster
    from .security.tokens import parse_join_token

    token = parse_join_token(args.token)
    toward = Address.parse(token.masters[0]).host
    where = _placement(args, args.name, args.role, toward=toward)
    grant = join_cluster(args.token, where, force=args.force)
    print(f"meshmail: {where.name} joined cluster {grant['cluster']} as {where.role}; files in {where.data_dir}")
    print(f"meshmail: start it with: meshmail run --data-dir {where.data_dir}")
    return 0


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``30s``, ``15m``, ``24h`` or ``7d``; raises CommandError."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        value = float(number)
    except ValueError:
        raise CommandError(f"--ttl {text!r} is not a duration like 30m, 24h or 7d") from None
    from .security.admission import MAX_TTL_S

    if not 1 <= value * units[unit] <= MAX_TTL_S:
        raise CommandError(f"--ttl {text!r} must be 1s to {MAX_TTL_S // 86400}d")
    return value * units[unit]


def _token_create(args: argparse.Namespace) -> int:
    body = {"role": args.role, "ttl": parse_duration(args.ttl), "uses": args.uses, "note": args.note}
    document = _call(args, "POST", "/tokens", body)
    if args.quiet:
        print(document["token"])
        return 0
    expires = human_ms(document["expires_ms"])
    print(f"join token {document['id']} for a {args.role}, {args.uses} use(s), valid until {expires}:")
    print()
    print(f"  {document['token']}")
    print()
    print("on the new server, run:")
    print()
    print(f"  meshmail join {document['token']} --role {args.role} --data-dir {DEFAULT_DATA_DIR}")
    print(f"  meshmail run --data-dir {DEFAULT_DATA_DIR}")
    return 0


def _token_list(args: argparse.Namespace) -> int:
    document = _call(args, "GET", "/tokens")
    _print(args, document, lambda: format_tokens(document["tokens"]))
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    _call(args, "DELETE", f"/tokens/{urllib.parse.quote(args.id, safe='')}")
    print(f"meshmail: token {args.id} revoked")
    return 0


def _remove(args: argparse.Namespace) -> int:
    body = {"force": True} if args.force else {}
    document = _call(args, "POST", f"/nodes/{urllib.parse.quote(args.node, safe='')}/remove", body)
    already = " (it already was)" if document.get("already") else ""
    print(
        f"meshmail: node {args.node} removed from the cluster{already}; rotate the gossip key if it was compromised:"
        " meshmail keyring rotate"
    )
    return 0


def _keyring_list(args: argparse.Namespace) -> int:
    document = _call(args, "GET", "/keyring")
    _print(args, document, lambda: format_keyring(document))
    return 0


def _keyring_install(args: argparse.Namespace) -> int:
    document = _call(args, "POST", "/keyring", {"action": "install", "key": args.key})
    print(f"meshmail: key {document['id']} installed")
    return 0


def _keyring_use(args: argparse.Namespace) -> int:
    _call(args, "POST", "/keyring", {"action": "use", "id": args.id})
    print(f"meshmail: key {args.id} is the primary key")
    return 0


def _keyring_remove(args: argparse.Namespace) -> int:
    _call(args, "POST", "/keyring", {"action": "remove", "id": args.id})
    print(f"meshmail: key {args.id} removed")
    return 0


def _keyring_rotate(args: argparse.Namespace) -> int:
    """install a new key, wait until every live member holds it; make it primary, wait until
    every live member uses it; then remove every other key and wait until none holds one."""
    import time

    from .gossip.keyring import encode_key, new_key

    target = _target(args)
    old = [key["id"] for key in request(target, "GET", "/keyring")["keys"]]
    kid = request(target, "POST", "/keyring", {"action": "install", "key": encode_key(new_key())})["id"]
    print(f"meshmail: key {kid} installed; waiting for every member to hold it")

    def wait(what: str, done) -> None:
        deadline = time.monotonic() + args.timeout
        while True:
            document = request(target, "GET", "/keyring")
            keys = {key["id"]: key for key in document["keys"]}
            if kid in keys and done(keys, document["members"]):
                return
            if time.monotonic() > deadline:
                raise CommandError(
                    f"key {kid}: not {what} after {args.timeout:g} s (keyring list shows who lags);"
                    " run meshmail keyring rotate again or finish by hand with keyring use/remove"
                )
            time.sleep(0.5)

    wait("installed everywhere", lambda keys, members: keys[kid]["installed_on"] == members)
    request(target, "POST", "/keyring", {"action": "use", "id": kid})
    print(f"meshmail: key {kid} is primary; waiting for every member to use it")
    wait("primary everywhere", lambda keys, members: keys[kid]["primary_on"] == members)
    others = [other for other in old if other != kid]
    for other in others:
        request(target, "POST", "/keyring", {"action": "remove", "id": other})
        print(f"meshmail: key {other} removed")
    wait("the only key left", lambda keys, _: not any(keys.get(old_id, {}).get("installed_on") for old_id in others))
    print(f"meshmail: key {kid} is the only key of every live member")
    return 0


def _slave_domains(args: argparse.Namespace) -> int:
    document = _call(args, "GET", "/slave")
    _print(args, document, lambda: format_slave(document))
    return 0


def _admin_passwd(args: argparse.Namespace) -> int:
    password = _read_password(args.password_file, f"New password for {args.account}: ")
    _call(args, "PUT", f"/admins/{urllib.parse.quote(args.account, safe='')}", {"password": password})
    print(f"meshmail: password of {args.account} set")
    return 0


def _admin_list(args: argparse.Namespace) -> int:
    for account in _call(args, "GET", "/admins")["admins"]:
        print(account)
    return 0


def _admin_api_token(args: argparse.Namespace) -> int:
    document = _call(args, "POST", "/api-tokens", {"note": args.note})
    print(document["token"])
    return 0


def _print(args: argparse.Namespace, document: Any, render) -> None:
    print(json.dumps(document, indent=2, ensure_ascii=False) if args.json else render())


# --- talking to a running node ------------------------------------------------------------


@attrs.frozen
class Target:
    """A running node to talk to: base URL, API token, and CA file for https."""

    url: str
    token: str | None = attrs.field(default=None, repr=False)
    ca: str | None = None


def _target(args: argparse.Namespace) -> Target:
    if args.url:
        return Target(args.url.rstrip("/"), args.token or os.environ.get("MESHMAIL_TOKEN"), args.ca)
    if args.config:
        return local_target(load(args.config), args.token)
    if args.data_dir:
        return local_target(load(Path(args.data_dir) / CONFIG_NAME), args.token)
    default = Path(DEFAULT_DATA_DIR) / CONFIG_NAME
    if default.is_file():
        return local_target(load(default), args.token)
    return Target(DEFAULT_URL, args.token or os.environ.get("MESHMAIL_TOKEN"), args.ca)


def local_target(config: Config, token: str | None = None) -> Target:
    """The node of `config` as seen from this host, with the API token of its data dir."""
    from .security import files

    if token is None:
        try:
            token = files.read_api_token(Path(config.node.data_dir))
        except files.FilesError as exc:
            raise CommandError(str(exc)) from None
    return Target(node_url(config), token, config.tls.ca if config.tls else None)


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
    scheme = "https" if config.tls is not None else "http"
    return f"{scheme}://{format_address((host, port))}"


def _domain_path(args: argparse.Namespace) -> str:
    # The node normalizes the name and says why one is invalid; here it is only quoted.
    return f"/domains/{urllib.parse.quote(args.domain, safe='')}"


def _call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> Any:
    return request(_target(args), method, path, body)


def request(target: Target, method: str, path: str, body: dict | None = None) -> Any:
    """Send one request to the node and return its decoded JSON answer; raises CommandError."""
    url = target.url + path
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if target.token:
        headers["Authorization"] = f"Bearer {target.token}"
    context = None
    if url.startswith("https:"):
        try:
            context = ssl.create_default_context(cafile=target.ca)
        except OSError as exc:
            raise CommandError(f"cannot read the CA {target.ca}: {exc.strerror or exc}") from None
        if target.ca:
            context.check_hostname = False  # any node certificate of this cluster's CA will do
    try:
        message = urllib.request.Request(url, data=data, method=method, headers=headers)
        with urllib.request.urlopen(message, timeout=HTTP_TIMEOUT, context=context) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        hint = ""
        if exc.code == 401:
            hint = " (give an API token: --data-dir of the node, --token or $MESHMAIL_TOKEN)"
        raise CommandError(f"node at {target.url} answered {exc.code}: {_error_text(exc)}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        problem = getattr(reason, "verify_message", None) or getattr(reason, "strerror", None) or reason
        raise CommandError(f"cannot reach the node at {target.url}: {problem}") from None
    except (ValueError, http.client.InvalidURL) as exc:
        raise CommandError(f"bad URL {url!r}: {exc}") from None
    except http.client.HTTPException as exc:
        kind = type(exc).__name__
        raise CommandError(f"{target.url} does not answer HTTP as a meshmail node does ({kind})") from None
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
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return str(exc) if isinstance(exc, MeshmailError) else None


# --- rendering ----------------------------------------------------------------------------


def format_status(document: dict[str, Any]) -> str:
    """The status document as the table `meshmail status` prints."""
    header = (
        f"node {document['node']} ({document['role']}) in cluster {document['cluster']}"
        f" at {document['address']}, incarnation {document['incarnation']}, health {document['health_score']}"
    )
    rows = [("NAME", "STATE", "INC", "ADDRESS", "ROLE", "ENDPOINTS", "CHANGED")]
    for member in document["members"]:
        endpoints = ",".join(
            f"{service}={endpoint['address']}{'' if endpoint['up'] else '(down)'}"
            for service, endpoint in member["endpoints"].items()
        )
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


def format_tokens(tokens: list[dict[str, Any]]) -> str:
    if not tokens:
        return "(no join tokens)"
    rows = [("ID", "ROLE", "STATUS", "USED", "EXPIRES", "CREATOR", "NOTE")]
    rows += [
        (
            t["id"],
            t["role"],
            t["status"],
            f"{t['used']}/{t['uses']}",
            human_ms(t["expires_ms"]),
            t["creator"],
            t["note"],
        )
        for t in tokens
    ]
    return "\n".join(_columns(rows))


def format_slave(document: dict[str, Any]) -> str:
    """`meshmail slave domains`: the domains and their sources, then each source's state."""
    rows = [("DOMAIN", "SOURCES", "STATUS")]
    rows += [(d["domain"], ",".join(d["sources"]), d["status"]) for d in document["domains"]]
    lines = _columns(rows) if document["domains"] else ["(no domains)"]
    lines += ["", "sources:"]
    for source in document["sources"]:
        where = " ".join(source["command"]) or ", ".join(source["paths"].values()) or "config"
        state = source["status"] + (f": {source['detail']}" if source["detail"] else "")
        lines.append(f"  {source['name']} ({source['type']}, {where}): {source['domains']} domains, {state}")
        lines += [f"    skipped {problem}" for problem in source["problems"]]
    if document["health"]:
        lines += ["", "services:"]
        for service, health in document["health"].items():
            lines.append(f"  {service}: {'up' if health['up'] else 'DOWN'} ({health['detail']})")
    return "\n".join(lines)


def format_keyring(document: dict[str, Any]) -> str:
    rows = [("KEY", "STATE", "INSTALLED", "PRIMARY")]
    members = document["members"]
    rows += [
        (k["id"], k["state"], f"{k['installed_on']}/{members}", f"{k['primary_on']}/{members}")
        for k in document["keys"]
    ]
    return "\n".join(_columns(rows))


def _domain_name(document: dict[str, str]) -> str:
    name, display = document["domain"], document["display"]
    return name if display == name else f"{name} ({display})"


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
