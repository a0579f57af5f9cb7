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
    LineTooLong,
    LoggedIn,
    LoginRefused,
    ProtocolError,
    SaslCancelled,
    SaslError,
    SaslExchange,
    StartTls,
    b64encode,
    credential,
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
#: Bad commands answered before the session ends with 421 (aiosmtpd does the same).
MAX_ERRORS = 10
#: Failed logins before the session ends with 421.
MAX_LOGIN_FAILURES = 3

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


class _Phase(enum.Enum):
    COMMANDS = enum.auto()
    SASL = enum.auto()  # inside AUTH, reading responses
    STARTTLS = enum.auto()  # 220 sent to STARTTLS, waiting for tls_started()
    LOGIN = enum.auto()  # Credentials handed out, waiting for accept/reject/unavailable
    DONE = enum.auto()  # authenticated: the rest is trailing data
    CLOSED = enum.auto()


#: Commands of a mail transaction or a lookup, answered AUTH_REQUIRED before the login.
_AFTER_AUTH = frozenset({"MAIL", "RCPT", "DATA", "BDAT", "VRFY", "EXPN", "ETRN", "BURL"})
#: Extensions listed by EHLO besides STARTTLS and AUTH: all of them are what every backend
#: offers too, since the session continues there after AUTH.
_EXTENSIONS = ("8BITMIME", "ENHANCEDSTATUSCODES", "PIPELINING")


