"""`meshmail init` and `meshmail join`: make this server a cluster's first master, or attach it
to a cluster with a join token. Names are checked here first, so an error names the option."""

from __future__ import annotations

import argparse
import socket

from ..core.address import Address
from ..core.clock import wall_ms
from ..core.nodes import NodeNameError, check_cluster_name, check_node_name
from ..security import ca
from ..security.bootstrap import (
    Placement,
    check_free,
    init_cluster,
    join_cluster,
    placement,
)
from ..security.tokens import parse_join_token
from . import CommandError
from .local import data_dir
from .password import read_password


def init(args: argparse.Namespace) -> int:
    try:
        check_cluster_name(args.name)
    except NodeNameError as exc:
        raise CommandError(f"--name {exc}") from None
    where = _placement(args, node_name(args.node_name, "--node-name"), "master")
    check_free(where.data_dir, args.force)
    password = read_password(
        args.admin_password_file, f"Password for admin account {args.admin}: ", "--admin-password-file"
    )
    authority = init_cluster(where, args.name, args.admin, password, force=args.force, wall_ms=wall_ms)
    pin = ca.show_fingerprint(authority.fingerprint)
    print(f"meshmail: cluster {args.name} created in {where.data_dir} (CA {pin})")
    print(f"meshmail: start this master with: meshmail run --data-dir {where.data_dir}")
    return 0


def join(args: argparse.Namespace) -> int:
    name = node_name(args.name, "--name")
    token = parse_join_token(args.token)
    toward = Address.parse(token.masters[0]).host
    where = _placement(args, name, args.role, toward=toward)
    grant = join_cluster(args.token, where, force=args.force)
    print(f"meshmail: {where.name} joined cluster {grant['cluster']} as {where.role}; files in {where.data_dir}")
    print(f"meshmail: start it with: meshmail run --data-dir {where.data_dir}")
    return 0


def node_name(given: str | None, option: str) -> str:
    """The node name `option` gave, else this host's name; raises CommandError naming the option."""
    name = given or socket.gethostname().split(".")[0]
    try:
        return check_node_name(name)
    except NodeNameError as exc:
        if given:
            raise CommandError(f"{option} {exc}") from None
        raise CommandError(f"this host's name {exc}; pass {option} NAME") from None


def _placement(args: argparse.Namespace, name: str, role: str, toward: str | None = None) -> Placement:
    return placement(
        name=name,
        role=role,
        data_dir=data_dir(args),
        bind=args.bind,
        advertise=args.advertise,
        gossip_port=args.gossip_port,
        http_port=args.http_port,
        toward=toward,
    )
