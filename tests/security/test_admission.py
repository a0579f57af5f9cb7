"""Admitting nodes against a real ClusterState and Replication: a valid join, every refusal with
its reason and status, and that a refusal writes nothing; read_request against hostile JSON."""

from __future__ import annotations

import base64
import json
import os

import pytest
from cryptography import x509
from helpers.security import START_MS, member, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

from meshmail.gossip.messages import State
from meshmail.security import admission, ca
from meshmail.security.accounts import api_token_account, create_api_token
from meshmail.security.admission import (
    JoinRefused,
    admit,
    create_token,
    read_request,
    remove_node,
)
from meshmail.security.tokens import parse_join_token

MASTERS = ["m1.example.org:7946"]
HOUR_S = 3600


@pytest.fixture(scope="module")
def authority() -> ca.Authority:
    return ca.new_authority("test")


@pytest.fixture(scope="module")
def csr_pem() -> str:
    return ca.new_csr(ca.new_key(), "n1").decode()


def new_token(replication, authority, *, role="slave", uses=1, ttl_s=HOUR_S, now_ms=START_MS):
    return create_token(
        replication, role=role, ttl_s=ttl_s, uses=uses, note="test", creator="admin", now_ms=now_ms,
        ca_fingerprint=authority.fingerprint, masters=MASTERS,
    )


def document(token, csr_pem: str, **changes) -> dict:
    body = {
        "token_id": token.token_id,
        "secret": base64.b64encode(token.secret).decode(),
        "role": "slave",
        "name": "n1",
        "nonce": os.urandom(16).hex(),
        "hosts": ["10.0.0.5", "n1.example.org"],
        "csr": csr_pem,
    }
    body.update(changes)
    return body


def join(replication, authority, body: dict, *, members=(), now_ms=START_MS + 1000):
    return admit(
        replication, read_request(body), authority=authority, master="m1", members=lambda: list(members), now_ms=now_ms
    )


def refused(replication, authority, body: dict, reason: str, status: int, **kwargs) -> JoinRefused:
    """Expect the join to be refused for `reason`, and the state untouched."""
    before = snapshot(replication.state)
    with pytest.raises(JoinRefused) as info:
        join(replication, authority, body, **kwargs)
    assert info.value.reason == reason
    assert info.value.status == status
    assert "\n" not in str(info.value)
    assert body["secret"] not in str(info.value)
    assert snapshot(replication.state) == before
    return info.value


# --- tokens ------------------------------------------------------------------------------------


def test_create_token(replication, authority):
    token = new_token(replication, authority, role="master", uses=3)
    assert parse_join_token(token.encode()) == token
    assert token.ca_fingerprint == authority.fingerprint and token.masters == tuple(MASTERS)
    record = replication.state.get("jointoken", token.token_id)
    assert record.role == "master" and record.uses == 3 and record.expires_ms == START_MS + HOUR_S * 1000
    assert token.secret.hex() not in record.secret_hash and record.secret_hash != token.secret.hex()
    (info,) = admission.tokens(replication.state)
    assert info.token_id == token.token_id and info.used == 0
    assert info.document(START_MS)["status"] == "valid"
    assert info.document(record.expires_ms)["status"] == "expired"


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"role": "admin"}, "role"),
        ({"ttl_s": 0}, "ttl"),
        ({"ttl_s": -1}, "ttl"),
        ({"ttl_s": admission.MAX_TTL_S + 1}, "ttl"),
        ({"uses": 0}, "uses"),
        ({"uses": admission.MAX_USES + 1}, "uses"),
        ({"masters": []}, "master"),
        ({"note": "n" * 201}, "a note is at most 200"),
        ({"note": "two\nlines"}, "a note is at most 200"),
        ({"note": 7}, "a note is at most 200"),
    ],
)
def test_create_token_refusals_write_nothing(replication, authority, changes, words):
    arguments = dict(
        role="slave", ttl_s=HOUR_S, uses=1, note="", creator="admin", now_ms=START_MS,
        ca_fingerprint=authority.fingerprint, masters=MASTERS,
    )
    arguments.update(changes)
    before = snapshot(replication.state)
    with pytest.raises(ValueError, match=words):
        create_token(replication, **arguments)
    assert snapshot(replication.state) == before