@attrs.define(eq=False)
class SubmissionServer:
    """The client side of a submission proxy up to AUTH. The greeting waits in data_to_send().

    `tls_available`: STARTTLS may be offered. `tls_active`: the connection is TLS already
    (port 465). `require_tls`: AUTH is neither listed nor accepted before TLS (530 5.7.0).
    `ehlo_name` is the client's last EHLO argument: the driver replays it to the backend.

    Events: Credentials (answer with accept, reject or unavailable), StartTls (wrap the
    stream, then call tls_started), Closed. Nothing a client sends is echoed back.
    """

    hostname: str = "localhost"
    tls_available: bool = False
    tls_active: bool = False
    require_tls: bool = True
    max_errors: int = MAX_ERRORS
    max_login_failures: int = MAX_LOGIN_FAILURES
    ehlo_name: str | None = attrs.field(default=None, init=False)
    _reader: LineReader = attrs.field(factory=lambda: LineReader(limit=MAX_AUTH_LINE), init=False, repr=False)
    _out: bytearray = attrs.field(factory=bytearray, init=False, repr=False)
    _phase: _Phase = attrs.field(default=_Phase.COMMANDS, init=False)
    _eof: bool = attrs.field(default=False, init=False)
    _sasl: SaslExchange | None = attrs.field(default=None, init=False)
    _errors: int = attrs.field(default=0, init=False)
    _failures: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        if self.require_tls and not (self.tls_available or self.tls_active):
            raise ValueError("require_tls without TLS: no client could ever log in")
        self._reply(greeting(self.hostname))

    # -- the driver's side

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; b"" means the client closed its side."""
        if data:
            self._reader.feed(data)
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        data, self._out = bytes(self._out), bytearray()
        return data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handled (at most MAX_AUTH_LINE + 1 before AUTH)."""
        return self._reader.pending

    @property
    def login_allowed(self) -> bool:
        return self.tls_active or not self.require_tls

    def next_event(self) -> Credentials | StartTls | Closed | None:
        """The next event, or None until more bytes arrive or the driver answers the last
        one. Raises ProtocolError (close=True, a 421 reply) on a line past MAX_AUTH_LINE, too
        many bad commands, or commands pipelined after STARTTLS."""
        while self._phase in (_Phase.COMMANDS, _Phase.SASL):
            try:
                line = self._reader.next_line()
            except LineTooLong as exc:
                raise self._fatal(str(exc), LINE_TOO_LONG_CLOSING) from None
            if line is None:
                if not self._eof:
                    return None
                self._phase = _Phase.CLOSED
                break
            event = self._respond(line) if self._sasl else self._command(line)
            if event is not None:
                return event
        return Closed() if self._phase is _Phase.CLOSED else None

    def tls_started(self) -> None:
        """The stream is now TLS: the client starts over with EHLO (RFC 3207, section 4.2)."""
        if self._phase is not _Phase.STARTTLS:
            raise RuntimeError("tls_started without a StartTls event")
        if self._reader.pending:
            raise self._fatal("plaintext received before TLS started", DATA_BEFORE_TLS)
        self.tls_active, self.ehlo_name, self._phase = True, None, _Phase.COMMANDS

    def accept(self, reply: Reply = AUTH_SUCCEEDED) -> None:
        """The backend took the credentials: 235, then the driver takes trailing_data()."""
        self._decided(reply, _Phase.DONE)

    def reject(self, reply: Reply = AUTH_FAILED) -> None:
        """Wrong credentials: 535; after max_login_failures a 421 follows and the session ends."""
        self._failures += 1
        done = self._failures >= self.max_login_failures
        self._decided(reply, _Phase.CLOSED if done else _Phase.COMMANDS)
        if done:
            self._reply(TOO_MANY_FAILURES)

    def unavailable(self, reply: Reply = AUTH_UNAVAILABLE) -> None:
        """The credentials could not be checked (no backend): 454."""
        self._decided(reply, _Phase.COMMANDS)

    def trailing_data(self) -> bytes:
        """What the client sent after AUTH (pipelined MAIL, RCPT...), for the backend."""
        if self._phase is not _Phase.DONE:
            raise RuntimeError("trailing_data before accept")
        return self._reader.rest()

    # -- replies

    def _reply(self, reply: Reply) -> None:
        self._out += bytes(reply)

    def _decided(self, reply: Reply, phase: _Phase) -> None:
        if self._phase is not _Phase.LOGIN:
            raise RuntimeError("no login is waiting for an answer")
        self._reply(reply)
        self._phase = phase

    def _fatal(self, why: str, reply: Reply) -> ProtocolError:
        self._phase = _Phase.CLOSED
        return ProtocolError(why, bytes(reply), close=True)

    def _error(self, reply: Reply) -> None:
        """Answers a bad command; past max_errors the session ends with 421 instead."""
        self._errors += 1
        if self._errors > self.max_errors:
            raise self._fatal("too many bad commands", TOO_MANY_ERRORS)
        self._reply(reply)

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
        if self.tls_available and not self.tls_active:
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
        if self.tls_active or not self.tls_available:
            return self._error(TLS_ACTIVE if self.tls_active else TLS_UNAVAILABLE)
        if self.ehlo_name is None:
            return self._error(EHLO_FIRST)
        if self._reader.pending:
            # Whatever follows STARTTLS before the handshake would run as if sent over TLS
            # (CVE-2011-0411 and its kin).
            raise self._fatal("commands pipelined after STARTTLS", PIPELINED_AFTER_STARTTLS)
        self._reply(READY_FOR_TLS)
        self._phase = _Phase.STARTTLS
        return StartTls()

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
        self._sasl = SaslExchange(mechanism.upper())
        return self._sasl_step(self._sasl.start, initial.encode() or None)

    def _respond(self, line: bytes) -> Credentials | None:
        assert self._sasl is not None
        return self._sasl_step(self._sasl.respond, line)

    def _sasl_step(self, step: Callable[[bytes | None], bytes | Credentials], data: bytes | None) -> Credentials | None:
        try:
            answer = step(data)
        except SaslCancelled:
            self._sasl = None
            self._reply(AUTH_CANCELLED)
            return None
        except SaslError:
            self._sasl = None
            return self._error(AUTH_UNDECODABLE)
        if isinstance(answer, Credentials):
            self._sasl, self._phase = None, _Phase.LOGIN
            return answer
        self._out += b"334 " + answer + CRLF
        return None

    def _noop(self, argument: str) -> None:
        self._reply(OK)

    def _rset(self, argument: str) -> None:
        return self._error(SYNTAX_ERROR) if argument else self._reply(OK)

    def _help(self, argument: str) -> None:
        self._reply(HELP)

    def _quit(self, argument: str) -> Closed:
        self._reply(BYE)
        self._phase = _Phase.CLOSED
        return Closed()


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
    TLS_WAIT = enum.auto()  # StartTls handed out, waiting for tls_started()
    XCLIENT = enum.auto()
    AUTH = enum.auto()
    DONE = enum.auto()


