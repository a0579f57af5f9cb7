"""SMTP pieces and the submission login, both sides: the reply record and its parser, the
command line parser and the named status replies (shared with the MX), SubmissionServer (a
client up to AUTH: RFC 6409, 5321, 4954, 3207) and SmtpClient (a backend: EHLO, STARTTLS,
Postfix XCLIENT, AUTH). What follows AUTH is spliced to the backend, not parsed here.

Driving either side: pass received bytes to receive_data (b"" at end of stream), take events
from next_event until it returns None (more bytes needed), and send data_to_send() after each.
A ProtocolError is fatal: send data_to_send(), then the error's reply, then close.
"""

from __future__ import annotations

import enum
import ipaddress
import re
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
    StartTls,
    b64encode,
    sasl_plain_response,
)

CRLF = b"\r\n"
#: Longest command line, CRLF excluded: RFC 5321's 1000-octet text line.
MAX_COMMAND_LINE = 998
#: Longest AUTH line or SASL response, CRLF excluded: longer than a command (RFC 4954,
#: section 4 allows 12288); bounded by the longest response of common.MAX_SASL.
MAX_AUTH_LINE = len(b"AUTH PLAIN ") + MAX_SASL
#: Longest reply line read from a server, CRLF excluded (RFC 5321 says 512 with CRLF; text
#: past that is common enough to accept up to a text line).
MAX_REPLY_LINE = 998
#: Most lines in one reply read from a server (an EHLO reply has one per extension).
MAX_REPLY_LINES = 64

_REPLY = re.compile(rb"([2-5][0-9][0-9])(?:([ -])(.*))?", re.DOTALL)
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")
_VERB = re.compile(rb"[A-Za-z]{1,16}")


def _line_text(text: str) -> str:
    if not all(" " <= char < "\x7f" for char in text):
        raise ValueError(f"reply text must be printable ASCII on one line: {text!r}")
    return text


def _lines(text: str | tuple[str, ...]) -> tuple[str, ...]:
    lines = (text,) if isinstance(text, str) else tuple(text)
    if not lines:
        raise ValueError("a reply has at least one line")
    return tuple(_line_text(line) for line in lines)


