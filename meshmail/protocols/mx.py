"""The server side of inbound SMTP on port 25 (RFC 5321 with SIZE 1870, 8BITMIME 6152, PIPELINING
2920, ENHANCEDSTATUSCODES 2034, SMTPUTF8 6531, STARTTLS 3207): MxServer, its events, the envelope
path parser and the DATA reader that unstuffs the body and refuses SMTP smuggling. What becomes of
an envelope (routing, relaying, verification, queueing, the Received header) is the driver's.

Driving it: pass received bytes to receive_data (b"" at end of stream), take events from
next_event until it returns None, and send data_to_send() after each. A ProtocolError is fatal:
send data_to_send(), then the error's reply, then close.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable

import attrs

from .common import Closed, LineCodec, LineReader, LineTooLong, ProtocolError, StartTls
from .smtp import (
    BYE,
    DATA_BEFORE_TLS,
    EHLO_FIRST,
    HELP,
    LINE_TOO_LONG,
    LINE_TOO_LONG_CLOSING,
    OK,
    PIPELINED_AFTER_STARTTLS,
    READY_FOR_TLS,
    SYNTAX_ERROR,
    TLS_ACTIVE,
    TLS_UNAVAILABLE,
    TOO_MANY_ERRORS,
    UNKNOWN_COMMAND,
    BadCommand,
    Command,
    Reply,
    _is_domain,
    greeting,
)

#: Longest command line answered, CRLF excluded (RFC 5321's 1000-octet text line).
MAX_COMMAND_LINE = 998
#: Longest line read at all: a longer command than MAX_COMMAND_LINE is refused with 500 5.5.2,
#: one past this ends the session (the reader cannot find the next command in it).
MAX_LINE = 4096
#: Default message size limit, in bytes of the unstuffed body (what SIZE announces).
MAX_MESSAGE = 25 * 1024 * 1024
#: Longest body line accepted, CRLF excluded. RFC 5321 says 998, which real mail exceeds; past
#: this the message is refused (still read to its end).
MAX_BODY_LINE = 64 * 1024
#: Accepted recipients per message; RFC 5321 section 4.5.3.1.8 asks for at least 100.
MAX_RECIPIENTS = 100
#: Bad commands answered before the session ends (as aiosmtpd and Postfix's hard error limit).
MAX_ERRORS = 10

# --- named replies of the MX (the shared ones live in smtp.py) ---------------------------------

SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
MESSAGE_ACCEPTED = Reply(250, "2.0.0", "Message accepted")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
NESTED_MAIL = Reply(503, "5.5.1", "Nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
IN_TRANSACTION = Reply(503, "5.5.1", "Mail transaction in progress")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
UNSUPPORTED_PARAMETER = Reply(555, "5.5.4", "Unsupported parameter")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
BARE_LINE_END = Reply(554, "5.6.0", "Message refused: bare CR or LF (SMTP smuggling)")
BODY_LINE_TOO_LONG = Reply(554, "5.6.0", "Message refused: line too long")
VRFY_DISABLED = Reply(502, "5.5.1", "VRFY command is disabled")
EXPN_DISABLED = Reply(502, "5.5.1", "EXPN command is disabled")
AUTH_NOT_OFFERED = Reply(502, "5.5.1", "AUTH not available")
NO_TRANSACTION_COMMAND = Reply(502, "5.5.1", "Command not implemented")

# --- events --------------------------------------------------------------------------------------


@attrs.frozen
class Hello:
    """EHLO (`extended`) or HELO `name`, already answered; it ends any transaction."""

    name: str
    extended: bool


@attrs.frozen
class MailFrom:
    """MAIL FROM: answer with accept or refuse. `reverse_path` is "" for the null sender; `size`
    the SIZE the client announced (at most max_size), `body` "7BIT" or "8BITMIME" when given,
    `smtputf8` whether the transaction may carry UTF-8 addresses and headers."""

    reverse_path: str
    size: int | None = None
    body: str | None = None
    smtputf8: bool = False


@attrs.frozen
class RcptTo:
    """RCPT TO: answer with accept or refuse. `address` is the mailbox with any source route
    dropped (RFC 5321 section 4.1.1.3), or "postmaster"; `%` and `!` in it are not special.
    `postmaster`: it names this server's postmaster (see is_postmaster), whom the driver must
    take mail for (RFC 5321 section 4.5.1)."""

    address: str
    postmaster: bool = False


@attrs.frozen
class DataChunk:
    """Bytes of the message body, unstuffed, in order; the driver writes them where it keeps the
    message. None follow once the message is refused."""

    data: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")


@attrs.frozen
class DataEnd:
    """The body ended at <CRLF>.<CRLF>. With `refusal` None the driver answers with accept or
    refuse; otherwise the codec has sent `refusal` already (size, smuggling, line length) and
    the driver drops what it kept. Either way the transaction is over."""

    refusal: Reply | None = None


@attrs.frozen
class Reset:
    """RSET, already answered: the driver drops the transaction."""


Event = Hello | StartTls | MailFrom | RcptTo | DataChunk | DataEnd | Reset | Closed

# --- envelope paths ------------------------------------------------------------------------------

_UTF8 = "\u0080-\U0010ffff"
_ATEXT = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\-{_UTF8}]"
_LOCAL = rf'(?:{_ATEXT}+(?:\.{_ATEXT}+)*|"(?:[ !#-\[\]-~{_UTF8}]|\\[ -~])*")'
_LABEL = rf"[A-Za-z0-9{_UTF8}](?:[A-Za-z0-9\-{_UTF8}]*[A-Za-z0-9{_UTF8}])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_MAILBOX = rf"{_LOCAL}@(?:{_DOMAIN}|\[[!-Z^-~]+\])"
_PATH = re.compile(rf"<(?:@{_DOMAIN}(?:,@{_DOMAIN})*:)?({_MAILBOX})>")
_PARAMETER = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([!-<>-~]+))?")


class PathError(ValueError):
    """An envelope argument that cannot be used; `reply` says why."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


