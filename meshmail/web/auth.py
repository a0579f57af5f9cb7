"""Who may use the admin API: sessions (login form, cookie + CSRF token) and bearer API tokens,
with failed logins rate-limited per client address and per account name.

Deny by default: every route needs credentials unless its handler is marked @public.
A bearer token (``Authorization: Bearer mmapi1_...``) is checked against the replicated
state; a session is held in this node's memory (a login is per master). Requests that
change something with a session cookie must carry the session's CSRF token in the
``X-CSRF-Token`` header; bearer requests need none, since a browser never adds that header
by itself. A session ends when its account is deleted or its password changes, on every
master (the check reads the replicated state). A failed login answers the same, in about the
same time, whether or not the account exists.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import secrets
import time
from collections.abc import Callable

import attrs
import trio
from quart import Response, request

from ..metrics import Metrics
from ..security import accounts
from ..security.accounts import api_token_account
from ..security.passwords import MAX_PASSWORD
from ..security.throttle import LoginThrottle, RateLimiter
from ..state.records import AdminAccount

SESSION_COOKIE = "meshmail_session"
CSRF_HEADER = "X-CSRF-Token"
#: A session ends after this long without a request, and in any case after SESSION_MAX.
SESSION_IDLE = 2 * 3600.0
SESSION_MAX = 12 * 3600.0
MAX_SESSIONS = 10_000
#: Failed logins allowed per window, per client address and per account name (the account's
#: budget as security/throttle.py shares it).
LOGIN_FAILURES_PER_ADDRESS = 10
LOGIN_FAILURES_PER_ACCOUNT = 5
LOGIN_WINDOW = 300.0
#: Refused join requests allowed per client address per LOGIN_WINDOW.
JOIN_FAILURES_PER_ADDRESS = 20
#: Password checks (scrypt, 32 MiB each) run at most this many at once.
PASSWORD_CHECKS = 2
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def public(handler):
    """Mark a route handler as open to anyone (the check happens in before_request)."""
    handler.meshmail_public = True
    return handler


@attrs.frozen
class Principal:
    account: str
    #: "token" or "session".
    via: str


@attrs.define
class Session:
    account: str
    csrf: str
    created: float
    seen: float
    #: The account's password hash at login: a new password ends older sessions.
    password: str = attrs.field(repr=False, default="")


@attrs.define
class Auth:
    """The authentication state of one node's HTTP API."""

    state_of: Callable[[], object]
    metrics: Metrics
    clock: Callable[[], float] = time.monotonic
    sessions: dict[str, Session] = attrs.Factory(dict)
    logins: LoginThrottle = attrs.Factory(
        lambda: LoginThrottle(LOGIN_FAILURES_PER_ADDRESS, LOGIN_FAILURES_PER_ACCOUNT, LOGIN_WINDOW)
    )
    #: Refused join requests per client address (a token secret is 256 bits: this only keeps
    #: a flood of them from costing CPU).
    joins: RateLimiter = attrs.Factory(lambda: RateLimiter(JOIN_FAILURES_PER_ADDRESS, LOGIN_WINDOW))
    checks: trio.Semaphore = attrs.Factory(lambda: trio.Semaphore(PASSWORD_CHECKS))

    # --- requests ---------------------------------------------------------------------

    def principal(self) -> Principal | None:
        """Who sent the current request, or None. Raises Forbidden-worthy CsrfError for a
        session request that changes something without the session's CSRF token."""
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer":
                return None
            account = api_token_account(self.state_of(), token.strip())
            if account is None:
                self.metrics.bad_api_tokens.inc()
            return None if account is None else Principal(account, "token")
        session = self.session()
        if session is None:
            return None
        if request.method not in SAFE_METHODS and not self.csrf_ok(session):
            raise CsrfError()
        return Principal(session.account, "session")

    def session(self) -> Session | None:
        sid = request.cookies.get(SESSION_COOKIE, "")
        session = self.sessions.get(sid) if 0 < len(sid) <= 64 else None
        if session is None:
            return None
        now = self.clock()
        if now - session.seen > SESSION_IDLE or now - session.created > SESSION_MAX:
            del self.sessions[sid]
            return None
        record = self.state_of().get("admin", session.account)
        if not isinstance(record, AdminAccount) or record.password != session.password:
            del self.sessions[sid]  # the account was deleted or its password changed
            return None
        session.seen = now
        return session

    def csrf_ok(self, session: Session) -> bool:
        sent = request.headers.get(CSRF_HEADER, "")
        return bool(sent) and hmac.compare_digest(sent.encode(), session.csrf.encode())

    # --- logins ----------------------------------------------------------------------

    async def login(self, account: object, password: object) -> tuple[str | None, float]:
        """(session id, 0) for a good login; (None, retry_after) otherwise, retry_after > 0
        when the client address or the account name is rate-limited."""
        now = self.clock()
        address = client_address()
        name = account if isinstance(account, str) and len(account) <= 64 else ""
        wait = self.logins.retry_after(name, address, now)
        if wait > 0:
            self.metrics.logins_limited.inc()
            return None, wait
        record = accounts.admin(self.state_of(), name)
        given = password if isinstance(password, str) and len(password) <= MAX_PASSWORD else ""
        # Counted as a failure before the (slow) check, so that parallel attempts cannot all
        # pass the limit while the first ones are still being checked; forgiven if good.
        self.logins.fail(name, address, now)
        async with self.checks:
            matches = await trio.to_thread.run_sync(accounts.password_matches, record, given)
        if not matches:
            self.metrics.login_failures.inc()
            return None, 0.0
        self.logins.forgive(name, address, now)
        self.logins.remember(name, address)
        self.metrics.logins.inc()
        return self.new_session(name, record.password), 0.0

    def new_session(self, account: str, password_hash: str) -> str:
        now = self.clock()
        if len(self.sessions) >= MAX_SESSIONS:
            oldest = min(self.sessions, key=lambda sid: self.sessions[sid].seen)
            del self.sessions[oldest]
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = Session(account, secrets.token_urlsafe(32), now, now, password_hash)
        return sid

    def logout(self) -> None:
        self.sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)


class CsrfError(Exception):
    """A session request that changes something without the CSRF token."""


def client_address() -> str:
    """The client's IP from the ASGI scope (never from headers, which the client writes)."""
    client = (request.scope.get("client") or ("",))[0]
    try:
        return str(ipaddress.ip_address(client))
    except ValueError:
        return "unknown"


def session_cookie(response: Response, sid: str, *, secure: bool) -> None:
    response.set_cookie(
        SESSION_COOKIE, sid, max_age=int(SESSION_MAX), httponly=True, secure=secure, samesite="Strict", path="/"
    )


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>meshmail: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body>
<main>
<h1>meshmail</h1>
<p>Sign in to the admin API of node {node}.</p>
{error}
<form method="post" action="/login">
<label>Account <input name="account" autocomplete="username" required maxlength="64"></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Sign in</button>
</form>
</main>
</body></html>
"""


def login_page(node: str, error: str = "") -> str:
    shown = f'<p role="alert">{html.escape(error)}</p>' if error else ""
    return LOGIN_PAGE.format(node=html.escape(node), error=shown)