@attrs.frozen
class Reply:
    """One SMTP reply: `code` (RFC 5321), `enhanced` status code ("5.7.8", RFC 3463; "" when
    none, as for greetings and EHLO) and its text lines. Invalid values raise ValueError, so
    every Reply is well-formed on the wire."""

    code: int = attrs.field(validator=attrs.validators.and_(attrs.validators.ge(200), attrs.validators.le(599)))
    enhanced: str = attrs.field(default="")
    lines: tuple[str, ...] = attrs.field(default=("",), converter=_lines)

    @enhanced.validator
    def _check_enhanced(self, _attribute: attrs.Attribute, value: str) -> None:
        match = _ENHANCED.fullmatch(value)
        if value and (match is None or int(match[1]) != self.code // 100):
            raise ValueError(f"enhanced code {value!r} does not fit reply code {self.code}")

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def positive(self) -> bool:
        return self.code < 400

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def __bytes__(self) -> bytes:
        last = len(self.lines) - 1
        return "".join(
            f"{self.code}{' ' if i == last else '-'}{' '.join(word for word in (self.enhanced, line) if word)}\r\n"
            for i, line in enumerate(self.lines)
        ).encode("ascii")

    def __str__(self) -> str:
        return " ".join(word for word in (str(self.code), self.enhanced, " / ".join(self.lines)) if word)

    def with_text(self, *lines: str) -> Reply:
        return attrs.evolve(self, lines=lines)


@attrs.define
class ReplyReader:
    """Assembles replies from lines (multi-line replies, RFC 5321 section 4.2.1), at most
    `max_lines` lines each."""

    max_lines: int = MAX_REPLY_LINES
    _code: bytes = b""
    _lines: list[bytes] = attrs.field(factory=list)

    def line(self, line: bytes) -> Reply | None:
        """Takes one line; returns the reply it completes, or None. Raises ProtocolError
        (close=True) for a line that is no reply, a code that changes mid-reply, or too
        many lines."""
        match = _REPLY.fullmatch(line)
        if match is None or (self._code and match[1] != self._code):
            raise ProtocolError("malformed SMTP reply line", close=True)
        if len(self._lines) >= self.max_lines:
            raise ProtocolError(f"SMTP reply longer than {self.max_lines} lines", close=True)
        self._code = match[1]
        self._lines.append(match[3] or b"")
        if match[2] == b"-":
            return None
        code, lines = int(self._code), [text.decode("utf-8", "replace") for text in self._lines]
        self._code, self._lines = b"", []
        enhanced = _ENHANCED.match(lines[0])
        if enhanced is None or int(enhanced[1]) != code // 100:
            return _parsed(code, "", lines)
        value = enhanced[0].strip()
        return _parsed(code, value, [line.removeprefix(value).lstrip(" ") for line in lines])


def _parsed(code: int, enhanced: str, lines: list[str]) -> Reply:
    # A server's text may hold anything; the record holds what can be sent on again.
    clean = ["".join(char if " " <= char < "\x7f" else "?" for char in line) for line in lines]
    return Reply(code, enhanced, tuple(clean))


# --- named replies (one home: the submission proxy, the MX and the tests use these) ---------

OK = Reply(250, "2.0.0", "OK")
BYE = Reply(221, "2.0.0", "Bye")
HELP = Reply(214, "2.0.0", "See RFC 5321 and RFC 4954")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
AUTH_SUCCEEDED = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_UNAVAILABLE = Reply(454, "4.7.0", "Temporary authentication failure")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_UNDECODABLE = Reply(501, "5.5.2", "Cannot decode response")
AUTH_MECHANISM_UNKNOWN = Reply(504, "5.5.4", "Unrecognized authentication type")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
TLS_UNAVAILABLE = Reply(502, "5.5.1", "STARTTLS not available")
TLS_ACTIVE = Reply(503, "5.5.1", "TLS already active")
EHLO_FIRST = Reply(503, "5.5.1", "Send EHLO first")
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_FAILURES = Reply(421, "4.7.0", "Too many failed logins, closing connection")
LINE_TOO_LONG_CLOSING = Reply(421, "4.7.0", "Line too long, closing connection")
PIPELINED_AFTER_STARTTLS = Reply(421, "4.7.0", "Commands pipelined after STARTTLS, closing connection")
DATA_BEFORE_TLS = Reply(421, "4.7.0", "Data received before TLS, closing connection")


def greeting(hostname: str) -> Reply:
    return Reply(220, "", f"{hostname} ESMTP ready")


# --- commands ----------------------------------------------------------------------------------


class BadCommand(ValueError):
    """A line that is no usable command; `reply` says why (UNKNOWN_COMMAND or SYNTAX_ERROR)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


@attrs.frozen
class Command:
    """One command line: the verb in upper case and the argument after the first space."""

    verb: str
    argument: str = ""

    @classmethod
    def parse(cls, line: bytes) -> Command:
        """Raises BadCommand: UNKNOWN_COMMAND when the verb is not 1-16 letters, SYNTAX_ERROR
        when the argument is not UTF-8 (RFC 6531) or holds control characters."""
        verb, _, argument = line.partition(b" ")
        if _VERB.fullmatch(verb) is None:
            raise BadCommand(UNKNOWN_COMMAND)
        try:
            text = argument.decode("utf-8")
        except UnicodeDecodeError:
            raise BadCommand(SYNTAX_ERROR) from None
        if any(char < " " or char == "\x7f" for char in text):
            raise BadCommand(SYNTAX_ERROR)
        return cls(verb.decode("ascii").upper(), text.strip(" "))


def _is_domain(argument: str) -> bool:
    """An EHLO/HELO argument: one word of visible ASCII (a name or an address literal)."""
    return 0 < len(argument) <= 255 and all("!" <= char <= "~" for char in argument)


# --- the client side ------------------------------------------------------------------------


#: Commands of a mail transaction or a lookup, answered AUTH_REQUIRED before the login.
_AFTER_AUTH = frozenset({"MAIL", "RCPT", "DATA", "BDAT", "VRFY", "EXPN", "ETRN", "BURL"})
#: Extensions listed by EHLO besides STARTTLS and AUTH: all of them are what every backend
#: offers too, since the session continues there after AUTH.
_EXTENSIONS = ("8BITMIME", "ENHANCEDSTATUSCODES", "PIPELINING")


@attrs.define(eq=False)
class SubmissionServer(LoginServer):
    """The client side of a submission proxy up to AUTH. The greeting waits in data_to_send().

    `tls_available`: STARTTLS may be offered. `tls_active`: the connection is TLS already
    (port 465). `require_tls`: AUTH is neither listed nor accepted before TLS (530 5.7.0).
    `ehlo_name` is the client's last EHLO argument: the driver replays it to the backend.

    Events: Credentials (answer with accept, reject or unavailable), StartTls (wrap the
    stream, then call tls_started), Closed. Nothing a client sends is echoed back. Fatal
    errors carry a 421: a line past MAX_AUTH_LINE, bad commands past max_errors (as aiosmtpd),
    commands pipelined after STARTTLS.
    """

    _LINE_TOO_LONG = bytes(LINE_TOO_LONG_CLOSING)
    _DATA_BEFORE_TLS = bytes(DATA_BEFORE_TLS)
    _TOO_MANY_ERRORS = bytes(TOO_MANY_ERRORS)
    _TOO_MANY_FAILURES = bytes(TOO_MANY_FAILURES)
    _CHALLENGE = b"334 "

    ehlo_name: str | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._reply(greeting(self.hostname))

    def tls_started(self) -> None:
        """The stream is now TLS: the client starts over with EHLO (RFC 3207, section 4.2)."""
        super().tls_started()
        self.ehlo_name = None

    def accept(self, reply: Reply = AUTH_SUCCEEDED) -> None:
        """The backend took the credentials: 235, then the driver takes trailing_data()."""
        self._decided(bytes(reply), Phase.DONE)

    def reject(self, reply: Reply = AUTH_FAILED) -> None:
        """Wrong credentials: 535; after max_login_failures a 421 follows and the session ends."""
        self._login_failed(bytes(reply))

    def unavailable(self, reply: Reply = AUTH_UNAVAILABLE) -> None:
        """The credentials could not be checked (no backend): 454."""
        self._decided(bytes(reply), Phase.COMMANDS)

    # -- replies

    def _line_reader(self) -> LineReader:
        return LineReader(limit=MAX_AUTH_LINE)

    def _reply(self, reply: Reply) -> None:
        self._out += bytes(reply)

    def _error(self, reply: Reply) -> None:
        self._refuse(bytes(reply))

    def _sasl_cancelled(self) -> None:
        self._reply(AUTH_CANCELLED)

    def _sasl_malformed(self) -> None:
        self._error(AUTH_UNDECODABLE)

    # -- commands

    def _command(self, line: bytes) -> Credentials | StartTls | Closed | None:
        try:
            command = Command.parse(line)
        except BadCommand as exc:
            return self._error(exc.reply)
        if len(line) > MAX_COMMAND_LINE and command.verb != "AUTH":
            return self._error(LINE_TOO_LONG)
        handler = _COMMANDS.get(command.verb)
        if handler is not None:
            return handler(self, command.argument)
        return self._error(AUTH_REQUIRED if command.verb in _AFTER_AUTH else UNKNOWN_COMMAND)

    def _ehlo(self, argument: str) -> None:
        if not _is_domain(argument):
            return self._error(SYNTAX_ERROR.with_text("Syntax: EHLO hostname"))
        self.ehlo_name = argument
        extensions = list(_EXTENSIONS)
        if self._tls_offered:
            extensions.append("STARTTLS")
        if self.login_allowed:
            extensions.append("AUTH " + " ".join(SASL_MECHANISMS))
        self._reply(Reply(250, "", (self.hostname, *extensions)))
        return None

    def _helo(self, argument: str) -> None:
        if not _is_domain(argument):
            return self._error(SYNTAX_ERROR.with_text("Syntax: HELO hostname"))
        # HELO offers no extensions, AUTH among them: the name is not kept for a login.
        self.ehlo_name = None
        self._reply(Reply(250, "", self.hostname))
        return None

    def _starttls(self, argument: str) -> StartTls | None:
        if argument:
            return self._error(SYNTAX_ERROR)
        if not self._tls_offered:
            return self._error(TLS_ACTIVE if self.tls_active else TLS_UNAVAILABLE)
        if self.ehlo_name is None:
            return self._error(EHLO_FIRST)
        return self._start_tls("STARTTLS", bytes(READY_FOR_TLS), bytes(PIPELINED_AFTER_STARTTLS))

    def _auth(self, argument: str) -> Credentials | None:
        if self.ehlo_name is None:
            return self._error(EHLO_FIRST)
        if not self.login_allowed:
            return self._error(TLS_REQUIRED)
        mechanism, _, initial = argument.partition(" ")
        if mechanism.upper() not in SASL_MECHANISMS:
            return self._error(AUTH_MECHANISM_UNKNOWN)
        if " " in initial:
            return self._error(SYNTAX_ERROR)
        return self._sasl_start(mechanism.upper(), initial.encode() or None)

    def _noop(self, argument: str) -> None:
        self._reply(OK)

    def _rset(self, argument: str) -> None:
        return self._error(SYNTAX_ERROR) if argument else self._reply(OK)

    def _help(self, argument: str) -> None:
        self._reply(HELP)

    def _quit(self, argument: str) -> Closed:
        return self._close(bytes(BYE))


_COMMANDS: dict[str, Callable[[SubmissionServer, str], Credentials | StartTls | Closed | None]] = {
    "EHLO": SubmissionServer._ehlo,
    "HELO": SubmissionServer._helo,
    "STARTTLS": SubmissionServer._starttls,
    "AUTH": SubmissionServer._auth,
    "NOOP": SubmissionServer._noop,
    "RSET": SubmissionServer._rset,
    "HELP": SubmissionServer._help,
    "QUIT": SubmissionServer._quit,
}


# --- the backend side -------------------------------------------------------------------------


def xtext(value: str) -> str:
    """RFC 3461 xtext: `+`, `=` and anything outside visible ASCII as +HH."""
    return "".join(
        char if "!" <= char <= "~" and char not in "+=" else "".join(f"+{b:02X}" for b in char.encode())
        for char in value
    )


@attrs.frozen
class Xclient:
    """What Postfix's XCLIENT tells a backend about the real client (XCLIENT_README): its
    address and port, its HELO name, and LOGIN only when the proxy itself has verified the
    password (Postfix then treats the session as authenticated)."""

    addr: str = attrs.field(converter=lambda value: str(ipaddress.ip_address(value)))
    port: int | None = None
    helo: str | None = None
    login: str | None = None

    def command(self, offered: list[str]) -> bytes:
        """The XCLIENT line with the attributes the server offered."""
        address = ipaddress.ip_address(self.addr)
        values = {
            "ADDR": f"IPV6:{address}" if address.version == 6 else str(address),
            "PORT": None if self.port is None else str(self.port),
            "HELO": self.helo,
            "LOGIN": self.login,
        }
        words = [f"{name}={xtext(value)}" for name, value in values.items() if value is not None and name in offered]
        return " ".join(["XCLIENT", *words]).encode()


class _Step(enum.Enum):
    GREETING = enum.auto()
    EHLO = enum.auto()
    STARTTLS = enum.auto()
    XCLIENT = enum.auto()
    AUTH = enum.auto()


@attrs.define(eq=False)
class SmtpClient(LoginClient):
    """Logs in at a backend SMTP server as `user`: greeting, EHLO `ehlo_name`, STARTTLS when
    offered and `starttls` (then EHLO again), XCLIENT when `xclient` is set (the server answers
    with a new greeting, so EHLO again), then AUTH PLAIN, or LOGIN when PLAIN is not offered.

    `require_tls`: a backend without STARTTLS is refused. `xclient` set and not offered (or
    refused) is a refusal too: the operator asked for the client's address to be passed.
    Refusals before AUTH are temporary LoginRefused events; after them QUIT is queued.
    Events: StartTls (wrap the stream, then call tls_started), LoggedIn, LoginRefused.
    """

    _CARRIER = "SASL"
    _QUIT = b"QUIT" + CRLF

    ehlo_name: str = "localhost"
    starttls: bool = True
    require_tls: bool = False
    tls_active: bool = False
    xclient: Xclient | None = None
    extensions: dict[str, list[str]] = attrs.field(factory=dict, init=False)
    _replies: ReplyReader = attrs.field(factory=ReplyReader, init=False)
    _step: _Step = attrs.field(default=_Step.GREETING, init=False)
    _xclient_sent: bool = attrs.field(default=False, init=False)
    _responses: list[bytes] = attrs.field(factory=list, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if not _is_domain(self.ehlo_name):
            raise ValueError(f"EHLO name must be one word of visible ASCII: {self.ehlo_name!r}")

    def _line_reader(self) -> LineReader:
        return LineReader(limit=MAX_REPLY_LINE)

    def _input(self, line: bytes) -> StartTls | LoggedIn | LoginRefused | None:
        reply = self._replies.line(line)
        return None if reply is None else _STEPS[self._step](self, reply)

    def _tls_resumed(self) -> None:
        self._ehlo()

    def _send(self, line: bytes) -> None:
        self._out += line + CRLF

    def _refused_by(self, what: str, reply: Reply | None = None, temporary: bool = True) -> LoginRefused:
        return self._refused(f"{what}: {reply}" if reply else what, temporary)

    def _ehlo(self) -> None:
        self._send(b"EHLO " + self.ehlo_name.encode())
        self._step = _Step.EHLO

    def _greeting(self, reply: Reply) -> LoginRefused | None:
        if reply.code != 220:
            return self._refused_by("greeting", reply)
        self._ehlo()
        return None

    def _ehlo_reply(self, reply: Reply) -> StartTls | LoginRefused | None:
        if reply.code != 250:
            return self._refused_by("EHLO", reply)
        self.extensions = {}
        for line in reply.lines[1:]:
            words = line.upper().split()
            if words:
                self.extensions[words[0]] = words[1:]
        return self._next()

    def _next(self) -> LoginRefused | None:
        """After an EHLO: STARTTLS, then XCLIENT, then AUTH, each when due."""
        if not self.tls_active and self.starttls and "STARTTLS" in self.extensions:
            self._send(b"STARTTLS")
            self._step = _Step.STARTTLS
            return None
        if self.require_tls and not self.tls_active:
            return self._refused_by("backend offers no STARTTLS")
        if self.xclient is not None and not self._xclient_sent:
            if "XCLIENT" not in self.extensions:
                return self._refused_by("backend offers no XCLIENT")
            self._send(self.xclient.command(self.extensions["XCLIENT"]))
            self._xclient_sent, self._step = True, _Step.XCLIENT
            return None
        return self._auth()

    def _auth(self) -> LoginRefused | None:
        mechanisms = self.extensions.get("AUTH", [])
        if "PLAIN" in mechanisms:
            self._send(b"AUTH PLAIN " + sasl_plain_response(self.user, self.password))
            self._responses = [sasl_plain_response(self.user, self.password)]  # for a server that ignores it
        elif "LOGIN" in mechanisms:
            self._send(b"AUTH LOGIN")
            self._responses = [b64encode(self.user.encode()), b64encode(self.password.encode())]
        else:
            return self._refused_by("backend offers neither AUTH PLAIN nor LOGIN")
        self._step = _Step.AUTH
        return None

    def _starttls_reply(self, reply: Reply) -> StartTls | LoginRefused:
        if reply.code != 220:
            return self._refused_by("STARTTLS", reply)
        return self._start_tls()

    def _xclient_reply(self, reply: Reply) -> LoginRefused | None:
        if not reply.positive:
            return self._refused_by("XCLIENT", reply)
        self._ehlo()  # Postfix starts a new session with a 220 greeting: EHLO again
        return None

    def _auth_reply(self, reply: Reply) -> LoggedIn | LoginRefused | None:
        if reply.code == 334:
            if not self._responses:
                self._send(b"*")
                return None
            self._send(self._responses.pop(0))
            return None
        self._responses = []
        if reply.code == 235:
            return self._logged_in()
        return self._refused_by("AUTH", reply, temporary=reply.code != 535)


_STEPS: dict[_Step, Callable[[SmtpClient, Reply], StartTls | LoggedIn | LoginRefused | None]] = {
    _Step.GREETING: SmtpClient._greeting,
    _Step.EHLO: SmtpClient._ehlo_reply,
    _Step.STARTTLS: SmtpClient._starttls_reply,
    _Step.XCLIENT: SmtpClient._xclient_reply,
    _Step.AUTH: SmtpClient._auth_reply,
}