def test_create_token_keeps_at_most_eight_masters(replication, authority):
    masters = [f"m{i}:7946" for i in range(12)]
    token = create_token(
        replication, role="slave", ttl_s=60, uses=1, note="", creator="a", now_ms=START_MS,
        ca_fingerprint=authority.fingerprint, masters=masters,
    )
    assert parse_join_token(token.encode()).masters == tuple(masters[:8])


def test_revoke(replication, authority):
    token = new_token(replication, authority)
    assert admission.revoke(replication, token.token_id).revoked
    after = snapshot(replication.state)
    assert admission.revoke(replication, token.token_id).revoked  # again: nothing written
    assert snapshot(replication.state) == after
    assert admission.tokens(replication.state)[0].document(START_MS)["status"] == "revoked"
    for unknown in ["0" * 16, "not-an-id", "", "../jointoken/x", "A" * 16]:
        with pytest.raises(LookupError):
            admission.revoke(replication, unknown)


# --- admitting ---------------------------------------------------------------------------------


def test_admit_valid_request(replication, authority, csr_pem):
    token = new_token(replication, authority)
    body = document(token, csr_pem)
    cert = join(replication, authority, body)
    ca.verify_issued(authority, cert)
    assert ca.subject_role(cert) == ("n1", "slave")
    assert cert.public_key() == x509.load_pem_x509_csr(csr_pem.encode()).public_key()
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "n1.example.org" in sans.get_values_for_type(x509.DNSName)
    redemption = replication.state.get("redeemed", f"{token.token_id}/{body['nonce']}/m1")
    assert (redemption.node, redemption.role, redemption.master) == ("n1", "slave", "m1")
    assert redemption.at_ms == START_MS + 1000
    assert admission.redemptions(replication.state, token.token_id) == 1
    assert admission.tokens(replication.state)[0].document(START_MS)["status"] == "used"


def test_admit_master_token(replication, authority, csr_pem):
    token = new_token(replication, authority, role="master")
    cert = join(replication, authority, document(token, csr_pem, role="master", name="m2"))
    assert ca.subject_role(cert) == ("m2", "master")


def test_wrong_secret(replication, authority, csr_pem):
    token = new_token(replication, authority)
    other = base64.b64encode(bytes(a ^ 1 for a in token.secret)).decode()
    refused(replication, authority, document(token, csr_pem, secret=other), "bad_token", 403)


def test_unknown_token_id(replication, authority, csr_pem):
    token = new_token(replication, authority)
    refused(replication, authority, document(token, csr_pem, token_id="0123456789abcdef"), "bad_token", 403)


def test_unknown_id_and_wrong_secret_look_alike(replication, authority, csr_pem):
    token = new_token(replication, authority)
    wrong_secret = base64.b64encode(os.urandom(32)).decode()
    a = refused(replication, authority, document(token, csr_pem, secret=wrong_secret), "bad_token", 403)
    b = refused(replication, authority, document(token, csr_pem, token_id="fedcba9876543210"), "bad_token", 403)
    assert str(a) == str(b)


def test_revoked(replication, authority, csr_pem):
    token = new_token(replication, authority)
    admission.revoke(replication, token.token_id)
    refused(replication, authority, document(token, csr_pem), "revoked", 403)


def test_expired(replication, authority, csr_pem):
    token = new_token(replication, authority, ttl_s=60)
    expires = START_MS + 60_000
    refused(replication, authority, document(token, csr_pem), "expired", 403, now_ms=expires)
    refused(replication, authority, document(token, csr_pem), "expired", 403, now_ms=expires + 10**9)
    join(replication, authority, document(token, csr_pem), now_ms=expires - 1)


def test_wrong_role(replication, authority, csr_pem):
    token = new_token(replication, authority, role="slave")
    error = refused(replication, authority, document(token, csr_pem, role="master"), "wrong_role", 403)
    assert "slave" in str(error)


