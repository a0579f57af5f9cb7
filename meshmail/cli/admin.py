"""`meshmail admin passwd|list|api-token`: the cluster's admin accounts and API tokens."""

from __future__ import annotations

import argparse
import urllib.parse

from .client import call
from .password import read_password


def passwd(args: argparse.Namespace) -> int:
    password = read_password(args.password_file, f"New password for {args.account}: ", "--password-file")
    call(args, "PUT", f"/admins/{urllib.parse.quote(args.account, safe='')}", {"password": password})
    print(f"meshmail: password of {args.account} set")
    return 0


def list_admins(args: argparse.Namespace) -> int:
    for account in call(args, "GET", "/admins")["admins"]:
        print(account)
    return 0


def api_token(args: argparse.Namespace) -> int:
    document = call(args, "POST", "/api-tokens", {"note": args.note})
    print(document["token"])
    return 0
