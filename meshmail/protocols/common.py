"""What the mail protocol codecs share: a bounded line reader, the protocol error that carries
its reply, the pre-login and backend login events, the server side of SASL PLAIN and LOGIN, and
the two shapes the codecs take: LoginServer (a client up to its login) and LoginClient (a login
at a backend), each owning the phases, buffers and limits while a protocol adds its commands.

No sockets and no trio here: bytes in, events and reply bytes out (see imap.py, pop3.py,
smtp.py). Every buffer has a cap; input past a cap is a ProtocolError, never a bigger buffer.
"""

from __future__ import annotations

import abc
import base64
import binascii
import enum
from collections.abc import Callable
from typing import ClassVar

import attrs

#: Longest credential (user name, password, SASL authorization id) accepted, in bytes.
MAX_CREDENTIAL = 1024
#: Longest SASL response accepted, in base64 characters (PLAIN of three longest credentials).
MAX_SASL = 4 * ((3 * MAX_CREDENTIAL + 2 + 2) // 3)


class ProtocolError(Exception):
    """Input a codec refuses. `reply` is the exact bytes to send the peer (may be empty);
    `close` says whether the connection must end after it. str() is for logs."""

    def __init__(self, message: str, reply: bytes = b"", *, close: bool = False) -> None:
        super().__init__(message)
        self.reply = reply
        self.close = close


class LineTooLong(ProtocolError):
    """A line longer than the codec's cap; the connection cannot be resynchronised."""


@attrs.define
class LineReader:
    """Splits received bytes into lines ending in CRLF (a bare LF also ends a line, as most
    servers accept). It holds at most `limit` + 1 bytes of an unfinished line, plus the
    `literal` raw bytes (an IMAP literal) such a line may follow; feed() keeps no more, and the
    next read refuses the line. A line end is looked for once in each byte, so reading a line
    sent a byte at a time costs its length, not its length squared."""

    limit: int
    _buffer: bytearray = attrs.field(factory=bytearray)
    literal: int = attrs.field(default=0, kw_only=True)
    _scanned: int = attrs.field(default=0, init=False)  # bytes at the front known to hold no LF
    _tail: int = attrs.field(default=0, init=False)  # bytes after the last LF
    _cut: bool = attrs.field(default=False, init=False)  # input past the cap was dropped

    def feed(self, data: bytes) -> None:
        """Keeps `data`, up to the cap on bytes after the last line end; past it the rest of
        the stream is dropped and the read that reaches the cut raises LineTooLong."""
        if self._cut:
            return
        cap = self.limit + 1 + self.literal
        end = data.rfind(b"\n")
        tail = self._tail + len(data) if end < 0 else len(data) - end - 1
        if tail > cap:
            data, tail, self._cut = data[: len(data) - (tail - cap)], cap, True
        self._buffer += data
        self._tail = tail

    def next_line(self) -> bytes | None:
        """The next line without its line end, or None until one is complete. Raises
        LineTooLong (close=True, no reply: the codec adds its own) past `limit`."""
        end = self._buffer.find(b"\n", self._scanned, self.limit + 2)
        if end < 0:
            self._scanned = min(len(self._buffer), self.limit + 2)
            if self._cut or len(self._buffer) > self.limit + 1:  # room for a CR whose LF is on its way
                raise LineTooLong(f"line longer than {self.limit} bytes", close=True)
            return None
        line = bytes(self._buffer[:end])
        self._consume(end + 1)
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.limit:
            raise LineTooLong(f"line longer than {self.limit} bytes", close=True)
        return line

    def take(self, size: int) -> bytes | None:
        """Exactly `size` raw bytes (an IMAP literal), or None until they have arrived.
        Raises LineTooLong when they were cut off."""
        if len(self._buffer) < size:
            if self._cut:
                raise LineTooLong(f"literal and line longer than {self.limit + self.literal} bytes", close=True)
            return None
        data = bytes(self._buffer[:size])
        self._consume(size)
        return data

    def rest(self) -> bytes:
        """Everything received and not yet read (handed on after STARTTLS or a login). Raises
        LineTooLong when part of it was cut off."""
        if self._cut:
            raise LineTooLong(f"line longer than {self.limit} bytes", close=True)
        data, self._buffer = bytes(self._buffer), bytearray()
        self._scanned = self._tail = 0
        return data

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def _consume(self, size: int) -> None:
        del self._buffer[:size]
        self._scanned = max(0, self._scanned - size)
        self._tail = min(self._tail, len(self._buffer))


# --- events a pre-login codec hands its driver -------------------------------------------


@attrs.frozen
class Credentials:
    """A client offered a user name and password (LOGIN, USER/PASS, AUTH PLAIN or LOGIN).
    `authzid` is the SASL authorization identity, empty when none was given. The password
    is left out of repr: records get logged."""

    user: str
    password: str = attrs.field(repr=False)
    mechanism: str
    authzid: str = ""


@attrs.frozen
class StartTls:
    """The client asked for TLS and was told to go ahead: the driver wraps the stream, then
    calls the codec's tls_started()."""


@attrs.frozen
class Closed:
    """The session is over (LOGOUT, QUIT, or an error that ends it): send what is pending,
    then close."""


# --- events a backend login codec hands its driver ----------------------------------------


@attrs.frozen
class LoggedIn:
    """The backend accepted the credentials: the driver sends the client's trailing data
    there and splices."""


@attrs.frozen
class LoginRefused:
    """The backend refused the login. `temporary` when the credentials were not judged (the
    backend is unavailable, lacks TLS or a usable mechanism, or answered 4xx or [SYS/TEMP]):
    the proxy then tells the client to try later, not that the password is wrong. `reply` is
    the backend's reply text, for logs."""

    reply: str
    temporary: bool


# --- SASL ---------------------------------------------------------------------------------


#: SASL mechanisms the pre-login codecs accept, in the order they offer them.
SASL_MECHANISMS = ("PLAIN", "LOGIN")


class SaslError(ValueError):
    """A SASL response that cannot be used; str() is for logs, never holds the secret."""


class SaslCancelled(SaslError):
    """The client answered a challenge with `*` (RFC 4954, 5034, 9051)."""


def b64decode(text: bytes | str) -> bytes:
    """Strict base64 (RFC 4648): the canonical form only (padding required, none in excess,
    no stray bits); raises SaslError."""
    if len(text) > MAX_SASL:
        raise SaslError(f"base64 response longer than {MAX_SASL} characters")
    try:
        encoded = text.encode("ascii") if isinstance(text, str) else bytes(text)
        decoded = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise SaslError("not valid base64") from None
    if base64.b64encode(decoded) != encoded:
        raise SaslError("not valid base64")
    return decoded


def b64encode(data: bytes) -> bytes:
    return base64.b64encode(data)


def credential(data: bytes, what: str) -> str:
    """A user name or password from the wire: UTF-8, no NUL, CR or LF, at most
    MAX_CREDENTIAL bytes; raises SaslError."""
    if len(data) > MAX_CREDENTIAL:
        raise SaslError(f"{what} longer than {MAX_CREDENTIAL} bytes")
    if any(byte in data for byte in b"\0\r\n"):
        raise SaslError(f"{what} holds NUL, CR or LF")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError(f"{what} is not UTF-8") from None


def sasl_plain(response: bytes) -> Credentials:
    """Credentials from a decoded PLAIN response (RFC 4616): authzid NUL authcid NUL passwd.
    Raises SaslError."""
    parts = response.split(b"\0")
    if len(parts) != 3:
        raise SaslError("PLAIN response is not authzid NUL user NUL password")
    names = ("authzid", "user", "password")
    authzid, user, password = (credential(part, what) for part, what in zip(parts, names, strict=True))
    if not user or not password:
        raise SaslError("PLAIN response with an empty user or password")
    return Credentials(user, password, "PLAIN", authzid)


def sasl_plain_response(user: str, password: str, authzid: str = "") -> bytes:
    """The base64 PLAIN response for the client side."""
    return b64encode(b"\0".join(text.encode() for text in (authzid, user, password)))


#: The two challenges of SASL LOGIN (draft-murchison-sasl-login), base64 as they are sent.
LOGIN_USER_CHALLENGE = b64encode(b"Username:")
LOGIN_PASSWORD_CHALLENGE = b64encode(b"Password:")


@attrs.define
class SaslExchange:
    """The server side of one AUTH PLAIN or LOGIN exchange. `start` takes the initial response
    (None when the client sent none, `=` for an empty one), `respond` each later client line;
    both return the next challenge (base64, which the codec frames as `+ ` or `334 `) or the
    Credentials. Both raise SaslError, SaslCancelled when the client sent `*`."""

    mechanism: str = attrs.field(validator=attrs.validators.in_(SASL_MECHANISMS))
    _user: str | None = attrs.field(default=None, repr=False)

    def start(self, initial: bytes | None) -> bytes | Credentials:
        if initial is None:
            return b"" if self.mechanism == "PLAIN" else LOGIN_USER_CHALLENGE
        return self._answer(b"" if initial == b"=" else b64decode(initial))

    def respond(self, line: bytes) -> bytes | Credentials:
        if line == b"*":
            raise SaslCancelled("client cancelled the authentication")
        return self._answer(b64decode(line))

    def _answer(self, data: bytes) -> bytes | Credentials:
        if self.mechanism == "PLAIN":
            return sasl_plain(data)
        if self._user is None:
            self._user = _login_part(data, "user")
            return LOGIN_PASSWORD_CHALLENGE
        return Credentials(self._user, _login_part(data, "password"), "LOGIN")


def _login_part(data: bytes, what: str) -> str:
    text = credential(data, what)
    if not text:
        raise SaslError(f"LOGIN response with an empty {what}")
    return text


# --- the shape every pre-login codec shares -----------------------------------------------

#: Bad commands a server answers before it ends the session.
MAX_ERRORS = 10
#: Failed logins a server answers before it ends the session.
MAX_LOGIN_FAILURES = 3


@attrs.define(eq=False)
class LineCodec(abc.ABC):
    """The byte side of a codec: received bytes go to a LineReader, replies wait in an output
    buffer. A subclass names its reader's caps in _line_reader and the error a line past them
    raises in _too_long."""

    _reader: LineReader = attrs.field(init=False, repr=False)
    _out: bytearray = attrs.field(factory=bytearray, init=False, repr=False)
    _eof: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self._reader = self._line_reader()

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; b"" means the peer closed its side."""
        if data:
            self._reader.feed(data)
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        data, self._out = bytes(self._out), bytearray()
        return data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handled (at most the line cap + 1 while reading lines)."""
        return self._reader.pending

    @abc.abstractmethod
    def _line_reader(self) -> LineReader:
        """Each protocol's own."""

    @abc.abstractmethod
    def _too_long(self, exc: LineTooLong) -> ProtocolError:
        """Each protocol's own."""

    def _read(self, size: int | None = None) -> bytes | None:
        """The next line, or `size` raw bytes; None until they are complete."""
        try:
            return self._reader.next_line() if size is None else self._reader.take(size)
        except LineTooLong as exc:
            raise self._too_long(exc) from None

    def _rest(self) -> bytes:
        try:
            return self._reader.rest()
        except LineTooLong as exc:
            raise self._too_long(exc) from None


class Phase(enum.Enum):
    """Where a LoginServer is: reading (COMMANDS, LITERAL, SASL) or waiting for its driver."""

    COMMANDS = enum.auto()  # reading command lines
    LITERAL = enum.auto()  # reading a literal of a command (IMAP)
    SASL = enum.auto()  # inside an AUTH exchange, reading responses
    STARTTLS = enum.auto()  # StartTls handed out, waiting for tls_started()
    LOGIN = enum.auto()  # Credentials handed out, waiting for accept/reject/unavailable
    DONE = enum.auto()  # logged in: the rest is trailing data
    CLOSED = enum.auto()


_READING = frozenset({Phase.COMMANDS, Phase.LITERAL, Phase.SASL})


@attrs.define(eq=False)
class LoginServer(LineCodec):
    """The client side of a proxy before login: it owns the phases, the budgets of bad commands
    and failed logins, STARTTLS (refusing commands pipelined after it) and SASL PLAIN and LOGIN.
    A protocol adds its greeting, its commands (_command, one method per verb) and its replies:
    the class constants are its closing replies, the _sasl_* methods its SASL framing.

    `tls_available`: STARTTLS may be offered (the driver has a certificate). `tls_active`: the
    connection is TLS already. `require_tls`: no login before TLS is up.
    """

    #: Closing replies: a line past the cap, plaintext after STARTTLS, too many bad commands,
    #: and what follows the refusal of the last failed login.
    _LINE_TOO_LONG: ClassVar[bytes]
    _DATA_BEFORE_TLS: ClassVar[bytes]
    _TOO_MANY_ERRORS: ClassVar[bytes]
    _TOO_MANY_FAILURES: ClassVar[bytes]
    #: What precedes a SASL challenge (`+ `, `334 `).
    _CHALLENGE: ClassVar[bytes]

    hostname: str = "localhost"
    tls_available: bool = False
    tls_active: bool = False
    require_tls: bool = True
    max_errors: int = MAX_ERRORS
    max_login_failures: int = MAX_LOGIN_FAILURES
    _phase: Phase = attrs.field(default=Phase.COMMANDS, init=False)
    _sasl: SaslExchange | None = attrs.field(default=None, init=False)
    _errors: int = attrs.field(default=0, init=False)
    _failures: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.require_tls and not (self.tls_available or self.tls_active):
            raise ValueError("require_tls without TLS: no client could ever log in")

    @property
    def login_allowed(self) -> bool:
        return self.tls_active or not self.require_tls

    def next_event(self) -> Credentials | StartTls | Closed | None:
        """The next event, or None until more bytes arrive or the driver answers the last one.
        Raises ProtocolError (close=True, with the protocol's closing reply) on a line past the
        cap, too many bad commands, commands pipelined after STARTTLS, or plaintext received
        before TLS started."""
        while self._phase in _READING:
            data = self._next_input()
            if data is None:
                if not self._eof:
                    return None
                self._phase = Phase.CLOSED
            elif (event := self._input(data)) is not None:
                return event
        if self._phase is Phase.STARTTLS:
            self._no_plaintext()
        return Closed() if self._phase is Phase.CLOSED else None

    def tls_started(self) -> None:
        """The stream is now TLS: the client starts over, as the protocol says."""
        if self._phase is not Phase.STARTTLS:
            raise RuntimeError("tls_started without a StartTls event")
        self._no_plaintext()
        self.tls_active, self._phase = True, Phase.COMMANDS

    def trailing_data(self) -> bytes:
        """What the client sent after its login (pipelined commands), for the backend."""
        if self._phase is not Phase.DONE:
            raise RuntimeError("trailing_data before accept")
        return self._rest()

    # -- reading

    def _next_input(self) -> bytes | None:
        """The next line (or, in IMAP, literal), or None until it is complete."""
        return self._read()

    def _input(self, data: bytes) -> Credentials | StartTls | Closed | None:
        return self._sasl_step(self._sasl.respond, data) if self._sasl else self._command(data)

    @abc.abstractmethod
    def _command(self, line: bytes) -> Credentials | StartTls | Closed | None:
        """Each protocol's own."""

    def _too_long(self, exc: LineTooLong) -> ProtocolError:
        return self._fatal(str(exc), self._LINE_TOO_LONG)

    # -- answers

    def _fatal(self, why: str, reply: bytes) -> ProtocolError:
        """The error that ends the session with `reply`; `why` is for logs."""
        self._phase = Phase.CLOSED
        return ProtocolError(why, reply, close=True)

    def _refuse(self, refusal: bytes) -> None:
        """Sends the refusal of a bad command; past max_errors the session ends instead."""
        self._errors += 1
        if self._errors > self.max_errors:
            raise self._fatal("too many bad commands", self._TOO_MANY_ERRORS)
        self._out += refusal

    def _decided(self, reply: bytes, phase: Phase) -> None:
        """Sends the driver's answer to a login and moves on to `phase`."""
        if self._phase is not Phase.LOGIN:
            raise RuntimeError("no login is waiting for an answer")
        self._out += reply
        self._phase = phase

    def _login_failed(self, refusal: bytes) -> None:
        """Sends the refusal of a login; after max_login_failures the session ends."""
        self._failures += 1
        done = self._failures >= self.max_login_failures
        self._decided(refusal, Phase.CLOSED if done else Phase.COMMANDS)
        if done:
            self._out += self._TOO_MANY_FAILURES

    def _close(self, goodbye: bytes) -> Closed:
        """Answers QUIT or LOGOUT."""
        self._out += goodbye
        self._phase = Phase.CLOSED
        return Closed()

    # -- STARTTLS

    @property
    def _tls_offered(self) -> bool:
        return self.tls_available and not self.tls_active

    def _start_tls(self, verb: str, go_ahead: bytes, pipelined: bytes) -> StartTls:
        """Answers STARTTLS with `go_ahead`, or ends the session with `pipelined` when more
        input follows it: whatever follows it before the handshake would run as if sent over
        TLS (CVE-2011-0411 and its kin)."""
        if self._reader.pending:
            raise self._fatal(f"commands pipelined after {verb}", pipelined)
        self._out += go_ahead
        self._phase = Phase.STARTTLS
        return StartTls()

    def _no_plaintext(self) -> None:
        if self._reader.pending:
            raise self._fatal("plaintext received before TLS started", self._DATA_BEFORE_TLS)

    # -- SASL

    def _sasl_start(self, mechanism: str, initial: bytes | None) -> Credentials | None:
        """Starts an exchange of a mechanism in SASL_MECHANISMS with the initial response."""
        self._sasl = SaslExchange(mechanism)
        return self._sasl_step(self._sasl.start, initial)

    def _sasl_step(self, step: Callable[[bytes | None], bytes | Credentials], data: bytes | None) -> Credentials | None:
        try:
            answer = step(data)
        except SaslCancelled:
            self._sasl, self._phase = None, Phase.COMMANDS
            self._sasl_cancelled()
            return None
        except SaslError:
            self._sasl, self._phase = None, Phase.COMMANDS
            self._sasl_malformed()
            return None
        if isinstance(answer, Credentials):
            self._sasl, self._phase = None, Phase.LOGIN
            return answer
        self._out += self._CHALLENGE + answer + b"\r\n"
        self._phase = Phase.SASL
        return None

    @abc.abstractmethod
    def _sasl_cancelled(self) -> None:
        """Answers a client that cancelled its exchange."""

    @abc.abstractmethod
    def _sasl_malformed(self) -> None:
        """Refuses a response that cannot be used, as a bad command."""


@attrs.define(eq=False)
class LoginClient(LineCodec):
    """Logs in at a backend as `user`: it owns the end of stream, the STARTTLS wait and the end
    of the login (LoggedIn or LoginRefused, then trailing_data). A protocol reads each line in
    _input, resumes after TLS in _tls_resumed and says in _QUIT what a refusal sends."""

    #: What the codec calls STARTTLS, for errors.
    _STARTTLS: ClassVar[str] = "STARTTLS"
    #: What a credential must fit in, for errors.
    _CARRIER: ClassVar[str]
    #: Sent before a refusal ends the login.
    _QUIT: ClassVar[bytes] = b""

    user: str
    password: str = attrs.field(repr=False)
    _waiting: bool = attrs.field(default=False, init=False)  # StartTls handed out
    _done: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for value, what in ((self.user, "user"), (self.password, "password")):
            if not value or credential(value.encode(), what) != value:
                raise ValueError(f"{what} unfit for {self._CARRIER}")

    def next_event(self) -> StartTls | LoggedIn | LoginRefused | None:
        """The next event, or None until more bytes arrive. Raises ProtocolError (close=True)
        when the backend breaks the protocol or closes early."""
        while not (self._waiting or self._done):
            data = self._next_input()
            if data is None:
                if self._eof:
                    raise ProtocolError("backend closed the connection during login", close=True)
                return None
            if (event := self._input(data)) is not None:
                return event
        return None

    def tls_started(self) -> None:
        """The stream is now TLS: the login starts over on it."""
        if not self._waiting:
            raise RuntimeError("tls_started without a StartTls event")
        if self._reader.pending:
            raise ProtocolError(f"backend sent plaintext after {self._STARTTLS}", close=True)
        self.tls_active, self._waiting = True, False  # each protocol's field, after its own arguments
        self._tls_resumed()

    def trailing_data(self) -> bytes:
        """Bytes the backend sent after its login answer (none, from a well-behaved one)."""
        if not self._done:
            raise RuntimeError("trailing_data before the login ended")
        return self._rest()

    def _next_input(self) -> bytes | None:
        return self._read()

    @abc.abstractmethod
    def _input(self, data: bytes) -> StartTls | LoggedIn | LoginRefused | None:
        """Each protocol's own."""

    @abc.abstractmethod
    def _tls_resumed(self) -> None:
        """Each protocol's own."""

    def _too_long(self, exc: LineTooLong) -> ProtocolError:
        return ProtocolError(f"backend: {exc}", close=True)

    def _start_tls(self) -> StartTls:
        self._waiting = True
        return StartTls()

    def _logged_in(self) -> LoggedIn:
        self._done = True
        return LoggedIn()

    def _refused(self, reply: str, temporary: bool = True) -> LoginRefused:
        self._out += self._QUIT
        self._done = True
        return LoginRefused(reply, temporary)
