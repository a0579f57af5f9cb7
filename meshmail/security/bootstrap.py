"""`meshmail init` and `meshmail join`: make a node's data dir, for a new cluster or from a
join token, so that `meshmail run --data-dir DIR` starts the node.

init creates the cluster CA, this master's certificate, the first gossip key and the first
admin account. join pins the CA named by the token: it fetches the CA certificate from a
master, compares its SHA-256 with the token's before sending anything secret, then talks to
that master over TLS verified against exactly that CA, and insists that the peer's
certificate is a master's. Blocking I/O (http.client): this runs in the CLI, not in a node.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import http.client
import ipaddress
import json
import os
import shutil
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import attrs

from ..config import template
from ..core.address import Address
from ..core.errors import MeshmailError
from ..core.nodes import (
    DEFAULT_GOSSIP_PORT,
    DEFAULT_HTTP_PORT,
    MX_PORT,
    SHADOW_PORT,
    check_cluster_name,
    check_node_name,
)
from ..gossip.keyring import KEY_SIZE, decode_key, new_key
from ..state.records import GossipKey
from ..state.replica import ClusterState
from . import ca, files, keyring_sync, tokens
from .accounts import admin_record

HTTP_TIMEOUT = 15.0
#: Largest difference between this server's clock and the master's that a join accepts:
#: half the gossip replay window (60 s), so a joined node's packets are never stale.
MAX_CLOCK_OFFSET = 30.0
#: Largest answer accepted from a master during a join.
MAX_ANSWER = 256 * 1024


class BootstrapError(MeshmailError):
    """init or join cannot go on; str() is one line for the operator."""


@attrs.frozen
class Placement:
    """Where a new node lives and listens."""

    name: str
    role: str
    data_dir: Path
    bind: str
    advertise: str
    gossip_port: int = DEFAULT_GOSSIP_PORT
    http_port: int = DEFAULT_HTTP_PORT

    @property
    def hosts(self) -> list[str]:
        """The addresses the node's certificate is for."""
        hosts = [self.advertise]
        if not ipaddress.ip_address(self.bind).is_unspecified and self.bind != self.advertise:
            hosts.append(self.bind)
        return hosts


def placement(
    *,
    name: str,
    role: str,
    data_dir: str,
    bind: str,
    advertise: str | None,
    gossip_port: int,
    http_port: int,
    toward: str | None = None,
) -> Placement:
    """Check the options of init/join; `toward` is a host to find the advertise address by
    (the route to it), when neither --advertise nor a specific --bind gives one."""
    try:
        check_node_name(name)
    except ValueError as exc:
        raise BootstrapError(f"node name {exc}") from None
    try:
        bind_ip = ipaddress.ip_address(bind)
    except ValueError:
        raise BootstrapError(f"--bind {bind!r} is not an IP address") from None
    if advertise is None:
        advertise = bind if not bind_ip.is_unspecified else _route_source(toward or "192.0.2.1")
    try:
        ipaddress.ip_address(advertise)
    except ValueError:
        raise BootstrapError(f"--advertise {advertise!r} is not an IP address") from None
    for option, port in (("--gossip-port", gossip_port), ("--http-port", http_port)):
        if not 1 <= port <= 65535:
            raise BootstrapError(f"{option} must be 1..65535")
    return Placement(name, role, Path(data_dir).absolute(), bind, advertise, gossip_port, http_port)


