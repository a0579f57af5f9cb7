"""The client side of delivery to a slave: DeliveryClient speaks LMTP (RFC 2033: LHLO, a reply per
recipient after the body) or SMTP (RFC 5321: EHLO, one reply after the body), with STARTTLS,
PIPELINING (RFC 2920: MAIL, the RCPTs and DATA in one write), Postfix's XCLIENT or XFORWARD to
pass the original client on, and recipient verification (RCPT, then RSET). Sans-IO: the driver
connects, reads the body from where it keeps it and decides what each recipient's reply means
(delivered, retry, bounce).

Driving it: pass received bytes to receive_data (b"" at end of stream), take events from
next_event until it returns None, and send data_to_send() after each. A ProtocolError is fatal
(close); `results` then says which recipients had their final answer.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import deque
from collections.abc import Callable

import attrs

from .common import Closed, LineCodec, LineReader, LineTooLong, ProtocolError, StartTls
from .mx import parse_path
from .smtp import CRLF, MAX_REPLY_LINE, Reply, ReplyReader, Xclient, _is_domain, xtext

#: What a transaction needing SMTPUTF8 gets from a server that does not offer it (RFC 6531).
NO_SMTPUTF8 = Reply(553, "5.6.7", "Server does not offer SMTPUTF8")


@attrs.frozen
class Xforward:
    """What Postfix's XFORWARD tells a later hop about the original client (XFORWARD_README):
    its address and port, reverse name, HELO name and protocol (SMTP or ESMTP). Sent with the
    attributes the server offers."""

    addr: str = attrs.field(converter=lambda value: str(ipaddress.ip_address(value)))
    port: int | None = None
    name: str | None = None
    helo: str | None = None
    proto: str | None = None

    def command(self, offered: list[str]) -> bytes:
        address = ipaddress.ip_address(self.addr)
        values = {
            "NAME": self.name,
            "ADDR": f"IPV6:{address}" if address.version == 6 else str(address),
            "PORT": None if self.port is None else str(self.port),
            "PROTO": self.proto,
            "HELO": self.helo,
        }
        words = [f"{name}={xtext(value)}" for name, value in values.items() if value is not None and name in offered]
        return " ".join(["XFORWARD", *words]).encode()


def _address(value: str) -> str:
    """An envelope address as MxServer hands it out (no CR, LF or `>` can slip into a command)."""
    if parse_path(f"<{value}>", null=True, postmaster=True) != value:
        raise ValueError(f"not an envelope address: {value!r}")
    return value


def _recipients(values: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    recipients = tuple(values)
    if not recipients or "" in recipients:
        raise ValueError("a transaction has at least one recipient, none of them empty")
    return tuple(_address(value) for value in recipients)


@attrs.frozen
class Transaction:
    """One message (or, with `verify`, one recipient check: RCPT, then RSET) for the slave.
    `sender` is "" for the null sender; `size`, `body` ("8BITMIME") and `smtputf8` are passed as
    MAIL parameters where the server offers them (SMTPUTF8 not offered refuses the transaction)."""

    sender: str = attrs.field(converter=_address)
    recipients: tuple[str, ...] = attrs.field(converter=_recipients)
    size: int | None = None
    body: str | None = attrs.field(default=None, validator=attrs.validators.in_([None, "7BIT", "8BITMIME"]))
    smtputf8: bool = False
    verify: bool = False


# --- events ------------------------------------------------------------------------------------


@attrs.frozen
class Ready:
    """The session is up (greeting, LHLO/EHLO, STARTTLS, XCLIENT/XFORWARD done): call send()."""


@attrs.frozen
class SendBody:
    """The server waits for the message: call body() with each chunk, then end_body()."""


@attrs.frozen
class Done:
    """The transaction is over: one reply per recipient, in the order given (the RCPT refusal,
    or the reply after the body: LMTP's own for each recipient, SMTP's one for all). The session
    takes the next send() or quit()."""

    results: tuple[Reply, ...]


@attrs.frozen
class Failed:
    """The session cannot be used (`why`, with the server's reply when there is one); QUIT is
    queued: send it and close."""

    why: str
    reply: Reply | None = None


Event = StartTls | Ready | SendBody | Done | Failed | Closed


class _Step(enum.Enum):
    GREETING = enum.auto()
    HELLO = enum.auto()
    STARTTLS = enum.auto()
    TLS = enum.auto()  # StartTls handed out, waiting for tls_started()
    XCLIENT = enum.auto()
    XFORWARD = enum.auto()
    READY = enum.auto()  # idle: the driver sends a transaction or quits
    MAIL = enum.auto()
    RCPT = enum.auto()
    DATA = enum.auto()
    BODY = enum.auto()  # the driver streams the body
    FINAL = enum.auto()  # replies after the body
    RSET = enum.auto()
    QUIT = enum.auto()
    OVER = enum.auto()  # failed or closed: nothing more is read


@attrs.define(eq=False)
class DeliveryClient(LineCodec):
    """Delivers to a slave over LMTP (`lmtp`) or SMTP, saying `ehlo_name` in LHLO/EHLO.

    `starttls`: use STARTTLS when offered; `require_tls`: a server without it fails the session.
    `xclient` / `xforward`: sent when the server offers the command (refused: the session fails).
    Events: StartTls (wrap the stream, then call tls_started), Ready, SendBody, Done, Failed,
    Closed (after quit(), or when the server ends the session with 421 or closes while idle).
    `results` holds the replies of the transaction so far (None: not known yet).
    """

    lmtp: bool = True
    ehlo_name: str = "localhost"
    starttls: bool = True
    require_tls: bool = False
    tls_active: bool = False
    xclient: Xclient | None = None
    xforward: Xforward | None = None
    extensions: dict[str, list[str]] = attrs.field(factory=dict, init=False)
    results: list[Reply | None] = attrs.field(factory=list, init=False)
    _replies: ReplyReader = attrs.field(factory=ReplyReader, init=False)
    _step: _Step = attrs.field(default=_Step.GREETING, init=False)
    _events: deque[Event] = attrs.field(factory=deque, init=False)
    _sent: set[str] = attrs.field(factory=set, init=False)  # XCLIENT, XFORWARD
    _transaction: Transaction | None = attrs.field(default=None, init=False)
    _next: int = attrs.field(default=0, init=False)  # the recipient whose RCPT reply comes next
    _accepted: dict[int, Reply] = attrs.field(factory=dict, init=False)  # recipient -> its RCPT reply
    #: MAIL, the RCPTs and DATA went out at once (PIPELINING); their replies come in order.
    _pipelined: bool = attrs.field(default=False, init=False)
    _refused: Reply | None = attrs.field(default=None, init=False)  # MAIL's refusal, when pipelined
    _final: int = attrs.field(default=0, init=False)  # replies after the body so far
    _line_start: bool = attrs.field(default=True, init=False)  # of the body, for dot-stuffing
    _tail: bytes = attrs.field(default=b"", init=False)  # the body's last two bytes

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if not _is_domain(self.ehlo_name):
            raise ValueError(f"LHLO/EHLO name must be one word of visible ASCII: {self.ehlo_name!r}")

    # -- the driver's side

    def next_event(self) -> Event | None:
        """The next event, or None until more bytes arrive or the driver acts. Raises
        ProtocolError (close=True) when the server breaks the protocol or closes mid-transaction."""
        while not self._events:
            if self._step in (_Step.TLS, _Step.BODY, _Step.OVER):
                return None
            line = self._read()
            if line is None:
                if not self._eof:
                    return None
                if self._step not in (_Step.READY, _Step.QUIT):
                    raise ProtocolError(f"server closed the connection ({self._step.name.lower()})", close=True)
                self._over(Closed())
            elif (reply := self._replies.line(line)) is not None:
                self._answer(reply)
        return self._events.popleft()

    @property
    def ready(self) -> bool:
        """Whether the session takes a transaction now (idle, nothing left to read out)."""
        return self._step is _Step.READY and not self._events

    def tls_started(self) -> None:
        """The stream is now TLS: LHLO/EHLO again on it."""
        if self._step is not _Step.TLS:
            raise RuntimeError("tls_started without a StartTls event")
        if self._reader.pending:
            raise ProtocolError("server sent plaintext after STARTTLS", close=True)
        self.tls_active = True
        self._hello()

    def send(self, transaction: Transaction) -> None:
        """Starts `transaction` (after Ready or Done)."""
        if self._step is not _Step.READY or self._events:
            raise RuntimeError("send while the session is not ready")
        self._transaction, self.results = transaction, [None] * len(transaction.recipients)
        self._next, self._accepted, self._final, self._refused = 0, {}, 0, None
        if transaction.smtputf8 and "SMTPUTF8" not in self.extensions:
            self._done([NO_SMTPUTF8] * len(transaction.recipients))
            return
        params = []
        if transaction.size is not None and "SIZE" in self.extensions:
            params.append(f"SIZE={transaction.size}")
        if transaction.body == "8BITMIME" and "8BITMIME" in self.extensions:
            params.append("BODY=8BITMIME")
        if transaction.smtputf8:
            params.append("SMTPUTF8")
        self._send(" ".join([f"MAIL FROM:<{transaction.sender}>", *params]), _Step.MAIL)
        # RFC 2920: with PIPELINING the RCPTs and DATA follow at once, one round trip instead
        # of one per command; a recipient check still waits for its RCPT's reply alone.
        self._pipelined = "PIPELINING" in self.extensions and not transaction.verify
        if self._pipelined:
            for address in transaction.recipients:
                self._out += f"RCPT TO:<{address}>".encode() + CRLF
            self._out += b"DATA" + CRLF

    def body(self, chunk: bytes) -> None:
        """A piece of the message (CRLF line ends), dot-stuffed on the way out."""
        if self._step is not _Step.BODY:
            raise RuntimeError("body without a SendBody event")
        if not chunk:
            return
        stuffed = chunk.replace(b"\n.", b"\n..")
        if self._line_start and chunk.startswith(b"."):
            stuffed = b"." + stuffed
        self._out += stuffed
        self._line_start = chunk.endswith(b"\n")
        self._tail = (self._tail + chunk)[-2:]

    def end_body(self) -> None:
        """The message is complete: <CRLF>.<CRLF> (a CRLF added if the body lacks its last)."""
        if self._step is not _Step.BODY:
            raise RuntimeError("end_body without a SendBody event")
        if self._tail and self._tail != CRLF:
            self._out += CRLF
        self._out += b"." + CRLF
        self._step = _Step.FINAL

    def quit(self) -> None:
        """Ends the session politely (when ready); Closed follows the server's answer."""
        if self._step is not _Step.READY or self._events:
            raise RuntimeError("quit while a transaction is open")
        self._send("QUIT", _Step.QUIT)

    # -- reading

    def _line_reader(self) -> LineReader:
        return LineReader(limit=MAX_REPLY_LINE)

    def _too_long(self, exc: LineTooLong) -> ProtocolError:
        return ProtocolError(f"server: {exc}", close=True)

    def _answer(self, reply: Reply) -> None:
        if reply.code == 421 and self._step not in (_Step.GREETING, _Step.QUIT):
            # The server is going away: what is not known yet gets its 421.
            if self._transaction is not None:
                self._done([result or reply for result in self.results], usable=False)
            self._over(Failed("server closing", reply) if self._step is not _Step.READY else Closed())
            return
        _HANDLERS[self._step](self, reply)

    # -- writing and ending

    def _send(self, command: str, step: _Step) -> None:
        self._out += command.encode() + CRLF
        self._step = step

    def _fail(self, why: str, reply: Reply | None = None) -> None:
        self._out += b"QUIT" + CRLF
        self._over(Failed(why, reply))

    def _over(self, event: Event) -> None:
        self._events.append(event)
        self._step = _Step.OVER

    def _done(self, results: list[Reply | None], usable: bool = True) -> None:
        assert all(result is not None for result in results)
        self.results = list(results)
        self._transaction = None
        self._events.append(Done(tuple(results)))  # type: ignore[arg-type]
        if usable:
            self._step = _Step.READY

    # -- the session

    def _greeting(self, reply: Reply) -> None:
        if reply.code != 220:
            return self._fail("greeting", reply)
        return self._hello()

    def _hello(self) -> None:
        self._send(f"{'LHLO' if self.lmtp else 'EHLO'} {self.ehlo_name}", _Step.HELLO)

    def _hello_reply(self, reply: Reply) -> None:
        if reply.code != 250:
            return self._fail("LHLO" if self.lmtp else "EHLO", reply)
        self.extensions = {}
        for line in reply.lines[1:]:
            words = line.upper().split()
            if words:
                self.extensions[words[0]] = words[1:]
        return self._setup()

    def _setup(self) -> None:
        """After LHLO/EHLO: STARTTLS, then XCLIENT, then XFORWARD, each when due; then Ready."""
        if not self.tls_active and self.starttls and "STARTTLS" in self.extensions:
            return self._send("STARTTLS", _Step.STARTTLS)
        if self.require_tls and not self.tls_active:
            return self._fail("server offers no STARTTLS")
        if self.xclient is not None and "XCLIENT" in self.extensions and "XCLIENT" not in self._sent:
            self._sent.add("XCLIENT")
            return self._send(self.xclient.command(self.extensions["XCLIENT"]).decode(), _Step.XCLIENT)
        if self.xforward is not None and "XFORWARD" in self.extensions and "XFORWARD" not in self._sent:
            self._sent.add("XFORWARD")
            return self._send(self.xforward.command(self.extensions["XFORWARD"]).decode(), _Step.XFORWARD)
        self._step = _Step.READY
        self._events.append(Ready())
        return None

    def _starttls_reply(self, reply: Reply) -> None:
        if reply.code != 220:
            return self._fail("STARTTLS", reply)
        self._step = _Step.TLS
        self._events.append(StartTls())
        return None

    def _xclient_reply(self, reply: Reply) -> None:
        if not reply.positive:
            return self._fail("XCLIENT", reply)
        return self._hello()  # the server starts a new session with a greeting: LHLO/EHLO again

    def _xforward_reply(self, reply: Reply) -> None:
        if not reply.positive:
            return self._fail("XFORWARD", reply)
        return self._setup()

    def _unexpected(self, reply: Reply) -> None:
        raise ProtocolError(f"unexpected reply while {self._step.name.lower()}: {reply}", close=True)

    def _quit_reply(self, reply: Reply) -> None:
        self._over(Closed())

    # -- the transaction

    def _mail_reply(self, reply: Reply) -> None:
        assert self._transaction is not None
        if not reply.positive:
            if not self._pipelined:
                return self._done([reply] * len(self.results))
            self._refused = reply  # the RCPTs' and DATA's replies still come: read past them
        return self._rcpt()

    def _rcpt(self) -> None:
        assert self._transaction is not None
        if self._pipelined:
            self._step = _Step.RCPT
            return
        self._send(f"RCPT TO:<{self._transaction.recipients[self._next]}>", _Step.RCPT)

    def _rcpt_reply(self, reply: Reply) -> None:
        assert self._transaction is not None
        if self._refused is not None:
            self.results[self._next] = self._refused
        elif reply.positive:
            self._accepted[self._next] = reply  # its result is the reply after the body
        else:
            self.results[self._next] = reply
        self._next += 1
        if self._next < len(self.results):
            return self._rcpt()
        if self._pipelined:
            self._step = _Step.DATA
            return None
        if self._transaction.verify or not self._accepted:
            for index, accepted in self._accepted.items():
                self.results[index] = accepted
            return self._send("RSET", _Step.RSET)
        return self._send("DATA", _Step.DATA)

    def _data_reply(self, reply: Reply) -> None:
        if reply.code == 354 and not self._accepted:
            # Pipelined DATA with no recipient taken must be refused (RFC 2033 4.2, RFC 2920).
            return self._fail("server took DATA with no recipient", reply)
        if reply.code != 354:
            for index in self._accepted:
                self.results[index] = reply
            return self._send("RSET", _Step.RSET)
        self._line_start, self._tail = True, b""
        self._step = _Step.BODY
        self._events.append(SendBody())
        return None

    def _final_reply(self, reply: Reply) -> None:
        if not self.lmtp:
            return self._done([reply if i in self._accepted else result for i, result in enumerate(self.results)])
        self.results[list(self._accepted)[self._final]] = reply
        self._final += 1
        if self._final == len(self._accepted):
            return self._done(self.results)
        return None

    def _rset_reply(self, reply: Reply) -> None:
        self._done(self.results, usable=reply.positive)
        if not reply.positive:
            self._fail("RSET", reply)


_HANDLERS: dict[_Step, Callable[[DeliveryClient, Reply], None]] = {
    _Step.GREETING: DeliveryClient._greeting,
    _Step.HELLO: DeliveryClient._hello_reply,
    _Step.STARTTLS: DeliveryClient._starttls_reply,
    _Step.XCLIENT: DeliveryClient._xclient_reply,
    _Step.XFORWARD: DeliveryClient._xforward_reply,
    _Step.READY: DeliveryClient._unexpected,
    _Step.MAIL: DeliveryClient._mail_reply,
    _Step.RCPT: DeliveryClient._rcpt_reply,
    _Step.DATA: DeliveryClient._data_reply,
    _Step.FINAL: DeliveryClient._final_reply,
    _Step.RSET: DeliveryClient._rset_reply,
    _Step.QUIT: DeliveryClient._quit_reply,
}
