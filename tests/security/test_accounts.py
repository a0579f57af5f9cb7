"""Admin accounts and API tokens in a real ClusterState: passwords set and checked, unknown
accounts answered False, API tokens created, looked up and revoked.

Most login checks store a hash made at a small scrypt cost (log_n=4); one test goes through
admin_record and password_matches at the full cost, as the node does."""

from __future__ import annotations

import pytest
from helpers.security import START_MS, snapshot

from meshmail.security import accounts
from meshmail.security.accounts import (
    AccountError,
    api_token_account,
    create_api_token,
    revoke_api_tokens,
)
from meshmail.security.passwords import PasswordError, hash_password
from meshmail.security.tokens import ApiTokenText, TokenError
from meshmail.state.records import AdminAccount

PASSWORD = "correct horse battery"


def login_ok(state, account, password) -> bool:
    """A login check as web/auth.py makes it: the record read, then the password checked."""
    return accounts.password_matches(accounts.admin(state, account), password)


def add_fast_account(replication, name: str, password: str = PASSWORD) -> None:
    replication.put("admin", name, AdminAccount(hash_password(password, log_n=4)))


def test_admin_record_and_login_at_full_cost(replication):
    replication.put("admin", "admin", accounts.admin_record("admin", PASSWORD))
    assert "ln=15," in replication.state.get("admin", "admin").password
    assert login_ok(replication.state, "admin", PASSWORD) is True
    assert login_ok(replication.state, "admin", PASSWORD + "!") is False
    assert login_ok(replication.state, "nobody", PASSWORD) is False  # checked against dummy_hash


def test_login_ok(replication):
    add_fast_account(replication, "alice@example.org")
    add_fast_account(replication, "bob", "another password")
    state = replication.state
    assert login_ok(state, "alice@example.org", PASSWORD)
    assert login_ok(state, "bob", "another password")
    assert not login_ok(state, "bob", PASSWORD)
    assert not login_ok(state, "alice@example.org", "")
    assert not login_ok(state, "Alice@example.org", PASSWORD)
    assert accounts.accounts(state) == ["alice@example.org", "bob"]


@pytest.mark.parametrize(
    "account, password",
    [
        ("alice", None),
        ("alice", 12345678),
        ("alice", b"correct horse battery"),
        (None, PASSWORD),
        (["alice"], PASSWORD),
        ("alice/../admin", PASSWORD),
        ("", PASSWORD),
        ("a" * 65, PASSWORD),
    ],
    ids=repr,
)
def test_login_ok_odd_input_is_false(replication, account, password):
    add_fast_account(replication, "alice")
    assert login_ok(replication.state, account, password) is False


def test_login_ok_unknown_account_even_with_the_dummy_password(replication):
    assert login_ok(replication.state, "ghost", "not-a-password-of-anyone") is False


def test_remove_account(replication):
    add_fast_account(replication, "alice")
    assert accounts.remove_account(replication, "alice") is True
    assert accounts.remove_account(replication, "alice") is False
    assert accounts.accounts(replication.state) == []
    assert login_ok(replication.state, "alice", PASSWORD) is False


@pytest.mark.parametrize("name", ["", "-alice", "al ice", "alice/x", "a" * 65, None, 3, "ålice"], ids=repr)
def test_bad_account_names_are_refused_and_write_nothing(replication, name):
    before = snapshot(replication.state)
    with pytest.raises(AccountError):
        accounts.admin_record(name, PASSWORD)
    with pytest.raises(AccountError):
        accounts.remove_account(replication, name)
    assert snapshot(replication.state) == before


@pytest.mark.parametrize("password", ["", "short", "x" * 1025, None])
def test_bad_password_is_refused(replication, password):
    before = snapshot(replication.state)
    with pytest.raises(PasswordError):
        accounts.admin_record("alice", password)
    assert snapshot(replication.state) == before


# --- API tokens ---------------------------------------------------------------------------------


def test_api_token_create_and_lookup(replication):
    replication.put("admin", "admin", AdminAccount("$scrypt$not-checked-here"))
    token = create_api_token(replication, "admin", "laptop", START_MS)
    record = replication.state.get("apitoken", token.token_id)
    assert record.account == "admin" and record.note == "laptop" and record.created_ms == START_MS
    assert token.secret.hex() not in record.secret_hash
    assert api_token_account(replication.state, token.encode()) == "admin"
    assert api_token_account(replication.state, f" {token.encode()}\n") == "admin"
    # Without its account (deleted on another master at the same time), a token is void.
    replication.delete("admin", "admin")
    assert api_token_account(replication.state, token.encode()) is None


def test_api_token_lookup_refusals(replication):
    token = create_api_token(replication, "admin", "", START_MS)
    state = replication.state
    wrong_secret = ApiTokenText(token.token_id, bytes(a ^ 1 for a in token.secret)).encode()
    unknown_id = ApiTokenText("0" * 16, token.secret).encode()
    for text in [wrong_secret, unknown_id, "", "garbage", token.encode()[:-1], None, 42, token.encode() + "x"]:
        assert api_token_account(state, text) is None


def test_api_token_note_is_bounded(replication):
    token = create_api_token(replication, "admin", "n" * 200, START_MS)
    assert replication.state.get("apitoken", token.token_id).note == "n" * 200
    before = snapshot(replication.state)
    for note in ("n" * 201, "n" * 60_000, "a\nb", None):
        with pytest.raises(TokenError, match="a note is at most 200 printable characters"):
            create_api_token(replication, "admin", note, START_MS)
    assert snapshot(replication.state) == before


def test_revoke_api_tokens(replication):
    for account in ("alice", "bob"):
        replication.put("admin", account, AdminAccount("$scrypt$not-checked-here"))
    mine = [create_api_token(replication, "alice", str(i), START_MS) for i in range(3)]
    theirs = create_api_token(replication, "bob", "", START_MS)
    assert revoke_api_tokens(replication, "alice") == 3
    assert all(api_token_account(replication.state, token.encode()) is None for token in mine)
    assert api_token_account(replication.state, theirs.encode()) == "bob"
    before = snapshot(replication.state)
    assert revoke_api_tokens(replication, "alice") == 0
    assert revoke_api_tokens(replication, "nobody") == 0
    assert snapshot(replication.state) == before