def test_replayed(replication, authority, csr_pem):
    token = new_token(replication, authority, uses=2)
    body = document(token, csr_pem)
    join(replication, authority, body)
    refused(replication, authority, body, "replayed", 409)
    refused(replication, authority, dict(body, name="n2"), "replayed", 409)
    join(replication, authority, document(token, csr_pem, name="n2"))  # the second use, a new nonce


def test_used_up(replication, authority, csr_pem):
    token = new_token(replication, authority, uses=1)
    join(replication, authority, document(token, csr_pem))
    refused(replication, authority, document(token, csr_pem, name="n2"), "used_up", 403)


def test_uses_counted_per_token(replication, authority, csr_pem):
    first, second = new_token(replication, authority), new_token(replication, authority)
    join(replication, authority, document(first, csr_pem))
    join(replication, authority, document(second, csr_pem, name="n2"))
    assert [info.used for info in sorted(admission.tokens(replication.state), key=lambda i: i.token_id)] == [1, 1]


def test_removed_name(replication, authority, csr_pem):
    token = new_token(replication, authority, uses=2)
    assert remove_node(replication, "n1", by="admin", now_ms=START_MS) is True
    assert remove_node(replication, "n1", by="admin", now_ms=START_MS + 1) is False
    assert admission.removed(replication.state) == ["n1"]
    refused(replication, authority, document(token, csr_pem), "removed_name", 409)
    join(replication, authority, document(token, csr_pem, name="n1-new"))


def test_remove_node_revokes_its_api_tokens(replication):
    mine = create_api_token(replication, "node:n1", "", START_MS).encode()
    other = create_api_token(replication, "node:n2", "", START_MS).encode()
    remove_node(replication, "n1", by="admin", now_ms=START_MS)
    assert api_token_account(replication.state, mine) is None
    assert api_token_account(replication.state, other) == "node:n2"


@pytest.mark.parametrize("state", [State.ALIVE, State.SUSPECT])
def test_name_taken(replication, authority, csr_pem, state):
    token = new_token(replication, authority)
    members = [member("m1"), member("n1", state, role="slave")]
    refused(replication, authority, document(token, csr_pem), "name_taken", 409, members=members)


@pytest.mark.parametrize("state", [State.DEAD, State.LEFT])
def test_name_of_dead_or_left_member_is_free(replication, authority, csr_pem, state):
    token = new_token(replication, authority)
    join(replication, authority, document(token, csr_pem), members=[member("m1"), member("n1", state)])


def test_checks_in_order(replication, authority, csr_pem):
    """A revoked, expired token for the wrong role says revoked: the first check wins."""
    token = new_token(replication, authority, role="master", ttl_s=1)
    admission.revoke(replication, token.token_id)
    refused(replication, authority, document(token, csr_pem), "revoked", 403, now_ms=START_MS + 10**6)


def test_hosts_that_are_no_address_refused_as_bad_request(replication, authority, csr_pem):
    """read_request takes any 1..253 character strings as hosts, and sign_node hands them to
    x509.DNSName, which raises ValueError for non-ASCII text: that must be a JoinRefused(400)
    (from read_request, before anything is checked or written), not an unexpected ValueError."""
    token = new_token(replication, authority, uses=10)
    for host in ["mäil.example.org", "\u2603"]:
        before = snapshot(replication.state)
        with pytest.raises(JoinRefused) as info:
            join(replication, authority, document(token, csr_pem, hosts=[host]))
        assert info.value.status == 400
        assert snapshot(replication.state) == before


# --- read_request --------------------------------------------------------------------------------


def test_read_request(csr_pem):
    secret = os.urandom(32)
    body = {
        "token_id": "0123456789abcdef",
        "secret": base64.b64encode(secret).decode(),
        "role": "master",
        "name": "m2.example",
        "nonce": "ab" * 16,
        "hosts": ["::1"],
        "csr": csr_pem,
        "unknown": "ignored",
    }
    request = read_request(body)
    assert (request.token_id, request.secret, request.role, request.name, request.nonce, request.hosts) == (
        "0123456789abcdef", secret, "master", "m2.example", "ab" * 16, ("::1",),
    )
    assert secret.hex() not in repr(request) and body["secret"] not in repr(request)
    del body["hosts"]
    assert read_request(body).hosts == ()


