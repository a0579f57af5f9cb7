"""`meshmail admin passwd|list` and `admin api-token create|list|revoke`: the cluster's admin
accounts and API tokens."""

from __future__ import annotations

import argparse
import urllib.parse

from .client import call, request, resolve_id, target
from .password import read_password
from .render import format_api_tokens, show


def passwd(args: argparse.Namespace) -> int:
    password = read_password(args.password_file, f"New password for {args.account}: ", "--password-file")
    call(args, "PUT", f"/admins/{urllib.parse.quote(args.account, safe='')}", {"password": password})
    print(f"meshmail: password of {args.account} set")
    return 0


def list_admins(args: argparse.Namespace) -> int:
    for account in call(args, "GET", "/admins")["admins"]:
        print(account)
    return 0


def create_api_token(args: argparse.Namespace) -> int:
    document = call(args, "POST", "/api-tokens", {"note": args.note})
    if args.quiet:
        print(document["token"])
        return 0
    print(f"API token {document['id']} for account {document['account']} (revoke: meshmail admin api-token revoke ID):")
    print(f"  {document['token']}")
    return 0


def list_api_tokens(args: argparse.Namespace) -> int:
    document = call(args, "GET", "/api-tokens")
    show(args, document, lambda: format_api_tokens(document["tokens"]))
    return 0


def revoke_api_token(args: argparse.Namespace) -> int:
    node = target(args)
    token_id = resolve_id(node, "/api-tokens", "tokens", args.id, "API token", "meshmail admin api-token list")
    request(node, "DELETE", f"/api-tokens/{urllib.parse.quote(token_id, safe='')}")
    print(f"meshmail: API token {token_id} revoked")
    return 0
