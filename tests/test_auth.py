"""Who may use the admin API of a real node (node.serve, real HTTP): every route but the
public ones refuses a request without valid credentials; bearer API tokens, login sessions
with their cookie and CSRF token, and the rate limits on failed logins."""

from __future__ import annotations

import base64
import http.client
import http.cookies
import json
import os
import types
import urllib.parse

import attrs
import pytest
import trio
from helpers.http import Answer, fetch, login_json, send
from helpers.served import Served, request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshmail.metrics import Metrics
from meshmail.web import create_app
from meshmail.web.auth import (
    CSRF_HEADER,
    LOGIN_FAILURES_PER_ACCOUNT,
    LOGIN_FAILURES_PER_ADDRESS,
    SESSION_COOKIE,
)

PASSWORD = "correct horse battery"
#: A well-formed API token that no account has.
FORGED_TOKEN = "mmapi1_0123456789abcdef_" + "A" * 43
#: Authorization headers that must never pass, besides a missing one.
MALFORMED = [
    "Basic " + base64.b64encode(b"alice:" + PASSWORD.encode()).decode(),
    "Bearer",
    "Bearer ",
    "garbage",
    "Token " + FORGED_TOKEN,
    "Bearer mmapi1_",
    "Bearer " + FORGED_TOKEN[:-1],
]

#: A gossip key that POST /keyring would install.
NEW_KEY = base64.b64encode(os.urandom(32)).decode()

#: Every (method, rule) of the app open to anyone.
PUBLIC = {
    ("GET", "/health"),
    ("GET", "/status"),
    ("GET", "/metrics"),
    ("GET", "/login"),
    ("POST", "/login"),
    ("GET", "/cluster/ca"),
    ("POST", "/cluster/join"),
}
#: Every other (method, rule), with a request that would change or show something if it got
#: through. test_the_lists_cover_every_route keeps this in step with the app.
ADMIN = {
    ("GET", "/static/<path:filename>"): ("/static/x.css", None),
    ("GET", "/session"): ("/session", None),
    ("POST", "/logout"): ("/logout", b"{}"),
    ("POST", "/leave"): ("/leave", b"{}"),
    ("POST", "/join"): ("/join", b'{"seeds": ["127.0.0.1:9"]}'),
    ("GET", "/domains"): ("/domains", None),
    ("GET", "/domains/conflicts"): ("/domains/conflicts", None),
    ("GET", "/domains/<name>"): ("/domains/x.org", None),
    ("PUT", "/domains/<name>"): ("/domains/x.org", b'{"slave": "s1"}'),
    ("DELETE", "/domains/<name>"): ("/domains/x.org", None),
    ("GET", "/route"): ("/route?address=a@x.org", None),
    ("GET", "/slave"): ("/slave", None),
    ("POST", "/tokens"): ("/tokens", b'{"role": "master"}'),
    ("GET", "/tokens"): ("/tokens", None),
    ("DELETE", "/tokens/<token_id>"): ("/tokens/0123456789abcdef", None),
    ("POST", "/nodes/<name>/remove"): ("/nodes/ghost/remove", b"{}"),
    ("GET", "/keyring"): ("/keyring", None),
    ("POST", "/keyring"): ("/keyring", json.dumps({"action": "install", "key": NEW_KEY}).encode()),
    ("GET", "/admins"): ("/admins", None),
    ("PUT", "/admins/<account>"): ("/admins/mallory", json.dumps({"password": PASSWORD}).encode()),
    ("DELETE", "/admins/<account>"): ("/admins/alice", None),
    ("POST", "/api-tokens"): ("/api-tokens", b"{}"),
    ("GET", "/api-tokens"): ("/api-tokens", None),
    ("DELETE", "/api-tokens/<token_id>"): ("/api-tokens/0123456789abcdef", None),
    ("GET", "/queue"): ("/queue", None),
    ("GET", "/queue/<queue_id>"): ("/queue/0123456789abcdef", None),
    ("POST", "/queue/flush"): ("/queue/flush", b"{}"),
    ("POST", "/queue/<queue_id>/retry"): ("/queue/0123456789abcdef/retry", b"{}"),
    ("DELETE", "/queue/<queue_id>"): ("/queue/0123456789abcdef", None),
}


@attrs.frozen
class Login:
    """A session from POST /login: its cookie, its CSRF token and the raw Set-Cookie header."""

    sid: str
    csrf: str
    set_cookie: str

    def headers(self, csrf: str | None = None, **extra: str) -> dict:
        headers = {"Cookie": f"{SESSION_COOKIE}={self.sid}", "Content-Type": "application/json", **extra}
        if csrf is not None:
            headers[CSRF_HEADER] = csrf
        return headers


