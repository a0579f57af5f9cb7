"""The `meshmail` command line as argparse parsers, built one command group at a time.

A command names its handler as ``"module:function"`` of this package; load_handler imports
that module only when the command runs, so parsing and --help load argparse and a few
constants, not the node (trio, the web stack, cryptography).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

from .. import __version__
from ..core.nodes import (
    DEFAULT_DATA_DIR,
    DEFAULT_GOSSIP_PORT,
    DEFAULT_HTTP_PORT,
    ROLES,
    SERVICES,
)
from . import DATA_DIR_ENV, TOKEN_ENV

DEFAULT_DATA_DIR_HELP = f"${DATA_DIR_ENV}, else {DEFAULT_DATA_DIR}"
JSON_HELP = "print the answer as JSON"
#: What the node asks of every request but GET /status (the CLI sends the API token of the
#: node's data dir, --token or the token variable).
ADMIN_ONLY = "needs an admin login or API token"

Commands = argparse._SubParsersAction


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshmail",
        description="One mail service on many mail servers: gossip-routed IMAP, POP3, SMTP and webmail.",
    )
    parser.add_argument("--version", action="version", version=f"meshmail {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_group in (
        _add_run,
        _add_status_and_leave,
        _add_keygen,
        _add_domains,
        _add_route,
        _add_init,
        _add_join,
        _add_token,
        _add_remove,
        _add_keyring,
        _add_slave,
        _add_admin,
        _add_queue,
    ):
        add_group(commands)
    return parser


def load_handler(spec: str) -> Callable[[argparse.Namespace], int]:
    """The function a ``"module:function"`` spec names, importing its module of this package."""
    module, name = spec.split(":")
    return getattr(importlib.import_module(f".{module}", __package__), name)


def _command(commands: Commands, name: str, handler: str | None, summary: str, description: str):
    sub = commands.add_parser(name, help=summary, description=description)
    sub.set_defaults(handler=handler)
    return sub


def _actions(parser: argparse.ArgumentParser) -> Commands:
    return parser.add_subparsers(dest="action", required=True, metavar="ACTION")


def _action(actions: Commands, name: str, handler: str, summary: str, *, target: bool = True, json: bool = False):
    """A subcommand whose description is its summary as a sentence."""
    sub = actions.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
    sub.set_defaults(handler=handler)
    if target:
        add_target(sub)
    if json:
        sub.add_argument("--json", action="store_true", help=JSON_HELP)
    return sub


def add_target(parser: argparse.ArgumentParser) -> None:
    """--data-dir, --config or --url (+ --token, --ca): how a command finds the running node it
    talks to and its credentials. With none, the node of the default data dir."""
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--data-dir",
        metavar="DIR",
        help=f"the local node of DIR: its config, API token and CA (default: {DEFAULT_DATA_DIR_HELP})",
    )
    target.add_argument("--config", "-c", metavar="FILE", help="the local node of this config (and its data dir)")
    target.add_argument("--url", help="a node's HTTP address, e.g. https://10.0.0.5:8443 (with --token and --ca)")
    parser.add_argument("--token", metavar="TOKEN", help=f"API token for --url (default: ${TOKEN_ENV})")
    parser.add_argument(
        "--ca",
        metavar="FILE",
        help="the cluster's CA certificate, to verify an https --url with (ca.pem in a node's data dir)",
    )


def _add_placement(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", metavar="DIR", help=f"where the node keeps its files (default: {DEFAULT_DATA_DIR_HELP})"
    )
    parser.add_argument("--bind", default="0.0.0.0", metavar="ADDR", help="IP address to listen on (default: all)")
    parser.add_argument("--advertise", metavar="ADDR", help="IP address others reach this node at")
    parser.add_argument(
        "--gossip-port",
        type=int,
        default=DEFAULT_GOSSIP_PORT,
        metavar="P",
        help=f"UDP and TCP port of the gossip between nodes (default: {DEFAULT_GOSSIP_PORT})",
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=DEFAULT_HTTP_PORT,
        metavar="P",
        help=f"TCP port of the HTTPS API, status and admin pages (default: {DEFAULT_HTTP_PORT})",
    )
    parser.add_argument("--force", action="store_true", help="replace a node already in --data-dir")


def _add_run(commands: Commands) -> None:
    run = _command(
        commands,
        "run",
        "run:run",
        "run a node",
        "Run a node until SIGTERM or SIGINT, which make it leave the cluster gracefully.",
    )
    source = run.add_mutually_exclusive_group()
    source.add_argument("--config", "-c", metavar="FILE", help="a TOML config written by hand")
    source.add_argument(
        "--data-dir",
        metavar="DIR",
        help=f"a data dir made by init or join (default: {DEFAULT_DATA_DIR_HELP})",
    )
    run.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"), help="default: info")
    run.add_argument("--check", action="store_true", help="only check the config, then exit (0 if it is valid)")
    run.add_argument(
        "--ready-file",
        metavar="FILE",
        help='once listening, write {"gossip": "host:port", "http": "host:port", ...} to FILE as JSON'
        " (the ports bound, also when the config asks for port 0); removed when the node stops",
    )


def _add_status_and_leave(commands: Commands) -> None:
    status = _command(
        commands,
        "status",
        "members:status",
        "show a running node's view of the cluster",
        "Print the members a running node knows, their state and its counters (GET /status).",
    )
    add_target(status)
    status.add_argument("--json", action="store_true", help="print the status document as JSON")
    leave = _command(
        commands,
        "leave",
        "members:leave",
        "make a running node leave the cluster and stop",
        f"Ask a running node to leave the cluster gracefully and stop (POST /leave; {ADMIN_ONLY}).",
    )
    add_target(leave)


def _add_keygen(commands: Commands) -> None:
    _command(
        commands,
        "keygen",
        "keyring:keygen",
        "print a new gossip key",
        "Print a new random 32-byte gossip key, base64-encoded, for [gossip] keys.",
    )


def _add_domains(commands: Commands) -> None:
    domains = _command(
        commands,
        "domains",
        None,
        "read and change the domain map",
        f"Which slave hosts which mail domain, as the node's replicated map says (every action {ADMIN_ONLY}).",
    )
    actions = _actions(domains)
    listing = _action(
        actions, "list", "domains:list_domains", "list the routed domains and their slaves (GET /domains)", json=True
    )
    listing.add_argument("--slave", metavar="NODE", help="only the domains of this slave")
    show = _action(
        actions, "show", "domains:show_domain", "show the slave of one domain (GET /domains/DOMAIN)", json=True
    )
    show.add_argument("domain", help="the mail domain, e.g. example.com")
    assign = _action(
        actions, "assign", "domains:assign", f"route a domain to a slave (PUT /domains/DOMAIN; {ADMIN_ONLY})", json=True
    )
    assign.add_argument("domain", help="the mail domain, e.g. example.com (Unicode names are fine)")
    assign.add_argument("node", help="the slave's node name")
    assign.add_argument(
        "--force", action="store_true", help="assign to a node that is not a known slave (not yet joined, or a master)"
    )
    unassign = _action(
        actions,
        "unassign",
        "domains:unassign",
        f"remove a domain's route (DELETE /domains/DOMAIN; {ADMIN_ONLY})",
        json=True,
    )
    unassign.add_argument("domain", help="the mail domain to route nowhere")
    _action(
        actions,
        "conflicts",
        "domains:conflicts",
        "list the domains claimed by more than one slave (GET /domains/conflicts)",
        json=True,
    )


def _add_route(commands: Commands) -> None:
    route = _command(
        commands,
        "route",
        "domains:route",
        "show where a mail address routes",
        "Print the slave and endpoint that serve ADDRESS over a protocol (GET /route); exit 1 when there is none.",
    )
    add_target(route)
    route.add_argument("address", help="user@domain")
    route.add_argument("--protocol", "-p", default="imap", choices=SERVICES, help="default: imap")
    route.add_argument("--json", action="store_true", help=JSON_HELP)


def _add_init(commands: Commands) -> None:
    init = _command(
        commands,
        "init",
        "bootstrap:init",
        "create a cluster with this server as its first master",
        "Create a cluster: its CA, this master's certificate, the gossip key, the first admin account and a"
        " config, all in --data-dir. Then start the node with: meshmail run --data-dir DIR",
    )
    init.add_argument(
        "--name", required=True, metavar="CLUSTER", help="the cluster's name: 1 to 63 letters, digits and . _ -"
    )
    init.add_argument("--node-name", metavar="NAME", help="this node's name (default: the host name)")
    _add_placement(init)
    init.add_argument("--admin", default="admin", metavar="ACCOUNT", help="the first admin account (default: admin)")
    init.add_argument("--admin-password-file", metavar="FILE", help="read its password from FILE (default: prompt)")


def _add_join(commands: Commands) -> None:
    join = _command(
        commands,
        "join",
        "bootstrap:join",
        "attach this server to a cluster with a join token",
        "Redeem a join token at a master of the cluster (over TLS, checked against the CA the token pins) and"
        " write this node's config, keys and certificate to --data-dir. Then: meshmail run --data-dir DIR",
    )
    join.add_argument("token", help="the token printed by `meshmail token create`")
    join.add_argument("--role", required=True, choices=ROLES, help="the role this server takes")
    join.add_argument("--name", metavar="NAME", help="this node's name (default: the host name)")
    _add_placement(join)


def _add_token(commands: Commands) -> None:
    token = _command(
        commands,
        "token",
        None,
        "create, list and revoke join tokens",
        f"Join tokens attach new servers ({ADMIN_ONLY}).",
    )
    actions = _actions(token)
    create = actions.add_parser(
        "create",
        help="create a join token (POST /tokens)",
        description="Create a join token and print it with the command to run.",
    )
    create.set_defaults(handler="tokens:create")
    create.add_argument("--role", required=True, choices=ROLES, help="the role the new server takes")
    create.add_argument("--ttl", default="24h", help="how long it is valid: 30m, 24h, 7d (default: 24h)")
    create.add_argument("--uses", type=int, default=1, help="how many servers may join with it (default: 1)")
    create.add_argument("--note", default="", help="a note shown by token list")
    create.add_argument("--quiet", "-q", action="store_true", help="print only the token")
    add_target(create)
    _action(actions, "list", "tokens:list_tokens", "list the join tokens and their status (GET /tokens)", json=True)
    revoke = _action(actions, "revoke", "tokens:revoke", "revoke a join token (DELETE /tokens/ID)")
    revoke.add_argument("id", help="the token's id, or a prefix of it that only it has (token list shows the ids)")


def _add_remove(commands: Commands) -> None:
    remove = _command(
        commands,
        "remove",
        "members:remove",
        "take a node out of the cluster for good",
        "Mark NODE removed in the replicated state: every node refuses its gossip and its API tokens stop"
        " working. After removing a compromised node, rotate the gossip key: meshmail keyring rotate.",
    )
    remove.add_argument("node", help="the node's name")
    remove.add_argument("--force", action="store_true", help="remove a name no node here knows (it can never join)")
    add_target(remove)


def _add_keyring(commands: Commands) -> None:
    keyring = _command(
        commands,
        "keyring",
        None,
        "list and rotate the gossip keys",
        f"The gossip keys of the whole cluster ({ADMIN_ONLY}).",
    )
    actions = _actions(keyring)
    key_id = "the key's id, or a prefix of it that only it has (keyring list shows the ids)"
    _action(actions, "list", "keyring:list_keys", "list the keys and how many live members hold each", json=True)
    install = _action(actions, "install", "keyring:install", "install a key on every member (it is not used yet)")
    install.add_argument("key", help="a base64 key from meshmail keygen")
    _action(actions, "use", "keyring:use", "make an installed key the primary key everywhere").add_argument(
        "id", help=key_id
    )
    _action(actions, "remove", "keyring:remove", "remove a key that is not primary from every member").add_argument(
        "id", help=key_id
    )
    rotate = _action(actions, "rotate", "keyring:rotate", "install a new key, make it primary, remove the old ones")
    rotate.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each step (default: 60)")


def _add_slave(commands: Commands) -> None:
    slave = _command(
        commands, "slave", None, "what a slave publishes", "The domain sources and services of a slave node."
    )
    actions = _actions(slave)
    domains = actions.add_parser(
        "domains",
        help="the domains this slave publishes and from which source (GET /slave)",
        description="The domains this slave publishes, from which source, and each source's state.",
    )
    domains.set_defaults(handler="slave:domains")
    domains.add_argument("--json", action="store_true", help=JSON_HELP)
    add_target(domains)


def _add_admin(commands: Commands) -> None:
    admin = _command(
        commands,
        "admin",
        None,
        "manage admin accounts and API tokens",
        f"Admin accounts of the cluster ({ADMIN_ONLY}).",
    )
    actions = _actions(admin)
    passwd = _action(
        actions, "passwd", "admin:passwd", "create an admin account or set its password (PUT /admins/ACCOUNT)"
    )
    passwd.add_argument("account", help="the admin account's name")
    passwd.add_argument("--password-file", metavar="FILE", help="read the password from FILE (default: prompt)")
    _action(actions, "list", "admin:list_admins", "list the admin accounts (GET /admins)")
    api_token = actions.add_parser(
        "api-token",
        help="create, list and revoke API tokens",
        description="Bearer tokens of the admin API, for scripts and monitoring. A token acts for the account"
        " that created it: the node's own account (node:NAME) when the command uses a node's data dir,"
        " yours when it uses --url with your token.",
    )
    tokens = _actions(api_token)
    create = _action(
        tokens, "create", "admin:create_api_token", "create an API token for the calling account (POST /api-tokens)"
    )
    create.add_argument("--note", default="", help="a note to tell the token apart later (at most 200 characters)")
    create.add_argument("--quiet", "-q", action="store_true", help="print only the token")
    listing = "list the API tokens of every account (GET /api-tokens)"
    _action(tokens, "list", "admin:list_api_tokens", listing, json=True)
    revoke = _action(tokens, "revoke", "admin:revoke_api_token", "revoke an API token (DELETE /api-tokens/ID)")
    revoke.add_argument("id", help="the token's id, or a prefix of it that only it has (api-token list shows them)")


def _add_queue(commands: Commands) -> None:
    queue = _command(
        commands,
        "queue",
        None,
        "list and act on a master's queue of inbound mail",
        "The messages a master's MX keeps until their slave takes them: that master's own queue, every action"
        f" {ADMIN_ONLY}.",
    )
    actions = _actions(queue)
    slave_help = "only the messages waiting for this slave"
    listing = _action(actions, "list", "queue:list_queue", "list the queued messages, oldest first (GET /queue)",
                      json=True)  # fmt: skip
    listing.add_argument("--slave", metavar="NODE", help=slave_help)
    show = _action(actions, "show", "queue:show_message", "show one queued message (GET /queue/ID)", json=True)
    show.add_argument("id", help="the queue id (queue list shows them; the 250 reply named it)")
    flush = _action(actions, "flush", "queue:flush", "try the queued messages now (POST /queue/flush)", json=True)
    flush.add_argument("--slave", metavar="NODE", help=slave_help)
    retry = _action(actions, "retry", "queue:retry", "try one queued message now (POST /queue/ID/retry)", json=True)
    retry.add_argument("id", help="the queue id")
    delete = _action(
        actions,
        "delete",
        "queue:delete",
        "delete a queued message, undelivered and with no notice to its sender (DELETE /queue/ID)",
        json=True,
    )
    delete.add_argument("id", help="the queue id")
