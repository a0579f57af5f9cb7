"""`meshmail keygen` and `meshmail keyring ...`: the gossip keys of the whole cluster, and their
rotation without downtime (install everywhere, make primary everywhere, remove the old)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

from ..gossip.keyring import encode_key, new_key
from . import CommandError
from .client import Target, call, request, resolve_id, target
from .render import format_keyring, show

#: Seconds between two looks at the keyring while a rotation waits for the members.
POLL_INTERVAL = 0.5


def keygen(args: argparse.Namespace) -> int:
    print(encode_key(new_key()))
    return 0


def list_keys(args: argparse.Namespace) -> int:
    document = call(args, "GET", "/keyring")
    show(args, document, lambda: format_keyring(document))
    return 0


def install(args: argparse.Namespace) -> int:
    document = call(args, "POST", "/keyring", {"action": "install", "key": args.key})
    print(f"meshmail: key {document['id']} installed")
    return 0


def use(args: argparse.Namespace) -> int:
    return _change(args, "use", "is the primary key")


def remove(args: argparse.Namespace) -> int:
    return _change(args, "remove", "removed")


def _change(args: argparse.Namespace, action: str, done: str) -> int:
    """Apply `action` to the key whose id starts with args.id."""
    node = target(args)
    kid = resolve_id(node, "/keyring", "keys", args.id, "key", "meshmail keyring list")
    request(node, "POST", "/keyring", {"action": action, "id": kid})
    print(f"meshmail: key {kid} {done}")
    return 0


def rotate(args: argparse.Namespace) -> int:
    """Install a new key and wait until every live member holds it; make it primary and wait
    until every live member uses it; then remove every other key and wait until none holds one."""
    node = target(args)
    old = [key["id"] for key in request(node, "GET", "/keyring")["keys"]]
    kid = request(node, "POST", "/keyring", {"action": "install", "key": encode_key(new_key())})["id"]
    print(f"meshmail: key {kid} installed; waiting for every member to hold it")
    wait = partial(_wait, node, kid, args.timeout)
    wait("installed everywhere", lambda keys, members: keys[kid]["installed_on"] == members)
    request(node, "POST", "/keyring", {"action": "use", "id": kid})
    print(f"meshmail: key {kid} is primary; waiting for every member to use it")
    wait("primary everywhere", lambda keys, members: keys[kid]["primary_on"] == members)
    others = [other for other in old if other != kid]
    for other in others:
        request(node, "POST", "/keyring", {"action": "remove", "id": other})
        print(f"meshmail: key {other} removed")
    wait("the only key left", lambda keys, _: not any(keys.get(old_id, {}).get("installed_on") for old_id in others))
    print(f"meshmail: key {kid} is the only key of every live member")
    return 0


def _wait(node: Target, kid: str, timeout: float, what: str, done: Callable[[dict, int], bool]) -> None:
    """Poll GET /keyring until done(keys by id, live members) holds; raises CommandError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        document = request(node, "GET", "/keyring")
        keys = {key["id"]: key for key in document["keys"]}
        if kid in keys and done(keys, document["members"]):
            return
        if time.monotonic() > deadline:
            raise CommandError(
                f"key {kid}: not {what} after {timeout:g} s (keyring list shows who lags);"
                " run meshmail keyring rotate again or finish by hand with keyring use/remove"
            )
        time.sleep(POLL_INTERVAL)