def parse_path(text: str, *, null: bool = False, postmaster: bool = False) -> str:
    """The mailbox of an RFC 5321 path `<[@route:]local@domain>`: the source route is dropped,
    `null` admits `<>` (as ""), `postmaster` admits `<postmaster>` (as "postmaster"). Raises
    ValueError."""
    if null and text == "<>":
        return ""
    if postmaster and text.lower() == "<postmaster>":
        return "postmaster"
    match = _PATH.fullmatch(text)
    if match is None:
        raise ValueError(f"not an SMTP path: {text!r}")
    return match[1]


def is_postmaster(address: str, hostname: str) -> bool:
    """Whether the RCPT mailbox `address` is the postmaster of the server called `hostname`:
    `postmaster` without a domain, or postmaster@`hostname`, in any case."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower() == "postmaster"
    return local.lower() == "postmaster" and domain.lower() == hostname.lower()


def _split_argument(argument: str, keyword: str, syntax: Reply) -> tuple[str, dict[str, str | None]]:
    """`FROM:<path> params` -> (path, {KEYWORD: value}); raises PathError."""
    if argument[: len(keyword)].upper() != keyword:
        raise PathError(syntax)
    rest = argument[len(keyword) :].lstrip(" ")  # "MAIL FROM: <a@b>" is common enough
    quoted = escaped = False
    for i, char in enumerate(rest):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            path, params = rest[: i + 1], rest[i + 1 :]
            break
    else:
        raise PathError(syntax)
    if params and not params.startswith(" "):
        raise PathError(syntax)
    found: dict[str, str | None] = {}
    for word in params.split():
        match = _PARAMETER.fullmatch(word)
        if match is None or match[1].upper() in found:
            raise PathError(SYNTAX_ERROR)
        found[match[1].upper()] = match[2]
    return path, found


def _mail_parameters(params: dict[str, str | None], max_size: int) -> tuple[int | None, str | None, bool]:
    """(size, body, smtputf8) from MAIL parameters; raises PathError."""
    size = body = None
    for name, value in params.items():
        if name == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                raise PathError(SYNTAX_ERROR)
            size = int(value)
            if size > max_size:
                raise PathError(TOO_BIG)
        elif name == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise PathError(UNSUPPORTED_PARAMETER)
            body = value.upper()
        elif name == "SMTPUTF8":
            if value is not None:
                raise PathError(SYNTAX_ERROR)
        else:
            raise PathError(UNSUPPORTED_PARAMETER)
    return size, body, "SMTPUTF8" in params


# --- the message body ----------------------------------------------------------------------------

_LINE_BREAK = re.compile(rb"[\r\n]")
_LF, _CR, _DOT = 0x0A, 0x0D, 0x2E


@attrs.define
class BodyReader:
    """Reads a DATA body up to <CRLF>.<CRLF>: it drops the dot of each stuffed line (RFC 5321
    section 4.5.2) and hands out the rest as it comes, keeping at most two bytes (a lone `.` or
    CR whose meaning depends on the next byte). Only CRLF ends a line: a bare LF or bare CR, and
    so every `<LF>.<LF>`-like terminator a lenient server might honour, refuses the message
    (SMTP smuggling, as Postfix's smtpd_forbid_bare_newline), and reading goes on to the real
    end, so nothing smuggled runs as a command. A body past `max_size` or with a line past
    `max_line` is refused too; nothing is handed out after a refusal."""

    max_size: int
    max_line: int = MAX_BODY_LINE
    size: int = attrs.field(default=0, init=False)
    refusal: Reply | None = attrs.field(default=None, init=False)
    done: bool = attrs.field(default=False, init=False)
    _buffer: bytearray = attrs.field(factory=bytearray, init=False, repr=False)
    _line_start: bool = attrs.field(default=True, init=False)
    _line: int = attrs.field(default=0, init=False)

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def read(self) -> bytes:
        """The body bytes found in what was fed since the last read (b"" when there are none, or
        the message is refused); `done` once the terminator was read."""
        buffer, out = self._buffer, bytearray()
        i = self._whole_lines(out) if not self.done else 0
        end = len(buffer)
        while i < end and not self.done:
            if self._line_start:
                self._line_start = False
                if buffer[i] == _DOT:
                    ahead = bytes(buffer[i : i + 3])
                    if ahead == b".\r\n":
                        self.done, i = True, i + 3
                        break
                    if ahead in (b".", b".\r"):  # the terminator may be on its way
                        self._line_start = True
                        break
                    i += 1  # a stuffed dot
                continue
            match = _LINE_BREAK.search(buffer, i)
            stop = end if match is None else match.start()
            self._keep(out, buffer[i:stop], stop - i)
            i = stop
            if match is None:
                break
            if buffer[stop] == _LF:
                self._refuse(BARE_LINE_END)
                i += 1
            elif stop + 1 == end:
                break  # a CR whose LF may be on its way
            elif buffer[stop + 1] == _LF:
                self._keep(out, b"\r\n", 0)
                self._line_start, self._line, i = True, 0, stop + 2
            else:
                self._refuse(BARE_LINE_END)
                i += 1
        del buffer[:i]
        return bytes(out)

    def _whole_lines(self, out: bytearray) -> int:
        """The common case at C speed: the complete lines at the buffer's start up to the first
        that starts with a dot, when none of them needs a second look (no bare CR or LF, none
        too long, within the size), go to `out` at once; returns how many bytes were taken
        (0: none, the byte-by-byte reading in read() decides)."""
        buffer = self._buffer
        last = buffer.rfind(b"\r\n")
        if last < 0 or self.refusal is not None or (self._line_start and buffer[0] == _DOT):
            return 0
        dot = buffer.find(b"\r\n.", 0, last + 2)
        if dot >= 0:
            last = dot
        end = last + 2
        crlf = buffer.count(b"\r\n", 0, end)
        if (
            self.size + end > self.max_size
            or buffer.count(b"\r", 0, end) != crlf
            or buffer.count(b"\n", 0, end) != crlf
        ):
            return 0
        lengths = [len(line) for line in buffer[:last].split(b"\r\n")]
        if self._line + lengths[0] > self.max_line or max(lengths) > self.max_line:
            return 0
        out += buffer[:end]
        self.size += end
        self._line, self._line_start = 0, True
        return end

    def rest(self) -> bytes:
        """What followed the terminator (pipelined commands)."""
        data, self._buffer = bytes(self._buffer), bytearray()
        return data

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def _keep(self, out: bytearray, data: bytes | bytearray, text: int) -> None:
        self._line += text
        if self._line > self.max_line:
            self._refuse(BODY_LINE_TOO_LONG)
        if self.size + len(data) > self.max_size:
            self._refuse(TOO_BIG)
        if self.refusal is None:
            out += data
            self.size += len(data)

    def _refuse(self, reply: Reply) -> None:
        if self.refusal is None:
            self.refusal = reply


# --- the server ----------------------------------------------------------------------------------


class _Phase(enum.Enum):
    COMMANDS = enum.auto()  # reading command lines
    STARTTLS = enum.auto()  # StartTls handed out, waiting for tls_started()
    MAIL = enum.auto()  # MailFrom handed out, waiting for accept or refuse
    RCPT = enum.auto()  # RcptTo handed out, waiting for accept or refuse
    DATA = enum.auto()  # reading the body
    MESSAGE = enum.auto()  # DataEnd handed out, waiting for accept or refuse
    CLOSED = enum.auto()


#: What accept() sends by default, and what refuse() may answer, per waiting phase.
_DEFAULT_ACCEPT = {_Phase.MAIL: SENDER_OK, _Phase.RCPT: RECIPIENT_OK, _Phase.MESSAGE: MESSAGE_ACCEPTED}


@attrs.define(eq=False)
class MxServer(LineCodec):
    """The server side of one inbound SMTP session. The greeting waits in data_to_send().

    `tls_available`: STARTTLS may be offered (the driver has a certificate); `tls_active`: the
    connection is TLS already. `max_size` is announced by SIZE and enforced on the body;
    `max_recipients` caps accepted recipients per message (452 4.5.3 past it); `max_errors`
    bad commands are answered, the next ends the session with 421. AUTH is never offered;
    VRFY, EXPN and AUTH are refused with 502.

    Events, handled in order (pipelined commands wait while the driver decides): Hello, Reset
    (answered already); MailFrom, RcptTo (answer each with accept or refuse); DataChunk then
    DataEnd (answer DataEnd with accept or refuse when its refusal is None); StartTls (wrap the
    stream, then call tls_started); Closed. `helo` is the client's last EHLO/HELO name.
    Fatal errors carry a 421: a line past MAX_LINE, bad commands past max_errors, commands
    pipelined after STARTTLS or plaintext before TLS.
    """

    hostname: str = "localhost"
    tls_available: bool = False
    tls_active: bool = False
    max_size: int = MAX_MESSAGE
    max_recipients: int = MAX_RECIPIENTS
    max_errors: int = MAX_ERRORS
    helo: str | None = attrs.field(default=None, init=False)
    _extended: bool = attrs.field(default=False, init=False)
    _phase: _Phase = attrs.field(default=_Phase.COMMANDS, init=False)
    _errors: int = attrs.field(default=0, init=False)
    _sender: MailFrom | None = attrs.field(default=None, init=False)  # the open transaction
    _pending_sender: MailFrom | None = attrs.field(default=None, init=False)  # waiting for the driver
    _recipients: int = attrs.field(default=0, init=False)  # accepted in it
    _asked: int = attrs.field(default=0, init=False)  # RCPTs handed to the driver in it
    _body: BodyReader | None = attrs.field(default=None, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._reply(greeting(self.hostname))

    # -- the driver's side

    def receive_data(self, data: bytes) -> None:
        if data and self._body is not None:
            self._body.feed(data)  # until DataEnd, which hands what follows the body back
        else:
            super().receive_data(data)

    @property
    def buffered(self) -> int:
        return super().buffered + (self._body.pending if self._body else 0)

    def next_event(self) -> Event | None:
        """The next event, or None until more bytes arrive or the driver answers the last one.
        Raises ProtocolError (close=True, with a 421) as the class says."""
        while True:
            if self._phase is _Phase.COMMANDS:
                line = self._read()
                if line is None:
                    if not self._eof:
                        return None
                    self._phase = _Phase.CLOSED
                elif (event := self._command(line)) is not None:
                    return event
            elif self._phase is _Phase.DATA:
                return self._data()
            elif self._phase is _Phase.STARTTLS:
                self._no_plaintext()
                return None
            elif self._phase is _Phase.CLOSED:
                return Closed()
            else:
                return None  # the driver decides

    def accept(self, reply: Reply | None = None) -> None:
        """Takes the waiting MailFrom, RcptTo or DataEnd, answering `reply` (2xx; by default
        250 2.1.0, 250 2.1.5 or 250 2.0.0)."""
        phase = self._waiting()
        reply = reply or _DEFAULT_ACCEPT[phase]
        if reply.code // 100 != 2:
            raise ValueError(f"accept with a reply that is no success: {reply}")
        if phase is _Phase.MAIL:
            self._sender = self._pending_sender
        elif phase is _Phase.RCPT:
            self._recipients += 1
        else:
            self._end_transaction()
        self._answered(reply)

    def refuse(self, reply: Reply) -> None:
        """Refuses the waiting MailFrom, RcptTo or DataEnd with `reply` (4xx or 5xx, e.g. a
        slave's own reply). A refused message ends the transaction; a refused recipient does not."""
        phase = self._waiting()
        if reply.positive:
            raise ValueError(f"refuse with a positive reply: {reply}")
        if phase is _Phase.MESSAGE:
            self._end_transaction()
        self._answered(reply)

    def tls_started(self) -> None:
        """The stream is now TLS: the client starts over with EHLO (RFC 3207, section 4.2)."""
        if self._phase is not _Phase.STARTTLS:
            raise RuntimeError("tls_started without a StartTls event")
        self._no_plaintext()
        self.tls_active, self._phase, self.helo = True, _Phase.COMMANDS, None

    # -- reading

    def _line_reader(self) -> LineReader:
        return LineReader(limit=MAX_LINE)

    def _too_long(self, exc: LineTooLong) -> ProtocolError:
        return self._fatal(str(exc), LINE_TOO_LONG_CLOSING)

    def _data(self) -> DataChunk | DataEnd | Closed | None:
        assert self._body is not None
        if chunk := self._body.read():
            return DataChunk(chunk)
        if self._body.done:
            body, self._body = self._body, None
            self._reader.feed(body.rest())  # the reader is empty: its input went to the body since DATA
            if body.refusal is None:
                self._phase = _Phase.MESSAGE
                return DataEnd()
            self._end_transaction()
            self._reply(body.refusal)
            self._phase = _Phase.COMMANDS
            return DataEnd(body.refusal)
        if self._eof:
            self._phase = _Phase.CLOSED
            return Closed()
        return None

    # -- answers

    def _reply(self, reply: Reply) -> None:
        self._out += bytes(reply)

    def _error(self, reply: Reply) -> None:
        """Sends the refusal of a bad command; past max_errors the session ends instead."""
        self._errors += 1
        if self._errors > self.max_errors:
            raise self._fatal("too many bad commands", TOO_MANY_ERRORS)
        self._reply(reply)

    def _fatal(self, why: str, reply: Reply) -> ProtocolError:
        self._phase = _Phase.CLOSED
        return ProtocolError(why, bytes(reply), close=True)

    def _no_plaintext(self) -> None:
        if self._reader.pending:
            raise self._fatal("plaintext received before TLS started", DATA_BEFORE_TLS)

    def _waiting(self) -> _Phase:
        if self._phase not in _DEFAULT_ACCEPT:
            raise RuntimeError("nothing is waiting for an answer")
        return self._phase

    def _answered(self, reply: Reply) -> None:
        self._reply(reply)
        self._phase = _Phase.COMMANDS

    def _end_transaction(self) -> None:
        self._sender, self._recipients, self._asked = None, 0, 0

    # -- commands

    def _command(self, line: bytes) -> Event | None:
        try:
            command = Command.parse(line)
        except BadCommand as exc:
            return self._error(exc.reply)
        if len(line) > MAX_COMMAND_LINE:
            return self._error(LINE_TOO_LONG)
        handler = _COMMANDS.get(command.verb)
        if handler is None:
            return self._error(UNKNOWN_COMMAND)
        return handler(self, command.argument)

    def _hello(self, argument: str, extended: bool) -> Hello | None:
        if not _is_domain(argument):
            verb = "EHLO" if extended else "HELO"
            return self._error(SYNTAX_ERROR.with_text(f"Syntax: {verb} hostname"))
        self.helo, self._extended = argument, extended
        self._end_transaction()
        if not extended:
            self._reply(Reply(250, "", self.hostname))
            return Hello(argument, extended)
        extensions = [f"SIZE {self.max_size}", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "SMTPUTF8"]
        if self.tls_available and not self.tls_active:
            extensions.append("STARTTLS")
        self._reply(Reply(250, "", (self.hostname, *extensions)))
        return Hello(argument, extended)

    def _ehlo(self, argument: str) -> Hello | None:
        return self._hello(argument, True)

    def _helo(self, argument: str) -> Hello | None:
        return self._hello(argument, False)

    def _starttls(self, argument: str) -> StartTls | None:
        if argument:
            return self._error(SYNTAX_ERROR)
        if self.tls_active or not self.tls_available:
            return self._error(TLS_ACTIVE if self.tls_active else TLS_UNAVAILABLE)
        if self.helo is None:
            return self._error(EHLO_FIRST)
        if self._sender is not None:
            return self._error(IN_TRANSACTION)
        if self._reader.pending:
            # Whatever follows before the handshake would run as if sent over TLS (CVE-2011-0411).
            raise self._fatal("commands pipelined after STARTTLS", PIPELINED_AFTER_STARTTLS)
        self._reply(READY_FOR_TLS)
        self._phase = _Phase.STARTTLS
        return StartTls()

    def _mail(self, argument: str) -> MailFrom | None:
        if self.helo is None:
            return self._error(EHLO_FIRST)
        if self._sender is not None:
            return self._error(NESTED_MAIL)
        try:
            path, params = _split_argument(argument, "FROM:", MAIL_SYNTAX)
            if params and not self._extended:
                raise PathError(UNSUPPORTED_PARAMETER)
            size, body, smtputf8 = _mail_parameters(params, self.max_size)
            if not (smtputf8 or path.isascii()):
                raise PathError(NEEDS_SMTPUTF8)
            reverse_path = _path(path, BAD_SENDER, null=True)
        except PathError as exc:
            return self._error(exc.reply)
        self._pending_sender = sender = MailFrom(reverse_path, size, body, smtputf8)
        self._phase = _Phase.MAIL
        return sender

    def _rcpt(self, argument: str) -> RcptTo | None:
        if self._sender is None:
            return self._error(NEED_MAIL)
        try:
            path, params = _split_argument(argument, "TO:", RCPT_SYNTAX)
            if params:
                raise PathError(UNSUPPORTED_PARAMETER)
            if not (self._sender.smtputf8 or path.isascii()):
                raise PathError(NEEDS_SMTPUTF8)
            address = _path(path, BAD_RECIPIENT, postmaster=True)
        except PathError as exc:
            return self._error(exc.reply)
        if self._recipients >= self.max_recipients:
            self._reply(TOO_MANY_RECIPIENTS)
            return None
        self._phase, self._asked = _Phase.RCPT, self._asked + 1
        return RcptTo(address, is_postmaster(address, self.hostname))

    def _data_command(self, argument: str) -> None:
        if argument:
            return self._error(SYNTAX_ERROR)
        if self._sender is None:
            return self._error(NEED_MAIL)
        if not self._recipients:
            # Every RCPT was refused (or none sent): with PIPELINING, DATA comes regardless.
            return self._error(NO_VALID_RECIPIENTS if self._asked else NEED_RCPT)
        self._reply(START_DATA)
        self._body = BodyReader(self.max_size)
        self._body.feed(self._rest())  # a body sent ahead of the 354
        self._phase = _Phase.DATA
        return None

    def _rset(self, argument: str) -> Reset | None:
        if argument:
            return self._error(SYNTAX_ERROR)
        self._end_transaction()
        self._reply(OK)
        return Reset()

    def _noop(self, argument: str) -> None:
        self._reply(OK)

    def _help(self, argument: str) -> None:
        self._reply(HELP)

    def _quit(self, argument: str) -> Closed:
        self._reply(BYE)
        self._phase = _Phase.CLOSED
        return Closed()


def _refused(reply: Reply) -> Callable[[MxServer, str], None]:
    """A handler that refuses its command with `reply`."""
    return lambda server, _argument: server._error(reply)


def _path(text: str, refusal: Reply, **options: bool) -> str:
    try:
        return parse_path(text, **options)
    except ValueError:
        raise PathError(refusal) from None


_COMMANDS: dict[str, Callable[[MxServer, str], Event | None]] = {
    "EHLO": MxServer._ehlo,
    "HELO": MxServer._helo,
    "STARTTLS": MxServer._starttls,
    "MAIL": MxServer._mail,
    "RCPT": MxServer._rcpt,
    "DATA": MxServer._data_command,
    "RSET": MxServer._rset,
    "NOOP": MxServer._noop,
    "HELP": MxServer._help,
    "QUIT": MxServer._quit,
    "VRFY": _refused(VRFY_DISABLED),
    "EXPN": _refused(EXPN_DISABLED),
    "AUTH": _refused(AUTH_NOT_OFFERED),
}