def _route_source(host: str) -> str:
    """The local address the kernel would send from toward `host` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host.strip("[]"), 9))
            return probe.getsockname()[0]
    except OSError:
        raise BootstrapError("cannot tell which address other servers reach this one at; pass --advertise") from None


def check_free(data_dir: Path, force: bool) -> list[str]:
    """The node files in `data_dir`; raises BootstrapError if there are some and not
    `force`, or if `data_dir` is not a folder this process could write."""
    if data_dir.exists() and not data_dir.is_dir():
        raise BootstrapError(f"--data-dir {data_dir} is not a folder")
    parent = next((p for p in (data_dir, *data_dir.parents) if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK | os.X_OK):
        raise BootstrapError(f"--data-dir {data_dir}: cannot write in {parent}")
    existing = [name for name in (*files.NODE_FILES, files.STATE) if (data_dir / name).exists()]
    if existing and not force:
        raise BootstrapError(
            f"{data_dir} already holds a node ({', '.join(existing)}); use another --data-dir or --force to replace it"
        )
    return existing


def _claim(data_dir: Path, force: bool) -> None:
    """Make sure `data_dir` holds no node (or wipe it with force)."""
    try:
        for name in check_free(data_dir, force):
            path = data_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in (files.CA_KEY, files.API_TOKEN):
            (data_dir / name).unlink(missing_ok=True)
    except OSError as exc:
        raise BootstrapError(f"cannot prepare {data_dir}: {exc.strerror or exc}") from None


def render_config(where: Placement, cluster: str, seeds: list[str], *, profile: str, how: str) -> str:
    """The documented TOML config of a new node (see meshmail.config.template)."""
    gossip, http = Address(where.advertise, where.gossip_port), Address(where.advertise, where.http_port)
    values = {
        "node": {"name": where.name, "role": where.role, "data_dir": str(where.data_dir)},
        "gossip": {
            "cluster": cluster,
            "bind": Address(where.bind, where.gossip_port),
            "advertise": gossip,
            "seeds": seeds,
            "profile": profile,
        },
        "http": {"bind": Address(where.bind, where.http_port), "advertise": http},
        "tls": {"ca": files.CA_CERT, "cert": files.NODE_CERT, "key": files.NODE_KEY}
        | ({"ca_key": files.CA_KEY} if where.role == "master" else {}),
    }
    if where.role == "master":  # the MX and the shadow store listen where the node does
        values["mx"] = {"listen": Address(where.bind, MX_PORT), "shadow_listen": Address(where.bind, SHADOW_PORT)}
    title = (
        f"meshmail node configuration, written by `{how}` on {datetime.date.today().isoformat()}.\n"
        f"Start the node with:  meshmail run --data-dir {where.data_dir}"
    )
    return template.render(values, title=title, role=where.role)


def _write_identity(where: Placement, authority: ca.Authority, cert, key, keys: list[bytes]) -> None:
    d = where.data_dir
    files.write_file(d / files.CA_CERT, ca.cert_pem(authority.cert), 0o644)
    if authority.key is not None and where.role == "master":
        files.write_file(d / files.CA_KEY, ca.key_pem(authority.key))
    files.write_file(d / files.NODE_CERT, ca.cert_pem(cert), 0o644)
    files.write_file(d / files.NODE_KEY, ca.key_pem(key))
    files.save_keyring(d, keys)


# --- init -----------------------------------------------------------------------------------


def init_cluster(where: Placement, cluster: str, admin: str, password: str, *, force: bool, wall_ms) -> ca.Authority:
    """Create a cluster whose first master is `where`; returns its CA."""
    try:
        check_cluster_name(cluster)
    except ValueError as exc:
        raise BootstrapError(f"cluster name {exc}") from None
    account = admin_record(admin, password)  # raises AccountError or PasswordError before anything is written
    _claim(where.data_dir, force)
    authority = ca.new_authority(cluster)
    key = ca.new_key()
    cert = ca.sign_node(authority, key.public_key(), where.name, "master", where.hosts)
    gossip_key = new_key()
    _write_identity(where, authority, cert, key, [gossip_key])
    state_dir = where.data_dir / files.STATE
    state_dir.mkdir(mode=0o700, exist_ok=True)
    with ClusterState.open(state_dir, where.name, wall_ms) as state:
        state.put("admin", admin, account)
        state.put(
            "gossipkey", keyring_sync.key_id(gossip_key), GossipKey("primary", keyring_sync.encode_key(gossip_key))
        )
    config = render_config(where, cluster, [], profile="lan", how="meshmail init")
    files.write_file(where.data_dir / files.CONFIG, config.encode(), 0o640)
    return authority


# --- join -----------------------------------------------------------------------------------


def join_cluster(token_text: str, where: Placement, *, force: bool) -> dict[str, Any]:
    """Redeem a join token at one of its masters and write the new node's data dir; returns
    the master's grant (without secrets). Raises BootstrapError or tokens.TokenError."""
    token = tokens.parse_join_token(token_text)
    check_free(where.data_dir, force)
    key = ca.new_key()
    request = {
        "token_id": token.token_id,
        "secret": base64.b64encode(token.secret).decode("ascii"),
        "role": where.role,
        "name": where.name,
        "nonce": os.urandom(16).hex(),
        "hosts": where.hosts,
        "csr": ca.new_csr(key, where.name).decode("ascii"),
    }
    problems = []
    for master in token.masters:
        try:
            authority_pem = _fetch_ca(master, token.ca_fingerprint)
            grant = _redeem(master, authority_pem, request)
        except _Unreachable as exc:
            problems.append(f"{master}: {exc}")
            continue
        authority, cert, keys = _check_grant(grant, token, key)
        if where.role == "master":
            authority = ca.Authority(authority.cert, _ca_key(grant, authority))
        _claim(where.data_dir, force)
        _write_identity(where, authority, cert, key, keys)
        config = render_config(where, grant["cluster"], grant["seeds"], profile=grant["profile"], how="meshmail join")
        files.write_file(where.data_dir / files.CONFIG, config.encode(), 0o640)
        return {k: v for k, v in grant.items() if k not in ("keys", "ca_key", "cert", "ca")}
    raise BootstrapError("no master of the token could be reached: " + "; ".join(problems))


