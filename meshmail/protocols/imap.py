"""IMAP4 up to the login, both sides: ImapServer answers a client until it offers credentials
(RFC 9051 and 3501; ID RFC 2971, LITERAL+ RFC 7888, SASL-IR RFC 4959, response codes RFC 5530);
ImapClient logs in at a backend with them, passing the client's address by ID. What follows the
login is spliced, not parsed here.

Driving either side: pass received bytes to receive_data (b"" at end of stream), take events
from next_event until it returns None (more bytes needed), and send data_to_send() after each.
A ProtocolError is fatal: send data_to_send(), then the error's reply, then close.
"""

from __future__ import annotations

import functools
import itertools
import re
import sys
from collections.abc import Callable, Iterable, Mapping

import attrs

from .common import (
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
#: Longest line either side reads, CRLF excluded.
MAX_LINE = 8192
#: Largest literal a command before login may carry; a larger one is refused when announced,
#: before the client sends it.
MAX_LITERAL = 8192
#: Literals one command may carry (LOGIN needs two).
MAX_LITERALS = 2
#: Bounds of an ID list (RFC 2971, section 3.3).
MAX_ID_PAIRS, MAX_ID_FIELD, MAX_ID_VALUE = 30, 30, 1024
#: Longest reply text a driver or a backend puts in a reply line.
MAX_TEXT = 400
#: Largest non-synchronizing literal a LITERAL- server takes (RFC 7888, section 4).
LITERAL_MINUS = 4096
#: Response codes of a NO that judged the credentials; any other refusal is temporary.
JUDGED = frozenset({"", "AUTHENTICATIONFAILED", "AUTHORIZATIONFAILED", "EXPIRED", "CONTACTADMIN"})

_CHARS = rb'\x00-\x20\x7f-\xff(){%*"\\'
#: A tag: ASTRING-CHARs except "+".
_TAG = re.compile(rb"[^" + _CHARS + rb"+]+")
#: A capability: ATOM-CHARs (no "]", which ends a [CAPABILITY ...] code).
_CAPABILITY = re.compile(rb"[^" + _CHARS + rb"\]]+")
_COMMAND = re.compile(rb"(?P<tag>" + _TAG.pattern + rb") (?P<name>[A-Za-z][A-Za-z0-9-]*)(?: (?P<args>.+))?\Z", re.S)
_TOKEN = re.compile(
    rb"(?P<atom>[^" + _CHARS + rb"]+)"  # ASTRING-CHARs: an atom, "]" allowed
    rb'|"(?P<quoted>(?:[^"\\\x00\r\n]|\\["\\])*)"'
    rb"|(?P<open>\()|(?P<close>\))"
    rb"|(?P<literal>\{(?P<size>[0-9]{1,10})(?P<plus>\+?)\})\Z"
)
_ESCAPED = re.compile(rb'\\(["\\])')
_NONSYNC_END = re.compile(rb"\{[0-9]+\+\}\Z")
_LITERAL_END = re.compile(rb"\{([0-9]{1,10})\}\Z")


class _Atom(bytes):
    """An atom as written; strings (quoted or literal) are plain bytes."""


#: Parentheses among the arguments (ID lists).
_OPEN, _CLOSE = object(), object()


def _scan(text: bytes, tokens: list[object]) -> tuple[int, bool] | None:
    """Appends the arguments on one line to `tokens`. Returns the size of a literal announced
    at the end of the line and whether it is synchronizing, or None. Raises ValueError for
    anything but atoms, quoted strings and parentheses separated by single spaces."""
    pos = 0
    while pos < len(text):
        if tokens and tokens[-1] is not _OPEN and text[pos] != ord(")"):
            if text[pos] != ord(" "):
                raise ValueError("arguments not separated by one space")
            pos += 1
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValueError("malformed argument")
        pos = match.end()
        if match["literal"]:
            return int(match["size"]), not match["plus"]
        if match["atom"]:
            tokens.append(_Atom(match["atom"]))
        elif match["quoted"] is not None:
            tokens.append(_ESCAPED.sub(rb"\1", match["quoted"]))
        else:
            tokens.append(_OPEN if match["open"] else _CLOSE)
    return None


def _is_nil(token: object) -> bool:
    return type(token) is _Atom and token.upper() == b"NIL"


def _printable(data: bytes) -> str:
    return "".join(c if c.isprintable() else "?" for c in data.decode("utf-8", "replace"))


@functools.lru_cache(maxsize=1024)  # the same few texts, session after session
def _text(text: str) -> bytes:
    """Reply text on one line: printable ASCII (anything else becomes ?), cut at MAX_TEXT."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:MAX_TEXT]).encode("ascii")


def _quoted(value: bytes) -> bytes | None:
    """A quoted string of printable ASCII, or None when `value` needs a literal."""
    if len(value) > MAX_TEXT or not all(0x20 <= byte < 0x7F for byte in value):
        return None
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


class _Bad(Exception):
    """Refuses the command being read: the reply's status and text."""

    def __init__(self, text: str, status: str = "BAD") -> None:
        super().__init__(text)
        self.text, self.status = text, status


def _no_arguments(args: list[object]) -> None:
    if args:
        raise _Bad("This command takes no arguments.")


def _id_fields(args: list[object]) -> dict[str, str | None]:
    """The client's ID list: NIL, or up to MAX_ID_PAIRS pairs of a field name (a string of at
    most MAX_ID_FIELD bytes) and NIL or a value (at most MAX_ID_VALUE bytes). Raises _Bad."""
    if len(args) == 1 and _is_nil(args[0]):
        return {}
    bad = _Bad("ID takes NIL or a list of up to 30 field and value pairs.")
    if len(args) < 2 or args[0] is not _OPEN or args[-1] is not _CLOSE:
        raise bad
    inner = args[1:-1]
    if len(inner) % 2 or len(inner) > 2 * MAX_ID_PAIRS:
        raise bad
    fields: dict[str, str | None] = {}
    for name, value in zip(inner[::2], inner[1::2], strict=True):
        if not isinstance(name, bytes) or _is_nil(name) or len(name) > MAX_ID_FIELD:
            raise bad
        if _is_nil(value):
            fields[_printable(name)] = None
        elif isinstance(value, bytes) and len(value) <= MAX_ID_VALUE:
            fields[_printable(name)] = _printable(value)
        else:
            raise bad
    return fields


# --- the client-facing side -------------------------------------------------------------------


@attrs.define(eq=False)
class _Command:
    """A command whose line ended in a literal: what has been read of it so far."""

    name: str
    args: list[object] = attrs.field(factory=list, repr=False)
    literal: int = 0  # size of the literal being read
    literals: int = 0


@attrs.define(eq=False)
class ImapServer(LoginServer):
    """The client side of an IMAP proxy before login. The greeting, with the capabilities,
    waits in data_to_send().

    `tls_available`: STARTTLS may be offered (the driver has a certificate). `tls_active`: the
    connection is TLS already (port 993). `require_tls`: LOGINDISABLED is listed and LOGIN and
    AUTHENTICATE are refused with `NO [PRIVACYREQUIRED]` until TLS is up. After STARTTLS the
    client asks for the capabilities again (there is no new greeting).

    Commands before login: CAPABILITY, NOOP, LOGOUT, ID, STARTTLS, LOGIN and AUTHENTICATE
    PLAIN or LOGIN (with or without an initial response); anything else is answered BAD.
    Arguments may be atoms, quoted strings or literals (`{n}` answered `+ OK`, or LITERAL+
    `{n+}`) of at most max_literal bytes: a larger literal is refused when announced, and the
    session ends when the refused command goes on in a non-synchronizing literal. The last
    BAD of max_errors ends the session.

    Events: Credentials (answer with accept, reject or unavailable; the codec keeps the tag),
    StartTls (wrap the stream, then call tls_started), Closed. The driver reads nothing from
    the client while a login waits for its answer.
    """

    _LINE_TOO_LONG = b"* BYE Line too long." + CRLF
    _DATA_BEFORE_TLS = b"* BYE Data received before TLS." + CRLF
    _TOO_MANY_FAILURES = b"* BYE Too many failed logins." + CRLF
    _CHALLENGE = b"+ "

    max_literal: int = MAX_LITERAL
    #: The client's ID fields (RFC 2971) once it sent them, for logs; never forwarded.
    client_id: dict[str, str | None] | None = attrs.field(default=None, init=False)
    _tag: bytes | None = attrs.field(default=None, init=False)
    _partial: _Command | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._out += b"* OK [CAPABILITY " + " ".join(self.capabilities).encode()
        self._out += b"] " + _text(f"{self.hostname} IMAP ready.") + CRLF

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handled (before login at most MAX_LINE + 1, or a part of
        a literal of at most max_literal)."""
        return self._reader.pending

    @property
    def capabilities(self) -> list[str]:
        """What this side offers before login (after it, the backend's capabilities)."""
        offered = ["IMAP4rev1", "SASL-IR", "LITERAL+", "ID"]
        if self._tls_offered:
            offered.append("STARTTLS")
        if self.login_allowed:
            return offered + [f"AUTH={mechanism}" for mechanism in SASL_MECHANISMS]
        return [*offered, "LOGINDISABLED"]

    def accept(self, capabilities: Iterable[str], text: str = "Logged in") -> None:
        """The backend took the credentials: `tag OK [CAPABILITY ...]` with the backend's
        capabilities (atoms, else ValueError), then the driver takes trailing_data()."""
        self._decided(self._tagged(_capability_code(tuple(capabilities)) + _text(text)), Phase.DONE)

    def reject(self, text: str = "[AUTHENTICATIONFAILED] Authentication failed.") -> None:
        """Wrong credentials: `tag NO` with `text` (the backend's, passed on; one without a
        response code gets [AUTHENTICATIONFAILED]). After max_login_failures the session ends."""
        if not text.startswith("["):
            text = "[AUTHENTICATIONFAILED] " + text
        self._login_failed(self._tagged(b"NO " + _text(text)))

    def unavailable(self, text: str = "Temporary server failure, try again later.") -> None:
        """The credentials could not be checked (no backend): `tag NO [UNAVAILABLE]` (RFC 5530)."""
        self._decided(self._tagged(b"NO [UNAVAILABLE] " + _text(text)), Phase.COMMANDS)

    # -- replies

    def _line_reader(self) -> LineReader:
        return LineReader(limit=MAX_LINE, literal=self.max_literal)

    def _tagged(self, line: bytes) -> bytes:
        return (self._tag or b"*") + b" " + line + CRLF

    def _ok(self, text: str) -> None:
        self._out += self._tagged(b"OK " + text.encode())

    def _bye(self, why: str, text: str, before: bytes) -> ProtocolError:
        return self._fatal(why, before + b"* BYE " + text.encode() + CRLF)

    def _error(self, bad: _Bad, *, unreadable: bool = False) -> None:
        """Answers a refused command; the session ends at max_errors (the last refusal goes out
        before the BYE), or when the refused command goes on in a literal the client sends
        unasked (`unreadable`)."""
        line = self._tagged(f"{bad.status} {bad.text}".encode())
        self._partial = self._sasl = self._tag = None
        self._phase = Phase.COMMANDS
        self._errors += 1
        if unreadable:
            raise self._bye("refused command with a non-synchronizing literal", "Literal refused.", line)
        if self._errors >= self.max_errors:
            raise self._bye("too many bad commands", "Too many invalid commands.", line)
        self._out += line

    def _sasl_cancelled(self) -> None:
        self._out += self._tagged(b"BAD Authentication cancelled.")

    def _sasl_malformed(self) -> None:
        self._error(_Bad("Invalid authentication response."))

    # -- commands

    def _next_input(self) -> bytes | None:
        if self._phase is Phase.LITERAL:
            assert self._partial is not None
            return self._read(self._partial.literal)
        return self._read()

    def _input(self, data: bytes) -> Credentials | StartTls | Closed | None:
        if self._phase is Phase.LITERAL:
            assert self._partial is not None
            self._partial.args.append(data)
            self._phase = Phase.COMMANDS
            return None
        return super()._input(data)

    def _command(self, line: bytes) -> Credentials | StartTls | Closed | None:
        try:
            return self._read_command(line)
        except _Bad as bad:
            self._error(bad, unreadable=_NONSYNC_END.search(line) is not None)
            return None

    def _read_command(self, line: bytes) -> Credentials | StartTls | Closed | None:
        """One line of a command: the first, or the rest after a literal. Raises _Bad."""
        if self._partial is None:
            self._partial, line = self._begin(line)
        command = self._partial
        try:
            literal = _scan(line, command.args)
        except ValueError:
            raise _Bad("Invalid arguments.") from None
        if literal is None:
            self._partial = None
            return _COMMANDS[command.name](self, command.args)
        size, synchronizing = literal
        if command.literals >= MAX_LITERALS:
            raise _Bad("Too many literals.")
        if size > self.max_literal:
            raise _Bad("[TOOBIG] Literal too big.")
        command.literal, command.literals = size, command.literals + 1
        self._phase = Phase.LITERAL
        if synchronizing:
            self._out += b"+ OK" + CRLF
        return None

    def _begin(self, line: bytes) -> tuple[_Command, bytes]:
        """The tag and name of a command line, and the rest of it. Raises _Bad."""
        match = _COMMAND.match(line)
        if match is None:
            tag = _TAG.match(line)
            valid = tag is not None and line[tag.end() : tag.end() + 1] in (b"", b" ")
            self._tag = tag[0] if valid and tag else None
            raise _Bad("Invalid command." if self._tag else "Invalid tag.")
        self._tag = match["tag"]
        name = match["name"].decode("ascii").upper()
        if name not in _COMMANDS:
            raise _Bad("Unknown command or not valid before login.")
        if name in ("LOGIN", "AUTHENTICATE") and not self.login_allowed:
            raise _Bad("[PRIVACYREQUIRED] Plaintext authentication disallowed, use STARTTLS first.", "NO")
        return _Command(name), match["args"] or b""

    def _capability(self, args: list[object]) -> None:
        _no_arguments(args)
        self._out += b"* CAPABILITY " + " ".join(self.capabilities).encode() + CRLF
        self._ok("Capability completed.")

    def _noop(self, args: list[object]) -> None:
        _no_arguments(args)
        self._ok("NOOP completed.")

    def _logout(self, args: list[object]) -> Closed:
        _no_arguments(args)
        return self._close(b"* BYE Logging out." + CRLF + self._tagged(b"OK Logout completed."))

    def _id(self, args: list[object]) -> None:
        self.client_id = _id_fields(args)
        self._out += b"* ID NIL" + CRLF
        self._ok("ID completed.")

    def _starttls(self, args: list[object]) -> StartTls:
        _no_arguments(args)
        if not self._tls_offered:
            raise _Bad("TLS is already active." if self.tls_active else "STARTTLS is not available.")
        refusal = self._tagged(b"BAD Commands pipelined after STARTTLS.") + b"* BYE Closing." + CRLF
        return self._start_tls("STARTTLS", self._tagged(b"OK Begin TLS negotiation now."), refusal)

    def _login(self, args: list[object]) -> Credentials:
        if len(args) != 2 or not all(isinstance(arg, bytes) for arg in args):
            raise _Bad("LOGIN takes a user name and a password.")
        try:
            user, password = credential(args[0], "user"), credential(args[1], "password")
        except SaslError:
            user = password = ""
        if not user or not password:
            raise _Bad("LOGIN needs a valid user name and password.")
        self._phase = Phase.LOGIN
        return Credentials(user, password, "LOGIN")

    def _authenticate(self, args: list[object]) -> Credentials | None:
        if not 1 <= len(args) <= 2 or not all(type(arg) is _Atom for arg in args):
            raise _Bad("AUTHENTICATE takes a mechanism and an optional initial response.")
        name = bytes(args[0]).decode("ascii").upper()
        if name not in SASL_MECHANISMS:
            raise _Bad("Unsupported authentication mechanism.", "NO")
        return self._sasl_start(name, bytes(args[1]) if len(args) == 2 else None)


_COMMANDS: dict[str, Callable[[ImapServer, list[object]], Credentials | StartTls | Closed | None]] = {
    "CAPABILITY": ImapServer._capability,
    "NOOP": ImapServer._noop,
    "LOGOUT": ImapServer._logout,
    "ID": ImapServer._id,
    "STARTTLS": ImapServer._starttls,
    "LOGIN": ImapServer._login,
    "AUTHENTICATE": ImapServer._authenticate,
}


# --- the backend side -------------------------------------------------------------------------


def forwarding_id(client: tuple[str, int], connected: tuple[str, int], session: str) -> dict[str, str]:
    """The ID fields that pass a client's address to a backend that trusts this host (Dovecot's
    login_trusted_networks): where the client came from, where it connected, and the session
    id both sides log."""
    return {
        "x-originating-ip": client[0],
        "x-originating-port": str(client[1]),
        "x-connected-ip": connected[0],
        "x-connected-port": str(connected[1]),
        "x-session-id": session,
    }


def _response_code(text: bytes) -> tuple[str, list[bytes]]:
    """The response code at the start of a resp-text and its arguments, or ("", [])."""
    if not text.startswith(b"[") or b"]" not in text:
        return "", []
    name, *args = text[1 : text.index(b"]")].split()
    return name.decode("ascii", "replace").upper(), args


def _capability_list(words: list[bytes]) -> tuple[str, ...]:
    """Capabilities from a backend; raises ProtocolError unless they are atoms."""
    try:
        return _atoms(tuple(words))
    except ValueError:
        raise ProtocolError("backend capabilities are not atoms", close=True) from None


@functools.lru_cache(maxsize=256)  # a backend says the same list at every login
def _atoms(words: tuple[bytes, ...]) -> tuple[str, ...]:
    if not words or not all(_CAPABILITY.fullmatch(word) for word in words):
        raise ValueError("not atoms")
    return tuple(word.decode("ascii") for word in words)


@functools.lru_cache(maxsize=256)
def _capability_code(capabilities: tuple[str, ...]) -> bytes:
    """`OK [CAPABILITY ...] ` for an accept; ValueError unless the capabilities are atoms."""
    atoms = [capability.encode() for capability in capabilities]
    if not atoms or not all(_CAPABILITY.fullmatch(atom) for atom in atoms):
        raise ValueError(f"capabilities must be atoms: {atoms!r}")
    return b"OK [CAPABILITY " + b" ".join(atoms) + b"] "


_Answer = Callable[["ImapClient", bytes, bytes], "StartTls | LoggedIn | LoginRefused | None"]


@attrs.define(eq=False)
class ImapClient(LoginClient):
    """Logs in at a backend IMAP server as `user`: greeting, CAPABILITY when the greeting lists
    none, STARTTLS when offered and `starttls` (then CAPABILITY again, RFC 9051 section 6.2.1),
    ID with the `forward` fields (see forwarding_id) when the backend lists ID, then
    AUTHENTICATE PLAIN (SASL-IR when listed) or else LOGIN with quoted strings or literals. ID
    goes in one packet with the login.

    `require_tls`: a backend without STARTTLS is refused (LoginRefused, temporary).
    Events: StartTls (wrap the stream, then call tls_started), LoggedIn (the backend's
    capabilities after login are in `capabilities`), LoginRefused (`reply` is the backend's
    resp-text, response code included, fit to pass on to the client).
    """

    _CARRIER = "an IMAP command"
    _QUIT = b""  # the driver just closes the connection

    authzid: str = ""
    starttls: bool = True
    require_tls: bool = False
    tls_active: bool = False
    forward: Mapping[str, str] = attrs.field(factory=dict)
    max_literal: int = MAX_LITERAL
    _greeted: bool = attrs.field(default=False, init=False)
    _capabilities: tuple[str, ...] | None = attrs.field(default=None, init=False)
    _tags: itertools.count = attrs.field(factory=lambda: itertools.count(1), init=False)
    _waiting_for: dict[bytes, _Answer] = attrs.field(factory=dict, init=False)
    _continuations: list[bytes] = attrs.field(factory=list, init=False, repr=False)
    _skip: int = attrs.field(default=0, init=False)  # literal bytes of an untagged response
    _continued: bool = attrs.field(default=False, init=False)  # the next line goes on with it

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.authzid and credential(self.authzid.encode(), "authzid") != self.authzid:
            raise ValueError("authzid unfit for an IMAP command")
        for name, value in self.forward.items():
            if _quoted(name.encode()) is None or _quoted(value.encode()) is None:
                raise ValueError(f"ID field unfit for a quoted string: {name!r}")

    @property
    def capabilities(self) -> tuple[str, ...]:
        """The backend's capabilities as last read: after LoggedIn, the post-login ones."""
        return self._capabilities or ()

    def _line_reader(self) -> LineReader:
        return LineReader(limit=MAX_LINE, literal=self.max_literal)

    def _next_input(self) -> bytes | None:
        return self._read(self._skip or None)

    def _input(self, data: bytes) -> StartTls | LoggedIn | LoginRefused | None:
        if self._skip:
            self._skip = 0
            return None
        return self._line(data)

    def _tls_resumed(self) -> None:
        self._capabilities = None
        self._proceed()

    # -- commands

    def _send(self, command: bytes, answer: _Answer) -> None:
        """Sends a command (CRLF included); `answer` takes its tagged status and text."""
        tag = b"M%d" % next(self._tags)
        self._waiting_for[tag] = answer
        self._out += tag + b" " + command

    def _proceed(self) -> StartTls | LoginRefused | None:
        """The next command once capabilities are known (after the greeting or STARTTLS)."""
        if self._capabilities is None:
            self._send(b"CAPABILITY" + CRLF, ImapClient._capability_answer)
            return None
        offered = {capability.upper() for capability in self._capabilities}
        if not self.tls_active and self.starttls and "STARTTLS" in offered:
            self._send(b"STARTTLS" + CRLF, ImapClient._starttls_answer)
            return None
        if self.require_tls and not self.tls_active:
            return self._refused("backend offers no STARTTLS")
        if self.forward and "ID" in offered:
            fields = (_quoted(text.encode()) or b"" for pair in self.forward.items() for text in pair)
            self._send(b"ID (" + b" ".join(fields) + b")" + CRLF, ImapClient._ignored)
        return self._login(offered)

    def _login(self, offered: set[str]) -> LoginRefused | None:
        self._capabilities = None  # the pre-login ones no longer hold
        if "AUTH=PLAIN" in offered:
            response = sasl_plain_response(self.user, self.password, self.authzid)
            if "SASL-IR" in offered:
                self._send(b"AUTHENTICATE PLAIN " + response + CRLF, ImapClient._login_answer)
            else:
                self._send(b"AUTHENTICATE PLAIN" + CRLF, ImapClient._login_answer)
                self._continuations.append(response + CRLF)
            return None
        if "LOGINDISABLED" in offered or self.authzid:
            return self._refused("backend offers neither AUTH=PLAIN nor LOGIN")
        nonsync = sys.maxsize if "LITERAL+" in offered else LITERAL_MINUS if "LITERAL-" in offered else -1
        segments, line = [], b"LOGIN"
        for value in (self.user.encode(), self.password.encode()):
            if (quoted := _quoted(value)) is not None:
                line += b" " + quoted
            elif len(value) <= nonsync:
                line += b" {%d+}" % len(value) + CRLF + value
            else:  # a synchronizing literal: the rest waits for the backend's "+"
                segments.append(line + b" {%d}" % len(value) + CRLF)
                line = value
        first, *self._continuations = [*segments, line + CRLF]
        self._send(first, ImapClient._login_answer)
        return None

    # -- responses

    def _line(self, line: bytes) -> StartTls | LoggedIn | LoginRefused | None:
        continued, self._continued = self._continued, False
        if continued:  # the rest of an untagged response after its literal
            return self._skip_literal(line)
        tag, _, rest = line.partition(b" ")
        if tag == b"+":
            if not self._greeted or not self._continuations:
                raise ProtocolError("backend sent an unexpected continuation", close=True)
            self._out += self._continuations.pop(0)
            return None
        if tag == b"*":
            return self._untagged(rest)
        answer = self._waiting_for.pop(tag, None)
        if answer is None:
            raise ProtocolError("backend answered a command never sent", close=True)
        status, _, text = rest.partition(b" ")
        return answer(self, status.upper(), text)

    def _untagged(self, rest: bytes) -> LoginRefused | StartTls | None:
        kind, _, text = rest.partition(b" ")
        kind = kind.upper()
        if kind == b"BYE":
            return self._refused(_printable(text))
        if not self._greeted:
            if kind != b"OK":
                raise ProtocolError("backend greeting is neither OK nor BYE", close=True)
            self._greeted = True
            self._read_code(text)
            return self._proceed()
        if kind == b"CAPABILITY":
            self._capabilities = _capability_list(text.split())
        elif kind in (b"OK", b"NO", b"BAD"):
            self._read_code(text)
        else:  # data such as ID may carry literals
            return self._skip_literal(text)
        return None

    def _skip_literal(self, line: bytes) -> None:
        if (literal := _LITERAL_END.search(line)) is not None:
            if int(literal[1]) > self.max_literal:
                raise ProtocolError("backend sent a literal past the cap before login", close=True)
            self._skip, self._continued = int(literal[1]), True

    def _read_code(self, text: bytes) -> None:
        code, args = _response_code(text)
        if code == "CAPABILITY":
            self._capabilities = _capability_list(args)

    def _capability_answer(self, status: bytes, text: bytes) -> StartTls | LoginRefused | None:
        if status != b"OK" or self._capabilities is None:
            return self._refused(f"CAPABILITY: {_printable(text)}")
        return self._proceed()

    def _starttls_answer(self, status: bytes, text: bytes) -> StartTls | LoginRefused:
        if status != b"OK":
            return self._refused(f"STARTTLS: {_printable(text)}")
        return self._start_tls()

    def _ignored(self, status: bytes, text: bytes) -> None:
        return None  # a backend that does not take the ID still serves the login

    def _login_answer(self, status: bytes, text: bytes) -> LoggedIn | LoginRefused | None:
        self._continuations.clear()
        if status != b"OK":
            code, _ = _response_code(text)
            return self._refused(_printable(text), status != b"NO" or code not in JUDGED)
        self._read_code(text)
        if self._capabilities is None:
            self._send(b"CAPABILITY" + CRLF, ImapClient._capabilities_after_login)
            return None
        return self._capabilities_after_login(b"OK", b"")

    def _capabilities_after_login(self, status: bytes, text: bytes) -> LoggedIn:
        if status != b"OK" or self._capabilities is None:
            raise ProtocolError("backend lists no capabilities after login", close=True)
        return self._logged_in()
