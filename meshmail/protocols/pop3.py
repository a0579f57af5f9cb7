"""POP3 up to the login, both sides: Pop3Server answers a client until it offers credentials
(RFC 1939, CAPA and response codes RFC 2449, AUTH RFC 5034, STLS RFC 2595, [SYS/TEMP] RFC 3206);
Pop3Client logs in at a backend with them. What follows the login is spliced, not parsed here.

Driving either side: pass received bytes to receive_data (b"" at end of stream), take events
from next_event until it returns None (more bytes needed), and send data_to_send() after each.
A ProtocolError is fatal: send data_to_send(), then the error's reply, then close.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import attrs

from .common import (
    MAX_SASL,
    SASL_MECHANISMS,
    Closed,
    Credentials,
    LineReader,
    LoggedIn,
    LoginClient,
    LoginRefused,
    LoginServer,
    Phase,
    ProtocolError,
    SaslError,
    StartTls,
    credential,
    sasl_plain_response,
)

CRLF = b"\r\n"
#: Longest client line: RFC 2449 caps commands at 255 octets but exempts SASL responses
#: (RFC 5034, section 4), so the cap is the longest AUTH line.
MAX_LINE = len(b"AUTH PLAIN ") + MAX_SASL
#: Longest reply line read from a backend, CRLF included (RFC 2449, section 4).
MAX_REPLY_LINE = 512
#: Longest command line the client side sends with an initial response (RFC 5034, section 4).
MAX_COMMAND_LINE = 255
#: Most capability lines read from a backend's CAPA.
MAX_CAPABILITIES = 64
#: Commands of the TRANSACTION state, answered "log in first" rather than "unknown".
_AFTER_LOGIN = frozenset({"STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL", "LAST", "UTF8"})


def _text(text: str) -> bytes:
    """Reply text the driver chose: printable ASCII on one line (replies are well-formed lines)."""
    data = text.encode("ascii")
    if not all(0x20 <= byte < 0x7F for byte in data) or len(data) > MAX_REPLY_LINE - 32:
        raise ValueError(f"reply text must be one short line of printable ASCII: {text!r}")
    return data


@attrs.define(eq=False)
class Pop3Server(LoginServer):
    """The client side of a POP3 proxy before login. The greeting waits in data_to_send().

    `tls_available`: STLS may be offered (the driver has a certificate). `tls_active`: the
    connection is TLS already (port 995). `require_tls`: USER, PASS and AUTH are refused with
    `-ERR [AUTH]` until TLS is up, as Dovecot does ([AUTH] rather than [SYS/...], so clients
    show the text instead of retrying), and CAPA lists neither USER nor SASL then. After STLS
    the client starts over (RFC 2595, section 4).

    Events: Credentials (answer with accept, reject or unavailable), StartTls (wrap the
    stream, then call tls_started), Closed. Nothing a client sends is echoed back. A line past
    MAX_LINE is refused with `-ERR Line too long`; bad commands past max_errors end the session.
    """

    _LINE_TOO_LONG = b"-ERR Line too long" + CRLF
    _DATA_BEFORE_TLS = b"-ERR Data received before TLS" + CRLF
    _TOO_MANY_ERRORS = b"-ERR Too many bad commands, closing." + CRLF
    _TOO_MANY_FAILURES = b""  # the -ERR [AUTH] says it all; Closed follows
    _CHALLENGE = b"+ "

    _user: str | None = attrs.field(default=None, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._reply(b"+OK " + _text(f"{self.hostname} POP3 ready."))

    def accept(self, text: str = "Logged in.") -> None:
        """The backend took the credentials: `+OK`, then the driver takes trailing_data()."""
        self._decided(b"+OK " + _text(text) + CRLF, Phase.DONE)

    def reject(self, text: str = "Authentication failed.") -> None:
        """Wrong credentials: `-ERR [AUTH]`; after max_login_failures the session ends."""
        self._login_failed(b"-ERR [AUTH] " + _text(text) + CRLF)

    def unavailable(self, text: str = "Temporary server failure, try again later.") -> None:
        """The credentials could not be checked (no backend): `-ERR [SYS/TEMP]` (RFC 3206)."""
        self._decided(b"-ERR [SYS/TEMP] " + _text(text) + CRLF, Phase.COMMANDS)

    # -- replies

    def _line_reader(self) -> LineReader:
        return LineReader(limit=MAX_LINE)

    def _reply(self, line: bytes) -> None:
        self._out += line + CRLF

    def _error(self, text: str) -> None:
        self._refuse(b"-ERR " + text.encode() + CRLF)

    def _sasl_cancelled(self) -> None:
        self._reply(b"-ERR Authentication cancelled.")

    def _sasl_malformed(self) -> None:
        self._error("Malformed authentication response.")

    # -- commands

    def _command(self, line: bytes) -> Credentials | StartTls | Closed | None:
        verb, _, argument = line.partition(b" ")
        name = verb.decode("ascii", "replace").upper()
        handler = _COMMANDS.get(name)
        if handler is not None:
            return handler(self, argument)
        self._error("Log in first." if name in _AFTER_LOGIN else "Unknown command.")
        return None

    def _capa(self, argument: bytes) -> None:
        if argument:
            return self._error("CAPA takes no argument.")
        # TOP and UIDL are what every backend offers after login; clients read CAPA once.
        lines = [b"+OK Capability list follows", b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        if self._tls_offered:
            lines.append(b"STLS")
        if self.login_allowed:
            lines += [b"USER", b"SASL " + " ".join(SASL_MECHANISMS).encode()]
        self._out += CRLF.join([*lines, b"."]) + CRLF

    def _stls(self, argument: bytes) -> StartTls | None:
        if argument:
            return self._error("STLS takes no argument.")
        if not self._tls_offered:
            return self._error("TLS is already active." if self.tls_active else "STLS is not available.")
        self._user = None
        pipelined = b"-ERR Commands pipelined after STLS." + CRLF
        return self._start_tls("STLS", b"+OK Begin TLS negotiation." + CRLF, pipelined)

    def _login_refused(self) -> bool:
        if self.login_allowed:
            return False
        self._error("[AUTH] Plaintext authentication disallowed, use STLS first.")
        return True

    def _user_command(self, argument: bytes) -> None:
        if self._login_refused():
            return None
        try:
            user = credential(argument, "user")
        except SaslError:
            user = ""
        if not user:
            return self._error("USER needs a valid user name.")
        self._user = user
        self._reply(b"+OK")
        return None

    def _pass(self, argument: bytes) -> Credentials | None:
        if self._login_refused():
            return None
        if self._user is None:
            return self._error("USER first.")
        try:
            password = credential(argument, "password")
        except SaslError:
            password = ""
        user, self._user = self._user, None
        if not password:
            return self._error("PASS needs a valid password.")
        self._phase = Phase.LOGIN
        return Credentials(user, password, "USER")

    def _auth(self, argument: bytes) -> Credentials | None:
        if self._login_refused():
            return None
        if not argument:  # the mechanism list some clients ask for (RFC 1734 practice)
            self._out += CRLF.join([b"+OK", *(m.encode() for m in SASL_MECHANISMS), b"."]) + CRLF
            return None
        mechanism, _, initial = argument.partition(b" ")
        name = mechanism.decode("ascii", "replace").upper()
        if name not in SASL_MECHANISMS or b" " in initial:
            return self._error("Unrecognized authentication type.")
        return self._sasl_start(name, initial or None)

    def _quit(self, argument: bytes) -> Closed:
        return self._close(b"+OK Bye." + CRLF)


_COMMANDS: dict[str, Callable[[Pop3Server, bytes], Credentials | StartTls | Closed | None]] = {
    "CAPA": Pop3Server._capa,
    "STLS": Pop3Server._stls,
    "USER": Pop3Server._user_command,
    "PASS": Pop3Server._pass,
    "AUTH": Pop3Server._auth,
    "QUIT": Pop3Server._quit,
}


# --- the backend side -----------------------------------------------------------------------


@attrs.frozen
class Pop3Reply:
    """One status line from a server: `ok` for +OK, `code` the RFC 2449 response code (`AUTH`,
    `SYS/TEMP`, or "" when none), `text` the rest."""

    ok: bool
    code: str
    text: str

    @property
    def temporary(self) -> bool:
        """Whether a refusal left the credentials unjudged: any code but [AUTH] (a bare -ERR
        is the classic wrong-password answer)."""
        return self.code not in ("", "AUTH")

    @classmethod
    def parse(cls, line: bytes) -> Pop3Reply:
        """Raises ProtocolError (close=True) for a line that is not +OK or -ERR."""
        status, _, rest = line.partition(b" ")
        if status.upper() not in (b"+OK", b"-ERR"):
            raise ProtocolError("backend reply is not +OK or -ERR", close=True)
        text = rest.decode("utf-8", "replace")
        code = ""
        if text.startswith("[") and "]" in text:
            code, _, text = text[1:].partition("]")
            code, text = code.upper(), text.strip()
        return cls(status.upper() == b"+OK", code, text)


class _Step(enum.Enum):
    GREETING = enum.auto()
    CAPA = enum.auto()  # status line of CAPA
    CAPA_LIST = enum.auto()  # capability lines up to "."
    STLS = enum.auto()
    AUTH_CONTINUE = enum.auto()  # AUTH PLAIN sent without initial response
    USER = enum.auto()  # USER sent
    LOGIN = enum.auto()  # the AUTH response or PASS sent


@attrs.define(eq=False)
class Pop3Client(LoginClient):
    """Logs in at a backend POP3 server as `user`: greeting, CAPA, STLS when offered and
    `starttls` (then CAPA again), then AUTH PLAIN when the backend lists it, else USER and PASS.

    `require_tls`: a backend without STLS is refused (LoginRefused, temporary). The client's
    address goes first, as a PROXY v2 header the driver sends (see proxyv2.py).
    Events: StartTls (wrap the stream, then call tls_started), LoggedIn, LoginRefused.
    """

    _STARTTLS = "STLS"
    _CARRIER = "a POP3 command"
    _QUIT = b"QUIT" + CRLF

    starttls: bool = True
    require_tls: bool = False
    tls_active: bool = False
    _step: _Step = attrs.field(default=_Step.GREETING, init=False)
    _capabilities: dict[str, list[str]] = attrs.field(factory=dict, init=False)
    _capa_lines: int = attrs.field(default=0, init=False)

    @property
    def capabilities(self) -> dict[str, list[str]]:
        """CAPA of the backend as last read: keyword -> arguments."""
        return self._capabilities

    def _line_reader(self) -> LineReader:
        return LineReader(limit=MAX_REPLY_LINE - 2)

    def _input(self, line: bytes) -> StartTls | LoggedIn | LoginRefused | None:
        return _STEPS[self._step](self, line)

    def _tls_resumed(self) -> None:
        self._capa()

    def _send(self, *parts: bytes) -> None:
        self._out += b" ".join(parts) + CRLF

    def _capa(self) -> None:
        self._capabilities, self._capa_lines = {}, 0
        self._send(b"CAPA")
        self._step = _Step.CAPA

    def _greeting(self, line: bytes) -> LoginRefused | None:
        reply = Pop3Reply.parse(line)
        if not reply.ok:
            return self._refused(f"greeting: {reply.text}")
        self._capa()
        return None

    def _capa_status(self, line: bytes) -> StartTls | LoginRefused | None:
        if Pop3Reply.parse(line).ok:
            self._step = _Step.CAPA_LIST
            return None
        return self._login()  # a server without CAPA (RFC 1939 only) takes USER/PASS

    def _capa_line(self, line: bytes) -> StartTls | LoginRefused | None:
        if line == b".":
            return self._login()
        self._capa_lines += 1
        if self._capa_lines > MAX_CAPABILITIES:
            raise ProtocolError(f"backend lists more than {MAX_CAPABILITIES} capabilities", close=True)
        words = line.removeprefix(b".").decode("ascii", "replace").upper().split()
        if words:
            self._capabilities[words[0]] = words[1:]
        return None

    def _login(self) -> StartTls | LoginRefused | None:
        if not self.tls_active and self.starttls and "STLS" in self._capabilities:
            self._send(b"STLS")
            self._step = _Step.STLS
            return None
        if self.require_tls and not self.tls_active:
            return self._refused("backend offers no STLS")
        if "PLAIN" in self._capabilities.get("SASL", []):
            response = sasl_plain_response(self.user, self.password)
            if len(b"AUTH PLAIN " + response + CRLF) <= MAX_COMMAND_LINE:
                self._send(b"AUTH", b"PLAIN", response)
                self._step = _Step.LOGIN
            else:
                self._send(b"AUTH", b"PLAIN")
                self._step = _Step.AUTH_CONTINUE
            return None
        if self._capabilities and "USER" not in self._capabilities:
            return self._refused("backend offers neither SASL PLAIN nor USER")
        self._send(b"USER", self.user.encode())
        self._step = _Step.USER
        return None

    def _stls(self, line: bytes) -> StartTls | LoginRefused:
        reply = Pop3Reply.parse(line)
        if not reply.ok:
            return self._refused(f"STLS: {reply.text}")
        return self._start_tls()

    def _auth_continue(self, line: bytes) -> LoginRefused | None:
        if line == b"+" or line.startswith(b"+ "):
            self._send(sasl_plain_response(self.user, self.password))
            self._step = _Step.LOGIN
            return None
        return self._result(line)

    def _user_reply(self, line: bytes) -> LoginRefused | None:
        reply = Pop3Reply.parse(line)
        if not reply.ok:
            return self._refused(reply.text, reply.temporary)
        self._send(b"PASS", self.password.encode())
        self._step = _Step.LOGIN
        return None

    def _result(self, line: bytes) -> LoggedIn | LoginRefused:
        reply = Pop3Reply.parse(line)
        if not reply.ok:
            return self._refused(reply.text, reply.temporary)
        return self._logged_in()


_STEPS: dict[_Step, Callable[[Pop3Client, bytes], StartTls | LoggedIn | LoginRefused | None]] = {
    _Step.GREETING: Pop3Client._greeting,
    _Step.CAPA: Pop3Client._capa_status,
    _Step.CAPA_LIST: Pop3Client._capa_line,
    _Step.STLS: Pop3Client._stls,
    _Step.AUTH_CONTINUE: Pop3Client._auth_continue,
    _Step.USER: Pop3Client._user_reply,
    _Step.LOGIN: Pop3Client._result,
}