def session_id(answer: Answer) -> str:
    cookie = http.cookies.SimpleCookie(answer.headers["Set-Cookie"])
    return cookie[SESSION_COOKIE].value


async def login_form(node: Served, account: str, password: str) -> Answer:
    body = urllib.parse.urlencode({"account": account, "password": password}).encode()
    return await fetch(node, "POST", "/login", body, {"Content-Type": "application/x-www-form-urlencoded"})


async def log_in(node: Served, account: str, password: str = PASSWORD) -> Login:
    answer = await login_json(node, account, password)
    assert answer.status == 200, answer
    document = answer.json()
    assert document["account"] == account
    return Login(session_id(answer), document["csrf_token"], answer.headers["Set-Cookie"])


async def add_admin(node: Served, account: str, password: str = PASSWORD) -> None:
    assert await request(node, "PUT", f"/admins/{account}", json.dumps({"password": password}).encode()) == (
        200,
        {"account": account},
    )


def assert_unauthorized(answer: Answer, what: str, *, head: bool = False) -> None:
    assert answer.status == 401, f"{what}: {answer.status} {answer.body[:200]!r}"
    assert answer.headers["WWW-Authenticate"] == "Bearer", what
    if not head:
        document = answer.json()
        assert list(document) == ["error"] and document["error"], what


# --- every route is closed ----------------------------------------------------------------


def test_the_lists_cover_every_route():
    # The app is built only to read its routes: create_app touches no more of the node.
    app = create_app(types.SimpleNamespace(metrics=Metrics()))
    public, admin = set(), set()
    for rule in app.url_map.iter_rules():
        handler = app.view_functions[rule.endpoint]
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            (public if getattr(handler, "meshmail_public", False) else admin).add((method, rule.rule))
    assert public == PUBLIC
    assert admin == set(ADMIN), "a new route needs a line in ADMIN (or @auth.public and a line in PUBLIC)"


async def test_every_admin_route_needs_credentials(node):
    async def snapshot() -> dict:
        return {path: await request(node, "GET", path) for path in ("/domains", "/admins", "/tokens", "/keyring")}

    before = await snapshot()
    assert before["/domains"] == (200, {"domains": []})
    forged_session = {"Cookie": f"{SESSION_COOKIE}={'x' * 43}"}
    for (method, _), (path, body) in ADMIN.items():
        what = f"{method} {path}"
        json_type = {"Content-Type": "application/json"}
        assert_unauthorized(await fetch(node, method, path, body, json_type), what)
        assert_unauthorized(await fetch(node, method, path, body, {**json_type, **forged_session}), what)
        bearers = [f"Bearer {FORGED_TOKEN}", node.token, f"Bearer {node.token}x", f"Bearer x{node.token}"]
        for header in bearers + MALFORMED:
            answer = await fetch(node, method, path, body, {**json_type, "Authorization": header})
            assert_unauthorized(answer, f"{what} with Authorization: {header}")
        if method == "GET":
            assert_unauthorized(await fetch(node, "HEAD", path), f"HEAD {path}", head=True)

    assert await snapshot() == before
    status, health = await request(node, "GET", "/health")
    assert status == 200 and health["ok"], "POST /leave without credentials must not stop the node"
    assert (await login_json(node, "mallory", PASSWORD)).status == 401


async def test_public_routes_need_no_credentials(node):
    for path in ("/health", "/status", "/login"):
        assert (await fetch(node, "GET", path)).status == 200, path
    # No [tls]: no CA, and no joins; refused for that reason, not for want of credentials.
    assert (await fetch(node, "GET", "/cluster/ca")).status == 404
    answer = await fetch(node, "POST", "/cluster/join", b"{}", {"Content-Type": "application/json"})
    assert answer.status == 403 and answer.json()["reason"] == "not_master"


# --- bearer tokens ------------------------------------------------------------------------


async def test_bearer_token(node):
    assert await request(node, "GET", "/domains") == (200, {"domains": []})
    answer = await fetch(node, "GET", "/session", headers={"Authorization": f"bearer  {node.token} "})
    assert answer.status == 200
    assert answer.json() == {"account": "node:solo", "via": "token", "csrf_token": None}
    # Bearer requests need no CSRF token: a browser never sends this header by itself.
    assert (await request(node, "PUT", "/domains/a.org", b'{"slave": "s1", "force": true}'))[0] == 200