class _Unreachable(Exception):
    """This master cannot be used; another of the token's may be."""


def _connection(master: str, context: ssl.SSLContext) -> http.client.HTTPSConnection:
    host, port = Address.parse(master)
    return http.client.HTTPSConnection(host, port, context=context, timeout=HTTP_TIMEOUT)


def _exchange(conn: http.client.HTTPSConnection, method: str, path: str, body: bytes | None = None):
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        response = conn.getresponse()
        data = response.read(MAX_ANSWER + 1)
    except ssl.SSLCertVerificationError as exc:
        raise BootstrapError(f"the master's certificate is not from the token's CA: {exc.verify_message}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise _Unreachable(getattr(exc, "strerror", None) or str(exc) or type(exc).__name__) from None
    if len(data) > MAX_ANSWER:
        raise _Unreachable("answer too large")
    return response.status, data, response.getheader("Date")


def _fetch_ca(master: str, pinned: bytes) -> bytes:
    """The CA certificate a master presents, checked against the token's pin. Nothing secret
    is sent on this unverified connection."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    conn = _connection(master, context)
    try:
        sent_at = time.time()
        status, pem, date = _exchange(conn, "GET", "/cluster/ca")
        check_clock(master, date, sent_at, time.time())
    finally:
        conn.close()
    if status != 200:
        raise _Unreachable(f"GET /cluster/ca answered {status} (is it a meshmail master?)")
    try:
        authority = ca.load_cert(pem)
    except ca.CertificateError:
        raise _Unreachable("GET /cluster/ca did not answer a certificate") from None
    if ca.fingerprint(authority) != pinned:
        raise BootstrapError(
            f"the server at {master} belongs to another cluster:"
            f" its CA is {ca.show_fingerprint(ca.fingerprint(authority))},"
            f" the token pins {ca.show_fingerprint(pinned)}"
        )
    return pem


def check_clock(master: str, date: str | None, sent_at: float, answered_at: float) -> None:
    """Refuse to go on when this server's clock is more than MAX_CLOCK_OFFSET from the
    master's (its HTTP Date, second precision), before the token is used: a node that far off
    would be admitted and then have its gossip dropped as stale. No Date: no check."""
    try:
        master_time = email.utils.parsedate_to_datetime(date).timestamp() if date else None
    except (TypeError, ValueError, IndexError, OverflowError):
        master_time = None
    if master_time is None:
        return
    # The master stamped its Date (rounded down to the second) between our send and its
    # answer: how far its clock is ahead of ours is known to lie between these two.
    low, high = master_time - answered_at, master_time + 1 - sent_at
    if -MAX_CLOCK_OFFSET <= low and high <= MAX_CLOCK_OFFSET:
        return
    offset = (low + high) / 2
    amount = f"{abs(offset) / 60:.0f} minutes" if abs(offset) >= 120 else f"{abs(offset):.0f} s"
    raise BootstrapError(
        f"this server's clock is about {amount} {'behind' if offset > 0 else 'ahead of'} the master's ({master}):"
        " fix NTP on this server (or the master), then join again; the token was not used"
    )


def _redeem(master: str, authority_pem: bytes, request: dict) -> dict:
    context = ssl.create_default_context(cadata=authority_pem.decode("ascii"))
    context.check_hostname = False  # the chain must end at the pinned CA; the role is checked below
    conn = _connection(master, context)
    try:
        status, data, _ = _exchange(conn, "POST", "/cluster/join", json.dumps(request).encode())
        peer = conn.sock.getpeercert(binary_form=True) if conn.sock else None
    finally:
        conn.close()
    if peer is None or ca.subject_role(ca.load_cert(ssl.DER_cert_to_PEM_cert(peer).encode()))[1] != "master":
        raise BootstrapError(f"the server at {master} has a certificate of this cluster, but not a master's")
    try:
        answer = json.loads(data)
    except ValueError:
        raise _Unreachable(f"answered {status} without JSON") from None
    if status != 200:
        reason = answer.get("error") if isinstance(answer, dict) else None
        if status in (400, 403, 409, 429) and isinstance(reason, str):
            raise BootstrapError(f"join refused by {master}: {reason[:300]}")
        raise _Unreachable(f"answered {status}")
    if not isinstance(answer, dict):
        raise _Unreachable("answered something that is not a join grant")
    return answer


def _check_grant(grant: dict, token: tokens.JoinTokenText, key) -> tuple[ca.Authority, Any, list[bytes]]:
    """Check everything a master sent before writing any of it."""

    def bad(what: str) -> BootstrapError:
        return BootstrapError(f"the master's answer is not usable: {what}")

    try:
        authority = ca.Authority(ca.load_cert(str(grant["ca"]).encode()))
        cert = ca.load_cert(str(grant["cert"]).encode())
        keys = [decode_key(k) for k in grant["keys"]]
        cluster, seeds, profile = grant["cluster"], grant["seeds"], grant["profile"]
    except (KeyError, TypeError, ValueError, ca.CertificateError) as exc:
        raise bad(str(exc)[:200]) from None
    if authority.fingerprint != token.ca_fingerprint:
        raise bad("its CA is not the token's")
    try:
        ca.verify_issued(authority, cert)
    except ca.CertificateError as exc:
        raise bad(str(exc)) from None
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise bad("the certificate is not for this node's key")
    if not keys or any(len(k) != KEY_SIZE for k in keys):
        raise bad("the gossip keys")
    if not isinstance(cluster, str) or not isinstance(seeds, list) or not all(isinstance(s, str) for s in seeds):
        raise bad("cluster name or seeds")
    if profile not in ("lan", "wan", "local"):
        raise bad("gossip profile")
    return authority, cert, keys


def _ca_key(grant: dict, authority: ca.Authority):
    """The CA key a joining master receives; it must be the key of the pinned CA."""
    try:
        key = ca.load_key(str(grant["ca_key"]).encode())
    except (KeyError, ca.CertificateError):
        raise BootstrapError("the master's answer is not usable: no CA key for a joining master") from None
    if key.public_key().public_numbers() != authority.cert.public_key().public_numbers():
        raise BootstrapError("the master's answer is not usable: the CA key does not match the CA")
    return key
