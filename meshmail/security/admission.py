"""Join tokens and admitting new nodes: the checks a master makes before it signs a
certificate and hands out the cluster's keys, and taking a node out again.

A token record lives in the replicated state, so any master redeems it. Each join writes a
Redemption record keyed by the token id, the request's nonce and the admitting master: the
set of them counts the uses and also refuses a join request sent twice (the same request
sent to two masters at the same moment is admitted by both, and counted twice). A
single-use token redeemed on two masters before either hears of the other's redemption
(milliseconds on a LAN) admits both: the race is bounded by how fast a Redemption spreads.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from cryptography import x509

from ..core.address import is_host
from ..core.nodes import ROLES, check_node_name, check_role
from ..gossip.member import MemberInfo
from ..gossip.messages import State
from ..state.records import JoinToken, Redemption, RemovedNode
from ..state.replica import ClusterState
from . import ca
from .accounts import revoke_api_tokens
from .tokens import (
    JoinTokenText,
    check_note,
    hash_secret,
    new_id,
    new_secret,
    secret_matches,
)

NONCE = re.compile(r"[0-9a-f]{32}")
TOKEN_ID = re.compile(r"[0-9a-f]{16}")
#: Bounds of `token create`.
MAX_TTL_S = 365 * 24 * 3600
MAX_USES = 1000


class JoinRefused(Exception):
    """A join request refused; `reason` is a counter name, str() the one line the joiner sees."""

    def __init__(self, reason: str, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


# --- tokens ---------------------------------------------------------------------------------


@attrs.frozen
class TokenInfo:
    token_id: str
    record: JoinToken
    used: int

    def document(self, now_ms: int) -> dict[str, Any]:
        record = self.record
        if record.revoked:
            status = "revoked"
        elif now_ms >= record.expires_ms:
            status = "expired"
        elif self.used >= record.uses:
            status = "used"
        else:
            status = "valid"
        return {
            "id": self.token_id,
            "role": record.role,
            "status": status,
            "expires_ms": record.expires_ms,
            "uses": record.uses,
            "used": self.used,
            "creator": record.creator,
            "note": record.note,
            "created_ms": record.created_ms,
        }


def create_token(
    replication,
    *,
    role: str,
    ttl_s: float,
    uses: int,
    note: str,
    creator: str,
    now_ms: int,
    ca_fingerprint: bytes,
    masters: list[str],
) -> JoinTokenText:
    check_role(role)
    check_note(note)
    if not 1 <= ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl must be 1 second to {MAX_TTL_S // 86400} days")
    if not 1 <= uses <= MAX_USES:
        raise ValueError(f"uses must be 1 to {MAX_USES}")
    if not masters:
        raise ValueError("no master address to put in the token")
    token = JoinTokenText(new_id(), new_secret(), ca_fingerprint, tuple(masters[:8]))
    record = JoinToken(hash_secret(token.secret), role, now_ms + int(ttl_s * 1000), uses, creator[:200], now_ms, note)
    replication.put("jointoken", token.token_id, record)
    return token


def redemptions(state: ClusterState, token_id: str) -> int:
    return sum(1 for _ in state.records("redeemed", token_id + "/"))


def tokens(state: ClusterState) -> list[TokenInfo]:
    return [TokenInfo(tid, record, redemptions(state, tid)) for tid, record in state.records("jointoken")]


def revoke(replication, token_id: str) -> JoinToken:
    record = replication.state.get("jointoken", token_id) if TOKEN_ID.fullmatch(token_id) else None
    if record is None:
        raise LookupError(f"no join token {token_id[:40]}")
    if not record.revoked:
        record = attrs.evolve(record, revoked=True)
        replication.put("jointoken", token_id, record)
    return record


# --- admitting a node -----------------------------------------------------------------------


@attrs.frozen
class JoinRequest:
    token_id: str
    secret: bytes = attrs.field(repr=False)
    role: str
    name: str
    csr: x509.CertificateSigningRequest
    nonce: str
    #: Addresses (IP or DNS name) the node's certificate is for.
    hosts: tuple[str, ...]


def read_request(document: Any) -> JoinRequest:
    """Check the JSON body of POST /cluster/join; raises JoinRefused(status 400)."""

    def bad(message: str) -> JoinRefused:
        return JoinRefused("bad_request", message, 400)

    if not isinstance(document, dict):
        raise bad("a join request is a JSON object")
    token_id, secret, role = document.get("token_id"), document.get("secret"), document.get("role")
    if not isinstance(token_id, str) or not TOKEN_ID.fullmatch(token_id):
        raise bad("token_id must be 16 hex digits")
    try:
        secret_bytes = base64.b64decode(secret, validate=True) if isinstance(secret, str) and len(secret) < 100 else b""
    except (binascii.Error, ValueError):
        secret_bytes = b""
    if len(secret_bytes) != 32:
        raise bad("secret must be 32 bytes in base64")
    if role not in ROLES:
        raise bad(f"role must be one of {', '.join(ROLES)}")
    try:
        name = check_node_name(document.get("name"))
    except ValueError as exc:
        raise bad(str(exc)) from None
    nonce = document.get("nonce")
    if not isinstance(nonce, str) or not NONCE.fullmatch(nonce):
        raise bad("nonce must be 32 hex digits")
    hosts = document.get("hosts", [])
    if not isinstance(hosts, list) or len(hosts) > 8 or not all(is_host(h) for h in hosts):
        raise bad("hosts must be a list of at most 8 IP addresses or DNS names")
    try:
        csr = ca.read_csr(document.get("csr", ""))
    except ca.CertificateError as exc:
        raise bad(str(exc)) from None
    return JoinRequest(token_id, secret_bytes, role, name, csr, nonce, tuple(hosts))


def admit(
    replication,
    request: JoinRequest,
    *,
    authority: ca.Authority,
    master: str,
    members: Callable[[], Iterable[MemberInfo]],
    now_ms: int,
) -> x509.Certificate:
    """Check `request` against the token and the cluster, record the redemption (durable and
    gossiped) and return the node's certificate. Raises JoinRefused; a refusal writes nothing."""
    state: ClusterState = replication.state
    record = state.get("jointoken", request.token_id)
    if not isinstance(record, JoinToken) or not secret_matches(record.secret_hash, request.secret):
        raise JoinRefused("bad_token", "the token is not valid here (unknown token or wrong secret)", 403)
    if record.revoked:
        raise JoinRefused("revoked", "the token was revoked", 403)
    if now_ms >= record.expires_ms:
        raise JoinRefused("expired", "the token has expired", 403)
    if request.role != record.role:
        raise JoinRefused("wrong_role", f"the token is for joining as {record.role}, not as {request.role}", 403)
    if any(True for _ in state.records("redeemed", f"{request.token_id}/{request.nonce}/")):
        raise JoinRefused("replayed", "this join request was already used (replayed)", 409)
    if redemptions(state, request.token_id) >= record.uses:
        raise JoinRefused("used_up", "the token has no uses left", 403)
    if state.get("removed", request.name) is not None:
        raise JoinRefused(
            "removed_name", f"a node named {request.name} was removed from this cluster; join with another name", 409
        )
    taken = any(m.name == request.name and m.state in (State.ALIVE, State.SUSPECT) for m in members())
    if taken:
        raise JoinRefused("name_taken", f"a node named {request.name} is already in the cluster", 409)
    cert = ca.sign_node(authority, request.csr.public_key(), request.name, request.role, list(request.hosts))
    redemption = Redemption(request.name, request.role, master, now_ms)
    replication.put("redeemed", f"{request.token_id}/{request.nonce}/{master}", redemption)
    return cert


def admitted_role(state: ClusterState, name: str) -> str | None:
    """The role some master admitted node `name` with, or None when none did."""
    return next((r.role for _, r in state.records("redeemed") if r.node == name), None)


def known_node(state: ClusterState, name: str, members: Iterable[MemberInfo]) -> bool:
    """Whether `name` is a member this node knows or a node some master admitted."""
    return any(m.name == name for m in members) or admitted_role(state, name) is not None


def remove_node(replication, name: str, *, by: str, now_ms: int) -> bool:
    """Take node `name` out of the cluster for good; False when it already was. The domains
    it published as a slave are unpublished, so another slave listing them takes them over
    (routes an admin set to it stay: an admin's decision)."""
    state: ClusterState = replication.state
    if state.get("removed", name) is not None:
        return False
    replication.put("removed", name, RemovedNode(by[:200], now_ms))
    revoke_api_tokens(replication, f"node:{name}")
    published = [(domain, None) for domain, route in state.domains(name) if route.source == "slave"]
    if published:
        replication.write_domains(published)
    return True


def removed(state: ClusterState) -> list[str]:
    return [name for name, _ in state.records("removed")]