async def test_tokens_of_a_deleted_account_stop_working(node):
    await add_admin(node, "alice")
    login = await log_in(node, "alice")
    answer = await fetch(node, "POST", "/api-tokens", b'{"note": "laptop"}', login.headers(login.csrf))
    assert answer.status == 201
    created = answer.json()
    assert created["account"] == "alice" and created["token"].startswith("mmapi1_")
    token = created["token"]
    assert await request(node, "GET", "/session", token=token) == (
        200,
        {"account": "alice", "via": "token", "csrf_token": None},
    )
    assert (await request(node, "GET", "/domains", token=token))[0] == 200

    assert await request(node, "DELETE", "/admins/alice") == (200, {"account": "alice", "removed": True})
    status, document = await request(node, "GET", "/domains", token=token)
    assert status == 401 and document["error"]
    assert (await login_json(node, "alice", PASSWORD)).status == 401
    assert (await request(node, "GET", "/domains"))[0] == 200, "other tokens still work"


async def test_deleting_an_account_ends_its_sessions(node):
    await add_admin(node, "alice")
    login = await log_in(node, "alice")
    assert (await fetch(node, "GET", "/domains", headers=login.headers())).status == 200
    assert await request(node, "DELETE", "/admins/alice") == (200, {"account": "alice", "removed": True})
    assert_unauthorized(await fetch(node, "GET", "/domains", headers=login.headers()), "session of a deleted account")
    answer = await fetch(node, "PUT", "/domains/a.org", b'{"slave": "s1"}', login.headers(login.csrf))
    assert_unauthorized(answer, "session of a deleted account")
    assert await request(node, "GET", "/domains") == (200, {"domains": []})


async def test_a_new_password_ends_older_sessions(node):
    await add_admin(node, "carol")
    old = await log_in(node, "carol")
    await add_admin(node, "carol", "another password")
    assert_unauthorized(await fetch(node, "GET", "/domains", headers=old.headers()), "session from the old password")
    new = await log_in(node, "carol", "another password")
    assert (await fetch(node, "GET", "/domains", headers=new.headers())).status == 200


# --- sessions -----------------------------------------------------------------------------


def cookie_attributes(set_cookie: str) -> dict[str, str]:
    """The attributes of one Set-Cookie header, names in lower case."""
    _, *parts = set_cookie.split(";")
    return {name.strip().lower(): value.strip() for name, _, value in (part.partition("=") for part in parts)}


async def test_login_page(node):
    answer = await fetch(node, "GET", "/login")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/html")
    page = answer.body.decode()
    assert '<form method="post" action="/login">' in page
    assert 'name="account"' in page and 'name="password"' in page and 'type="password"' in page
    assert "solo" in page


async def test_json_login_session_and_csrf(node):
    await add_admin(node, "alice")
    login = await log_in(node, "alice")
    attributes = cookie_attributes(login.set_cookie)
    assert "httponly" in attributes
    assert attributes["samesite"] == "Strict"
    assert attributes["path"] == "/"
    assert "secure" not in attributes, "no Secure cookie on plain HTTP (the browser would never send it back)"
    assert len(login.csrf) >= 32 and login.csrf != login.sid

    answer = await fetch(node, "GET", "/session", headers=login.headers())
    assert answer.status == 200
    assert answer.json() == {"account": "alice", "via": "session", "csrf_token": login.csrf}
    assert (await fetch(node, "GET", "/domains", headers=login.headers())).status == 200

    body = b'{"slave": "s1", "force": true}'  # s1 never joined
    for csrf in (None, "", "wrong", login.csrf + "x", login.csrf[:-1], login.sid):
        answer = await fetch(node, "PUT", "/domains/a.org", body, login.headers(csrf))
        assert answer.status == 403, csrf
        assert CSRF_HEADER in answer.json()["error"]
    # A CSRF token in the query or the body does not count: only the header.
    answer = await fetch(node, "PUT", f"/domains/a.org?csrf_token={login.csrf}", body, login.headers())
    assert answer.status == 403
    assert await request(node, "GET", "/domains") == (200, {"domains": []}), "refused: nothing assigned"

    answer = await fetch(node, "PUT", "/domains/a.org", body, login.headers(login.csrf))
    assert answer.status == 200 and answer.json()["slave"] == "s1"
    assert (await request(node, "GET", "/domains/a.org"))[0] == 200

    assert (await fetch(node, "POST", "/logout", b"{}", login.headers())).status == 403
    assert (await fetch(node, "GET", "/domains", headers=login.headers())).status == 200, "still logged in"
    answer = await fetch(node, "POST", "/logout", b"{}", login.headers(login.csrf))
    assert answer.status == 200 and answer.json() == {"logged_out": True}
    cleared = http.cookies.SimpleCookie(answer.headers["Set-Cookie"])[SESSION_COOKIE]
    assert cleared.value == "" and cleared["max-age"] == "0"
    assert_unauthorized(await fetch(node, "GET", "/domains", headers=login.headers()), "after logout")
    answer = await fetch(node, "DELETE", "/domains/a.org", None, login.headers(login.csrf))
    assert_unauthorized(answer, "after logout")


