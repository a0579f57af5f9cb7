"""What the mail protocol codecs share: a bounded line reader, the protocol error that carries
its reply, the pre-login and backend login events, and the server side of SASL PLAIN and LOGIN.

No sockets and no trio here: bytes in, events and reply bytes out (see imap.py, pop3.py,
smtp.py). Every buffer has a cap; input past a cap is a ProtocolError, never a bigger buffer.
"""

from __future__ import annotations

import base64
import binascii

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
    """Strict base64 (RFC 4648, padding required); raises SaslError."""
    if len(text) > MAX_SASL:
        raise SaslError(f"base64 response longer than {MAX_SASL} characters")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SaslError("not valid base64") from None


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