GOOD = {
    "token_id": "0123456789abcdef",
    "secret": base64.b64encode(bytes(32)).decode(),
    "role": "slave",
    "name": "n1",
    "nonce": "0" * 32,
    "hosts": [],
}

BAD_FIELDS = [
    ("token_id", None), ("token_id", "0123456789ABCDEF"), ("token_id", "0123456789abcde"), ("token_id", 123),
    ("token_id", "0123456789abcdef\n"), ("secret", None), ("secret", ""), ("secret", "AAAA"),
    ("secret", base64.b64encode(bytes(31)).decode()), ("secret", base64.b64encode(bytes(33)).decode()),
    ("secret", base64.urlsafe_b64encode(b"\xff" * 32).decode()), ("secret", "é" * 44), ("secret", "A" * 10_000),
    ("secret", ["A"]), ("role", "admin"), ("role", None), ("role", ["slave"]), ("role", {"slave": 1}),
    ("name", ""), ("name", "-n1"), ("name", "n 1"), ("name", "n" * 64), ("name", "n1/x"), ("name", None),
    ("name", "ñ1"), ("nonce", "0" * 31), ("nonce", "0" * 33), ("nonce", "G" * 32), ("nonce", 0),
    ("hosts", "10.0.0.1"), ("hosts", [""]), ("hosts", ["x" * 254]), ("hosts", [1]), ("hosts", ["h"] * 9),
    ("hosts", {"a": 1}), ("hosts", None), ("csr", None), ("csr", ""), ("csr", "garbage"), ("csr", 12),
    ("csr", ["-----BEGIN"]), ("csr", "x" * (ca.MAX_CSR + 1)),
]


@pytest.mark.parametrize("field, value", BAD_FIELDS, ids=lambda v: repr(v)[:40])
def test_read_request_bad_field(csr_pem, field, value):
    body = dict(GOOD, csr=csr_pem)
    body[field] = value
    with pytest.raises(JoinRefused) as info:
        read_request(body)
    assert info.value.status == 400 and info.value.reason == "bad_request"
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("body", [None, [], "{}", 1, True, {}, {"token_id": "0123456789abcdef"}], ids=repr)
def test_read_request_not_an_object(body):
    with pytest.raises(JoinRefused) as info:
        read_request(body)
    assert info.value.status == 400


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=15,
)
FIELDS = ["token_id", "secret", "role", "name", "nonce", "hosts", "csr"]


def expect_bad_request(body) -> None:
    try:
        read_request(body)
    except JoinRefused as exc:
        assert exc.status == 400 and exc.reason == "bad_request"


@settings(max_examples=300)
@given(json_values)
def test_read_request_fuzz_any_json(body):
    expect_bad_request(body)


@settings(max_examples=150)
@given(st.dictionaries(st.sampled_from(FIELDS + ["x"]), json_values, max_size=8))
def test_read_request_fuzz_known_keys(body):
    expect_bad_request(body)


@settings(max_examples=150)
@given(st.dictionaries(st.sampled_from(FIELDS), json_values, min_size=1, max_size=3))
def test_read_request_fuzz_one_good_body_changed(csr_pem, changes):
    """A good body with some fields replaced: only a JoinRefused(400) or a request that holds
    exactly what the body said."""
    body = dict(GOOD, csr=csr_pem)
    body.update(changes)
    try:
        request = read_request(body)
    except JoinRefused as exc:
        assert exc.status == 400
    else:
        assert request.name == body["name"] and request.role == body["role"] and list(request.hosts) == body["hosts"]


@settings(max_examples=100)
@given(st.text(max_size=200))
def test_read_request_fuzz_json_text(text):
    """What the HTTP layer would pass: whatever json.loads makes of a body."""
    try:
        body = json.loads(text)
    except ValueError:
        return
    expect_bad_request(body)
