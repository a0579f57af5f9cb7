"""Routes of the MX's queue on this master: list and show queued messages, make them due now
(flush, retry), delete one. They act on this master's own queue only (every master keeps its
own); a node that runs no MX answers 404.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, request
from werkzeug.exceptions import BadRequest, Conflict, NotFound

from ..core.nodes import NodeNameError, check_node_name
from ..mta.runner import Busy, Queued, Runner
from ..mta.spool import QUEUE_ID, CorruptMessage, Recipient
from ..protocols.smtp import Reply
from .bodies import json_object
from .current import ctx

routes = Blueprint("queue", __name__)

#: Messages GET /queue lists at most; "more" says how many it left out.
LIST_LIMIT = 1000


@routes.get("/queue")
async def list_queue():
    slave = _slave()
    found, more = await _runner().listing(slave, LIST_LIMIT)
    return {"messages": [_summary(queued, slave) for queued in found], "more": more}


@routes.get("/queue/<queue_id>")
async def show_message(queue_id: str):
    queue_id = _queue_id(queue_id)
    try:
        queued = await _runner().message(queue_id)
    except CorruptMessage as exc:
        raise _unreadable(queue_id, exc) from None
    if queued is None:
        raise NotFound(f"no message {queue_id} in this master's queue")
    return _document(queued)


@routes.post("/queue/flush")
async def flush():
    slave = _slave()
    await json_object(empty_ok=True)
    return {"slave": slave, "flushed": _runner().flush(slave)}


@routes.post("/queue/<queue_id>/retry")
async def retry(queue_id: str):
    queue_id = _queue_id(queue_id)
    await json_object(empty_ok=True)
    try:
        if not await _runner().retry(queue_id):
            raise NotFound(f"no message {queue_id} in this master's queue")
    except Busy as exc:
        raise Conflict(str(exc)) from None
    except CorruptMessage as exc:
        raise _unreadable(queue_id, exc) from None
    return {"id": queue_id, "due": True}


@routes.delete("/queue/<queue_id>")
async def delete(queue_id: str):
    queue_id = _queue_id(queue_id)
    principal = request.principal
    try:
        deleted = await _runner().delete(queue_id, f"{principal.account} ({principal.via})")
    except Busy as exc:
        raise Conflict(str(exc)) from None
    if not deleted:
        raise NotFound(f"no message {queue_id} in this master's queue")
    return {"id": queue_id, "deleted": True}


def _runner() -> Runner:
    runner = ctx().mta
    if runner is None:
        raise NotFound("this node runs no MX, so it has no queue (only masters do, with [mx] listen set)")
    return runner


def _unreadable(queue_id: str, exc: CorruptMessage) -> Conflict:
    return Conflict(f"message {queue_id} cannot be read ({exc}): it is moved to queue/corrupt/ at its next attempt")


def _queue_id(text: str) -> str:
    if not QUEUE_ID.fullmatch(text):
        raise BadRequest(f"{text[:80]!r} is not a queue id (1 to 64 letters and digits)")
    return text


def _slave() -> str | None:
    slave = request.args.get("slave")
    if slave is None:
        return None
    try:
        return check_node_name(slave)
    except NodeNameError as exc:
        raise BadRequest(f"slave: {exc}") from None


def _reply(reply: Reply | None) -> str | None:
    return None if reply is None else str(reply)


def _summary(queued: Queued, slave: str | None) -> dict[str, Any]:
    """One line of the list: the message at its slaves (at `slave` only, when given)."""
    envelope = queued.envelope
    recipients = [r for r in envelope.queued() if slave is None or r.slave == slave]
    tried = [r for r in recipients if r.reply is not None]
    last = max(tried, key=lambda r: r.attempts, default=None)
    return {
        "id": envelope.id,
        "sender": envelope.sender,
        "recipients": [{"address": r.address, "slave": r.slave} for r in recipients],
        "size": envelope.size,
        "received_ms": envelope.received_ms,
        "attempts": max(entry.attempts for entry in queued.entries.values()),
        "next_attempt_ms": min(entry.next_ms for entry in queued.entries.values()),
        "in_flight": queued.in_flight,
        "last_reply": _reply(last.reply) if last is not None else None,
    }


def _recipient(recipient: Recipient) -> dict[str, Any]:
    return {
        "address": recipient.address,
        "slave": recipient.slave,
        "state": recipient.state.name.lower(),
        "attempts": recipient.attempts,
        "next_attempt_ms": recipient.next_attempt_ms if recipient.queued else None,
        "reply": _reply(recipient.reply),
    }


def _document(queued: Queued) -> dict[str, Any]:
    """One message: its whole envelope, and where it stands at each slave it waits for."""
    envelope = queued.envelope
    return {
        "id": envelope.id,
        "sender": envelope.sender,
        "recipients": [_recipient(r) for r in envelope.recipients],
        "size": envelope.size,
        "received_ms": envelope.received_ms,
        "client_address": envelope.client_address,
        "helo": envelope.helo,
        "origin": envelope.origin,
        "shadow": envelope.shadow,
        "delay_warning_sent": envelope.warned,
        "slaves": {
            name: {"attempts": entry.attempts, "next_attempt_ms": entry.next_ms, "in_flight": entry.in_flight}
            for name, entry in sorted(queued.entries.items())
        },
    }