async def test_form_login(node):
    await add_admin(node, "alice")
    answer = await login_form(node, "alice", PASSWORD)
    assert answer.status == 303
    assert urllib.parse.urlsplit(answer.headers["Location"]).path == "/status"
    attributes = cookie_attributes(answer.headers["Set-Cookie"])
    assert "httponly" in attributes and attributes["samesite"] == "Strict" and attributes["path"] == "/"
    assert "secure" not in attributes
    sid = session_id(answer)
    cookie = {"Cookie": f"{SESSION_COOKIE}={sid}"}

    answer = await fetch(node, "GET", "/session", headers=cookie)
    assert answer.status == 200
    document = answer.json()
    assert document["account"] == "alice" and document["via"] == "session" and document["csrf_token"]
    answer = await fetch(node, "DELETE", "/domains/a.org", None, cookie)
    assert answer.status == 403
    answer = await fetch(node, "DELETE", "/domains/a.org", None, {**cookie, CSRF_HEADER: document["csrf_token"]})
    assert answer.status == 200

    answer = await login_form(node, "alice", "not the password")
    assert answer.status == 401
    assert answer.headers["Content-Type"].startswith("text/html")
    assert "Set-Cookie" not in answer.headers
    assert "wrong account or password" in answer.body.decode()


async def test_sessions_are_separate(node):
    await add_admin(node, "alice")
    await add_admin(node, "bob")
    alice, bob = await log_in(node, "alice"), await log_in(node, "bob")
    assert alice.sid != bob.sid and alice.csrf != bob.csrf
    # One session's CSRF token is no good with another session's cookie.
    answer = await fetch(node, "PUT", "/domains/a.org", b'{"slave": "s1"}', alice.headers(bob.csrf))
    assert answer.status == 403
    await fetch(node, "POST", "/logout", b"{}", bob.headers(bob.csrf))
    assert (await fetch(node, "GET", "/session", headers=alice.headers())).json()["account"] == "alice"


# --- refusals reveal nothing --------------------------------------------------------------


async def test_refusals_do_not_tell_whether_an_account_exists(node):
    await add_admin(node, "alice")
    for login in (login_json, login_form):
        unknown = await login(node, "nobody", PASSWORD)
        wrong = await login(node, "alice", PASSWORD + "!")
        assert unknown.status == wrong.status == 401
        assert unknown.body == wrong.body
        assert unknown.headers["Content-Type"] == wrong.headers["Content-Type"]
        assert "Set-Cookie" not in unknown.headers and "Set-Cookie" not in wrong.headers
    assert (await login_json(node, "nobody", PASSWORD)).json() == {"error": "wrong account or password"}


@pytest.mark.parametrize(
    "document",
    [
        {"account": "alice"},
        {"password": PASSWORD},
        {"account": ["alice"], "password": PASSWORD},
        {"account": "alice", "password": [PASSWORD]},
        {"account": "alice", "password": None},
        {"account": "a" * 65, "password": PASSWORD},
        {"account": "alice", "password": PASSWORD * 100},
    ],
)
async def test_odd_login_documents_are_refused(node, document):
    await add_admin(node, "alice")
    answer = await fetch(node, "POST", "/login", json.dumps(document).encode(), {"Content-Type": "application/json"})
    assert answer.status == 401 and answer.json() == {"error": "wrong account or password"}


# --- rate limits --------------------------------------------------------------------------


def retry_after(answer: Answer) -> int:
    assert answer.status == 429, answer
    seconds = int(answer.headers["Retry-After"])
    assert 0 < seconds <= 301
    return seconds


async def test_failed_logins_are_limited_per_account_then_per_address(node):
    assert LOGIN_FAILURES_PER_ACCOUNT == 5 and LOGIN_FAILURES_PER_ADDRESS == 10
    await add_admin(node, "alice")
    await add_admin(node, "bob")
    for attempt in range(5):
        assert (await login_json(node, "alice", f"wrong {attempt}")).status == 401
    limited = await login_json(node, "alice", PASSWORD)
    retry_after(limited)
    assert "too many failed sign-ins" in limited.json()["error"]
    assert "Set-Cookie" not in limited.headers
    retry_after(await login_form(node, "alice", PASSWORD))
    # The address has 5 failures of its 10: another account still signs in.
    await log_in(node, "bob")

    # A header the client writes does not make it another address.
    for n in range(5):
        spoofed = {"X-Forwarded-For": f"10.0.0.{n}", "X-Real-IP": f"10.0.0.{n}"}
        assert (await login_json(node, f"ghost{n}", PASSWORD, spoofed)).status == 401
    retry_after(await login_json(node, "bob", PASSWORD))
    retry_after(await login_json(node, "ghost9", PASSWORD, {"X-Forwarded-For": "10.9.9.9"}))
    # Sessions made before keep working.
    assert (await request(node, "GET", "/domains"))[0] == 200