@attrs.define(eq=False)
class SmtpClient:
    """Logs in at a backend SMTP server as `user`: greeting, EHLO `ehlo_name`, STARTTLS when
    offered and `starttls`, XCLIENT when `xclient` is set (the server answers with a new
    greeting, so EHLO again), then AUTH PLAIN, or LOGIN when PLAIN is not offered.

    `require_tls`: a backend without STARTTLS is refused. `xclient` set and not offered (or
    refused) is a refusal too: the operator asked for the client's address to be passed.
    Refusals before AUTH are temporary LoginRefused events; after them QUIT is queued.
    Events: StartTls (wrap the stream, then call tls_started), LoggedIn, LoginRefused.
    """

    user: str
    password: str = attrs.field(repr=False)
    ehlo_name: str = "localhost"
    starttls: bool = True
    require_tls: bool = False
    tls_active: bool = False
    xclient: Xclient | None = None
    extensions: dict[str, list[str]] = attrs.field(factory=dict, init=False)
    _reader: LineReader = attrs.field(factory=lambda: LineReader(limit=MAX_REPLY_LINE), init=False, repr=False)
    _replies: ReplyReader = attrs.field(factory=ReplyReader, init=False)
    _out: bytearray = attrs.field(factory=bytearray, init=False, repr=False)
    _step: _Step = attrs.field(default=_Step.GREETING, init=False)
    _xclient_sent: bool = attrs.field(default=False, init=False)
    _responses: list[bytes] = attrs.field(factory=list, init=False, repr=False)
    _eof: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        for value, what in ((self.user, "user"), (self.password, "password")):
            if not value or credential(value.encode(), what) != value:
                raise ValueError(f"{what} unfit for SASL")
        if not _is_domain(self.ehlo_name):
            raise ValueError(f"EHLO name must be one word of visible ASCII: {self.ehlo_name!r}")

    def receive_data(self, data: bytes) -> None:
        if data:
            self._reader.feed(data)
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        data, self._out = bytes(self._out), bytearray()
        return data

    @property
    def buffered(self) -> int:
        return self._reader.pending

    def trailing_data(self) -> bytes:
        """Bytes the backend sent after its AUTH reply (none, from a well-behaved one)."""
        if self._step is not _Step.DONE:
            raise RuntimeError("trailing_data before the login ended")
        return self._reader.rest()

    def tls_started(self) -> None:
        if self._step is not _Step.TLS_WAIT:
            raise RuntimeError("tls_started without a StartTls event")
        if self._reader.pending:
            raise ProtocolError("backend sent plaintext after STARTTLS", close=True)
        self.tls_active = True
        self._ehlo()

    def next_event(self) -> StartTls | LoggedIn | LoginRefused | None:
        """The next event, or None until more bytes arrive. Raises ProtocolError (close=True)
        when the backend breaks the protocol or closes early."""
        while self._step not in (_Step.TLS_WAIT, _Step.DONE):
            try:
                line = self._reader.next_line()
            except LineTooLong as exc:
                raise ProtocolError(f"backend: {exc}", close=True) from None
            if line is None:
                if self._eof:
                    raise ProtocolError("backend closed the connection during login", close=True)
                return None
            reply = self._replies.line(line)
            event = None if reply is None else _STEPS[self._step](self, reply)
            if event is not None:
                return event
        return None

    def _send(self, line: bytes) -> None:
        self._out += line + CRLF

    def _refused(self, what: str, reply: Reply | None = None, temporary: bool = True) -> LoginRefused:
        self._send(b"QUIT")
        self._step = _Step.DONE
        return LoginRefused(f"{what}: {reply}" if reply else what, temporary)

    def _ehlo(self) -> None:
        self._send(b"EHLO " + self.ehlo_name.encode())
        self._step = _Step.EHLO

    def _greeting(self, reply: Reply) -> LoginRefused | None:
        if reply.code != 220:
            return self._refused("greeting", reply)
        self._ehlo()
        return None

    def _ehlo_reply(self, reply: Reply) -> StartTls | LoginRefused | None:
        if reply.code != 250:
            return self._refused("EHLO", reply)
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
            return self._refused("backend offers no STARTTLS")
        if self.xclient is not None and not self._xclient_sent:
            if "XCLIENT" not in self.extensions:
                return self._refused("backend offers no XCLIENT")
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
            return self._refused("backend offers neither AUTH PLAIN nor LOGIN")
        self._step = _Step.AUTH
        return None

    def _starttls_reply(self, reply: Reply) -> StartTls | LoginRefused:
        if reply.code != 220:
            return self._refused("STARTTLS", reply)
        self._step = _Step.TLS_WAIT
        return StartTls()

    def _xclient_reply(self, reply: Reply) -> LoginRefused | None:
        if not reply.positive:
            return self._refused("XCLIENT", reply)
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
            self._step = _Step.DONE
            return LoggedIn()
        return self._refused("AUTH", reply, temporary=reply.code != 535)


_STEPS: dict[_Step, Callable[[SmtpClient, Reply], StartTls | LoggedIn | LoginRefused | None]] = {
    _Step.GREETING: SmtpClient._greeting,
    _Step.EHLO: SmtpClient._ehlo_reply,
    _Step.STARTTLS: SmtpClient._starttls_reply,
    _Step.XCLIENT: SmtpClient._xclient_reply,
    _Step.AUTH: SmtpClient._auth_reply,
}
