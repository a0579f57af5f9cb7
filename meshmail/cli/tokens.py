"""`meshmail token create|list|revoke`: the join tokens that attach new servers."""

from __future__ import annotations

import argparse
import urllib.parse

from ..core.clock import human_ms
from ..core.nodes import DEFAULT_DATA_DIR
from . import CommandError
from .client import call, request, resolve_id, target
from .render import format_tokens, show


def create(args: argparse.Namespace) -> int:
    body = {"role": args.role, "ttl": parse_duration(args.ttl), "uses": args.uses, "note": args.note}
    document = call(args, "POST", "/tokens", body)
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


def list_tokens(args: argparse.Namespace) -> int:
    document = call(args, "GET", "/tokens")
    show(args, document, lambda: format_tokens(document["tokens"]))
    return 0


def revoke(args: argparse.Namespace) -> int:
    node = target(args)
    token_id = resolve_id(node, "/tokens", "tokens", args.id, "join token", "meshmail token list")
    request(node, "DELETE", f"/tokens/{urllib.parse.quote(token_id, safe='')}")
    print(f"meshmail: token {token_id} revoked")
    return 0


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``30s``, ``15m``, ``24h`` or ``7d``; raises CommandError."""
    from ..security.admission import (
        MAX_TTL_S,  # here: admission loads the state machinery and cryptography
    )

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        value = float(number)
    except ValueError:
        raise CommandError(f"--ttl {text!r} is not a duration like 30m, 24h or 7d") from None
    if not 1 <= value * units[unit] <= MAX_TTL_S:
        raise CommandError(f"--ttl {text!r} must be 1s to {MAX_TTL_S // 86400}d")
    return value * units[unit]
