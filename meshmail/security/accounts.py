"""Admin accounts and API tokens in the replicated state, and the checks of a login.

Passwords are scrypt hashes (passwords.py); API tokens are kept as the SHA-256 of their
secret under their public id (tokens.py). Every check answers the same way, in about the
same time, for an account that does not exist as for a wrong password.
"""

from __future__ import annotations

import re

from ..core.errors import MeshmailError
from ..state.records import AdminAccount, ApiToken
from ..state.replica import ClusterState
from .passwords import dummy_hash, hash_password, verify_password
from .tokens import (
    ApiTokenText,
    TokenError,
    check_note,
    hash_secret,
    new_api_token,
    parse_api_token,
    secret_matches,
)

ACCOUNT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class AccountError(MeshmailError, ValueError):
    """An account operation that cannot be done; str() is one line."""


def check_account_name(name: object) -> str:
    if not isinstance(name, str) or not ACCOUNT.fullmatch(name):
        raise AccountError("an account name is 1 to 64 letters, digits and . _ @ - (starting with a letter or digit)")
    return name


def admin_record(account: object, password: object) -> AdminAccount:
    """The record of admin `account` with `password`: both checked, the password hashed.
    Slow (scrypt): run it in a worker thread. Raises AccountError or PasswordError."""
    check_account_name(account)
    return AdminAccount(hash_password(password))


def remove_account(replication, account: str) -> bool:
    return replication.delete("admin", check_account_name(account)) is not None


def accounts(state: ClusterState) -> list[str]:
    return [name for name, _ in state.records("admin")]


def admin(state: ClusterState, account: object) -> AdminAccount | None:
    """The record of admin `account`, or None (an unknown or malformed name)."""
    record = state.get("admin", account) if isinstance(account, str) and ACCOUNT.fullmatch(account) else None
    return record if isinstance(record, AdminAccount) else None


def password_matches(record: AdminAccount | None, password: object) -> bool:
    """Whether `password` is the one of `record`. None (no such account) is checked against a
    dummy hash, so the answer takes as long. Slow on purpose (scrypt): run it in a worker
    thread; read the record on the event loop (the state is not shared across threads)."""
    stored = record.password if record is not None else dummy_hash()
    matches = verify_password(stored, password if isinstance(password, str) else "")
    return matches and record is not None


def create_api_token(replication, account: str, note: str, now_ms: int) -> ApiTokenText:
    """A new API token acting for `account`; raises TokenError for a note that is too long."""
    token = new_api_token()
    replication.put("apitoken", token.token_id, ApiToken(hash_secret(token.secret), account, now_ms, check_note(note)))
    return token


def api_token_account(state: ClusterState, text: str) -> str | None:
    """The account an API token acts for, or None for a token that is not valid."""
    try:
        token = parse_api_token(text)
    except TokenError:
        return None
    record = state.get("apitoken", token.token_id)
    if not isinstance(record, ApiToken) or not secret_matches(record.secret_hash, token.secret):
        return None
    # A token outlives its account only if the two changes crossed between masters: the
    # account's absence settles it wherever the token is used.
    if not record.account.startswith("node:") and not isinstance(state.get("admin", record.account), AdminAccount):
        return None
    return record.account


def api_tokens(state: ClusterState) -> list[dict[str, object]]:
    """Every API token as `admin api-token list` shows it (never its secret or hash)."""
    return [
        {"id": token_id, "account": record.account, "created_ms": record.created_ms, "note": record.note}
        for token_id, record in state.records("apitoken")
    ]


def revoke_api_token(replication, token_id: str) -> bool:
    """Delete one API token; False when there is no such token."""
    if not isinstance(replication.state.get("apitoken", token_id), ApiToken):
        return False
    replication.delete("apitoken", token_id)
    return True


def revoke_api_tokens(replication, account: str) -> int:
    """Delete every API token of `account`; how many."""
    ids = [tid for tid, record in replication.state.records("apitoken") if record.account == account]
    for tid in ids:
        replication.delete("apitoken", tid)
    return len(ids)