async def test_strangers_cannot_lock_the_owner_out(node):
    """Failures from addresses an account never signed in from share its budget; an address
    it signed in from before keeps a budget of its own (each address still has its 10)."""
    await add_admin(node, "alice")
    assert (await login_json(node, "alice", PASSWORD, source="127.0.0.1")).status == 200
    for n in range(LOGIN_FAILURES_PER_ACCOUNT):
        assert (await login_json(node, "alice", f"guess {n}", source=f"127.0.0.{n + 20}")).status == 401
    retry_after(await login_json(node, "alice", PASSWORD, source="127.0.0.40"))  # a stranger waits
    assert (await login_json(node, "alice", PASSWORD, source="127.0.0.1")).status == 200  # the owner does not
    for n in range(LOGIN_FAILURES_PER_ACCOUNT):  # and the owner's own mistakes count on its own budget
        assert (await login_json(node, "alice", f"typo {n}", source="127.0.0.1")).status == 401
    retry_after(await login_json(node, "alice", PASSWORD, source="127.0.0.1"))


async def test_an_unknown_account_is_limited_like_a_real_one(node):
    await add_admin(node, "bob")
    for attempt in range(5):
        assert (await login_json(node, "ghost", f"guess {attempt}")).status == 401
    retry_after(await login_json(node, "ghost", PASSWORD))
    await log_in(node, "bob")


# --- fuzz -----------------------------------------------------------------------------------

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=120)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)
login_bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda a, p: json.dumps({"account": a, "password": p}).encode(), json_value, json_value),
    st.dictionaries(st.sampled_from(["account", "password", "csrf_token", "x"]), st.text(max_size=40)).map(
        lambda d: urllib.parse.urlencode(d).encode()
    ),
    json_value.map(lambda v: json.dumps(v).encode()),
)
content_types = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-16",
            "application/x-www-form-urlencoded",
            "application/x-www-form-urlencoded; charset=latin-1",
            "multipart/form-data",
            "multipart/form-data; boundary=x",
            "text/plain",
            "text/html",
        ]
    ),
    header_text,
)


async def test_fuzz_login_never_fails_inside(node):
    await add_admin(node, "alice")

    @FUZZ
    @given(body=login_bodies, content_type=content_types)
    def post_login(body: bytes, content_type: str | None) -> None:
        headers = {} if content_type is None else {"Content-Type": content_type}
        answer = send(node, "POST", "/login", body, headers)
        assert answer.status in (200, 303, 400, 401, 429), (answer.status, answer.body[:300])

    await trio.to_thread.run_sync(post_login)
    assert (await request(node, "GET", "/health"))[0] == 200


async def test_fuzz_authorization_header(node):
    bearer = st.one_of(
        header_text,
        header_text.map(lambda t: "Bearer " + t),
        header_text.map(lambda t: "bearer mmapi1_" + t),
        st.text("0123456789abcdef", min_size=16, max_size=16).map(lambda i: f"Bearer mmapi1_{i}_{'A' * 43}"),
        st.sampled_from([node.token[:-1], node.token.upper(), node.token + " " + node.token, f"Bearer\t{node.token}"]),
    )

    @FUZZ
    @given(header=bearer)
    def get_domains(header: str) -> None:
        answer = send(node, "GET", "/domains", None, {"Authorization": header})
        assert answer.status == 401, (header, answer.status, answer.body[:300])

    await trio.to_thread.run_sync(get_domains)


async def test_parallel_guesses_cannot_outrun_the_limit(node):
    """20 wrong passwords at once: only the first 5 are checked, the rest are refused 429
    (each attempt counts before its slow check, not after)."""
    await add_admin(node, "dana")
    answers: list[int] = []

    async def guess(i: int) -> None:
        answers.append((await login_json(node, "dana", f"wrong guess {i}")).status)

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(guess, i)
    assert sorted(answers) == [401] * LOGIN_FAILURES_PER_ACCOUNT + [429] * (20 - LOGIN_FAILURES_PER_ACCOUNT)
