"""`meshmail queue ...`: the MX's queue of one master: list and show what waits, make it due
now (flush, retry), delete a message.

Ids and slave names are checked here, so a typo gets its one line before any request.
"""

from __future__ import annotations

import argparse
import urllib.parse

from ..core.nodes import NodeNameError, check_node_name
from ..mta.spool import QUEUE_ID
from . import CommandError
from .client import call
from .render import format_message, format_queue, show


def list_queue(args: argparse.Namespace) -> int:
    document = call(args, "GET", "/queue" + _slave_query(args))
    show(args, document, lambda: format_queue(document))
    return 0


def show_message(args: argparse.Namespace) -> int:
    document = call(args, "GET", _path(args))
    show(args, document, lambda: format_message(document))
    return 0


def flush(args: argparse.Namespace) -> int:
    document = call(args, "POST", "/queue/flush" + _slave_query(args), {})
    where = f" at slave {document['slave']}" if document["slave"] else ""
    show(args, document, lambda: f"{document['flushed']} queued message(s){where} due now")
    return 0


def retry(args: argparse.Namespace) -> int:
    document = call(args, "POST", _path(args) + "/retry", {})
    show(args, document, lambda: f"message {document['id']} due now")
    return 0


def delete(args: argparse.Namespace) -> int:
    document = call(args, "DELETE", _path(args))
    show(args, document, lambda: f"message {document['id']} deleted from the queue, undelivered")
    return 0


def _path(args: argparse.Namespace) -> str:
    if not QUEUE_ID.fullmatch(args.id):
        raise CommandError(f"{args.id[:80]!r} is not a queue id (1 to 64 letters and digits; queue list shows them)")
    return f"/queue/{args.id}"


def _slave_query(args: argparse.Namespace) -> str:
    if args.slave is None:
        return ""
    try:
        check_node_name(args.slave)
    except NodeNameError as exc:
        raise CommandError(f"--slave: {exc}") from None
    return "?" + urllib.parse.urlencode({"slave": args.slave})
